"""``ipop scale``: how an overlay of N nodes comes up, and what it costs at rest.

Each round builds a fresh ``ipop.testbed.overlay.Overlay`` (N nodes on one LAN with one
prosody, permanent neighbour entries) and then, in proactive mode:

1. starts every node at once; ``ready_s`` is when the last one answers on its control socket;
2. polls the nodes until each has N-1 links ``up``: ``mesh_s`` (from the start) and
   ``mesh_after_ready_s``; ``failures`` sums the set-ups the nodes counted as failed or timed out;
   ``startup_cpu_s`` is the CPU time the nodes had used by then;
3. pings up to ``pings`` random ordered pairs once each through the overlay (``ping_ok``);
4. waits ``settle`` seconds, then samples every node's CPU over ``idle_seconds``
   (``idle_cpu_total_pct`` for all nodes, ``idle_cpu_median_pct`` per node) and its PSS
   (``/proc/PID/smaps_rollup``, ``pss_median_mb`` / ``pss_max_mb``).

In on-demand mode no link exists until traffic needs one: once every node sees the others
online, ``pairs`` random pairs (seeded) each send one ping (``-W`` 5 s); ``delivered`` counts the
pairs whose very first packet was answered, split by which end (lower or higher UID) sent it,
with the time to that reply.

Result document, schema ``ipop-scale/1``::

    {"schema": "ipop-scale/1", "started", "duration_s", "mode", "encrypted", "rounds", "seed",
     "machine": {"cpus", "kernel"},
     "sizes": {N: {"rounds": [ROUND, ...], "median": {KEY: value}}},
     "failures": [text], "notes": [text]}

A proactive ROUND has ``nodes``, ``links`` (N*(N-1), counted from both ends), ``ready_s``,
``mesh_s``, ``mesh_after_ready_s``, ``failures``, ``failure_reasons`` (from the logs: why, and how
often), ``xmpp_drops`` (XMPP sessions lost, from the logs), ``startup_cpu_s`` (CPU seconds all nodes
spent from their start to the mesh; ``startup_cpu_median_s`` per node), ``ping_ok``,
``ping_total``, ``pss_median_mb``, ``pss_max_mb``, ``idle_cpu_total_pct``,
``idle_cpu_median_pct``, ``idle_cpu_max_pct``; ``mesh_s`` is null when the mesh did not
complete within ``mesh_timeout``.  An on-demand ROUND has
``nodes``, ``ready_s``, ``pairs``, ``delivered``, ``delivered_low_first``, ``low_first``,
``delivered_high_first``, ``high_first``, ``first_reply_median_ms``, ``first_reply_max_ms``,
``pss_median_mb``, ``failures``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import random
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ipop.bench import measure
from ipop.errors import ConfigError, IpopError
from ipop.testbed.overlay import Overlay, links_up, overlay_ip, peers_online, setup_failures

SCHEMA = "ipop-scale/1"
Mode = Literal["proactive", "on-demand"]
MEDIAN_KEYS = ("ready_s", "mesh_s", "mesh_after_ready_s", "failures", "xmpp_drops",
               "startup_cpu_s",
               "startup_cpu_median_s", "pss_median_mb",
               "pss_max_mb", "idle_cpu_total_pct", "idle_cpu_median_pct", "idle_cpu_max_pct",
               "delivered", "first_reply_median_ms", "first_reply_max_ms")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_SETUP_FAILED = re.compile(r"link set-up with \S+ (?:failed: (.*)|timed out in state (\w+))")
_XMPP_LOST = re.compile(r"xmpp: (?:connection to \S+ lost|server did not answer a ping)")
_PSS_RE = re.compile(r"^Pss:\s+(\d+) kB", re.MULTILINE)


@dataclass
class ScalePlan:
    sizes: list[int]
    rounds: int = 1
    mode: Mode = "proactive"
    encrypted: bool = True
    pairs: int = 40
    pings: int = 100
    settle: float = 3.0
    idle_seconds: float = 10.0
    mesh_timeout: float = 120.0
    seed: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    """More config keys for every node."""

    def check(self) -> None:
        if not self.sizes or any(not 2 <= n <= 250 for n in self.sizes):
            raise ConfigError("nodes", f"{self.sizes}: every size must be 2 to 250")
        if not 1 <= self.rounds <= 9:
            raise ConfigError("rounds", f"{self.rounds}: must be 1 to 9")
        if self.mode == "on-demand":
            most = max(n * (n - 1) // 2 for n in self.sizes)
            if not 1 <= self.pairs <= most:
                raise ConfigError("pairs", f"{self.pairs}: must be 1 to {most}")

    def node_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"sec": self.encrypted}
        if self.mode == "on-demand":
            extra["on-demand_connection"] = True
            extra["on-demand_inactive_timeout"] = 600
        return {**extra, **self.extra}


Step = Callable[[str], None]


def pss_mb(pid: int) -> float | None:
    """Proportional set size of ``pid`` in MB (10^6 bytes)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    match = _PSS_RE.search(text)
    return None if match is None else round(int(match.group(1)) * 1024 / 1e6, 1)


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _pids(ov: Overlay) -> dict[str, int]:
    return {n.name: n.proc.pid for n in ov.nodes if n.proc is not None}


