"""Walk the benchmark plan, one system at a time, and collect the result document.

Topology: two hosts ``a`` (sender, iperf3 client) and ``b`` (receiver) on one veth pair; every
system runs between them in turn, alone on the machine's cores::

      +-------+ eth0                         eth0 +-------+
      |   a   |-----------------------------------|   b   |
      +-------+ 198.18.1.1/24       198.18.1.2/24 +-------+
       ipop0 100.64.0.1 / wg 100.65.0.1 / tinc 100.66.0.1  (.2 on b)

For each system: start it (until a ping crosses), sample its idle CPU, then for each link
condition (unshaped veth, then ``tc tbf`` 1 Gbit/s): ping RTT, TCP one stream (with the CPU of
its processes), TCP four and eight streams, the UDP packet-size sweep, TCP under 1 % and 3 %
loss.  A case that fails is recorded as null with the reason; a system that fails to start
loses its cases.
"""

from __future__ import annotations

import datetime
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipop.bench import SCHEMA, lossy, measure, rounds
from ipop.bench.lossy import LossModel
from ipop.bench.peers import SYSTEMS, Ipop, System
from ipop.config import resolve_workers
from ipop.errors import IpopError
from ipop.testbed.netns import Link, Testbed

LINKS: dict[str, tuple[str, float | None]] = {
    "veth": ("unshaped veth", None),
    "tbf1g": ("tbf 1 Gbit/s", 1000.0),
}
SIZES = (64, 128, 256, 512, 1024, 1400)
QUICK_SIZES = (64, 1400)
LOSSES = (1, 3)


@dataclass
class Plan:
    systems: list[str]
    links: list[str]
    seconds: int = 5
    sweep_seconds: int = 2
    sizes: tuple[int, ...] = SIZES
    losses: tuple[int, ...] = LOSSES
    ping_count: int = 20
    ping_interval: float = 0.05
    idle_seconds: float = 3.0
    idle_settle: float = 1.0
    """Seconds between the first ping and the idle CPU sample."""
    settle: float = 0.3
    """Seconds between cases, so that queues drain."""
    loss_model: LossModel = "testbed"
    quick: bool = False
    rounds: int = 1
    """Times every system is measured, interleaved (round 1 of all systems, then round 2...);
    the results are the medians (``ipop.bench.rounds``)."""
    skipped: dict[str, str] = field(default_factory=dict)
    workers: int | None = None
    """The ``workers`` both ipop nodes run with (None: their default, ``auto``)."""

    def cases(self) -> list[str]:
        """Case names of one link condition, in the order they run."""
        return (["ping", "tcp1", "tcp4", "tcp8"] + [f"sweep{s}" for s in self.sizes]
                + [f"loss{p}" for p in self.losses])

    def steps(self) -> int:
        """Progress steps: start + idle per system, and every case of every link."""
        return self.rounds * len(self.systems) * (2 + len(self.links) * len(self.cases()))


Step = Callable[[str], None]
"""Progress hook: called with a description when a step begins."""


