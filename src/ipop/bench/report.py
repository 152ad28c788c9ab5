"""Show a bench result document: rich tables (absolute numbers with ratios to direct and to
wireguard-go), the issue's targets checked against it, the JSON file and the PNG chart."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ipop.bench import rounds

_WG = "wireguard-go"
_CLIFF = 0.5
"""A sweep point below this fraction of the previous (smaller) size's Mbit/s is a cliff."""


def _num(v: Any, fmt: str = ",.0f") -> str:
    return format(v, fmt) if isinstance(v, int | float) else "-"


def _ratio_line(res: dict[str, Any], key: str, have_wg: bool) -> str:
    ratios = res.get("ratios", {})
    parts = [_num(ratios.get("vs_direct", {}).get(key), ".2f")]
    if have_wg:
        parts.append(_num(ratios.get(f"vs_{_WG}", {}).get(key), ".2f"))
    return " · ".join(parts)


def _cell(res: dict[str, Any], key: str, have_wg: bool, fmt: str = ",.0f") -> str:
    text = f"{_num(res.get(key), fmt)}\n[dim]{_ratio_line(res, key, have_wg)}[/dim]"
    span = rounds.spread(res, key)
    if span is not None:
        text += f"\n[dim]{_num(span[0], fmt)}-{_num(span[1], fmt)}[/dim]"
    return text


def _cpu(d: Any) -> str:
    if not d:
        return "-"
    return " / ".join(_num(d.get(role), ".0f") for role in ("sender", "receiver"))


def _workers(doc: dict[str, Any]) -> str:
    """The ipop nodes' ``workers``: "2", or "auto (1)"."""
    n = doc.get("workers")
    if n is None:
        return "1"
    return f"auto ({n})" if doc.get("workers_asked") == "auto" else str(n)


def main_table(doc: dict[str, Any], lname: str) -> Table:
    systems: dict[str, Any] = doc["systems"]
    have_wg = _WG in systems
    base = "x direct · x wireguard-go" if have_wg else "x direct"
    n = doc.get("rounds", 1)
    caption = f"second line in each cell: {base}"
    if n > 1:
        caption = (f"medians of {n} rounds; {caption}; third line: lowest-highest round")
    t = Table(title=f"{doc['links'][lname]}: throughput (Mbit/s), RTT, CPU; "
                    f"ipop workers {_workers(doc)}",
              caption=caption, title_justify="left")
    t.add_column("system")
    t.add_column("TCP 1 stream", justify="right")
    t.add_column("TCP 4 streams", justify="right")
    t.add_column("TCP 8 streams", justify="right")
    t.add_column("ping avg ms", justify="right")
    t.add_column("ping p50 ms", justify="right")
    for pct in doc["losses"]:
        t.add_column(f"TCP {pct}% loss", justify="right")
    t.add_column("CPU % snd/rcv\n(1 stream)", justify="right")
    t.add_column("idle CPU %\nsnd/rcv", justify="right")
    t.add_column("MTU", justify="right")
    for name, s in systems.items():
        res = s["links"].get(lname, {})
        t.add_row(
            name,
            _cell(res, "tcp1_mbit", have_wg),
            _cell(res, "tcp4_mbit", have_wg),
            _cell(res, "tcp8_mbit", have_wg),
            _cell(res, "ping_avg_ms", have_wg, ".3f"),
            _cell(res, "ping_p50_ms", have_wg, ".3f"),
            *(_cell(res, f"loss{pct}_mbit", have_wg) for pct in doc["losses"]),
            _cpu(res.get("cpu_pct")),
            _cpu(s.get("idle_cpu_pct")) if s.get("overlay") else "-",
            _num(s.get("mtu"), "d"),
        )
    return t


