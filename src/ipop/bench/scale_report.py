"""Render an ``ipop-scale/1`` document: a rich table, JSON, and a PNG against N."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(value: Any, spec: str = ".1f", unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float):
        return f"{value:{spec}}{unit}"
    return str(value)


def table(doc: dict[str, Any]) -> Table:
    """One row per size: medians over the rounds."""
    sec = "dtls" if doc["encrypted"] else "plain"
    title = (f"ipop scale, {doc['mode']}, {sec}: medians of {doc['rounds']} round(s), "
             f"{doc['machine']['cpus']} CPUs")
    t = Table(title=title)
    if doc["mode"] == "proactive":
        cols = ["nodes", "links", "all ready", "full mesh", "mesh after ready",
                "failed set-ups", "XMPP drops", "start-up CPU all / node", "pings ok",
                "PSS per node", "idle CPU all / median node"]
    else:
        cols = ["nodes", "all ready", "pairs", "first packet delivered",
                "low UID sent first", "high UID sent first", "first reply median / max",
                "failed set-ups", "PSS per node"]
    for col in cols:
        t.add_column(col, justify="right")
    for n, entry in doc["sizes"].items():
        m = entry["median"]
        rounds = entry["rounds"]
        if not rounds:
            t.add_row(n, *["-"] * (len(cols) - 1))
            continue
        last = rounds[-1]
        if doc["mode"] == "proactive":
            t.add_row(
                n, str(last["links"]), _fmt(m.get("ready_s"), unit=" s"),
                _fmt(m.get("mesh_s"), unit=" s"), _fmt(m.get("mesh_after_ready_s"), unit=" s"),
                _fmt(m.get("failures"), ".0f"), _fmt(m.get("xmpp_drops"), ".0f"),
                f"{_fmt(m.get('startup_cpu_s'), unit=' s')} / "
                f"{_fmt(m.get('startup_cpu_median_s'), '.2f', ' s')}",
                f"{last['ping_ok']}/{last['ping_total']}",
                _fmt(m.get("pss_median_mb"), unit=" MB"),
                f"{_fmt(m.get('idle_cpu_total_pct'), '.1f', ' %')} / "
                f"{_fmt(m.get('idle_cpu_median_pct'), '.2f', ' %')}",
            )
        else:
            t.add_row(
                n, _fmt(m.get("ready_s"), unit=" s"), str(last["pairs"]),
                f"{_fmt(m.get('delivered'), '.0f')}/{last['pairs']}",
                f"{last['delivered_low_first']}/{last['low_first']}",
                f"{last['delivered_high_first']}/{last['high_first']}",
                f"{_fmt(m.get('first_reply_median_ms'), '.0f')} / "
                f"{_fmt(m.get('first_reply_max_ms'), '.0f')} ms",
                _fmt(m.get("failures"), ".0f"), _fmt(m.get("pss_median_mb"), unit=" MB"),
            )
    return t


def render(doc: dict[str, Any], console: Console) -> None:
    console.print(table(doc))
    for line in doc["failures"]:
        console.print(f"[red]failure[/red]: {line}")
    for line in doc["notes"]:
        console.print(f"note: {line}")


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")


def write_png(doc: dict[str, Any], path: Path) -> None:
    """Time to full mesh (or to the first replies, on demand), PSS per node and idle CPU per
    node against N, every round as a dot and the median as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if doc["mode"] == "proactive":
        panels = [("mesh_s", "time to full mesh (s)"), ("pss_median_mb", "PSS per node (MB)"),
                  ("idle_cpu_median_pct", "idle CPU per node (% of a core)")]
    else:
        panels = [("first_reply_median_ms", "first reply, median (ms)"),
                  ("pss_median_mb", "PSS per node (MB)"),
                  ("delivered", "first packets delivered")]
    sizes = sorted(doc["sizes"], key=int)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        xs, ys = [], []
        for n in sizes:
            entry = doc["sizes"][n]
            for r in entry["rounds"]:
                if isinstance(r.get(key), int | float):
                    ax.scatter([int(n)], [r[key]], color="tab:gray", s=12)
            med = entry.get("median", {}).get(key)
            if isinstance(med, int | float):
                xs.append(int(n))
                ys.append(med)
        ax.plot(xs, ys, marker="o", color="tab:blue")
        ax.set_xlabel("nodes (N)")
        ax.set_ylabel(label)
        ax.set_xticks([int(n) for n in sizes])
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    sec = "dtls" if doc["encrypted"] else "plain"
    fig.suptitle(f"ipop scale ({doc['mode']}, {sec}) {doc['started']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
