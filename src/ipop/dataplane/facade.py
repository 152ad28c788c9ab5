"""The data plane's one facade: open the NIC, add and remove links, report state and events.

The controller (through the Tincan API) is its only user.  Events leave through ``on_event``,
always called on the control thread via the ``call_soon`` the caller provides (for asyncio:
``loop.call_soon_threadsafe``).  Everything here except the two pipelines runs on that thread.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ipop.dataplane import sockfilter, steering, tun
from ipop.dataplane.inbound import Inbound
from ipop.dataplane.kroutes import KernelRoutes, local_networks
from ipop.dataplane.link import CryptoSession, Link, Path
from ipop.dataplane.link_tx import send_keepalive
from ipop.dataplane.outbound import Outbound
from ipop.dataplane.poller import Poller
from ipop.dataplane.shards import ShardManager
from ipop.dataplane.table import ForwardingTable
from ipop.fwmark import mark_socket
from ipop.ratelimit import TokenBucket
from ipop.wire import keepalive as wk
from ipop.wire.nat44 import Translator
from ipop.wire.prefixes import Net, PrefixSet

log = logging.getLogger("ipop.dataplane")

SWITCH_INTERVAL = 0.0002  # seconds; see DataPlane.start
MISS_RATE = 20.0  # unknown-destination notifications per second, at most
MISS_BURST = 40
MISS_HOLD = 10.0  # seconds a packet for an unknown destination is held for a link to appear
DOWN_PERIODS = 3.5  # keepalive periods without a frame from the peer before a link is down
VERIFY_SECONDS = 1.5  # a liveness check (``DataPlane.verify``) waits this long for any frame


@dataclass
class Event:
    """A notification from the data plane: ``kind`` is one of
    ``unknown_destination`` (data: dst, packet), ``control_datagram`` (STUN/DTLS: sock, data,
    addr, channel, peer_uid), ``link_down`` (peer_uid, idle seconds), ``roamed`` (peer_uid, addr),
    ``confirmed`` (peer_uid: a plain link's peer sent its first frame after the handshake).
    """

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


class DataPlane:
    """A running data plane for one virtual NIC."""

    def __init__(
        self,
        *,
        uid: bytes,
        interface: str,
        ip4: str,
        prefixlen: int,
        mtu: int,
        tap: bool = False,
        ip6: str | None = None,
        ondemand_queue: int = 64,
        keepalive_seconds: float = 10.0,
        offload: bool = True,
        whole_trains: bool = True,
        on_event: Callable[[Event], None],
        call_soon: Callable[..., Any],
        workers: int = 1,
        queue: tun.Device | None = None,
        shard: int = 0,
    ) -> None:
        """``workers``: shards (``ipop.dataplane.shards``; 1: this data plane alone).  A shard
        process passes its TUN ``queue`` (the interface exists and is configured already) and
        its number ``shard``."""
        self.uid = uid
        self.workers = workers
        self.shard = shard
        # the control process's data plane owns the interface and its kernel routes; a shard
        # process's only reads and writes its queue
        self.owns_interface = queue is None
        self.ip4 = ip4
        self.prefixlen = prefixlen
        self.mtu = mtu
        self.whole_trains = whole_trains
        self.tap = tap
        self.ip6 = ip6
        self.keepalive_seconds = keepalive_seconds
        self.on_event = on_event
        self.call_soon = call_soon
        self.table = ForwardingTable()
        self.stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self.shard_queues: list[tun.Device] = []
        # offloads (TSO super-packets in, UDP GSO/GRO out and in) serve the L3 NIC
        if queue is not None:
            self.dev = queue
        elif workers > 1:
            queues = tun.open_queues(interface, workers, tap=tap, vnet_hdr=offload and not tap)
            self.dev, self.shard_queues = queues[0], queues[1:]
        else:
            self.dev = tun.open_device(interface, tap=tap, vnet_hdr=offload and not tap)
        if offload and not tap and not self.dev.vnet_hdr:
            log.warning("offloads: the kernel refused TUN offloads; per-packet data path")
        self.interface = interface
        if queue is None:
            try:
                tun.configure(self.dev, ip4=ip4, prefixlen=prefixlen, mtu=mtu, ip6=ip6)
            except BaseException:
                self.dev.close()
                for q in self.shard_queues:
                    q.close()
                raise
        self.mss = mtu - 40  # IPv4 + TCP headers; IPv6 packets get 20 bytes less
        self.held: dict[bytes, collections.deque[tuple[float, bytes]]] = {}
        self.held_limit = ondemand_queue
        self.held_dropped = 0  # held packets lost: a full queue, a full table, or too old
        self._held_lock = threading.Lock()
        self._miss_bucket = TokenBucket(MISS_RATE, MISS_BURST)
        self._miss_seen: dict[bytes, float] = {}
        self.outbound = Outbound(self.dev, self.table, mss=self.mss, on_miss=self._on_miss)
        self.inbound = Inbound(
            self.dev, self.table, uid, on_control=self._on_control, on_roam=self._on_roam,
            on_confirm=self._on_confirm, on_rekey=self._on_rekey_request,
        )
        self.shards: ShardManager | None = None  # workers > 1: shards 1..N-1 (start)
        self.shard_socks: list[socket.socket] = []  # the listen port's group, shards 1..N-1
        self.poller = Poller(
            wake_fd=self._wake_r, stopping=self.stopping, on_wake=self.inbound.replay_early,
            on_socket=self.inbound.drain, drops=self.inbound.drops,
            device_fd=self.dev.fd, on_device=self.outbound.pump,
        )
        overlay: list[Net] = [ipaddress.ip_network(f"{ip4}/{prefixlen}", strict=False)]
        if ip6:
            overlay.append(ipaddress.IPv6Interface(ip6).network)
        self.overlay = tuple(overlay)
        self.inbound.sources.overlay = PrefixSet(overlay)
        self.kroutes = KernelRoutes(interface)
        self.sockets: list[socket.socket] = []
        self._steered: set[int] = set()  # fds of this process's sockets in a reuseport group
        self.control_drops: collections.Counter[str] = collections.Counter()  # control thread
        self.exit_via: bytes | None = None  # the peer UID our default route goes through
        # underlay addresses (XMPP, STUN, TURN servers) kept on the main table while exiting
        self.exit_servers: set[str] = set()
        self.started = time.time()

    # ---- life cycle
    def start(self) -> None:
        # The pipelines hand the GIL to each other many thousand times a second; Python's
        # default 5 ms switch interval would let a busy thread keep a waiting one (and every
        # packet in its queue) waiting that long, which TCP sees as a 5-10 ms longer RTT.
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.inbound.start()
        self.poller.start()
        if self.workers > 1 and self.owns_interface:
            socks: list[socket.socket | None] = list(self.shard_socks)
            socks += [None] * (self.workers - 1 - len(socks))
            self.shards = ShardManager(self, self.workers, self.shard_queues, socks,
                                       self._group_fds(), on_rekey=self._force_rekey)
            self.shards.start()

    def _group_fds(self) -> frozenset[int]:
        return frozenset(s.fileno() for s in self.sockets if s.fileno() in self._steered)

    @property
    def offloads(self) -> dict[str, bool]:
        return {"tun_vnet_hdr": self.dev.vnet_hdr,
                "udp_gro": self.dev.vnet_hdr and not self.inbound.gro_missing}

    def close(self) -> None:
        """Stop both pipelines and remove the interface (closing the device deletes it)."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        if self.shards is not None:
            self.shards.stop()
        os.write(self._wake_w, b"x")
        self.inbound.stop()
        for th in (self.poller.thread, self.inbound.tun_writer):
            if th.is_alive():
                th.join(timeout=2.0)
        if self.owns_interface:
            self.kroutes.clear()
        self.dev.close()
        if self.shards is None:
            for q in self.shard_queues:
                q.close()
        for s in self.sockets:
            s.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ---- sockets
    def open_listen_socket(self, port: int) -> socket.socket:
        """A UDP socket on ``port`` (all addresses, IPv4 and IPv6) served by the data plane.
        With shards it is the first of the port's reuseport group (``steering``); the others
        go to shards 1..N-1, and GRO is off on all of them (a GRO read would join frames of
        several sending shards, which belong to different receiving shards)."""
        if self.workers > 1:
            group = steering.group_sockets(port, self.workers)
            sock, self.shard_socks = group[0], group[1:]
            self._steered.add(sock.fileno())
            for other in self.shard_socks:
                mark_socket(other)
                sockfilter.attach(other, self.uid, list(self.table.by_uid))
            self.adopt_socket(sock, owned=True, gro=False)
            self.inbound.steer = (self.workers, 0, frozenset(self._steered))
            return sock
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
        self.adopt_socket(sock, owned=True)
        return sock

    def adopt_socket(self, sock: socket.socket, *, owned: bool = False, gro: bool = True) -> None:
        """Serve ``sock`` from the poll thread (e.g. the socket ICE selected); it gets the
        underlay mark (``ipop.fwmark``), so an exit node's default route never captures it."""
        mark_socket(sock)
        for opt, size in ((socket.SO_RCVBUF, 4 << 20), (socket.SO_SNDBUF, 4 << 20)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
            except OSError:
                pass
        if self.inbound.add_socket(sock, gro=gro):
            self.poller.watch(sock.fileno())
        if owned:
            self.sockets.append(sock)

    def release_socket(self, sock: socket.socket) -> None:
        if self.inbound.remove_socket(sock):
            self.poller.unwatch(sock.fileno())

    # ---- links
    def add_link(
        self,
        *,
        peer_uid: bytes,
        path: Path,
        ip4: str | None,
        ip6: str | None = None,
        mac: bytes | None = None,
        encrypted: bool,
        security_reason: str,
        session: CryptoSession | None = None,
        xlat: Translator | None = None,
        peer_trains: bool = True,
        nets: tuple[Net, ...] = (),
        serve_path: bool = True,
    ) -> Link:
        """Create (or replace) the link to ``peer_uid`` and release packets held for it.
        ``peer_trains``: the peer receives whole trains (it said so when the link was set up);
        trains are sent only when it does and ``whole_trains`` is on here.  ``nets``: the
        prefixes the link carries besides the peer's addresses (``set_link_nets``)."""
        link = self.make_link(
            peer_uid=peer_uid, path=path, ip4=ip4, ip6=ip6, mac=mac, encrypted=encrypted,
            security_reason=security_reason, session=session, xlat=xlat,
            peer_trains=peer_trains, nets=nets, serve_path=serve_path)
        self.install_link(link)
        return link

    def make_link(
        self,
        *,
        peer_uid: bytes,
        path: Path,
        ip4: str | None,
        ip6: str | None = None,
        mac: bytes | None = None,
        encrypted: bool,
        security_reason: str,
        session: CryptoSession | None = None,
        xlat: Translator | None = None,
        peer_trains: bool = True,
        nets: tuple[Net, ...] = (),
        serve_path: bool = True,
    ) -> Link:
        """A link that is not in the forwarding table yet (``install_link`` puts it there): a
        new link to a peer that has a working one is proven beside it first.  Its path's
        socket is served from now on, so its handshake can run."""
        off = ("whole_trains off" if not self.whole_trains
               else "" if peer_trains else "peer has no trains")
        link = Link(
            local_uid=self.uid, peer_uid=peer_uid, path=path,
            overlay_ip4=ipaddress.IPv4Address(ip4).packed if ip4 else None,
            overlay_ip6=ipaddress.IPv6Address(ip6).packed if ip6 else None,
            mac=mac, encrypted=encrypted, security_reason=security_reason,
            mtu=self.mtu, trains_off=off, shard=self.shard,
        )
        link.session = session
        link.xlat = xlat
        link.set_nets(nets)
        link.stats.last_rx_mono = time.monotonic()
        if serve_path:  # (a shard process only sends on paths not on the steered port)
            self.adopt_socket(path.sock)
        return link

    def install_link(self, link: Link) -> None:
        """Put ``link`` into the forwarding table, replacing the peer's older link, and release
        the packets held for its addresses."""
        old = self.table.add(link)
        if old is None:  # frames from this peer pass the kernel filter of its socket now
            self.inbound.filters_changed(link.path.sock)
        if old is not None:
            old.closed = True
        if link.nets or (old is not None and old.nets):
            self.apply_routes()
        for addr in (link.overlay_ip4, link.overlay_ip6):
            if addr:
                self.release_held(addr, link)
        if self.shards is not None:
            self.shards.sync()  # the shards get the link now, not at the next tick

    def remove_link(self, peer_uid: bytes) -> Link | None:
        link = self.table.remove(peer_uid)
        if self.shards is not None:
            self.shards.sync()
        if link is not None:
            self.inbound.filters_changed()
            link.closed = True
            if link.nets:
                self.apply_routes()
        return link

    # ---- routes (cryptokey routing)
    def set_link_nets(self, peer_uid: bytes, nets: tuple[Net, ...]) -> bool:
        """Set the prefixes ``peer_uid``'s link carries (its allowed sources besides its own
        addresses, and where traffic for them goes), then the kernel routes; False: no link."""
        link = self.table.by_uid.get(peer_uid)
        if link is None:
            return False
        link.set_nets(nets)
        self.table.reindex()
        self.apply_routes()
        return True

    def route_owner(self, net: Net) -> Link | None:
        """The link that already carries a prefix overlapping ``net``, if any."""
        for link in self.table.links:
            for mine in link.nets:
                if mine.version == net.version and mine.overlaps(net):
                    return link
        return None

    def local_networks(self) -> list[Net]:
        """The networks on this host's other interfaces (a route from a peer must not cover
        them)."""
        return local_networks(self.interface)

    def apply_routes(self, exit_via: bytes | None = None) -> None:
        """Make the kernel's routes into the NIC match the links' prefixes: one route per
        prefix a link carries (added and removed as links come and go); a default route
        (``0.0.0.0/0``, ``::/0``) only through the exit node ``exit_via`` (a peer UID), by
        policy routing (``KernelRoutes``).  The one place routes are applied: a reload may call
        it again at any time."""
        if exit_via is not None:
            self.exit_via = exit_via
        if not self.owns_interface:
            return  # a shard process: the control process routes
        wanted: set[Net] = set()
        exit_nets: set[Net] = set()
        for net, link in self.table.routes.nets:
            if net.prefixlen == 0:
                if link.peer_uid == self.exit_via and not link.closed:
                    exit_nets.add(net)
            else:
                wanted.add(net)
        self.kroutes.sync(wanted, exit_nets, self.exit_servers)

    def set_exit(self, peer_uid: bytes | None, servers: set[str] | None = None) -> None:
        """Route the default through ``peer_uid``'s link (None: through no peer; its policy
        rules go), keeping ``servers`` (when given) on the main table; a reload of
        ``exit_node`` calls it at any time."""
        self.exit_via = peer_uid
        if servers is not None:
            self.exit_servers = set(servers)
        self.apply_routes()

    def set_path(self, peer_uid: bytes, path: Path, *, serve: bool = True) -> None:
        link = self.table.by_uid.get(peer_uid)
        if link is None:
            return
        if serve:
            self.adopt_socket(path.sock)
        link.path = path
        self.table.reindex()

    def link(self, peer_uid: bytes) -> Link | None:
        return self.table.by_uid.get(peer_uid)

    @property
    def links(self) -> tuple[Link, ...]:
        """The links in the forwarding table (an immutable tuple, swapped whole)."""
        return self.table.links

    @property
    def mac(self) -> bytes | None:
        """The NIC's MAC address (TAP), None for a TUN."""
        return self.dev.mac

    def set_remote_ip(self, peer_uid: bytes, ip4: bytes) -> Link | None:
        """The peer's overlay IPv4 address is now ``ip4`` (the Tincan ``set_remote_ip``): its
        allowed sources follow it, and traffic to it goes to this link.  None: no link."""
        link = self.table.by_uid.get(peer_uid)
        if link is None:
            return None
        link.overlay_ip4 = ip4
        link.set_nets(link.nets)
        self.table.reindex()
        return link

    def set_security_reason(self, peer_uid: bytes, reason: str) -> Link | None:
        """The link's security verdict was decided again with the same outcome (a reload):
        only its reason changes.  None: no link."""
        link = self.table.by_uid.get(peer_uid)
        if link is not None:
            link.security_reason = reason
        return link

    def send_datagram(self, link: Link, data: bytes) -> bool:
        """Send ``data`` as it is on ``link``'s path (a hello hint, ``ipop.wire.hello``);
        False when the underlay refused it (counted on the link)."""
        return link.tx.send_frame([data])

    def probe(self, peer_uid: bytes, on_echo: Callable[[float], None]) -> str | None:
        """Send one keepalive probe on the link to ``peer_uid`` (``ipop ping``): the peer's
        data plane echoes it, and ``on_echo(rtt_ms)`` runs on the control thread when the echo
        is back.  Returns None when the probe left, else why it could not: ``no_link``,
        ``keying`` (an encrypted link sends nothing before its keys).  Unanswered probes are
        forgotten once 64 wait on one link."""
        link = self.table.by_uid.get(peer_uid)
        if link is None:
            return "no_link"
        if not link.usable:
            return "keying"
        stamp = time.monotonic_ns()
        while stamp in link.pings:
            stamp += 1
        if len(link.pings) >= 64:  # nobody answers: keep the table small
            link.pings.clear()
        link.pings[stamp] = lambda rtt: self.call_soon(on_echo, rtt)
        send_keepalive(link, wk.OP_PROBE, stamp)
        return None

    def release_early(self, link: Link) -> None:
        """``link`` has new keys: the poll thread opens the sealed frames it held meanwhile
        (``LinkReceiver.early``).  Control thread."""
        if not link.rx.early or self.stopping.is_set():
            return
        self.inbound.replays.put(link)
        os.write(self._wake_w, b"r")

    # ---- held packets for unknown destinations (on-demand links)
    def _on_miss(self, dst: bytes, pkt: bytes, hold: bool = True) -> None:
        """Data-plane thread (device reads): hold the packet briefly and tell the controller
        (rate limited).  ``hold`` False: only tell (a shard holds the packet itself)."""
        now = time.monotonic()
        if self.held_limit and hold:
            with self._held_lock:
                q = self.held.get(dst)
                if q is None:
                    if len(self.held) >= 1024:
                        self._expire_held(now)
                    if len(self.held) < 1024:
                        q = self.held[dst] = collections.deque(maxlen=self.held_limit)
                if q is None:
                    self.held_dropped += 1
                else:
                    if len(q) == q.maxlen:
                        self.held_dropped += 1  # the oldest one makes room
                    q.append((now, pkt))
        last = self._miss_seen.get(dst)
        if last is not None and now - last < 1.0:
            return
        if not self._miss_bucket.take(now):
            return
        self._miss_seen[dst] = now
        if len(self._miss_seen) > 4096:
            self._miss_seen.clear()
        ev = Event("unknown_destination", {"dst": dst, "packet": pkt})
        self.call_soon(self.on_event, ev)

    def _expire_held(self, now: float) -> None:
        for key in [k for k, q in self.held.items() if not q or now - q[-1][0] > MISS_HOLD]:
            self.held_dropped += len(self.held.pop(key))

    def release_held(self, addr: bytes, link: Link | None) -> None:
        """Send the packets held for ``addr`` on ``link`` in the order they were read (None:
        drop them, counted)."""
        with self._held_lock:
            q = self.held.pop(addr, None)
            if q and (link is None or link.closed):
                self.held_dropped += len(q)
                return
        if not q or link is None:
            return
        now = time.monotonic()
        expired = sum(1 for stamp, _ in q if now - stamp > MISS_HOLD)
        if expired:
            with self._held_lock:
                self.held_dropped += expired
        for stamp, pkt in q:
            if now - stamp <= MISS_HOLD:
                if link.xlat is not None:  # held before the link (and its view) existed
                    held = bytearray(pkt)
                    link.xlat.tx(held)
                    link.tx.send_packet(held)
                else:
                    link.tx.send_packet(pkt)

    # ---- control datagrams and roaming (called from the poll thread)
    def _on_control(
        self, sock: socket.socket, data: bytes, addr: tuple[str, int], channel: int | None,
        link: Link | None,
    ) -> None:
        def deliver() -> None:  # control thread
            found = link
            if found is None:
                # read before the control thread put a link on this path: a socket is adopted
                # just before its link is made, and a DTLS flight queued in it meanwhile must
                # reach the new link's handshake (it would wait 1 s for a retransmission)
                found = self.table.by_source.get((sock.fileno(), addr, channel))
            self.on_event(Event("control_datagram", {
                "sock": sock, "data": data, "addr": addr, "channel": channel,
                "peer_uid": found.peer_uid if found else None,
            }))

        self.call_soon(deliver)

    def _on_rekey_request(self, link: Link) -> None:
        """Poll thread: the peer asked for a new handshake (its shard restarted)."""
        self.call_soon(self.on_event, Event("rekey_request", {"peer_uid": link.peer_uid}))

    def _force_rekey(self, link: Link) -> None:
        """A shard restarted (or a link moved onto the steered port): the link needs keys made
        from now on (``ShardManager``); the node's keying starts a handshake, or asks the peer
        to when this end is the DTLS server."""
        self.on_event(Event("rekey_needed", {"peer_uid": link.peer_uid}))

    def ask_rekey(self, link: Link) -> None:
        """Ask the peer, the link's DTLS client, for a new handshake (a sealed keepalive)."""
        if link.usable:
            send_keepalive(link, wk.OP_REKEY, time.monotonic_ns())

    def push_keys(self, link: Link) -> None:
        """``link`` has new keys: the shards get them at once (``Keying.on_keys``)."""
        if self.shards is not None:
            self.shards.push_keys(link)

    def on_shard_miss(self, dst: bytes, pkt: bytes) -> Link | None:
        """Control thread: a shard read a packet for a destination it has no link for, and
        holds it.  Returns the link here for ``dst`` (the shard gets it pushed, then sends
        what it holds on its own copy, so the flow never changes shards); else reports the
        miss as one read here would be, holding nothing."""
        link = self.table.route(dst) if len(dst) in (4, 16) else None
        if link is None or link.closed:
            self._on_miss(dst, pkt, hold=False)
            return None
        return link

    def on_shard_roam(self, peer_uid: bytes, addr: tuple[str, int]) -> None:
        """Control thread: a shard took an authenticated frame of ``peer_uid`` from ``addr``
        on the steered port: the link's path moves there (the shards follow at the next
        ``tick``)."""
        link = self.table.by_uid.get(peer_uid)
        if link is None or link.closed or link.path.sock.fileno() not in self._steered:
            return
        if link.path.addr != addr:
            log.info("link %s roamed to %s:%d (shard)", peer_uid.hex()[:12], addr[0], addr[1])
            link.path = Path(link.path.sock, addr, None, link.path.kind)
            self.table.reindex()
            self.on_event(Event("roamed", {"peer_uid": peer_uid, "addr": addr}))

    def _on_confirm(self, link: Link) -> None:
        """Poll thread: the peer of a plain link sent its first frame after our handshake."""
        self.call_soon(self.on_event, Event("confirmed", {"peer_uid": link.peer_uid}))

    def _on_roam(self, link: Link, sock: socket.socket, addr: tuple[str, int]) -> None:
        def apply() -> None:
            path = link.path
            if link.closed or (path.addr == addr and path.sock is sock):
                return
            log.info("link %s roamed to %s:%d", link.peer_uid.hex()[:12], addr[0], addr[1])
            link.path = Path(sock, addr, None, path.kind)
            self.table.reindex()
            self.on_event(Event("roamed", {"peer_uid": link.peer_uid, "addr": addr}))

        self.call_soon(apply)

    # ---- periodic work (control thread)
    def tick(self, now: float | None = None) -> None:
        """Send keepalives and report links that went quiet; call a few times a second.

        A link that carried something from the peer within the last period needs no probe
        (as WireGuard, a busy link sends no keepalive).  On a quiet link the lower UID probes
        once a period and the higher UID only after 1.5 periods of silence, so the peer's
        probes (and their echoes) usually stand for both ends' and half the probes are spared;
        either end's NAT mapping still sees traffic every period (a probe or an echo).  A link
        that heard nothing for ``DOWN_PERIODS`` periods is reported down: with an unanswered
        probe per period, it leaves ``up`` within 4 periods."""
        now = time.monotonic() if now is None else now
        self.inbound.refresh_due(now)
        period = self.keepalive_seconds
        for link in self.table.links:
            if link.verify_by and self._verifying(link, now):
                continue
            quiet = now - link.stats.heard_mono
            wait = period if self.uid < link.peer_uid else period * 1.5
            if quiet >= wait and now - link.ka_sent >= period:
                link.ka_sent = now
                send_keepalive(link, wk.OP_PROBE, time.monotonic_ns())
            if quiet > DOWN_PERIODS * period and not link.down:
                link.down = True
                self.on_event(Event("link_down", {"peer_uid": link.peer_uid, "idle": quiet}))
            elif quiet <= DOWN_PERIODS * period and link.down:
                link.down = False
        with self._held_lock:
            self._expire_held(now)
        if self.shards is not None:
            self.shards.sync()

    def verify(self, peer_uid: bytes, seconds: float = VERIFY_SECONDS) -> bool:
        """Check the link to ``peer_uid`` now (signaling says the peer left): a probe at once
        and one every tick after; unless a frame from the peer arrives within ``seconds`` the
        link is reported down (``link_down``).  A link in use answers at once and stays.
        False when there is no such link."""
        link = self.table.by_uid.get(peer_uid)
        if link is None:
            return False
        now = time.monotonic()
        if not link.verify_by:
            link.verify_since = now
            link.verify_by = now + seconds
        link.ka_sent = now
        send_keepalive(link, wk.OP_PROBE, time.monotonic_ns())
        return True

    def _verifying(self, link: Link, now: float) -> bool:
        """A pending liveness check on ``link`` (tick): True when it ended the link."""
        if link.stats.heard_mono > link.verify_since:
            link.verify_by = 0.0  # the peer answered: the link stays
            return False
        if now < link.verify_by:
            link.ka_sent = now
            send_keepalive(link, wk.OP_PROBE, time.monotonic_ns())
            return False
        link.verify_by = 0.0
        if link.down:
            return False
        link.down = True
        self.on_event(Event("link_down", {"peer_uid": link.peer_uid,
                                          "idle": now - link.stats.heard_mono}))
        return True

    # ---- state
    def count_control_drop(self, reason: str) -> None:
        """A STUN/DTLS datagram that nothing on the control thread took (its counter)."""
        self.control_drops[reason] += 1

    def counters(self) -> dict[str, Any]:
        """Node-wide counters; with shards, all shards' added up (``shards`` lists them)."""
        drops = collections.Counter(self.inbound.drops)
        drops.update(self.control_drops)
        out: dict[str, Any] = {
            "tun_read_packets": self.outbound.counters["packets"],
            "tun_read_bytes": self.outbound.counters["bytes"],
            "no_route": self.outbound.counters["no_route"],
            "tun_written": self.inbound.written,
            "offloads": self.offloads,
            "socket_filter": self.inbound.socket_filter,
            "kernel_drops": self.inbound.kernel_drops()
            + sum(sockfilter.kernel_drops(s) for s in self.shard_socks),
            "drops": dict(drops),
            "workers": self.workers,
        }
        if self.shards is not None:
            totals = self.shards.totals()
            for key, value in totals["counts"].items():
                out[key] += value
            drops.update(totals["drops"])
            out["drops"] = dict(drops)
            out["shards"] = self.shards.status()
        return out
