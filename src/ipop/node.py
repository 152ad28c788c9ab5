"""A running node: identity, lock, data plane, control API, static peers, and the controller.

``Node.run()`` is the whole life of ``ipop up``: it returns when SIGINT/SIGTERM arrives, after
removing the interface and the control socket.  SIGHUP (and the API's ``reload``) re-reads the
config file and applies what may change live (``Node.reload``; the rules are in reload.py).
Under systemd it reports READY/RELOADING/STOPPING and pings the watchdog (service.py).
All control work happens on one asyncio loop; the data plane's threads reach it only through
``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import os
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from ipop import logs, memory, routing, statedir
from ipop import reload as rl
from ipop.api import status as st
from ipop.api.server import ControlServer
from ipop.config import Config, Peer, parse_endpoint, resolve_workers
from ipop.crypto import identity as ident
from ipop.crypto.session import is_client_for
from ipop.crypto.verdict import Confirmation
from ipop.dataplane.facade import DataPlane, Event
from ipop.dataplane.keying import Keying
from ipop.dataplane.kroutes import Snat, enable_forwarding
from ipop.dataplane.link import Link
from ipop.dataplane.link import Path as LinkPath
from ipop.errors import ConfigError, IpopError, StateLockedError
from ipop.service import Notifier
from ipop.wire import header as wh
from ipop.wire import hello
from ipop.wire.nat44 import Translator
from ipop.wire.prefixes import Net

log = logging.getLogger("ipop.node")
TICK = 0.25
REKEY_REQUEST_GAP = 5.0  # seconds between two honoured rekey requests of one peer
CALM_EVERY = 4
SETTLE_SECONDS = 3.0  # calm this long after set-up work: the freed heap goes back
TRIM_GAP = 60.0  # seconds between two such returns at least
"""While nothing is being set up or keyed, the controller and the sessions are ticked on every
4th tick (once a second); the data plane's liveness checks run on every tick."""
HELLO_INTERVAL = 1.0  # seconds between hellos on a static link that waits for keys


