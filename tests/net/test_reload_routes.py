"""Routes on live reload (issue 13 with the routing issue): the routing keys change under a
running node, and a TCP stream (iperf3) over another, unchanged link loses no connection.

Signaled (``World``: prosody on the inet bridge 198.19.1.0/24)::

    inet ── R ipop0 100.64.40.1 ─┬─ veth 198.18.200.0/24 ── L1 .2
                                 └─ veth 198.18.202.0/24 ── L2 .2
    inet ── A (accept_routes true)      inet ── B (accept_routes false, then true, then false)
    R advertises 198.18.200.0/24, then (SIGHUP) 198.18.202.0/24, then (ipop reload) both;
    stream R -> B (test 1), B -> A (test 2)

    inet ── nat ── C (default route via its NAT only)      inet ── D
    inet ── E ipop0 100.64.41.1 (advertises 0.0.0.0/0) ── veth 198.18.201.0/24 ── F .2
    inet ── E2 ipop0 100.64.41.4 (0.0.0.0/0, snat) ── veth 198.18.204.0/24 ── F2 .2
    E: snat_routes false -> true (reload); C: exit_node none -> E -> E2 -> none (reload);
    stream C -> D across each reload of C

Static (``testbed``): h1 lets h2 carry 198.18.210.0/24 (allowed_ips) by reload, then not;
stream h1 -> h3.
"""

from __future__ import annotations

import sys
import time

import pytest

from ipop.testbed.netns import Testbed

from .helpers import ping, ping_until, wait_for
from .test_routing import ROGUE, peer_entry, start_all
from .test_service import Stream, ipop_reload, mesh, wait_up
from .world import DOMAIN, PASSWORD, World, world_fixture

GROUPS = {"adv": ["q1", "q2", "q3", "q9"], "acc": ["p1", "p2", "p3"],
          "ex": ["x1", "x2", "x3", "x4"]}


@pytest.fixture(scope="module")
def world():
    yield from world_fixture(GROUPS)


@pytest.fixture(autouse=True)
def _stop_nodes(request):
    yield
    if "world" in request.fixturenames:
        request.getfixturevalue("world").stop_nodes()



def routes_of(host) -> str:
    return host.run(["ip", "route"]).stdout


def removals(node, other) -> list[str]:
    """Log lines saying ``node``'s link to ``other`` was removed (a rebuilt link has one)."""
    return [ln for ln in node.log().splitlines()
            if f"link {other.uid[:12]} removed" in ln
            or (f"link to {other.name}@" in ln and "removed" in ln)]


def router(world: World, name: str, lans: list[str]):
    host = world.host(name)
    for subnet in lans:
        far = world.tb.add_host(f"{name}l{subnet.split('.')[2]}")
        world.tb.connect(host, far, subnet=subnet)  # the router .1, the LAN host .2
        far.run(["ip", "route", "replace", "100.64.0.0/10", "via",
                 subnet.rsplit(".", 1)[0] + ".1"])
    return host


