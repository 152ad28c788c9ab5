"""``ipop bench``: measure ipop side by side with the direct link (and wireguard-go and tinc with
``--peers``) in a test bed of its own, then print the tables and write ``--json``/``--png``.

The work is in ``ipop.bench``; this module turns the arguments into a plan, shows a progress
bar on stderr while it runs (one line per step when stderr is not a terminal) and prints the
result tables on stdout.  Everything the run builds is removed when it ends, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from ipop.bench import lossy, report
from ipop.bench.peers import PEERS, SYSTEMS
from ipop.bench.run import LINKS, QUICK_SIZES, Plan, Runner, add_ratios
from ipop.config import MAX_WORKERS
from ipop.errors import ConfigError, EnvironmentFault
from ipop.testbed.netns import check_environment

BASE_SYSTEMS = ("direct", "ipop-enc", "ipop-plain")


def make_plan(args: argparse.Namespace) -> tuple[Plan, list[str]]:
    """The plan the arguments ask for, and notes about what it had to change."""
    notes: list[str] = []
    seconds = int(args.seconds)
    if seconds < 1:
        raise ConfigError("seconds", f"{seconds}: must be at least 1")
    rounds = int(getattr(args, "rounds", 1))
    if not 1 <= rounds <= 9:
        raise ConfigError("rounds", f"{rounds}: must be 1 to 9")
    systems = list(BASE_SYSTEMS)
    if getattr(args, "metrics", False):
        systems.append("ipop-enc-metrics")
    skipped: dict[str, str] = {}
    if args.peers:
        for name in PEERS:
            reason = SYSTEMS[name].missing()
            if reason is None:
                systems.append(name)
            else:
                skipped[name] = reason
    if args.links:
        links = [name.strip() for name in args.links.split(",") if name.strip()]
        bad = [name for name in links if name not in LINKS]
        if bad or not links:
            raise ConfigError("links", f"{args.links!r}: choose from {', '.join(LINKS)}")
    else:
        links = ["veth"] if args.quick else list(LINKS)
    model = args.loss_model
    if model == "datagram":
        why = lossy.available()
        if why is not None:
            notes.append(f"loss model 'testbed' used instead of 'datagram': {why}")
            model = "testbed"
        else:
            notes.append("loss model 'datagram': the receiving veth does no GRO during the loss "
                         "cases, so GRO-reliant receivers run their per-datagram path there")
    workers = getattr(args, "workers", None)
    if workers is not None and not 1 <= int(workers) <= MAX_WORKERS:
        raise ConfigError("workers", f"{workers}: must be 1 to {MAX_WORKERS}")
    plan = Plan(systems=systems, links=links, seconds=seconds, loss_model=model,
                quick=bool(args.quick), skipped=skipped, rounds=rounds,
                workers=None if workers is None else int(workers))
    if args.quick:
        plan.sizes = QUICK_SIZES
        plan.sweep_seconds = 1
        plan.ping_count, plan.ping_interval = 10, 0.02
        plan.idle_seconds, plan.idle_settle, plan.settle = 1.0, 0.5, 0.1
    else:
        plan.sweep_seconds = max(1, seconds // 2)
    return plan, notes


def run_bench(args: argparse.Namespace) -> int:
    plan, notes = make_plan(args)
    problem = check_environment()
    if problem is not None:
        raise EnvironmentFault(f"bench: {problem}")
    out = Console(width=None if sys.stdout.isatty() else 160, emoji=False, highlight=False)
    err = Console(stderr=True, emoji=False, highlight=False)
    for name, reason in plan.skipped.items():
        err.print(f"[yellow]skipping {name}[/yellow]: {reason}")
    progress = Progress(SpinnerColumn(), TextColumn("{task.description:<56}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True)
    total = plan.steps()
    count = [0]
    t0 = time.monotonic()
    with progress:
        task = progress.add_task("building the test bed", total=total)

        def begin(what: str) -> None:
            progress.update(task, description=what)
            if not err.is_terminal:
                err.print(f"[{count[0] + 1}/{total} {time.monotonic() - t0:5.1f} s] {what}",
                          soft_wrap=True)

        def done(n: int) -> None:
            count[0] += n
            progress.advance(task, n)

        doc = Runner(plan, begin, done).run()
    doc["notes"] = notes + doc["notes"]
    add_ratios(doc)
    doc["targets"] = report.targets(doc)
    report.render(doc, out)
    if args.json:
        report.write_json(doc, Path(args.json))
        err.print(f"wrote {args.json}")
    if args.png:
        report.write_png(doc, Path(args.png))
        err.print(f"wrote {args.png}")
    return 1 if doc["failures"] else 0
