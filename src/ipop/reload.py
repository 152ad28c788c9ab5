"""Live reload, decided as pure data: what changed between two configs, and may it apply live.

``plan(old, new)`` compares two validated configs key by key (JSON spelling) and returns a
``Plan``: the keys that changed, and the first key that cannot change while the node runs
(``refused``).  A plan with a refused key is applied not at all: the node keeps running as it
was.  ``Node.reload`` (node.py) carries a plan out; a config that does not validate never gets
this far (``config.load`` raises and names the key).

What can change live, and what applying it means:

    key                                           applied by
    tincan_logging, controller_logging, log_format  re-configuring the log handler and levels
    peers                                         static links added, removed, or rebuilt (changed)
    sec, require_encryption, security_groups      links re-decided; a changed verdict rebuilds the
                                                  link (static: here; signaled: a new con_req)
    stun, turn                                    ICE of links made from now on
    on-demand_connection, on-demand_inactive_timeout, ondemand_queue, keepalive_seconds,
    rekey_seconds                                 read from the new config from the next tick/link
    stat_report (ignored anyway)

Every other key (``ip4``, ``ip6``, ``interface``, ``switchmode``, ``controller``, the XMPP account,
``state_dir``, ...) needs a restart.  Keys added later default to *restart* until they are
listed in ``LIVE``: a new key is never applied half-way by accident.
"""

from __future__ import annotations

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
})
SECURITY_KEYS = frozenset({"sec", "require_encryption", "security_groups"})
LOG_KEYS = frozenset({"tincan_logging", "controller_logging", "log_format"})


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
    """Static peers by UID: the ones to add, remove, and rebuild (any field changed)."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]


def peer_changes(old: Config, new: Config) -> PeerChanges:
    before = {p.uid: p for p in old.peers}
    after = {p.uid: p for p in new.peers}
    return PeerChanges(
        added=tuple(u for u in after if u not in before),
        removed=tuple(u for u in before if u not in after),
        changed=tuple(u for u in after if u in before and after[u] != before[u]),
    )
