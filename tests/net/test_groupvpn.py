"""GroupVPN over a real prosody: discovery, set-up, on-demand, restarts, bad input."""

from __future__ import annotations

import itertools
import statistics
import time

import pytest

from .helpers import Subscriber, gbits, iperf3, ping, ping_until, wait_for
from .world import DOMAIN, PASSWORD, World, world_fixture

GROUPS = {
    "four": ["a1", "a2", "a3", "a4"],
    "od": ["o1", "o2"],
    "rk": ["r1", "r2"],
    "ps": ["p1", "p2"],
    "bad": ["b1", "b2", "bx"],
    "dup": ["d1", "d2", "d3"],
    "setup": ["s1", "s2"],
    "scan": ["c1", "c2"],
}


@pytest.fixture(scope="module")
def world():
    yield from world_fixture(GROUPS)


@pytest.fixture(autouse=True)
def _stop_nodes(world):
    yield
    world.stop_nodes()


def start_all(nodes):
    for n in nodes:
        n.start()
    for n in nodes:
        n.wait_ready()


def linked(a, b) -> bool:
    link = a.link_to(b)
    return link is not None and link["state"] == "up"


@pytest.mark.parametrize("workers", [1, 2], ids=["one-shard", "two-shards"])
def test_four_nodes_proactive_all_pairs_ping(world: World, workers: int):
    # two shards: links on ICE's sockets, which shard 0 receives and every shard sends on
    nodes = [world.node(u, f"100.64.1.{i + 1}", group="four", workers=workers,
                        host=world.host(f"{u}-w2") if workers == 2 else None)
             for i, u in enumerate(GROUPS["four"])]
    start_all(nodes)
    for a, b in itertools.permutations(nodes, 2):
        wait_for(lambda a=a, b=b: linked(a, b), timeout=20, what=f"{a.name}->{b.name} link")
    for a, b in itertools.permutations(nodes, 2):
        assert ping(a.host, b.config["ip4"], count=2), f"{a.name} -> {b.name}"
    peers = nodes[0].status()["peers"]
    assert {p["jid"] for p in peers} == {f"{u}@{DOMAIN}" for u in GROUPS["four"][1:]}
    assert all(p["online"] and p["linked"] and p["state"] == "up" for p in peers)
    # every peer offered whole trains in its con_req/con_resp, so every link may send them
    assert {nodes[0].link_to(n)["framing"]["mode"] for n in nodes[1:]} == {"trains"}
    assert nodes[0].status()["node"]["xmpp"]["connected"] is True


def test_setup_time_median_of_five(world: World):
    times = []
    for i in range(5):
        a = world.node("s1", "100.64.7.1", group="setup",
                       host=world.tb.hosts.get("s1") or world.host("s1"))
        b = world.node("s2", "100.64.7.2", group="setup",
                       host=world.tb.hosts.get("s2") or world.host("s2"))
        t0 = time.monotonic()
        a.start()
        b.start()
        ping_until(a.host, "100.64.7.2", timeout=15)
        times.append(time.monotonic() - t0)
        world.stop_nodes()
        del i
    med = statistics.median(times)
    print(f"\nLAN set-up, both nodes started -> first ping reply: median {med:.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in times)})")
    assert med < 10


@pytest.mark.parametrize("workers", [1, 2], ids=["one-shard", "two-shards"])
def test_on_demand_queues_trims_and_recreates(world: World, workers: int):
    # two shards: a miss read by shard 1 is held by the control process
    extra = {"on-demand_connection": True, "on-demand_inactive_timeout": 3, "workers": workers}
    hosts = ([None, None] if workers == 1 else [world.host("o1-w2"), world.host("o2-w2")])
    a = world.node("o1", "100.64.2.1", group="od", host=hosts[0], **extra)
    b = world.node("o2", "100.64.2.2", group="od", host=hosts[1], **extra)
    start_all([a, b])
    wait_for(lambda: len(a.status()["peers"]) == 1 and a.status()["peers"][0]["online"]
             and a.status()["peers"][0]["overlay_ip"] == "100.64.2.2", timeout=15,
             what="peer known")
    time.sleep(1.0)
    assert a.status()["links"] == [] and b.status()["links"] == []  # no link before traffic
    # the first ping's packet is held while the link is made, then delivered
    t0 = time.monotonic()
    r = a.host.run(["ping", "-n", "-c", "1", "-W", "8", "100.64.2.2"], check=False, timeout=20)
    first = time.monotonic() - t0
    assert r.returncode == 0, r.stdout
    print(f"\non-demand first packet delay: {first:.3f} s")
    assert linked(a, b)
    # idle -> trimmed on both sides after the timeout
    t0 = time.monotonic()
    wait_for(lambda: a.status()["links"] == [] and b.status()["links"] == [], timeout=15,
             what="trim")
    print(f"trimmed {time.monotonic() - t0:.2f} s after the last packet")
    assert a.status()["peers"][0]["state"] == "idle"
    t0 = time.monotonic()
    assert ping(b.host, "100.64.2.1", count=1, wait=8)
    print(f"re-created by traffic in {time.monotonic() - t0:.3f} s")
    assert linked(b, a)


def test_killed_peer_is_relinked(world: World):
    a = world.node("r1", "100.64.3.1", group="rk")
    b = world.node("r2", "100.64.3.2", group="rk")
    start_all([a, b])
    ping_until(a.host, "100.64.3.2", timeout=15)
    b.kill()
    b.start()
    b.wait_ready()
    t = ping_until(a.host, "100.64.3.2", timeout=30)
    print(f"\nre-linked {t:.2f} s after the restarted peer came up")


