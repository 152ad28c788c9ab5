"""Which routes a peer advertised this node installs: one pure verdict per prefix, with its reason.

Rules, in order (the first that refuses gives the reason):
  1. a default route (``0.0.0.0/0``, ``::/0``) is taken only from the peer named by ``exit_node``;
  2. ``accept_routes``: false takes nothing, a list takes only prefixes inside one of its own;
  3. a prefix that overlaps the overlay prefix, or one of this node's own networks (its
     ``advertise_routes`` and the networks on its underlay interfaces), is refused;
  4. a prefix that overlaps one another peer already carries is refused (the first keeps it).

``redecide`` runs the rules again over every linked peer when the policy changed (a reload of
``accept_routes``, ``exit_node`` or ``advertise_routes``): each first keeps only what the new
policy still accepts of its offer, then each in turn takes what it accepts, so a prefix another
peer kept stays with it and one that moved (the default route to a new exit node) is free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


def clashes(held: Net, net: Net) -> bool:
    """Whether a prefix a link carries stands in the way of ``net`` (rule 4): a default route
    clashes only with a default route of its family; any other prefix with one it overlaps."""
    if not net.prefixlen or not held.prefixlen:
        return held == net
    return overlaps(held, net)


@dataclass(frozen=True)
class Offer:
    """One linked peer, for ``redecide``: its name (UID), what it offers, what its link
    carries now, and whether ``exit_node`` names it."""

    name: str
    offered: tuple[str, ...]
    carried: tuple[Net, ...]
    is_exit: bool


def redecide(
    offers: Sequence[Offer], policy: RoutePolicy, fixed: Mapping[str, tuple[Net, ...]],
) -> dict[str, tuple[tuple[Net, ...], list[tuple[str, str]]]]:
    """Each offer's (accepted, refused) under ``policy`` (see the module docstring), in the
    order given; ``fixed``: the prefixes other links carry that no policy decides (static
    peers' ``allowed_ips``), by name."""
    held: dict[str, tuple[Net, ...]] = dict(fixed)
    for o in offers:
        still, _ = decide(o.offered, policy, is_exit=o.is_exit, owner=lambda _net: None)
        held[o.name] = tuple(n for n in o.carried if n in still)
    out: dict[str, tuple[tuple[Net, ...], list[tuple[str, str]]]] = {}
    for o in offers:
        def owner(net: Net, me: str = o.name) -> str | None:
            for name, nets in held.items():
                if name != me and any(clashes(h, net) for h in nets):
                    return name[:12]
            return None

        accepted, refused = decide(o.offered, policy, is_exit=o.is_exit, owner=owner)
        held[o.name] = accepted
        out[o.name] = (accepted, refused)
    return out
