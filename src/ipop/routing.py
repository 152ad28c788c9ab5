"""The node's share of live routing: what a reload of the routing keys changes outside the
controller (whose share, routes learned over signaling, is ``ipop.controller.liveroutes``).

    key                          applied by
    advertise_routes             IP forwarding turned on for a family newly advertised (never
                                 turned off: the node does not own that setting)
    snat_routes                  the masquerade table added or removed (``kroutes.Snat``); it
                                 applies while something is advertised
    exit_node, a static peer's   the default route through the exit's link, or through none
    0.0.0.0/0 or ::/0            (``DataPlane.set_exit``: route and policy rules as wg-quick);
                                 the underlay servers, resolved again, kept on the main table
    a static peer's allowed_ips  its link's prefixes (kernel routes, allowed sources); the
                                 link stays (``static_nets``)
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING

from ipop import reload as rl
from ipop.config import Config, Peer
from ipop.dataplane.kroutes import Snat, enable_forwarding

if TYPE_CHECKING:
    from ipop.node import Node

log = logging.getLogger("ipop.node")


def wants_snat(cfg: Config) -> bool:
    return cfg.snat_routes and bool(cfg.advertise_routes)


def static_exit(cfg: Config, peer: Peer) -> bool:
    """As wg-quick: a /0 in a static peer's allowed_ips, or ``exit_node`` naming it, routes
    the default through it."""
    named = cfg.exit_node is not None and cfg.exit_node in (peer.uid, peer.ip4, peer.ip6)
    return named or any(n.endswith("/0") for n in peer.allowed_ips)


def exit_wanted(cfg: Config) -> bool:
    return cfg.exit_node is not None or any(static_exit(cfg, p) for p in cfg.peers)


def exit_uid(node: Node, cfg: Config) -> bytes | None:
    """The peer whose link the default route goes through: a static exit with a link, or the
    linked peer the controller knows ``exit_node`` as."""
    dp = node.dp
    assert dp is not None
    for peer in cfg.peers:
        uid = bytes.fromhex(peer.uid)
        if static_exit(cfg, peer) and dp.link(uid) is not None:
            return uid
    find = getattr(node.controller, "exit_peer_uid", None)
    found: bytes | None = find() if find is not None else None
    return found


def _versions(prefixes: list[str]) -> set[int]:
    return {int(ipaddress.ip_network(r).version) for r in prefixes}


def reload_routing(node: Node, old: Config, new: Config) -> list[str]:
    """Forwarding, SNAT and the exit route for the new config; returns what changed."""
    dp = node.dp
    if dp is None:
        return []
    done: list[str] = []
    versions = _versions(new.advertise_routes) - _versions(old.advertise_routes)
    if versions:
        enable_forwarding(versions)
        done.append("forwarding for " + ", ".join(f"IPv{v}" for v in sorted(versions)))
    active = node.snat is not None and node.snat.active
    if wants_snat(new) and not active:
        node.snat = Snat(new.interface, new.overlay_networks)
        done.append("snat on" if node.snat.add() else "snat refused by nft (see the log)")
    elif not wants_snat(new) and node.snat is not None:
        node.snat.remove()
        node.snat = None
        if active:
            log.info("snat_routes: masquerading removed")
            done.append("snat off")
    servers = node.underlay_servers() if exit_wanted(new) else set()
    via = exit_uid(node, new)
    was = dp.exit_via
    if via != was or servers != dp.exit_servers:
        dp.set_exit(via, servers)
    if via != was or new.exit_node != old.exit_node:
        if via is not None:
            done.append(f"exit node {via.hex()[:12]}")
        elif new.exit_node is not None:
            done.append(f"exit node {new.exit_node}: no link yet (set once it is up)")
        else:
            done.append("exit node none")
    return done


def static_nets(node: Node, new: Config, uids: tuple[str, ...]) -> list[str]:
    """Static peers whose ``allowed_ips`` alone changed: their links carry the new prefixes
    (routes and sources follow); returns what changed."""
    dp = node.dp
    done: list[str] = []
    if dp is None:
        return done
    for peer in new.peers:
        if peer.uid not in uids:
            continue
        link = dp.link(bytes.fromhex(peer.uid))
        if link is None:
            continue
        nets = tuple(ipaddress.ip_network(n) for n in peer.allowed_ips)
        change = rl.route_delta(link.nets, nets)
        if not change:
            continue  # rebuilt with them already (its security changed too)
        dp.set_link_nets(link.peer_uid, nets)
        log.info("static peer %s: allowed_ips %s", peer.uid[:12], change)
        done.append(f"{peer.uid[:12]} allowed_ips {change}")
    return done