def test_prosody_restart_keeps_links(world: World):
    a = world.node("p1", "100.64.4.1", group="ps")
    b = world.node("p2", "100.64.4.2", group="ps")
    start_all([a, b])
    ping_until(a.host, "100.64.4.2", timeout=15)
    import threading

    result: dict = {}

    def run():
        result["r"] = iperf3(a.host, b.host, "100.64.4.2", seconds=6)

    th = threading.Thread(target=run)
    th.start()
    time.sleep(1.5)
    world.prosody.restart()
    th.join(30)
    assert gbits(result["r"]) > 0.01
    # and the nodes reconnect to the server on their own
    wait_for(lambda: a.status()["node"]["xmpp"]["connected"], timeout=40, what="reconnect")
    assert ping(a.host, "100.64.4.2", count=2)


def test_bad_signaling_input_is_ignored(world: World):
    a = world.node("b1", "100.64.5.1", group="bad")
    b = world.node("b2", "100.64.5.2", group="bad")
    start_all([a, b])
    ping_until(a.host, "100.64.5.2", timeout=15)
    bodies = [
        "not json", "{}", "[1,2]", '{"v": 2, "type": "con_req"}',
        '{"v":1,"type":"con_req","uid":"zz","overlay_id":"bad"}',
        '{"v":1,"type":"con_req","uid":"' + "a" * 40 + '","overlay_id":"bad","ip4":"1.2.3"}',
        '{"v":1,"type":"con_resp","uid":"' + "b" * 40 + '","overlay_id":"bad",'
        '"ip4":"100.64.5.9","fingerprint":"sha-256 ' + ":".join(["AA"] * 32) + '",'
        '"candidates":["host nowhere"]}',
        '{"v":1,"type":"trim","uid":"' + "c" * 40 + '","overlay_id":"other"}',
        "x" * 20000,
    ]
    sender = world.host("bx")
    script = (
        "import asyncio,sys,slixmpp\n"
        "class C(slixmpp.ClientXMPP):\n"
        "  def __init__(s):\n"
        f"    super().__init__('bx@{DOMAIN}', '{PASSWORD}', sasl_mech='SCRAM-SHA-1')\n"
        "    s.enable_direct_tls=False; s.enable_starttls=False; s.enable_plaintext=True\n"
        "    s['feature_mechanisms'].unencrypted_scram=True\n"
        "    s.add_event_handler('session_start', s.go)\n"
        "  async def go(s, _):\n"
        "    s.send_presence()\n"
        "    for line in sys.stdin.read().split('\\n<<>>\\n'):\n"
        f"      s.send_message(mto='b1@{DOMAIN}/'+'', mbody=line, mtype='chat')\n"
        "    await asyncio.sleep(1); s.disconnect()\n"
        "c=C(); c.connect(host=sys.argv[1], port=5222)\n"
        "asyncio.get_event_loop().run_until_complete(c.disconnected)\n"
    )
    r = sender.run([__import__("sys").executable, "-c", script, world.server_ip],
                   input="\n<<>>\n".join(bodies), check=False, timeout=30)
    assert r.returncode == 0, r.stderr[-2000:]
    time.sleep(1)
    assert a.proc.poll() is None and b.proc.poll() is None
    assert ping(a.host, "100.64.5.2", count=2)
    assert "Traceback" not in a.log()


def test_duplicate_address_is_reported(world: World):
    a = world.node("d1", "100.64.6.1", group="dup")
    b = world.node("d2", "100.64.6.2", group="dup")
    c = world.node("d3", "100.64.6.2", group="dup")  # the same address as d2
    start_all([a, b])
    ping_until(a.host, "100.64.6.2", timeout=15)
    c.start()
    c.wait_ready()
    wait_for(lambda: any(p.get("conflict") for p in c.status()["peers"])
             or any(p.get("conflict") for p in a.status()["peers"]), timeout=15,
             what="duplicate reported")
    assert "duplicate overlay address 100.64.6.2" in (a.log() + c.log())
    assert ping(a.host, "100.64.6.2", count=2)  # still reaches the first holder


def test_wrong_password_exits_2(world: World):
    a = world.node("a1", "100.64.8.1", group="four", host=world.host("wp"))
    a.config["xmpp_password"] = "wrong"
    a.start()
    assert a.proc.wait(30) == 2
    lines = [ln for ln in a.log().splitlines() if ln.startswith("ipop:")]
    assert len(lines) == 1 and "xmpp_password" in lines[0]


SCAN = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(4000):
    s.sendto(b"x", (f"100.64.{(i >> 8) & 63}.{i & 255 or 1}", 9))
"""


def test_scan_of_the_prefix_does_not_flood(world: World):
    extra = {"on-demand_connection": True, "ip4_mask": 10}
    a = world.node("c1", "100.64.10.1", group="scan", **extra)
    b = world.node("c2", "100.64.10.2", group="scan", **extra)
    start_all([a, b])
    wait_for(lambda: a.status()["peers"] and a.status()["peers"][0]["online"], timeout=15,
             what="peer online")
    sub = Subscriber(a.control)
    lines_before = len(a.log().splitlines())
    try:
        t0 = time.monotonic()
        a.host.run([__import__("sys").executable, "-c", SCAN], timeout=60)
        events = sub.events(2.0)
        took = time.monotonic() - t0
    finally:
        sub.close()
    unknown = [e for e in events if e["notify"] == "unknown_destination"]
    assert len(unknown) <= 40 + 20 * (took + 1), len(unknown)  # the token bucket holds
    xmpp = a.status()["node"]["xmpp"]
    assert xmpp["counters"].get("setup_failed", 0) == 0
    new_lines = len(a.log().splitlines()) - lines_before
    assert new_lines < 30, a.log()[-3000:]
    # the node still works: the scan's hit on the peer's address made the on-demand link
    ping_until(a.host, "100.64.10.2", timeout=15)
