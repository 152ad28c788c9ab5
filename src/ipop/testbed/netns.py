"""Build network topologies out of Linux network namespaces, and always tear them down.

Every box below is a network namespace named ``{prefix}{name}`` (prefix ``ipt{pid:05d}{3 hex}-``,
one per ``Testbed``).  veth pairs are created directly inside their namespaces; the root namespace
is never touched.  Only 198.18.0.0/15 is ever addressed or routed.

1. Two hosts on a veth pair, ``connect(a, b, rate_mbit=1000, loss_pct=1)``; ``tc tbf`` shaping
   and ``nft numgen`` loss sit on both ends (each direction is shaped and lossy)::

      +-------+ eth0                         eth0 +-------+
      |   a   |-----------------------------------|   b   |
      +-------+ 198.18.1.1/24       198.18.1.2/24 +-------+

2. Hosts on a bridge standing for "the internet" (or any LAN), ``add_lan("inet", [a, b, c])``.
   The bridge lives in the LAN's own namespace, which also owns the gateway address .254: a sink
   that forwards nothing (ip_forward=0), so packets for unknown underlay addresses vanish there::

      +-------------------------- inet ---------------------------+
      |  br0 198.19.1.254/24  (gateway = sink, forwards nothing)  |
      +-----p0-----------------p1-----------------p2--------------+
            |                  |                  |
       eth0 198.19.1.1    eth0 198.19.1.2    eth0 198.19.1.3
         +-----+            +-----+            +-----+
         |  a  |            |  b  |            |  c  |
         +-----+            +-----+            +-----+

3. A host behind a NAT box, ``add_nat("nat1", [h], inet, kind="cone")``.  The NAT namespace
   holds the inside bridge and is its gateway .254; its own eth0 is a member of the outside LAN.
   ip_forward=1, masquerade (cone) or masquerade random (symmetric), and unsolicited inbound
   packets are dropped (only established/related pass)::

      +-----+ eth0               +-------------- nat1 --------------+ eth0
      |  h  |---------------p0---| br0 198.19.2.254    masquerade   |----p3--- inet br0
      +-----+ 198.19.2.1/24      | ip_forward=1, inbound: ct only   | 198.19.1.4/24
        route 198.18.0.0/15      +----------------------------------+
        via 198.19.2.254

4. The servers namespace (prosody, coturn; ``ipop.testbed.servers`` runs them in ``host.ns``)
   is a plain host on the internet LAN::

      +--------- servers ----------+ eth0
      | prosody :5222, coturn :3478|------p4--- inet br0   (198.19.1.5/24)
      +----------------------------+  route 198.18.0.0/15 via 198.19.1.254 (sink)

Addressing plan:

* ``198.18.N.0/24``, N = 1, 2, ...: veth links made by ``connect``; ``a`` gets .1, ``b`` .2.
* ``198.19.N.0/24``, N = 1, 2, ...: LANs, NAT inside LANs included, in creation order.  Members
  get .1, .2, ... in attach order; .254 is the gateway (the LAN's sink, or the NAT box).

Routes: every host gets one catch-all route for all of 198.18.0.0/15: via the NAT box if it is
behind one, else via the gateway of the first LAN it joined, else via the peer of its first veth
link.  More specific connected routes (its own links and LANs) win over it.  There is no
default route, so nothing outside 198.18.0.0/15 is reachable.  The catch-all matters for coturn:
relaying to an address it has no route to gives ENETUNREACH and drops the whole allocation
(REAL-PARTS.md); with the catch-all the packets reach a namespace that forwards nothing and are
silently dropped there, as on the internet.

Cleanup (``close``, idempotent, never raises): SIGTERM to every process started with
``Host.popen`` (its process group; each runs in a new session), SIGKILL after a grace period,
then the same for any process still living in one of our namespaces, then ``ip netns del`` for
every namespace (which deletes its veths and bridges).  An atexit hook and a SIGTERM handler
close live test beds as a last resort; ``sweep_stale`` removes namespaces left by crashed runs.
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

from ipop.errors import ConfigError, IpopError
from ipop.testbed.nft import NatKind, loss_ruleset, nat_ruleset
from ipop.testbed.proc import (
    PREFIX_PATTERN,
    check_environment,
    cmd,
    end_children,
    end_pids,
    list_namespaces,
    make_prefix,
    namespace_pids,
    run_stem,
    sweep_stale,
    tool,
)

__all__ = [
    "LAN_POOL",
    "LINK_POOL",
    "PREFIX_PATTERN",
    "UNDERLAY",
    "Host",
    "Lan",
    "Link",
    "NatBox",
    "NatKind",
    "Testbed",
    "check_environment",
    "list_namespaces",
    "make_prefix",
    "run_stem",
    "sweep_stale",
]

log = logging.getLogger(__name__)

UNDERLAY = ipaddress.IPv4Network("198.18.0.0/15")
LINK_POOL = ipaddress.IPv4Network("198.18.0.0/16")
LAN_POOL = ipaddress.IPv4Network("198.19.0.0/16")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,15}$")


class Host:
    """One network namespace: a machine of the test bed."""

    def __init__(self, testbed: Testbed, name: str, ns: str) -> None:
        self.name = name
        """Short name given to ``add_host``."""
        self.ns = ns
        """Full namespace name, ``{prefix}{name}``."""
        self.addrs: list[str] = []
        """Underlay IPv4 addresses, in the order they were assigned (gateway addresses excluded)."""
        self._tb = testbed
        self._ndev = 0
        self._catchall = 0  # rank of the catch-all route's source: 0 none, 1 link, 2 LAN, 3 NAT
        self._ingress_loss = 0.0
        self._egress_loss: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ns={self.ns} addrs={self.addrs}>"

    @property
    def addr(self) -> str:
        """The primary underlay IPv4 address (the first one assigned)."""
        if not self.addrs:
            raise ConfigError("addr", f"host {self.name} has no address yet: connect it first")
        return self.addrs[0]

    def run(
        self,
        cmd: Sequence[str],
        check: bool = True,
        timeout: float | None = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` to completion inside this namespace; output is captured as text."""
        return subprocess.run(
            [tool("ip"), "netns", "exec", self.ns, *cmd],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            input=input,
        )

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside this namespace in a new session.  The test bed kills it on close;
        its pid is that of ``cmd`` itself (``ip netns exec`` execs it)."""
        return self._tb._popen(self, cmd, kw)

    def route(self, dst: str, via: str) -> None:
        """Add or replace a route for ``dst`` (inside 198.18.0.0/15) via the gateway ``via``."""
        net = ipaddress.IPv4Network(dst, strict=False)
        if not net.subnet_of(UNDERLAY):
            raise ConfigError("dst", f"{dst} is outside the underlay {UNDERLAY}")
        self._ip("route", "replace", str(net), "via", via)

    # -- plumbing used by Testbed --------------------------------------------------------
    def _ip(self, *args: str) -> None:
        cmd(["ip", "-n", self.ns, *args])

    def _batch(self, lines: Iterable[str]) -> None:
        cmd(["ip", "-n", self.ns, "-batch", "-"], input="\n".join(lines) + "\n")

    def _sysctl(self, *settings: str) -> None:
        cmd(["ip", "netns", "exec", self.ns, "sysctl", "-q", "-w", *settings])

    def _nft(self, ruleset: str) -> None:
        cmd(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], input=ruleset)

    def _new_dev(self, stem: str) -> str:
        dev = f"{stem}{self._ndev}"
        self._ndev += 1
        return dev


class NatBox(Host):
    """A NAT namespace: gateway of its ``inside`` LAN, member of its ``outside`` LAN."""

    kind: NatKind
    inside: Lan
    """The private LAN behind the NAT (its bridge lives in this namespace)."""
    outside: Lan
    """The LAN the NAT's public leg (``addr``) sits on."""
    out_dev: str

    def flush_conntrack(self) -> None:
        """Forget every NAT mapping (``conntrack -F``): the next packets get new mappings."""
        cmd(["ip", "netns", "exec", self.ns, "conntrack", "-F"])


