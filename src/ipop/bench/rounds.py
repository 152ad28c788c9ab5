"""Fold the results of one system measured in several rounds into one: the median of each
figure, with every round's values kept beside it (``runs``) so the spread stays visible.

A shared machine's speed drifts by 10-40 % from one minute to the next; ``ipop bench --rounds N``
runs every system N times, interleaved, and compares medians instead of single draws.
"""

from __future__ import annotations

import statistics
from typing import Any

SCALARS = ("ping_avg_ms", "ping_p50_ms", "tcp1_mbit", "tcp4_mbit", "tcp8_mbit")
"""Per-link figures folded to their median (the loss cases are added by name)."""


def median(values: list[Any]) -> float | None:
    """The median of the numbers among ``values`` (None where a round failed); None if none."""
    nums = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if not nums:
        return None
    return round(statistics.median(nums), 4)


def _median_dict(dicts: list[Any]) -> dict[str, float] | None:
    present = [d for d in dicts if isinstance(d, dict)]
    if not present:
        return None
    keys = list(dict.fromkeys(k for d in present for k in d))
    out: dict[str, float] = {}
    for k in keys:
        m = median([d.get(k) for d in present])
        if m is not None:
            out[k] = m
    return out


def _fold_link(results: list[dict[str, Any]], losses: list[int]) -> dict[str, Any]:
    out = dict(results[-1])
    runs: dict[str, list[Any]] = {}
    for key in (*SCALARS, *(f"loss{pct}_mbit" for pct in losses)):
        values = [r.get(key) for r in results]
        runs[key] = values
        out[key] = median(values)
    out["cpu_pct"] = _median_dict([r.get("cpu_pct") for r in results]) or {}
    sweep: list[dict[str, Any]] = []
    by_size: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        for p in r.get("sweep", []):
            by_size.setdefault(p["size"], []).append(p)
    for points in by_size.values():
        point = dict(points[-1])
        point["mbit"] = median([p.get("mbit") for p in points])
        pps = median([p.get("pps") for p in points])
        point["pps"] = round(pps) if pps is not None else None
        sweep.append(point)
    out["sweep"] = sweep
    out["runs"] = runs
    return out


def fold(runs: list[dict[str, Any]], losses: list[int]) -> dict[str, Any]:
    """One system's result from its rounds (in order): medians, and ``rounds`` = how many.
    Labels, version, MTU, drops and log lines come from the last round that started."""
    if not runs:
        raise ValueError("no rounds to fold")
    started = [r for r in runs if r.get("version") is not None] or runs
    out = dict(started[-1])
    out["rounds"] = len(runs)
    out["up_seconds"] = median([r.get("up_seconds") for r in runs])
    out["idle_cpu_pct"] = _median_dict([r.get("idle_cpu_pct") for r in runs])
    links = list(dict.fromkeys(k for r in runs for k in r.get("links", {})))
    out["links"] = {}
    for lname in links:
        results = [r["links"][lname] for r in runs if lname in r.get("links", {})]
        out["links"][lname] = _fold_link(results, losses)
    return out


def spread(res: dict[str, Any], key: str) -> tuple[float, float] | None:
    """(lowest, highest) of a per-link figure over the rounds; None for a single round."""
    values = [float(v) for v in res.get("runs", {}).get(key, [])
              if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(values) < 2:
        return None
    return min(values), max(values)
