"""GroupVPN: one address space per group; links made proactively or on demand over signaling.

The seed paper's seven steps, as this controller runs them:
  1-3. at start it reads the data plane's state (``get_state``); the signaling backend reports
       each group member's presence (``peer_state``);
  4.   it sends ``con_req`` (UID, overlay address, fingerprint, security groups, candidates);
  5-6. the peer decides the link's security, calls ``create_link`` and answers ``con_resp``;
  7.   the initiator checks the verdict, calls ``create_link``; the data plane runs the link's
       DTLS handshake (every link: it proves both UIDs and confirms the verdict and its signaled
       inputs, ``ipop.crypto.verdict``) and reports it up; only then does it carry data.
A UID belongs to the account that announced it first: another account that claims it is refused
(``uid_claimed``).  A handshake that fails (a lying identity, a rewritten verdict) puts the peer's
account and UID on a growing hold (``AUTH_HOLD_*``): their con_req are ignored meanwhile, and
status shows how many failed and why.
Proactive mode links every online member; on-demand mode links when the data plane reports a
packet for a known peer's address (those packets wait in the data plane, they are not dropped)
and trims links idle for ``on-demand_inactive_timeout`` seconds, telling the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipop.controller.icepaths import IcePaths
from ipop.controller.liveroutes import LiveRoutes, record_routes
from ipop.controller.peers import (
    LinkState,
    Peer,
    PeerTable,
    bare,
    first_request_delay,
    wins_collision,
)
from ipop.controller.routes import RoutePolicy, decide
from ipop.controller.siglimits import InboundLimits, peer_address_problem
from ipop.crypto import policy
from ipop.crypto.session import is_client_for
from ipop.crypto.verdict import Confirmation
from ipop.dataplane.facade import Event
from ipop.dataplane.link import Path as LinkPath
from ipop.errors import ConfigError, IpopError, LocalProtocolError
from ipop.logs import link_extra
from ipop.nat.params import cap_candidates
from ipop.signal.base import SignalBackend, SignalListener, TokenBucket
from ipop.wire.header import is_stun
from ipop.wire.prefixes import Net, parse_prefix
from ipop.wire.signal import FEATURE_ROUTE_UPDATE, FEATURE_TRAINS, SignalMessage

if TYPE_CHECKING:
    from ipop.config import Config
    from ipop.node import Node
    from ipop.reload import Plan

log = logging.getLogger("ipop.controller")

CON_REQ_RATE = 10.0  # con_req per second, at most
CON_REQ_BURST = 20.0
AUTH_HOLD_MIN = 2.0  # seconds an account or UID is ignored after its first failed handshake
AUTH_HOLD_MAX = 60.0
CLAIM_LOG_GAP = 10.0  # seconds between two log lines about refused UID claims from one account
RELINK_EAGER = 60.0
"""For this long after a working link was lost (path lost, keepalive timeout), a failed attempt
to make it again is retried after 0.5-1.5 s instead of the growing backoff."""


class AuthRecord:
    """Failed handshakes of one account or UID: how many, the last reason, and the hold."""

    __slots__ = ("count", "reason", "until")

    def __init__(self) -> None:
        self.count = 0
        self.reason = ""
        self.until = 0.0

    def fail(self, reason: str, now: float) -> None:
        self.count += 1
        self.reason = reason
        self.until = now + min(AUTH_HOLD_MAX, AUTH_HOLD_MIN * 2 ** (self.count - 1))


class GroupVPN(SignalListener):
    """The GroupVPN controller of one node."""

    name = "groupvpn"

    def __init__(self, node: Node, backend: SignalBackend | None = None) -> None:
        self.node = node
        self.cfg = node.cfg
        self.backend = backend
        self.peers = PeerTable()
        self.connected = False
        self.signal_error: str | None = None
        self.overlay_id = self.cfg.group or "ipop"
        self._req_bucket = TokenBucket(CON_REQ_RATE, CON_REQ_BURST)
        self._inbound = InboundLimits()  # con_req/con_resp per sender and in all (issue 16)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connect_task: asyncio.Task[None] | None = None
        self.counters: dict[str, int] = {}
        self.fatal: BaseException | None = None
        self.paths: IcePaths | None = None
        self._route_policy: RoutePolicy | None = None
        # each peer's security view from its last con_req/con_resp (by UID): a reload that
        # changes our own view re-decides the link against it
        self._views: dict[str, policy.SecurityView] = {}
        self.live_routes = LiveRoutes(self)  # route updates; routing keys on reload
        # what this node signaled to each peer (by bare JID) in the current attempt: the
        # handshake confirms it (``ipop.crypto.verdict``)
        self._sent: dict[str, policy.SecurityView] = {}
        self.auth_by_jid: dict[str, AuthRecord] = {}
        self.auth_by_uid: dict[str, AuthRecord] = {}
        self._claim_logged: dict[str, float] = {}
        # peers (UID) whose working link stays while a new one is proven beside it
        self._beside: set[str] = set()
        # peers (UID) whose working link was lost, and when; those whose link ran over a relay
        # wait until the TURN server answers before a new attempt
        self._lost_at: dict[str, float] = {}
        self._relay_lost: set[str] = set()

    # ---- helpers
    @property
    def my_uid(self) -> str:
        assert self.node.identity is not None
        return self.node.identity.uid_hex

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _now(self) -> float:
        return time.monotonic()

    # ---- life cycle
    async def start(self) -> None:
        if self.backend is None:
            self.backend = self._make_backend()
        self.node.link_hooks.append(self._on_link_event)
        assert self.node.dp is not None
        self.paths = IcePaths(self.cfg, adopt=self.node.dp.adopt_socket,
                              release=self.node.dp.release_socket,
                              on_path_change=self._path_changed,
                              on_failed=self._ice_failed)
        self.node.control_datagram_hooks.append(self._on_stun)
        state = self.node.get_state()  # step 1: the data plane's view
        log.debug("controller start: %d links", len(state["links"]))
        self._connect_task = asyncio.get_running_loop().create_task(self._connect())

    def _make_backend(self) -> SignalBackend:
        from ipop.signal.xmpp import XmppSettings, XmppSignal

        cfg = self.cfg
        assert cfg.xmpp_username and cfg.xmpp_password and cfg.xmpp_host
        settings = XmppSettings(
            jid=cfg.xmpp_username, password=cfg.xmpp_password, host=cfg.xmpp_host,
            port=cfg.xmpp_port, tls=cfg.xmpp_tls,
            ca_cert=None if cfg.xmpp_ca_cert is None else Path(cfg.xmpp_ca_cert),
            group=self.group_filter(),
        )
        settings.check()
        if cfg.xmpp_tls == "none":  # allowed only with allow_insecure_signaling (config.py)
            log.warning('xmpp_tls "none" (allow_insecure_signaling): the password and all '
                        "signaling cross the network in clear and can be rewritten; each link's "
                        "DTLS handshake still proves both UIDs and refuses a rewritten verdict")
        return XmppSignal(settings, self)

    def group_filter(self) -> str | None:
        return self.cfg.group

    async def _connect(self) -> None:
        assert self.backend is not None
        try:
            await self.backend.set_presence(self.my_uid, self.cfg.ip4, self.announced_ip6())
            await self.backend.connect()
        except ConfigError as exc:
            log.error("%s", exc)
            self.fatal = exc
            self.node.request_stop(exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("signaling failed")

    async def stop(self) -> None:
        if self._connect_task is not None:
            self._connect_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self.paths is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.paths.close_all(), 3.0)
        if self.backend is not None:
            try:
                await asyncio.wait_for(self.backend.close(), 3.0)
            except (TimeoutError, Exception):
                pass

    # ---- signaling events
    def on_state(self, connected: bool, error: str | None) -> None:
        self.connected = connected
        self.signal_error = error
        self.node.notify("con_stat", {"signal": "connected" if connected else "disconnected",
                                      "error": error})

    def on_presence(self, jid: str, uid: str | None, online: bool,
                    ip4: str | None = None, *, ip6: str | None = None) -> None:
        if uid == self.my_uid:
            return  # another resource of ourselves
        if not online:
            known = self.peers.by_jid.get(bare(jid))
            if known is not None and known.online and known.jid != jid:
                return  # an older resource left (the peer restarted); the newer one stays
        peer = self.peers.get(jid)
        now = self._now()
        was_online = peer.online
        if online:
            if uid is not None and self._claimed_elsewhere(jid, uid):
                uid = None  # another account owns it: this one gets no link under it
            if peer.uid is not None and uid is not None and uid != peer.uid:
                self._drop_link(peer, "peer identity changed")
            peer.uid = uid or peer.uid
            if ip4 is not None:
                self._set_ip(peer, ip4)
            if ip6 is not None and self.announced_ip6() is not None:
                self._set_ip6(peer, ip6)
            peer.online = True
            peer.jid = jid
            if not was_online:
                peer.retry_at = now
                if not self.cfg.on_demand_connection and peer.uid is not None:
                    delay = first_request_delay(self.my_uid, peer.uid, random.random())
                    peer.retry_at += delay
                    # ask on time, not at the next tick (up to 0.25 s later)
                    asyncio.get_running_loop().call_later(
                        delay, lambda: self._maybe_request(peer, self._now()))
                peer.backoff = 1.0
        else:
            peer.online = False
            if peer.state is LinkState.UP:
                # Signaling lost the peer (it left, or the server went away): a working link
                # stays; only the data plane's keepalives end it (``link_down``).  They are
                # asked now: a peer that died stops answering within 1.5 s, and its link goes
                # (packets for it then wait for a new link instead of being lost).
                log.info("%s went offline; its link stays while the peer answers keepalives",
                         jid, extra=link_extra(peer.uid))
                if self.node.dp is not None and peer.uid is not None:
                    self.node.dp.verify(bytes.fromhex(peer.uid))
            elif peer.state is not LinkState.IDLE:
                self._drop_link(peer, "peer went offline")
        self.node.notify("peer_state", self.peer_entry(peer))
        if online and not self.cfg.on_demand_connection:
            peer.wanted = True
            self._maybe_request(peer, now)

    def _claimed_elsewhere(self, jid: str, uid: str) -> bool:
        """Whether a claim of ``uid`` from ``jid`` is refused: another account (bare JID) that
        is online holds it with a link made or being made, or ``jid`` failed a handshake lately
        (an impersonation, a copied identity).  Refused claims are counted and logged now and
        then; an accepted claim takes the UID from idle accounts that held it."""
        holders = [p for p in self.peers if p.uid == uid and bare(p.jid) != bare(jid)]
        owner = next((p for p in holders if p.online and p.state is not LinkState.IDLE), None)
        rec = self.auth_by_jid.get(bare(jid))
        held = rec is not None and self._now() < rec.until
        if owner is None and not (held and holders):
            for p in holders:
                p.uid = None  # an idle account loses a UID another account now claims
            return False
        owner = owner or holders[0]
        self._count("uid_claim_refused")
        claimer = self.peers.get(jid)
        claimer.last_error = f"uid_claimed: UID {uid[:12]} belongs to {bare(owner.jid)}"
        now = self._now()
        if now - self._claim_logged.get(bare(jid), -CLAIM_LOG_GAP) >= CLAIM_LOG_GAP:
            self._claim_logged[bare(jid)] = now
            log.warning("%s claims UID %s, which %s holds: refused", bare(jid), uid[:12],
                        bare(owner.jid))
        return True

    def _on_hold(self, jid: str, uid: str, now: float) -> bool:
        """The account or the UID failed a handshake recently: ignore its requests a while."""
        for rec in (self.auth_by_jid.get(bare(jid)), self.auth_by_uid.get(uid)):
            if rec is not None and now < rec.until:
                return True
        return False

    def on_message(self, jid: str, msg: SignalMessage) -> None:
        try:
            if msg.overlay_id != self.overlay_id:
                self._count("wrong_overlay")
                return
            if msg.uid == self.my_uid:
                return
            if msg.type in ("con_req", "con_resp"):
                refused = self._inbound.admit(bare(jid), self._now())
                if refused is not None:
                    self._count(refused)  # before any work: no parse of candidates, no ICE
                    return
            if msg.type == "con_req":
                self._on_con_req(jid, msg)
            elif msg.type == "con_resp" and msg.update:
                self.live_routes.on_update(jid, msg)
            elif msg.type == "con_resp":
                self._on_con_resp(jid, msg)
            elif msg.type == "trim":
                peer = self.peers.get(jid)
                if peer.uid == msg.uid:
                    if self.cfg.on_demand_connection:
                        # the link idled out: make it again only when traffic asks (else the
                        # two ends would trim and re-create it forever)
                        peer.wanted = False
                    self._drop_link(peer, "trimmed by peer", tell=False)
        except Exception:
            log.exception("signal message from %s failed", jid)
            self._count("message_error")

    # ---- steps 4-7
    def _my_view(self) -> policy.SecurityView:
        groups = self.cfg.security_groups
        return policy.SecurityView(
            sec=self.cfg.sec,
            security_groups=None if groups is None else frozenset(groups),
            require_encryption=self.cfg.require_encryption,
        )

    def _their_view(self, msg: SignalMessage, *, is_request: bool) -> policy.SecurityView:
        return policy.SecurityView(
            sec=True if msg.sec is None else msg.sec,
            security_groups=None if msg.security_groups is None else frozenset(
                msg.security_groups),
            # a con_req that says encrypt=true insists on encryption (its require_encryption)
            require_encryption=bool(is_request and msg.encrypt),
        )

    def _message(self, mtype: str, encrypt: bool | None,
                 candidates: list[str] | None = None) -> SignalMessage:
        assert self.node.identity is not None
        groups = self.cfg.security_groups
        return SignalMessage(
            type=mtype,  # type: ignore[arg-type]
            uid=self.my_uid, overlay_id=self.overlay_id, ip4=self.cfg.ip4,
            fingerprint=self.node.identity.fingerprint,
            candidates=tuple(candidates or ()),
            mac=self.node.mac_text(),
            security_groups=None if groups is None else tuple(groups),
            sec=self.cfg.sec, encrypt=encrypt,
            # this data plane receives trains, whatever it sends; route updates are taken
            features=(FEATURE_ROUTE_UPDATE, FEATURE_TRAINS),
            ip6=self.announced_ip6(), routes=self.advertised_routes(),
        )

    # ---- IPv6 and routes (SocialVPN overrides these: it stays IPv4-only, with no routes)
    def announced_ip6(self) -> str | None:
        """This node's overlay IPv6 address as it announces it (presence, con_req)."""
        ip6 = self.cfg.ip6
        return None if ip6 is None else str(ipaddress.IPv6Interface(ip6).ip)

    def advertised_routes(self) -> tuple[str, ...] | None:
        return tuple(self.cfg.advertise_routes) or None

    def route_policy(self) -> RoutePolicy:
        if self._route_policy is None:
            cfg = self.cfg
            accept = cfg.accept_routes
            own = [parse_prefix(r) for r in cfg.advertise_routes]
            if self.node.dp is not None and cfg.accept_routes is not False:
                own += self.node.dp.local_networks()
            self._route_policy = RoutePolicy(
                accept=accept if isinstance(accept, bool) else tuple(
                    parse_prefix(a) for a in accept),
                overlay=tuple(cfg.overlay_networks), own=tuple(own))
        return self._route_policy

    def is_exit(self, peer: Peer) -> bool:
        name = self.cfg.exit_node
        return name is not None and name in (peer.uid, peer.ip4, peer.ip6)

    def accept_routes(self, peer: Peer) -> tuple[Net, ...]:
        """The routes ``peer`` advertised (``peer.offered_routes``: its con_req/con_resp or its
        last route update) that this node installs; the refused ones and why go to the peer's
        status (and the log, once per change)."""
        dp = self.node.dp
        me = bytes.fromhex(peer.uid or "")

        def owner(net: Net) -> str | None:
            if dp is None:
                return None
            for link in dp.links:
                if link.peer_uid == me:
                    continue
                for mine in link.nets:
                    clash = mine == net if not net.prefixlen or not mine.prefixlen else (
                        mine.version == net.version and mine.overlaps(net))
                    if clash:
                        return link.peer_uid.hex()[:12]
            return None

        accepted, refused = decide(peer.offered_routes, self.route_policy(),
                                   is_exit=self.is_exit(peer), owner=owner)
        record_routes(peer, accepted, refused)
        return accepted

    def _maybe_request(self, peer: Peer, now: float) -> None:
        if not peer.wanted or not peer.may_request(now) or not self.connected:
            return
        if not self._req_bucket.take(now):
            self._count("con_req_rate_limited")
            peer.retry_at = now + 0.5
            return
        peer.enter(LinkState.REQUESTED, now)
        peer.attempts += 1
        self._spawn(self._request(peer, peer.attempt_id))
        self.node.notify("peer_state", self.peer_entry(peer))

    async def _request(self, peer: Peer, attempt: int) -> None:
        """Step 4: gather our candidates, then send con_req."""
        assert self.paths is not None and peer.uid is not None
        if peer.uid in self._relay_lost:
            if not await self.paths.turn_answers():
                self._attempt_failed(peer, attempt, "the TURN server does not answer "
                                     "(the link ran over its relay)")
                return
            self._relay_lost.discard(peer.uid)
        try:
            candidates = await self.paths.prepare(peer.uid, self.my_uid)
        except Exception as exc:
            self._attempt_failed(peer, attempt, f"gathering candidates failed: {exc}")
            return
        if peer.attempt_id != attempt or peer.state is not LinkState.REQUESTED:
            return
        msg = self._message("con_req", True if self.cfg.require_encryption else None,
                            candidates)
        self._sent[bare(peer.jid)] = signaled_view(msg)
        self._count("con_req_sent")
        self._send(peer.jid, msg)

    def _working(self, peer: Peer) -> bool:
        """The peer's link is up and carries traffic (not reported down)."""
        if peer.state is not LinkState.UP or peer.uid is None or self.node.dp is None:
            return False
        link = self.node.dp.link(bytes.fromhex(peer.uid))
        return link is not None and link.usable and not link.down

    def _end_beside(self, peer: Peer, why: str | None) -> None:
        """The attempt made beside the working link is over: ``why`` None, its link replaced
        the old one; else it failed and the working link simply stays."""
        assert peer.uid is not None
        self._beside.discard(peer.uid)
        if self.paths is not None:
            self._spawn(self.paths.end_aside(peer.uid, keep_new=why is None))
        now = self._now()
        if why is not None:
            if self.node.keying is not None:
                self.node.keying.stop_beside(bytes.fromhex(peer.uid))
            log.warning("new link to %s failed (%s); the working link stays", peer.jid, why,
                        extra=link_extra(peer.uid))
            peer.last_error = why
            self._count("beside_failed")
        peer.enter(LinkState.UP, now)
        peer.last_activity = now
        self.node.notify("peer_state", self.peer_entry(peer))

    def _attempt_failed(self, peer: Peer, attempt: int, why: str) -> None:
        if peer.attempt_id != attempt:
            return
        if peer.uid in self._beside:
            self._end_beside(peer, why)
            return
        log.warning("link set-up with %s failed: %s", peer.jid, why)
        peer.last_error = why
        self._count("setup_failed")
        if peer.uid is not None:
            self.node.remove_link(peer.uid)
            self._spawn(self._close_path(peer.uid))
        self._failed(peer)
        self.node.notify("peer_state", self.peer_entry(peer))

    def _failed(self, peer: Peer) -> None:
        """An attempt failed or a link was lost: back to idle with the peer's backoff, or soon
        (0.5-1.5 s, jittered) while a link lost recently is being made again."""
        now = self._now()
        peer.failed(now, random.random())
        lost = self._lost_at.get(peer.uid or "")
        if lost is not None and now - lost < RELINK_EAGER:
            peer.retry_at = now + random.uniform(0.5, 1.5)

    def _lost(self, peer: Peer, why: str) -> None:
        """A working link went away (its path or its keepalives): drop it, make it again."""
        uid = peer.uid
        if uid is not None:
            self._lost_at[uid] = self._now()
            if self.paths is not None and self.paths.kind(uid) == "relay":
                self._relay_lost.add(uid)
        self._drop_link(peer, why)
        self._failed(peer)

    async def _close_path(self, peer_uid: str) -> None:
        if self.paths is not None:
            await self.paths.close(peer_uid)

    def _send(self, jid: str, msg: SignalMessage) -> None:
        backend = self.backend
        if backend is None:
            return
        self.live_routes.told(jid, msg)
        self._spawn(backend.send(jid, msg))

    def _address_refused(self, peer: Peer, problem: str | None) -> bool:
        """A peer's announced overlay address that cannot be its (outside our prefix, ours,
        network/broadcast): refused like a duplicate, shown as its conflict."""
        if problem is None:
            return False
        if peer.conflict != problem:
            log.error("address of %s refused: %s", peer.jid, problem)
        peer.conflict = problem
        self._count("peer_address_refused")
        return True

    def _set_ip(self, peer: Peer, ip4: str) -> bool:
        # our own address is left to address_conflict ("duplicate overlay address")
        if ip4 != self.cfg.ip4 and self._address_refused(
                peer, peer_address_problem(ip4, self.cfg.ip4, self.cfg.ip4_mask)):
            return False
        conflict = self.peers.address_conflict(peer, ip4, self.cfg.ip4)
        if conflict is not None:
            if peer.conflict != conflict:
                log.error("%s (%s)", conflict, peer.jid)
                self.node.notify("con_stat", {"peer": peer.jid, "event": "duplicate_address",
                                              "error": conflict})
            peer.conflict = conflict
            self._count("duplicate_address")
            return False
        peer.conflict = None
        peer.ip4 = ip4
        return True

    def _check_peer_msg(self, jid: str, msg: SignalMessage) -> Peer | None:
        if self._claimed_elsewhere(jid, msg.uid):
            return None
        peer = self.peers.get(jid)
        if peer.uid is not None and peer.uid != msg.uid and peer.online:
            # a new identity on this account: the node was reinstalled or restarted fresh
            self._drop_link(peer, "peer identity changed", tell=False)
        peer.uid = msg.uid
        peer.online = True
        if msg.ip4 is None or not self._set_ip(peer, msg.ip4):
            return None
        if (msg.ip6 is not None and self.announced_ip6() is not None
                and not self._set_ip6(peer, msg.ip6)):
            return None
        return peer

    def _set_ip6(self, peer: Peer, ip6: str) -> bool:
        own6 = self.cfg.ip6
        if own6 is not None and ip6 != self.announced_ip6():
            iface = ipaddress.IPv6Interface(own6)
            if self._address_refused(peer, peer_address_problem(
                    ip6, str(iface.ip), iface.network.prefixlen)):
                return False
        conflict = self.peers.address6_conflict(peer, ip6, self.announced_ip6())
        if conflict is not None:
            if peer.conflict != conflict:
                log.error("%s (%s)", conflict, peer.jid)
                self.node.notify("con_stat", {"peer": peer.jid, "event": "duplicate_address",
                                              "error": conflict})
            peer.conflict = conflict
            self._count("duplicate_address")
            return False
        peer.ip6 = ip6
        return True

    def _on_con_req(self, jid: str, msg: SignalMessage) -> None:
        now = self._now()
        self._count("con_req_received")
        if self._on_hold(jid, msg.uid, now):
            self._count("con_req_auth_hold")
            return
        peer = self._check_peer_msg(jid, msg)
        if peer is None:
            self._count("con_req_refused")
            return
        if peer.state is LinkState.REQUESTED and wins_collision(self.my_uid, msg.uid):
            self._count("collision_won")
            return  # our request stands; the peer answers it
        if msg.uid in self._beside:
            self._count("con_req_while_beside")
            return  # one new link at a time; the one being proven answers for it
        if self._working(peer) and self.paths is not None and self.paths.set_aside(msg.uid):
            # the link works: it carries traffic until a new one proves the same UID
            self._beside.add(msg.uid)
            self._count("con_req_beside")
            log.info("%s asks for a new link; the working one stays until the new one is "
                     "proven", bare(jid), extra=link_extra(msg.uid))
        elif peer.state in (LinkState.UP, LinkState.LINKING) or (
                self.paths is not None and msg.uid in self.paths.connected):
            # the peer starts over (it restarted, or lost the link): so do we
            self._drop_link(peer, "peer asked for a new link")
        self.live_routes.offered(peer, msg)
        view = self._views[msg.uid] = self._their_view(msg, is_request=True)
        verdict = policy.decide(self._my_view(), view)
        self._begin_linking(peer, verdict, now)
        self._spawn(self._answer(peer, msg, verdict, peer.attempt_id))

    async def _answer(self, peer: Peer, msg: SignalMessage, verdict: policy.Verdict,
                      attempt: int) -> None:
        """Steps 5-6: gather, answer con_resp, then connect and create the link."""
        assert self.paths is not None
        try:
            candidates = await self.paths.prepare(msg.uid, self.my_uid)
            if peer.attempt_id != attempt:
                return
            resp = self._message("con_resp", verdict.encrypt, candidates)
            self._sent[bare(peer.jid)] = signaled_view(resp)
            self._send(peer.jid, resp)
            path, early = await self.paths.connect(msg.uid, self._capped(msg))
        except Exception as exc:
            self._attempt_failed(peer, attempt, f"ICE: {exc}")
            return
        self._finish_link(peer, msg, verdict, path, early, attempt)

    def _on_con_resp(self, jid: str, msg: SignalMessage) -> None:
        now = self._now()
        peer = self._check_peer_msg(jid, msg)
        if peer is None:
            return
        if peer.state is not LinkState.REQUESTED:
            self._count("unexpected_con_resp")
            return
        self.live_routes.offered(peer, msg)
        view = self._views[msg.uid] = self._their_view(msg, is_request=False)
        mine = policy.decide(self._my_view(), view)
        verdict = policy.reconcile(mine, msg.encrypt)
        if verdict is not mine:
            log.warning("security verdict disagreement with %s: mine %s, theirs %s -> encrypt",
                        jid, mine.encrypt, msg.encrypt)
        self._begin_linking(peer, verdict, now)
        self._spawn(self._complete(peer, msg, verdict, peer.attempt_id))

    async def _complete(self, peer: Peer, msg: SignalMessage, verdict: policy.Verdict,
                        attempt: int) -> None:
        """Step 7: connect to the answer's candidates and create the link."""
        assert self.paths is not None
        try:
            path, early = await self.paths.connect(msg.uid, self._capped(msg))
        except Exception as exc:
            self._attempt_failed(peer, attempt, f"ICE: {exc}")
            return
        self._finish_link(peer, msg, verdict, path, early, attempt)

    def _capped(self, msg: SignalMessage) -> list[str]:
        """The peer's candidates within the caps (``nat.params.cap_candidates``): one message
        cannot make this node check more than a few addresses."""
        kept, dropped = cap_candidates(msg.candidates)
        if dropped:
            self._count("candidates_capped")
            self.counters["candidates_dropped"] = (
                self.counters.get("candidates_dropped", 0) + dropped)
        return kept

    def _begin_linking(self, peer: Peer, verdict: policy.Verdict, now: float) -> None:
        peer.security = "dtls" if verdict.encrypt else "none"
        peer.security_reason = verdict.reason
        peer.enter(LinkState.LINKING, now)
        peer.last_activity = now
        self.node.notify("peer_state", self.peer_entry(peer))

    def _finish_link(self, peer: Peer, msg: SignalMessage, verdict: policy.Verdict,
                     path: LinkPath, early: list[bytes], attempt: int) -> None:
        """``create_link`` on the path ICE selected; the data plane keys it if encrypted."""
        if peer.attempt_id != attempt or peer.state is not LinkState.LINKING:
            self._spawn(self._close_path(msg.uid))
            return
        sent = self._sent.get(bare(peer.jid))
        if sent is None:
            self._attempt_failed(peer, attempt, "nothing was signaled to this peer")
            return
        local_ip, real_ip = self.link_addresses(peer, msg)
        nets = self.accept_routes(peer)
        ip6 = msg.ip6 if self.announced_ip6() is not None else None
        try:
            self.node.create_link_on_path(
                peer_uid=msg.uid, ip4=local_ip, path=path, fingerprint=msg.fingerprint,
                mac=msg.mac, encrypt=verdict.encrypt, reason=verdict.reason, real_ip4=real_ip,
                early=early, peer_trains=msg.offers(FEATURE_TRAINS), ip6=ip6, nets=nets,
                confirmation=self.confirmation(msg.uid, sent, signaled_view(msg),
                                               verdict.encrypt),
                beside=msg.uid in self._beside,
            )
        except (IpopError, LocalProtocolError, ValueError, OSError) as exc:
            self._attempt_failed(peer, attempt, f"create_link: {exc}")
            return
        if self.is_exit(peer) and self.node.dp is not None:
            self.node.dp.apply_routes(exit_via=bytes.fromhex(msg.uid))
        peer.last_activity = self._now()
        self.live_routes.linked(peer)

    def confirmation(self, peer_uid: str, mine: policy.SecurityView,
                     theirs: policy.SecurityView, encrypt: bool) -> Confirmation:
        """What the link's handshake confirms: both signaled views, by DTLS role, and the
        verdict."""
        me, them = bytes.fromhex(self.my_uid), bytes.fromhex(peer_uid)
        if is_client_for(me, them):
            return Confirmation(me, them, mine, theirs, encrypt)
        return Confirmation(them, me, theirs, mine, encrypt)

    def _on_stun(self, ev: Event) -> bool:
        data: bytes = ev.data["data"]
        if self.paths is None or not is_stun(data):
            return False
        return self.paths.feed(ev.data["sock"], data, ev.data["addr"], ev.data["channel"])

    def _path_changed(self, peer_uid: str, path: LinkPath) -> None:
        if self.node.dp is not None:
            self.node.dp.set_path(bytes.fromhex(peer_uid), path)

    def _ice_failed(self, peer_uid: str, why: str) -> None:
        peer = self.peers.find_uid(peer_uid)
        if peer is not None and peer.state is not LinkState.IDLE:
            self._lost(peer, f"path lost ({why})")

    def link_addresses(self, peer: Peer, msg: SignalMessage) -> tuple[str | None, str | None]:
        """(address this node routes to the peer, the peer's own address if it differs)."""
        return msg.ip4, None

    def _drop_link(self, peer: Peer, why: str, *, tell: bool = False) -> None:
        if peer.uid is not None:
            self._beside.discard(peer.uid)
            self.node.remove_link(peer.uid)
            self._spawn(self._close_path(peer.uid))
        if tell and peer.uid is not None and peer.online:
            self._send(peer.jid, SignalMessage(type="trim", uid=self.my_uid,
                                               overlay_id=self.overlay_id))
        log.info("link to %s removed: %s", peer.jid, why, extra=link_extra(peer.uid))
        peer.last_error = why
        peer.routes = []  # its routes went with its link
        peer.enter(LinkState.IDLE, self._now())
        peer.retry_at = self._now() + (0.5 if peer.online else 0)
        self.node.notify("con_stat", {"peer": peer.jid, "uid": peer.uid, "event": "removed",
                                      "why": why})

    # ---- data plane events
    def on_dataplane_event(self, ev: Event) -> bool:
        if ev.kind == "unknown_destination":
            dst: bytes = ev.data["dst"]
            if len(dst) == 4:
                peer = self.peers.find_ip(str(ipaddress.IPv4Address(dst)))
            elif len(dst) == 16 and self.announced_ip6() is not None:
                peer = self.peers.find_ip6(str(ipaddress.IPv6Address(dst)))
            else:
                return False
            if peer is not None and peer.online:
                peer.wanted = True
                peer.last_activity = self._now()
                self._maybe_request(peer, self._now())
            return False  # the node still notifies API subscribers
        if ev.kind == "link_down":
            peer = self.peers.find_uid(ev.data["peer_uid"].hex())
            if peer is not None and peer.state is not LinkState.IDLE:
                self._lost(peer, "keepalive timeout")
            return False
        return False

    def _on_link_event(self, peer_uid: str, event: str) -> None:
        """From the node: a link became usable (keyed) or failed its handshake."""
        peer = self.peers.find_uid(peer_uid)
        if peer is None:
            return
        now = self._now()
        if peer_uid in self._beside:
            if event == "replaced":
                self._end_beside(peer, None)
                self._on_link_event(peer_uid, "up")
            elif event == "beside_failed":
                reason = self.node.keying.beside_failure if self.node.keying else ""
                reason = reason or "handshake_error"
                for table, key in ((self.auth_by_jid, bare(peer.jid)),
                                   (self.auth_by_uid, peer_uid)):
                    table.setdefault(key, AuthRecord()).fail(reason, now)
                self._count(f"handshake_{reason}")
                self._end_beside(peer, f"handshake failed: {reason}")
            return  # the working link's own events wait until the new one settles
        if event == "up" and peer.state is not LinkState.UP:
            self._lost_at.pop(peer_uid, None)
            self._relay_lost.discard(peer_uid)
            peer.enter(LinkState.UP, now)
            peer.last_activity = now
            self.node.notify("peer_state", self.peer_entry(peer))
        elif event == "failed":
            reason = self._handshake_reason(peer_uid)
            for table, key in ((self.auth_by_jid, bare(peer.jid)), (self.auth_by_uid, peer_uid)):
                table.setdefault(key, AuthRecord()).fail(reason, now)
            self._count(f"handshake_{reason}")
            self._drop_link(peer, f"handshake failed: {reason}")
            peer.failed(now, random.random())

    def _handshake_reason(self, peer_uid: str) -> str:
        link = self.node.dp.link(bytes.fromhex(peer_uid)) if self.node.dp else None
        session = link.session if link is not None else None
        failure = getattr(session, "last_failure", None)
        return str(getattr(failure, "reason", "handshake_error"))

    # ---- live reload
    def reload(self, old: Config, new: Config, plan: Plan) -> list[str]:
        """Take the new config (node.reload checked it may change live); re-decide every link
        when our security view changed.  A link whose verdict flips is rebuilt: dropped, the
        peer told (``trim``), and a new con_req carries our new groups, so both ends decide
        again; a link whose verdict holds only takes the new reason.  Changed routing keys go
        to ``live_routes`` first (routes decided again, peers told).  Returns what it did."""
        self.cfg = new
        if self.paths is not None:
            self.paths.reconfigure(new)
        done: list[str] = []
        if plan.routing:  # routes decided again, linked peers told (controller/liveroutes.py)
            done += self.live_routes.reload(plan.changed)
        if not plan.security:
            return done
        mine = self._my_view()
        for peer in self.peers:
            if peer.uid is None or peer.state is LinkState.IDLE:
                continue
            theirs = self._views.get(peer.uid)
            if theirs is None:
                continue
            verdict = policy.decide(mine, theirs)
            encrypt_now = peer.security == "dtls"
            if verdict.encrypt != encrypt_now:
                self._drop_link(peer, f"security changed by reload: now {verdict.reason}",
                                tell=True)
                peer.retry_at = self._now()
                done.append(f"{peer.uid[:12]} rebuilt ({verdict.reason})")
            elif verdict.reason != peer.security_reason:
                peer.security_reason = verdict.reason
                dp = self.node.dp
                link = dp.set_security_reason(bytes.fromhex(peer.uid), verdict.reason) if (
                    dp is not None) else None
                if link is not None:
                    self.node.link_event(link.peer_uid, "re-decided")
                done.append(f"{peer.uid[:12]} re-decided ({verdict.reason})")
        return done

    def exit_peer_uid(self) -> bytes | None:
        """The linked peer ``exit_node`` names (node.py's reload sets the exit route by it)."""
        return self.live_routes.exit_peer_uid()

    # ---- periodic work
    def busy(self) -> bool:
        """A link is being set up or waits for a retry: tick every time, not once a second."""
        return any(p.state in (LinkState.REQUESTED, LinkState.LINKING)
                   or (p.state is LinkState.IDLE and p.wanted and p.online)
                   for p in self.peers)

    def tick(self, now: float) -> None:
        idle_limit = self.cfg.on_demand_inactive_timeout
        for peer in self.peers:
            if peer.timed_out(now) and peer.uid in self._beside:
                self._end_beside(peer, "the new link's set-up timed out")
            elif peer.timed_out(now):
                log.info("link set-up with %s timed out in state %s", peer.jid, peer.state.value)
                peer.last_error = f"set-up timed out in state {peer.state.value}"
                self._count("setup_timed_out")
                if peer.uid is not None:
                    self.node.remove_link(peer.uid)
                    self._spawn(self._close_path(peer.uid))  # its ICE agent and sockets
                self._failed(peer)
            if (peer.state is LinkState.LINKING and peer.uid is not None
                    and peer.uid not in self._beside and self.node.link_is_up(peer.uid)):
                self._on_link_event(peer.uid, "up")
            if peer.state is LinkState.UP and peer.uid is not None:
                activity = self.node.link_activity(peer.uid)
                if activity is not None and activity > peer.last_activity:
                    peer.last_activity = activity
                if self.cfg.on_demand_connection and now - peer.last_activity > idle_limit:
                    peer.wanted = False
                    self._drop_link(peer, f"idle for {idle_limit:g} s (on-demand)", tell=True)
                    self.node.notify("con_stat", {"peer": peer.jid, "event": "trimmed"})
            self._maybe_request(peer, now)

    # ---- diagnostics (``ipop ping``: ``ipop.api.ping``)
    def why_no_link(self, peer: Peer) -> tuple[str, str]:
        """Why ``peer`` has no usable link: a reason code and a sentence for people."""
        name = bare(peer.jid)
        if not self.connected:
            return "no_signaling", ("not connected to the XMPP server"
                                    f" ({self.signal_error or 'connecting'})")
        if peer.conflict is not None:
            return "refused", f"refused: {peer.conflict}"
        if not peer.online:
            return "peer_offline", f"{name} is offline (no presence from it)"
        last = peer.last_error or ""
        retry = "" if peer.state is LinkState.IDLE else f"; retrying ({peer.state.value})"
        if "handshake" in last or "keying" in last:
            return "keying_failed", f"keying failed: {last}{retry}"
        if "refus" in last or "policy" in last:
            return "refused", f"refused by policy: {last}{retry}"
        if peer.state in (LinkState.REQUESTED, LinkState.LINKING):
            tail = f"; the last attempt failed: {last}" if last else ""
            return "linking", (f"link to {name} being set up ({peer.state.value} for "
                               f"{self._now() - peer.since:.1f} s){tail}")
        if not peer.wanted and self.cfg.on_demand_connection:
            return "on_demand", (f"on-demand link to {name} not made yet: no traffic has needed "
                                 "it (--connect asks for one)")
        if last:
            return "failed", f"last set-up failed: {last}; retrying"
        return "no_link", f"no link to {name} yet"

    def want_link(self, peer: Peer) -> None:
        """Ask for a link to ``peer`` now (``ipop ping --connect``), as traffic would."""
        now = self._now()
        peer.wanted = True
        peer.last_activity = now
        if peer.state is LinkState.IDLE:
            peer.retry_at = min(peer.retry_at, now)
        self._maybe_request(peer, now)

    # ---- status
    def peer_entry(self, peer: Peer) -> dict[str, Any]:
        return {
            "uid": peer.uid, "jid": bare(peer.jid), "online": peer.online,
            "linked": peer.state is LinkState.UP, "overlay_ip": peer.ip4,
            "state": peer.state.value, "security": peer.security,
            "security_reason": peer.security_reason, "conflict": peer.conflict,
            "name": bare(peer.jid), "overlay_ip6": peer.ip6, "routes": list(peer.routes),
            "routes_refused": list(peer.routes_refused),
            "auth": self._auth_entry(peer),
        }

    def _auth_entry(self, peer: Peer) -> dict[str, Any] | None:
        """Failed handshakes of this peer's account and UID (None: none)."""
        recs = [r for r in (self.auth_by_jid.get(bare(peer.jid)),
                            self.auth_by_uid.get(peer.uid or "")) if r is not None]
        if not recs:
            return None
        now = self._now()
        worst = max(recs, key=lambda r: r.count)
        return {"failures": worst.count, "reason": worst.reason,
                "hold_s": round(max(0.0, max(r.until for r in recs) - now), 1)}

    def peers_status(self) -> list[dict[str, Any]]:
        return [self.peer_entry(p) for p in self.peers]

    def node_status(self) -> dict[str, Any]:
        drops = dict(self.backend.drops) if self.backend is not None else {}
        refused = self.backend.last_refused if self.backend is not None else None
        return {"xmpp": {"jid": self.cfg.xmpp_username, "connected": self.connected,
                         "error": self.signal_error, "drops": drops, "last_refused": refused,
                         "counters": dict(self.counters)},
                "controller": self.name}


def signaled_view(msg: SignalMessage) -> policy.SecurityView:
    """A message's verdict inputs exactly as signaled, for the handshake to confirm: its groups,
    its ``sec`` (absent: true, as ``_their_view`` reads it) and its ``encrypt`` flag (in
    ``require_encryption``; absent reads as false, which means the same to the verdict)."""
    return policy.SecurityView(
        sec=True if msg.sec is None else msg.sec,
        security_groups=None if msg.security_groups is None else frozenset(msg.security_groups),
        require_encryption=bool(msg.encrypt),
    )
