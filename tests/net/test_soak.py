"""Soak: 8 on-demand nodes under random traffic, loss, trims, rekeys and one fault a minute.

The CI version runs 2 minutes; ``IPOP_SOAK_MINUTES=30`` runs the long one, and
``IPOP_SOAK_SEED`` replays a run (the seed is printed); ``IPOP_SOAK_LOGS=DIR`` keeps the nodes'
logs there.  Topology (``ipop.testbed.overlay``)::

    one LAN: servers (prosody) + n1..n8, each host dropping 1 % of what arrives (nftables)

* Nodes: on-demand, encrypted, ``rekey_seconds`` 20, links trimmed after 8 idle seconds, so
  random pairs keep making, using, trimming and re-making links.
* Traffic: one thread sends ping sequences (20 echoes, 0.2 s apart) between random pairs.
* Faults: in the middle of every minute one of: node SIGKILLed and restarted after 2 s, a node's
  underlay interface down for 5 s, prosody restarted, conntrack flushed in a node's namespace.
* Every 10 s (the issue asks for 30), per node: RSS and fds (``/proc``), threads and asyncio tasks
  (status ``runtime``), and its link count.

It passes only when, per node and metric, the least-squares slope over the last half of the run
stays under its limit (fitted together with the node's link count, since fds and tasks follow
the links; a restarted node's series starts again at its new process, leaving out its first
sample, taken while it warms up, and a series of fewer than 4 points is not judged); when every
ping sequence that overlapped no fault window lost no more than its budget; and when no node's
log holds a traceback.  It prints the figures as a table.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ipop.testbed.overlay import Overlay, overlay_ip, peers_online

from .helpers import wait_for

MINUTES = float(os.environ.get("IPOP_SOAK_MINUTES", "2"))
SEED = int(os.environ.get("IPOP_SOAK_SEED", str(random.SystemRandom().randrange(1 << 30))))
NODES = 8
SAMPLE_EVERY = 10.0  # the issue asks for every 30 s; the fit gets more points this way
LOSS_PCT = 1.0
PING_COUNT, PING_GAP = 20, 0.2
LOSS_BUDGET = 4  # echoes of 20: 1 % loss each way (2 % a round trip), a first packet that waits
# for its link's keys, and room so that chance alone fails a run rarely (< 2 % at 2 minutes)
FAULT_GRACE = 15.0  # seconds after a fault ends that still count as its window
# growth limits per minute over the last half of the run: "near zero", above sampling noise
MIN_POINTS = 4  # a series shorter than this (a node restarted late) is shown, not judged
SLOPE_LIMITS = {"rss_mb": 1.0, "fds": 2.0, "threads": 0.5, "asyncio_tasks": 3.0}
# ... and the fitted growth over the judged span must exceed this much too: over the 2-minute
# run's one-minute half, links being made and trimmed move fds and tasks by a few (sockets of an
# ICE gather not yet a link), which a slope over 6 points reads as growth; a real leak at the
# slope limit passes these within 3 minutes of a 30-minute run's 15-minute half
MIN_GROWTH = {"rss_mb": 3.0, "fds": 6.0, "threads": 2.0, "asyncio_tasks": 9.0}
_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")


def slope_per_minute(points: list[tuple[float, float]],
                     links: list[float] | None = None) -> float:
    """Least-squares slope of (seconds, value) points, per minute; 0 with fewer than 2.

    With ``links`` (the node's link count at each point) the fit is value = a + b*t + c*links
    and ``b`` is returned: a node holds a few fds and tasks per link, and on-demand links come
    and go, which is churn, not growth."""
    if len(points) < 2:
        return 0.0
    import numpy as np

    t = np.array([p[0] for p in points], dtype=float)
    v = np.array([p[1] for p in points], dtype=float)
    cols = [np.ones_like(t), t - t.mean()]
    if links is not None:
        cols.append(np.array(links, dtype=float))
    coef, *_ = np.linalg.lstsq(np.stack(cols, axis=1), v, rcond=None)
    return float(60.0 * coef[1])


def test_slope_is_least_squares() -> None:
    assert abs(slope_per_minute([(0, 1.0), (60, 2.0), (120, 3.0)]) - 1.0) < 1e-9
    assert abs(slope_per_minute([(0, 5.0), (30, 5.0)])) < 1e-9
    assert abs(slope_per_minute([(0, 0.0), (30, 1.0), (60, 0.0), (90, 1.0)]) - 0.4) < 1e-9
    # 2 fds per link, links come and go: no growth once the links are accounted for
    pts = [(0, 14.0), (10, 18.0), (20, 16.0), (30, 14.0), (40, 20.0), (50, 16.0)]
    links = [0, 2, 1, 0, 3, 1]
    assert abs(slope_per_minute(pts, links)) < 1e-9
    # links constant: the plain slope
    assert abs(slope_per_minute([(0, 1.0), (60, 2.0)], [2, 2]) - 1.0) < 1e-9


@dataclass
class Sequence:
    start: float
    end: float
    src: int
    dst: int
    sent: int
    received: int


@dataclass
class Soak:
    ov: Overlay
    rng: random.Random
    t0: float = field(default_factory=time.monotonic)
    sequences: list[Sequence] = field(default_factory=list)
    faults: list[tuple[float, float, str]] = field(default_factory=list)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    restarted: set[int] = field(default_factory=set)  # nodes being restarted: no traffic from

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ---- traffic
    def traffic(self) -> None:
        rng = random.Random(self.rng.random())
        while not self.stop.is_set():
            src, dst = rng.sample(range(NODES), 2)
            if src in self.restarted or dst in self.restarted:
                time.sleep(0.2)
                continue
            start = self.now()
            r = self.ov.host(src).run(
                ["ping", "-n", "-q", "-c", str(PING_COUNT), "-i", str(PING_GAP), "-W", "2",
                 overlay_ip(dst + 1)], check=False, timeout=60)
            m = _SUMMARY.search(r.stdout)
            sent, got = (int(m.group(1)), int(m.group(2))) if m else (PING_COUNT, 0)
            self.sequences.append(Sequence(start, self.now(), src, dst, sent, got))
            time.sleep(rng.uniform(0.0, 1.0))

    # ---- samples
    def sample(self) -> None:
        at = self.now()
        for i, node in enumerate(self.ov.nodes):
            proc = node.proc
            if proc is None or proc.poll() is not None:
                continue
            state = self.ov.state(node)
            runtime = ((state or {}).get("node") or {}).get("runtime") or {}
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
            except OSError:
                continue
            rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
            self.samples.setdefault(node.name, []).append({
                "t": at, "pid": proc.pid, "rss_mb": rss_kb / 1024, "fds": fds,
                "threads": runtime.get("threads"), "asyncio_tasks": runtime.get("asyncio_tasks"),
                "links": len((state or {}).get("links", [])), "node": i,
            })

    # ---- faults
    def fault(self) -> None:
        kind = self.rng.choice(["restart", "iface_down", "prosody_restart", "conntrack_flush"])
        i = self.rng.randrange(NODES)
        node, host = self.ov.nodes[i], self.ov.host(i)
        start = self.now()
        if kind == "restart":
            self.restarted.add(i)
            node.kill()
            time.sleep(2)
            node.start()
            node.wait_ready(30)
            self.restarted.discard(i)
            what = f"{node.name} SIGKILLed, restarted after 2 s"
        elif kind == "iface_down":
            dev = self.ov.lan.devs[node.name]
            host.run(["ip", "link", "set", dev, "down"])
            time.sleep(5)
            host.run(["ip", "link", "set", dev, "up"])
            self.ov.tb.pin_neighbours(self.ov.lan, only=[host])  # down flushed them
            what = f"{node.name} underlay interface down 5 s"
        elif kind == "prosody_restart":
            self.ov.prosody.restart()
            what = "prosody restarted"
        else:
            host.run(["conntrack", "-F"], check=False)
            what = f"conntrack flushed in {node.name}"
        self.faults.append((start, self.now(), what))
        print(f"[{start:6.1f} s] fault: {what}", flush=True)

    def in_fault(self, seq: Sequence) -> bool:
        return any(seq.start < end + FAULT_GRACE and seq.end > start
                   for start, end, _ in self.faults)


@pytest.mark.timeout(int(MINUTES * 60) + 240)
def test_soak() -> None:
    print(f"soak: {MINUTES:g} min, seed {SEED} (IPOP_SOAK_SEED={SEED} replays it)", flush=True)
    duration = MINUTES * 60
    ov = Overlay(NODES, extra={
        "sec": True, "on-demand_connection": True, "on-demand_inactive_timeout": 8,
        "rekey_seconds": 20,
    })
    soak = Soak(ov, random.Random(SEED))
    traffic = threading.Thread(target=soak.traffic, name="soak-traffic", daemon=True)
    try:
        for node in ov.nodes:
            ov.tb.set_loss(node.host, LOSS_PCT)
        ov.start()
        ov.wait_ready(60)
        wait_for(lambda: all(peers_online(s) == NODES - 1 for s in ov.states()), timeout=60,
                 what="every node sees every other online")
        soak.t0 = time.monotonic()
        traffic.start()
        next_sample, next_fault = 0.0, 30.0
        while soak.now() < duration:
            if soak.now() >= next_sample:
                soak.sample()
                next_sample += SAMPLE_EVERY
            if soak.now() >= next_fault:
                soak.fault()
                next_fault += 60.0
            time.sleep(0.5)
        soak.sample()
        soak.stop.set()
        traffic.join(60)
        report = check(soak)
        keep = os.environ.get("IPOP_SOAK_LOGS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            for node in ov.nodes:
                (Path(keep) / f"{node.name}.log").write_text(node.log())
    finally:
        soak.stop.set()
        ov.close()
    assert not report, "\n".join(report)


def check(soak: Soak) -> list[str]:
    """Print the figures; return what failed."""
    problems: list[str] = []
    duration = soak.now()
    print(f"\n{'node':<5} {'metric':<14} {'first':>8} {'last':>8} {'slope/min':>10}  (last half)")
    for name, series in sorted(soak.samples.items()):
        pid = series[-1]["pid"]
        mine = [s for s in series if s["pid"] == pid]  # since its last restart
        if mine[0] is not series[0]:
            mine = mine[1:] or mine  # a restarted node's first sample: still warming up
        half = [s for s in mine if s["t"] >= duration / 2]
        for metric, limit in SLOPE_LIMITS.items():
            used = [s for s in half if s[metric] is not None]
            points = [(s["t"], float(s[metric])) for s in used]
            slope = slope_per_minute(points, [float(s["links"]) for s in used])
            short = len(points) < MIN_POINTS
            print(f"{name:<5} {metric:<14} {mine[0][metric]!s:>8.8} {mine[-1][metric]!s:>8.8} "
                  f"{slope:>10.3f}{'  (too few points: not judged)' if short else ''}")
            span = (points[-1][0] - points[0][0]) / 60 if points else 0.0
            if slope > limit and slope * span > MIN_GROWTH[metric] and not short:
                problems.append(f"{name} {metric} grows {slope:.3f}/min over the last half "
                                f"(limit {limit}/min and {MIN_GROWTH[metric]:g} in all): "
                                f"{[p[1] for p in points]}")
    clean = [q for q in soak.sequences if not soak.in_fault(q)]
    faulted = [q for q in soak.sequences if soak.in_fault(q)]
    lost = sum(q.sent - q.received for q in clean)
    sent = sum(q.sent for q in clean)
    print(f"\nping sequences: {len(clean)} outside fault windows ({lost}/{sent} echoes lost), "
          f"{len(faulted)} within ({sum(q.sent - q.received for q in faulted)}/"
          f"{sum(q.sent for q in faulted)} lost)")
    for start, end, what in soak.faults:
        print(f"fault {start:6.1f}-{end:6.1f} s: {what}")
    for q in clean:
        if q.sent - q.received > LOSS_BUDGET:
            problems.append(f"n{q.src + 1} -> n{q.dst + 1} at {q.start:.1f} s lost "
                            f"{q.sent - q.received}/{q.sent} (budget {LOSS_BUDGET})")
    if not clean:
        problems.append("no ping sequence ran outside a fault window")
    for node in soak.ov.nodes:
        if "Traceback" in node.log():
            problems.append(f"{node.name}'s log holds a traceback:\n{node.log()[-3000:]}")
    return problems
