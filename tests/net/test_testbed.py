"""The namespace test bed itself: links, LANs, NATs, shaping, loss and cleanup, on real kernels."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ipop.errors import ConfigError, IpopError
from ipop.testbed.netns import (
    UNDERLAY,
    Host,
    Testbed,
    list_namespaces,
    sweep_stale,
)

# One UDP endpoint in a namespace: bind, print "ready", then for each of up to argv[3] datagrams
# print "<peer ip> <peer port> <text>" and answer "reply" to those starting with "echo".
_UDP_SERVER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.settimeout(float(sys.argv[2]))
    print("ready", flush=True)
    for _ in range(int(sys.argv[3])):
        try:
            data, (ip, port) = s.recvfrom(2048)
        except socket.timeout:
            break
        print(ip, port, data.decode(), flush=True)
        if data.startswith(b"echo"):
            s.sendto(b"reply", (ip, port))
    """
)

# Send "echo" from one bound local port to each ip:port in argv[2:], print the answer or "none".
_UDP_CLIENT = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.settimeout(1.0)
    for dst in sys.argv[2:]:
        ip, port = dst.split(":")
        s.sendto(b"echo", (ip, int(port)))
        try:
            print(s.recvfrom(2048)[0].decode(), flush=True)
        except socket.timeout:
            print("none", flush=True)
    """
)


def ping(src: Host, dst: str, count: int = 1) -> bool:
    res = src.run(["ping", "-n", "-q", "-c", str(count), "-W", "1", dst], check=False)
    return res.returncode == 0


def lost_pings(src: Host, dst: str, count: int) -> int:
    out = src.run(["ping", "-n", "-q", "-c", str(count), "-i", "0.02", "-W", "1", dst], check=False)
    m = re.search(r"(\d+) received", out.stdout)
    assert m, out.stdout + out.stderr
    return count - int(m.group(1))


class UdpServer:
    """A UDP server process in ``host`` that records who talked to it."""

    def __init__(self, host: Host, port: int, expect: int = 1, lifetime: float = 5.0) -> None:
        self.proc = host.popen(
            [sys.executable, "-c", _UDP_SERVER, str(port), str(lifetime), str(expect)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def peers(self) -> list[tuple[str, int]]:
        out, _ = self.proc.communicate(timeout=10)
        return [(ip, int(port)) for ip, port, _text in (line.split() for line in out.splitlines())]


def udp_send(host: Host, sport: int, *dsts: str) -> list[str]:
    res = host.run([sys.executable, "-c", _UDP_CLIENT, str(sport), *dsts], timeout=20)
    return res.stdout.split()


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_two_hosts_on_a_veth_ping_each_other(testbed: Testbed) -> None:
    before = root_links()
    a, b = testbed.add_host("a"), testbed.add_host("b")
    link = testbed.connect(a, b)
    assert a.ns == testbed.prefix + "a" and a.name == "a"
    assert (a.addr, b.addr) == ("198.18.1.1", "198.18.1.2")
    assert (link.a_addr, link.b_addr) == (a.addr, b.addr)
    assert ping(a, b.addr) and ping(b, a.addr)
    assert a.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "0"
    # The catch-all route covers the underlay and nothing else.
    assert a.run(["ip", "route", "get", "198.19.77.1"]).returncode == 0
    assert a.run(["ip", "route", "get", "192.0.2.1"], check=False).returncode != 0
    assert not {link.a_dev, link.b_dev} & (root_links() - before)  # root namespace untouched


def test_shaped_link_has_tbf_on_both_ends(testbed: Testbed) -> None:
    a, b = testbed.add_host("a"), testbed.add_host("b")
    link = testbed.connect(a, b, rate_mbit=1000)
    for host, dev in ((a, link.a_dev), (b, link.b_dev)):
        out = subprocess.run(
            ["tc", "-n", host.ns, "qdisc", "show", "dev", dev],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "tbf" in out and "rate 1Gbit" in out, out
    assert ping(a, b.addr)
    testbed.shape(link, 50)
    assert "rate 50Mbit" in a.run(["tc", "qdisc", "show", "dev", link.a_dev]).stdout
    testbed.shape(link, None)
    assert "tbf" not in a.run(["tc", "qdisc", "show", "dev", link.a_dev]).stdout
    assert link.rate_mbit is None


def test_three_hosts_on_a_lan_ping_pairwise(testbed: Testbed) -> None:
    hosts = [testbed.add_host(n) for n in ("a", "b", "c")]
    lan = testbed.add_lan("inet", hosts)
    assert lan.subnet == ipaddress.IPv4Network("198.19.1.0/24")
    assert lan.gateway == "198.19.1.254"
    assert [h.addr for h in hosts] == ["198.19.1.1", "198.19.1.2", "198.19.1.3"]
    assert lan.members == {"a": "198.19.1.1", "b": "198.19.1.2", "c": "198.19.1.3"}
    for src in hosts:
        for dst in hosts:
            if src is not dst:
                assert ping(src, dst.addr), f"{src.name} -> {dst.name}"
    # Unknown underlay addresses route to the sink gateway (no ENETUNREACH), which drops them.
    route = hosts[0].run(["ip", "route", "get", "198.18.200.9"]).stdout
    assert "via 198.19.1.254" in route
    assert not ping(hosts[0], "198.18.200.9")


def test_cone_nat_lets_out_and_drops_unsolicited_in(testbed: Testbed) -> None:
    h, srv, other = (testbed.add_host(n) for n in ("h", "srv", "other"))
    inet = testbed.add_lan("inet", [srv, other])
    nat = testbed.add_nat("nat1", [h], inet, kind="cone")
    assert ipaddress.ip_address(nat.addr) in inet.subnet
    assert ipaddress.ip_address(h.addr) in nat.inside.subnet
    assert nat.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1"
    assert "via " + nat.inside.gateway in h.run(["ip", "route", "get", srv.addr]).stdout
    assert ping(h, srv.addr)

    # Outbound UDP is masqueraded; the cone NAT keeps the port; answers come back.
    server = UdpServer(srv, 4000)
    assert udp_send(h, 5000, f"{srv.addr}:4000") == ["reply"]
    assert server.peers() == [(nat.addr, 5000)]

    # Unsolicited inbound: a probe from a host never contacted is dropped, and it does not
    # steal the mapping: a later outbound packet to that host still leaves from port 5000.
    listener = UdpServer(h, 5000, lifetime=1.0)
    assert udp_send(other, 4000, f"{nat.addr}:5000") == ["none"]
    assert listener.peers() == []
    witness = UdpServer(other, 4000)
    udp_send(h, 5000, f"{other.addr}:4000")
    assert witness.peers() == [(nat.addr, 5000)]

    # Even with a route into the private LAN, the NAT forwards nothing unsolicited.
    assert not ping(srv, nat.addr)
    srv.route(str(nat.inside.subnet), via=nat.addr)
    assert not ping(srv, h.addr)


def test_symmetric_nat_maps_each_destination_to_its_own_port(testbed: Testbed) -> None:
    h, s1, s2 = (testbed.add_host(n) for n in ("h", "s1", "s2"))
    inet = testbed.add_lan("inet", [s1, s2])
    nat = testbed.add_nat("nat1", [h], inet, kind="symmetric")
    r1, r2 = UdpServer(s1, 4000), UdpServer(s2, 4000)
    assert udp_send(h, 5000, f"{s1.addr}:4000", f"{s2.addr}:4000") == ["reply", "reply"]
    [(ip1, port1)], [(ip2, port2)] = r1.peers(), r2.peers()
    assert ip1 == ip2 == nat.addr
    assert port1 != port2

    # Flushing conntrack forgets the mapping: the same flow gets a new port.
    r1 = UdpServer(s1, 4000)
    nat.flush_conntrack()
    assert udp_send(h, 5000, f"{s1.addr}:4000") == ["reply"]
    [(_, port3)] = r1.peers()
    assert port3 != port1


def test_loss_drops_about_the_given_share(testbed: Testbed) -> None:
    a, b = testbed.add_host("a"), testbed.add_host("b")
    link = testbed.connect(a, b)
    testbed.set_loss(b, 50)  # packets arriving at b: ~50 % of echo requests
    assert 10 <= lost_pings(a, b.addr, 50) <= 40
    testbed.set_loss(b, 0)
    assert lost_pings(a, b.addr, 20) == 0
    testbed.set_loss(link, 30)  # each direction: a round trip loses ~51 %
    assert link.loss_pct == 30
    assert 10 <= lost_pings(a, b.addr, 50) <= 42
    testbed.set_loss(link, 0)
    assert lost_pings(a, b.addr, 20) == 0


def test_bad_arguments_are_refused(testbed: Testbed) -> None:
    a, b = testbed.add_host("a"), testbed.add_host("b")
    with pytest.raises(ConfigError):
        testbed.add_host("a")
    with pytest.raises(ConfigError):
        testbed.add_host("Bad_Name")
    with pytest.raises(ConfigError):
        testbed.connect(a, b, subnet="10.0.0.0/24")
    link = testbed.connect(a, b, subnet="198.18.9.0/30")
    assert (link.a_addr, link.b_addr) == ("198.18.9.1", "198.18.9.2")
    with pytest.raises(ConfigError):
        testbed.connect(a, b, subnet="198.18.9.0/24")  # overlaps
    with pytest.raises(ConfigError):
        a.route("0.0.0.0/0", via=b.addr)
    with pytest.raises(ConfigError):
        testbed.set_loss(a, 101)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_close_leaves_no_namespaces_and_no_processes() -> None:
    before = root_links()
    tb = Testbed(grace=0.5)
    h, srv = tb.add_host("h"), tb.add_host("srv")
    inet = tb.add_lan("inet", [srv])
    tb.add_nat("nat1", [h], inet)
    tb.connect(h, srv, rate_mbit=100, loss_pct=5)
    polite = h.popen(["sleep", "1000"])
    stubborn = srv.popen(
        [sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('ok', flush=True); time.sleep(1000)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert stubborn.stdout is not None and stubborn.stdout.readline().strip() == "ok"
    stray = int(h.run(["sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!"]).stdout)
    namespaces = tb.namespaces
    assert len(namespaces) == 4 and all(ns.startswith(tb.prefix) for ns in namespaces)

    tb.close()
    assert not [ns for ns in list_namespaces() if ns.startswith(tb.prefix)]
    assert polite.poll() is not None and stubborn.poll() == -signal.SIGKILL
    deadline = time.monotonic() + 3
    while _running(stray) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(stray)
    assert not {"br0", "p0", "p1"} & (root_links() - before)
    tb.close()  # idempotent
    with pytest.raises(IpopError):
        tb.add_host("late")


_CHILD = textwrap.dedent(
    """
    import sys, time
    from ipop.testbed.netns import Testbed
    tb = Testbed()
    a = tb.add_host("a")
    p = a.popen(["sleep", "1000"])
    print(a.ns, p.pid, flush=True)
    if sys.argv[1] == "wait":
        time.sleep(1000)
    """
)


@pytest.mark.parametrize("how", ["sigterm", "exit"])
def test_last_resort_cleanup_on_sigterm_and_exit(how: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, "wait" if how == "sigterm" else "exit"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdout is not None
    ns, pid = child.stdout.readline().split()
    if how == "sigterm":
        child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=20) == (-signal.SIGTERM if how == "sigterm" else 0)
    assert ns not in list_namespaces()
    assert not _running(int(pid))


def test_sweep_stale_removes_only_dead_runs(testbed: Testbed) -> None:
    live = testbed.add_host("a")
    alive = {int(d) % 100000 for d in os.listdir("/proc") if d.isdigit()}
    dead = next(n for n in range(99999, 0, -1) if n not in alive)
    stale = f"ipt{dead:05d}f00-x"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        sweep_stale()
        names = list_namespaces()
        assert stale not in names
        assert live.ns in names
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, check=False)


def test_addresses_stay_in_the_underlay(testbed: Testbed) -> None:
    a, b, c = (testbed.add_host(n) for n in ("a", "b", "c"))
    testbed.connect(a, b)
    inet = testbed.add_lan("inet", [a, c])
    nat = testbed.add_nat("nat1", [b], inet, kind="symmetric")
    # Catch-all routes: a LAN beats a veth link, a NAT beats both.
    assert "via 198.19.1.254" in a.run(["ip", "route", "get", "198.18.99.1"]).stdout
    assert "via " + nat.inside.gateway in b.run(["ip", "route", "get", "198.18.99.1"]).stdout
    assert ping(a, b.addr) and ping(b, c.addr)
    for host in (a, b, c, nat):
        out = host.run(["ip", "-o", "-4", "addr", "show"]).stdout
        for cidr in re.findall(r"inet (\S+)", out):
            iface = ipaddress.IPv4Interface(cidr)
            assert iface.ip.is_loopback or iface.network.subnet_of(UNDERLAY), (host.name, cidr)