class Controller(Protocol):
    """What the node expects of a controller (GroupVPN, SocialVPN)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def on_dataplane_event(self, ev: Event) -> bool: ...
    def peers_status(self) -> list[dict[str, Any]]: ...
    def node_status(self) -> dict[str, Any]: ...
    def tick(self, now: float) -> None: ...
    def busy(self) -> bool: ...


class Node:
    def __init__(self, cfg: Config, config_path: str | None = None,
                 log_override: str | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path  # re-read on reload; None: reload is refused
        self.log_override = log_override  # ``--log-level``: wins over controller_logging
        self.state_dir = cfg.state_path
        self.identity: ident.Identity | None = None
        self.keying: Keying | None = None
        self.dp: DataPlane | None = None
        self.api: ControlServer | None = None
        self.controller: Controller | None = None
        self.listen_sock: Any = None
        self._lock_fd = -1
        self._stop = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started = time.time()
        self.mtu = cfg.effective_mtu  # set from the underlay route at start (``ipop.netinfo``)
        # hooks later layers set: a STUN/DTLS datagram router, and link up/failed listeners
        self.control_datagram_hooks: list[Callable[[Event], bool]] = []
        self.link_hooks: list[Callable[[str, str], None]] = []
        self.fatal: BaseException | None = None
        self._activity: dict[bytes, tuple[int, float]] = {}
        self._rekey_asked: dict[bytes, float] = {}  # peer UID -> when its request was honoured
        self._ticks = 0
        self._busy_at = time.monotonic()  # start-up counts as busy: trim once it settles
        self._trimmed_at = -TRIM_GAP
        self.snat: Snat | None = None
        # static peers whose endpoint is a host name: re-resolved when their link goes down
        self._static_names: dict[bytes, tuple[str, int]] = {}
        self._resolving: set[bytes] = set()
        self._static_fpr: dict[bytes, str | None] = {}  # static peers' fingerprints
        # static links: when a hello hint last went out or came in (``_tick_sessions``,
        # ``_on_hello``), and those of road-warrior peers (no endpoint: their address is learnt)
        self._hello_at: weakref.WeakKeyDictionary[Link, float] = weakref.WeakKeyDictionary()
        self._awaiting_endpoint: weakref.WeakSet[Link] = weakref.WeakSet()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.notifier = Notifier()
        # called after a reload was applied, with (old, new) configs: later layers
        # re-apply what they derive from the config here
        self.reload_hooks: list[Callable[[Config, Config], None]] = []
        self._reload_lock = asyncio.Lock()
        self.metrics: Any = None  # the metrics HTTP server (api/metrics.py) when enabled
        self._reload_task: asyncio.Task[Any] | None = None

    # ---- life cycle
    def lock_state_dir(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        statedir.check_state_dir(self.state_dir)  # nobody else can plant or redirect files
        fd = statedir.open_lock(self.state_dir / "lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateLockedError(
                f"another node runs on state_dir {self.state_dir} (lock held)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    async def start(self) -> None:
        cfg = self.cfg
        self.loop = asyncio.get_running_loop()
        self.lock_state_dir()
        self.identity = ident.load_or_create(self.state_dir)
        self.keying = Keying(self.identity, rekey_seconds=cfg.rekey_seconds,
                             on_event=self.link_event, on_promote=self._promote,
                             on_keys=self._keys_in)
        self.api = ControlServer(cfg.control_path, self.handle_api)
        await self.api.start()
        from ipop.netinfo import default_mtu

        self.mtu, why = default_mtu(cfg)
        log.info("overlay mtu %d: %s", self.mtu, why)
        self.dp = DataPlane(
            uid=self.identity.uid, interface=cfg.interface, ip4=cfg.ip4,
            prefixlen=cfg.ip4_mask, mtu=self.mtu, tap=cfg.switchmode, ip6=cfg.ip6,
            ondemand_queue=cfg.ondemand_queue, keepalive_seconds=cfg.keepalive_seconds,
            offload=cfg.offload, whole_trains=cfg.whole_trains,
            on_event=self.on_dataplane_event, call_soon=self.loop.call_soon_threadsafe,
            workers=resolve_workers(cfg.workers),
        )
        if cfg.listen_port:
            self.listen_sock = self.dp.open_listen_socket(cfg.listen_port)
        self.start_routing()
        self.dp.start()
        for i, peer in enumerate(cfg.peers):
            try:
                self.add_static_peer(peer)
            except IpopError as exc:
                log.error("static peer %d (%s): %s", i, peer.uid[:12], exc,
                          extra=logs.link_extra(peer.uid))
        if self.controller is not None:
            await self.controller.start()
        if cfg.metrics_listen:
            from ipop.api.metrics import serve

            self.metrics = serve(self, cfg.metrics_listen)
        self.notify("local_state", self.node_status())
        log.info("node %s up on %s (%s/%d, mtu %d, %s)", self.identity.uid_hex, cfg.interface,
                 cfg.ip4, cfg.ip4_mask, self.mtu, "tap" if cfg.switchmode else "tun")
        self.notifier.ready(f"{cfg.interface} {cfg.ip4}/{cfg.ip4_mask} up")

    async def stop(self) -> None:
        self.notifier.stopping()
        if self.metrics is not None:
            self.metrics.shutdown()
            self.metrics.server_close()
            self.metrics = None
        if self.controller is not None:
            with contextlib.suppress(Exception):
                await self.controller.stop()
        if self.snat is not None:
            self.snat.remove()
        if self.dp is not None:
            self.dp.close()
        if self.api is not None:
            await self.api.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        try:
            await self.start()
            ticker = asyncio.create_task(self._ticker())
            await self._stop.wait()
            ticker.cancel()
        finally:
            await self.stop()
            log.info("node stopped")
        if self.fatal is not None:
            raise self.fatal

    def request_stop(self, fatal: BaseException | None = None) -> None:
        if fatal is not None and self.fatal is None:
            self.fatal = fatal
        self._stop.set()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            self.notifier.watchdog(now)
            self._ticks += 1
            try:
                if self.dp is not None:
                    self.dp.tick(now)
                busy = self._busy()
                self._settle(now, busy)
                if self._ticks % CALM_EVERY and not busy:
                    continue
                if self.controller is not None:
                    self.controller.tick(now)
                self._tick_sessions(now)
            except Exception:
                log.exception("tick failed")

    def _settle(self, now: float, busy: bool) -> None:
        """After a burst of set-up work has been calm for ``SETTLE_SECONDS``, give the freed
        heap back (``ipop.memory``), at most once every ``TRIM_GAP`` seconds."""
        if busy:
            self._busy_at = now
        elif (self._busy_at and now - self._busy_at >= SETTLE_SECONDS
              and now - self._trimmed_at >= TRIM_GAP):
            self._busy_at = 0.0
            self._trimmed_at = now
            memory.give_back()

    def _busy(self) -> bool:
        """Something is being set up or keyed: tick everything every time."""
        if self.keying is not None and self.keying.busy():
            return True
        return self.controller is not None and self.controller.busy()

    def _tick_sessions(self, now: float) -> None:
        """Drive handshake retransmits and rekeys; report frames that show a sec mismatch;
        say hello on static links that wait for keys (a road-warrior peer learns where we are)."""
        if self.keying is not None and self.dp is not None:
            self.keying.tick(now)
            self.keying.watch_plain(self.dp.links)
            for link in self.dp.links:
                if (link.path.kind == "static" and link.path.addr[1]
                        and (not link.usable or link.down)
                        and now - self._hello_at.get(link, 0.0) >= HELLO_INTERVAL):
                    self._hello_at[link] = now
                    self.dp.send_datagram(link, hello.pack(self.dp.uid, link.peer_uid))

    def _on_hello(self, ev: Event) -> bool:
        """A hello (``ipop.wire.hello``) on the static port: if it names a road-warrior peer
        whose address is unknown (or whose link went down), try that address: move the link
        there and start its handshake over.  Nothing is trusted until the handshake checks the
        certificate; roaming after that follows authenticated frames only."""
        if self.dp is None or ev.data["sock"] is not self.listen_sock:
            return False
        uid = hello.parse(ev.data["data"], self.dp.uid)
        if uid is None:
            return False
        link = self.dp.link(uid)
        if link is None or uid not in self._static_fpr:
            return True
        keyed = link.usable
        addr: tuple[str, int] = ev.data["addr"]
        now = time.monotonic()
        if keyed and addr == link.path.addr and ev.data["sock"] is link.path.sock:
            # the peer waits for a handshake although ours is done: it restarted.  Its DTLS
            # client (if that is us) starts a new one; the link keeps working meanwhile
            if now - self._hello_at.get(link, 0.0) >= HELLO_INTERVAL / 2 and (
                    self.keying is not None):
                self._hello_at[link] = now
                self.keying.rekey(link)
            return True
        if link not in self._awaiting_endpoint or (keyed and not link.down):
            return True  # a peer with a known endpoint, or keyed and alive: nothing to learn
        if addr == link.path.addr and not link.down:
            return True  # the handshake there is under way
        if now - self._hello_at.get(link, 0.0) < HELLO_INTERVAL / 2:
            return True  # at most two tries a second
        self._hello_at[link] = now
        log.info("road-warrior peer %s: trying %s:%d for its handshake", uid.hex()[:12],
                 addr[0], addr[1])
        self.dp.set_path(uid, LinkPath(ev.data["sock"], addr, None, "static"))
        self.start_security(link, self._static_fpr[uid])
        return True

    # ---- routing: subnet routers, exit nodes
    def start_routing(self) -> None:
        """Forwarding and SNAT for what this node advertises; the underlay servers an exit
        route must leave alone.  (Routes to peers' prefixes follow their links:
        ``DataPlane.apply_routes``.)"""
        cfg = self.cfg
        assert self.dp is not None
        if cfg.advertise_routes:
            enable_forwarding({ipaddress.ip_network(r).version for r in cfg.advertise_routes})
            if cfg.snat_routes:
                self.snat = Snat(cfg.interface, cfg.overlay_networks)
                self.snat.add()
        if cfg.exit_node is not None:
            self.dp.exit_servers = self.underlay_servers()
        if cfg.exit_node is not None or cfg.advertise_routes or any(
                p.allowed_ips for p in cfg.peers):
            # routes will change soon: import the netlink library now, off the control
            # thread, rather than at the first route change (``ipop up`` does not need it)
            threading.Thread(target=_import_netlink, name="ipop-preload", daemon=True).start()

    def underlay_servers(self) -> set[str]:
        """The addresses of the XMPP, STUN and TURN servers (names resolved now)."""
        cfg = self.cfg
        hosts = [parse_endpoint(s, default_port=3478)[0] for s in cfg.stun]
        hosts += [parse_endpoint(t.server, default_port=3478)[0] for t in cfg.turn]
        if cfg.xmpp_host:
            hosts.append(cfg.xmpp_host)
        found: set[str] = set()
        for host in hosts:
            try:
                found.add(str(ipaddress.ip_address(host)))
                continue
            except ValueError:
                pass
            try:
                for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_UDP):
                    found.add(str(info[4][0]))
            except OSError as exc:
                log.warning("exit_node: cannot resolve %s (%s); its traffic may take the "
                            "exit route", host, exc)
        return found

    # ---- live reload (SIGHUP, the API's ``reload``)
    def _on_sighup(self) -> None:
        if self.dp is None:
            log.warning("SIGHUP while the node starts: ignored (send it again once it is up)")
            return
        task = asyncio.get_running_loop().create_task(self._sighup_reload())
        self._reload_task = task  # keep a reference until it is done

    async def _sighup_reload(self) -> None:
        try:
            await self.reload()
        except IpopError:
            pass  # refused: reload() logged it, naming the key
        except Exception:
            log.exception("reload failed")

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply what may change live; returns what changed.

        Refused as a whole (``ConfigError`` naming the key; the node keeps its config) when
        the file does not validate or a key that needs a restart changed."""
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                result = self._reload()
            except ConfigError as exc:
                log.error("reload refused: %s", exc)
                raise
            finally:
                self.notifier.ready(f"{self.cfg.interface} {self.cfg.ip4}/{self.cfg.ip4_mask} up")
            return result

    def _reload(self) -> dict[str, Any]:
        from ipop import config

        if self.config_path is None:
            raise ConfigError("config", "this node was not started from a config file")
        new, warnings = config.load(self.config_path)
        for w in warnings:
            log.warning("reload: %s", w)
        old = self.cfg
        p = rl.plan(old, new)
        if p.refused is not None:
            raise ConfigError(p.refused, "cannot change while the node runs; restart it "
                                         "(nothing was changed)")
        if not p.changed:
            log.info("reload: nothing changed")
            return {"changed": [], "links": []}
        self.cfg = new
        rebuilt: list[str] = []
        if p.logging:
            logs.configure(log_format=new.log_format, controller_logging=new.controller_logging,
                           tincan_logging=new.tincan_logging, override=self.log_override)
        if self.dp is not None:
            self.dp.held_limit = new.ondemand_queue
            self.dp.keepalive_seconds = new.keepalive_seconds
        if self.keying is not None and new.rekey_seconds != old.rekey_seconds:
            self.keying.set_rekey_seconds(new.rekey_seconds)
        rebuilt += self._reload_static_peers(old, new)
        apply = getattr(self.controller, "reload", None)
        if apply is not None:
            rebuilt += apply(old, new, p)
        routed = routing.reload_routing(self, old, new)  # after the links' prefixes changed
        for hook in self.reload_hooks:
            try:
                hook(old, new)
            except Exception:
                log.exception("reload hook %s failed", hook)
        log.info("reload: changed %s; links rebuilt or re-decided: %s%s", ", ".join(p.changed),
                 ", ".join(rebuilt) or "none", "".join(f"; {r}" for r in routed))
        self.notify("local_state", self.node_status())
        return {"changed": p.changed, "links": rebuilt, "routes": routed}

    def _reload_static_peers(self, old: Config, new: Config) -> list[str]:
        """Static links: removed, added, rebuilt when their entry or their security changed."""
        if self.dp is None:
            return []
        changes = rl.peer_changes(old, new)
        encrypt = new.sec or new.require_encryption
        touched: list[str] = []
        for uid in (*changes.removed, *changes.changed):
            self.remove_link(uid)
            touched.append(f"{uid[:12]} removed" if uid in changes.removed else
                           f"{uid[:12]} rebuilt")
        for peer in new.peers:
            link = self.dp.link(bytes.fromhex(peer.uid))
            if peer.uid in changes.added or peer.uid in changes.changed:
                pass
            elif link is not None and link.encrypted != encrypt:
                self.remove_link(peer.uid)
                touched.append(f"{peer.uid[:12]} rebuilt ({'dtls' if encrypt else 'none'})")
            else:
                continue
            try:
                self.add_static_peer(peer)
            except IpopError as exc:
                log.error("static peer %s: %s", peer.uid[:12], exc,
                          extra=logs.link_extra(peer.uid))
                continue
            if peer.uid in changes.added:
                touched.append(f"{peer.uid[:12]} added")
        return touched + routing.static_nets(self, new, changes.nets)

    # ---- static peers
    def add_static_peer(self, peer: Peer) -> Link:
        assert self.dp is not None
        if self.listen_sock is None:
            raise ConfigError("listen_port", "static peers need a listen_port")
        if peer.endpoint is None:  # a road warrior: learned from its first authenticated frame
            addr = ("::", 0)
        else:
            host, port = parse_endpoint(peer.endpoint)
            addr = resolve_endpoint(host, port)
            if not _is_ip(host):
                self._static_names[bytes.fromhex(peer.uid)] = (host, port)
        encrypted = self.cfg.sec or self.cfg.require_encryption
        reason = "static_sec" if encrypted else "static_sec_off"
        link = self.dp.add_link(
            peer_uid=bytes.fromhex(peer.uid), path=LinkPath(self.listen_sock, addr, None, "static"),
            ip4=peer.ip4, ip6=peer.ip6,
            mac=bytes.fromhex(peer.mac.replace(":", "")) if peer.mac else None,
            encrypted=encrypted, security_reason=reason,
            nets=tuple(ipaddress.ip_network(n) for n in peer.allowed_ips),
        )
        if peer.endpoint is None:
            self._awaiting_endpoint.add(link)
        self._static_fpr[link.peer_uid] = peer.fingerprint
        # as wg-quick: a /0 in allowed_ips (or exit_node naming the peer) routes the default
        # through it, by policy routing
        if routing.static_exit(self.cfg, peer):
            if not self.dp.exit_servers:
                self.dp.exit_servers = self.underlay_servers()
            self.dp.apply_routes(exit_via=link.peer_uid)
        self.start_security(link, peer.fingerprint)
        self.notify("peer_state", st.link_entry(link))
        where = peer.endpoint or "(road warrior: learned from its handshake)"
        log.info("static link %s to %s (%s: %s)", peer.uid[:12], where, link.security,
                 reason, extra=logs.link_extra(peer.uid, f"static {where}"))
        return link

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _re_resolve(self, peer_uid: bytes) -> None:
        """A static peer's link went down: look its host name up again, and move the link
        if the name now points elsewhere."""
        if peer_uid in self._resolving or self.dp is None:
            return
        self._resolving.add(peer_uid)
        try:
            host, port = self._static_names[peer_uid]
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except OSError as exc:
                log.warning("static peer %s: cannot resolve %s again: %s",
                            peer_uid.hex()[:12], host, exc)
                return
            addr = _pick(infos, host)
            link = self.dp.link(peer_uid)
            if link is None or addr == link.path.addr:
                return
            log.info("static peer %s: %s now resolves to %s; link moved", peer_uid.hex()[:12],
                     host, addr[0])
            self.dp.set_path(peer_uid, LinkPath(link.path.sock, addr, None, "static"))
        finally:
            self._resolving.discard(peer_uid)

    def start_security(self, link: Link, fingerprint: str | None,
                       confirmation: Confirmation | None = None, *, beside: bool = False) -> None:
        """Begin the link's DTLS handshake on its own path (every link: it proves the peer and
        confirms the verdict; an encrypted link also gets its keys from it)."""
        assert self.keying is not None
        self.keying.start(link, fingerprint, confirmation=confirmation, beside=beside)

    def _promote(self, link: Link) -> None:
        """A link proven beside the peer's working one takes its place (``Keying``)."""
        assert self.dp is not None
        self.dp.install_link(link)
        self.notify("peer_state", st.link_entry(link))

    # ---- links made by a controller
    def mac_text(self) -> str | None:
        mac = self.dp.mac if self.dp is not None else None
        if mac is None:
            return None
        return ":".join(f"{b:02x}" for b in mac)

    def create_link_on_path(
        self, *, peer_uid: str, ip4: str | None, path: LinkPath, fingerprint: str | None,
        mac: str | None, encrypt: bool, reason: str, real_ip4: str | None = None,
        early: list[bytes] | None = None, peer_trains: bool = True, ip6: str | None = None,
        nets: tuple[Net, ...] = (), confirmation: Confirmation | None = None,
        beside: bool = False,
    ) -> Link:
        """``create_link`` for a controller, on the path ICE selected; ``peer_trains``: the
        peer said it receives whole trains; ``confirmation``: the verdict and the signaled
        inputs its handshake confirms; ``beside``: the peer has a working link, which this one
        replaces only once its handshake proved the same UID."""
        assert self.dp is not None
        if fingerprint is None:
            raise IpopError("the peer sent no certificate fingerprint")
        make = self.dp.make_link if beside else self.dp.add_link
        link = make(
            peer_uid=bytes.fromhex(peer_uid), path=path,
            ip4=ip4, ip6=ip6, mac=bytes.fromhex(mac.replace(":", "")) if mac else None,
            encrypted=encrypt, security_reason=reason, nets=nets,
            xlat=None if real_ip4 is None or ip4 is None else Translator(
                ipaddress.IPv4Address(ip4).packed, ipaddress.IPv4Address(real_ip4).packed),
            peer_trains=peer_trains,
        )
        if not peer_trains:
            log.info("link %s: the peer did not offer whole trains; sending segments",
                     peer_uid[:12])
        self.start_security(link, fingerprint, confirmation, beside=beside)
        for d in early or []:
            if wh.is_dtls(d) and self.keying is not None:
                self.keying.on_dtls(None if beside else link.peer_uid, d,
                                    source=link.path.source_key)
        if beside:
            return link
        self.notify("peer_state", st.link_entry(link))
        return link

    def remove_link(self, peer_uid: str) -> None:
        if self.keying is not None:
            self.keying.stop_beside(bytes.fromhex(peer_uid))
        if self.dp is not None:
            link = self.dp.remove_link(bytes.fromhex(peer_uid))
            if link is not None:
                self._activity.pop(link.peer_uid, None)
                self.stop_security(link)
                log.info("link %s removed", peer_uid[:12],
                         extra=logs.link_extra(peer_uid, _link_text(link)))

    def _keys_in(self, link: Link) -> None:
        if self.dp is not None:
            self.dp.release_early(link)
            self.dp.push_keys(link)

    def _rekey(self, kind: str, peer_uid: bytes) -> None:
        """Shards: a link needs keys made from now on (``rekey_needed``: this end starts a
        handshake if it is the DTLS client, else asks the peer to), or the peer asked for them
        (``rekey_request``, sealed: honoured at most once per ``REKEY_REQUEST_GAP`` per link)."""
        if self.dp is None or self.keying is None:
            return
        link = self.dp.link(peer_uid)
        if link is None or not link.encrypted:
            return
        now = time.monotonic()
        if kind == "rekey_request":
            if now - self._rekey_asked.get(peer_uid, -REKEY_REQUEST_GAP) < REKEY_REQUEST_GAP:
                return
            self._rekey_asked[peer_uid] = now
        if is_client_for(self.dp.uid, peer_uid):
            self.keying.rekey(link, now)
        elif kind == "rekey_needed":
            self.dp.ask_rekey(link)

    def stop_security(self, link: Link) -> None:
        """Forget a removed link's keys."""
        if self.keying is not None:
            self.keying.stop(link)

    def link_is_up(self, peer_uid: str) -> bool:
        link = self.dp.link(bytes.fromhex(peer_uid)) if self.dp else None
        return link is not None and st.link_state(link) == "up"

    def link_activity(self, peer_uid: str) -> float | None:
        """When the link last carried data (not keepalives), in monotonic seconds."""
        link = self.dp.link(bytes.fromhex(peer_uid)) if self.dp else None
        if link is None:
            return None
        count = link.stats.tx_packets + link.stats.rx_packets
        last = self._activity.get(link.peer_uid)
        if last is None or last[0] != count:
            self._activity[link.peer_uid] = (count, time.monotonic())
            return time.monotonic()
        return last[1]

    def link_event(self, peer_uid: bytes, event: str) -> None:
        link = self.dp.link(peer_uid) if self.dp else None
        if link is not None:
            self.notify("peer_state", st.link_entry(link))
            log.info("link %s %s (%s, %s)", peer_uid.hex()[:12], event, link.security,
                     link.path.kind, extra=logs.link_extra(peer_uid, _link_text(link)))
        for hook in self.link_hooks:
            hook(peer_uid.hex(), event)

    # ---- data plane events (control thread)
    def on_dataplane_event(self, ev: Event) -> None:
        try:
            if ev.kind in ("rekey_needed", "rekey_request"):
                self._rekey(ev.kind, ev.data["peer_uid"])
                return
            if self.controller is not None and self.controller.on_dataplane_event(ev):
                return
            if ev.kind == "confirmed":
                if self.keying is not None:
                    self.keying.confirmed(ev.data["peer_uid"])
                return
            if ev.kind == "control_datagram":
                data: bytes = ev.data["data"]
                if wh.is_stun(data) and self._on_hello(ev):
                    return
                sock = ev.data["sock"]
                if (wh.is_dtls(data) and self.keying is not None
                        and self.keying.on_dtls(ev.data["peer_uid"], data, source=(
                            sock.fileno(), ev.data["addr"], ev.data["channel"]))):
                    return
                for hook in self.control_datagram_hooks:
                    if hook(ev):
                        return
                if self.dp is not None:  # nobody took it: every drop has a counter
                    self.dp.count_control_drop(
                        "control_unhandled_stun" if wh.is_stun(data) else "control_unhandled_dtls")
                return
            if ev.kind == "unknown_destination":
                dst: bytes = ev.data["dst"]
                pkt: bytes = ev.data["packet"]
                self.notify("unknown_destination", {
                    "dst": str(ipaddress.ip_address(dst)) if len(dst) in (4, 16) else dst.hex(),
                    "size": len(pkt), "head": pkt[:64].hex(),
                })
            elif ev.kind in ("link_down", "roamed"):
                if ev.kind == "link_down" and ev.data["peer_uid"] in self._static_names:
                    self._spawn(self._re_resolve(ev.data["peer_uid"]))
                link = self.dp.link(ev.data["peer_uid"]) if self.dp else None
                if link is not None:
                    self.notify("con_stat", {"peer_uid": link.peer_uid.hex(), "event": ev.kind,
                                             "state": st.link_state(link)})
        except Exception:
            log.exception("data plane event %s failed", ev.kind)

    def notify(self, kind: str, data: dict[str, Any]) -> None:
        if self.api is not None:
            self.api.notify(kind, data)

    # ---- status and the Tincan API
    def node_status(self) -> dict[str, Any]:
        cfg = self.cfg
        node: dict[str, Any] = {
            "uid": self.identity.uid_hex if self.identity else None,
            "fingerprint": self.identity.fingerprint if self.identity else None,
            "ip4": cfg.ip4, "ip4_mask": cfg.ip4_mask, "ip6": cfg.ip6,
            "interface": cfg.interface, "mode": "tap" if cfg.switchmode else "tun",
            "mtu": self.mtu, "listen_port": cfg.listen_port or None,
            "controller": cfg.controller if self.controller else None,
            "uptime_s": round(time.time() - self.started, 1),
            "xmpp": None, "counters": self.dp.counters() if self.dp else None,
            "pid": os.getpid(), "runtime": runtime_status(),
        }
        if self.controller is not None:
            node.update(self.controller.node_status())
        return node

    def get_state(self) -> dict[str, Any]:
        links = [st.link_entry(lk) for lk in self.dp.links] if self.dp else []
        peers = self.controller.peers_status() if self.controller else []
        return {"version": st.SCHEMA_VERSION, "node": self.node_status(), "links": links,
                "peers": peers}

    async def handle_api(self, method: str, params: dict[str, Any]) -> Any:
        dp = self.dp
        if dp is None:
            raise IpopError("node is starting")
        if method == "get_state":
            return self.get_state()
        if method == "register_svc":
            return {"uid": self.identity.uid_hex if self.identity else None}
        if method == "set_logging":
            level = str(params.get("level", "INFO")).upper()
            if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
                raise IpopError(f"unknown level {level}")
            logging.getLogger("ipop").setLevel(level)
            return {"level": level}
        if method == "create_link":
            uid = _uid_param(params)
            host, port = parse_endpoint(str(params["endpoint"]))
            sock = self.listen_sock
            if sock is None:
                raise IpopError("create_link needs a listen_port on this node")
            encrypted = bool(params.get("sec", self.cfg.sec)) or self.cfg.require_encryption
            if not params.get("fingerprint"):
                raise IpopError("create_link needs the peer's fingerprint: every link proves "
                                "its peer in a DTLS handshake")
            link = dp.add_link(
                peer_uid=uid, path=LinkPath(sock, resolve_endpoint(host, port), None, "static"),
                ip4=params.get("ip4"), encrypted=encrypted,
                security_reason="api" if encrypted else "api_plain",
            )
            self.start_security(link, params.get("fingerprint"))
            self.notify("peer_state", st.link_entry(link))
            return st.link_entry(link)
        if method == "trim_link":
            gone = dp.remove_link(_uid_param(params))
            if gone is None:
                raise IpopError("no such link")
            self.stop_security(gone)
            self.notify("con_stat", {"peer_uid": gone.peer_uid.hex(), "event": "trimmed"})
            return {"trimmed": gone.peer_uid.hex()}
        if method == "set_remote_ip":
            uid = _uid_param(params)
            if dp.link(uid) is None:
                raise IpopError("no such link")
            found = dp.set_remote_ip(uid, ipaddress.IPv4Address(str(params["ip4"])).packed)
            if found is None:
                raise IpopError("no such link")
            return st.link_entry(found)
        if method == "reload":
            try:
                return await self.reload()
            except ConfigError as exc:
                return {"changed": [], "links": [], "refused": exc.key, "error": str(exc)}
        if method == "ping":
            from ipop.api.ping import ping

            return await ping(self, params)
        if method == "set_local_ip":
            raise IpopError("set_local_ip: the address comes from the config; restart to change")
        extra = getattr(self.controller, "handle_api", None)
        if extra is not None:
            return await extra(method, params)
        raise IpopError(f"unknown method {method!r}")


