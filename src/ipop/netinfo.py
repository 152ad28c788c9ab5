"""The underlay route's MTU, as wg-quick finds it: the default overlay MTU derives from it.

``route_mtu(dests)`` asks the kernel (netlink, ``RTM_GETROUTE``: a lookup, nothing is sent) for
the route to each destination, takes the route's own ``mtu`` metric or else its device's MTU,
and returns the largest, like ``wg-quick`` does for its endpoints; with no usable destination it
uses the device of the default route.  ``overlay_mtu`` subtracts what every overlay datagram
carries on top of the inner packet (``config.DEFAULT_MTU_TUN`` is that for a 1500-byte underlay).
"""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass

from ipop.config import DEFAULT_MTU_TAP, DEFAULT_MTU_TUN, Config, parse_endpoint

OVERHEAD_TUN = 1500 - DEFAULT_MTU_TUN  # 126: IPv6 + UDP + ChannelData + frame + AEAD + reserve
OVERHEAD_TAP = 1500 - DEFAULT_MTU_TAP  # 140: and the Ethernet header inside
MIN_MTU = 576
MAX_MTU = 9000


@dataclass(frozen=True)
class UnderlayMtu:
    mtu: int
    dev: str
    dest: str | None  # the destination whose route gave it; None: the default route


def _lookup(dests: list[str]) -> UnderlayMtu | None:
    from pyroute2 import IPRoute  # heavy: imported when needed

    best: UnderlayMtu | None = None
    with IPRoute() as ipr:
        found: list[tuple[object, str | None]] = []
        for ip in dests:
            try:
                found.extend((r, ip) for r in ipr.route("get", dst=ip)[:1])
            except Exception:  # no route to it
                continue
        if not found:
            for family in (2, 10):
                routes = [r for r in ipr.get_default_routes(family=family)]
                found.extend((r, None) for r in routes[:1])
                if found:
                    break
        for route, dest in found:
            oif = route.get_attr("RTA_OIF")  # type: ignore[attr-defined]
            if oif is None:
                continue
            links = ipr.get_links(oif)
            if not links:
                continue
            dev = str(links[0].get_attr("IFLA_IFNAME"))
            mtu = int(links[0].get_attr("IFLA_MTU") or 0)
            metrics = route.get_attr("RTA_METRICS")  # type: ignore[attr-defined]
            if metrics is not None:
                mtu = int(metrics.get_attr("RTAX_MTU") or mtu)
            if mtu and (best is None or mtu > best.mtu):
                best = UnderlayMtu(mtu, dev, dest)
    return best


def route_mtu(dests: list[str]) -> UnderlayMtu | None:
    """The underlay MTU toward ``dests`` (IP literals; others are skipped), or None.

    pyroute2's synchronous API refuses to run inside a running asyncio loop, so the lookup runs
    in a short-lived thread."""
    ips = []
    for d in dests:
        try:
            ips.append(str(ipaddress.ip_address(d)))
        except ValueError:
            continue
    result: list[UnderlayMtu | None] = [None]

    def work() -> None:
        try:
            result[0] = _lookup(ips)
        except Exception:
            result[0] = None

    th = threading.Thread(target=work, name="ipop-route-mtu")
    th.start()
    th.join()
    return result[0]


def underlay_dests(cfg: Config) -> list[str]:
    """Where this node's underlay traffic goes: servers and static peers (IP literals)."""
    out: list[str] = []
    if cfg.xmpp_host:
        out.append(cfg.xmpp_host)
    out.extend(parse_endpoint(p.endpoint)[0] for p in cfg.peers if p.endpoint is not None)
    out.extend(parse_endpoint(s, 3478)[0] for s in cfg.stun)
    out.extend(parse_endpoint(t.server, 3478)[0] for t in cfg.turn)
    return out


def overlay_mtu(underlay: int, tap: bool) -> int:
    """The overlay MTU an underlay MTU leaves room for."""
    return max(MIN_MTU, min(MAX_MTU, underlay - (OVERHEAD_TAP if tap else OVERHEAD_TUN)))


def default_mtu(cfg: Config) -> tuple[int, str]:
    """The overlay MTU ``ipop up`` uses and why: ``mtu`` when set, else from the underlay route,
    else the 1500-byte default."""
    if cfg.mtu is not None:
        return cfg.mtu, "mtu set in the config"
    found = route_mtu(underlay_dests(cfg))
    if found is None:
        return cfg.effective_mtu, "no underlay route found; assuming a 1500-byte underlay"
    where = f"route to {found.dest}" if found.dest else "default route"
    return overlay_mtu(found.mtu, cfg.switchmode), f"underlay {found.dev} mtu {found.mtu} ({where})"