def test_advertise_routes_change_reaches_linked_peers(world: World):
    r_host = router(world, "qr", ["198.18.200.0/24", "198.18.202.0/24"])
    r = world.node("q1", "100.64.40.1", host=r_host, group="adv",
                   advertise_routes=["198.18.200.0/24"])
    a = world.node("q2", "100.64.40.2", group="adv", accept_routes=True)
    b = world.node("q3", "100.64.40.3", group="adv")
    start_all([r, a, b])
    for x, y in ((a, r), (r, a), (r, b), (b, r)):
        wait_up(x, y, timeout=30)
    wait_for(lambda: "198.18.200.0/24 dev ipop0" in routes_of(a.host), timeout=10,
             what="A's route to L1")
    ping_until(a.host, "198.18.200.2", timeout=10)
    before = a.link_to(r)

    # SIGHUP: R advertises L2 instead of L1; A gains one kernel route and loses the other
    stream = Stream(r, b)
    t0 = time.monotonic()
    r.reload({**r.config, "advertise_routes": ["198.18.202.0/24"]})
    wait_for(lambda: "198.18.202.0/24 dev ipop0" in (rt := routes_of(a.host))
             and "198.18.200.0/24" not in rt, timeout=10,
             what=f"A's routes follow R's update\n{a.log()[-1500:]}")
    took = time.monotonic() - t0
    reach = ping_until(a.host, "198.18.202.2", timeout=10)
    assert not ping(a.host, "198.18.200.2", count=2, wait=1)
    stream.finish()
    assert peer_entry(a, r)["routes"] == ["198.18.202.0/24"]
    after = a.link_to(r)
    assert after["rx_packets"] > before["rx_packets"]  # the same link, never rebuilt
    assert after["drops"].get("spoofed_source", 0) == 0  # L2's replies pass as sources
    assert not removals(a, r) and not removals(r, a)
    assert "told the new routes" in r.log() and "now advertises 198.18.202.0/24" in a.log()
    assert "198.18.20" not in routes_of(b.host)  # B accepts nothing

    # `ipop reload`: both LANs; it prints what changed
    r.config = {**r.config, "advertise_routes": ["198.18.200.0/24", "198.18.202.0/24"]}
    r.write_config()
    out = ipop_reload(r)
    assert out.returncode == 0, out
    assert "changed advertise_routes" in out.stdout
    assert f"{a.uid[:12]} told the new routes" in out.stdout, out.stdout
    wait_for(lambda: "198.18.200.0/24 dev ipop0" in routes_of(a.host), timeout=10,
             what="A's route to L1 back")
    assert ping(a.host, "198.18.200.2", count=2) and ping(a.host, "198.18.202.2", count=2)

    # a group member with no link to A sends route updates, one claiming R's UID: refused,
    # counted, logged; A's routes stay as they were
    head = ('{"v":1,"type":"con_resp","uid":"%s","overlay_id":"adv","ip4":"100.64.40.9",'
            '"fingerprint":"sha-256 ' + ":".join(["AB"] * 32) + '","update":true,'
            '"routes":["198.18.250.0/24"]}')
    bodies = [head % ("e" * 40), head % r.uid]
    sender = world.host("q9")
    done = sender.run([sys.executable, "-c", ROGUE, world.server_ip, f"q9@{DOMAIN}", PASSWORD,
                       f"q2@{DOMAIN}"], input="\n<<>>\n".join(bodies), check=False, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    wait_for(lambda: a.status()["node"]["xmpp"]["counters"].get("route_update_refused", 0) >= 2,
             timeout=10, what="the rogue updates refused")
    assert "198.18.250.0/24" not in routes_of(a.host)
    assert peer_entry(a, r)["routes"] == ["198.18.200.0/24", "198.18.202.0/24"]
    assert "route update from q9@" in a.log() and "not from the peer of a link" in a.log()
    assert ping(a.host, "198.18.202.2", count=2)
    print(f"\nA's kernel routes followed R's reload in {took:.2f} s, L2 answered "
          f"{reach:.2f} s later; `ipop reload` printed: {out.stdout.strip()!r}")


def test_accept_routes_flipped_on_reload(world: World):
    r_host = router(world, "pr", ["198.18.203.0/24"])
    r = world.node("p1", "100.64.42.1", host=r_host, group="acc",
                   advertise_routes=["198.18.203.0/24"])
    a = world.node("p2", "100.64.42.2", group="acc")
    b = world.node("p3", "100.64.42.3", group="acc", accept_routes=False)
    start_all([r, a, b])
    for x, y in ((b, r), (b, a), (a, b)):
        wait_up(x, y, timeout=30)
    assert peer_entry(b, r)["routes_refused"] == [
        {"prefix": "198.18.203.0/24", "reason": "accept_routes is false"}]
    assert not ping(b.host, "198.18.203.2", count=1, wait=1)

    stream = Stream(b, a)
    b.reload({**b.config, "accept_routes": True})
    wait_for(lambda: "198.18.203.0/24 dev ipop0" in routes_of(b.host), timeout=10,
             what=f"B installs R's route\n{b.log()[-1500:]}")
    reach = ping_until(b.host, "198.18.203.2", timeout=10)
    stream.finish()
    assert peer_entry(b, r)["routes"] == ["198.18.203.0/24"]
    assert peer_entry(b, r)["routes_refused"] == []

    stream = Stream(b, a)
    b.reload({**b.config, "accept_routes": ["198.18.100.0/24"]})  # a list that leaves it out
    wait_for(lambda: "198.18.203.0/24" not in routes_of(b.host), timeout=10,
             what="B removes R's route")
    assert not ping(b.host, "198.18.203.2", count=2, wait=1)
    stream.finish()
    assert peer_entry(b, r)["routes_refused"] == [
        {"prefix": "198.18.203.0/24", "reason": "outside accept_routes"}]
    assert not removals(b, r) and not removals(b, a)
    print(f"\naccept_routes on: LAN reachable {reach:.2f} s after the route; off: removed")


def test_exit_node_set_then_cleared_on_reload(world: World):
    e_host = world.host("xe")
    far = world.tb.add_host("xf")
    world.tb.connect(e_host, far, subnet="198.18.201.0/24")  # E .1, F .2 (F: no overlay route)
    c_host = world.tb.add_host("xc")
    world.tb.add_nat("xnat", [c_host], world.inet)
    route = c_host.run(["ip", "route", "show", "198.18.0.0/15"]).stdout.split()
    via = route[route.index("via") + 1]
    c_host.run(["ip", "route", "del", "198.18.0.0/15"])
    c_host.run(["ip", "route", "add", "default", "via", via])
    e2_host = world.host("xg")
    far2 = world.tb.add_host("xh")
    world.tb.connect(e2_host, far2, subnet="198.18.204.0/24")  # E2 .1, F2 .2
    e = world.node("x1", "100.64.41.1", host=e_host, group="ex", advertise_routes=["0.0.0.0/0"])
    d = world.node("x2", "100.64.41.2", group="ex")
    c = world.node("x3", "100.64.41.3", host=c_host, group="ex")
    e2 = world.node("x4", "100.64.41.4", host=e2_host, group="ex",
                    advertise_routes=["0.0.0.0/0"], snat_routes=True)
    start_all([e, d, c, e2])
    for x, y in ((c, e), (c, d), (d, c), (c, e2)):
        wait_up(x, y, timeout=30)
    assert not ping(c.host, "198.18.201.2", count=1, wait=1)
    assert "ipop_snat" not in e_host.run(["nft", "list", "tables"]).stdout

    # E masquerades from now on
    e.reload({**e.config, "snat_routes": True})
    wait_for(lambda: "ipop_snat_ipop0" in e_host.run(["nft", "list", "tables"]).stdout,
             timeout=10, what="E's masquerade table")

    # C takes E as its exit node
    stream = Stream(c, d)
    c.reload({**c.config, "exit_node": "100.64.41.1"})
    wait_for(lambda: "default dev ipop0" in c_host.run(
        ["ip", "route", "show", "table", "26992"], check=False).stdout
        and "lookup 26992" in c_host.run(["ip", "rule"]).stdout, timeout=10,
        what=f"C's exit route and rules\n{c.log()[-1500:]}")
    rules = c_host.run(["ip", "rule"]).stdout
    assert "not from all fwmark 0x6970 lookup 26992" in rules
    assert "suppress_prefixlength 0" in rules and world.server_ip in rules
    reach = ping_until(c.host, "198.18.201.2", timeout=10)
    stream.finish()
    state = c.status()
    assert state["node"]["xmpp"]["connected"]
    assert {lk["state"] for lk in state["links"]} == {"up"} and len(state["links"]) == 3
    assert peer_entry(c, e)["routes"] == ["0.0.0.0/0"] and peer_entry(c, e2)["routes"] == []

    # to another exit node: the default route moves to E2's link
    stream = Stream(c, d)
    c.reload({**c.config, "exit_node": "100.64.41.4"})
    wait_for(lambda: peer_entry(c, e2)["routes"] == ["0.0.0.0/0"], timeout=10,
             what="the default route moves to E2")
    assert peer_entry(c, e)["routes"] == []
    reach2 = ping_until(c.host, "198.18.204.2", timeout=10)
    assert "not from all fwmark 0x6970 lookup 26992" in c_host.run(["ip", "rule"]).stdout
    stream.finish()

    # and leaves it again: no rule, no table, F out of reach, the underlay still there
    stream = Stream(c, d)
    c.reload({k: v for k, v in c.config.items() if k != "exit_node"})
    wait_for(lambda: "26992" not in c_host.run(["ip", "rule"]).stdout, timeout=10,
             what="C's exit rules removed")
    assert "default" not in c_host.run(["ip", "route", "show", "table", "26992"],
                                       check=False).stdout
    assert not ping(c.host, "198.18.204.2", count=2, wait=1)
    assert ping(c.host, world.server_ip, count=2)  # the XMPP server, over the underlay
    stream.finish()
    time.sleep(2)  # keepalive rounds after the change
    state = c.status()
    assert state["node"]["xmpp"]["connected"]
    assert {lk["state"] for lk in state["links"]} == {"up"} and len(state["links"]) == 3
    assert peer_entry(c, e)["routes"] == [] and peer_entry(c, e2)["routes"] == []
    assert not removals(c, e) and not removals(c, d) and not removals(c, e2)

    e.reload({**e.config, "snat_routes": False})
    wait_for(lambda: "ipop_snat" not in e_host.run(["nft", "list", "tables"]).stdout,
             timeout=10, what="E's masquerade table removed")
    print(f"\nC reached F through E {reach:.2f} s after its exit route, F2 through E2 "
          f"{reach2:.2f} s after the switch; cleared cleanly; "
          f"links and XMPP up throughout")


SEND4 = """
import ipaddress, socket, struct, sys
src, dst, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
payload = b"LAN4"
a, b = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
udp = struct.pack("!HHHH", 4000, 9999, 8 + len(payload), 0) + payload
for i in range(count):
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i, 0, 64, 17, 0, a, b)
    s.sendto(ip + udp, (dst, 0))
"""


def test_static_allowed_ips_change_keeps_the_link(testbed: Testbed, tmp_path):
    n1, n2, n3 = mesh(testbed, tmp_path, 3, sec=False)
    start_all([n1, n2, n3])
    wait_up(n1, n2)
    wait_up(n1, n3)
    def with_allowed(ips):
        peers = [{**p, "allowed_ips": ips} if p["uid"] == n2.uid else p
                 for p in n1.config["peers"]]
        return {**n1.config, "peers": peers}

    def lan_packets_counted() -> int:
        link = n1.link_to(n2)
        return int(link["drops"].get("spoofed_source", 0))

    before = n1.link_to(n2)
    stream = Stream(n1, n3)
    n1.reload(with_allowed(["198.18.210.0/24"]))
    wait_for(lambda: "198.18.210.0/24 dev ipop0" in routes_of(n1.host), timeout=10,
             what="n1's route for n2's allowed_ips")
    stream.finish()
    dropped = lan_packets_counted()
    n2.host.run([sys.executable, "-c", SEND4, "198.18.210.5", "100.64.0.1", "5"])
    time.sleep(0.5)
    assert lan_packets_counted() == dropped  # a source n2 may use now
    link = n1.link_to(n2)
    assert link["rx_packets"] > before["rx_packets"]  # the same link

    n1.config = with_allowed([])
    n1.write_config()
    out = ipop_reload(n1)
    assert out.returncode == 0 and f"{n2.uid[:12]} allowed_ips -198.18.210.0/24" in out.stdout, (
        out)
    assert "198.18.210.0/24" not in routes_of(n1.host)
    n2.host.run([sys.executable, "-c", SEND4, "198.18.210.5", "100.64.0.1", "5"])
    wait_for(lambda: lan_packets_counted() >= dropped + 5, timeout=5,
             what="packets from the prefix n2 may no longer use counted")
    assert not removals(n1, n2) and ping(n1.host, n2.config["ip4"], count=2)
