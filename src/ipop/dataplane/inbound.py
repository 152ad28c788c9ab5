"""UDP → TUN: the inbound pipeline, run by the poll thread (``Poller``) and the TUN writer
thread, joined by a bounded queue.

Pipeline:
  0. [kernel] a classic BPF filter on every socket (``sockfilter``) drops datagrams whose
     first byte is in no valid range, STUN without its cookie, non-DTLS, and frames for
     another UID, before they are queued: a garbage flood costs no Python;
  1. [poll thread] a socket is readable (``drain``): drain it into slots of a preallocated slab
     until it is empty (a zero-timeout poll() per socket says so, with no failing read) or the
     slab is full;
  2. [poll thread] demultiplex each datagram by its first byte (``ipop.wire.header.classify``,
     RFC 7983): ipop frames go on; TURN ChannelData is unwrapped (``ipop.wire.turn``) and
     demultiplexed again; STUN and DTLS are copied and handed to the control thread (from a
     source that is no link's path: at most ``UNKNOWN_CONTROL_RATE`` a second, the rest counted
     as ``control_unknown_source``, so a flood cannot starve the control thread); anything else
     is dropped and counted;
  3. [poll thread] find the link by the source UID, check the destination UID, then either check
     the source address (plain links never follow an unauthenticated address change) or open the
     sealed payload (AEAD + replay window; a sealed link may roam to a new address only on a
     frame that authenticates; a frame under an epoch whose keys this end is still making is
     held, 16 per link for 2 s, and replayed from step 2 when the keys are in);
  4. [poll thread] answer keepalive probes; check the inner source (cryptokey routing: a peer may
     send only from its overlay addresses and the prefixes its link carries; TAP: from its own
     MACs, and ARP/IP senders inside the overlay prefix must be its own), once per packet on
     the per-datagram path and once per super-packet or train on the others; learn source MACs;
  5. [TUN writer thread] write the batch's packets to the device, then give the slab back; when
     the poll thread has drained its socket and the writer has nothing queued, the poll thread
     writes the batch itself (the hand-over would cost a wake-up and buy no overlap).
With offloads the sockets have UDP_GRO on: one read brings a train of datagrams, which step 2
splits; the packets of a batch that continue one TCP flow are merged again into super-packets
(``coalesce``) and written with a ``virtio_net_hdr`` in one ``writev`` each.  Without a vnet
header on the device, partial inner packets (frame type 0x84) get their checksums completed.
Ordering: one socket is drained in order and batches are written in order, so a flow's order holds.
Backpressure: slabs are bounded; when the writer falls behind, the poll thread waits for a free slab
and the kernel's socket buffers absorb the burst (and drop, if they must) — a slow TUN write never
blocks the control thread and never grows memory.
Buffers: a slab is lent to the writer with its batch and comes back once every packet in it is
written; plain payloads are memoryviews into it, opened (decrypted) payloads are new bytes.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ipop.dataplane import sockfilter
from ipop.dataplane.coalesce import coalesce, coalesce_gro, complete_partial
from ipop.dataplane.link import EARLY_SECONDS, CryptoSession, Link, standalone
from ipop.dataplane.sources import SourceCheck
from ipop.dataplane.table import ForwardingTable
from ipop.dataplane.tun import Device
from ipop.dataplane.udpio import RECV_BUFFER, enable_gro, recv_batch, split_gro
from ipop.errors import RemoteProtocolError
from ipop.ratelimit import TokenBucket
from ipop.wire import header as wh
from ipop.wire import keepalive as wk
from ipop.wire import train as wt
from ipop.wire.turn import parse_channel_data
from ipop.wire.vnet import F_NEEDS_CSUM, VNET_HDR_LEN
from ipop.wire.vnet import PLAIN as PLAIN_VNET
from ipop.wire.vnet import parse as vnet_parse

Pkt = bytes | bytearray | memoryview
# (slab, packets or iovecs in it, whether the items are iovecs for writev)
Batch = tuple[bytearray, list[Any], bool]
SLOT = 2048  # one datagram (no GRO): 1500-byte underlay MTU with room to spare
SLOTS_PER_SLAB = 64
SLABS = 32
GRO_SLOTS = 4  # GRO reads (up to 64 KB each) a slab holds at least
MAX_READS = 128  # reads per slab at most (single datagrams pack tightly)
LOSS_REPORT_GAP = 0.05  # seconds between two reports of lost trains to one peer
UNKNOWN_CONTROL_RATE = 500.0  # STUN/DTLS datagrams a second from no link's path, at most
UNKNOWN_CONTROL_BURST = 200.0

log = logging.getLogger("ipop.dataplane")
_KIND = wh.KIND_BY_FIRST_BYTE  # RFC 7983 demultiplexing (``ipop.wire.header.classify``)
_OVERLAY, _CHANNEL_DATA, _STUN, _DTLS = wh.Kind.OVERLAY, wh.Kind.TURN, wh.Kind.STUN, wh.Kind.DTLS
_ICMP_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})
# (socket, datagram copy, source address, TURN channel or None, link or None)
ControlHandler = Callable[[socket.socket, bytes, tuple[str, int], int | None, Link | None], None]


class Inbound:
    """The receive pipeline: the sockets the poll thread drains, their slabs, and the TUN
    writer thread."""

    def __init__(
        self,
        dev: Device,
        table: ForwardingTable,
        local_uid: bytes,
        *,
        on_control: ControlHandler,
        on_roam: Callable[[Link, socket.socket, tuple[str, int]], None],
        on_confirm: Callable[[Link], None] | None = None,
    ) -> None:
        self.dev = dev
        self.on_confirm = on_confirm
        self.table = table
        self.uid = local_uid
        self.on_control = on_control
        self.on_roam = on_roam
        self.socks: dict[int, socket.socket] = {}
        # one zero-timeout poll() per socket tells whether more is queued: cheaper than a read
        # that fails with EAGAIN, whose exception is the costliest step of a lone packet's way
        self.probes: dict[int, select.poll] = {}
        self.drops: collections.Counter[str] = collections.Counter()
        self.free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self.gro = dev.vnet_hdr  # receive trains (UDP_GRO) and write super-packets
        slab_size = RECV_BUFFER * GRO_SLOTS if self.gro else SLOT * SLOTS_PER_SLAB
        for _ in range(SLABS):
            self.free.put(bytearray(slab_size))
        self.work: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        # links whose held early frames (``Link.early``) may open now: the control thread puts
        # them here and writes the wake pipe (``DataPlane.release_early``)
        self.replays: queue.SimpleQueue[Link] = queue.SimpleQueue()
        self._replaying = False  # poll thread: frames being replayed are not held again
        self.written = 0
        self.drained = False  # poll thread: the last drain emptied its socket
        self.queued = 0  # batches handed to the writer (written by the poll thread only)
        self.done = 0  # batches the writer finished (written by the writer thread only)
        self.gro_missing = False
        self.sources = SourceCheck(dev, table, self.drops)  # cryptokey routing
        self.unknown_control = TokenBucket(UNKNOWN_CONTROL_RATE, UNKNOWN_CONTROL_BURST)
        self.socket_filter = True  # every socket so far took the kernel filter
        self.kernel_drops_gone = 0
        # the TUN writer: writes batches the poll thread hands over (``_hand_over``)
        self.tun_writer = threading.Thread(target=self._write_loop, name="ipop-tun-write",
                                           daemon=True)

    def start(self) -> None:
        self.tun_writer.start()

    def stop(self) -> None:
        self.work.put(None)

    def add_socket(self, sock: socket.socket) -> bool:
        """Serve ``sock`` (GRO on, the kernel filter attached); False if it was served already.
        The caller has the poll thread watch it (``Poller.watch``)."""
        sock.setblocking(False)
        fd = sock.fileno()
        if fd in self.socks:
            return False
        if self.gro and not enable_gro(sock):
            self.gro_missing = True
        if not sockfilter.attach(sock, self.uid, list(self.table.by_uid)):
            self.socket_filter = False
        probe = select.poll()
        probe.register(fd, select.POLLIN)
        self.probes[fd] = probe
        self.socks[fd] = sock
        return True

    def refresh_filters(self) -> None:
        """The links changed: frames may come from their peers' UIDs (``sockfilter``)."""
        peers = list(self.table.by_uid)
        for sock in list(self.socks.values()):
            if not sockfilter.attach(sock, self.uid, peers):
                self.socket_filter = False

    def kernel_drops(self) -> int:
        """Datagrams the kernel dropped on our sockets (filter and full queues), and on those
        removed before (``kernel_drops_gone``)."""
        return self.kernel_drops_gone + sum(
            sockfilter.kernel_drops(s) for s in list(self.socks.values()))

    def remove_socket(self, sock: socket.socket) -> bool:
        """Stop serving ``sock``; False if it was not served.  The caller has the poll thread
        stop watching it (``Poller.unwatch``)."""
        fd = sock.fileno()
        self.probes.pop(fd, None)
        if self.socks.pop(fd, None) is None:
            return False
        self.kernel_drops_gone += sockfilter.kernel_drops(sock)
        sockfilter.detach(sock)  # given back to its owner as it came
        return True

    # ---- poll thread
    def drain(self, fd: int) -> None:
        """Socket ``fd`` is readable (``Poller``): read it into a slab and pass the batch on."""
        sock = self.socks.get(fd)
        if sock is not None:
            self._drain(sock)

    def _drain(self, sock: socket.socket) -> None:
        slab = self.free.get()
        view = memoryview(slab)
        self.drained = False
        out: list[Pkt] = []
        partial: list[bool] = []
        ready: list[list[Any]] = []  # TUN writes already made (GRO mode), in arrival order
        try:
            if self.gro:
                self._read_trains(sock, view, out, partial, ready)
            else:
                self._read_datagrams(sock, view, out, partial)
        finally:
            self._finish_batch(slab, out, partial, ready)

    def replay_early(self) -> None:
        """Open the frames held while their keys were being made (``_hold_early``), now that
        the keys are in; frames older than ``EARLY_SECONDS`` are dropped."""
        while True:
            try:
                link = self.replays.get_nowait()
            except queue.Empty:
                return
            held = list(link.early)
            link.early.clear()
            if not held or link.closed:
                continue
            now = time.monotonic()
            slab = self.free.get()
            out: list[Pkt] = []
            partial: list[bool] = []
            ready: list[list[Any]] = []
            self._replaying = True
            try:
                for at, sock, data, addr, channel in held:
                    if now - at > EARLY_SECONDS:
                        link.stats.drops["early_expired"] += 1
                        continue
                    self._demux(sock, memoryview(data), addr, channel, out, partial,
                                ready if self.gro else None)
            finally:
                self._replaying = False
                self.drained = True
                self._finish_batch(slab, out, partial, ready)

    def _hold_early(self, link: Link, session: CryptoSession, sock: socket.socket,
                    dgram: memoryview, addr: tuple[str, int], channel: int | None) -> bool:
        """A sealed frame under an epoch we have no keys for, while this end is still making
        keys: the peer finished its handshake first (the DTLS server finishes before the
        client) and sent at once.  Hold a copy, bounded in number and time, for
        ``replay_early``; False when it is not that case (then it is dropped)."""
        if self._replaying or not session.awaiting_keys:
            return False
        if len(link.early) == link.early.maxlen:
            link.stats.drops["early_overflow"] += 1  # the oldest one makes room
        link.early.append((time.monotonic(), sock, bytes(dgram), addr, channel))
        return True

    def _finish_batch(self, slab: bytearray, out: list[Pkt], partial: list[bool],
                      ready: list[list[Any]]) -> None:
        if not out and not ready:
            self.free.put(slab)
        elif self.gro:
            if out:
                ready.extend(self._merge(out, partial))
            self._hand_over(slab, ready, True)
        else:
            if any(partial):
                out = self._completed(out, partial)
            self._hand_over(slab, out, False)

    def _more(self, sock: socket.socket) -> Callable[[int], list[tuple[int, int]]]:
        """``more(0)``: the socket's readiness now, without reading (empty: drained)."""
        probe = self.probes.get(sock.fileno())
        return probe.poll if probe is not None else _always

    def _hand_over(self, slab: bytearray, pkts: list[Any], vectored: bool) -> None:
        """Give a batch to the writer thread, or write it here when this thread has nothing
        else to do: the socket is drained and the writer has nothing left to write (so order
        holds).  Under load the writer works in parallel with reading and opening; otherwise
        a thread wake-up per batch is spared (measured on 2 cores: ping, and throughput, since
        the hand-over costs more than the overlap gains there)."""
        if self.drained and self.queued == self.done:
            self._write_batch(slab, pkts, vectored)
            return
        self.queued += 1
        self.work.put((slab, pkts, vectored))

    def _write_first(self, out: list[Pkt], partial: list[bool], ready: list[list[Any]]) -> None:
        """Keep arrival order before a super-packet joins ``ready``: the packets gathered so
        far are merged and go first."""
        if out:
            ready.extend(self._merge(out, partial))
            out.clear()
            partial.clear()

    def _merge(self, out: list[Pkt], partial: list[bool]) -> list[list[Any]]:
        try:
            return coalesce(out, partial)
        except RemoteProtocolError as exc:  # a plain-link peer can send anything
            self.drops[exc.reason] += 1
            return [[PLAIN_VNET, p] for p, f in zip(out, partial, strict=True) if not f]

    def _completed(self, out: list[Pkt], partial: list[bool]) -> list[Pkt]:
        done: list[Pkt] = []
        for p, f in zip(out, partial, strict=True):
            if not f:
                done.append(p)
                continue
            try:
                done.append(complete_partial(p))
            except RemoteProtocolError as exc:
                self.drops[exc.reason] += 1
        return done

    def _read_datagrams(self, sock: socket.socket, view: memoryview, out: list[Pkt],
                        partial: list[bool]) -> None:
        recvfrom_into = sock.recvfrom_into
        more = self._more(sock)
        slot = 0
        while slot < SLOTS_PER_SLAB:
            if slot and not more(0):
                self.drained = True
                return
            off = slot * SLOT
            try:
                n, raw_addr = recvfrom_into(view[off : off + SLOT])
            except (BlockingIOError, InterruptedError):
                self.drained = True
                return
            except OSError as exc:
                if exc.errno in _ICMP_ERRNOS:
                    continue  # ICMP errors surface here; the keepalive notices dead paths
                return
            slot += 1
            addr = raw_addr[:2]  # AF_INET6 sockets add flowinfo and scope_id
            try:
                self._demux(sock, view[off : off + n], addr, None, out, partial, None)
            except RemoteProtocolError as exc:
                self.drops[exc.reason] += 1

    def _read_trains(self, sock: socket.socket, view: memoryview, out: list[Pkt],
                     partial: list[bool], ready: list[list[Any]]) -> None:
        # Reads go back to back into the slab while a whole GRO batch still fits behind them,
        # so single datagrams (no GRO on the path) share a slab as well as trains do.
        off = 0
        end = len(view)
        more = self._more(sock)
        for i in range(MAX_READS):
            if end - off < RECV_BUFFER:
                return
            if i and not more(0):
                self.drained = True
                return
            area = view[off : off + RECV_BUFFER]
            try:
                n, addr, gso = recv_batch(sock, area)
            except (BlockingIOError, InterruptedError):
                self.drained = True
                return
            except RemoteProtocolError as exc:
                self.drops[exc.reason] += 1
                continue
            except OSError as exc:
                if exc.errno in _ICMP_ERRNOS:
                    continue
                return
            off += (n + 15) & ~15
            first = area[0]
            iovs: list[list[Any]] | None = None
            if gso < n and first == wh.T_DATA_PARTIAL:
                iovs = self._whole_train(sock, area, n, gso, addr)
            elif first == wh.T_TRAIN or first == wh.T_TRAIN_SEALED:
                # an encrypted train is opened into the slab, behind this read
                spare = view[off : end - RECV_BUFFER] if end - off > RECV_BUFFER else None
                iovs, used = self._train_read(sock, area, n, gso, addr, spare)
                off += (used + 15) & ~15
            if iovs is not None:
                self._write_first(out, partial, ready)
                ready.extend(iovs)
                continue
            for dgram in split_gro(area, n, gso):
                try:
                    self._demux(sock, dgram, addr, None, out, partial, ready)
                except RemoteProtocolError as exc:
                    self.drops[exc.reason] += 1

    def _direct_sender(self, sock: socket.socket, area: memoryview,
                       addr: tuple[str, int]) -> Link | None:
        """The link a GRO read came from, by its first frame's source UID, if the read arrived
        on that link's own direct path (socket and address); else None."""
        link = self.table.by_uid.get(bytes(area[wh.SRC_OFF : wh.DST_OFF]))
        if link is None or not link.authed:
            return None  # before its handshake: the per-datagram path counts the drop
        path = link.path
        if addr != path.addr or path.channel is not None or sock.fileno() != path.sock.fileno():
            return None
        return link

    def _whole_train(self, sock: socket.socket, area: memoryview, n: int, gso: int,
                     addr: tuple[str, int]) -> list[list[Any]] | None:
        """A GRO batch of one plain link's partial segments, checked and merged in one go
        (``coalesce_gro``), or None when the batch must take the per-datagram path."""
        link = self._direct_sender(sock, area, addr)
        if link is None or link.encrypted or link.xlat is not None:
            return None
        try:
            iovs = coalesce_gro(area, n, gso, link.rx_prefix_partial)
        except RemoteProtocolError:
            return None
        if iovs is None:
            return None
        count = -(-n // gso)
        stats = link.stats
        stats.rx_packets += count
        stats.rx_bytes += n - count * wh.HEADER_LEN
        stats.last_rx_mono = time.monotonic()
        # one source check per merged run: a run's headers are all equal but for seq and id
        for iov in iovs:
            if not link.source_ok(iov[1]):
                return self.sources.filter(link, iovs)
        return iovs

    def _demux(
        self,
        sock: socket.socket,
        dgram: memoryview,
        addr: tuple[str, int],
        channel: int | None,
        out: list[Pkt],
        partial: list[bool],
        ready: list[list[Any]] | None,
    ) -> None:
        if not dgram:
            self.drops["empty"] += 1
            return
        kind = _KIND[dgram[0]]
        if kind is _OVERLAY:
            self._frame(sock, dgram, addr, channel, out, partial, ready)
        elif kind is _CHANNEL_DATA and channel is None:
            try:
                chan, inner = parse_channel_data(dgram)
            except RemoteProtocolError as exc:
                self.drops[exc.reason] += 1
                return
            self._demux(sock, inner, addr, chan, out, partial, ready)
        elif kind is _STUN or kind is _DTLS:
            link = self.table.by_source.get((sock.fileno(), addr, channel))
            if link is None and not self.unknown_control.take(time.monotonic()):
                self.drops["control_unknown_source"] += 1  # links' own upkeep goes first
                return
            self.on_control(sock, bytes(dgram), addr, channel, link)
        else:
            self.drops["unknown_kind"] += 1

    def _frame(
        self,
        sock: socket.socket,
        dgram: memoryview,
        addr: tuple[str, int],
        channel: int | None,
        out: list[Pkt],
        partial: list[bool],
        ready: list[list[Any]] | None,
    ) -> None:
        if len(dgram) < wh.HEADER_LEN:
            self.drops["truncated"] += 1
            return
        link = self.table.by_uid.get(bytes(dgram[wh.SRC_OFF : wh.DST_OFF]))
        if link is None:
            self.drops["unknown_peer"] += 1
            return
        if dgram[wh.DST_OFF : wh.PAYLOAD_OFF] != self.uid:
            link.stats.drops["not_for_us"] += 1
            return
        ftype = dgram[0]
        stats = link.stats
        path = link.path
        same_path = (
            addr == path.addr and channel == path.channel and sock.fileno() == path.sock.fileno()
        )
        sealed = bool(ftype & wh.SEALED_BIT)
        session = link.session
        if sealed:
            if not link.encrypted or session is None:
                stats.drops["sealed_on_plain_link"] += 1
                return
        elif link.encrypted:
            stats.drops["plaintext_on_encrypted_link"] += 1
            return
        elif not same_path:
            stats.drops["unexpected_source"] += 1
            return
        elif not link.authed:
            if session is None or not session.ready:
                stats.drops["plain_before_handshake"] += 1
                return
            # our handshake is done and the proven peer sends from its path: it finished too
            # (the DTLS server of a plain link waits for this before it sends, so the client
            # never drops data that raced its last handshake flight)
            link.authed = True
            if self.on_confirm is not None:
                self.on_confirm(link)
        if ftype == wh.T_TRAIN or ftype == wh.T_TRAIN_SEALED:
            if not same_path:
                # a chunk counts towards reassembly (and loss) only from the link's current,
                # authenticated endpoint: forged ones never reach the reassembler
                stats.drops["train_chunk_off_path"] += 1
                return
            try:
                self._train_datagram(sock, link, session if sealed else None, dgram, addr,
                                     channel, same_path, out, partial, ready)
            except RemoteProtocolError as exc:
                stats.drops[exc.reason] += 1
            return
        if session is not None and sealed:
            try:
                payload: bytes | bytearray | memoryview = session.open(
                    dgram[: wh.HEADER_LEN], dgram[wh.HEADER_LEN :]
                )
            except RemoteProtocolError as exc:
                if exc.reason == "unknown_epoch" and self._hold_early(
                        link, session, sock, dgram, addr, channel):
                    return
                stats.drops[exc.reason] += 1
                return
            if not same_path and channel is None:
                self.on_roam(link, sock, addr)  # authenticated: the peer moved
        else:
            payload = dgram[wh.HEADER_LEN :]
        stats.last_rx_mono = time.monotonic()
        if ftype in wh.DATA_TYPES:
            is_partial = bool(ftype & wh.PARTIAL_BIT)
            stats.rx_packets += 1
            stats.rx_bytes += len(payload)
            if link.xlat is not None:
                writable = bytearray(payload) if isinstance(payload, bytes) else payload
                link.xlat.rx(writable, is_partial)
                payload = writable
            if self.dev.tap:
                if not self.sources.tap_ok(link, payload):
                    return
            elif not link.source_ok(payload):
                self.sources.spoofed(link, payload)
                return
            out.append(payload)
            partial.append(is_partial)
            return
        try:
            op, stamp = wk.parse(payload)
        except RemoteProtocolError as exc:
            stats.drops[exc.reason] += 1
            return
        if op == wk.OP_PROBE:
            send_keepalive(link, wk.OP_ECHO, stamp)
        elif op == wk.OP_TRAIN_LOSS:
            if link.trains.on_report(time.monotonic(), stamp, link.trains_sent):
                log.debug("link %s: peer lost a train; segments for %.0f s",
                          link.peer_uid.hex()[:12], link.trains.hold)
        else:
            rtt = (time.monotonic_ns() - stamp) / 1e6
            if 0 <= rtt < 60_000:
                stats.rtt_ms = rtt
            if link.pings:  # ``ipop ping`` waits for this echo (rare: not on the data path)
                waiter = link.pings.pop(stamp, None)
                if waiter is not None:
                    waiter(rtt)

    # ---- whole trains (``ipop.wire.train``)
    def _train_read(self, sock: socket.socket, area: memoryview, n: int, gso: int,
                    addr: tuple[str, int], spare: memoryview | None,
                    ) -> tuple[list[list[Any]] | None, int]:
        """A GRO read that holds exactly one whole train of a link on its path: its TUN write
        (none if the train is bad); None when the read must go datagram by datagram.  An
        encrypted train is opened into ``spare`` (slab space) when it fits: the bytes used of
        it come second."""
        link = self._direct_sender(sock, area, addr)
        if link is None:
            return None, 0
        got = wt.whole(area, n, gso, link.rx_prefix_train)
        if got is None:
            return None, 0
        seq, chunks = got
        now = time.monotonic()
        if link.encrypted and not link.reassembler.plausible(seq, now):
            link.stats.drops["train_implausible"] += 1
            return [], 0
        used = 0
        try:
            if link.encrypted:
                session = link.session
                if session is None:
                    link.stats.drops["sealed_on_plain_link"] += 1
                    return [], 0
                sealed = b"".join(chunks)
                out = spare if spare is not None and len(spare) >= len(sealed) else None
                blob = session.open(link.rx_prefix_train, sealed, out)
                if out is not None:
                    used = len(blob)
                iov = self._super_packet(link, blob, len(blob))
            else:
                iov = self._super_packet(link, chunks, n - len(chunks) * wt.FRAME_HDR)
        except RemoteProtocolError as exc:
            link.stats.drops[exc.reason] += 1
            return [], 0
        # counted as arrived (and the gap before it as lost) only once it proved genuine
        link.reassembler.completed(seq, now)
        link.reassembler.confirm(seq, now)
        self._count_loss(link, now)
        if iov is None:
            return [], used
        stats = link.stats
        stats.rx_packets += len(chunks)
        stats.rx_bytes += n - len(chunks) * wt.FRAME_HDR
        stats.last_rx_mono = now
        return [iov], used

    def _train_datagram(
        self,
        sock: socket.socket,
        link: Link,
        session: CryptoSession | None,
        dgram: memoryview,
        addr: tuple[str, int],
        channel: int | None,
        same_path: bool,
        out: list[Pkt],
        partial: list[bool],
        ready: list[list[Any]] | None,
    ) -> None:
        """One datagram of a train that did not come whole in one read, admitted by ``_frame``:
        reassemble (copying); ``session`` opens a sealed train, None for a plain one."""
        stats = link.stats
        seq, idx, count = wt.parse(dgram)
        now = time.monotonic()
        reasm = link.reassembler
        refused = reasm.refused
        joined = reasm.feed(seq, idx, count, dgram[wt.FRAME_HDR :], now)
        if reasm.refused != refused:
            stats.drops["train_implausible"] += 1
        self._count_loss(link, now)
        if joined is None:
            return
        blob: bytes | memoryview = joined
        if session is not None:
            blob = session.open(dgram[: wh.HEADER_LEN], blob)
        reasm.confirm(seq, now)
        iov = self._super_packet(link, blob, len(blob))
        stats.rx_packets += count
        stats.rx_bytes += len(blob)
        stats.last_rx_mono = now
        if iov is None:
            return
        if ready is not None:  # the device takes super-packets
            self._write_first(out, partial, ready)
            ready.append(iov)
            return
        body = b"".join(iov[1:])
        for pkt in standalone(vnet_parse(iov[0]), memoryview(body)):
            out.append(pkt)
            partial.append(False)

    def _super_packet(self, link: Link, blob: bytes | memoryview | list[memoryview],
                      size: int) -> list[Any] | None:
        """The TUN write (iovecs) for the blob a train carried (whole, or its chunks): its
        checked ``virtio_net_hdr``, then the packet, translated for a SocialVPN friend; None
        when its source is not one the peer may use (counted and logged; one check for the
        whole super-packet, whose segments all share its header)."""
        head = blob[0] if isinstance(blob, list) else blob
        vnet = wt.check_vnet(head, size)
        iov: list[Any]
        if link.xlat is not None:
            joined = b"".join(blob) if isinstance(blob, list) else blob
            body = bytearray(memoryview(joined)[VNET_HDR_LEN:])
            link.xlat.rx(body, bool(vnet[0] & F_NEEDS_CSUM))
            iov = [vnet, body]
        elif isinstance(blob, list):
            iov = [vnet, blob[0][VNET_HDR_LEN:], *blob[1:]]
        else:
            iov = [vnet, memoryview(blob)[VNET_HDR_LEN:]]
        if not link.source_ok(iov[1]):
            self.sources.spoofed(link, iov[1])
            return None
        return iov

    def _count_loss(self, link: Link, now: float) -> None:
        """Count trains that never completed, and tell the sender (it falls back to segments)."""
        lost = link.reassembler.lost
        if lost == link.loss_counted:
            return
        link.stats.drops["train_incomplete"] += lost - link.loss_counted
        link.loss_counted = lost
        if now - link.loss_report_at >= LOSS_REPORT_GAP:
            link.loss_report_at = now
            send_keepalive(link, wk.OP_TRAIN_LOSS, lost)

    # ---- writer thread
    def _write_loop(self) -> None:
        while True:
            item = self.work.get()
            if item is None:
                return
            slab, pkts, vectored = item
            alive = self._write_batch(slab, pkts, vectored)
            self.done += 1
            if not alive:
                return

    def _write_batch(self, slab: bytearray, pkts: list[Any], vectored: bool) -> bool:
        """Write a batch to the device and give its slab back; False once the device is gone."""
        fd = self.dev.fd
        alive = True
        for pkt in pkts:
            try:
                if vectored:
                    os.writev(fd, pkt)
                else:
                    os.write(fd, pkt)
                self.written += 1
            except BlockingIOError:
                self.drops["tun_full"] += 1
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    alive = False
                    break
                self.drops["tun_write_error"] += 1
        pkts.clear()
        self.free.put(slab)
        return alive


def _always(_timeout: int) -> list[tuple[int, int]]:
    return [(-1, select.POLLIN)]  # no probe (socket being removed): let the read tell


def send_keepalive(link: Link, op: int, stamp_ns: int) -> None:
    """Send a keepalive probe or echo on ``link`` (sealed on encrypted links, never plain)."""
    body = wk.pack(op, stamp_ns)
    if not link.encrypted:
        if not link.authed:
            return  # nothing goes to a peer before its handshake proved it
        link.send_frame([link.hdr_ka, body])
        return
    session = link.session
    if session is not None and session.ready:
        link.send_frame([link.hdr_ka_sealed, session.seal(link.hdr_ka_sealed, body)])