class Runner:
    """Runs a ``Plan`` in a test bed of its own; ``begin``/``done`` drive a progress display."""

    def __init__(self, plan: Plan, begin: Step, done: Callable[[int], None]) -> None:
        self.plan = plan
        self.begin = begin
        self.done = done
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.log_notes: dict[str, str] = {}  # per system, the last round's: rounds repeat them
        self.round = ""  # "round 2/3: " while several rounds run, for the progress lines

    def run(self) -> dict[str, Any]:
        plan = self.plan
        started = datetime.datetime.now(datetime.UTC)
        t0 = time.monotonic()
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "started": started.isoformat(timespec="seconds"),
            "seconds": plan.seconds,
            "sweep_seconds": plan.sweep_seconds,
            "quick": plan.quick,
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                        "iperf3": measure.first_line(["iperf3", "--version"]),
                        "loadavg_start": _loadavg()},
            "links": {name: LINKS[name][0] for name in plan.links},
            "sizes": list(plan.sizes),
            "losses": list(plan.losses),
            "loss_model": plan.loss_model,
            "rounds": plan.rounds,
            "workers": resolve_workers("auto" if plan.workers is None else plan.workers),
            "workers_asked": "auto" if plan.workers is None else plan.workers,
            "method": METHOD,
            "systems": {},
            "skipped": dict(plan.skipped),
        }
        stat0, own0, soft0 = _proc_stat(), _own_cpu(), _ksoftirqd()
        with tempfile.TemporaryDirectory(prefix="ipop-bench-") as tmp, Testbed() as tb:
            a, b = tb.add_host("a"), tb.add_host("b")
            link = tb.connect(a, b)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in plan.systems}
            for r in range(plan.rounds):
                if plan.rounds > 1:
                    self.round = f"round {r + 1}/{plan.rounds}: "
                for name in plan.systems:
                    system = SYSTEMS[name](link, Path(tmp))
                    if isinstance(system, Ipop) and plan.workers is not None:
                        system.workers = plan.workers
                    runs[name].append(self._system(tb, link, system))
            for name, results in runs.items():
                doc["systems"][name] = (results[0] if plan.rounds == 1
                                        else rounds.fold(results, list(plan.losses)))
        doc["duration_s"] = round(time.monotonic() - t0, 1)
        cpus = os.cpu_count() or 1
        stat1, own1, soft1 = _proc_stat(), _own_cpu(), _ksoftirqd()
        total = max(1, stat1["total"] - stat0["total"])  # ticks, all CPUs together
        others = (stat1["busy"] - stat0["busy"] - (own1 - own0) * _CLK_TCK
                  - (soft1 - soft0))  # ksoftirqd carries our packets too
        doc["machine"]["others_cpu_pct"] = round(100.0 * max(0.0, others) / total, 1)
        doc["machine"]["steal_cpu_pct"] = round(100.0 * (stat1["steal"] - stat0["steal"]) / total,
                                                1)
        load = doc["machine"]["loadavg_start"]
        busy = doc["machine"]["others_cpu_pct"] + doc["machine"]["steal_cpu_pct"]
        if busy > 10 or load > 0.5 * cpus:
            self.notes.append(
                f"the machine was shared: 1-minute load average {load:.1f} before the run; during "
                f"it, processes not of this run used about {doc['machine']['others_cpu_pct']:.0f}"
                f" % of its {cpus} CPUs and the hypervisor stole "
                f"{doc['machine']['steal_cpu_pct']:.0f} %; absolute numbers are lower and "
                "noisier than on an idle machine, compare ratios")
        doc["failures"] = self.failures
        doc["notes"] = self.notes + list(self.log_notes.values())
        return doc

    # -- one system ----------------------------------------------------------------------
    def _system(self, tb: Testbed, link: Link, system: System) -> dict[str, Any]:
        plan = self.plan
        out: dict[str, Any] = {"label": system.label, "overlay": system.overlay,
                               "version": None, "security": None, "mtu": None,
                               "up_seconds": None, "idle_cpu_pct": None,
                               "links": {name: self._empty() for name in plan.links}}
        left = 2 + len(plan.links) * len(plan.cases())
        try:
            self.begin(f"{self.round}{system.name}: starting")
            system.start()
            self.done(1)
            left -= 1
            out.update(version=system.version, security=system.security,
                       mtu=system.mtu(), up_seconds=round(system.up_seconds, 2))
            self.begin(f"{self.round}{system.name}: idle CPU")
            if system.overlay:
                time.sleep(plan.idle_settle)
                out["idle_cpu_pct"] = measure.idle_cpu(system.roots(), plan.idle_seconds)
            self.done(1)
            left -= 1
            for lname in plan.links:
                rate = LINKS[lname][1]
                tb.shape(link, rate)
                try:
                    out["links"][lname] = self._cases(tb, link, system, lname, out["mtu"])
                finally:
                    tb.shape(link, None)
                left -= len(plan.cases())
        except IpopError as e:
            self.failures.append(f"{system.name}: {e}")
        finally:
            if left:
                self.done(left)
            try:
                out["drops"] = system.drops()
                problems = system.problems()
                if problems:
                    eperm = sum("operation not permitted" in p.lower() for p in problems)
                    why = (f" ({eperm} of them EPERM on send: the testbed loss model's egress "
                           "drop)" if eperm else "")
                    self.log_notes[system.name] = (
                        f"{system.name}: {len(problems)} error lines in its logs{why}, "
                        f"e.g. {problems[-1]}")
                    out["log_errors"] = problems[:20]
            finally:
                system.stop()
        return out

    def _empty(self) -> dict[str, Any]:
        res: dict[str, Any] = {"ping_avg_ms": None, "ping_p50_ms": None, "tcp1_mbit": None,
                               "tcp4_mbit": None, "tcp8_mbit": None, "cpu_pct": {},
                               "sweep": []}
        for pct in self.plan.losses:
            res[f"loss{pct}_mbit"] = None
        return res

    def _cases(self, tb: Testbed, link: Link, system: System, lname: str,
               mtu: int) -> dict[str, Any]:
        plan = self.plan
        res = self._empty()
        cli, srv, addr = system.client, system.server, system.target
        tag = f"{self.round}{system.name} · {LINKS[lname][0]}"

        def case(what: str, fn: Callable[[], None]) -> None:
            self.begin(f"{tag} · {what}")
            try:
                fn()
            except IpopError as e:
                self.failures.append(f"{system.name} {lname} {what}: {e}")
            self.done(1)
            time.sleep(plan.settle)

        def ping() -> None:
            res["ping_avg_ms"], res["ping_p50_ms"] = (
                round(v, 4) for v in measure.ping_rtt(cli, addr, plan.ping_count,
                                                      plan.ping_interval))

        def tcp(streams: int) -> Callable[[], None]:
            def go() -> None:
                cpu: dict[str, float] = {}
                during = None
                if streams == 1 and system.roots():
                    during = measure.during_cpu(system.roots(), plan.seconds, cpu)
                key = f"tcp{streams}_mbit"
                res[key] = round(measure.tcp_mbit(cli, srv, addr, plan.seconds, streams,
                                                  during), 2)
                if streams == 1:
                    res["cpu_pct"] = cpu
            return go

        def sweep(size: int) -> Callable[[], None]:
            def go() -> None:
                used = min(size, mtu)
                point: dict[str, Any] = {"size": size, "size_used": used, "mbit": None,
                                         "pps": None}
                res["sweep"].append(point)
                mbit, pps = measure.udp_point(cli, srv, addr, plan.sweep_seconds, used)
                point.update(mbit=round(mbit, 2), pps=round(pps))
            return go

        def loss(pct: int) -> Callable[[], None]:
            def go() -> None:
                with lossy.underlay_loss(tb, link, pct, plan.loss_model):
                    res[f"loss{pct}_mbit"] = round(
                        measure.tcp_mbit(cli, srv, addr, plan.seconds), 2)
            return go

        case("ping", ping)
        case("TCP 1 stream", tcp(1))
        case("TCP 4 streams", tcp(4))
        case("TCP 8 streams", tcp(8))
        for size in plan.sizes:
            capped = f" (capped at MTU {mtu})" if size > mtu else ""
            case(f"UDP {size} B{capped}", sweep(size))
        for pct in plan.losses:
            case(f"TCP {pct}% loss", loss(pct))
        return res


