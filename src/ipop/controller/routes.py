"""Which routes a peer advertised this node installs: one pure verdict per prefix, with its reason.

Rules, in order (the first that refuses gives the reason):
  1. a default route (``0.0.0.0/0``, ``::/0``) is taken only from the peer named by ``exit_node``;
  2. ``accept_routes``: false takes nothing, a list takes only prefixes inside one of its own;
  3. a prefix that overlaps the overlay prefix, or one of this node's own networks (its
     ``advertise_routes`` and the networks on its underlay interfaces), is refused;
  4. a prefix that overlaps one another peer already carries is refused (the first keeps it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ipop.wire.prefixes import Net, overlaps, parse_prefix


@dataclass(frozen=True)
class RoutePolicy:
    accept: bool | tuple[Net, ...]
    """``accept_routes``: False, True, or the prefixes inside which routes are accepted."""
    overlay: tuple[Net, ...]
    own: tuple[Net, ...]
    """This node's own networks: its advertised routes and its underlay networks."""


def decide(
    offered: Sequence[str], policy: RoutePolicy, *, is_exit: bool,
    owner: Callable[[Net], str | None],
) -> tuple[tuple[Net, ...], list[tuple[str, str]]]:
    """(accepted prefixes, [(refused prefix, reason), ...]) for the routes a peer offered.
    ``owner(net)`` names another peer that already carries an overlapping prefix, or None."""
    accepted: list[Net] = []
    refused: list[tuple[str, str]] = []
    for text in offered:
        try:
            net = parse_prefix(text)
        except ValueError as exc:
            refused.append((text, str(exc)))
            continue
        why = _refusal(net, policy, is_exit, owner)
        if why is None:
            accepted.append(net)
        else:
            refused.append((str(net), why))
    return tuple(accepted), refused


def _refusal(net: Net, policy: RoutePolicy, is_exit: bool,
             owner: Callable[[Net], str | None]) -> str | None:
    if net.prefixlen == 0:
        if not is_exit:
            return "a default route: taken only from the peer named by exit_node"
    else:
        if policy.accept is False:
            return "accept_routes is false"
        if policy.accept is not True and not any(
                net.version == a.version and net.subnet_of(a)  # type: ignore[arg-type]
                for a in policy.accept):
            return "outside accept_routes"
        for mine in policy.overlay:
            if overlaps(net, mine):
                return f"overlaps the overlay prefix {mine}"
        for mine in policy.own:
            if mine.prefixlen and overlaps(net, mine):
                return f"overlaps this node's own network {mine}"
    other = owner(net)
    if other is not None:
        return f"already routed to peer {other}"
    return None
