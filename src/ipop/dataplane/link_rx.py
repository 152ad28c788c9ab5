"""A link's receive half: what one peer sends to this node (UDP → TUN), checked frame by frame.

``LinkReceiver`` takes an ipop frame that ``Inbound`` found to come from this link's peer and to
be for this node, and returns one result for it::

    (DELIVER, packet)          one inner packet for the device, its checksums complete
    (DELIVER_PARTIAL, packet)  one inner packet whose TCP/UDP checksum holds only the
                               pseudo-header sum (frame type 0x84: the device completes it, or
                               ``coalesce`` does)
    (SUPER, iovecs)            one super-packet write: its checked ``virtio_net_hdr``, then the
                               packet (a whole train, or one put together from its datagrams)
    (CONTROL, None)            taken here, nothing to write: a keepalive (a probe is echoed), an
                               echo, a loss report, a train still incomplete, or a sealed frame
                               held until its keys are in
    (DROP, reason)             dropped; the reason is counted already (``LinkStats.rx_drops``,
                               and node-wide for inner sources: ``SourceCheck``)

GRO reads that hold a whole train or a run of one plain link's partial segments take the fast
paths (``whole_train``, ``gro_run``): one check and one TUN write per train or merged run; the
read must come on the link's own direct path (``on_direct_path``).

Checks, in order: sealed or plain as the link is; a plain link's frames only from its path and
only once its handshake is done (the first one confirms a plain link: ``RxHost.on_confirm``);
train chunks only from the link's path; AEAD and the replay window (``CryptoSession.open``), and
an authenticated frame from a new address roams the link (``RxHost.on_roam``); the inner source
(cryptokey routing, ``SourceCheck``).  This half is the one writer of ``LinkStats.rx_*``,
``rx_drops``, ``last_rx_mono`` and ``rtt_ms``; it runs on the poll thread only.
"""

from __future__ import annotations

import collections
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from ipop.dataplane.coalesce import coalesce_gro
from ipop.errors import RemoteProtocolError
from ipop.wire import header as wh
from ipop.wire import keepalive as wk
from ipop.wire import train as wt
from ipop.wire.vnet import F_NEEDS_CSUM, VNET_HDR_LEN

if TYPE_CHECKING:
    from ipop.dataplane.link import CryptoSession, Link
    from ipop.dataplane.sources import SourceCheck

log = logging.getLogger("ipop.dataplane")

DELIVER: Final = 0
DELIVER_PARTIAL: Final = 1
SUPER: Final = 2
CONTROL: Final = 3
DROP: Final = 4
Result = tuple[int, Any]
"""``(DELIVER | DELIVER_PARTIAL | SUPER | CONTROL | DROP, value)``: see the module docstring."""
TAKEN: Final[Result] = (CONTROL, None)
WRITES: Final = frozenset({DELIVER, DELIVER_PARTIAL, SUPER})
"""The results that write something to the device."""

EARLY_LIMIT = 64
"""Sealed frames held at most, per link, while its first keys (or a rekey's) are made."""
EARLY_SECONDS = 2.0
"""How long such a frame is held before it is dropped (``early_expired``)."""
LOSS_REPORT_GAP = 0.05  # seconds between two reports of lost trains to one peer

# (arrival, socket, datagram, source, TURN channel)
EarlyFrame = tuple[float, socket.socket, bytes, tuple[str, int], int | None]


class RxHost(Protocol):
    """What the receive half needs from the data plane it runs in (``Inbound``)."""

    tap: bool
    sources: SourceCheck
    replaying: bool  # frames being replayed (``Inbound.replay_early``) are not held again
    # an authenticated frame came from a new address: the peer moved (the control thread moves
    # the link's path)
    on_roam: Callable[[Link, socket.socket, tuple[str, int]], None]

    def on_confirmed(self, link: Link) -> None:
        """The peer of a plain link sent its first frame after our handshake."""

    def on_rekey_request(self, link: Link) -> None:
        """The peer asked for a new handshake in a sealed frame (``wire.keepalive.OP_REKEY``)."""

    def replay_held(self, link: Link) -> None:
        """A frame of ``link`` opened while frames held before it (``LinkReceiver.early``)
        still wait: open those now, ahead of it in the batch being read, so that the link's
        frames keep their order (the keys came while the replay was not run yet)."""