@dataclass(eq=False)
class Link:
    """A veth pair between hosts ``a`` and ``b``."""

    a: Host
    b: Host
    a_dev: str
    b_dev: str
    a_addr: str
    b_addr: str
    subnet: ipaddress.IPv4Network
    rate_mbit: float | None = None
    loss_pct: float = 0.0


@dataclass(eq=False)
class Lan:
    """A bridge ``br0`` in namespace ``box`` with members attached by veth pairs."""

    name: str
    box: Host
    """The namespace holding the bridge: the LAN's own (a sink) or a NAT box."""
    subnet: ipaddress.IPv4Network
    gateway: str
    """The .254 address on the bridge: where members route 198.18.0.0/15."""
    members: dict[str, str] = field(default_factory=dict)
    """Host name -> its address on this LAN."""
    devs: dict[str, str] = field(default_factory=dict)
    """Host name -> its interface on this LAN."""
    bridge: str = "br0"
    _next: int = 1

    @property
    def ns(self) -> str:
        return self.box.ns


H = TypeVar("H", bound=Host)


def _mac(host: Host, dev: str) -> str:
    out = cmd(["ip", "-n", host.ns, "-o", "link", "show", "dev", dev]).stdout
    match = re.search(r"link/ether ([0-9a-f:]{17})", out)
    if match is None:
        raise IpopError(f"no MAC address on {dev} in {host.ns}", reason="no_mac")
    return match.group(1)

