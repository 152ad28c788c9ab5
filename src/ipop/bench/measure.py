"""One measurement each: iperf3 TCP goodput, an iperf3 UDP packet-rate point, ping RTT, and
CPU time of process trees read from ``/proc/PID/stat``.

Every function runs real programs inside test bed hosts and returns plain numbers; a failed
measurement raises ``IpopError`` (reason ``bench``) with the tool's complaint.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ipop.errors import IpopError
from ipop.testbed.netns import Host

IPV4_UDP_HEADERS = 28
"""IPv4 (20) + UDP (8): an iperf3 UDP payload of ``size - 28`` makes an IP packet of ``size``."""

_PORT = 5201
_TIME_RE = re.compile(r"time=([0-9.]+) ms")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _fail(what: str) -> IpopError:
    return IpopError(what, reason="bench")


# -- CPU ------------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None and len(fields) > 1:
            kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def process_tree(root: int) -> set[int]:
    """``root`` and all its descendants that are alive now."""
    kids = _children_map()
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(kids.get(pid, ()))
    return found


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` (all its threads) in clock ticks; 0 when it is gone."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 13:
        return 0
    return int(fields[11]) + int(fields[12])


@dataclass
class CpuSnapshot:
    """CPU ticks of the process trees of some named roots, at one moment."""

    at: float
    ticks: dict[str, dict[int, int]]


def cpu_snapshot(roots: dict[str, int]) -> CpuSnapshot:
    ticks = {name: {pid: cpu_ticks(pid) for pid in process_tree(root)}
             for name, root in roots.items()}
    return CpuSnapshot(time.monotonic(), ticks)


def cpu_percent(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """% of one core each root's tree used between the two snapshots."""
    wall = max(after.at - before.at, 1e-6)
    out: dict[str, float] = {}
    for name, now in after.ticks.items():
        then = before.ticks.get(name, {})
        used = sum(max(0, t - then.get(pid, 0)) for pid, t in now.items())
        out[name] = round(100.0 * used / _CLK_TCK / wall, 2)
    return out


