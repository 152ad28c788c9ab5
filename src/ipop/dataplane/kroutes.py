"""Kernel routes into the virtual NIC for the prefixes links carry, and exit-node policy routing.

Subnet routes (a LAN behind a peer, ``allowed_ips``) are plain routes in the main table:
``dst PREFIX dev ipop0``.  A default route through an exit node is set as wg-quick sets one, so
that the underlay (XMPP, STUN/TURN servers, peers' endpoints) does not vanish into the tunnel::

    ip route add default dev ipop0 table 26992            (and ::/0 for IPv6)
    ip rule add to SERVER lookup main priority 30998      (each signaling/STUN/TURN server)
    ip rule add lookup main suppress_prefixlength 0 priority 30999
    ip rule add not fwmark 0x6970 lookup 26992 priority 31000

Every socket the data plane serves and every ICE socket carries ``SO_MARK`` 0x6970, so the
underlay traffic of links follows the main table; more specific main routes (the LAN) stay in
use through ``suppress_prefixlength 0``; everything else leaves through the exit node.

``KernelRoutes.sync`` diffs what is wanted against what it installed, so it can be called at any
time (a link comes or goes, a reload); ``clear`` removes all of it.  pyroute2's synchronous API
refuses to run inside a running asyncio loop, so each change runs in a short-lived thread.
Failures are logged, never raised: a route the kernel refuses never takes a link down.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import subprocess
import threading
from collections.abc import Callable
from typing import Any

from ipop.fwmark import UNDERLAY_MARK
from ipop.wire.prefixes import Net

log = logging.getLogger("ipop.dataplane")

EXIT_TABLE = 26992  # 0x6970, "ip"
EXIT_MARK = UNDERLAY_MARK
PRIO_SERVERS = 30998
PRIO_SUPPRESS = 30999
PRIO_EXIT = 31000
MAIN = 254
FIB_RULE_INVERT = 2


def _netlink(work: Callable[[Any], None]) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        from pyroute2 import IPRoute  # heavy: imported when routes change

        try:
            with IPRoute() as ipr:
                work(ipr)
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=run, name="ipop-netlink")
    th.start()
    th.join()
    if errors:
        raise errors[0]


class KernelRoutes:
    """The routes and rules one node installed for its NIC ``interface``."""

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self.routes: set[Net] = set()  # main-table routes into the NIC
        self.exit_families: set[int] = set()  # 4 and/or 6: default route via the exit node
        self.servers: set[str] = set()  # addresses kept on the main table while exiting
        self.errors = 0

    def sync(self, wanted: set[Net], exit_nets: set[Net],
             servers: set[str] | None = None) -> None:
        """Install ``wanted`` (main table) and a default route per family of ``exit_nets``
        (policy routed); remove what was installed and is no longer wanted."""
        if servers is not None and servers != self.servers and self.exit_families:
            self._swap_servers(self.servers, set(servers))  # the exit route stays in place
        if servers is not None:
            self.servers = set(servers)
        add = wanted - self.routes
        drop = self.routes - wanted
        families: set[int] = {n.version for n in exit_nets}
        if add or drop:
            self._routes(add, drop)
        if families != self.exit_families:
            self._set_exit(families)

    def clear(self) -> None:
        self.sync(set(), set())

    def _routes(self, add: set[Net], drop: set[Net]) -> None:
        iface = self.interface

        def work(ipr: Any) -> None:
            idx = ipr.link_lookup(ifname=iface)
            for net in drop:
                try:
                    ipr.route("del", dst=str(net), oif=idx[0] if idx else None,
                              family=_family(net))
                except Exception as exc:  # gone with the device, or removed by hand
                    log.debug("route %s dev %s: remove: %s", net, iface, exc)
                self.routes.discard(net)
            if not idx:
                return
            for net in add:
                try:
                    ipr.route("replace", dst=str(net), oif=idx[0], family=_family(net))
                    self.routes.add(net)
                    log.info("route %s dev %s added", net, iface)
                except Exception as exc:
                    self.errors += 1
                    log.error("route %s dev %s: the kernel refused it: %s", net, iface, exc)

        self._run(work)

    def _set_exit(self, families: set[int]) -> None:
        iface = self.interface
        old = set(self.exit_families)
        servers = sorted(self.servers)

        def work(ipr: Any) -> None:
            idx = ipr.link_lookup(ifname=iface)
            for ver in old - families:
                fam = socket.AF_INET if ver == 4 else socket.AF_INET6
                for rule in _exit_rules(fam, servers):
                    try:
                        ipr.rule("del", family=fam, **rule)
                    except Exception as exc:
                        log.debug("exit rule %s: remove: %s", rule, exc)
                try:
                    ipr.route("del", dst="0.0.0.0/0" if ver == 4 else "::/0",
                              table=EXIT_TABLE, family=fam)
                except Exception as exc:
                    log.debug("exit route: remove: %s", exc)
                self.exit_families.discard(ver)
                log.info("default route (IPv%d) through the exit node removed", ver)
            if not idx:
                return
            for ver in families - old:
                fam = socket.AF_INET if ver == 4 else socket.AF_INET6
                try:  # rules first: the default route is the last step, seen as "done"
                    for rule in _exit_rules(fam, servers):
                        ipr.rule("add", family=fam, **rule)
                    ipr.route("replace", dst="0.0.0.0/0" if ver == 4 else "::/0",
                              oif=idx[0], table=EXIT_TABLE, family=fam)
                    self.exit_families.add(ver)
                    log.info("default route (IPv%d) through the exit node on %s", ver, iface)
                except Exception as exc:
                    self.errors += 1
                    log.error("exit node: IPv%d policy routing refused: %s", ver, exc)

        self._run(work)

    def _swap_servers(self, old: set[str], new: set[str]) -> None:
        """While exiting, keep ``new`` instead of ``old`` on the main table: add the new server
        rules before the old ones go, so no server is routed through the exit in between."""
        families = set(self.exit_families)

        def work(ipr: Any) -> None:
            for ver in families:
                fam = socket.AF_INET if ver == 4 else socket.AF_INET6
                for text, verb in [(t, "add") for t in sorted(new - old)] + \
                        [(t, "del") for t in sorted(old - new)]:
                    ip = ipaddress.ip_address(text)
                    if ip.version != ver:
                        continue
                    try:
                        ipr.rule(verb, family=fam, table=MAIN, priority=PRIO_SERVERS,
                                 dst=str(ip), dst_len=ip.max_prefixlen)
                    except Exception as exc:
                        if verb == "add":
                            self.errors += 1
                            log.error("exit node: rule for server %s refused: %s", ip, exc)
                        else:
                            log.debug("exit rule for server %s: remove: %s", ip, exc)

        self._run(work)

    def _run(self, work: Callable[[Any], None]) -> None:
        try:
            _netlink(work)
        except Exception as exc:
            self.errors += 1
            log.error("routes on %s: %s", self.interface, exc)


def _family(net: Net) -> int:
    return socket.AF_INET if net.version == 4 else socket.AF_INET6


def _exit_rules(family: int, servers: list[str]) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for text in servers:
        ip = ipaddress.ip_address(text)
        if (ip.version == 4) != (family == socket.AF_INET):
            continue
        rules.append({"table": MAIN, "priority": PRIO_SERVERS, "dst": str(ip),
                      "dst_len": ip.max_prefixlen})
    rules.append({"table": MAIN, "priority": PRIO_SUPPRESS, "suppress_prefixlen": 0})
    rules.append({"table": EXIT_TABLE, "priority": PRIO_EXIT, "fwmark": EXIT_MARK,
                  "fwmask": 0xFFFFFFFF, "flags": FIB_RULE_INVERT})
    return rules


def local_networks(exclude: str) -> list[Net]:
    """The networks on this host's interfaces (but ``exclude``, loopback and link-local): the
    node's own underlay, which no route from a peer may cover."""
    found: list[Net] = []

    def work(ipr: Any) -> None:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for addr in ipr.get_addr():
            name = names.get(addr["index"])
            text = addr.get_attr("IFA_ADDRESS")
            if name in (exclude, "lo") or not text:
                continue
            net = ipaddress.ip_interface(f"{text}/{addr['prefixlen']}").network
            if net.is_loopback or net.is_link_local or net in found:
                continue
            found.append(net)

    try:
        _netlink(work)
    except Exception as exc:
        log.warning("cannot list this host's networks: %s", exc)
    return found


