"""ICE through real NATs and a real coturn: two ``ipop.nat.probe`` agents, one per namespace.

Topology (``ipop.testbed.netns``)::

      a ──┐                      ┌── b            same LAN: a, b straight on "inet"
          │      +----------+    │
      a ─ nat1 ──| inet br0 |── nat2 ─ b        cone↔cone, sym↔sym, cone↔sym
                 +----------+
                      │
                     srv   coturn :3478 (STUN + TURN, relay-ip = srv)

Each agent gathers, leaves its IceParams in a shared folder, connects, reads its sockets the way
the data plane does (feeding STUN back into aioice), and the controlling one pings through the
selected path (ChannelData framing on relayed paths).  Times from parameters exchanged to
connected are printed (``pytest -s``) and appended to ``connect_times.txt`` in the test's folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ipop.testbed.netns import Host, Testbed
from ipop.testbed.servers import Coturn

TURN_USER, TURN_PASS = "ipop", "s3cret-pass"
DIRECT = {"host", "srflx", "prflx"}


class World:
    def __init__(self, tb: Testbed, tmp: Path) -> None:
        self.tb = tb
        self.tmp = tmp
        self.inet = tb.add_lan("inet")
        self.srv = tb.add_host("srv")
        tb.attach(self.inet, self.srv)
        self.turn = Coturn(
            tmp / "coturn",
            listen_ip=self.srv.addr,
            relay_ip=self.srv.addr,
            users={TURN_USER: TURN_PASS},
            netns=self.srv.ns,
        )

    @property
    def stun(self) -> str:
        return f"{self.srv.addr}:3478"

    @property
    def turn_arg(self) -> str:
        return f"{self.srv.addr}:3478:{TURN_USER}:{TURN_PASS}"

    def host_behind(self, name: str, kind: str | None) -> Host:
        h = self.tb.add_host(name)
        if kind is None:
            self.tb.attach(self.inet, h)
        else:
            self.tb.add_nat(f"nat-{name}", [h], self.inet, kind=kind)  # type: ignore[arg-type]
        return h


@pytest.fixture
def world(testbed: Testbed, tmp_path: Path):
    w = World(testbed, tmp_path)
    w.turn.start()
    try:
        yield w
    finally:
        w.turn.stop()


def run_pair(
    w: World, a: Host, b: Host, label: str, *, extra_a=(), extra_b=(), hold: float = 0.0,
    turn: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    folder = w.tmp / f"x-{label}"
    folder.mkdir()
    common = ["--dir", str(folder), "--stun", w.stun, "--hold", str(hold)]
    if turn:
        common += ["--turn", w.turn_arg]
    procs = []
    for host, name, peer, extra in ((a, "a", "b", extra_a), (b, "b", "a", extra_b)):
        argv = [sys.executable, "-m", "ipop.nat.probe", "--name", name, "--peer", peer, *common]
        argv += ["--log", str(folder / f"{name}.log"), *extra]
        if name == "a":
            argv += ["--controlling", "--ping"]
        procs.append(host.popen(argv, stdout=subprocess.PIPE, text=True))
    outs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=30 + hold)
        outs.append([json.loads(line) for line in out.splitlines() if line.startswith("{")])
    ev_a, ev_b = outs
    for evs in outs:  # close() is quick and leaves no descriptor behind
        closed = event(evs, "closed")
        assert closed is not None and closed["close_s"] < 1.5, evs
        assert closed["fds_after"] == closed["fds_before"], closed
    for side, evs in (("a", ev_a), ("b", ev_b)):
        got = event(evs, "connected")
        if got is not None:
            line = (
                f"{label}: {side} connected in {got['connect_s'] * 1000:.0f} ms "
                f"({got['t']:.2f} s after start) kind={got['kind']} channel={got['channel']} "
                f"{got['local']} -> {got['remote']} rtt={got['rtt_ms']} ms "
                f"close={event(evs, 'closed')['close_s']} s"  # type: ignore[index]
            )
            print(line)
            with open(w.tmp.parent / "connect_times.txt", "a") as f:
                f.write(line + "\n")
    return ev_a, ev_b


def event(evs: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((e for e in evs if e["event"] == name), None)


def connected(evs: list[dict[str, Any]]) -> dict[str, Any]:
    got = event(evs, "connected")
    assert got is not None, evs
    return got


def ponged(evs: list[dict[str, Any]]) -> None:
    pong = event(evs, "pong")
    assert pong is not None and pong["ok"], evs


def test_same_lan_is_host_and_never_uses_overlay_or_excluded_iface(world: World) -> None:
    a = world.host_behind("a", None)
    b = world.host_behind("b", None)
    second = world.tb.add_lan("lan2")
    a_eth1 = world.tb.attach(second, a)
    # An address inside the overlay on a real interface: it must never become a candidate.
    a.run(["ip", "addr", "add", "100.64.0.9/32", "dev", "eth0"])
    ev_a, ev_b = run_pair(world, a, b, "lan", extra_a=["--exclude-iface", "eth1"])
    cands = " ".join(event(ev_a, "gathered")["candidates"])  # type: ignore[index]
    assert "100.64." not in cands and a_eth1 not in cands and a.addr in cands
    for evs in (ev_a, ev_b):
        assert connected(evs)["kind"] == "host"
        assert connected(evs)["channel"] is None
    ponged(ev_a)


def test_cone_to_cone_with_turn_configured_goes_direct(world: World) -> None:
    a = world.host_behind("a", "cone")
    b = world.host_behind("b", "cone")
    ev_a, ev_b = run_pair(world, a, b, "cone-cone")
    for evs in (ev_a, ev_b):
        assert connected(evs)["kind"] in DIRECT - {"host"}, evs
    ponged(ev_a)


def test_symmetric_to_symmetric_relays_through_coturn_and_probes_the_relay(world: World) -> None:
    a = world.host_behind("a", "symmetric")
    b = world.host_behind("b", "symmetric")
    t0 = time.monotonic()
    ev_a, ev_b = run_pair(world, a, b, "sym-sym", hold=7.0, extra_a=["--refresh", "2"],
                          extra_b=["--refresh", "2"])
    assert time.monotonic() - t0 < 25
    ca, cb = connected(ev_a), connected(ev_b)
    assert ca["kind"] == cb["kind"] == "relay", (ca, cb)
    assert ca["channel"] is not None or cb["channel"] is not None
    for c in (ca, cb):
        if c["channel"] is not None:
            assert c["remote_addr"] == [world.srv.addr, 3478]
    ponged(ev_a)
    for evs, c in ((ev_a, ca), (ev_b, cb)):
        counters = event(evs, "counters")
        assert counters is not None, evs
        assert event(evs, "closed_by_ice") is None
        # consent checks are off (the data plane's keepalives are the liveness); the end that
        # relays through its own allocation probes it, and the TURN server's answers (and the
        # channel re-binds) came back through feed (the sockets were taken over from asyncio)
        assert counters.get("stun_in_binding_request", 0) == 0, counters
        if c["channel"] is not None:
            assert counters.get("relay_probe_ok", 0) >= 3, counters
            assert counters.get("relay_probe_missed", 0) == 0, counters
            assert counters.get("stun_in_other_response", 0) >= 3, counters
            assert counters.get("channel_refresh_ok", 0) >= 1, counters


def test_cone_to_symmetric_finds_a_working_path(world: World) -> None:
    a = world.host_behind("a", "cone")
    b = world.host_behind("b", "symmetric")
    ev_a, ev_b = run_pair(world, a, b, "cone-sym")
    ka, kb = connected(ev_a)["kind"], connected(ev_b)["kind"]
    assert (ka == "relay") == (kb == "relay"), (ka, kb)
    ponged(ev_a)


BLOCK = """table inet ipop_block {{
  chain forward {{
    type filter hook forward priority -10; policy accept;
    ip daddr {peer} drop
    ip saddr {peer} drop
  }}
}}
"""


def test_relayed_link_moves_to_direct_when_the_direct_path_opens(world: World) -> None:
    a = world.host_behind("a", "cone")
    b = world.host_behind("b", "cone")
    nat_a, nat_b = world.tb.hosts["nat-a"], world.tb.hosts["nat-b"]
    # Until the agents are up, the two NATs cannot reach each other: only the relay works.
    nat_a.run(["nft", "-f", "-"], input=BLOCK.format(peer=nat_b.addr))
    unblock = threading.Timer(
        4.0, lambda: nat_a.run(["nft", "delete", "table", "inet", "ipop_block"])
    )
    unblock.start()
    try:
        probe = ["--probe-interval", "1.5"]
        ev_a, ev_b = run_pair(world, a, b, "upgrade", hold=6.0, extra_a=probe, extra_b=probe)
    finally:
        unblock.cancel()
    assert connected(ev_a)["kind"] == connected(ev_b)["kind"] == "relay"
    ponged(ev_a)
    for evs in (ev_a, ev_b):
        change = event(evs, "path_change")
        assert change is not None and change["kind"] in DIRECT, evs
        print(f"upgrade: path_change at {change['t']:.2f} s to {change['kind']} "
              f"{change['local']} -> {change['remote']}")
    final = event(ev_a, "pong_final")
    assert final is not None and final["ok"], ev_a
