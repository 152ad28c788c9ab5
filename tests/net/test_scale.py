"""Scale: 16 nodes reach a full mesh with no failed set-up; the test bed pins its neighbours.

Topology (``ipop.testbed.overlay``): one LAN, prosody on ``servers``, nodes n1..n16.  The
timing goes to ``ipop scale``, not here: this test asserts correctness only.
"""

from __future__ import annotations

import itertools
import random
import time

from ipop.bench.scale import wait_mesh
from ipop.testbed.netns import Testbed
from ipop.testbed.overlay import Overlay, links_up, overlay_ip, peers_online, setup_failures

from .helpers import ping, wait_for


def test_pinned_neighbours_are_permanent_and_carry_traffic(testbed: Testbed) -> None:
    hosts = [testbed.add_host(f"h{i}") for i in range(3)]
    lan = testbed.add_lan("lan", hosts)
    assert testbed.pin_neighbours(lan) == 3 * 3  # two other members and the gateway, each
    out = hosts[0].run(["ip", "-4", "neigh", "show"]).stdout
    for other in hosts[1:]:
        line = next(ln for ln in out.splitlines() if ln.startswith(lan.members[other.name] + " "))
        assert "PERMANENT" in line, out
    assert lan.gateway in out
    for a, b in itertools.permutations(hosts, 2):
        assert ping(a, lan.members[b.name], count=1), f"{a.name} -> {b.name}"
    # no ARP was needed: the entries are still the permanent ones, none learned
    out = hosts[0].run(["ip", "-4", "neigh", "show"]).stdout
    assert all("PERMANENT" in ln for ln in out.splitlines() if ln.strip()), out
    # an interface that went down lost them; re-pinning that host alone restores them
    dev = lan.devs["h1"]
    hosts[1].run(["ip", "link", "set", dev, "down"])
    hosts[1].run(["ip", "link", "set", dev, "up"])
    assert testbed.pin_neighbours(lan, only=[hosts[1]]) == 3
    assert "PERMANENT" in hosts[1].run(["ip", "-4", "neigh", "show"]).stdout


def test_sixteen_nodes_full_mesh_without_a_failed_setup() -> None:
    n = 16
    ov = Overlay(n, extra={"sec": True})
    try:
        ov.start()
        ov.wait_ready(timeout=90)
        done = wait_mesh(ov, timeout=120)
        states = ov.states()
        up = [len(links_up(s)) for s in states]
        assert done is not None, f"links up per node: {up}"
        assert up == [n - 1] * n
        failures = {node.name: setup_failures(s) for node, s in zip(ov.nodes, states, strict=True)}
        assert sum(failures.values()) == 0, f"failed set-ups: {failures}"
        for state in states:
            assert state is not None
            peers = state["peers"]
            assert len(peers) == n - 1
            assert all(p["online"] and p["linked"] and p["security"] == "dtls" for p in peers)
        # links that say up carry traffic: a sample of ordered pairs, one ping each
        rng = random.Random(16)
        pairs = rng.sample(list(itertools.permutations(range(n), 2)), 24)
        lost = [(a, b) for a, b in pairs
                if not ping(ov.host(a), overlay_ip(b + 1), count=2, interval=0.2)]
        assert not lost, f"pings lost between {lost}"
        for node in ov.nodes:
            assert "Traceback" not in node.log(), node.log()[-3000:]
    finally:
        ov.close()


def test_on_demand_trimmed_links_stay_down_without_traffic() -> None:
    """Both ends wanted the link (traffic went both ways); once it idles out and one end trims
    it, neither end makes it again until traffic asks (no trim/re-create loop)."""
    ov = Overlay(2, extra={"sec": True, "on-demand_connection": True,
                           "on-demand_inactive_timeout": 3})
    try:
        ov.start()
        ov.wait_ready(30)
        a, b = ov.nodes
        wait_for(lambda: all(peers_online(s) == 1 for s in ov.states()), timeout=20,
                 what="presence")
        assert ping(a.host, overlay_ip(2), count=3)
        assert ping(b.host, overlay_ip(1), count=3)
        wait_for(lambda: not any(links_up(s) for s in ov.states()), timeout=20,
                 what="the idle link trimmed")
        made = []
        deadline = time.monotonic() + 8  # more than twice the idle timeout
        while time.monotonic() < deadline:
            made += [len(s["links"]) for s in ov.states() if s is not None and s["links"]]
            time.sleep(0.25)
        assert not made, f"the trimmed link came back without traffic: {made}"
        assert ping(b.host, overlay_ip(1), count=3), "traffic makes it again"
    finally:
        ov.close()
