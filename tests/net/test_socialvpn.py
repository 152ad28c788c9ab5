"""SocialVPN over a real prosody: three users, one overlapping subnet each, friends by roster.

Every user gives itself 100.64.0.1/24 and sees each friend at a local address of its own view;
translation in the data plane keeps TCP, UDP and ICMP working and checksums valid.
"""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
import time

import pytest

from .helpers import iperf3, ping, ping_until, wait_for
from .world import DOMAIN, TURN_PASS, TURN_USER, World, world_fixture

USERS = ["alice", "bob", "carol"]


@pytest.fixture(scope="module")
def world():
    yield from world_fixture({}, users=[*USERS, "dave", "erin"], turn=True)


@pytest.fixture
def social(world: World):
    nodes = {u: world.node(u, "100.64.0.1", group=None, controller="socialvpn", sec=True,
                           host=world.tb.hosts.get(u) or world.host(u))
             for u in USERS}
    for n in nodes.values():
        n.config.pop("group", None)
        n.start()
    for n in nodes.values():
        n.wait_ready()
    for a, b in itertools.permutations(USERS, 2):
        nodes[a].call("add_friend", {"jid": f"{b}@{DOMAIN}"})
    for a, b in itertools.permutations(USERS, 2):
        wait_for(lambda a=a, b=b: friend(nodes[a], b) and friend(nodes[a], b)["linked"],
                 timeout=30, what=f"{a} linked to {b}")
    yield nodes
    world.stop_nodes()


def friend(node, user):
    for p in node.status()["peers"]:
        if p["jid"] == f"{user}@{DOMAIN}":
            return p
    return None


def local_ip(node, user) -> str:
    return friend(node, user)["overlay_ip"]


def test_each_pings_each_friend_in_its_own_view(social):
    for a, b in itertools.permutations(USERS, 2):
        addr = local_ip(social[a], b)
        assert addr != "100.64.0.1"
        assert ping(social[a].host, addr, count=2), f"{a} -> {b} at {addr}"
    # the status names each friend next to its local address
    peers = social["alice"].status()["peers"]
    assert {p["name"] for p in peers} == {f"bob@{DOMAIN}", f"carol@{DOMAIN}"}
    assert all(p["real_ip"] == "100.64.0.1" for p in peers)


def test_tun_captures_show_translated_addresses(social):
    alice, bob = social["alice"], social["bob"]
    bob_at_alice, alice_at_bob = local_ip(alice, "bob"), local_ip(bob, "alice")
    caps = []
    for node in (alice, bob):
        caps.append(node.host.popen(["tcpdump", "-n", "-l", "-i", "ipop0", "-c", "2", "icmp"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    time.sleep(1.0)
    assert ping(alice.host, bob_at_alice, count=1)
    outs = []
    for cap in caps:
        try:
            out, _ = cap.communicate(timeout=10)
        finally:
            cap.kill()
        outs.append(out)
    assert f"100.64.0.1 > {bob_at_alice}: ICMP echo request" in outs[0], outs[0]
    assert f"{bob_at_alice} > 100.64.0.1: ICMP echo reply" in outs[0], outs[0]
    assert f"{alice_at_bob} > 100.64.0.1: ICMP echo request" in outs[1], outs[1]
    assert f"100.64.0.1 > {alice_at_bob}: ICMP echo reply" in outs[1], outs[1]


SERVER = """
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("100.64.0.1", 7000)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(65536)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""
CLIENT = """
import socket, sys
data = sys.stdin.buffer.read()
c = socket.create_connection((sys.argv[1], 7000), timeout=10); c.sendall(data); c.close()
"""


def test_tcp_file_crosses_byte_exact_and_udp_transfer(social):
    carol, bob = social["carol"], social["bob"]
    data = hashlib.sha256(b"seed").hexdigest().encode() * 100_000  # 6.4 MB of ASCII
    srv = bob.host.popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert srv.stdout.readline().strip() == "ready"
    r = carol.host.run([sys.executable, "-c", CLIENT, local_ip(carol, "bob")],
                       input=data.decode(), check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    n, digest = srv.stdout.readline().split()
    srv.wait(10)
    assert int(n) == len(data) and digest == hashlib.sha256(data).hexdigest()
    res = iperf3(carol.host, bob.host, "100.64.0.1", seconds=2, extra=["-u", "-b", "50M"],
                 connect=local_ip(carol, "bob"))
    assert res["end"]["sum"]["packets"] > 100


def test_removing_a_subscription_removes_the_peer(social):
    alice, carol = social["alice"], social["carol"]
    alice.call("remove_friend", {"jid": f"carol@{DOMAIN}"})
    wait_for(lambda: friend(alice, "carol") is None and friend(carol, "alice") is None,
             timeout=20, what="friendship removed on both sides")
    assert len(alice.status()["links"]) == 1  # only bob is left


def test_mapping_survives_restart(social, world):
    bob = social["bob"]
    before = {u: local_ip(bob, u) for u in ("alice", "carol")}
    bob.stop()
    bob.start()
    bob.wait_ready()
    wait_for(lambda: all(friend(bob, u) and friend(bob, u)["linked"] for u in before),
             timeout=30, what="bob re-linked")
    assert {u: local_ip(bob, u) for u in before} == before
    assert ping(bob.host, before["alice"], count=2)


def test_on_demand_encrypted_friend_behind_a_nat(world: World):
    """SocialVPN with the other options: on-demand links, encryption, a friend behind a NAT."""
    srv = world.server_ip
    extra = {"controller": "socialvpn", "sec": True, "on-demand_connection": True,
             "stun": [f"{srv}:3478"],
             "turn": [{"server": f"{srv}:3478", "user": TURN_USER, "pass": TURN_PASS}]}
    dave = world.node("dave", "100.64.0.1", group=None, **extra)
    erin_host = world.tb.add_host("erin")
    world.tb.add_nat("naterin", [erin_host], world.inet, kind="cone")
    erin = world.node("erin", "100.64.0.1", group=None, host=erin_host, **extra)
    for n in (dave, erin):
        n.config.pop("group", None)
        n.start()
    for n in (dave, erin):
        n.wait_ready()
    dave.call("add_friend", {"jid": f"erin@{DOMAIN}"})
    erin.call("add_friend", {"jid": f"dave@{DOMAIN}"})
    wait_for(lambda: friend(dave, "erin") and friend(dave, "erin")["online"], timeout=20,
             what="friend online")
    assert dave.status()["links"] == []  # on demand: nothing before traffic
    addr = local_ip(dave, "erin")
    ping_until(dave.host, addr, timeout=25)
    link = dave.status()["links"][0]
    assert link["security"] == "dtls" and link["path"] in {"srflx", "prflx", "host", "relay"}
    world.stop_nodes()
