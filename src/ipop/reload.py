"""Live reload, decided as pure data: what changed between two configs, and may it apply live.

``plan(old, new)`` compares two validated configs key by key (JSON spelling) and returns a
``Plan``: the keys that changed, and the first key that cannot change while the node runs
(``refused``).  A plan with a refused key is applied not at all: the node keeps running as it
was.  ``Node.reload`` (node.py) carries a plan out; a config that does not validate never gets
this far (``config.load`` raises and names the key).

What can change live, and what applying it means:

    key                                           applied by
    tincan_logging, controller_logging, log_format  re-configuring the log handler and levels
    peers                                         static links added, removed, or rebuilt (changed);
                                                  one whose allowed_ips alone changed keeps its
                                                  link: its prefixes (routes, sources) follow
    sec, require_encryption, security_groups      links re-decided; a changed verdict rebuilds the
                                                  link (static: here; signaled: a new con_req)
    stun, turn                                    ICE of links made from now on
    on-demand_connection, on-demand_inactive_timeout, ondemand_queue, keepalive_seconds,
    rekey_seconds                                 read from the new config from the next tick/link
    advertise_routes, accept_routes, exit_node,   every linked peer's routes decided again, a
    snat_routes                                   route update sent to linked peers (controller/
                                                  liveroutes.py); forwarding, SNAT and the exit
                                                  route set again (ipop/routing.py)
    stat_report (ignored anyway)

Every other key (``ip4``, ``ip6``, ``interface``, ``switchmode``, ``controller``, the XMPP account,
``state_dir``, ...) needs a restart.  Keys added later default to *restart* until they are
listed in ``LIVE``: a new key is never applied half-way by accident.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ipop.config import Config

LIVE = frozenset({
    "tincan_logging", "controller_logging", "log_format",
    "peers",
    "sec", "require_encryption", "security_groups",
    "stun", "turn",
    "on-demand_connection", "on-demand_inactive_timeout", "ondemand_queue",
    "keepalive_seconds", "rekey_seconds",
    "advertise_routes", "accept_routes", "exit_node", "snat_routes",
})
SECURITY_KEYS = frozenset({"sec", "require_encryption", "security_groups"})
LOG_KEYS = frozenset({"tincan_logging", "controller_logging", "log_format"})
ROUTING_KEYS = frozenset({"advertise_routes", "accept_routes", "exit_node", "snat_routes"})


@dataclass
class Plan:
    changed: list[str] = field(default_factory=list)  # JSON keys, in the config's field order
    refused: str | None = None  # the first changed key that needs a restart

    @property
    def security(self) -> bool:
        return bool(SECURITY_KEYS.intersection(self.changed))

    @property
    def logging(self) -> bool:
        return bool(LOG_KEYS.intersection(self.changed))

    @property
    def routing(self) -> bool:
        return bool(ROUTING_KEYS.intersection(self.changed))


def _dump(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(by_alias=True, mode="json")


def plan(old: Config, new: Config) -> Plan:
    a, b = _dump(old), _dump(new)
    p = Plan()
    for key in a:
        if a[key] != b.get(key):
            p.changed.append(key)
            if key not in LIVE and p.refused is None:
                p.refused = key
    return p


@dataclass(frozen=True)
class PeerChanges:
    """Static peers by UID: the ones to add, remove, rebuild (a field other than allowed_ips
    changed), and those whose ``allowed_ips`` alone changed (``nets``: the link stays, its
    prefixes follow)."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    nets: tuple[str, ...] = ()


def peer_changes(old: Config, new: Config) -> PeerChanges:
    before = {p.uid: p for p in old.peers}
    after = {p.uid: p for p in new.peers}
    differ = [u for u in after if u in before and after[u] != before[u]]
    nets_only = [u for u in differ if after[u].model_copy(
        update={"allowed_ips": before[u].allowed_ips}) == before[u]]
    return PeerChanges(
        added=tuple(u for u in after if u not in before),
        removed=tuple(u for u in before if u not in after),
        changed=tuple(u for u in differ if u not in nets_only),
        nets=tuple(nets_only),
    )


def route_delta(before: Iterable[object], after: Iterable[object]) -> str:
    """What changed between two sets of prefixes, for people: ``+added -removed`` (each in
    the order given), or ``""`` when nothing did."""
    old = [str(n) for n in before]
    new = [str(n) for n in after]
    parts = [f"+{n}" for n in new if n not in old] + [f"-{n}" for n in old if n not in new]
    return " ".join(parts)
