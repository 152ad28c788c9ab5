"""Whole nodes through real NATs (nftables) with a real coturn: the path ICE picks, traffic on
it, recovery after a NAT mapping change, relay -> direct upgrade, a dead TURN server.

Topology::

    srv (prosody, coturn) ─┐
    a (public) ────────────┤ inet LAN
    natX ── host (inside) ─┘   (one NAT box per NATed node: cone or symmetric)
"""

from __future__ import annotations

import threading
import time

import pytest

from .helpers import gbits, iperf3, ping, ping_until, wait_for
from .world import TURN_PASS, TURN_USER, World, world_fixture

DIRECT = {"host", "srflx", "prflx"}
USERS = [f"u{i}" for i in range(1, 31)]  # one per node the tests start (16 now), with room


@pytest.fixture(scope="module")
def world():
    yield from world_fixture({"nat": USERS}, turn=True)


@pytest.fixture(autouse=True)
def _stop_nodes(world):
    yield
    world.stop_nodes()


_n = iter(range(1, 1000))


def node(world: World, kind: str | None, **extra):
    i = next(_n)
    user = USERS[i - 1]
    host = world.tb.add_host(f"h{user}")
    if kind is None:
        world.tb.attach(world.inet, host)
    else:
        world.tb.add_nat(f"nat{user}", [host], world.inet, kind=kind)
    srv = world.server_ip
    cfg = {"stun": [f"{srv}:3478"],
           "turn": [{"server": f"{srv}:3478", "user": TURN_USER, "pass": TURN_PASS}],
           "keepalive_seconds": 1.0, **extra}
    return world.node(user, f"100.64.9.{i}", host=host, group="nat", **cfg)


def pair(world, kind_a, kind_b, **extra):
    a, b = node(world, kind_a, **extra), node(world, kind_b, **extra)
    t0 = time.monotonic()
    a.start()
    b.start()
    took = ping_until(a.host, b.config["ip4"], timeout=25)
    print(f"\n{kind_a}<->{kind_b}: first ping reply {took:.2f} s after start "
          f"({time.monotonic() - t0:.2f})")
    return a, b


def path_kind(a, b) -> str:
    link = a.link_to(b)
    assert link is not None and link["state"] == "up"
    return link["path"]


@pytest.mark.parametrize(("ka", "kb", "expect", "workers"), [
    (None, None, {"host"}, 1),
    ("cone", "cone", {"srflx", "prflx"}, 1),
    ("symmetric", "symmetric", {"relay"}, 1),
    ("cone", "symmetric", DIRECT | {"relay"}, 1),
    # two shards, encrypted: a relayed link is received by shard 0, and every shard sends
    # through the relay (4 streams, spread over the TUN queues)
    ("symmetric", "symmetric", {"relay"}, 2),
])
def test_path_choice_ping_and_iperf(world, ka, kb, expect, workers):
    a, b = pair(world, ka, kb, workers=workers, **({"sec": True} if workers > 1 else {}))
    assert path_kind(a, b) in expect and path_kind(b, a) in expect
    assert ping(b.host, a.config["ip4"], count=2)
    result = iperf3(a.host, b.host, b.config["ip4"], seconds=2,
                    extra=["-P", "4"] if workers > 1 else None)
    print(f"{ka}<->{kb} path {path_kind(a, b)}: {gbits(result):.3f} Gbit/s")
    assert gbits(result) > 0.005
    if workers > 1:
        shard = a.status()["node"]["counters"]["shards"][0]
        assert shard["alive"] and shard["restarts"] == 0
        assert a.link_to(b)["security"] == "dtls"


def test_nat_mapping_flush_recovers(world):
    """Encrypted link from behind a symmetric NAT to a public node: a flushed mapping gets a
    new port; the authenticated frames from it move the link (roaming)."""
    a, b = pair(world, "symmetric", None, sec=True)
    assert path_kind(b, a) in DIRECT
    nat = world.tb.hosts[f"nat{a.name}"]
    lost_at: list[float] = []
    stop = threading.Event()
    replies: list[float] = []

    def pinger():
        while not stop.is_set():
            if ping(a.host, b.config["ip4"], count=1, wait=1):
                replies.append(time.monotonic())
            time.sleep(0.1)

    th = threading.Thread(target=pinger)
    th.start()
    try:
        time.sleep(1.0)
        old = b.link_to(a)["endpoint"]
        nat.flush_conntrack()
        lost_at.append(time.monotonic())
        wait_for(lambda: replies and replies[-1] > lost_at[0] + 0.5, timeout=10,
                 what="traffic after the flush")
        print(f"\nrecovered {replies[-1] - lost_at[0]:.2f} s after the flush "
              f"({old} -> {b.link_to(a)['endpoint']})")
    finally:
        stop.set()
        th.join(10)


BLOCK = """table inet ipop_block {{
  chain forward {{
    type filter hook forward priority -10; policy accept;
    ip daddr {peer} drop
    ip saddr {peer} drop
  }}
}}
"""


def test_relay_upgrades_to_direct(world):
    """Two cone NATs that cannot reach each other at first: the link comes up on the relay;
    once the NATs can talk, the link moves to a direct path on its own."""
    a, b = node(world, "cone"), node(world, "cone")
    nat_a, nat_b = world.tb.hosts[f"nat{a.name}"], world.tb.hosts[f"nat{b.name}"]
    nat_a.run(["nft", "-f", "-"], input=BLOCK.format(peer=nat_b.addr))
    a.start()
    b.start()
    ping_until(a.host, b.config["ip4"], timeout=25)
    assert path_kind(a, b) == "relay" and path_kind(b, a) == "relay"
    nat_a.run(["nft", "delete", "table", "inet", "ipop_block"])
    t0 = time.monotonic()
    wait_for(lambda: path_kind(a, b) in DIRECT and path_kind(b, a) in DIRECT, timeout=40,
             step=0.5, what="upgrade to a direct path")
    print(f"\nrelay -> {path_kind(a, b)} {time.monotonic() - t0:.2f} s after the block lifted")
    assert ping(a.host, b.config["ip4"], count=3)


def test_dead_turn_server_leaves_direct_links_alone(world):
    a, b = pair(world, "cone", "cone")
    assert path_kind(a, b) in DIRECT
    world.coturn.stop()
    try:
        time.sleep(3)
        assert ping(a.host, b.config["ip4"], count=3)
        assert path_kind(a, b) in DIRECT
    finally:
        world.coturn.start()
