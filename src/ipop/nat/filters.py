"""Which addresses ICE may use: never ipop's own interface, never the overlay, never loopback.

A candidate on the overlay (100.64.0.0/10, ipop's TUN/TAP) would carry the tunnel inside itself:
the link would come up over its own interface and collapse as soon as it is used.  So local host
addresses are filtered *before* aioice binds a socket to them (no socket, no server-reflexive
candidate from it either), and remote candidates are filtered before they are paired.

``allowed_host_addresses`` is pure (it takes ``(interface, address, scope_id)`` triples);
``host_addresses`` reads the machine's interfaces with ``ifaddr`` (aioice's own dependency).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Final

__all__ = [
    "ALWAYS_EXCLUDED",
    "IpNetwork",
    "address_allowed",
    "allowed_host_addresses",
    "excluded_networks",
    "host_addresses",
]

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALWAYS_EXCLUDED: Final[tuple[IpNetwork, ...]] = (
    ipaddress.IPv4Network("100.64.0.0/10"),  # the overlay
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv4Network("0.0.0.0/8"),
    ipaddress.IPv4Network("169.254.0.0/16"),
    ipaddress.IPv4Network("224.0.0.0/4"),
    ipaddress.IPv4Network("255.255.255.255/32"),
    ipaddress.IPv6Network("::/128"),
    ipaddress.IPv6Network("::1/128"),
    ipaddress.IPv6Network("::ffff:0:0/96"),
    ipaddress.IPv6Network("fe80::/10"),
    ipaddress.IPv6Network("ff00::/8"),
)


def excluded_networks(extra: Iterable[IpNetwork | str] = ()) -> tuple[IpNetwork, ...]:
    """The always-excluded networks plus ``extra`` (e.g. the configured IPv6 overlay)."""
    nets = list(ALWAYS_EXCLUDED)
    for net in extra:
        parsed = ipaddress.ip_network(net, strict=False) if isinstance(net, str) else net
        if parsed not in nets:
            nets.append(parsed)
    return tuple(nets)


def address_allowed(address: str, excluded: Sequence[IpNetwork]) -> bool:
    """Whether ``address`` (an IP literal) lies outside every network of ``excluded``."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return not any(ip.version == net.version and ip in net for net in excluded)


def allowed_host_addresses(
    adapters: Iterable[tuple[str, str, int]],
    exclude_prefixes: Iterable[IpNetwork | str] = (),
    exclude_ifaces: Iterable[str] = (),
    *,
    use_ipv4: bool = True,
    use_ipv6: bool = True,
) -> list[str]:
    """The addresses ICE may bind host candidates to, in the order given, without duplicates.

    ``adapters``: ``(interface name, address, IPv6 scope id or 0)``.  An address is dropped when
    its interface is excluded, when it lies in an excluded network (the overlay always is), when
    it is scoped (IPv6 link-local), or when it also appears on an excluded interface."""
    nets = excluded_networks(exclude_prefixes)
    bad_ifaces = set(exclude_ifaces)
    rows = list(adapters)
    on_bad_iface = {addr for name, addr, _ in rows if name in bad_ifaces}
    out: list[str] = []
    for name, addr, scope in rows:
        if name in bad_ifaces or addr in on_bad_iface or scope or addr in out:
            continue
        is_v6 = ":" in addr
        if (is_v6 and not use_ipv6) or (not is_v6 and not use_ipv4):
            continue
        if address_allowed(addr, nets):
            out.append(addr)
    return out


def host_addresses(
    exclude_prefixes: Iterable[IpNetwork | str] = (),
    exclude_ifaces: Iterable[str] = (),
    *,
    use_ipv4: bool = True,
    use_ipv6: bool = True,
) -> list[str]:
    """``allowed_host_addresses`` over this machine's interfaces (read with ``ifaddr``)."""
    import ifaddr

    rows: list[tuple[str, str, int]] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                rows.append((str(adapter.name), ip.ip, 0))
            else:
                addr, _flow, scope = ip.ip
                rows.append((str(adapter.name), str(addr), int(scope)))
    return allowed_host_addresses(
        rows, exclude_prefixes, exclude_ifaces, use_ipv4=use_ipv4, use_ipv6=use_ipv6
    )
