"""Live routes for a signaling controller: route updates sent to and taken from linked peers,
and every linked peer's routes decided again when a reload changes the routing keys.

Sending (``reload``, ``linked``).  When a reload changes ``advertise_routes``, each peer with a
link that offered the ``"route-update"`` feature gets one con_resp with ``update: true`` and the
whole new list (``ipop.wire.signal``).  A peer whose link is still being set up gets it once the
link exists, when what our con_req/con_resp told it differs.  A peer that did not offer the
feature (an older version) keeps our old routes until its link is made again; the log says so.

Receiving (``on_update``).  Taken only from the peer of a link (linking or up) with the UID and
fingerprint of its con_req/con_resp, at most ``UPDATE_RATE`` a second over all peers.  The new
list replaces what the peer offered; the ``accept_routes`` policy runs on it, and the link's
prefixes (kernel routes and allowed inner sources) follow through ``DataPlane.set_link_nets``.
A refused update is counted (``route_update_refused``) and logged at a bounded rate; the link
stays as it was.

Re-deciding (``redecide``: ``accept_routes``, ``exit_node`` or ``advertise_routes`` changed).
The policy runs again over every linked peer (``ipop.controller.routes.redecide``: a prefix
another peer kept stays with it, one that moved is free); the prefixes that leave a link leave
first, then each link gets its new set, and each peer's status its refusals.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from ipop.controller.peers import LinkState, Peer, bare
from ipop.controller.routes import Offer, redecide
from ipop.ratelimit import TokenBucket
from ipop.reload import route_delta
from ipop.signal.base import LogLimiter
from ipop.wire.prefixes import Net
from ipop.wire.signal import FEATURE_ROUTE_UPDATE, SignalMessage

if TYPE_CHECKING:
    from ipop.controller.groupvpn import GroupVPN

log = logging.getLogger("ipop.controller")

UPDATE_RATE = 5.0  # route updates taken a second, at most (all peers together)
UPDATE_BURST = 20.0
REDECIDE_KEYS = frozenset({"advertise_routes", "accept_routes", "exit_node"})


class LiveRoutes:
    """The live-routes share of one controller (``GroupVPN.live_routes``); it works on the
    controller's peer table and its message helpers."""

    def __init__(self, gv: GroupVPN) -> None:
        self.gv = gv
        self._bucket = TokenBucket(UPDATE_RATE, UPDATE_BURST)
        self._log = LogLimiter(1.0)

    # ---- what peers offer, what they were told
    @staticmethod
    def offered(peer: Peer, msg: SignalMessage) -> None:
        """A con_req/con_resp that sets up a link: remember its routes, fingerprint, and
        whether the peer takes route updates."""
        peer.offered_routes = msg.routes or ()
        peer.fingerprint = msg.fingerprint
        peer.route_updates = msg.offers(FEATURE_ROUTE_UPDATE)

    def told(self, jid: str, msg: SignalMessage) -> None:
        """A message leaves for ``jid``: remember the routes it carries (trim carries none)."""
        peer = self.gv.peers.by_jid.get(bare(jid))
        if peer is not None and msg.type != "trim":
            peer.routes_told = msg.routes or ()

    def _advertised(self) -> tuple[str, ...]:
        return self.gv.advertised_routes() or ()

    def _link_nets(self, peer: Peer) -> tuple[Net, ...] | None:
        dp = self.gv.node.dp
        link = dp.link(bytes.fromhex(peer.uid)) if dp is not None and peer.uid else None
        return None if link is None else link.nets

    # ---- sending
    def _send_update(self, peer: Peer) -> None:
        msg = dataclasses.replace(self.gv._message("con_resp", None),
                                  routes=self._advertised(), update=True)
        self.gv._count("route_update_sent")
        self.gv._send(peer.jid, msg)

    def tell_peers(self) -> list[str]:
        """``advertise_routes`` changed: send the new list to every linked peer that takes it."""
        done: list[str] = []
        routes = self._advertised()
        for peer in self.gv.peers:
            if peer.uid is None or peer.state is LinkState.IDLE or peer.routes_told == routes:
                continue
            if self._link_nets(peer) is None:
                continue  # told once its link exists (``linked``)
            if not peer.route_updates:
                log.warning("peer %s takes no route updates (an older version): it keeps this "
                            "node's old routes until its link is made again", peer.jid)
                done.append(f"{peer.uid[:12]} not told the new routes (no route-update)")
                continue
            self._send_update(peer)
            done.append(f"{peer.uid[:12]} told the new routes")
        return done

    def linked(self, peer: Peer) -> None:
        """A link to ``peer`` exists now: if a reload changed our routes after our con_req or
        con_resp left, tell the peer."""
        if (peer.route_updates and peer.routes_told is not None
                and peer.routes_told != self._advertised()):
            self._send_update(peer)

    # ---- receiving
    def on_update(self, jid: str, msg: SignalMessage) -> None:
        gv = self.gv
        now = time.monotonic()
        peer = gv.peers.by_jid.get(bare(jid))
        why = None
        if peer is None or peer.uid != msg.uid:
            why = "not from the peer of a link"
        elif peer.state not in (LinkState.LINKING, LinkState.UP):
            why = "no link to this peer"
        elif peer.fingerprint != msg.fingerprint:
            why = "its fingerprint is not the one its link was made with"
        elif not self._bucket.take(now):
            why = "too many route updates"
        if why is not None or peer is None:
            gv._count("route_update_refused")
            if self._log.allow(bare(jid), now):
                log.warning("route update from %s refused: %s", jid, why)
            return
        gv._count("route_update_received")
        routes = msg.routes or ()
        if routes == peer.offered_routes:
            return
        peer.offered_routes = routes
        log.info("peer %s now advertises %s", peer.jid, ", ".join(routes) or "no routes")
        change = self.apply(peer)
        if change:
            log.info("routes through %s: %s", peer.jid, change)
        gv.node.notify("peer_state", gv.peer_entry(peer))

    def apply(self, peer: Peer) -> str:
        """Run the policy on what ``peer`` offers and give its link the result (when the link
        exists: else ``_finish_link`` will); returns the change, ``+added -removed``."""
        dp = self.gv.node.dp
        before = self._link_nets(peer)
        if dp is None or before is None or peer.uid is None:
            return ""
        nets = self.gv.accept_routes(peer)
        uid = bytes.fromhex(peer.uid)
        if set(nets) != set(before):
            dp.set_link_nets(uid, nets)
        if self.gv.is_exit(peer) and dp.exit_via != uid:
            dp.set_exit(uid)  # the default route it may carry now goes through it
        return route_delta(before, nets)

    # ---- reload
    def reload(self, changed: list[str]) -> list[str]:
        """The routing keys in ``changed`` changed (the controller has the new config)."""
        done: list[str] = []
        if REDECIDE_KEYS.intersection(changed):
            done += self.redecide()
        if "advertise_routes" in changed:
            done += self.tell_peers()
        return done

    def redecide(self) -> list[str]:
        """The policy changed: every linked peer's routes decided again (``routes.redecide``),
        its link given the result, its status the refusals."""
        gv = self.gv
        dp = gv.node.dp
        gv._route_policy = None  # its own networks (advertise_routes) and accept_routes
        if dp is None:
            return []
        peers = {p.uid: p for p in gv.peers if p.uid is not None}
        offers: list[Offer] = []
        fixed: dict[str, tuple[Net, ...]] = {}
        for link in dp.links:
            peer = peers.get(link.peer_uid.hex())
            if peer is None:
                fixed[link.peer_uid.hex()] = link.nets  # a static link: its allowed_ips
            else:
                offers.append(Offer(link.peer_uid.hex(), peer.offered_routes, link.nets,
                                    gv.is_exit(peer)))
        result = redecide(offers, gv.route_policy(), fixed)
        done: list[str] = []
        for o in offers:  # what leaves first, so what moves is free when it arrives
            kept = tuple(n for n in o.carried if n in result[o.name][0])
            if kept != o.carried:
                dp.set_link_nets(bytes.fromhex(o.name), kept)
        for o in offers:
            accepted, refused = result[o.name]
            peer = peers[o.name]
            record_routes(peer, accepted, refused)
            change = route_delta(o.carried, accepted)
            if set(accepted) != set(o.carried):
                dp.set_link_nets(bytes.fromhex(o.name), accepted)
            if change:
                done.append(f"{o.name[:12]} routes {change}")
                log.info("routes through %s: %s (reload)", peer.jid, change)
            gv.node.notify("peer_state", gv.peer_entry(peer))
        return done

    def exit_peer_uid(self) -> bytes | None:
        """The UID of the linked peer ``exit_node`` names, if any."""
        for peer in self.gv.peers:
            if peer.uid is not None and self.gv.is_exit(peer) and self._link_nets(peer) is not None:
                return bytes.fromhex(peer.uid)
        return None


def record_routes(peer: Peer, accepted: tuple[Net, ...], refused: list[tuple[str, str]]) -> None:
    """The peer's status: its installed routes, the refused ones and why (logged once per
    change).  Both the first decision (``GroupVPN.accept_routes``) and a re-decision use it."""
    entries = [{"prefix": p, "reason": r} for p, r in refused]
    if entries != peer.routes_refused:
        for p, r in refused:
            log.warning("route %s from %s refused: %s", p, peer.jid, r)
    peer.routes = [str(n) for n in accepted]
    peer.routes_refused = entries
