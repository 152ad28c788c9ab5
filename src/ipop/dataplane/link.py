"""A link to one peer: its underlay path, its crypto session (if encrypted) and its counters.

Threads: the poll thread (``Poller``: it reads the device and the sockets, so it both sends
and receives) writes the ``tx_*`` and ``rx_*`` counters and ``last_rx_mono`` and calls ``send_*``;
the control thread swaps ``path`` and ``session`` (plain attribute stores, atomic under the GIL)
and sends keepalives.  Counters have one writer each and need no lock.
"""

from __future__ import annotations

import collections
import errno
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ipop.crypto.aead import OVERHEAD as SEAL_OVERHEAD
from ipop.dataplane.segment import partial_in_place, segment
from ipop.dataplane.udpio import send_train
from ipop.errors import LocalProtocolError
from ipop.wire import header as wh
from ipop.wire import train as wt
from ipop.wire.nat44 import Translator
from ipop.wire.prefixes import Net, PrefixSet
from ipop.wire.vnet import F_NEEDS_CSUM, GSO_NONE, VnetHdr

CHANNEL_HDR = struct.Struct("!HH")
PENDING_LIMIT = 256
EARLY_LIMIT = 16
"""Sealed frames held at most, per link, while its first keys (or a rekey's) are made."""
EARLY_SECONDS = 2.0
"""How long such a frame is held before it is dropped (``early_expired``)."""
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


class CryptoSession(Protocol):
    """What the data plane needs from a link's crypto session (``ipop.crypto.session``)."""

    @property
    def ready(self) -> bool: ...

    def seal(self, aad: bytes, plaintext: bytes | bytearray | memoryview) -> bytes: ...

    def open(self, aad: bytes | memoryview, sealed: bytes | memoryview,
             out: bytearray | memoryview | None = None) -> bytes | memoryview: ...

    def seal_into(self, aad: bytes, plaintext: memoryview, out: bytearray) -> memoryview: ...

    @property
    def awaiting_keys(self) -> bool: ...


@dataclass(frozen=True)
class Path:
    """Where a link's datagrams go: a socket, a remote address, and a TURN channel if relayed."""

    sock: socket.socket
    addr: tuple[str, int]
    channel: int | None = None
    kind: str = "static"  # static | host | srflx | prflx | relay

    @property
    def source_key(self) -> tuple[int, tuple[str, int], int | None]:
        """The key the poll thread computes for datagrams arriving on this path."""
        return (self.sock.fileno(), self.addr, self.channel)

    def local(self) -> str:
        try:
            host, port = self.sock.getsockname()[:2]
        except OSError:
            return "?"
        return f"{host}:{port}"


@dataclass
class LinkStats:
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    drops: collections.Counter[str] = field(default_factory=collections.Counter)
    last_rx_mono: float = 0.0  # time.monotonic() of the last frame received
    rtt_ms: float | None = None


