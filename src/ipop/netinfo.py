"""The underlay route's MTU, as wg-quick finds it: the default overlay MTU derives from it.

``route_mtu(dests)`` asks the kernel (netlink, ``RTM_GETROUTE``: a lookup, nothing is sent) for
the route to each destination, takes the route's own ``mtu`` metric or else its device's MTU,
and returns the largest, like ``wg-quick`` does for its endpoints; with no usable destination it
uses the device of the default route.  ``overlay_mtu`` subtracts what every overlay datagram
carries on top of the inner packet (``config.DEFAULT_MTU_TUN`` is that for a 1500-byte underlay).
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import threading
from dataclasses import dataclass
from typing import Any

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


def _ip_json(args: list[str]) -> list[dict[str, Any]] | None:
    """``ip -j ARGS`` parsed; None when ``ip`` is missing or failed."""
    if shutil.which("ip") is None:
        return None
    try:
        r = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=5,
                           check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return [] if "route" in args and "get" in args else None
    try:
        doc = json.loads(r.stdout or "[]")
    except ValueError:
        return None
    return doc if isinstance(doc, list) else None


def _dev_mtu(dev: str) -> int:
    try:
        with open(f"/sys/class/net/{dev}/mtu") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def _lookup_ip(dests: list[str]) -> UnderlayMtu | None:
    """``_lookup`` with the ``ip`` tool (a few ms, where importing pyroute2 costs ~0.2 s of CPU
    and several MB); raises LookupError when ``ip`` cannot answer."""
    found: list[tuple[dict[str, Any], str | None]] = []
    for ip in dests:
        routes = _ip_json(["route", "get", ip])
        if routes is None:
            raise LookupError("ip route get failed")
        found.extend((r, ip) for r in routes[:1])
    if not found:
        for family in ("-4", "-6"):
            routes = _ip_json([family, "route", "show", "default"])
            if routes is None:
                raise LookupError("ip route show failed")
            found.extend((r, None) for r in routes[:1])
            if found:
                break
    best: UnderlayMtu | None = None
    for route, dest in found:
        dev = route.get("dev")
        if not isinstance(dev, str):
            continue
        mtu = _dev_mtu(dev)
        for metric in route.get("metrics") or []:
            if isinstance(metric, dict) and isinstance(metric.get("mtu"), int):
                mtu = metric["mtu"]
        if mtu and (best is None or mtu > best.mtu):
            best = UnderlayMtu(mtu, dev, dest)
    return best


def _lookup(dests: list[str]) -> UnderlayMtu | None:
    try:
        return _lookup_ip(dests)
    except LookupError:
        return _lookup_netlink(dests)


def _lookup_netlink(dests: list[str]) -> UnderlayMtu | None:
    from pyroute2 import IPRoute  # heavy: imported only when ``ip`` cannot answer

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

