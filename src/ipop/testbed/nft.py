"""nftables rulesets the test bed loads: NAT boxes and random packet loss.

Pure text builders (no I/O): ``netns`` feeds their output to ``nft -f -`` inside a namespace.
Each builder returns a whole transaction that first deletes its own table (creating it empty
first so the delete never fails), so loading it again replaces the old rules atomically.

NAT kinds (Linux conntrack filtering is always address-and-port dependent):

* ``cone``: ``masquerade``.  Source ports are kept when free, so one inside socket gets the same
  public port for every destination (endpoint-independent mapping): a port-restricted cone NAT.
  Hole punching works through it.
* ``symmetric``: ``masquerade random``.  The public port is a keyed hash of the flow, so each
  destination sees a different port (endpoint-dependent mapping): needs a TURN relay.

Both NATs drop unsolicited inbound packets on the input and forward hooks and accept only
established/related ones (REAL-PARTS.md: an accepted early inbound probe would create a conntrack
entry that steals the port the inside host's later mapping needs, and hole punching fails).

Loss uses ``numgen random mod 10000 < N`` (netem does not exist on these kernels), so a loss
percentage has a resolution of 0.01 %.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from ipop.errors import ConfigError

NatKind = Literal["cone", "symmetric"]

NAT_TABLE = "ipop_nat"
LOSS_TABLE = "ipop_loss"

_MASQUERADE: dict[str, str] = {"cone": "masquerade", "symmetric": "masquerade random"}


def _replace_table(family: str, table: str) -> list[str]:
    return [f"table {family} {table}", f"delete table {family} {table}"]


def nat_ruleset(kind: NatKind, inside_dev: str, outside_dev: str) -> str:
    """The NAT box's ruleset: masquerade out of ``outside_dev``, stateful drop of inbound."""
    if kind not in _MASQUERADE:
        raise ConfigError("kind", f"unknown NAT kind {kind!r}; use 'cone' or 'symmetric'")
    lines = [
        *_replace_table("ip", NAT_TABLE),
        f"table ip {NAT_TABLE} {{",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    oifname "{outside_dev}" {_MASQUERADE[kind]}',
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy drop;",
        "    ct state established,related accept",
        f'    iifname "{inside_dev}" oifname "{outside_dev}" accept',
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy drop;",
        "    ct state established,related accept",
        '    iifname "lo" accept',
        f'    iifname "{inside_dev}" accept',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _threshold(pct: float) -> int:
    if not 0.0 <= pct <= 100.0:
        raise ConfigError("loss_pct", f"{pct} is outside 0..100")
    return round(pct * 100)


def loss_ruleset(ingress_pct: float, egress_pct: Mapping[str, float]) -> str:
    """Random drop of ``ingress_pct`` % of IP packets arriving on any interface but ``lo``, and
    of ``egress_pct[dev]`` % of IP packets leaving through ``dev``.  All zero: no table at all."""
    ingress = _threshold(ingress_pct)
    egress = {dev: _threshold(pct) for dev, pct in sorted(egress_pct.items())}
    egress = {dev: n for dev, n in egress.items() if n > 0}
    lines = _replace_table("inet", LOSS_TABLE)
    if ingress == 0 and not egress:
        return "\n".join(lines) + "\n"
    lines.append(f"table inet {LOSS_TABLE} {{")
    if ingress:
        lines += [
            "  chain ingress_loss {",
            "    type filter hook prerouting priority -300; policy accept;",
            f'    iifname != "lo" numgen random mod 10000 < {ingress} drop',
            "  }",
        ]
    if egress:
        lines += [
            "  chain egress_loss {",
            "    type filter hook postrouting priority 300; policy accept;",
        ]
        lines += [
            f'    oifname "{dev}" numgen random mod 10000 < {n} drop' for dev, n in egress.items()
        ]
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"
