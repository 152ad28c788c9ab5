"""``ipop scale``: N nodes with one prosody in a test bed of their own; time to full mesh, PSS
and idle CPU per node (proactive), or first packets between random pairs (on-demand).

The work is in ``ipop.bench.scale``; progress goes to stderr, the table to stdout, and
``--json``/``--png`` write the document and the chart against N.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ipop.errors import ConfigError, EnvironmentFault


def add_parser(sub: Any) -> None:
    p = sub.add_parser("scale", help="bring up N nodes with one prosody and measure the mesh")
    p.add_argument("--nodes", default="8,16,32",
                   help="comma list of overlay sizes (default 8,16,32)")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds per size, interleaved; the table shows medians (default 1)")
    p.add_argument("--mode", choices=["proactive", "on-demand"], default="proactive")
    p.add_argument("--pairs", type=int, default=40,
                   help="on-demand: random pairs that each send one first packet (default 40)")
    p.add_argument("--plain", action="store_true", help="plain links (default: encrypted)")
    p.add_argument("--idle-seconds", type=float, default=10.0,
                   help="proactive: seconds of idle CPU sampled after the mesh (default 10)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds a round may take to reach its full mesh (default 120)")
    p.add_argument("--seed", type=int, default=1, help="seed for the random pairs")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON (ipop-scale/1)")
    p.add_argument("--png", metavar="FILE", help="write the charts against N")
    p.set_defaults(func=run_scale)


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError("nodes", f"{text!r}: a comma list of integers") from None
    if not sizes:
        raise ConfigError("nodes", f"{text!r}: name at least one size")
    return sizes


def run_scale(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ipop.bench import scale, scale_report
    from ipop.testbed.netns import check_environment

    plan = scale.ScalePlan(sizes=parse_sizes(args.nodes), rounds=args.rounds, mode=args.mode,
                           encrypted=not args.plain, pairs=args.pairs,
                           idle_seconds=args.idle_seconds, mesh_timeout=args.timeout,
                           seed=args.seed)
    plan.check()
    problem = check_environment()
    if problem is not None:
        raise EnvironmentFault(f"scale: {problem}")
    out = Console(width=None if sys.stdout.isatty() else 160, emoji=False, highlight=False)
    err = Console(stderr=True, emoji=False, highlight=False)
    t0 = time.monotonic()

    def step(what: str) -> None:
        err.print(f"[{time.monotonic() - t0:6.1f} s] {what}", soft_wrap=True)

    doc = scale.run(plan, step)
    scale_report.render(doc, out)
    if args.json:
        scale_report.write_json(doc, Path(args.json))
        err.print(f"wrote {args.json}")
    if args.png:
        scale_report.write_png(doc, Path(args.png))
        err.print(f"wrote {args.png}")
    return 1 if doc["failures"] else 0