def wait_mesh(ov: Overlay, timeout: float, poll: float = 0.5) -> float | None:
    """Seconds (monotonic clock) at which every node had all its links up; None on timeout.
    A node that is complete is not asked again, so polling costs little."""
    want = {n.name: {o.uid for o in ov.nodes if o is not n} for n in ov.nodes}
    todo = list(ov.nodes)
    deadline = time.monotonic() + timeout
    while todo and time.monotonic() < deadline:
        rest = []
        for node in todo:
            state = ov.state(node)
            if state is None or not want[node.name] <= links_up(state):
                rest.append(node)
        todo = rest
        if todo:
            time.sleep(poll)
    return None if todo else time.monotonic()


def failure_reasons(ov: Overlay) -> dict[str, int]:
    """Why set-ups failed, from the nodes' logs ("link set-up with JID failed: WHY" or "timed
    out in state S"), counted over all nodes."""
    out: dict[str, int] = {}
    for node in ov.nodes:
        for match in _SETUP_FAILED.finditer(node.log()):
            why = match.group(1) or f"timed out in state {match.group(2)}"
            out[why] = out.get(why, 0) + 1
    return out


def xmpp_drops(ov: Overlay) -> int:
    """XMPP sessions the nodes lost (``connection ... lost`` or an unanswered server ping)."""
    return sum(len(_XMPP_LOST.findall(node.log())) for node in ov.nodes)


def _ping_once(ov: Overlay, src: int, dst: int, wait: int = 2) -> tuple[bool, float]:
    t0 = time.monotonic()
    r = ov.host(src).run(["ping", "-n", "-q", "-c", "1", "-W", str(wait), overlay_ip(dst + 1)],
                         check=False, timeout=wait + 10)
    return r.returncode == 0, time.monotonic() - t0


def _idle(ov: Overlay, plan: ScalePlan, out: dict[str, Any]) -> None:
    time.sleep(plan.settle)
    pids = _pids(ov)
    cpu = measure.idle_cpu(pids, plan.idle_seconds)
    pss = [v for v in (pss_mb(pid) for pid in pids.values()) if v is not None]
    out["pss_median_mb"] = _median(pss)
    out["pss_max_mb"] = max(pss) if pss else None
    out["idle_cpu_total_pct"] = round(sum(cpu.values()), 2)
    out["idle_cpu_median_pct"] = _median(list(cpu.values()))
    out["idle_cpu_max_pct"] = max(cpu.values()) if cpu else None


@contextlib.contextmanager
def _started(
    n: int, plan: ScalePlan, step: Step, label: str
) -> Iterator[tuple[Overlay, float, float]]:
    """A test bed of ``n`` nodes, started and ready: ``(overlay, start time, ready time)``,
    closed on the way out."""
    step(f"{label}: building the test bed")
    ov = Overlay(n, extra=plan.node_extra())
    try:
        step(f"{label}: starting")
        t0 = time.monotonic()
        ov.start()
        ov.wait_ready(timeout=plan.mesh_timeout)
        yield ov, t0, time.monotonic()
    finally:
        ov.close()


def proactive_round(n: int, plan: ScalePlan, step: Step) -> dict[str, Any]:
    with _started(n, plan, step, f"{n} nodes") as (ov, t0, ready):
        step(f"{n} nodes: waiting for the full mesh")
        done = wait_mesh(ov, max(1.0, plan.mesh_timeout - (ready - t0)))
        spent = [measure.cpu_ticks(pid) / _CLK_TCK for pid in _pids(ov).values()]
        states = ov.states()
        out: dict[str, Any] = {
            "nodes": n, "links": sum(len(links_up(s)) for s in states),
            "ready_s": round(ready - t0, 2),
            "mesh_s": None if done is None else round(done - t0, 2),
            "mesh_after_ready_s": None if done is None else round(done - ready, 2),
            "failures": sum(setup_failures(s) for s in states),
            "failure_reasons": failure_reasons(ov),
            "xmpp_drops": xmpp_drops(ov),
            "startup_cpu_s": round(sum(spent), 1),
            "startup_cpu_median_s": _median(spent),
        }
        rng = random.Random(plan.seed * 1000 + n)
        pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
        sample = rng.sample(pairs, min(plan.pings, len(pairs)))
        step(f"{n} nodes: {len(sample)} pings")
        out["ping_total"] = len(sample)
        out["ping_ok"] = sum(1 for a, b in sample if _ping_once(ov, a, b)[0])
        step(f"{n} nodes: idle CPU and memory")
        _idle(ov, plan, out)
        return out


