"""A node under attack (issue 16, parts 3 and 4), in the namespace test bed with a real prosody.

    +------------------------------ inet (bridge 198.19.1.0/24) -------------------------------+
        |            |            |            |             |
       srv           a            b            c             v
     prosody     ipop node    ipop node    attacker:     victim of reflection
                 100.64.40.1  100.64.40.2  a rogue group (counts what reaches it)
                                           member's XMPP
                                           client, and an
                                           off-path flooder

A and B are group members with a working link; C is a rogue member of the same group who sends
signaling by hand (``rogue_signal.py``) and datagrams at A's link socket from its own address.
Each test keeps a ping (or an iperf3 stream) running over A↔B and checks it survives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipop.testbed.netns import Host
from ipop.testbed.nodes import NodeProc

from .helpers import gbits, iperf3, ping_until
from .world import DOMAIN, PASSWORD, World, world_fixture

GROUP = "atk"
ATTACKER = Path(__file__).with_name("rogue_signal.py")
FLOODER = Path(__file__).with_name("flooder.c")
FLOOD_SECONDS = 30
SHAPED_MBIT = 300
FORGER = """
import os, socket, struct, sys, time
dst, port, src_uid, dst_uid, rate, seconds = sys.argv[1:7]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
hdr = bytes([0x87]) + bytes.fromhex(src_uid) + bytes.fromhex(dst_uid)
sent, end = 0, time.monotonic() + float(seconds)
while time.monotonic() < end:
    train = struct.pack("!IBB", int.from_bytes(os.urandom(4), "big"), 0, 2)
    s.sendto(hdr + train + os.urandom(1200), (dst, int(port)))
    sent += 1
    time.sleep(1 / float(rate))
