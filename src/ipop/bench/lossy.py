"""Random underlay loss for the loss cases: two models, neither perfect on a veth pair.

``testbed`` (default): ``Testbed.set_loss(link, pct)``, the nftables ``numgen`` drop at each
end's egress that the issue names.  At that hook a packet is still the sender's super-packet
(a TSO/GSO skb or a UDP GSO train; measured here, about 60 KB per "packet" for iperf3 TCP on
the veth), so a drop takes out a whole burst of wire datagrams: senders that batch (the kernel's
TCP on the direct path, ipop's GSO trains) see rarer, burstier loss than per-packet senders
(wireguard-go, tinc).  A drop at egress also fails the sender's ``sendmsg`` with EPERM, which
ipop counts as ``send_error`` drops and no real network does.

``datagram``: per wire datagram.  On both ends of the veth TSO, GSO and UDP segmentation
offload are turned off for the case, so the sending kernel segments before the veth, and an
nftables table of ours (``ipop_bench_loss``) drops ``pct`` % of the packets arriving on each
veth end, at prerouting (each direction independently).  The price: the receiving side then
gets no GRO either (a veth coalesces nothing it is handed one datagram at a time), so a
receiver that relies on UDP GRO runs its per-datagram path even at 0 % loss.  Measured here
(2 cores, busy): ipop plain 1262 -> 125 Mbit/s with offloads off and no loss at all, and the
same through a forwarding namespace with GRO on at the receiver.  A diagnostic of the
per-datagram path, not a fair loss comparison.  Offload flags are restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

from ipop.errors import EnvironmentFault
from ipop.testbed.netns import Host, Link, Testbed
from ipop.testbed.proc import cmd, tool

LossModel = Literal["datagram", "testbed"]
TABLE = "ipop_bench_loss"
_FEATURES = {  # ethtool -K name: the ethtool -k line it shows up as
    "tso": "tcp-segmentation-offload",
    "gso": "generic-segmentation-offload",
    "tx-udp-segmentation": "tx-udp-segmentation",
}


def available() -> str | None:
    """Why the ``datagram`` model cannot run here, or None."""
    try:
        tool("ethtool")
    except EnvironmentFault as e:
        return str(e)
    return None


def _features(host: Host, dev: str) -> dict[str, str]:
    out = cmd(["ip", "netns", "exec", host.ns, "ethtool", "-k", dev]).stdout
    shown = {}
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        shown[key] = value.strip().split(" ")[0]
    return {name: shown[line] for name, line in _FEATURES.items() if shown.get(line) in ("on",
                                                                                            "off")}


def _set_features(host: Host, dev: str, values: dict[str, str]) -> None:
    if values:
        args = [tok for name, value in values.items() for tok in (name, value)]
        cmd(["ip", "netns", "exec", host.ns, "ethtool", "-K", dev, *args])


def _ruleset(dev: str, pct: float) -> str:
    threshold = round(pct * 100)  # per 10000
    return "\n".join([
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "  chain ingress_loss {",
        "    type filter hook prerouting priority -300; policy accept;",
        f'    iifname "{dev}" numgen random mod 10000 < {threshold} drop',
        "  }",
        "}",
    ]) + "\n"


def _clear(host: Host) -> None:
    cmd(["ip", "netns", "exec", host.ns, "nft", "-f", "-"],
        input=f"table inet {TABLE}\ndelete table inet {TABLE}\n", check=False)


@contextlib.contextmanager
def underlay_loss(testbed: Testbed, link: Link, pct: float,
                  model: LossModel = "testbed") -> Iterator[None]:
    """``pct`` % random loss on ``link`` in each direction for the duration of the block."""
    if model == "testbed":
        testbed.set_loss(link, pct)
        try:
            yield
        finally:
            testbed.set_loss(link, 0)
        return
    ends = [(link.a, link.a_dev), (link.b, link.b_dev)]
    saved: list[tuple[Host, str, dict[str, str]]] = []
    try:
        for host, dev in ends:
            before = _features(host, dev)
            saved.append((host, dev, before))
            _set_features(host, dev, {name: "off" for name in before})
        for host, dev in ends:
            cmd(["ip", "netns", "exec", host.ns, "nft", "-f", "-"], input=_ruleset(dev, pct))
        yield
    finally:
        for host, _dev in ends:
            _clear(host)
        for host, dev, before in saved:
            try:
                _set_features(host, dev, before)
            except EnvironmentFault:
                pass