_LIVE: set[Testbed] = set()
_HOOKED = False
_PREV_SIGTERM: Any = None


def _close_all() -> None:
    for tb in list(_LIVE):
        tb.close()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _close_all()
    prev = _PREV_SIGTERM
    if callable(prev):
        prev(signum, frame)
    elif prev != signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _hook_process_exit() -> None:
    global _HOOKED, _PREV_SIGTERM
    if _HOOKED:
        return
    _HOOKED = True
    atexit.register(_close_all)
    if threading.current_thread() is threading.main_thread():
        _PREV_SIGTERM = signal.signal(signal.SIGTERM, _on_sigterm)


class Testbed:
    """A set of namespaces, links, LANs and NAT boxes that ``close`` removes without a trace.

    Use as a context manager.  ``prefix`` defaults to ``make_prefix()``; ``grace`` is how long
    processes get between SIGTERM and SIGKILL on close."""

    __test__ = False  # not a pytest test class, though its name starts with "Test"

    def __init__(self, prefix: str | None = None, *, grace: float = 3.0) -> None:
        self.prefix = prefix if prefix is not None else make_prefix()
        self.grace = grace
        self.hosts: dict[str, Host] = {}
        """Hosts and NAT boxes by short name."""
        self.lans: dict[str, Lan] = {}
        """LANs by name; a NAT's inside LAN is ``{nat}-in``."""
        self.links: list[Link] = []
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._used: list[ipaddress.IPv4Network] = []
        self._lock = threading.RLock()
        self._closed = False
        _hook_process_exit()
        _LIVE.add(self)

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def namespaces(self) -> list[str]:
        """Full names of the namespaces created so far (LAN namespaces included)."""
        return list(self._namespaces)

    # -- building ------------------------------------------------------------------------
    def add_host(self, name: str, *, forward: bool = False) -> Host:
        """A new namespace with ``lo`` up; ``forward`` enables IPv4 forwarding (a router)."""
        host = self._new_ns(name, Host, forward=forward)
        self.hosts[name] = host
        return host

    def connect(
        self,
        a: Host,
        b: Host,
        subnet: str | None = None,
        rate_mbit: float | None = None,
        loss_pct: float | None = None,
    ) -> Link:
        """A veth pair between ``a`` (.1 of ``subnet``) and ``b`` (.2); ``subnet`` defaults to
        the next free 198.18.N.0/24.  ``rate_mbit`` shapes and ``loss_pct`` drops each direction."""
        net = self._claim(subnet, LINK_POOL, "subnet")
        a_addr, b_addr = (str(net.network_address + i) for i in (1, 2))
        link = Link(a, b, a._new_dev("eth"), b._new_dev("eth"), a_addr, b_addr, net)
        self._veth(a, link.a_dev, f"{a_addr}/{net.prefixlen}", b, link.b_dev)
        self._up(b, link.b_dev, f"{b_addr}/{net.prefixlen}")
        a.addrs.append(a_addr)
        b.addrs.append(b_addr)
        self._catchall(a, b_addr, link.a_dev, 1)
        self._catchall(b, a_addr, link.b_dev, 1)
        self.links.append(link)
        if rate_mbit is not None:
            self.shape(link, rate_mbit)
        if loss_pct:
            self.set_loss(link, loss_pct)
        return link

    def add_lan(self, name: str, hosts: Iterable[Host] = ()) -> Lan:
        """A bridge in its own namespace ``name`` on the next free 198.19.N.0/24, whose .254 is
        a sink gateway; each of ``hosts`` is attached (see ``attach``)."""
        box = self._new_ns(name, Host, forward=False)
        lan = self._bridge(name, box)
        for host in hosts:
            self.attach(lan, host)
        return lan

    def attach(self, lan: Lan, host: Host) -> str:
        """Join ``host`` to ``lan`` by a veth pair; returns its address on the LAN."""
        return self._attach(lan, host)[0]

    def add_nat(
        self,
        name: str,
        inside_hosts: Iterable[Host],
        outside_lan: Lan,
        kind: NatKind = "cone",
    ) -> NatBox:
        """A NAT box on ``outside_lan`` with a new inside LAN holding ``inside_hosts``, whose
        routes for 198.18.0.0/15 then point at the NAT.  ``kind``: ``cone`` or ``symmetric``."""
        if kind not in ("cone", "symmetric"):
            raise ConfigError("kind", f"unknown NAT kind {kind!r}; use 'cone' or 'symmetric'")
        nat = self._new_ns(name, NatBox, forward=True)
        self.hosts[name] = nat
        nat.kind = kind
        nat.outside = outside_lan
        _, nat.out_dev = self._attach(outside_lan, nat)
        nat.inside = self._bridge(f"{name}-in", nat)
        nat._nft(nat_ruleset(kind, nat.inside.bridge, nat.out_dev))
        for host in inside_hosts:
            self._attach(nat.inside, host)
        return nat

    # -- conditions ----------------------------------------------------------------------
    def set_loss(self, target: Link | Host, pct: float) -> None:
        """Drop ``pct`` % of packets at random.  A ``Link``: in each direction independently (a
        ping round trip then loses about 1-(1-p)^2).  A ``Host``: of the IP packets arriving at
        it on any interface, forwarded ones included (a ping to it loses about p).  0 clears."""
        if isinstance(target, Link):
            target.loss_pct = pct
            ends = [(target.a, target.a_dev), (target.b, target.b_dev)]
            for host, dev in ends:
                host._egress_loss[dev] = pct
            self._load_loss(*(host for host, _ in ends))
        else:
            target._ingress_loss = pct
            self._load_loss(target)

    def shape(self, link: Link, rate_mbit: float | None) -> None:
        """Limit each direction of ``link`` to ``rate_mbit`` with ``tc tbf``; None removes it."""
        for host, dev in ((link.a, link.a_dev), (link.b, link.b_dev)):
            base = ["tc", "-n", host.ns, "qdisc"]
            if rate_mbit is None:
                cmd([*base, "del", "dev", dev, "root"], check=False)
                continue
            if rate_mbit <= 0:
                raise ConfigError("rate_mbit", f"{rate_mbit} must be positive")
            rate_bytes = int(rate_mbit * 1e6 / 8)
            burst = max(rate_bytes // 250, 128 * 1024)
            kbit = f"{max(int(rate_mbit * 1000), 8)}kbit"
            cmd([*base, "replace", "dev", dev, "root", "tbf", "rate", kbit,
                  "burst", str(burst), "latency", "20ms"])  # fmt: skip
        link.rate_mbit = rate_mbit

    def pin_neighbours(self, lan: Lan, only: Iterable[Host] | None = None) -> int:
        """Give every member of ``lan`` (or those of ``only``) a permanent neighbour entry for
        every other member and for the gateway; returns how many entries it set.  Call it again
        after attaching more, or for a host whose interface went down (that flushes them).

        The kernel's neighbour table is one for all namespaces, and its garbage collector
        starts evicting at ``gc_thresh3`` (1,024) entries: 32 hosts on one bridge need about
        1,056, so a big LAN thrashes ARP and loses packets (about 45 s of a 32-node start-up
        went that way).  Permanent entries are exempt from that limit (Linux 4.19 and later),
        and no ARP is sent for them.  The root namespace's limit is left alone."""
        macs: dict[str, str] = {}
        for name, dev in lan.devs.items():
            macs[lan.members[name]] = _mac(self.hosts[name], dev)
        macs[lan.gateway] = _mac(lan.box, lan.bridge)
        names = set(lan.devs) if only is None else {h.name for h in only}
        count = 0
        for name, dev in lan.devs.items():
            if name not in names:
                continue
            own = lan.members[name]
            lines = [f"neigh replace {addr} lladdr {mac} dev {dev} nud permanent"
                     for addr, mac in macs.items() if addr != own]
            self.hosts[name]._batch(lines)
            count += len(lines)
        return count

    # -- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        """Kill our processes, then delete our namespaces.  Idempotent; never raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _LIVE.discard(self)
            for step in (self._kill_tracked, self._kill_leftovers, self._delete_namespaces):
                try:
                    step()
                except Exception:
                    log.exception("testbed %s: cleanup step %s failed", self.prefix, step.__name__)

    def _kill_tracked(self) -> None:
        procs, self._procs = self._procs, []
        end_children(procs, self.grace)

    def _kill_leftovers(self) -> None:
        """Processes still inside our namespaces (children of our processes, servers started
        with ``ip netns exec``) were started by this run too: end them, by pid."""
        pids: set[int] = set()
        for ns in self._namespaces:
            pids |= namespace_pids(ns)
        if pids:
            log.warning("testbed %s: ending leftover pids %s", self.prefix, sorted(pids))
            end_pids(pids, self.grace)

    def _delete_namespaces(self) -> None:
        for ns in reversed(self._namespaces):
            res = cmd(["ip", "netns", "del", ns], check=False)
            if res.returncode != 0 and ns in list_namespaces():
                log.error("testbed %s: cannot delete %s: %s", self.prefix, ns, res.stderr.strip())
        self._namespaces.clear()

    # -- plumbing ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise IpopError(f"testbed {self.prefix} is closed", reason="testbed_closed")

    def _new_ns(self, name: str, cls: type[H], *, forward: bool) -> H:
        self._check_open()
        if not _NAME_RE.match(name):
            raise ConfigError("name", f"{name!r}: use 1-16 of a-z 0-9 - (starting alnum)")
        if name in self.hosts or name in self.lans:
            raise ConfigError("name", f"{name!r} is already used in this test bed")
        ns = self.prefix + name
        cmd(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        host = cls(self, name, ns)
        host._ip("link", "set", "lo", "up")
        host._sysctl(
            f"net.ipv4.ip_forward={int(forward)}",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        )
        return host

    def _claim(
        self, subnet: str | None, pool: ipaddress.IPv4Network, key: str
    ) -> ipaddress.IPv4Network:
        if subnet is not None:
            net = ipaddress.IPv4Network(subnet, strict=False)
            if not net.subnet_of(UNDERLAY) or net.prefixlen > 30:
                raise ConfigError(key, f"{subnet} must be a /30 or larger inside {UNDERLAY}")
            if any(net.overlaps(used) for used in self._used):
                raise ConfigError(key, f"{subnet} overlaps a subnet already in use")
        else:
            free = (
                n
                for n in pool.subnets(new_prefix=24)
                if n.network_address.packed[2] != 0 and not any(n.overlaps(u) for u in self._used)
            )
            found = next(free, None)
            if found is None:
                raise ConfigError(key, f"no free /24 left in {pool}")
            net = found
        self._used.append(net)
        return net

    def _veth(self, a: Host, a_dev: str, a_cidr: str | None, b: Host, b_dev: str) -> None:
        """Create a veth pair directly inside ``a`` and ``b``; bring ``a``'s end up."""
        cmd(["ip", "link", "add", a_dev, "netns", a.ns, "type", "veth",
              "peer", "name", b_dev, "netns", b.ns])  # fmt: skip
        self._up(a, a_dev, a_cidr)

    def _up(self, host: Host, dev: str, cidr: str | None, master: str | None = None) -> None:
        host._sysctl(f"net.ipv6.conf.{dev}.disable_ipv6=1")  # the underlay is IPv4 only
        lines = [f"addr add {cidr} dev {dev}"] if cidr else []
        if master:
            lines.append(f"link set {dev} master {master}")
        host._batch([*lines, f"link set {dev} up"])

    def _bridge(self, name: str, box: Host) -> Lan:
        net = self._claim(None, LAN_POOL, "subnet")
        lan = Lan(name, box, net, str(net.network_address + 254))
        box._ip("link", "add", lan.bridge, "type", "bridge")
        self._up(box, lan.bridge, f"{lan.gateway}/{net.prefixlen}")
        self.lans[name] = lan
        return lan

    def _attach(self, lan: Lan, host: Host) -> tuple[str, str]:
        self._check_open()
        if host.name in lan.members:
            raise ConfigError("hosts", f"{host.name} is already on LAN {lan.name}")
        if lan._next >= 254:
            raise ConfigError("hosts", f"LAN {lan.name} is full")
        addr = str(lan.subnet.network_address + lan._next)
        lan._next += 1
        dev, port = host._new_dev("eth"), lan.box._new_dev("p")
        self._veth(host, dev, f"{addr}/{lan.subnet.prefixlen}", lan.box, port)
        self._up(lan.box, port, None, master=lan.bridge)
        host.addrs.append(addr)
        lan.members[host.name] = addr
        lan.devs[host.name] = dev
        self._catchall(host, lan.gateway, dev, 3 if isinstance(lan.box, NatBox) else 2)
        return addr, dev

    def _catchall(self, host: Host, via: str, dev: str, rank: int) -> None:
        """Route 198.18.0.0/15 via ``via`` unless a better-ranked source already set it."""
        if rank > host._catchall:
            host._ip("route", "replace", str(UNDERLAY), "via", via, "dev", dev)
            host._catchall = rank

    def _load_loss(self, *hosts: Host) -> None:
        for host in hosts:
            host._nft(loss_ruleset(host._ingress_loss, host._egress_loss))

    def _popen(self, host: Host, cmd: Sequence[str], kw: dict[str, Any]) -> subprocess.Popen[Any]:
        with self._lock:
            self._check_open()
            kw["start_new_session"] = True
            proc: subprocess.Popen[Any] = subprocess.Popen(
                [tool("ip"), "netns", "exec", host.ns, *cmd], **kw
            )
            self._procs.append(proc)
            return proc
