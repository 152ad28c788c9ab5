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
Backpressure: slabs are bounded (``SLABS``, made only as bursts need them); when the writer falls
behind, the poll thread waits for a free slab and the kernel's socket buffers absorb the burst
(and drop, if they must) — a slow TUN write never blocks the control thread and never grows
memory past ``SLABS`` slabs.
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
from ipop.dataplane.coalesce import coalesce, complete_partial
from ipop.dataplane.link import Link
from ipop.dataplane.link_rx import (
    DELIVER,
    DELIVER_PARTIAL,
    DROP,
    EARLY_SECONDS,
    SUPER,
    TAKEN,
    Result,
)
from ipop.dataplane.link_tx import standalone
from ipop.dataplane.sources import SourceCheck
from ipop.dataplane.table import ForwardingTable
from ipop.dataplane.tun import Device
from ipop.dataplane.udpio import RECV_BUFFER, enable_gro, recv_batch, split_gro
from ipop.errors import RemoteProtocolError
from ipop.ratelimit import TokenBucket
from ipop.wire import header as wh
from ipop.wire.turn import parse_channel_data
from ipop.wire.vnet import PLAIN as PLAIN_VNET
from ipop.wire.vnet import parse as vnet_parse

Pkt = bytes | bytearray | memoryview
# (slab, packets or iovecs in it, whether the items are iovecs for writev)
Batch = tuple[bytearray, list[Any], bool]
SLOT = 2048  # one datagram (no GRO): 1500-byte underlay MTU with room to spare
SLOTS_PER_SLAB = 64
SLABS = 32  # slabs at most; made as bursts need them (``_take_slab``)
SPARE_SLABS = 4  # free slabs kept once a burst is over; the others are let go
GRO_SLOTS = 4  # GRO reads (up to 64 KB each) a slab holds at least
MAX_READS = 128  # reads per slab at most (single datagrams pack tightly)
# a change of the links' peers reaches the filters of the other sockets (``filters_changed``)
# once the links have stayed the same this long, or at the latest after FILTER_LAG_MAX
FILTER_SETTLE = 0.5
FILTER_LAG_MAX = 2.0
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
        on_rekey: Callable[[Link], None] | None = None,
    ) -> None:
        self.dev = dev
        self.tap = dev.tap
        self.on_confirm = on_confirm
        self.on_rekey = on_rekey
        # shards (``ipop.dataplane.shards``): (shards, this shard, the steered sockets' fds),
        # None with one worker
        self.steer: tuple[int, int, frozenset[int]] | None = None
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
        self.slab_size = RECV_BUFFER * GRO_SLOTS if self.gro else SLOT * SLOTS_PER_SLAB
        # slabs made so far: a new one only when none is free (a zeroed slab is 128-256 KB of
        # touched memory; all 32 up front were 4-8 MB per node that an idle node never used)
        self.slabs = 0
        self.work: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        # links whose held early frames (``LinkReceiver.early``) may open now: the control
        # thread puts them here and writes the wake pipe (``DataPlane.release_early``)
        self.replays: queue.SimpleQueue[Link] = queue.SimpleQueue()
        self.replaying = False  # poll thread: frames being replayed are not held again
        self.batch: _Gather | None = None  # poll thread: the batch being read or replayed
        self.written = 0
        self.drained = False  # poll thread: the last drain emptied its socket
        self.queued = 0  # batches handed to the writer (written by the poll thread only)
        self.done = 0  # batches the writer finished (written by the writer thread only)
        self.gro_missing = False
        self.sources = SourceCheck(dev, table, self.drops)  # cryptokey routing
        self.unknown_control = TokenBucket(UNKNOWN_CONTROL_RATE, UNKNOWN_CONTROL_BURST)
        self.socket_filter = True  # every socket so far took the kernel filter
        self.filters_stale_since: float | None = None  # a peer change not yet on every socket
        self.filters_changed_at = 0.0
        self.kernel_drops_gone = 0
        # the TUN writer: writes batches the poll thread hands over (``_hand_over``)
        self.tun_writer = threading.Thread(target=self._write_loop, name="ipop-tun-write",
                                           daemon=True)

    def start(self) -> None:
        self.tun_writer.start()

    def stop(self) -> None:
        self.work.put(None)

    def add_socket(self, sock: socket.socket, *, gro: bool = True) -> bool:
        """Serve ``sock`` (GRO on unless ``gro`` is False, the kernel filter attached); False if
        it was served already.  The caller has the poll thread watch it (``Poller.watch``)."""
        sock.setblocking(False)
        fd = sock.fileno()
        if fd in self.socks:
            return False
        if self.gro and gro and not enable_gro(sock):
            self.gro_missing = True
        if not sockfilter.attach(sock, self.uid, list(self.table.by_uid)):
            self.socket_filter = False
        probe = select.poll()
        probe.register(fd, select.POLLIN)
        self.probes[fd] = probe
        self.socks[fd] = sock
        return True

    def refresh_filters(self) -> None:
        """Every socket's filter takes the links' peers now: frames may come from their UIDs
        (``sockfilter``)."""
        self.filters_stale_since = None
        peers = list(self.table.by_uid)
        for sock in list(self.socks.values()):
            if not sockfilter.attach(sock, self.uid, peers):
                self.socket_filter = False

    def filters_changed(self, sock: socket.socket | None = None,
                        now: float | None = None) -> None:
        """The links' peers changed (a link added or removed).  ``sock``, a new link's socket,
        takes the new filter at once, so its peer's frames pass; the other sockets take it in
        ``refresh_due`` once the links settle.  (A mesh coming up changes its peers once per new
        link: re-attaching every socket's filter each time made N² attaches of an N-peer
        program, about a tenth of a 32-node mesh's set-up CPU.)  Until then a removed peer's
        frames reach Python, which drops them as from no link, and a new peer's frames pass on
        its own link's socket."""
        now = time.monotonic() if now is None else now
        if (sock is not None and sock.fileno() in self.socks
                and not sockfilter.attach(sock, self.uid, list(self.table.by_uid))):
            self.socket_filter = False
        self.filters_changed_at = now
        if self.filters_stale_since is None:
            self.filters_stale_since = now

    def refresh_due(self, now: float) -> bool:
        """Refresh every socket's filter if a peer change waited long enough (control thread,
        each tick); True if it did."""
        since = self.filters_stale_since
        if since is None or (now - self.filters_changed_at < FILTER_SETTLE
                             and now - since < FILTER_LAG_MAX):
            return False
        self.refresh_filters()
        return True

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

    def on_confirmed(self, link: Link) -> None:
        """The peer of a plain link sent its first frame after our handshake (``RxHost``)."""
        if self.on_confirm is not None:
            self.on_confirm(link)

    def _take_slab(self) -> bytearray:
        """A free slab (poll thread): one given back, else a new one while fewer than ``SLABS``
        exist, else wait for the writer to give one back.  More than ``SPARE_SLABS`` free ones
        (a burst is over) shrink by one a take."""
        try:
            slab = self.free.get_nowait()
        except queue.Empty:
            pass
        else:
            # a burst is over: let go of the free slabs beyond SPARE_SLABS (at most one per
            # take, so a steady load that needs them does not remake them at once)
            if self.free.qsize() > SPARE_SLABS:
                try:
                    self.free.get_nowait()
                    self.slabs -= 1
                except queue.Empty:
                    pass
            return slab
        if self.slabs < SLABS:
            self.slabs += 1
            return bytearray(self.slab_size)
        return self.free.get()


    def on_rekey_request(self, link: Link) -> None:
        """The peer asked for a new handshake, in a sealed frame (``RxHost``)."""
        if self.on_rekey is not None:
            self.on_rekey(link)

    def off_shard(self, link: Link, first: int) -> bool:
        """With shards: whether a frame whose type byte is ``first`` must not be taken here.
        A link on the steered port (its path's socket is one of the reuseport group's) takes
        the frames of sending shard ``s`` only in shard ``s % shards``, so one replay window
        sees every frame of a (link, epoch, sending shard) stream, whichever socket an attacker
        sends a copy to.  A link on another socket (ICE's, a relay's) is received by shard 0
        only; other shards take none of its frames."""
        steer = self.steer
        if steer is None:
            return False
        shards, me, group = steer
        if link.path.sock.fileno() in group:
            return wh.shard_of(first) % shards != me
        return me != 0
    def _drain(self, sock: socket.socket) -> None:
        slab = self._take_slab()
        view = memoryview(slab)
        self.drained = False
        batch = self.batch = _Gather(self)
        try:
            if self.gro:
                self._read_trains(sock, view, batch)
            else:
                self._read_datagrams(sock, view, batch)
        finally:
            self.batch = None
            self._finish_batch(slab, batch)

    def replay_early(self) -> None:
        """Open the frames held while their keys were being made (``LinkReceiver.early``), now
        that the keys are in; frames older than ``EARLY_SECONDS`` are dropped."""
        while True:
            try:
                link = self.replays.get_nowait()
            except queue.Empty:
                return
            if not link.rx.early or link.closed:
                link.rx.early.clear()
                continue
            slab = self._take_slab()
            batch = self.batch = _Gather(self)
            try:
                self._replay_into(link, batch)
            finally:
                self.batch = None
                self.drained = True
                self._finish_batch(slab, batch)

    def replay_held(self, link: Link) -> None:
        """A frame of ``link`` opened before its held frames were replayed (``RxHost``): they
        join the batch being read first."""
        if self.batch is not None:
            self._replay_into(link, self.batch)

    def _replay_into(self, link: Link, batch: _Gather) -> None:
        early = link.rx.early
        held = list(early)
        early.clear()
        now = time.monotonic()
        self.replaying = True
        try:
            for at, sock, data, addr, channel in held:
                if now - at > EARLY_SECONDS:
                    link.stats.rx_drops["early_expired"] += 1
                    continue
                batch.add(self.receive(sock, memoryview(data), addr, channel))
        finally:
            self.replaying = False

    def _finish_batch(self, slab: bytearray, batch: _Gather) -> None:
        out, partial, ready = batch.out, batch.partial, batch.ready
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
        """Give a batch to the TUN writer thread, or write it here when this thread has nothing
        else to do: the socket is drained and the writer has nothing left to write (so order
        holds).  Under load the writer works in parallel with reading and opening; otherwise
        a thread wake-up per batch is spared (measured on 2 cores: ping, and throughput, since
        the hand-over costs more than the overlap gains there)."""
        if self.drained and self.queued == self.done:
            self._write_batch(slab, pkts, vectored)
            return
        self.queued += 1
        self.work.put((slab, pkts, vectored))

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

    def _read_datagrams(self, sock: socket.socket, view: memoryview, batch: _Gather) -> None:
        recvfrom_into = sock.recvfrom_into
        more = self._more(sock)
        receive = self.receive
        add = batch.add
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
                add(receive(sock, view[off : off + n], addr, None))
            except RemoteProtocolError as exc:
                self.drops[exc.reason] += 1

    def _read_trains(self, sock: socket.socket, view: memoryview, batch: _Gather) -> None:
        # Reads go back to back into the slab while a whole GRO batch still fits behind them,
        # so single datagrams (no GRO on the path) share a slab as well as trains do.
        off = 0
        end = len(view)
        more = self._more(sock)
        receive = self.receive
        add = batch.add
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
            first = area[0] & wh.TYPE_MASK  # without the sender's shard bits
            iovs: list[list[Any]] | None = None
            if gso < n and first == wh.T_DATA_PARTIAL:
                link = self._direct_sender(sock, area, addr)
                if link is not None:
                    iovs = link.rx.gro_run(self, area, n, gso)
            elif first == wh.T_TRAIN or first == wh.T_TRAIN_SEALED:
                link = self._direct_sender(sock, area, addr)
                if link is not None:
                    # an encrypted train is opened into the slab, behind this read
                    spare = view[off : end - RECV_BUFFER] if end - off > RECV_BUFFER else None
                    iovs, used = link.rx.whole_train(self, area, n, gso, spare)
                    off += (used + 15) & ~15
            if iovs is not None:
                batch.add_writes(iovs)
                continue
            for dgram in split_gro(area, n, gso):
                try:
                    add(receive(sock, dgram, addr, None))
                except RemoteProtocolError as exc:
                    self.drops[exc.reason] += 1

    def _direct_sender(self, sock: socket.socket, area: memoryview,
                       addr: tuple[str, int]) -> Link | None:
        """The link a GRO read came from, by its first frame's source UID, if the read arrived
        on that link's own direct path (socket and address); else None."""
        link = self.table.by_uid.get(bytes(area[wh.SRC_OFF : wh.DST_OFF]))
        if link is None or not link.rx.on_direct_path(sock, addr):
            return None
        if self.steer is not None and self.off_shard(link, area[0]):
            return None  # the per-datagram path counts the drop
        return link

    def _drop(self, reason: str) -> Result:
        self.drops[reason] += 1
        return (DROP, reason)

    def receive(self, sock: socket.socket, dgram: memoryview, addr: tuple[str, int],
                channel: int | None = None) -> Result:
        """One datagram that came on ``sock`` from ``addr`` (inside TURN ``channel``, if not
        None): demultiplexed by its first byte (RFC 7983) and, if it is an ipop frame for this
        node from a peer with a link, checked and opened by that link's receive half.  Returns
        what to do with it (``ipop.dataplane.link_rx``); a drop is counted already."""
        if not dgram:
            return self._drop("empty")
        kind = _KIND[dgram[0]]
        if kind is _OVERLAY:
            if len(dgram) < wh.HEADER_LEN:
                return self._drop("truncated")
            link = self.table.by_uid.get(bytes(dgram[wh.SRC_OFF : wh.DST_OFF]))
            if link is None:
                return self._drop("unknown_peer")
            if dgram[wh.DST_OFF : wh.PAYLOAD_OFF] != self.uid:
                link.stats.rx_drops["not_for_us"] += 1
                return (DROP, "not_for_us")
            if self.steer is not None and self.off_shard(link, dgram[0]):
                link.stats.rx_drops["wrong_shard"] += 1
                return (DROP, "wrong_shard")
            return link.rx.frame(self, sock, dgram, addr, channel)
        if kind is _CHANNEL_DATA and channel is None:
            try:
                chan, inner = parse_channel_data(dgram)
            except RemoteProtocolError as exc:
                return self._drop(exc.reason)
            return self.receive(sock, inner, addr, chan)
        if kind is _STUN or kind is _DTLS:
            link = self.table.by_source.get((sock.fileno(), addr, channel))
            if link is None and not self.unknown_control.take(time.monotonic()):
                return self._drop("control_unknown_source")  # links' own upkeep goes first
            self.on_control(sock, bytes(dgram), addr, channel, link)
            return TAKEN
        return self._drop("unknown_kind")

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