class Link:
    """One peer's link."""

    def __init__(
        self,
        *,
        local_uid: bytes,
        peer_uid: bytes,
        path: Path,
        overlay_ip4: bytes | None,
        overlay_ip6: bytes | None = None,
        mac: bytes | None = None,
        encrypted: bool = False,
        security_reason: str = "",
        mtu: int = 1374,
        trains_off: str = "",
    ) -> None:
        self.peer_uid = peer_uid
        self.overlay_ip4 = overlay_ip4
        self.overlay_ip6 = overlay_ip6
        self.mac = mac
        # cryptokey routing: the prefixes this peer carries (routes it advertised that we
        # accept, static ``allowed_ips``); inner sources must be its overlay addresses or
        # lie in these (``source_ok``), and outbound traffic to them goes over this link
        self.nets: tuple[Net, ...] = ()
        self.src_exact = frozenset(a for a in (overlay_ip4, overlay_ip6) if a)
        self.src_nets: PrefixSet | None = None
        self.path = path
        self.encrypted = encrypted
        self.security_reason = security_reason
        self.session: CryptoSession | None = None
        # every link, plain ones too, carries data only after its DTLS handshake proved the
        # peer's UID and fingerprint and confirmed the verdict (``ipop.crypto.verdict``); set
        # by the control thread (``Keying``), read by the poll thread
        self.authed = False
        self.xlat: Translator | None = None  # SocialVPN: this friend's address in our view
        self.stats = LinkStats()
        self.created = time.monotonic()
        self.hdr_data = wh.pack(wh.T_DATA, local_uid, peer_uid)
        self.hdr_sealed = wh.pack(wh.T_DATA_SEALED, local_uid, peer_uid)
        self.hdr_ka = wh.pack(wh.T_KEEPALIVE, local_uid, peer_uid)
        self.hdr_ka_sealed = wh.pack(wh.T_KEEPALIVE_SEALED, local_uid, peer_uid)
        self.hdr_partial = wh.pack(wh.T_DATA_PARTIAL, local_uid, peer_uid)
        self.hdr_partial_sealed = wh.pack(wh.T_DATA_PARTIAL_SEALED, local_uid, peer_uid)
        # what this peer's partial frames to us start with (the RX fast path checks it)
        self.rx_prefix_partial = wh.pack(wh.T_DATA_PARTIAL, peer_uid, local_uid)
        # whole trains (``ipop.wire.train``): datagrams no bigger than sealed segments'
        self.hdr_train = wh.pack(wh.T_TRAIN, local_uid, peer_uid)
        self.hdr_train_sealed = wh.pack(wh.T_TRAIN_SEALED, local_uid, peer_uid)
        self.rx_prefix_train = wh.pack(
            wh.T_TRAIN_SEALED if encrypted else wh.T_TRAIN, peer_uid, local_uid)
        self.train_chunk = mtu + SEAL_OVERHEAD - wt.TRAIN_LEN
        self.framer = wt.Framer(self.hdr_train_sealed if encrypted else self.hdr_train,
                                self.train_chunk)
        # TX side: may we send trains now?  ``trains_off``: why never ("" = they may be sent)
        self.trains = wt.TrainPolicy(not trains_off, trains_off)
        self.reassembler = wt.Reassembler()  # RX side: trains that came datagram by datagram
        self.train_seq = 0
        self._seal_buf: bytearray | None = None  # poll thread: trains are sealed into it
        self.trains_sent = 0
        self.loss_counted = 0  # poll thread: reassembler.lost already counted and reported
        self.loss_report_at = 0.0
        self._pending: collections.deque[bytes] = collections.deque()
        # poll thread: sealed frames under an epoch whose keys are still being made (the peer
        # finished its handshake first and sent at once): (arrival, socket, datagram, source,
        # TURN channel), opened again once the keys are in (``Inbound.replay_early``)
        self.early: collections.deque[
            tuple[float, socket.socket, bytes, tuple[str, int], int | None]
        ] = collections.deque(maxlen=EARLY_LIMIT)
        self._pending_lock = threading.Lock()
        self.closed = False
        self.ka_sent = 0.0  # control thread: when the last keepalive probe left
        self.down = False  # control thread: reported as down (no frame for 3.5 keepalives)
        # control thread: a liveness check asked for (``DataPlane.verify``): heard nothing since
        # ``verify_since`` by ``verify_by`` -> down; 0.0: none pending
        self.verify_since = 0.0
        self.verify_by = 0.0
        # ``ipop ping``: probe stamps awaiting their echo -> what to call (from the poll thread)
        # with the RTT in ms; the control thread adds, the poll thread pops
        self.pings: dict[int, Callable[[float], None]] = {}
        # a road-warrior peer (static, no endpoint): its address is not known yet; set on the
        # control thread, cleared when the link is keyed
        self.awaiting_endpoint = False
        self.hello_at = 0.0  # control thread: when the last hello hint went out or came in

    def set_nets(self, nets: tuple[Net, ...]) -> None:
        """The prefixes this link carries besides the peer's own addresses (control thread;
        the poll thread sees the old or the new set, each whole)."""
        self.nets = nets
        self.src_exact = frozenset(a for a in (self.overlay_ip4, self.overlay_ip6) if a)
        self.src_nets = PrefixSet(nets) if nets else None

    def source_ok(self, pkt: bytes | bytearray | memoryview) -> bool:
        """Whether the inner IP packet ``pkt`` has a source this peer may use."""
        n = len(pkt)
        ver = pkt[0] >> 4 if n else 0
        if ver == 4 and n >= 20:
            src = bytes(pkt[12:16])
        elif ver == 6 and n >= 40:
            src = bytes(pkt[8:24])
        else:
            return False
        if src in self.src_exact:
            return True
        nets = self.src_nets
        return nets is not None and src in nets

    # ---- sending (poll thread, and the control thread for keepalives and flushes)
    def send_frame(self, parts: list[bytes | bytearray | memoryview]) -> bool:
        """Send one datagram made of ``parts``; counts and swallows underlay errors."""
        path = self.path
        if path.channel is not None:
            size = sum(len(p) for p in parts)
            parts = [CHANNEL_HDR.pack(path.channel, size), *parts]
        try:
            path.sock.sendmsg(parts, (), 0, path.addr)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                self.stats.drops["emsgsize"] += 1
            elif exc.errno in (errno.EAGAIN, errno.ENOBUFS):
                self.stats.drops["sndbuf_full"] += 1
            else:
                self.stats.drops["send_error"] += 1
            return False
        return True

    def send_packet(self, pkt: bytes | bytearray | memoryview) -> None:
        """Send one inner packet: plain, sealed, or queued while the session is being keyed."""
        if not self.encrypted:
            if not self.authed:
                self.queue_pending(bytes(pkt))
                return
            if self.send_frame([self.hdr_data, pkt]):
                self.stats.tx_packets += 1
                self.stats.tx_bytes += len(pkt)
            return
        session = self.session
        if session is None or not session.ready:
            self.queue_pending(bytes(pkt))
            return
        sealed = session.seal(self.hdr_sealed, pkt)
        if self.send_frame([self.hdr_sealed, sealed]):
            self.stats.tx_packets += 1
            self.stats.tx_bytes += len(pkt)

    def send_super(self, vh: VnetHdr, pkt: memoryview, raw: memoryview | None = None) -> None:
        """Send what one read of a vnet-header TUN holds (up to a 64 KB TSO super-packet);
        ``raw`` is the whole read (``virtio_net_hdr`` + ``pkt``).

        While the link shows no loss, a super-packet goes whole: one train, sealed in one AEAD
        call (``ipop.wire.train``).  Otherwise it is cut into standalone inner packets, one per
        datagram (``segment``), and the datagrams go out as one UDP GSO train; each is sealed
        on its own on an encrypted link, so losing a datagram loses one inner packet.
        """
        if (raw is not None and vh.gso_type != GSO_NONE and self.path.channel is None
                and self.trains.allowed(time.monotonic()) and self._send_whole(raw)):
            return
        try:
            if not self.encrypted:
                if not self.authed:
                    for p in standalone(vh, pkt):
                        self.queue_pending(p)
                    return
                segs = segment(vh, pkt, self.hdr_partial, self.hdr_data)
                parts, stride = segs.parts, segs.stride
                size, last = segs.size, segs.last
                inner = (segs.datagrams - 1) * (size - HDR) + last - HDR
            else:
                session = self.session
                if session is None or not session.ready:
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
            self.stats.drops[f"tx_{exc.reason}"] += 1
            return
        count = len(parts) // stride
        path = self.path
        if path.channel is not None:  # relayed: each datagram in its own ChannelData
            sent = sum(self.send_frame(parts[i : i + stride]) for i in range(0, len(parts), stride))
        else:
            sent, err = send_train(path.sock, path.addr, parts, stride, size, last, wait_ms=5)
            if sent < count:
                self.stats.drops[_ERRNO_REASON.get(err, "send_error")] += count - sent
        self.stats.tx_packets += sent
        self.stats.tx_bytes += inner if sent == count else inner * sent // max(count, 1)

    def send_one(self, vh: VnetHdr, pkt: memoryview) -> None:
        """Send one packet that needs no segmenting (a read without GSO), with as little work
        as can be: complete checksums go as DATA, a partial one where the receiver finds it
        (``partial_in_place``) as DATA_PARTIAL, anything else the long way."""
        if vh.flags & F_NEEDS_CSUM:
            if not partial_in_place(vh, pkt):
                self.send_super(vh, pkt)
                return
            hdr = self.hdr_partial_sealed if self.encrypted else self.hdr_partial
        else:
            hdr = self.hdr_sealed if self.encrypted else self.hdr_data
        if self.encrypted:
            session = self.session
            if session is None or not session.ready:
                self.send_super(vh, pkt)  # queues completed copies until keys are made
                return
            body: bytes | memoryview = session.seal(hdr, pkt)
        elif not self.authed:
            self.send_super(vh, pkt)  # queues completed copies until the peer is proven
            return
        else:
            body = pkt
        if self.send_frame([hdr, body]):
            self.stats.tx_packets += 1
            self.stats.tx_bytes += len(pkt)

    def send_small(self, items: list[tuple[VnetHdr, memoryview]]) -> None:
        """Send packets that need no segmenting (read one by one, sent together): each is one
        datagram (sealed on its own on an encrypted link), and each run of equal-sized
        datagrams goes out in one UDP GSO send."""
        session = self.session
        if len(items) == 1 or self.path.channel is not None or not self.authed or (
                self.encrypted and (session is None or not session.ready)):
            for vh, pkt in items:
                self.send_one(vh, pkt)
            return
        parts: list[bytes | bytearray | memoryview] = []
        sizes: list[int] = []
        inner = 0
        for vh, pkt in items:
            try:
                if not self.encrypted or session is None:
                    segs = segment(vh, pkt, self.hdr_partial, self.hdr_data)
                    prefix, body = segs.parts[0], segs.parts[1]
                else:
                    segs = segment(vh, pkt)
                    prefix = self.hdr_partial_sealed if segs.partial else self.hdr_sealed
                    body = session.seal(prefix, segs.parts[0])
            except LocalProtocolError as exc:
                self.stats.drops[f"tx_{exc.reason}"] += 1
                continue
            parts.append(prefix)
            parts.append(body)
            sizes.append(HDR + len(body))
            inner += len(pkt)
        path = self.path
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
                self.stats.drops[_ERRNO_REASON.get(err, "send_error")] += j - i - done
            i = j
        self.stats.tx_packets += sent
        self.stats.tx_bytes += inner if sent == count else inner * sent // max(count, 1)

    def _send_whole(self, raw: memoryview) -> bool:
        """Send ``raw`` as one whole train; False if it must go as segments instead (checked
        before any sealing, so a super-packet is never sealed twice)."""
        chunk = self.train_chunk
        size = len(raw) + (SEAL_OVERHEAD if self.encrypted else 0)
        if size > SEAL_BUFFER or -(-size // chunk) > wt.MAX_COUNT:  # a small MTU: too many
            return False
        blob: memoryview
        if self.encrypted:
            session = self.session
            if session is None or not session.ready:
                return False
            if self._seal_buf is None:
                self._seal_buf = bytearray(SEAL_BUFFER)
            blob = session.seal_into(self.hdr_train_sealed, raw, self._seal_buf)
        elif not self.authed:
            return False
        else:
            blob = raw
        self.train_seq = seq = (self.train_seq + 1) & 0xFFFF_FFFF
        parts = self.framer.frames(seq, blob)
        count = len(parts) // 2
        size = wt.FRAME_HDR + chunk
        last = wt.FRAME_HDR + len(blob) - (count - 1) * chunk
        path = self.path
        sent, err = send_train(path.sock, path.addr, parts, 2, size, last, wait_ms=5)
        if sent < count:  # the receiver will lose this train: count it whole
            self.stats.drops[_ERRNO_REASON.get(err, "send_error")] += 1
            return True
        self.trains_sent += 1
        self.stats.tx_packets += count
        self.stats.tx_bytes += len(raw)
        return True

    def queue_pending(self, pkt: bytes) -> None:
        with self._pending_lock:
            if len(self._pending) >= PENDING_LIMIT:
                self._pending.popleft()
                self.stats.drops["pending_overflow"] += 1
            self._pending.append(pkt)

    def flush_pending(self) -> int:
        """Send what waited for keys; called once the session is ready."""
        with self._pending_lock:
            items = list(self._pending)
            self._pending.clear()
        for pkt in items:
            self.send_packet(pkt)
        return len(items)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def usable(self) -> bool:
        """The link may carry data: proven (plain), or keyed (encrypted)."""
        if self.encrypted:
            session = self.session
            return session is not None and session.ready
        return self.authed

    @property
    def security(self) -> str:
        return "dtls" if self.encrypted else "none"
