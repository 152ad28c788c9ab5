"""Routing you can trust: spoofed sources, address claims, subnet routers, exit nodes, IPv6 over
signaling.  Real TUN devices, real prosody, real ping.

Static mesh (spoofing)::

    +------------------- lan (bridge, 198.19.N.0/24) -------------------+
         |                         |                          |
      h1 ipop0 100.64.0.1       h2 ipop0 100.64.0.2        h3 ipop0 100.64.0.3
             2001:db8::1               2001:db8::2                2001:db8::3
      (h2 sends, through its own link to h1, packets that claim h3's addresses)

Signaled (``world``: prosody on the inet bridge 198.19.1.0/24)::

    inet ── R ipop0 100.64.20.1 ── veth 198.18.200.0/24 ── L 198.18.200.2   (subnet router)
    inet ── A (accept_routes true), B (accept_routes false)
    inet ── nat ── C (default route only, exit_node E)     inet ── E ── veth ── F 198.18.201.2
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipop.testbed.netns import Testbed
from ipop.testbed.nodes import static_mesh

from .helpers import ping, ping_until, wait_for
from .world import World, world_fixture

# ---- spoofing -------------------------------------------------------------------------------

LISTEN = """
import json, socket, sys, time
socks = []
for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, 9999)); s.settimeout(0.05); socks.append(s)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1]); got = {}
while time.monotonic() < end:
    for s in socks:
        try:
            data, src = s.recvfrom(2048)
        except socket.timeout:
            continue
        got[data.decode()] = got.get(data.decode(), 0) + 1
print(json.dumps(got), flush=True)
"""

# raw sockets: IPv4 with IP_HDRINCL, IPv6 with IPPROTO_RAW (header included); UDP checksums right
SPOOF = """
import ipaddress, socket, struct, sys

def csum(data):
    if len(data) % 2: data += b"\\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF or 0xFFFF

def udp(src, dst, payload, pseudo):
    hdr = struct.pack("!HHHH", 4000, 9999, 8 + len(payload), 0)
    c = csum(pseudo + hdr + payload)
    return struct.pack("!HHHH", 4000, 9999, 8 + len(payload), c) + payload

src4, dst4, src6, dst6, count, tag = sys.argv[1:7]
s4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
for i in range(int(count)):
    payload = f"{tag}4".encode()
    a, b = ipaddress.IPv4Address(src4).packed, ipaddress.IPv4Address(dst4).packed
    u = udp(a, b, payload, a + b + struct.pack("!BBH", 0, 17, 8 + len(payload)))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(u), i, 0, 64, 17, 0, a, b)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    s4.sendto(ip + u, (dst4, 0))
    payload = f"{tag}6".encode()
    a, b = ipaddress.IPv6Address(src6).packed, ipaddress.IPv6Address(dst6).packed
    u = udp(a, b, payload, a + b + struct.pack("!IxxxB", 8 + len(payload), 17))
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(u), 17, 64, a, b)
    s6.sendto(ip6 + u, (dst6, 0))
