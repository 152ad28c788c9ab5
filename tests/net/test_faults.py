"""Faults under load: each test runs an iperf3 TCP stream across a 2-node overlay while one fault
strikes, prints the longest gap with no bytes (from the receiver's 0.5 s intervals) and asserts
the issue's targets.  Also: the first on-demand packet in both UID orders, and a link whose
keepalives go unanswered leaving ``up``.

Topology (one prosody and one coturn for the module)::

    srv (prosody :5222, coturn :3478) ─┐
    a, b (public) ──────────────────────┤ inet LAN 198.19.1.0/24
    natX ── hX (inside) ────────────────┘  one NAT box (cone or symmetric) per NATed node

The short versions run in CI (streams of 15-25 s); ``IPOP_LONG_FAULTS=1`` runs the issue's full
versions (60 s streams, prosody away 20 s, coturn away 20 s, a rekey every 10 s for 5 minutes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from ipop.testbed.netns import Host
from ipop.testbed.nodes import NodeProc

from .helpers import ping, ping_until, wait_for
from .world import TURN_PASS, TURN_USER, World, world_fixture

LONG = os.environ.get("IPOP_LONG_FAULTS") == "1"
USERS = [f"f{i}" for i in range(1, 41)]
INTERVAL = 0.5  # iperf3 report interval (s): the gap resolution


@pytest.fixture(scope="module")
def world():
    yield from world_fixture({"flt": USERS}, turn=True)


@pytest.fixture(autouse=True)
def _stop_nodes(world):
    yield
    world.stop_nodes()
    if world.coturn is not None and not world.coturn.running:
        world.coturn.start()
    if not world.prosody.running:
        world.prosody.start()


_n = iter(range(1, 1000))


def node(world: World, nat: str | None = None, **extra: Any) -> NodeProc:
    i = next(_n)
    user = USERS[i - 1]
    host = world.tb.add_host(f"h{user}")
    if nat is None:
        world.tb.attach(world.inet, host)
    else:
        world.tb.add_nat(f"nat{user}", [host], world.inet, kind=nat)  # type: ignore[arg-type]
    srv = world.server_ip
    cfg = {"stun": [f"{srv}:3478"],
           "turn": [{"server": f"{srv}:3478", "user": TURN_USER, "pass": TURN_PASS}],
           "keepalive_seconds": 1.0, "sec": True, **extra}
    return world.node(user, f"100.64.17.{i}", host=host, group="flt", **cfg)


def up(a: NodeProc, b: NodeProc) -> bool:
    try:
        link = a.link_to(b)
    except Exception:
        return False
    return link is not None and link["state"] == "up"


def start_pair(world: World, nat_a: str | None = None, nat_b: str | None = None,
               **extra: Any) -> tuple[NodeProc, NodeProc]:
    a, b = node(world, nat_a, **extra), node(world, nat_b, **extra)
    a.start()
    b.start()
    try:
        ping_until(a.host, b.config["ip4"], timeout=30)
    except AssertionError:
        print(f"--- {a.name}\n{a.log()[-3000:]}\n--- {b.name}\n{b.log()[-3000:]}")
        raise
    return a, b


@dataclass
class Stream:
    """An iperf3 TCP stream from ``client`` to ``server``'s overlay address, in a thread; the
    receiver's JSON intervals tell when bytes arrived."""

    client: Host
    server: Host
    addr: str
    seconds: int
    t0: float = 0.0
    intervals: list[tuple[float, float, int]] = field(default_factory=list)
    client_rc: int | None = None
    error: str = ""
    _thread: threading.Thread | None = None

    def start(self) -> Stream:
        srv = self.server.popen(["iperf3", "-s", "-1", "-J", "-i", str(INTERVAL), "-B",
                                 self.addr], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        wait_for(lambda: ":5201 " in self.server.run(["ss", "-Htln"], check=False).stdout,
                 timeout=5, what="iperf3 server")

        def run() -> None:
            try:
                r = self.client.run(
                    ["iperf3", "-c", self.addr, "-t", str(self.seconds), "-i", str(INTERVAL),
                     "-J", "-b", "200M"], check=False, timeout=self.seconds + 90)
                self.client_rc = r.returncode
                if r.returncode:
                    self.error = r.stdout[-500:] + r.stderr[-500:]
            finally:
                try:
                    out, _ = srv.communicate(timeout=20)
                except subprocess.TimeoutExpired:
                    srv.kill()
                    out, _ = srv.communicate()
                self._parse(out)

        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def _parse(self, out: str) -> None:
        try:
            doc = json.loads(out or "{}")
        except ValueError:
            self.error += " server output not JSON"
            return
        for iv in doc.get("intervals", []):
            s = iv["sum"]
            self.intervals.append((float(s["start"]), float(s["end"]), int(s["bytes"])))

    def wait(self) -> None:
        assert self._thread is not None
        self._thread.join(self.seconds + 120)

    @property
    def survived(self) -> bool:
        return self.client_rc == 0 and bool(self.intervals) and (
            self.intervals[-1][1] >= self.seconds - 1)

    def gaps(self) -> list[tuple[float, float]]:
        """(start, end) of every run of empty intervals, in seconds since the stream began."""
        out: list[tuple[float, float]] = []
        start: float | None = None
        for a, _b, n in self.intervals:
            if n == 0 and start is None:
                start = a
            elif n and start is not None:
                out.append((start, a))
                start = None
        if start is not None:
            out.append((start, self.intervals[-1][1]))
        return out

    def longest_gap(self) -> float:
        return max((b - a for a, b in self.gaps()), default=0.0)

    def at(self) -> float:
        """Seconds since the stream began."""
        return time.monotonic() - self.t0


def report(name: str, s: Stream, **facts: Any) -> None:
    extra = ", ".join(f"{k} {v:.2f} s" if isinstance(v, float) else f"{k} {v}"
                      for k, v in facts.items())
    print(f"\n[fault {name}] longest gap {s.longest_gap():.1f} s, gaps "
          f"{[(round(a, 1), round(b, 1)) for a, b in s.gaps()]}, survived {s.survived}"
          f"{', ' + extra if extra else ''}")


def removed_lines(n: NodeProc) -> list[str]:
    return [ln for ln in n.log().splitlines() if "removed:" in ln or "keepalive timeout" in ln]


# ---- the first on-demand packet ---------------------------------------------------------


def start_unlinked(nodes: tuple[NodeProc, NodeProc], src: NodeProc, dst: NodeProc) -> None:
    """Start ``nodes`` (on demand) and wait until ``src`` sees ``dst`` online, with no link."""
    for n in nodes:
        n.start()
    for n in nodes:
        n.wait_ready()
    wait_for(lambda: any(p["online"] and p["overlay_ip"] == dst.config["ip4"]
                         for p in src.status()["peers"]), timeout=15, what="peer known")
    assert src.status()["links"] == []


@pytest.mark.parametrize("sec", [True, False], ids=["encrypted", "plain"])
@pytest.mark.parametrize("sender", ["higher_uid", "lower_uid"])
def test_on_demand_first_packet_either_uid_order(world: World, sec: bool, sender: str):
    """The first packet of an on-demand link arrives whichever end sends it: the DTLS server
    (higher UID) finishes its handshake first and seals at once; the client holds that early
    frame until its own keys are in."""
    extra = {"on-demand_connection": True, "on-demand_inactive_timeout": 60, "sec": sec}
    x, y = node(world, **extra), node(world, **extra)
    hi, lo = (x, y) if x.uid > y.uid else (y, x)
    src, dst = (hi, lo) if sender == "higher_uid" else (lo, hi)
    start_unlinked((x, y), src, dst)
    t0 = time.monotonic()
    r = src.host.run(["ping", "-n", "-c", "1", "-W", "8", dst.config["ip4"]], check=False,
                     timeout=20)
    took = time.monotonic() - t0
    print(f"\nfirst packet ({'encrypted' if sec else 'plain'}, {sender} sends): "
          f"{'delivered' if r.returncode == 0 else 'LOST'} after {took:.2f} s")
    assert r.returncode == 0, r.stdout
    link = dst.link_to(src)
    assert link is not None and not link["drops"].get("early_expired"), link


# ---- liveness ------------------------------------------------------------------------------

BLOCK = """table inet ipop_fault_block {{
  chain input {{
    type filter hook input priority -10; policy accept;
    ip saddr {peer} drop
  }}
  chain output {{
    type filter hook output priority -10; policy accept;
    ip daddr {peer} drop
  }}
}}
"""


def test_unanswered_keepalives_leave_up_within_four_periods(world: World):
    period = 2.0
    a, b = start_pair(world, keepalive_seconds=period)
    wait_for(lambda: up(a, b), timeout=10, what="link up")
    a.host.run(["nft", "-f", "-"], input=BLOCK.format(peer=b.host.addr))
    t0 = time.monotonic()
    try:
        wait_for(lambda: not up(a, b), timeout=6 * period, step=0.05, what="link leaves up")
        took = time.monotonic() - t0
    finally:
        a.host.run(["nft", "delete", "table", "inet", "ipop_fault_block"], check=False)
    print(f"\nkeepalives unanswered: link left up after {took:.2f} s "
          f"({took / period:.2f} periods of {period:g} s)")
    assert took < 4 * period
    # and once the path is back, the link is made again
    ping_until(a.host, b.config["ip4"], timeout=20)


# ---- (a)-(f) -------------------------------------------------------------------------------


def test_fault_a_node_killed_and_restarted(world: World):
    a, b = start_pair(world)
    s = Stream(a.host, b.host, b.config["ip4"], 60 if LONG else 15).start()
    time.sleep(3)
    b.kill()
    time.sleep(2)
    b.start()
    restarted = time.monotonic()
    wait_for(lambda: up(a, b) and up(b, a), timeout=20, step=0.05, what="re-link")
    relink = time.monotonic() - restarted
    s.wait()
    report("a: node SIGKILLed, restarted 2 s later", s, relink=relink)
    assert relink < 5.0
    assert s.survived, s.error


def test_fault_b_prosody_stopped(world: World):
    away = 20 if LONG else 8
    a, b = start_pair(world)
    s = Stream(a.host, b.host, b.config["ip4"], 60 if LONG else 20).start()
    time.sleep(3)
    world.prosody.stop()  # SIGTERM: a clean shutdown, which sends "unavailable" presences
    time.sleep(away)
    world.prosody.start()
    s.wait()
    wait_for(lambda: a.status()["node"]["xmpp"]["connected"]
             and b.status()["node"]["xmpp"]["connected"], timeout=15, what="xmpp back")
    report(f"b: prosody stopped {away} s", s)
    assert s.survived, s.error
    assert s.longest_gap() == 0.0, s.gaps()
    assert up(a, b) and up(b, a)
    assert removed_lines(a) == [] and removed_lines(b) == []


@pytest.mark.parametrize("nat", ["cone", "symmetric"])
def test_fault_c_nat_mappings_flushed(world: World, nat: str):
    a, b = start_pair(world, nat, None)
    box = world.tb.hosts[f"nat{a.name}"]
    # ICE consent on the old pair of a symmetric NAT expired some 30-40 s after the flush:
    # the short version runs long enough to see a late teardown there
    seconds = 60 if LONG else (45 if nat == "symmetric" else 20)
    s = Stream(a.host, b.host, b.config["ip4"], seconds).start()
    time.sleep(3)
    before = b.link_to(a)["endpoint"]
    box.flush_conntrack()
    flushed = s.at()
    s.wait()
    after = b.link_to(a)["endpoint"]
    report(f"c: conntrack flushed on a {nat} NAT", s, flushed_at=flushed,
           endpoint=f"{before} -> {after}")
    assert s.survived, s.error
    assert s.longest_gap() < 5.0, s.gaps()
    assert up(a, b) and up(b, a)
    assert removed_lines(a) == [] and removed_lines(b) == []  # no teardown later


def test_fault_d_underlay_interface_down(world: World):
    a, b = start_pair(world)
    dev = next(ln.split()[1] for ln in a.host.run(
        ["ip", "-o", "-4", "addr", "show"]).stdout.splitlines() if f" {a.host.addr}/" in ln)
    s = Stream(a.host, b.host, b.config["ip4"], 60 if LONG else 20).start()
    time.sleep(3)
    a.host.run(["ip", "link", "set", "dev", dev, "down"])
    down_at = s.at()
    time.sleep(5)
    a.host.run(["ip", "link", "set", "dev", dev, "up"])
    up_at = s.at()
    s.wait()
    after_up = max((e - up_at for st, e in s.gaps() if e > up_at), default=0.0)
    report("d: underlay interface down 5 s", s, down_at=down_at, up_at=up_at,
           gap_after_up=after_up)
    assert s.survived, s.error
    assert after_up < 5.0, s.gaps()


def test_fault_e_coturn_killed_under_a_relayed_pair(world: World):
    assert world.coturn is not None
    away = 20 if LONG else 8
    # the default keepalive period (10 s): the relay probe, not the keepalives, must notice
    a, b = start_pair(world, "symmetric", "symmetric", keepalive_seconds=10.0)
    wait_for(lambda: up(a, b) and a.link_to(b)["path"] == "relay", timeout=10,
             what="relayed link")
    s = Stream(a.host, b.host, b.config["ip4"], 60 if LONG else 30).start()
    time.sleep(3)
    pid = world.coturn.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: not up(a, b) or not up(b, a), timeout=15, step=0.05,
             what="the dead relay noticed")
    noticed = time.monotonic() - killed
    world.coturn.stop()  # reaps the killed process
    time.sleep(max(0.0, away - (time.monotonic() - killed)))
    world.coturn.start()
    back = time.monotonic()
    recovered = ping_until(a.host, b.config["ip4"], timeout=30)
    relinked = time.monotonic() - back
    s.wait()
    report(f"e: coturn killed under a relayed pair, back after {away} s", s,
           noticed=noticed, first_ping_after_return=recovered, link_after_return=relinked)
    assert noticed < 5.0
    assert relinked < 10.0
    assert a.link_to(b)["path"] == "relay"