def _import_netlink() -> None:
    import pyroute2  # noqa: F401  (kroutes imports it lazily; this only warms it)


def runtime_status() -> dict[str, int]:
    """What the process holds: threads and asyncio tasks (the soak test watches them grow)."""
    try:
        tasks = len(asyncio.all_tasks())
    except RuntimeError:  # no running loop
        tasks = 0
    return {"threads": threading.active_count(), "asyncio_tasks": tasks}


def _link_text(link: Link) -> str:
    """A link in a few words for logs: its path kind and the peer's underlay address."""
    host, port = link.path.addr[0].removeprefix("::ffff:"), link.path.addr[1]
    return f"{link.path.kind} {host}:{port}"


def _uid_param(params: dict[str, Any]) -> bytes:
    raw = str(params.get("peer_uid") or params.get("uid") or "")
    try:
        uid = bytes.fromhex(raw)
    except ValueError:
        uid = b""
    if len(uid) != 20:
        raise IpopError("peer_uid must be 40 hex characters")
    return uid


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolve_endpoint(host: str, port: int) -> tuple[str, int]:
    """The socket address of ``host:port``; a host name is looked up (IPv4 first).  Raises
    IpopError when it cannot be."""
    if _is_ip(host):
        return _sockaddr(host, port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise IpopError(f"cannot resolve endpoint {host}: {exc}") from None
    return _pick(infos, host)


def _pick(infos: list[Any], host: str) -> tuple[str, int]:
    if not infos:
        raise IpopError(f"endpoint {host} resolves to no address")
    infos = sorted(infos, key=lambda i: i[0] != socket.AF_INET)
    addr = infos[0][4]
    return _sockaddr(str(addr[0]), int(addr[1]))


def _sockaddr(host: str, port: int) -> tuple[str, int]:
    """The address form our dual-stack (AF_INET6) sockets report for ``host``."""
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        return (f"::ffff:{ip}", port)
    return (str(ip), port)