def on_demand_round(n: int, plan: ScalePlan, step: Step) -> dict[str, Any]:
    with _started(n, plan, step, f"{n} nodes (on-demand)") as (ov, t0, ready):
        deadline = ready + plan.mesh_timeout
        while time.monotonic() < deadline:
            if all(peers_online(s) == n - 1 for s in ov.states()):
                break
            time.sleep(0.5)
        else:
            raise IpopError(f"{n} nodes: not every node saw every other online "
                            f"within {plan.mesh_timeout:g} s", reason="presence")
        rng = random.Random(plan.seed * 1000 + n)
        combos = [(a, b) for a in range(n) for b in range(a + 1, n)]
        chosen = [(a, b) if rng.random() < 0.5 else (b, a)
                  for a, b in rng.sample(combos, plan.pairs)]
        step(f"{n} nodes (on-demand): {len(chosen)} first packets")
        out: dict[str, Any] = {"nodes": n, "ready_s": round(ready - t0, 2),
                               "pairs": len(chosen)}
        stats = {"low": [0, 0], "high": [0, 0]}
        replies: list[float] = []
        for a, b in chosen:
            ok, took = _ping_once(ov, a, b, wait=5)
            order = "low" if ov.nodes[a].uid < ov.nodes[b].uid else "high"
            stats[order][1] += 1
            if ok:
                stats[order][0] += 1
                replies.append(took * 1000)
        out["delivered"] = stats["low"][0] + stats["high"][0]
        out["delivered_low_first"], out["low_first"] = stats["low"]
        out["delivered_high_first"], out["high_first"] = stats["high"]
        out["first_reply_median_ms"] = _median(replies)
        out["first_reply_max_ms"] = round(max(replies), 1) if replies else None
        out["failures"] = sum(setup_failures(s) for s in ov.states())
        pss = [v for v in (pss_mb(pid) for pid in _pids(ov).values()) if v is not None]
        out["pss_median_mb"] = _median(pss)
        return out


def summarize(rounds_: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of every numeric key (a missing mesh counts as no value)."""
    med: dict[str, Any] = {}
    for key in MEDIAN_KEYS:
        vals = [r[key] for r in rounds_ if isinstance(r.get(key), int | float)]
        if vals:
            med[key] = round(statistics.median(vals), 2)
        elif any(key in r for r in rounds_):
            med[key] = None
    return med


def run(plan: ScalePlan, step: Step) -> dict[str, Any]:
    """Every size once per round, sizes interleaved (round 1 of all, then round 2...)."""
    plan.check()
    t0 = time.monotonic()
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": plan.mode, "encrypted": plan.encrypted, "rounds": plan.rounds,
        "seed": plan.seed,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "sizes": {str(n): {"rounds": []} for n in plan.sizes},
        "failures": [], "notes": [],
    }
    one = proactive_round if plan.mode == "proactive" else on_demand_round
    for r in range(plan.rounds):

        def in_round(what: str, r: int = r) -> None:
            step(f"round {r + 1}: {what}")

        for n in plan.sizes:
            try:
                res = one(n, plan, in_round)
            except (IpopError, subprocess.SubprocessError, OSError) as exc:
                doc["failures"].append(f"round {r + 1}, {n} nodes: {exc}")
                continue
            res["round"] = r + 1
            doc["sizes"][str(n)]["rounds"].append(res)
            if plan.mode == "proactive" and res.get("mesh_s") is None:
                doc["failures"].append(f"round {r + 1}, {n} nodes: no full mesh within "
                                       f"{plan.mesh_timeout:g} s ({res['links']} of "
                                       f"{n * (n - 1)} link ends up)")
    for entry in doc["sizes"].values():
        entry["median"] = summarize(entry["rounds"])
    doc["duration_s"] = round(time.monotonic() - t0, 1)
    return doc