print("sent", flush=True)
"""


@pytest.mark.parametrize("sec", [False, True], ids=["plain", "encrypted"])
def test_spoofed_sources_are_dropped_and_counted(testbed: Testbed, tmp_path, sec):
    hosts = [testbed.add_host(f"h{i + 1}") for i in range(3)]
    lan = testbed.add_lan("lan", hosts)
    nodes = static_mesh(hosts, tmp_path, underlay=[lan.members[h.name] for h in hosts],
                        extra={"sec": sec})
    for i, node in enumerate(nodes):
        node.config["ip6"] = f"2001:db8::{i + 1}/64"
        for j, k in enumerate(k for k in range(3) if k != i):
            node.config["peers"][j]["ip6"] = f"2001:db8::{k + 1}"
    # n1 lets n2 carry a LAN (WireGuard's AllowedIPs): its sources pass, kernel routes appear
    nodes[0].config["peers"][0]["allowed_ips"] = ["198.18.210.0/24", "2001:db8:210::/48"]
    for node in nodes:
        node.start()
    for node in nodes:
        node.wait_ready()
    n1, n2, n3 = nodes
    routes = n1.host.run(["ip", "route"]).stdout + n1.host.run(["ip", "-6", "route"]).stdout
    assert "198.18.210.0/24 dev ipop0" in routes and "2001:db8:210::/48 dev ipop0" in routes
    for other in (n2, n3):
        ping_until(n1.host, other.config["ip4"], timeout=15)
        ping_until(n1.host, other.config["ip6"].split("/")[0], timeout=15)
    listener = n1.host.popen([sys.executable, "-c", LISTEN, "6"], stdout=subprocess.PIPE,
                             text=True)
    assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
    # 25 spoofed packets of each family claim n3's addresses; 25 genuine ones carry n2's own
    n2.host.run([sys.executable, "-c", SPOOF, "100.64.0.3", "100.64.0.1", "2001:db8::3",
                 "2001:db8::1", "25", "SPOOF"])
    n2.host.run([sys.executable, "-c", SPOOF, "100.64.0.2", "100.64.0.1", "2001:db8::2",
                 "2001:db8::1", "25", "REAL"])
    n2.host.run([sys.executable, "-c", SPOOF, "198.18.210.5", "100.64.0.1", "2001:db8:210::5",
                 "2001:db8::1", "5", "LAN"])
    got = json.loads(listener.stdout.readline())
    listener.wait(10)
    counters = n1.status()["node"]["counters"]["drops"]
    link = n1.link_to(n2)
    assert link is not None
    print(f"\nsec={sec}: delivered {got}; node drops {counters}; link drops {link['drops']}")
    assert "SPOOF4" not in got and "SPOOF6" not in got
    assert got.get("REAL4", 0) >= 20 and got.get("REAL6", 0) >= 20  # genuine traffic flows
    assert got.get("LAN4", 0) >= 4 and got.get("LAN6", 0) >= 4  # n2's allowed_ips
    assert counters.get("spoofed_source", 0) >= 40
    assert link["drops"].get("spoofed_source", 0) >= 40
    assert "not an address or prefix this peer may use" in n1.log()
    assert n1.log().count("dropped a packet from") <= 15  # rate-limited log lines
    assert ping(n3.host, "100.64.0.1", count=2) and ping(n2.host, "2001:db8::1", count=2)
    assert n1.link_to(n3)["drops"].get("spoofed_source", 0) == 0


TAP_SPOOF = """
import socket, struct, sys
dev, my_mac, victim_mac, victim_ip, dst_ip = sys.argv[1:6]
mac = lambda t: bytes.fromhex(t.replace(":", ""))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((dev, 0))
bcast = b"\\xff" * 6
ip = socket.inet_aton
for _ in range(5):
    # a gratuitous ARP that claims the victim's overlay address for our MAC
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, mac(my_mac), ip(victim_ip),
                      bcast, ip(victim_ip))
    s.send(bcast + mac(my_mac) + b"\\x08\\x06" + arp)
    # a frame sent from the victim's MAC
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac(victim_mac), ip(victim_ip),
                      b"\\0" * 6, ip(dst_ip))
    s.send(bcast + mac(victim_mac) + b"\\x08\\x06" + arp)
