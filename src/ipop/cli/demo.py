"""``ipop demo``: a small overlay in network namespaces, its status, and a throughput figure.

Modes: ``static`` (nodes know each other from their configs), ``groupvpn`` (nodes find each
other through a real prosody and link on their own; one node sits behind a NAT and a coturn
relay is configured), ``socialvpn`` (per-user views over rosters).  Everything it builds lives
in namespaces with a per-run prefix and is removed when it ends, however it ends.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ipop.api.status import render
from ipop.testbed.netns import Host, Testbed
from ipop.testbed.nodes import NodeProc, static_mesh

console = Console(width=None if sys.stdout.isatty() else 150, emoji=False, highlight=False)


def _ping_ok(host: Host, addr: str, count: int = 3) -> tuple[bool, float | None]:
    r = host.run(["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "2", addr],
                 check=False, timeout=30)
    rtt = None
    for line in r.stdout.splitlines():
        if "min/avg/max" in line:
            rtt = float(line.split("=")[1].split("/")[1])
    return r.returncode == 0, rtt


def _iperf(client: Host, server: Host, addr: str, seconds: int,
           connect: str | None = None) -> float:
    srv = server.popen(["iperf3", "-s", "-1", "-B", addr], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while ":5201 " not in server.run(["ss", "-Htln"], check=False).stdout:
            if time.monotonic() > deadline:
                return 0.0
            time.sleep(0.05)
        r = client.run(["iperf3", "-c", connect or addr, "-t", str(seconds), "-J",
                        "--connect-timeout", "3000"], check=False, timeout=seconds + 30)
        data: dict[str, Any] = json.loads(r.stdout or "{}")
        if "error" in data or r.returncode:
            return 0.0
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        srv.terminate()
        srv.wait(5)


def _report(nodes: list[NodeProc], seconds: int, under: dict[str, str],
            address_of: Callable[[NodeProc, NodeProc], str]) -> int:
    console.rule("reachability")
    failures = 0
    table = Table()
    for col in ("from", "to", "overlay ip", "ok", "rtt ms"):
        table.add_column(col)
    for a, b in itertools.permutations(nodes, 2):
        addr = address_of(a, b)
        ok, rtt = _ping_ok(a.host, addr)
        failures += not ok
        table.add_row(a.name, b.name, addr, "yes" if ok else "[red]NO[/red]",
                      f"{rtt:.3f}" if rtt is not None else "-")
    console.print(table)
    a, b = nodes[0], nodes[1]
    console.rule(f"throughput {a.name} -> {b.name} (iperf3 TCP, {seconds} s)")
    overlay = _iperf(a.host, b.host, b.config["ip4"], seconds, connect=address_of(a, b))
    direct = _iperf(a.host, b.host, under[b.name], seconds)
    tt = Table()
    for col in ("path", "Gbit/s", "vs direct"):
        tt.add_column(col)
    tt.add_row("direct underlay", f"{direct:.2f}", "100%")
    ratio = f"{100 * overlay / direct:.0f}%" if direct else "-"
    tt.add_row("ipop overlay", f"{overlay:.2f}", ratio)
    console.print(tt)
    for node in nodes:
        console.rule(f"ipop status: {node.name}")
        render(node.status())
    return 1 if failures or overlay == 0 else 0


def _own_address(_a: NodeProc, b: NodeProc) -> str:
    return str(b.config["ip4"])


def run_demo(args: argparse.Namespace) -> int:
    n = max(2, int(args.nodes))
    mode = args.controller
    with tempfile.TemporaryDirectory(prefix="ipop-demo-") as tmp, Testbed() as tb:
        work = Path(tmp)
        console.print(f"[bold]ipop demo[/bold]: {n} nodes, controller {mode}, "
                      f"namespaces {tb.prefix}*")
        if mode == "static":
            hosts = [tb.add_host(f"n{i + 1}") for i in range(n)]
            lan = tb.add_lan("inet", hosts)
            under = {f"n{i + 1}": lan.members[h.name] for i, h in enumerate(hosts)}
            nodes = static_mesh(hosts, work, underlay=list(under.values()),
                                extra={"sec": bool(args.sec)})
        else:
            from ipop.cli.demo_signal import build_signaled

            nodes, under = build_signaled(tb, work, n, mode)
        t0 = time.monotonic()
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_ready()
        address_of: Callable[[NodeProc, NodeProc], str] = _own_address
        if mode != "static":
            from ipop.cli import demo_signal

            if mode == "socialvpn":
                demo_signal.befriend_all(nodes)
            demo_signal.wait_linked(nodes, timeout=30)
            address_of = demo_signal.address_of
        console.print(f"all {n} nodes up and linked in {time.monotonic() - t0:.2f} s")
        rc = _report(nodes, args.seconds, under, address_of)
        for node in nodes:
            node.stop()
        if mode != "static":
            from ipop.cli.demo_signal import stop_servers

            stop_servers(tb)
        console.print("[green]demo finished[/green]" if rc == 0 else "[red]demo failed[/red]")
        return rc