print(sent)
"""


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    yield from world_fixture({GROUP: ["a", "b", "c"]})


class Pair:
    def __init__(self, world: World) -> None:
        # encrypted: forged sealed fragments are the interesting case (a plain link drops
        # sealed frames, and plain frames from another address, before anything else)
        self.a = world.node("a", "100.64.40.1", group=GROUP, security_groups=["blue"])
        self.b = world.node("b", "100.64.40.2", group=GROUP, security_groups=["blue"])
        self.c = world.host("c")
        self.v = world.host("v")
        self.world = world


@pytest.fixture(scope="module")
def pair(world: World) -> Iterator[Pair]:
    p = Pair(world)
    p.a.start()
    p.b.start()
    p.a.wait_ready()
    p.b.wait_ready()
    ping_until(p.a.host, "100.64.40.2", timeout=20)
    yield p


def fds(node: NodeProc) -> int:
    assert node.proc is not None
    return len(os.listdir(f"/proc/{node.proc.pid}/fd"))


def cpu_seconds(node: NodeProc) -> float:
    assert node.proc is not None
    fields = Path(f"/proc/{node.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def attack(host: Host, *args: str, timeout: float = 90) -> dict[str, Any]:
    r = host.run([sys.executable, str(ATTACKER), args[0], f"c@{DOMAIN}", PASSWORD,
                  _server_ip(host), GROUP, *args[1:]], check=False, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


_SERVER: dict[str, str] = {}


def _server_ip(_host: Host) -> str:
    return _SERVER["ip"]


@pytest.fixture(autouse=True, scope="module")
def _remember_server(world: World) -> None:
    _SERVER["ip"] = world.server_ip


def link_resets(node: NodeProc) -> int:
    return node.log().count("link to b@")


def counters(node: NodeProc) -> dict[str, int]:
    xmpp = node.status()["node"].get("xmpp") or {}
    out: dict[str, int] = dict(xmpp.get("counters") or {})
    return out


class Pinger:
    """``ping`` over the overlay while an attack runs; ``loss()`` when it is done."""

    def __init__(self, host: Host, addr: str, seconds: float, interval: float = 0.05) -> None:
        count = int(seconds / interval)
        self.proc = host.popen(["ping", "-n", "-q", "-i", str(interval), "-W", "1", "-c",
                                str(count), addr], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)

    def loss(self) -> float:
        out, _ = self.proc.communicate(timeout=120)
        for line in out.splitlines():
            if "packet loss" in line:
                return float(line.split("%")[0].split()[-1])
        raise AssertionError(out)


def test_con_req_flood_is_bounded(pair: Pair) -> None:
    """1,000 con_req in 10 s from a rogue member: bounded CPU, A↔B unaffected, fds back."""
    a = pair.a
    base = fds(a)
    resets = link_resets(a)
    cpu0 = cpu_seconds(a)
    pinger = Pinger(a.host, "100.64.40.2", 14)
    t0 = time.monotonic()
    sent = attack(pair.c, "flood", "a", "1000", "10", pair.world.inet.members["c"])
    took = time.monotonic() - t0
    cpu = cpu_seconds(a) - cpu0
    peak = fds(a)
    loss = pinger.loss()
    # every attempt the flood started is closed once superseded, refused or timed out
    deadline = time.monotonic() + 30
    while fds(a) > base and time.monotonic() < deadline:
        time.sleep(0.5)
    settled = fds(a)
    c = counters(a)
    print(f"\nflood: sent {sent['sent']} in {took:.1f} s; A cpu {cpu:.2f} s; fds {base} -> "
          f"{peak} -> {settled}; ping loss {loss}%; counters {c}")
    assert sent["sent"] == 1000
    assert settled <= base
    assert c.get("inbound_rate_limited_jid", 0) + c.get("inbound_rate_limited_global", 0) >= 900
    assert c.get("con_req_received", 0) <= 100
    assert cpu < 0.5 * took, f"A spent {cpu:.2f} s of CPU in {took:.1f} s"
    assert loss < 5.0
    assert link_resets(a) == resets
    assert a.link_to(pair.b) is not None


def test_candidate_reflection_is_bounded(pair: Pair) -> None:
    """One con_req listing 31 candidates at a victim: A sends only a few checks there."""
    v = pair.v
    victim = pair.world.inet.members["v"]
    v.run(["nft", "-f", "-"], input="table inet count {\n chain input {\n"
          "  type filter hook input priority 0;\n  udp dport 7000-7030 counter\n }\n}\n")
    try:
        time.sleep(6)  # the flood's limiter refills
        attack(pair.c, "reflect", "a", victim)
        time.sleep(10)  # the attempt's checks run until its deadline
        out = v.run(["nft", "-j", "list", "table", "inet", "count"]).stdout
        packets = sum(item["rule"]["expr"][-1]["counter"]["packets"]
                      for item in json.loads(out)["nftables"] if "rule" in item)
    finally:
        v.run(["nft", "delete", "table", "inet", "count"], check=False)
    c = counters(pair.a)
    print(f"\nreflection: {packets} datagrams reached the victim; counters {c}")
    assert 0 < packets <= 16  # 4 host + 4 srflx... each address checked a bounded few times
    assert c.get("candidates_capped", 0) >= 1


def endpoint(node: NodeProc, peer: NodeProc) -> tuple[str, int]:
    """The underlay address where ``peer`` reads its link to ``node`` (as ``node`` sends)."""
    link = node.link_to(peer)
    assert link is not None
    host, _, port = str(link["endpoint"]).rpartition(":")
    return host, int(port)


def test_forged_train_fragments_change_nothing(pair: Pair) -> None:
    """An off-path host sends 50 forged sealed-train fragments a second at each end, with the
    other end's UID: throughput stays within 10% of a clean run, framing stays on trains."""
    a, b = pair.a, pair.b
    # A's underlay egress shaped to SHAPED_MBIT: the stream is then bound by the link, not by
    # the CPU that other work on this 2-core machine shares, so the 10% comparison measures
    # the attack and not the neighbours (the framing check catches a fallback regardless)
    dev = a.host.run(["ip", "-o", "route", "get", endpoint(a, b)[0]]).stdout.split(" dev ")[1]
    dev = dev.split()[0]
    a.host.run(["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                f"{SHAPED_MBIT}mbit", "burst", "256kb", "latency", "20ms"])
    try:
        forged_fragments(pair)
    finally:
        a.host.run(["tc", "qdisc", "del", "dev", dev, "root"], check=False)


def forged_fragments(pair: Pair) -> None:
    a, b = pair.a, pair.b
    clean: list[float] = []
    forged: list[float] = []
    fallbacks = {"clean": 0, "forged": 0}
    for _ in range(3):  # alternated, best of each compared: the machine's load drifts
        for kind in ("clean", "forged"):
            procs = []
            if kind == "forged":
                for src, dst in ((b, a), (a, b)):
                    host, port = endpoint(src, dst)  # where dst reads its link
                    procs.append(pair.c.popen(
                        [sys.executable, "-c", FORGER, host, str(port), src.uid, dst.uid,
                         "50", "5"], stdout=subprocess.PIPE, text=True))
            before = a.link_to(b)["framing"]["fallbacks"]  # type: ignore[index]
            rate = gbits(iperf3(a.host, b.host, "100.64.40.2", seconds=3))
            (clean if kind == "clean" else forged).append(rate)
            for proc in procs:  # the forgers go on for a while after the stream: light load
                proc.communicate(timeout=20)
            time.sleep(0.5)
            fallbacks[kind] += a.link_to(b)["framing"]["fallbacks"] - before  # type: ignore[index]
    drops = b.link_to(a)["drops"]  # type: ignore[index]
    mode = a.link_to(b)["framing"]["mode"]  # type: ignore[index]
    print(f"\nforged fragments: clean {clean} Gbit/s, forged {forged} Gbit/s; fallbacks "
          f"{fallbacks}; B drops {drops}; A framing {mode}")
    assert drops.get("train_chunk_off_path", 0) > 0
    assert fallbacks["forged"] == 0
    assert max(forged) >= 0.9 * max(clean)
    assert a.link_to(b) is not None and b.link_to(a) is not None


def test_garbage_flood_leaves_the_link_up(pair: Pair) -> None:
    """A 30 s flood of mixed garbage at A's link socket: the link survives, ping loss < 10%."""
    a, b = pair.a, pair.b
    binary = pair.world.dir / "flooder"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(FLOODER)], check=True, timeout=60)
    host, port = endpoint(b, a)
    resets = link_resets(a)
    pinger = Pinger(a.host, "100.64.40.2", FLOOD_SECONDS)
    r = pair.c.run([str(binary), host, str(port), str(FLOOD_SECONDS), a.uid],
                   timeout=FLOOD_SECONDS + 30)
    loss = pinger.loss()
    sent = json.loads(r.stdout)
    pps = sent["sent"] / sent["seconds"]
    counters_a = a.status()["node"]["counters"]
    print(f"\n{FLOOD_SECONDS} s flood: {pps / 1000:.0f}k pps sent at {host}:{port}; ping loss "
          f"{loss}%; A socket filter {counters_a.get('socket_filter')}, kernel drops "
          f"{counters_a.get('kernel_drops')}; A drops "
          f"{counters_a['drops']}")
    assert loss < 10.0
    assert counters_a["socket_filter"] is True and counters_a["kernel_drops"] > 0
    assert link_resets(a) == resets
    assert a.link_to(b) is not None and b.link_to(a) is not None