print("sent")
"""


def test_tap_members_cannot_use_another_members_ip_or_mac(testbed: Testbed, tmp_path):
    hosts = [testbed.add_host(f"t{i + 1}") for i in range(3)]
    lan = testbed.add_lan("lan", hosts)
    nodes = static_mesh(hosts, tmp_path, underlay=[lan.members[h.name] for h in hosts],
                        extra={"sec": False}, switchmode=True)
    for node in nodes:
        node.start()
    for node in nodes:
        node.wait_ready()
    n1, n2, n3 = nodes
    ping_until(n1.host, "100.64.0.3", timeout=15)
    ping_until(n1.host, "100.64.0.2", timeout=15)

    def mac_of(node) -> str:
        out = node.host.run(["cat", "/sys/class/net/ipop0/address"]).stdout
        return out.strip()

    n3_mac = mac_of(n3)
    n2.host.run([sys.executable, "-c", TAP_SPOOF, "ipop0", mac_of(n2), n3_mac, "100.64.0.3",
                 "100.64.0.1"])
    wait_for(lambda: n1.link_to(n2)["drops"].get("spoofed_source", 0) >= 10, timeout=5,
             what="spoofed ARP frames counted")
    neigh = n1.host.run(["ip", "neigh", "show", "100.64.0.3", "dev", "ipop0"]).stdout
    print(f"\nn1's neighbour entry for 100.64.0.3: {neigh.strip()} (n3 is {n3_mac}); "
          f"drops {n1.link_to(n2)['drops']}")
    assert mac_of(n2) not in neigh
    assert ping(n1.host, "100.64.0.3", count=2) and ping(n1.host, "100.64.0.2", count=2)


def test_hostname_endpoint_is_resolved_and_re_resolved_when_the_link_goes_down(
        testbed: Testbed, tmp_path):
    hosts = [testbed.add_host(f"d{i + 1}") for i in range(2)]
    lan = testbed.add_lan("lan", hosts)
    underlay = [lan.members[h.name] for h in hosts]
    n1, n2 = static_mesh(hosts, tmp_path, underlay=underlay,
                         extra={"sec": False, "keepalive_seconds": 0.5})
    etc = Path("/etc/netns") / hosts[0].ns
    etc.mkdir(parents=True, exist_ok=True)
    try:
        (etc / "hosts").write_text(f"{underlay[1]} n2.ipop.test\n")
        n1.config["peers"][0]["endpoint"] = "n2.ipop.test:5800"
        for node in (n1, n2):
            node.start()
        for node in (n1, n2):
            node.wait_ready()
        ping_until(n1.host, "100.64.0.2", timeout=10)
        assert n1.link_to(n2)["endpoint"].endswith(f"{underlay[1]}:5800")
        # n2 moves to a new underlay address; the name follows it
        new = underlay[1].rsplit(".", 1)[0] + ".200"
        dev = hosts[1].run(["ip", "-o", "-4", "addr", "show", "to", underlay[1]]).stdout.split()[1]
        hosts[1].run(["ip", "addr", "del", f"{underlay[1]}/24", "dev", dev])
        hosts[1].run(["ip", "addr", "add", f"{new}/24", "dev", dev])
        with open(etc / "hosts", "w") as f:  # in place: the namespace's bind mount sees it
            f.write(f"{new} n2.ipop.test\n")
        t0 = time.monotonic()
        wait_for(lambda: n1.link_to(n2)["endpoint"].endswith(f"{new}:5800"), timeout=15,
                 what="link moved to the new address")
        took = ping_until(n1.host, "100.64.0.2", timeout=10)
        print(f"\nre-resolved and reachable {time.monotonic() - t0:.1f} s after the move "
              f"(ping {took:.2f} s)")
        assert "now resolves to" in n1.log()
    finally:
        n1.stop()
        n2.stop()
        shutil.rmtree(etc, ignore_errors=True)


@pytest.mark.parametrize("rw_client", [True, False], ids=["rw-dtls-client", "rw-dtls-server"])
def test_road_warrior_behind_snat_with_2s_udp_timeout(testbed: Testbed, tmp_path, rw_client):
    """S lists W without an endpoint; W, behind an SNAT box whose conntrack UDP timeouts are
    2 s, knows S's.  W's hello makes S try W's mapped address for the handshake; the link is
    keyed, and both sides ping each other for 10 s (keepalives every 0.5 s hold the mapping).
    Both DTLS roles: W as the client (lower UID) and as the server."""
    from ipop.crypto.identity import load_or_create
    from ipop.testbed.nodes import NodeProc

    s_host, w_host = testbed.add_host("rs"), testbed.add_host("rw")
    lan = testbed.add_lan("inet", [s_host])
    nat = testbed.add_nat("rnat", [w_host], lan)
    for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
        nat.run(["sysctl", "-q", "-w", f"net.netfilter.{key}=2"])
    common = {"ip4_mask": 24, "listen_port": 5800, "sec": True, "keepalive_seconds": 0.5}
    s = NodeProc(s_host, tmp_path, "s", {"ip4": "100.64.28.1", **common})
    w = NodeProc(w_host, tmp_path, "w", {"ip4": "100.64.28.2", **common})
    while (w.uid < s.uid) != rw_client:
        shutil.rmtree(w.state_dir)
        w.identity = load_or_create(w.state_dir)
    s.config["peers"] = [{"uid": w.uid, "ip4": "100.64.28.2", "fingerprint": w.fingerprint}]
    w.config["peers"] = [{"uid": s.uid, "ip4": "100.64.28.1", "fingerprint": s.fingerprint,
                          "endpoint": f"{lan.members['rs']}:5800"}]
    try:
        t0 = time.monotonic()
        for node in (s, w):
            node.start()
        for node in (s, w):
            node.wait_ready()
        took = ping_until(w.host, "100.64.28.1", timeout=20)
        ping_until(s.host, "100.64.28.2", timeout=10)
        learned = s.link_to(w)
        held = samples = 0
        end = time.monotonic() + 5  # idle but for keepalives: the mapping holds
        while time.monotonic() < end:
            table = nat.run(["conntrack", "-L", "-p", "udp", "-s", w_host.addr, "-d",
                             lan.members["rs"]], check=False).stdout
            samples += 1
            held += "udp" in table
            time.sleep(0.2)
        assert held == samples, f"mapping lapsed in {samples - held} of {samples} samples"
        results = {}
        for name, src, dst in (("s->w", s, "100.64.28.2"), ("w->s", w, "100.64.28.1")):
            r = src.host.run(["ping", "-n", "-c", "10", "-i", "1", "-W", "1", dst],
                             check=False, timeout=30)
            results[name] = next(x for x in r.stdout.splitlines() if "transmitted" in x)
        print(f"\nrw_client={rw_client}: linked {took:.2f} s after start "
              f"({time.monotonic() - t0:.1f}); S learned {learned['endpoint']} "
              f"(security {learned['security']}); {results}")
        assert learned["security"] == "dtls" and learned["state"] == "up"
        assert nat.addr in learned["endpoint"]  # W's address as its NAT maps it
        for line in results.values():
            sent, got = int(line.split()[0]), int(line.split()[3])
            assert got >= sent - 1, line
        assert "trying" in s.log()
        # W roams: its NAT now maps it to another port; S follows the first frame from there
        # that authenticates (a sealed keepalive)
        nat.run(["nft", "-f", "-"], input=(
            "table ip roam {\n  chain post {\n"
            "    type nat hook postrouting priority 99; policy accept;\n"
            f'    oifname "{nat.out_dev}" meta l4proto udp masquerade to :20000-20100\n'
            "  }\n}\n"))
        nat.flush_conntrack()
        t1 = time.monotonic()
        moved = wait_for(lambda: ":200" in (e := s.link_to(w)["endpoint"]) and e, timeout=10,
                         what="S follows W to its new mapping")
        assert ping(s.host, "100.64.28.2", count=3) and ping(w.host, "100.64.28.1", count=3)
        print(f"roamed to {moved} {time.monotonic() - t1:.1f} s after the NAT changed")
    finally:
        s.stop()
        w.stop()


# ---- signaled ------------------------------------------------------------------------------

GROUPS = {"claim": ["k1", "k2", "k3"], "sub": ["r1", "r2", "r3", "r4"], "badr": ["g1", "gx"],
          "exit": ["e1", "e2", "e3"], "six": ["s1", "s2"], "six-od": ["o1", "o2"],
          "nat2s": ["w1", "w2"]}


@pytest.fixture(scope="module")
def world():
    yield from world_fixture(GROUPS)


@pytest.fixture(autouse=True)
def _stop_nodes(request):
    yield
    if "world" in request.fixturenames:
        request.getfixturevalue("world").stop_nodes()


def start_all(nodes):
    for n in nodes:
        n.start()
    for n in nodes:
        n.wait_ready()


def peer_entry(node, other) -> dict:
    for p in node.status()["peers"]:
        if p["uid"] == other.uid:
            return p
    return {}


def test_address_claim_keeps_the_first_holder(world: World):
    a = world.node("k1", "100.64.21.1", group="claim", ip6="2001:db8:21::1/64")
    b = world.node("k2", "100.64.21.2", group="claim", ip6="2001:db8:21::2/64")
    start_all([a, b])
    ping_until(a.host, "100.64.21.2", timeout=15)
    ping_until(a.host, "2001:db8:21::2", timeout=15)
    # the newcomer claims b's IPv6 address (its IPv4 address is its own)
    c = world.node("k3", "100.64.21.3", group="claim", ip6="2001:db8:21::2/64")
    c.start()
    c.wait_ready()
    entry = wait_for(lambda: peer_entry(a, c).get("conflict"), timeout=15, what="conflict")
    print(f"\na's status for the claimant: {entry}")
    assert "duplicate overlay address 2001:db8:21::2" in entry
    assert a.link_to(c) is None
    assert ping(a.host, "2001:db8:21::2", count=3) and ping(a.host, "100.64.21.2", count=2)
    assert b.link_to(a)["rx_packets"] > 0


def test_subnet_router(world: World):
    """A reaches L (a LAN host behind R) through R; B, with accept_routes false, installs
    nothing; R's status and B's show why."""
    r_host = world.host("rr")
    lan_host = world.tb.add_host("rl")
    world.tb.connect(r_host, lan_host, subnet="198.18.200.0/24")  # R .1, L .2
    lan_host.run(["ip", "route", "replace", "100.64.0.0/10", "via", "198.18.200.1"])
    r = world.node("r1", "100.64.22.1", host=r_host, group="sub",
                   advertise_routes=["198.18.200.0/24"])
    a = world.node("r2", "100.64.22.2", group="sub", accept_routes=True)
    b = world.node("r3", "100.64.22.3", group="sub", accept_routes=False)
    start_all([r, a, b])
    ping_until(a.host, "100.64.22.1", timeout=15)
    ping_until(b.host, "100.64.22.1", timeout=15)
    wait_for(lambda: "198.18.200.0/24 dev ipop0" in a.host.run(["ip", "route"]).stdout,
             timeout=10, what="kernel route on A")
    took = ping_until(a.host, "198.18.200.2", timeout=10)
    assert ping(a.host, "198.18.200.2", count=5)
    print(f"\nA -> L through R: first reply after {took:.2f} s; A's peer entry for R: "
          f"{peer_entry(a, r)}")
    assert peer_entry(a, r)["routes"] == ["198.18.200.0/24"]
    # the LAN host's replies come back from 198.18.200.2: R's link carries that prefix
    assert a.link_to(r)["drops"].get("spoofed_source", 0) == 0
    routes_b = b.host.run(["ip", "route"]).stdout
    assert "198.18.200.0/24" not in routes_b
    assert peer_entry(b, r)["routes_refused"] == [
        {"prefix": "198.18.200.0/24", "reason": "accept_routes is false"}]
    assert not ping(b.host, "198.18.200.2", count=1, wait=1)
    # a second router claims the same prefix: A keeps it with the first
    r4 = world.node("r4", "100.64.22.4", group="sub", advertise_routes=["198.18.200.0/24"])
    r4.start()
    refused = wait_for(lambda: peer_entry(a, r4).get("routes_refused"), timeout=15,
                       what="the second claim refused")
    print(f"A refuses R4's copy of the prefix: {refused}")
    assert refused == [{"prefix": "198.18.200.0/24",
                        "reason": f"already routed to peer {r.uid[:12]}"}]
    assert ping(a.host, "198.18.200.2", count=2)
    r4.stop()
    # the route goes when the link goes
    r.stop()
    wait_for(lambda: "198.18.200.0/24" not in a.host.run(["ip", "route"]).stdout, timeout=15,
             what="route removed with the link")


def test_exit_node(world: World):
    """C's only underlay route is a default via its NAT; with exit_node E its default goes
    through the overlay, so it reaches F, which only E can reach, while its links (to E and to
    D), XMPP and keepalives stay up: underlay sockets carry the fwmark, servers have rules."""
    e_host = world.host("ee")
    far = world.tb.add_host("ef")
    world.tb.connect(e_host, far, subnet="198.18.201.0/24")  # E .1, F .2
    dev_e = e_host.run(["ip", "-o", "-4", "addr", "show", "to", "198.18.201.1"]).stdout.split()[1]
    dev_f = far.run(["ip", "-o", "-4", "addr", "show", "to", "198.18.201.2"]).stdout.split()[1]
    # the test bed's underlay is IPv4 only: this one veth also carries 2001:db8:201::/64
    for host, dev, addr in ((e_host, dev_e, "2001:db8:201::1"), (far, dev_f, "2001:db8:201::2")):
        host.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{dev}.disable_ipv6=0"])
        host.run(["ip", "addr", "add", f"{addr}/64", "dev", dev, "nodad"])
    c_host = world.tb.add_host("ec")
    nat = world.tb.add_nat("enat", [c_host], world.inet)
    gw = nat.inside.gateway if hasattr(nat.inside, "gateway") else None
    route = c_host.run(["ip", "route", "show", "198.18.0.0/15"]).stdout.split()
    via = route[route.index("via") + 1] if "via" in route else gw
    c_host.run(["ip", "route", "del", "198.18.0.0/15"])
    c_host.run(["ip", "route", "add", "default", "via", str(via)])
    e = world.node("e1", "100.64.23.1", host=e_host, group="exit", ip6="2001:db8:23::1/64",
                   advertise_routes=["0.0.0.0/0", "::/0"], snat_routes=True)
    d = world.node("e2", "100.64.23.2", group="exit", ip6="2001:db8:23::2/64")
    c = world.node("e3", "100.64.23.3", host=c_host, group="exit", exit_node="100.64.23.1",
                   ip6="2001:db8:23::3/64")
    start_all([e, d, c])
    took = ping_until(c.host, "100.64.23.1", timeout=25)
    ping_until(c.host, "100.64.23.2", timeout=25)
    wait_for(lambda: "default dev ipop0" in c.host.run(
        ["ip", "route", "show", "table", "26992"]).stdout, timeout=10, what="exit route")
    rules = c.host.run(["ip", "rule"]).stdout
    assert "not from all fwmark 0x6970 lookup 26992" in rules
    assert "suppress_prefixlength 0" in rules and world.server_ip in rules
    reach = ping_until(c.host, "198.18.201.2", timeout=10)
    assert ping(c.host, "198.18.201.2", count=5)
    assert "default dev ipop0" in c.host.run(["ip", "-6", "route", "show", "table",
                                              "26992"]).stdout
    reach6 = ping_until(c.host, "2001:db8:201::2", timeout=10)
    time.sleep(4)  # several keepalive rounds (1 s) with the exit route in place
    state = c.status()
    links = {lk["peer_uid"]: lk for lk in state["links"]}
    print(f"\nC: first overlay reply {took:.2f} s; F reachable after {reach:.2f} s more; "
          f"IPv6 after {reach6:.2f} s; "
          f"links {[(lk['overlay_ip'], lk['state'], lk['path']) for lk in links.values()]}; "
          f"xmpp connected {state['node']['xmpp']['connected']}")
    assert links[e.uid]["state"] == "up" and links[d.uid]["state"] == "up"
    assert state["node"]["xmpp"]["connected"]
    assert ping(c.host, "100.64.23.2", count=2)
    assert peer_entry(c, e)["routes"] == ["0.0.0.0/0", "::/0"]
    # D did not opt in: the exit node's default route is refused there, with the reason
    assert peer_entry(d, e)["routes_refused"][0]["prefix"] == "0.0.0.0/0"
    c.stop()
    assert "26992" not in c.host.run(["ip", "rule"]).stdout  # removed at stop


def test_ipv6_over_prosody(world: World):
    a = world.node("s1", "100.64.24.1", group="six", ip6="2001:db8:24::1/64")
    b = world.node("s2", "100.64.24.2", group="six", ip6="2001:db8:24::2/64")
    start_all([a, b])
    took = ping_until(a.host, "2001:db8:24::2", timeout=15)
    assert ping(b.host, "2001:db8:24::1", count=3)
    assert ping(a.host, "2001:db8:24::2", count=3)
    print(f"\nIPv6 over a signaled link: first reply {took:.2f} s; "
          f"a's entry for b {peer_entry(a, b)['overlay_ip6']}")
    assert peer_entry(a, b)["overlay_ip6"] == "2001:db8:24::2"


def test_on_demand_opens_on_ipv6_traffic(world: World):
    a = world.node("o1", "100.64.25.1", group="six-od", ip6="2001:db8:25::1/64",
                   **{"on-demand_connection": True})
    b = world.node("o2", "100.64.25.2", group="six-od", ip6="2001:db8:25::2/64",
                   **{"on-demand_connection": True})
    start_all([a, b])
    wait_for(lambda: peer_entry(a, b).get("online") and peer_entry(a, b).get("overlay_ip6"),
             timeout=15, what="b's presence with ip6")
    assert a.link_to(b) is None  # on demand: no link yet
    took = ping_until(a.host, "2001:db8:25::2", timeout=15)
    print(f"\non-demand link opened by IPv6 traffic: first reply after {took:.2f} s")
    assert a.link_to(b) is not None


def test_keepalives_hold_a_nat_mapping_with_a_2s_udp_timeout(world: World):
    """W sits behind an SNAT box whose conntrack UDP timeouts are 2 s; after the link is made
    both sides stay idle (keepalives only, every second), then ping each other for 10 s, the
    server first (inbound through the NAT: only a live mapping lets it in)."""
    w_host = world.tb.add_host("ww")
    nat = world.tb.add_nat("wnat", [w_host], world.inet)
    for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
        nat.run(["sysctl", "-q", "-w", f"net.netfilter.{key}=2"])
    assert nat.run(["sysctl", "-n", "net.netfilter.nf_conntrack_udp_timeout"]).stdout.strip() == "2"
    s = world.node("w1", "100.64.26.1", group="nat2s")
    w = world.node("w2", "100.64.26.2", host=w_host, group="nat2s")
    start_all([s, w])
    ping_until(w.host, "100.64.26.1", timeout=20)
    # three timeouts' worth of nothing but keepalives: the mapping must never lapse
    w_in, s_addr = w_host.addr, s.host.addr
    samples, held = 0, 0
    end = time.monotonic() + 6
    while time.monotonic() < end:
        table = nat.run(["conntrack", "-L", "-p", "udp", "-s", w_in, "-d", s_addr],
                        check=False).stdout
        samples += 1
        held += "ASSURED" in table or "udp" in table
        time.sleep(0.2)
    print(f"\nthe mapping was there in {held} of {samples} samples over 6 s")
    assert held == samples
    t0 = time.monotonic()
    results = {}
    for name, src, dst in (("server->w", s, "100.64.26.2"), ("w->server", w, "100.64.26.1")):
        r = src.host.run(["ping", "-n", "-c", "10", "-i", "0.5", "-W", "1", dst], check=False,
                         timeout=30)
        line = next(x for x in r.stdout.splitlines() if "packets transmitted" in x)
        results[name] = line
    print(f"\nbehind a 2 s UDP conntrack timeout, after 6 s idle: {results} "
          f"({time.monotonic() - t0:.1f} s of pings); link {w.link_to(s)['path']}")
    for line in results.values():
        sent, got = int(line.split()[0]), int(line.split()[3])
        assert got >= sent - 1, line
    assert w.link_to(s)["state"] == "up" and s.link_to(w)["state"] == "up"


ROGUE = """
import asyncio, sys, slixmpp
class C(slixmpp.ClientXMPP):
    def __init__(s, jid, pw, to):
        super().__init__(jid, pw, sasl_mech="SCRAM-SHA-1")
        s.to = to
        s.enable_direct_tls = False; s.enable_starttls = False; s.enable_plaintext = True
        s["feature_mechanisms"].unencrypted_scram = True
        s.add_event_handler("session_start", s.go)
    async def go(s, _):
        s.send_presence()
        for line in sys.stdin.read().split("\\n<<>>\\n"):
            s.send_message(mto=s.to, mbody=line, mtype="chat")
        await asyncio.sleep(1); s.disconnect()