def sweep_table(doc: dict[str, Any], lname: str) -> Table:
    systems: dict[str, Any] = doc["systems"]
    have_wg = _WG in systems
    base = "packets/s x direct · x wireguard-go" if have_wg else "packets/s x direct"
    t = Table(title=f"{doc['links'][lname]}: UDP packet-size sweep (IP packet bytes)",
              caption=f"Mbit/s over whole IP packets / kpps at the receiver; third line: {base}."
                      " * = capped at the system's MTU", title_justify="left")
    t.add_column("system")
    for size in doc["sizes"]:
        t.add_column(f"{size} B", justify="right")
    for name, s in systems.items():
        res = s["links"].get(lname, {})
        points = {p["size"]: p for p in res.get("sweep", [])}
        ratios = res.get("ratios", {})
        cells = []
        for size in doc["sizes"]:
            p = points.get(size)
            if p is None:
                cells.append("-")
                continue
            mark = f"*{p['size_used']}" if p["size_used"] != size else ""
            r = [_num(ratios.get("vs_direct", {}).get("sweep_pps", {}).get(str(size)), ".2f")]
            if have_wg:
                r.append(_num(ratios.get(f"vs_{_WG}", {}).get("sweep_pps", {}).get(str(size)),
                              ".2f"))
            kpps = p["pps"] / 1000 if isinstance(p.get("pps"), int | float) else None
            cells.append(f"{_num(p.get('mbit'))} {mark}\n{_num(kpps, ',.1f')} k\n"
                         f"[dim]{' · '.join(r)}[/dim]")
        t.add_row(name, *cells)
    return t


# -- targets --------------------------------------------------------------------------------
def _get(doc: dict[str, Any], system: str, lname: str, key: str) -> Any:
    return doc["systems"].get(system, {}).get("links", {}).get(lname, {}).get(key)


