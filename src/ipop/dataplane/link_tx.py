"""A link's send half: what goes from this node to one peer (TUN → UDP, and keepalives).

``LinkSender`` holds everything only sending touches: the frame headers, the whole-train framer
and policy (``ipop.wire.train``), the packets queued while the link is keyed or proven (the
pending queue) and the seal buffer.  It reads the link's spec (path, session, ``encrypted``,
``authed``) and is the one writer of the send counters (``LinkStats.tx_*``, ``tx_drops``).

Threads: the poll thread sends data (``send_packet``, ``send_super``, ``send_small``; whole
trains); the control thread sends keepalives and hellos and flushes the pending queue once the
link is keyed (``flush_pending``, under the queue's lock).  A sealed payload's nonce comes from
the session's Sealer, which any thread may use (``ipop.crypto.aead``).
"""

from __future__ import annotations

import collections
import errno
import struct
import threading
import time
from typing import TYPE_CHECKING

from ipop.crypto.aead import OVERHEAD as SEAL_OVERHEAD
from ipop.dataplane.segment import partial_in_place, segment
from ipop.dataplane.udpio import send_train
from ipop.errors import LocalProtocolError
from ipop.wire import header as wh
from ipop.wire import keepalive as wk
from ipop.wire import train as wt
from ipop.wire.vnet import F_NEEDS_CSUM, GSO_NONE, VnetHdr

if TYPE_CHECKING:
    from ipop.dataplane.link import Link

CHANNEL_HDR = struct.Struct("!HH")
PENDING_LIMIT = 256
SEAL_BUFFER = 65536 + 64  # a TUN read (vnet header + 64 KB) sealed
HDR = wh.HEADER_LEN
_ERRNO_REASON = {errno.EMSGSIZE: "emsgsize", errno.EAGAIN: "sndbuf_full",
                 errno.ENOBUFS: "sndbuf_full"}


def standalone(vh: VnetHdr, pkt: memoryview) -> list[bytes]:
    """Complete standalone packets (checksums finished) from one vnet-header read: for the
    rare paths that keep packets for later (queues while a link is keyed or made)."""
    from ipop.dataplane.coalesce import complete_partial

    try:
        segs = segment(vh, pkt)
    except LocalProtocolError:
        return []
    out = []
    for i in range(0, len(segs.parts), segs.stride):
        one = b"".join(segs.parts[i : i + segs.stride])
        out.append(complete_partial(one) if segs.partial else one)
    return out