c = C(*sys.argv[2:5]); c.connect(host=sys.argv[1], port=5222)
asyncio.get_event_loop().run_until_complete(c.disconnected)
"""


def test_bad_routes_from_signaling_are_refused_with_the_reason(world: World):
    from .world import DOMAIN, PASSWORD

    g = world.node("g1", "100.64.27.1", group="badr", accept_routes=True)
    start_all([g])
    head = ('{"v":1,"type":"con_req","uid":"' + "a" * 40 + '","overlay_id":"badr",'
            '"ip4":"100.64.27.9","fingerprint":"sha-256 ' + ":".join(["AA"] * 32) + '",')
    bodies = [head + '"routes":["198.18.200.1/24"]}',
              head + '"routes":[' + ",".join(f'"198.18.{i}.0/24"' for i in range(65)) + "]}",
              head + '"routes":"198.18.200.0/24"}',
              head + '"routes":["banana"]}']
    sender = world.host("gx")
    r = sender.run([sys.executable, "-c", ROGUE, world.server_ip, f"gx@{DOMAIN}", PASSWORD,
                    f"g1@{DOMAIN}"], input="\n<<>>\n".join(bodies), check=False, timeout=30)
    assert r.returncode == 0, r.stderr[-2000:]
    xmpp = wait_for(lambda: (x := g.status()["node"]["xmpp"])["drops"] and x, timeout=10,
                    what="refusals counted")
    wait_for(lambda: sum(g.status()["node"]["xmpp"]["drops"].values()) >= 4, timeout=10,
             what="four refusals")
    xmpp = g.status()["node"]["xmpp"]
    print(f"\nrefused: drops {xmpp['drops']}, last {xmpp['last_refused']}")
    assert "routes" in xmpp["last_refused"]["reason"]
    assert g.proc is not None and g.proc.poll() is None
    assert g.log().count("routes") >= 1 and "Traceback" not in g.log()