def _ratio(doc: dict[str, Any], system: str, lname: str, base: str, key: str) -> Any:
    res = doc["systems"].get(system, {}).get("links", {}).get(lname, {})
    return res.get("ratios", {}).get(f"vs_{base}", {}).get(key)


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each ``{"system", "target", "value", "ok"}`` (ok None: not measured)."""
    out: list[dict[str, Any]] = []

    def add(system: str, target: str, value: Any, ok: bool | None, fmt: str = ".2f") -> None:
        text = format(value, fmt) if isinstance(value, int | float) else "-"
        out.append({"system": system, "target": target, "value": text,
                    "ok": ok if isinstance(value, int | float) else None})

    have_wg = _WG in doc["systems"]
    for name in ("ipop-enc", "ipop-plain"):
        if name not in doc["systems"]:
            continue
        if "tbf1g" in doc["links"]:
            v = _ratio(doc, name, "tbf1g", "direct", "tcp1_mbit")
            add(name, "1 Gbit/s: TCP ≥ 0.95 x direct", v, v is not None and v >= 0.95)
        if "veth" in doc["links"]:
            if name == "ipop-enc":
                v = _ratio(doc, name, "veth", "direct", "tcp1_mbit")
                add(name, "veth: TCP ≥ 0.30 x direct", v, v is not None and v >= 0.30)
                if have_wg:
                    v = _ratio(doc, name, "veth", _WG, "tcp1_mbit")
                    add(name, "veth: TCP ≥ 8 x wireguard-go", v, v is not None and v >= 8)
            if have_wg:
                v = _ratio(doc, name, "veth", _WG, "ping_avg_ms")
                add(name, "veth: ping avg ≤ 1.0 x wireguard-go", v, v is not None and v <= 1.0)
                pps = doc["systems"][name]["links"]["veth"].get("ratios", {}).get(
                    f"vs_{_WG}", {}).get("sweep_pps", {})
                v = pps.get(str(min(doc["sizes"])))
                add(name, f"veth: {min(doc['sizes'])} B packets/s ≥ 1.0 x wireguard-go", v,
                    v is not None and v >= 1.0)
                for pct in doc["losses"]:
                    v = _ratio(doc, name, "veth", _WG, f"loss{pct}_mbit")
                    add(name, f"veth: TCP at {pct}% loss ≥ 1.0 x wireguard-go", v,
                        v is not None and v >= 1.0)
        for lname in doc["links"]:
            sweep = doc["systems"][name]["links"][lname].get("sweep", [])
            mbits = [p.get("mbit") for p in sweep]
            if mbits and all(isinstance(m, int | float) for m in mbits):
                worst = min((b / a for a, b in itertools.pairwise(mbits) if a),
                            default=1.0)
                add(name, f"{doc['links'][lname]}: no cliff (worst step ≥ {_CLIFF} x previous)",
                    worst, worst >= _CLIFF)
        idle = doc["systems"][name].get("idle_cpu_pct")
        if idle:
            v = max(idle.values())
            add(name, "idle CPU < 1 % (busier node)", v, v < 1.0, ".2f")
    return out


def targets_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="targets (issue 6)", title_justify="left")
    for col in ("system", "target", "measured", "met"):
        t.add_column(col)
    for r in rows:
        ok = {True: "[green]yes[/green]", False: "[red]NO[/red]", None: "-"}[r["ok"]]
        t.add_row(r["system"], r["target"], r["value"], ok)
    return t


def render(doc: dict[str, Any], console: Console) -> None:
    systems = doc["systems"]
    console.print(f"[bold]ipop bench[/bold]  {doc['started']}  {doc['duration_s']:.0f} s  "
                  f"(-t {doc['seconds']} s TCP, {doc['sweep_seconds']} s per sweep point; "
                  f"loss model {doc['loss_model']}; "
                  f"{doc.get('rounds', 1)} round{'s' if doc.get('rounds', 1) > 1 else ''}; "
                  f"ipop workers {_workers(doc)}; {doc['machine']['cpus']} CPUs, "
                  f"kernel {doc['machine']['kernel']})")
    for name, s in systems.items():
        if s.get("version") is None:
            console.print(f"  {name:<13} [red]did not start[/red]")
            continue
        console.print(f"  {name:<13} {s['version']}; security {s['security']}; MTU {s['mtu']}; "
                      f"first ping after {s['up_seconds']} s")
    for lname in doc["links"]:
        console.print(main_table(doc, lname))
        console.print(sweep_table(doc, lname))
    capped = sorted({f"{n} (MTU {s['mtu']})" for n, s in systems.items()
                     for res in s["links"].values() for p in res.get("sweep", [])
                     if p["size_used"] != p["size"]})
    if capped:
        console.print(f"sweep sizes above a system's MTU were sent at its MTU: {', '.join(capped)}")
    if doc.get("targets"):
        console.print(targets_table(doc["targets"]))
    for name, reason in doc.get("skipped", {}).items():
        console.print(f"[yellow]skipped[/yellow] {name}: {reason}")
    for note in doc.get("notes", []):
        console.print(f"[yellow]note[/yellow] {note}", soft_wrap=True)
    for failure in doc.get("failures", []):
        console.print(f"[red]failed[/red] {failure}", soft_wrap=True)


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def write_png(doc: dict[str, Any], path: Path) -> None:
    """Throughput (top) and packet rate (bottom) against IP packet size, one line per system,
    one column per link condition; log axes, so that overlays stay readable next to direct."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    links = list(doc["links"])
    fig, axes = plt.subplots(2, len(links), figsize=(6.5 * len(links), 8), squeeze=False)
    for col, lname in enumerate(links):
        top, bottom = axes[0][col], axes[1][col]
        for name, s in doc["systems"].items():
            points = [p for p in s["links"].get(lname, {}).get("sweep", [])
                      if isinstance(p.get("mbit"), int | float)]
            if not points:
                continue
            xs = [p["size_used"] for p in points]
            top.plot(xs, [p["mbit"] for p in points], marker="o", label=name)
            bottom.plot(xs, [p["pps"] / 1000 for p in points], marker="o", label=name)
        top.set_title(f"{doc['links'][lname]}: UDP throughput vs packet size")
        top.set_ylabel("Mbit/s (whole IP packets, receiver)")
        bottom.set_ylabel("kpackets/s (receiver)")
        bottom.set_xlabel("IP packet size (bytes)")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(doc["sizes"], [str(size) for size in doc["sizes"]])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.grid(True, alpha=0.3)
            ax.set_yscale("log")
            ax.legend(fontsize="small")
    fig.suptitle(f"ipop bench {doc['started']} · ipop workers {_workers(doc)}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