class _Gather:
    """One batch's TUN writes in arrival order: single packets (``out``, and whether each is
    partial) and, on a device that takes super-packets, finished writes (``ready``; single
    packets gathered before a super-packet are merged and go first)."""

    __slots__ = ("inbound", "out", "partial", "ready")

    def __init__(self, inbound: Inbound) -> None:
        self.inbound = inbound
        self.out: list[Pkt] = []
        self.partial: list[bool] = []
        self.ready: list[list[Any]] = []

    def add(self, result: Result) -> None:
        """One datagram's result (``LinkReceiver``): what it writes joins the batch."""
        kind, value = result
        if kind == DELIVER:
            self.out.append(value)
            self.partial.append(False)
        elif kind == DELIVER_PARTIAL:
            self.out.append(value)
            self.partial.append(True)
        elif kind == SUPER:
            if self.inbound.gro:  # the device takes super-packets
                self.add_writes([value])
                return
            body = b"".join(value[1:])
            for pkt in standalone(vnet_parse(value[0]), memoryview(body)):
                self.out.append(pkt)
                self.partial.append(False)

    def add_writes(self, iovs: list[list[Any]]) -> None:
        """Finished TUN writes (super-packets); the single packets before them go first."""
        if self.out:
            self.ready.extend(self.inbound._merge(self.out, self.partial))
            self.out.clear()
            self.partial.clear()
        self.ready.extend(iovs)