def idle_cpu(roots: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU of each root's tree over ``seconds`` of doing nothing."""
    before = cpu_snapshot(roots)
    time.sleep(seconds)
    return cpu_percent(before, cpu_snapshot(roots))


# -- iperf3 ---------------------------------------------------------------------------------
class IperfServer:
    """``iperf3 -s -1`` bound to ``addr`` in ``host``: serves exactly one test."""

    def __init__(self, host: Host, addr: str) -> None:
        self.host = host
        self.proc = host.popen(["iperf3", "-s", "-1", "-B", addr, "-p", str(_PORT)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 5.0
        while f":{_PORT} " not in host.run(["ss", "-Htln"], check=False).stdout:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise _fail(f"iperf3 server on {addr} did not start")
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(3.0)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(3.0)

    def __enter__(self) -> IperfServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _iperf(client: Host, server: Host, addr: str, seconds: int, args: list[str],
           during: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run one iperf3 client test against a fresh server; ``during`` runs while it goes."""
    with IperfServer(server, addr):
        proc = client.popen(
            ["iperf3", "-c", addr, "-p", str(_PORT), "-t", str(seconds), "-J",
             "--connect-timeout", "3000", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        try:
            if during is not None:
                during()
            out, err = proc.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired as e:
            proc.kill()
            proc.communicate()
            raise _fail(f"iperf3 {' '.join(args) or 'tcp'} to {addr}: timed out") from e
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
    try:
        data: dict[str, Any] = json.loads(out or "{}")
    except json.JSONDecodeError:
        data = {}
    if proc.returncode != 0 or "error" in data or "end" not in data:
        why = data.get("error") or err.strip()[-300:] or f"exit {proc.returncode}"
        raise _fail(f"iperf3 {' '.join(args) or 'tcp'} to {addr}: {why}")
    return data


def tcp_mbit(client: Host, server: Host, addr: str, seconds: int, streams: int = 1,
             during: Callable[[], None] | None = None) -> float:
    """iperf3 TCP goodput from ``client`` to ``addr`` (received side), Mbit/s."""
    args = ["-P", str(streams)] if streams > 1 else []
    data = _iperf(client, server, addr, seconds, args, during)
    bps = float(data["end"]["sum_received"]["bits_per_second"])
    if bps <= 0:
        raise _fail(f"iperf3 tcp to {addr}: nothing received")
    return bps / 1e6


def udp_point(client: Host, server: Host, addr: str, seconds: int,
              size: int) -> tuple[float, float]:
    """An unlimited-rate (``-b 0``) UDP flood of IP packets of ``size`` bytes; returns what the
    receiver got as (Mbit/s counted over whole IP packets, packets/s)."""
    payload = size - IPV4_UDP_HEADERS
    data = _iperf(client, server, addr, seconds, ["-u", "-b", "0", "-l", str(payload)])
    end = data["end"]
    recv = end.get("sum_received")
    if recv is not None and float(recv.get("seconds", 0)) > 0:
        pps = float(recv["bytes"]) / payload / float(recv["seconds"])
    else:  # older iperf3: the sender's summary carries the receiver's loss count
        total = end["sum"]
        pps = (float(total["packets"]) - float(total["lost_packets"])) / float(total["seconds"])
    if pps <= 0:
        raise _fail(f"iperf3 udp {size} B to {addr}: nothing received")
    return pps * size * 8 / 1e6, pps


# -- ping -----------------------------------------------------------------------------------
def ping_rtt(client: Host, addr: str, count: int = 20,
             interval: float = 0.05) -> tuple[float, float]:
    """``count`` pings ``interval`` s apart; returns (average, median) RTT in ms."""
    r = client.run(["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", addr],
                   check=False, timeout=count * (interval + 1) + 10)
    rtts = [float(m) for m in _TIME_RE.findall(r.stdout)]
    if not rtts:
        raise _fail(f"ping {addr}: no reply ({r.stdout.strip()[-200:] or r.stderr.strip()})")
    return statistics.fmean(rtts), statistics.median(rtts)


def wait_ping(client: Host, addr: str, timeout: float) -> float:
    """Ping until ``addr`` answers; returns the seconds it took."""
    t0 = time.monotonic()
    while True:
        r = client.run(["ping", "-n", "-q", "-c", "1", "-W", "1", addr], check=False,
                       timeout=10)
        if r.returncode == 0:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise _fail(f"{addr} unreachable after {timeout:.0f} s")
        time.sleep(0.1)


def during_cpu(roots: dict[str, int], seconds: int, out: dict[str, float],
               warmup: float = 0.3) -> Callable[[], None]:
    """A ``during`` hook for ``tcp_mbit`` that fills ``out`` with the CPU % of ``roots`` over the
    middle of a ``seconds``-long run (skipping ``warmup`` s at both ends when there is room)."""

    def sample() -> None:
        skip = warmup if seconds > 3 * warmup else 0.0
        time.sleep(skip)
        before = cpu_snapshot(roots)
        time.sleep(max(0.2, seconds - 2 * skip))
        out.update(cpu_percent(before, cpu_snapshot(roots)))

    return sample


def interface_mtu(host: Host, dev: str) -> int:
    r = host.run(["ip", "-j", "link", "show", "dev", dev], check=False)
    try:
        info: list[dict[str, Any]] = json.loads(r.stdout)
        return int(info[0]["mtu"])
    except (json.JSONDecodeError, LookupError, ValueError, TypeError) as e:
        raise _fail(f"no interface {dev} in {host.name}") from e


def first_line(argv: Iterable[str]) -> str:
    """First non-empty output line of a version command, or ``"?"``."""
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    for line in (r.stdout + r.stderr).splitlines():
        if line.strip():
            return line.strip()
    return "?"