METHOD = {
    "tcp": ("iperf3 TCP a->b, -t SECONDS, 1, 4 (-P 4) and 8 (-P 8) streams, goodput at the "
            "receiver (sum_received)"),
    "ping": "ping -c COUNT -i INTERVAL a->b; average and median RTT",
    "sweep": ("iperf3 UDP a->b, -b 0 (unlimited), -l SIZE-28 so IP packets are SIZE bytes; "
              "receiver packets/s, and Mbit/s counted over whole IP packets; a SIZE above the "
              "system's MTU is capped at the MTU (size_used)"),
    "loss": "iperf3 TCP, one stream, with random underlay loss in each direction (loss_model)",
    "loss_model": {
        "testbed": ("Testbed.set_loss: nftables numgen drop at each veth end's egress, per skb "
                    "(a TSO/GSO skb or UDP GSO train is lost whole)"),
        "datagram": ("per wire datagram: TSO/GSO/UDP segmentation off on both veth ends during "
                     "the case, nftables drop at each end's prerouting; the receiver then gets "
                     "no GRO, even at 0 % loss (a diagnostic of the per-datagram path)"),
    },
    "cpu": ("utime+stime from /proc/PID/stat of each system process tree (threads and children "
            "included) over the middle of the one-stream TCP run, % of one core"),
    "idle_cpu": "the same over idle_seconds with no traffic, 1 s after the first ping",
}


def add_ratios(doc: dict[str, Any]) -> None:
    """Fill ``ratios`` in each system's link results: vs direct and vs wireguard-go."""
    systems: dict[str, Any] = doc["systems"]
    keys = ["tcp1_mbit", "tcp4_mbit", "tcp8_mbit", "ping_avg_ms", "ping_p50_ms",
            *(f"loss{pct}_mbit" for pct in doc["losses"])]
    for sysres in systems.values():
        for lname, res in sysres["links"].items():
            ratios: dict[str, Any] = {}
            for base in ("direct", "wireguard-go"):
                other = systems.get(base, {}).get("links", {}).get(lname)
                if other is None:
                    continue
                r: dict[str, Any] = {k: _ratio(res.get(k), other.get(k)) for k in keys}
                base_pps = {p["size"]: p.get("pps") for p in other.get("sweep", [])}
                r["sweep_pps"] = {str(p["size"]): _ratio(p.get("pps"), base_pps.get(p["size"]))
                                  for p in res.get("sweep", [])}
                ratios[f"vs_{base}"] = r
            res["ratios"] = ratios


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_stat() -> dict[str, int]:
    """Machine-wide CPU ticks from ``/proc/stat``: busy, steal and total.  Busy includes irq and
    softirq: without IRQ time accounting a process's stime holds the softirq work done on its
    watch, so this is what our processes' times and ksoftirqd's add up against."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (vals + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return {"busy": busy, "steal": steal, "total": busy + idle + iowait + steal}


def _own_cpu() -> float:
    """CPU seconds of this process and all the children it has reaped (their children too)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _ksoftirqd() -> int:
    """CPU ticks of the ksoftirqd kernel threads (packet processing deferred from interrupts)."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if not f.read().startswith("ksoftirqd/"):
                    continue
        except OSError:
            continue
        ticks += measure.cpu_ticks(int(entry))
    return ticks


def _loadavg() -> float:
    """The 1-minute load average (taken before the run, it is other people's work)."""
    return round(os.getloadavg()[0], 2)


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b > 0:
        return round(float(a) / float(b), 3)
    return None