class LinkSender:
    """The send half of one ``Link``."""

    def __init__(self, link: Link, *, local_uid: bytes, encrypted: bool, mtu: int,
                 trains_off: str, shard: int = 0) -> None:
        self.link = link
        peer_uid = link.peer_uid
        # every header carries this shard's number in its type byte (``wire.header``)
        self.hdr_data = wh.pack(wh.T_DATA, local_uid, peer_uid, shard)
        self.hdr_sealed = wh.pack(wh.T_DATA_SEALED, local_uid, peer_uid, shard)
        self.hdr_ka = wh.pack(wh.T_KEEPALIVE, local_uid, peer_uid, shard)
        self.hdr_ka_sealed = wh.pack(wh.T_KEEPALIVE_SEALED, local_uid, peer_uid, shard)
        self.hdr_partial = wh.pack(wh.T_DATA_PARTIAL, local_uid, peer_uid, shard)
        self.hdr_partial_sealed = wh.pack(wh.T_DATA_PARTIAL_SEALED, local_uid, peer_uid, shard)
        # whole trains (``ipop.wire.train``): datagrams no bigger than sealed segments'
        self.hdr_train = wh.pack(wh.T_TRAIN, local_uid, peer_uid, shard)
        self.hdr_train_sealed = wh.pack(wh.T_TRAIN_SEALED, local_uid, peer_uid, shard)
        self.train_chunk = mtu + SEAL_OVERHEAD - wt.TRAIN_LEN
        self.framer = wt.Framer(self.hdr_train_sealed if encrypted else self.hdr_train,
                                self.train_chunk)
        # may we send trains now?  ``trains_off``: why never ("" = they may be sent); the
        # receive half feeds it the peer's loss reports (``on_loss_report``)
        self.trains = wt.TrainPolicy(not trains_off, trains_off)
        self.train_seq = 0
        self.trains_sent = 0
        self._seal_buf: bytearray | None = None  # trains are sealed into it (poll thread)
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_lock = threading.Lock()

    # ---- one datagram
    def send_frame(self, parts: list[bytes | bytearray | memoryview]) -> bool:
        """Send one datagram made of ``parts``; counts and swallows underlay errors."""
        link = self.link
        path = link.path
        if path.channel is not None:
            size = sum(len(p) for p in parts)
            parts = [CHANNEL_HDR.pack(path.channel, size), *parts]
        try:
            path.sock.sendmsg(parts, (), 0, path.addr)
        except OSError as exc:
            link.stats.tx_drops[_ERRNO_REASON.get(exc.errno or 0, "send_error")] += 1
            return False
        return True

    def send_keepalive(self, op: int, stamp_ns: int) -> None:
        """Send a keepalive probe, echo or loss report (sealed on encrypted links, never plain
        before the handshake proved the peer)."""
        link = self.link
        body = wk.pack(op, stamp_ns)
        if not link.encrypted:
            if not link.authed:
                return  # nothing goes to a peer before its handshake proved it
            self.send_frame([self.hdr_ka, body])
            return
        session = link.session
        if session is not None and session.ready:
            self.send_frame([self.hdr_ka_sealed, session.seal(self.hdr_ka_sealed, body)])

    def on_loss_report(self, now: float, lost: int) -> bool:
        """The peer reports ``lost`` trains in all (receive half); True: it falls back to
        segments for a while (``TrainPolicy``)."""
        return self.trains.on_report(now, lost, self.trains_sent)

    # ---- data
    def send_packet(self, pkt: bytes | bytearray | memoryview) -> None:
        """Send one inner packet: plain, sealed, or queued while the session is being keyed."""
        link = self.link
        stats = link.stats
        if not link.encrypted:
            if not link.authed or self._pending:
                self.queue_pending(bytes(pkt))
                return
            if self.send_frame([self.hdr_data, pkt]):
                stats.tx_packets += 1
                stats.tx_bytes += len(pkt)
            return
        session = link.session
        if session is None or not session.ready or self._pending:
            self.queue_pending(bytes(pkt))
            return
        sealed = session.seal(self.hdr_sealed, pkt)
        if self.send_frame([self.hdr_sealed, sealed]):
            stats.tx_packets += 1
            stats.tx_bytes += len(pkt)

    def send_super(self, vh: VnetHdr, pkt: memoryview, raw: memoryview | None = None) -> None:
        """Send what one read of a vnet-header TUN holds (up to a 64 KB TSO super-packet);
        ``raw`` is the whole read (``virtio_net_hdr`` + ``pkt``).

        While the link shows no loss, a super-packet goes whole: one train, sealed in one AEAD
        call (``ipop.wire.train``).  Otherwise it is cut into standalone inner packets, one per
        datagram (``segment``), and the datagrams go out as one UDP GSO train; each is sealed
        on its own on an encrypted link, so losing a datagram loses one inner packet.
        """
        link = self.link
        stats = link.stats
        if (raw is not None and vh.gso_type != GSO_NONE and link.path.channel is None
                and not self._pending and self.trains.allowed(time.monotonic())
                and self.send_whole(raw)):
            return
        try:
            if not link.encrypted:
                if not link.authed or self._pending:
                    for p in standalone(vh, pkt):
                        self.queue_pending(p)
                    return
                segs = segment(vh, pkt, self.hdr_partial, self.hdr_data)
                parts, stride = segs.parts, segs.stride
                size, last = segs.size, segs.last
                inner = (segs.datagrams - 1) * (size - HDR) + last - HDR
            else:
                session = link.session
                if session is None or not session.ready or self._pending:
                    for p in standalone(vh, pkt):
                        self.queue_pending(p)
                    return
                segs = segment(vh, pkt)
                prefix = self.hdr_partial_sealed if segs.partial else self.hdr_sealed
                seal, join, st = session.seal, b"".join, segs.stride
                flat = segs.parts
                parts = []
                for i in range(0, len(flat), st):
                    parts.append(prefix)
                    parts.append(seal(prefix, join(flat[i : i + st])))
                stride = 2
                size = HDR + SEAL_OVERHEAD + segs.size
                last = HDR + SEAL_OVERHEAD + segs.last
                inner = (segs.datagrams - 1) * segs.size + segs.last
        except LocalProtocolError as exc:
            stats.tx_drops[f"tx_{exc.reason}"] += 1
            return
        count = len(parts) // stride
        path = link.path
        if path.channel is not None:  # relayed: each datagram in its own ChannelData
            sent = sum(self.send_frame(parts[i : i + stride]) for i in range(0, len(parts), stride))
        else:
            sent, err = send_train(path.sock, path.addr, parts, stride, size, last, wait_ms=5)
            if sent < count:
                stats.tx_drops[_ERRNO_REASON.get(err, "send_error")] += count - sent
        stats.tx_packets += sent
        stats.tx_bytes += inner if sent == count else inner * sent // max(count, 1)

    def send_one(self, vh: VnetHdr, pkt: memoryview) -> None:
        """Send one packet that needs no segmenting (a read without GSO), with as little work
        as can be: complete checksums go as DATA, a partial one where the receiver finds it
        (``partial_in_place``) as DATA_PARTIAL, anything else the long way."""
        link = self.link
        encrypted = link.encrypted
        if vh.flags & F_NEEDS_CSUM:
            if not partial_in_place(vh, pkt):
                self.send_super(vh, pkt)
                return
            hdr = self.hdr_partial_sealed if encrypted else self.hdr_partial
        else:
            hdr = self.hdr_sealed if encrypted else self.hdr_data
        if encrypted:
            session = link.session
            if session is None or not session.ready or self._pending:
                self.send_super(vh, pkt)  # queues completed copies until keys are made
                return
            body: bytes | memoryview = session.seal(hdr, pkt)
        elif not link.authed or self._pending:
            self.send_super(vh, pkt)  # queues completed copies until the peer is proven
            return
        else:
            body = pkt
        if self.send_frame([hdr, body]):
            link.stats.tx_packets += 1
            link.stats.tx_bytes += len(pkt)

    def send_small(self, items: list[tuple[VnetHdr, memoryview]]) -> None:
        """Send packets that need no segmenting (read one by one, sent together): each is one
        datagram (sealed on its own on an encrypted link), and each run of equal-sized
        datagrams goes out in one UDP GSO send."""
        link = self.link
        stats = link.stats
        encrypted = link.encrypted
        session = link.session
        if len(items) == 1 or link.path.channel is not None or not link.authed or (
                self._pending or (encrypted and (session is None or not session.ready))):
            for vh, pkt in items:
                self.send_one(vh, pkt)
            return
        parts: list[bytes | bytearray | memoryview] = []
        sizes: list[int] = []
        inner = 0
        for vh, pkt in items:
            try:
                if not encrypted or session is None:
                    segs = segment(vh, pkt, self.hdr_partial, self.hdr_data)
                    prefix, body = segs.parts[0], segs.parts[1]
                else:
                    segs = segment(vh, pkt)
                    prefix = self.hdr_partial_sealed if segs.partial else self.hdr_sealed
                    body = session.seal(prefix, segs.parts[0])
            except LocalProtocolError as exc:
                stats.tx_drops[f"tx_{exc.reason}"] += 1
                continue
            parts.append(prefix)
            parts.append(body)
            sizes.append(HDR + len(body))
            inner += len(pkt)
        path = link.path
        sent = i = 0
        count = len(sizes)
        while i < count:  # runs of one size, and one shorter datagram to end a run
            size = sizes[i]
            j = i + 1
            while j < count and sizes[j] == size:
                j += 1
            if j < count and sizes[j] < size:
                j += 1
            done, err = send_train(path.sock, path.addr, parts[2 * i : 2 * j], 2, size,
                                   sizes[j - 1], wait_ms=5)
            sent += done
            if done < j - i:
                stats.tx_drops[_ERRNO_REASON.get(err, "send_error")] += j - i - done
            i = j
        stats.tx_packets += sent
        stats.tx_bytes += inner if sent == count else inner * sent // max(count, 1)

    def send_whole(self, raw: memoryview) -> bool:
        """Send ``raw`` as one whole train; False if it must go as segments instead (checked
        before any sealing, so a super-packet is never sealed twice)."""
        link = self.link
        chunk = self.train_chunk
        size = len(raw) + (SEAL_OVERHEAD if link.encrypted else 0)
        if size > SEAL_BUFFER or -(-size // chunk) > wt.MAX_COUNT:  # a small MTU: too many
            return False
        blob: memoryview
        if link.encrypted:
            session = link.session
            if session is None or not session.ready:
                return False
            if self._seal_buf is None:
                self._seal_buf = bytearray(SEAL_BUFFER)
            blob = session.seal_into(self.hdr_train_sealed, raw, self._seal_buf)
        elif not link.authed:
            return False
        else:
            blob = raw
        self.train_seq = seq = (self.train_seq + 1) & 0xFFFF_FFFF
        parts = self.framer.frames(seq, blob)
        count = len(parts) // 2
        size = wt.FRAME_HDR + chunk
        last = wt.FRAME_HDR + len(blob) - (count - 1) * chunk
        path = link.path
        sent, err = send_train(path.sock, path.addr, parts, 2, size, last, wait_ms=5)
        stats = link.stats
        if sent < count:  # the receiver will lose this train: count it whole
            stats.tx_drops[_ERRNO_REASON.get(err, "send_error")] += 1
            return True
        self.trains_sent += 1
        stats.tx_packets += count
        stats.tx_bytes += len(raw)
        return True

    # ---- the pending queue (packets that wait for keys or for the peer to be proven)
    # Order: while the queue holds anything, every send path queues behind it (each checks
    # ``self._pending``), and the queue is sent under its lock, oldest first, each packet taken
    # off only once it is sent; so a flow never overtakes its own queued packets, whichever
    # thread (the data thread or the control thread's ``flush_pending``) sends the queue.
    def queue_pending(self, pkt: bytes) -> None:
        """Queue ``pkt`` behind what waits; if the link became usable meanwhile (keyed or
        proven after the caller looked), send the queue at once."""
        with self._pending_lock:
            if len(self._pending) >= PENDING_LIMIT:
                self._pending.popleft()
                self.link.stats.tx_drops["pending_overflow"] += 1
            self._pending.append(pkt)
            if self.link.usable:
                self._send_queue()

    def flush_pending(self) -> int:
        """Send what waited for keys or for the peer to be proven, once the link is usable
        (control thread); returns how many were sent or tried."""
        with self._pending_lock:
            if not self.link.usable:
                return 0
            return self._send_queue()

    def _send_queue(self) -> int:
        """Send the queue, oldest first (the queue's lock held; the link is usable)."""
        link = self.link
        stats = link.stats
        pending = self._pending
        session = link.session if link.encrypted else None
        sent = 0
        while pending:
            pkt = pending[0]
            if session is not None:
                ok = self.send_frame([self.hdr_sealed, session.seal(self.hdr_sealed, pkt)])
            else:
                ok = self.send_frame([self.hdr_data, pkt])
            if ok:
                stats.tx_packets += 1
                stats.tx_bytes += len(pkt)
            pending.popleft()
            sent += 1
        return sent

    @property
    def pending(self) -> int:
        return len(self._pending)


def send_keepalive(link: Link, op: int, stamp_ns: int) -> None:
    """``link.tx.send_keepalive``: a probe, echo or loss report on ``link``."""
    link.tx.send_keepalive(op, stamp_ns)
