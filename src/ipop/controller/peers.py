"""What a controller knows of its peers, and each link's life cycle, as pure data and rules.

A peer's link moves through these states (time comes in as an argument; nothing here does I/O)::

                 con_req sent                con_resp received / create_link
    idle ───────────────────────► requested ─────────────────────────────────┐
     ▲  │ con_req received: create_link, send con_resp                        ▼
     │  └───────────────────────────────────────────────────────────────► linking
     │                                                                        │ data plane: keyed
     │          trimmed (idle), peer offline, link down, request timed out    ▼
     └──────────────────────────────────────────────────────────────────────  up

Pacing: when a peer comes online in proactive mode, the lower UID of the pair sends con_req
within ``PACE_LOW`` seconds and the higher UID holds back for ``PACE_HIGH`` (it asks only if no
con_req came), so a pair makes one request, not two, and a node that sees 31 peers at login
spreads its requests.  Collisions: when both ends send con_req at once anyway, the lower UID's
request wins; the higher UID drops its own request and answers the lower's.  A failed attempt is
retried after a backoff that doubles up to ``RETRY_MAX``, each wait jittered by +-50 % so that
the peers of a failed node do not come back in step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

REQUEST_TIMEOUT = 6.0  # seconds a con_req waits for its con_resp
LINKING_TIMEOUT = 12.0  # seconds from create_link to an up link (handshake, connectivity)
RETRY_MIN = 1.0
RETRY_MAX = 30.0
PACE_LOW = (0.0, 0.2)  # seconds (from, to) before the lower UID's first con_req
PACE_HIGH = (1.0, 1.5)  # seconds (from, to) before the higher UID's, if none came meanwhile


class LinkState(enum.Enum):
    IDLE = "idle"
    REQUESTED = "requested"
    LINKING = "linking"
    UP = "up"


@dataclass
class Peer:
    """A node we know through signaling."""

    jid: str
    uid: str | None = None
    ip4: str | None = None  # the peer's overlay address as this node routes it
    ip6: str | None = None  # the peer's overlay IPv6 address (GroupVPN)
    real_ip4: str | None = None  # SocialVPN: the address the peer gives itself
    online: bool = False
    state: LinkState = LinkState.IDLE
    since: float = 0.0  # when ``state`` was entered
    retry_at: float = 0.0  # no new con_req before this time
    backoff: float = RETRY_MIN
    last_activity: float = 0.0  # last time the link carried traffic (on-demand trimming)
    wanted: bool = False  # a link is wanted (proactive, or on-demand traffic waiting)
    security: str | None = None
    security_reason: str | None = None
    conflict: str | None = None  # e.g. a duplicate overlay address
    attempts: int = 0
    attempt_id: int = 0  # bumped by every new set-up attempt; stale tasks check it
    notes: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)  # its advertised routes we installed
    routes_refused: list[dict[str, str]] = field(default_factory=list)  # prefix, reason
    # live routes (``ipop.controller.liveroutes``): what the peer offers, what it was told
    offered_routes: tuple[str, ...] = ()  # its advertise_routes, from con_req/con_resp/update
    fingerprint: str | None = None  # from its last con_req/con_resp: an update must match it
    route_updates: bool = False  # it offered the "route-update" feature
    routes_told: tuple[str, ...] | None = None  # the routes our last message to it carried
    last_error: str | None = None  # why the last set-up failed or the link went (``ipop ping``)

    def enter(self, state: LinkState, now: float) -> None:
        if state in (LinkState.REQUESTED, LinkState.IDLE) or (
                state is LinkState.LINKING and self.state is not LinkState.REQUESTED):
            self.attempt_id += 1
        self.state = state
        self.since = now
        if state is LinkState.UP:
            self.backoff = RETRY_MIN
            self.attempts = 0

    def failed(self, now: float, jitter: float = 0.5) -> None:
        """A set-up attempt failed: back to idle, retry later with a growing backoff.
        ``jitter`` in [0, 1) scales this wait by 0.5 + jitter (0.5: the backoff itself)."""
        self.attempt_id += 1
        self.state = LinkState.IDLE
        self.since = now
        self.retry_at = now + self.backoff * (0.5 + min(max(jitter, 0.0), 1.0))
        self.backoff = min(RETRY_MAX, self.backoff * 2)

    def may_request(self, now: float) -> bool:
        return (
            self.online and self.uid is not None and self.state is LinkState.IDLE
            and now >= self.retry_at and self.conflict is None
        )

    def timed_out(self, now: float) -> bool:
        if self.state is LinkState.REQUESTED:
            return now - self.since > REQUEST_TIMEOUT
        if self.state is LinkState.LINKING:
            return now - self.since > LINKING_TIMEOUT
        return False


def first_request_delay(my_uid: str, their_uid: str, jitter: float) -> float:
    """Seconds to wait before the first con_req to a peer that just came online (proactive
    mode); ``jitter`` in [0, 1) picks the point within ``PACE_LOW`` or ``PACE_HIGH``."""
    low, high = PACE_LOW if my_uid < their_uid else PACE_HIGH
    return low + (high - low) * min(max(jitter, 0.0), 1.0)


def wins_collision(my_uid: str, their_uid: str) -> bool:
    """True when our own outstanding con_req should stand against theirs."""
    return my_uid < their_uid


def bare(jid: str) -> str:
    return jid.split("/", 1)[0]


class PeerTable:
    """Peers by bare JID, with indexes by UID and overlay address."""

    def __init__(self) -> None:
        self.by_jid: dict[str, Peer] = {}

    def get(self, jid: str) -> Peer:
        key = bare(jid)
        peer = self.by_jid.get(key)
        if peer is None:
            peer = self.by_jid[key] = Peer(jid=jid)
        else:
            peer.jid = jid if "/" in jid else peer.jid
        return peer

    def find_uid(self, uid: str) -> Peer | None:
        for p in self.by_jid.values():
            if p.uid == uid:
                return p
        return None

    def find_ip(self, ip4: str) -> Peer | None:
        for p in self.by_jid.values():
            if p.ip4 == ip4:
                return p
        return None

    def find_ip6(self, ip6: str) -> Peer | None:
        for p in self.by_jid.values():
            if p.ip6 == ip6:
                return p
        return None

    def remove(self, jid: str) -> Peer | None:
        return self.by_jid.pop(bare(jid), None)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self.by_jid.values()))

    def address_conflict(self, peer: Peer, ip4: str, my_ip4: str) -> str | None:
        """Why ``peer`` may not use ``ip4``: it is ours, or another online peer holds it."""
        if ip4 == my_ip4:
            return f"duplicate overlay address {ip4}: it is this node's own"
        other = self.find_ip(ip4)
        if other is not None and other is not peer and other.online and other.uid != peer.uid:
            return f"duplicate overlay address {ip4}: {other.jid} holds it"
        return None

    def address6_conflict(self, peer: Peer, ip6: str, my_ip6: str | None) -> str | None:
        """Why ``peer`` may not use the IPv6 address ``ip6`` (as ``address_conflict``)."""
        if ip6 == my_ip6:
            return f"duplicate overlay address {ip6}: it is this node's own"
        other = self.find_ip6(ip6)
        if other is not None and other is not peer and other.online and other.uid != peer.uid:
            return f"duplicate overlay address {ip6}: {other.jid} holds it"
        return None