class LinkReceiver:
    """The receive half of one ``Link``."""

    def __init__(self, link: Link, *, local_uid: bytes, encrypted: bool) -> None:
        self.link = link
        peer_uid = link.peer_uid
        # what this peer's partial frames and trains to us start with (the GRO fast paths),
        # one per sending shard of the peer (``wire.header.shard_of`` of the first byte)
        train = wh.T_TRAIN_SEALED if encrypted else wh.T_TRAIN
        self.rx_prefix_partial = tuple(wh.pack(wh.T_DATA_PARTIAL, peer_uid, local_uid, s)
                                       for s in range(wh.MAX_SHARDS))
        self.rx_prefix_train = tuple(wh.pack(train, peer_uid, local_uid, s)
                                     for s in range(wh.MAX_SHARDS))
        self.reassembler = wt.Reassembler()  # trains that came datagram by datagram
        self.loss_counted = 0  # reassembler.lost already counted and reported
        self.loss_report_at = 0.0
        # sealed frames under an epoch whose keys are still being made (the peer finished its
        # handshake first and sent at once), opened again once the keys are in
        # (``Inbound.replay_early``)
        self.early: collections.deque[EarlyFrame] = collections.deque(maxlen=EARLY_LIMIT)

    def _drop(self, reason: str) -> Result:
        self.link.stats.rx_drops[reason] += 1
        return (DROP, reason)

    def on_direct_path(self, sock: socket.socket, addr: tuple[str, int]) -> bool:
        """Whether a read from ``addr`` on ``sock`` came on the link's own direct path, from a
        proven peer (the GRO fast paths take only such reads)."""
        link = self.link
        if not link.authed:
            return False  # before its handshake: the per-datagram path counts the drop
        path = link.path
        return addr == path.addr and path.channel is None and sock.fileno() == path.sock.fileno()

    # ---- one datagram
    def frame(self, host: RxHost, sock: socket.socket, dgram: memoryview,
              addr: tuple[str, int], channel: int | None) -> Result:
        """One ipop frame from this link's peer to this node (``Inbound`` checked both UIDs)."""
        link = self.link
        ftype = dgram[0] & wh.TYPE_MASK
        stats = link.stats
        path = link.path
        same_path = (
            addr == path.addr and channel == path.channel and sock.fileno() == path.sock.fileno()
        )
        sealed = bool(ftype & wh.SEALED_BIT)
        session = link.session
        if sealed:
            if not link.encrypted or session is None:
                return self._drop("sealed_on_plain_link")
        elif link.encrypted:
            return self._drop("plaintext_on_encrypted_link")
        elif not same_path:
            return self._drop("unexpected_source")
        elif not link.authed:
            if session is None or not session.ready:
                return self._drop("plain_before_handshake")
            # our handshake is done and the proven peer sends from its path: it finished too
            # (the DTLS server of a plain link waits for this before it sends, so the client
            # never drops data that raced its last handshake flight)
            link.authed = True
            host.on_confirmed(link)
        if ftype == wh.T_TRAIN or ftype == wh.T_TRAIN_SEALED:
            if not same_path:
                # a chunk counts towards reassembly (and loss) only from the link's current,
                # authenticated endpoint: forged ones never reach the reassembler
                return self._drop("train_chunk_off_path")
            try:
                res = self._train_datagram(host, session if sealed else None, dgram)
            except RemoteProtocolError as exc:
                return self._drop(exc.reason)
            if self.early and res[0] in WRITES and not host.replaying:
                host.replay_held(link)
            return res
        if session is not None and sealed:
            try:
                payload: bytes | bytearray | memoryview = session.open(
                    dgram[: wh.HEADER_LEN], dgram[wh.HEADER_LEN :]
                )
            except RemoteProtocolError as exc:
                if exc.reason == "unknown_epoch" and self._hold_early(
                        host, session, sock, dgram, addr, channel):
                    return TAKEN
                return self._drop(exc.reason)
            if self.early and not host.replaying:
                host.replay_held(link)  # what came before this frame goes first
            if not same_path and channel is None:
                host.on_roam(link, sock, addr)  # authenticated: the peer moved
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
            if host.tap:
                if not host.sources.tap_ok(link, payload):
                    return (DROP, "spoofed_source")
            elif not link.source_ok(payload):
                return (DROP, host.sources.spoofed(link, payload))
            return (DELIVER_PARTIAL if is_partial else DELIVER, payload)
        return self._keepalive(payload, host, sealed)

    def _keepalive(self, payload: bytes | bytearray | memoryview, host: RxHost,
                   sealed: bool) -> Result:
        link = self.link
        try:
            op, stamp = wk.parse(payload)
        except RemoteProtocolError as exc:
            return self._drop(exc.reason)
        if op == wk.OP_REKEY:
            if not sealed:
                return self._drop("rekey_request_unsealed")
            host.on_rekey_request(link)
        elif op == wk.OP_PROBE:
            link.tx.send_keepalive(wk.OP_ECHO, stamp)
        elif op == wk.OP_TRAIN_LOSS:
            if link.tx.on_loss_report(time.monotonic(), stamp):
                log.debug("link %s: peer lost a train; segments for %.0f s",
                          link.peer_uid.hex()[:12], link.tx.trains.hold)
        else:
            rtt = (time.monotonic_ns() - stamp) / 1e6
            if 0 <= rtt < 60_000:
                link.stats.rtt_ms = rtt
            if link.pings:  # ``ipop ping`` waits for this echo (rare: not on the data path)
                waiter = link.pings.pop(stamp, None)
                if waiter is not None:
                    waiter(rtt)
        return TAKEN

    def _hold_early(self, host: RxHost, session: CryptoSession, sock: socket.socket,
                    dgram: memoryview, addr: tuple[str, int], channel: int | None) -> bool:
        """A sealed frame under an epoch we have no keys for, while this end is still making
        keys: the peer finished its handshake first (the DTLS server finishes before the
        client) and sent at once.  Hold a copy, bounded in number and time, for
        ``Inbound.replay_early``; False when it is not that case (then it is dropped)."""
        if host.replaying or not session.awaiting_keys:
            return False
        if len(self.early) == self.early.maxlen:
            self.link.stats.rx_drops["early_overflow"] += 1  # the oldest one makes room
        self.early.append((time.monotonic(), sock, bytes(dgram), addr, channel))
        return True

    # ---- trains (``ipop.wire.train``)
    def _train_datagram(self, host: RxHost, session: CryptoSession | None,
                        dgram: memoryview) -> Result:
        """One datagram of a train that did not come whole in one read, admitted by ``frame``:
        reassemble (copying); ``session`` opens a sealed train, None for a plain one."""
        stats = self.link.stats
        seq, idx, count = wt.parse(dgram)
        now = time.monotonic()
        reasm = self.reassembler
        refused = reasm.refused
        joined = reasm.feed(seq, idx, count, dgram[wt.FRAME_HDR :], now)
        if reasm.refused != refused:
            stats.rx_drops["train_implausible"] += 1
        self._count_loss(now)
        if joined is None:
            return TAKEN
        blob: bytes | memoryview = joined
        if session is not None:
            blob = session.open(dgram[: wh.HEADER_LEN], blob)
        reasm.confirm(seq, now)
        iov = self._super_packet(host, blob, len(blob))
        stats.rx_packets += count
        stats.rx_bytes += len(blob)
        stats.last_rx_mono = now
        if isinstance(iov, str):
            return (DROP, iov)
        return (SUPER, iov)

    def whole_train(self, host: RxHost, area: memoryview, n: int, gso: int,
                    spare: memoryview | None) -> tuple[list[list[Any]] | None, int]:
        """A GRO read on the direct path that may hold exactly one whole train of this link:
        its TUN write (none if the train is bad); None when the read must go datagram by
        datagram.  An encrypted train is opened into ``spare`` (slab space) when it fits: the
        bytes used of it come second."""
        link = self.link
        stats = link.stats
        prefix = self.rx_prefix_train[wh.shard_of(area[0])]
        got = wt.whole(area, n, gso, prefix)
        if got is None:
            return None, 0
        seq, chunks = got
        now = time.monotonic()
        if link.encrypted and not self.reassembler.plausible(seq, now):
            stats.rx_drops["train_implausible"] += 1
            return [], 0
        used = 0
        try:
            if link.encrypted:
                session = link.session
                if session is None:
                    stats.rx_drops["sealed_on_plain_link"] += 1
                    return [], 0
                sealed = b"".join(chunks)
                out = spare if spare is not None and len(spare) >= len(sealed) else None
                blob = session.open(prefix, sealed, out)
                if out is not None:
                    used = len(blob)
                iov = self._super_packet(host, blob, len(blob))
            else:
                iov = self._super_packet(host, chunks, n - len(chunks) * wt.FRAME_HDR)
        except RemoteProtocolError as exc:
            stats.rx_drops[exc.reason] += 1
            return [], 0
        # counted as arrived (and the gap before it as lost) only once it proved genuine
        self.reassembler.completed(seq, now)
        self.reassembler.confirm(seq, now)
        self._count_loss(now)
        if isinstance(iov, str):
            return [], used
        stats.rx_packets += len(chunks)
        stats.rx_bytes += n - len(chunks) * wt.FRAME_HDR
        stats.last_rx_mono = now
        return [iov], used

    def gro_run(self, host: RxHost, area: memoryview, n: int, gso: int,
                ) -> list[list[Any]] | None:
        """A GRO read on the direct path of a plain link's partial segments, checked and merged
        in one go (``coalesce_gro``), or None when the read must take the per-datagram path."""
        link = self.link
        if link.encrypted or link.xlat is not None:
            return None
        try:
            iovs = coalesce_gro(area, n, gso, self.rx_prefix_partial[wh.shard_of(area[0])])
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
                return host.sources.filter(link, iovs)
        return iovs

    def _super_packet(self, host: RxHost, blob: bytes | memoryview | list[memoryview],
                      size: int) -> list[Any] | str:
        """The TUN write (iovecs) for the blob a train carried (whole, or its chunks): its
        checked ``virtio_net_hdr``, then the packet, translated for a SocialVPN friend; the
        reason counted when its source is not one the peer may use (logged too; one check for
        the whole super-packet, whose segments all share its header)."""
        link = self.link
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
            return host.sources.spoofed(link, iov[1])
        return iov

    def _count_loss(self, now: float) -> None:
        """Count trains that never completed, and tell the sender (it falls back to segments)."""
        lost = self.reassembler.lost
        if lost == self.loss_counted:
            return
        self.link.stats.rx_drops["train_incomplete"] += lost - self.loss_counted
        self.loss_counted = lost
        if now - self.loss_report_at >= LOSS_REPORT_GAP:
            self.loss_report_at = now
            self.link.tx.send_keepalive(wk.OP_TRAIN_LOSS, lost)