@pytest.mark.timeout(600 if LONG else 300)  # the long version streams for 5 minutes
def test_fault_f_rekeys_under_load(world: World):
    every, seconds = (10, 300) if LONG else (5, 30)  # rekey_seconds is 5 at least
    a, b = start_pair(world, rekey_seconds=every)
    s = Stream(a.host, b.host, b.config["ip4"], seconds).start()
    s.wait()
    hs = a.link_to(b)["handshakes"]
    report(f"f: rekey every {every} s for {seconds} s", s, handshakes=hs)
    assert s.survived, s.error
    assert hs >= seconds // every - 2
    assert ping(a.host, b.config["ip4"], count=2)
    assert removed_lines(a) == [] and removed_lines(b) == []


def test_on_demand_first_packets_of_many_flows_on_two_shards(world: World):
    """With ``workers: 2``, 16 UDP flows each send 3 numbered datagrams at once to a peer with
    no link yet: each shard holds what it read until the on-demand link reaches it, then
    sends it on its own copy of the link, so every flow arrives in order."""
    from .test_shards import FLOW_CLIENT, FLOW_SERVER

    extra = {"on-demand_connection": True, "on-demand_inactive_timeout": 60, "workers": 2}
    src, dst = node(world, **extra), node(world, **extra)
    start_unlinked((src, dst), src, dst)
    srv = dst.host.popen([sys.executable, "-c", FLOW_SERVER.replace("settimeout(3)",
                                                                    "settimeout(8)"),
                          dst.config["ip4"]], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        src.host.run([sys.executable, "-c", FLOW_CLIENT, dst.config["ip4"], "16",
                      src.config["ip4"], "3"], timeout=30)
        flows, total, disorder = map(int, srv.stdout.readline().split())
    finally:
        srv.kill()
        srv.wait(5)
    print(f"\n16 flows x 3 datagrams before the link: {total} arrived, {flows} flows, "
          f"disorder {disorder}")
    assert disorder == 0
    assert flows == 16 and total >= 45, total  # (seen: 48 of 48 each run)
