"""A link to one peer: its spec (peer, addresses, underlay path, security and its reason, crypto
session), its counters, and its two halves: ``tx`` (``LinkSender``: what goes to the peer) and
``rx`` (``LinkReceiver``: what comes from it).

Threads: the poll thread (``Poller``: it reads the device and the sockets, so it both sends
and receives) runs both halves; the control thread swaps ``path`` and ``session`` (plain
attribute stores, atomic under the GIL), sets ``authed``, and sends keepalives through ``tx``.
Each counter has one writer and needs no lock: ``LinkStats`` says which.
"""

from __future__ import annotations

import collections
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ipop.dataplane.link_rx import LinkReceiver
from ipop.dataplane.link_tx import LinkSender
from ipop.wire.nat44 import Translator
from ipop.wire.prefixes import Net, PrefixSet


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
    rtt_ms: float | None = None  # the round trip measured when the path was chosen (ICE's check)

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
    """A link's counters.  Each has one writer: the send half (``LinkSender``) writes ``tx_*``
    and ``tx_drops``; the receive half (``LinkReceiver``, with ``SourceCheck``) writes ``rx_*``,
    ``rx_drops``, ``last_rx_mono`` and ``rtt_ms``; ``Keying`` (control thread) writes
    ``handshake_drops``.  ``drops`` is all of them, read as one."""

    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_drops: collections.Counter[str] = field(default_factory=collections.Counter)
    tx_drops: collections.Counter[str] = field(default_factory=collections.Counter)
    handshake_drops: collections.Counter[str] = field(default_factory=collections.Counter)
    last_rx_mono: float = 0.0  # time.monotonic() of the last frame received
    rtt_ms: float | None = None
    # shards 1..N-1's copies of this link, as their last reports said (``ShardManager``, on the
    # control thread, writes both): their counters by shard, and when one last heard the peer
    shards: dict[int, dict[str, Any]] = field(default_factory=dict)
    shard_rx_mono: float = 0.0

    def total(self, key: str) -> int:
        """Counter ``key`` (``tx_packets``, ``tx_bytes``, ``rx_packets``, ``rx_bytes``) over
        this copy of the link and the shards' copies."""
        return int(getattr(self, key)) + sum(int(s[key]) for s in self.shards.values())

    @property
    def heard_mono(self) -> float:
        """When any shard last received a frame from the peer (``time.monotonic()``)."""
        return max(self.last_rx_mono, self.shard_rx_mono)

    @property
    def drops(self) -> collections.Counter[str]:
        """Every drop by reason, a copy (each part is copied whole, so a writer on another
        thread never disturbs the reading)."""
        merged = collections.Counter(dict(self.rx_drops))
        for part in (dict(self.tx_drops), dict(self.handshake_drops)):
            for reason, count in part.items():
                merged[reason] += count
        return merged


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
        shard: int = 0,
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
        self.shard = shard  # the shard of this node that runs this copy of the link
        self.tx = LinkSender(self, local_uid=local_uid, encrypted=encrypted, mtu=mtu,
                             trains_off=trains_off, shard=shard)
        self.rx = LinkReceiver(self, local_uid=local_uid, encrypted=encrypted)
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