def enable_forwarding(versions: set[int]) -> None:
    """Let the kernel forward between the NIC and the LANs this node advertises (a subnet
    router or exit node needs it); logs what it changed."""
    for ver in sorted(versions):
        path = ("/proc/sys/net/ipv4/ip_forward" if ver == 4
                else "/proc/sys/net/ipv6/conf/all/forwarding")
        try:
            with open(path) as f:
                if f.read().strip() == "1":
                    continue
            with open(path, "w") as f:
                f.write("1")
            log.info("IPv%d forwarding enabled (advertise_routes)", ver)
        except OSError as exc:
            log.error("cannot enable IPv%d forwarding (%s): advertised routes will not "
                      "forward", ver, exc)


class Snat:
    """``snat_routes``: masquerade what this node forwards from the overlay to other interfaces
    (an nftables table of its own, removed on ``remove``)."""

    def __init__(self, interface: str, overlay: list[Net]) -> None:
        self.table = f"ipop_snat_{interface}".replace("-", "_").replace(".", "_")
        self.interface = interface
        self.overlay = overlay
        self.active = False

    def ruleset(self) -> str:
        lines = [f"table inet {self.table} {{", "  chain postrouting {",
                 "    type nat hook postrouting priority srcnat; policy accept;"]
        for net in self.overlay:
            fam = "ip" if net.version == 4 else "ip6"
            lines.append(f'    {fam} saddr {net} oifname != "{self.interface}" masquerade')
        lines += ["  }", "}"]
        return "\n".join(lines) + "\n"

    def add(self) -> bool:
        ok = _nft(self.ruleset())
        self.active = ok
        if ok:
            log.info("snat_routes: masquerading overlay traffic forwarded out of %s",
                     self.interface)
        return ok

    def remove(self) -> None:
        if self.active:
            _nft(f"delete table inet {self.table}\n")
            self.active = False


def _nft(text: str) -> bool:
    try:
        done = subprocess.run(["nft", "-f", "-"], input=text, text=True, capture_output=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("nft: %s", exc)
        return False
    if done.returncode != 0:
        log.error("nft refused the ruleset: %s", done.stderr.strip()[:300])
        return False
    return True
