"""IP prefixes: strict parsing, prefix sets and a longest-prefix-match table; pure.

Used for a link's allowed sources (WireGuard's *cryptokey routing*: an inner packet that comes
in over a peer's link must have a source this peer may use), for routes a peer advertises
(``advertise_routes`` / ``accept_routes``) and for ``peers[].allowed_ips``.

``RouteTable`` keeps one dict per (family, prefix length), keyed by the network's leading
bits, and tries the lengths from longest to shortest: a lookup costs one ``int.from_bytes``
and one dict probe per distinct length present (a handful), whatever the number of prefixes.
Addresses are packed bytes (4 or 16), as the data plane reads them from packets.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Generic, TypeVar

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")

MAX_ROUTES = 64  # prefixes one peer may advertise (signaling) or one config list may hold


def parse_prefix(text: object) -> Net:
    """``"198.18.200.0/24"`` or ``"2001:db8:1::/48"`` into a network; a bare address is a host
    prefix.  Host bits must be zero.  Raises ValueError with a message that says what is wrong."""
    if not isinstance(text, str) or not 2 <= len(text) <= 43:
        raise ValueError(f"{text!r} is not a prefix string")
    if not text.isascii() or text.strip() != text:
        raise ValueError(f"{text!r} is not a prefix")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid prefix ({exc})") from None


def parse_prefixes(items: Iterable[object], limit: int = MAX_ROUTES) -> tuple[Net, ...]:
    """A list of prefixes, checked, duplicates removed, order kept; at most ``limit``."""
    out: list[Net] = []
    for item in items:
        net = parse_prefix(item)
        if net not in out:
            out.append(net)
        if len(out) > limit:
            raise ValueError(f"more than {limit} prefixes")
    return tuple(out)


def overlaps(a: Net, b: Net) -> bool:
    return a.version == b.version and a.overlaps(b)


def is_default(net: Net) -> bool:
    return net.prefixlen == 0


class RouteTable(Generic[T]):
    """Longest-prefix match from packed addresses to values.  Immutable once built: the data
    path reads it without a lock, the control thread builds a new one and swaps it in."""

    __slots__ = ("_v4", "_v6", "nets")

    def __init__(self, entries: Iterable[tuple[Net, T]] = ()) -> None:
        v4: dict[int, dict[int, T]] = {}
        v6: dict[int, dict[int, T]] = {}
        nets: list[tuple[Net, T]] = []
        for net, value in entries:
            family = v4 if net.version == 4 else v6
            bits = 32 if net.version == 4 else 128
            by_key = family.setdefault(net.prefixlen, {})
            key = int(net.network_address) >> (bits - net.prefixlen)
            if key in by_key:
                continue  # first one wins
            by_key[key] = value
            nets.append((net, value))
        # (shift, dict) from the longest prefix to the shortest
        self._v4 = tuple((32 - plen, v4[plen]) for plen in sorted(v4, reverse=True))
        self._v6 = tuple((128 - plen, v6[plen]) for plen in sorted(v6, reverse=True))
        self.nets = tuple(nets)

    def __bool__(self) -> bool:
        return bool(self.nets)

    def __len__(self) -> int:
        return len(self.nets)

    def lookup(self, addr: bytes) -> T | None:
        """The value of the longest prefix holding ``addr`` (4 or 16 bytes), or None."""
        n = len(addr)
        levels = self._v4 if n == 4 else self._v6 if n == 16 else ()
        if not levels:
            return None
        a = int.from_bytes(addr, "big")
        for shift, by_key in levels:
            value = by_key.get(a >> shift)
            if value is not None:
                return value
        return None

    def match(self, addr: bytes) -> Net | None:
        """The longest prefix holding ``addr`` (for status and tests)."""
        best: Net | None = None
        ip = ipaddress.ip_address(addr)
        for net, _ in self.nets:
            if ip.version == net.version and ip in net and (
                    best is None or net.prefixlen > best.prefixlen):
                best = net
        return best


class PrefixSet:
    """A set of prefixes answering "does it hold this address?" by longest-prefix match."""

    __slots__ = ("_table", "nets")

    def __init__(self, nets: Iterable[Net] = ()) -> None:
        self._table: RouteTable[bool] = RouteTable((n, True) for n in nets)
        self.nets = tuple(n for n, _ in self._table.nets)

    def __bool__(self) -> bool:
        return bool(self.nets)

    def __contains__(self, addr: bytes) -> bool:
        return self._table.lookup(addr) is not None

    def overlapping(self, net: Net) -> Net | None:
        """A prefix of this set that overlaps ``net``, if any."""
        for mine in self.nets:
            if overlaps(mine, net):
                return mine
        return None
