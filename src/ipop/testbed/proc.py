"""The test bed's contact with the machine: run ip/tc/nft, list and sweep namespaces, end pids.

Everything here is a thin, robust wrapper over a program or a syscall.  Processes are only ever
ended by pid (their process group, when they lead one); nothing is matched by name.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from typing import Any

from ipop.errors import EnvironmentFault

log = logging.getLogger(__name__)

PREFIX_PATTERN = re.compile(r"^ipt(?P<pid>\d{5})[0-9a-f]{3}-")
"""Matches namespace names made with ``make_prefix``; group ``pid`` is the owner's pid % 100000."""

TOOLS = ("ip", "tc", "nft", "conntrack", "sysctl")
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_CMD_TIMEOUT = 30.0


def run_stem(pid: int | None = None) -> str:
    """``ipt`` and the 5-digit pid part: every namespace this process makes starts with it."""
    return f"ipt{(os.getpid() if pid is None else pid) % 100000:05d}"


def make_prefix() -> str:
    """A fresh per-test-bed prefix such as ``ipt04211a3f-``."""
    return f"{run_stem()}{secrets.token_hex(2)[:3]}-"


def tool(name: str) -> str:
    """Absolute path of a program, looking in the sbin directories too."""
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_SBIN)
    found = shutil.which(name, path=path)
    if found is None:
        raise EnvironmentFault(f"{name}: not installed")
    return found


def cmd(
    args: Sequence[str], *, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a tool to completion; with ``check``, a failure raises ``EnvironmentFault``."""
    argv = [tool(args[0]), *args[1:]]
    try:
        res = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise EnvironmentFault(f"{' '.join(args)}: timed out") from e
    if check and res.returncode != 0:
        raise EnvironmentFault(f"{' '.join(args)}: exit {res.returncode}: {res.stderr.strip()}")
    return res


def list_namespaces() -> list[str]:
    """Names of all named network namespaces on this machine."""
    out = cmd(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(ns: str) -> set[int]:
    """Pids of the processes living in namespace ``ns``."""
    out = cmd(["ip", "netns", "pids", ns], check=False).stdout
    return {int(tok) for tok in out.split() if tok.isdigit()}


def check_environment() -> str | None:
    """Why this machine cannot run a test bed (not root, a tool missing, netns broken), or None."""
    if os.geteuid() != 0:
        return "the network test bed needs root"
    try:
        for name in TOOLS:
            tool(name)
        probe = make_prefix() + "probe"
        try:
            cmd(["ip", "netns", "add", probe])
            cmd(["ip", "-n", probe, "link", "set", "lo", "up"])
        finally:
            cmd(["ip", "netns", "del", probe], check=False)
    except EnvironmentFault as e:
        return f"network namespaces unusable: {e}"
    return None


def sweep_stale(prefix_pattern: str | re.Pattern[str] = PREFIX_PATTERN) -> list[str]:
    """Delete namespaces matching ``prefix_pattern`` (which must have a ``pid`` group holding
    pid % 100000) whose owner is gone: no live process has that pid part.  Returns the names.
    Processes still inside such a namespace are left alone (they keep it alive, unnamed)."""
    pattern = re.compile(prefix_pattern) if isinstance(prefix_pattern, str) else prefix_pattern
    alive = {int(d) % 100000 for d in os.listdir("/proc") if d.isdigit()}
    removed = []
    for name in list_namespaces():
        m = pattern.match(name)
        if m is None or int(m.group("pid")) in alive:
            continue
        if cmd(["ip", "netns", "del", name], check=False).returncode == 0:
            removed.append(name)
            log.info("swept stale namespace %s", name)
    return removed


def send_signal(pid: int, sig: int) -> None:
    """Signal the process group led by ``pid``, else the process alone; gone is fine."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def end_children(procs: Iterable[subprocess.Popen[Any]], grace: float) -> None:
    """SIGTERM each of our running children (and its group), SIGKILL after ``grace`` s, reap."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        send_signal(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM for %.1f s; killing", p.pid, grace)
            send_signal(p.pid, signal.SIGKILL)
            try:
                p.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                log.error("pid %d survived SIGKILL", p.pid)


def end_pids(pids: set[int], grace: float) -> None:
    """SIGTERM each pid (not our children), SIGKILL whatever is left after ``grace`` s."""
    pids = pids - {os.getpid()}
    for pid in pids:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = {pid for pid in pids if _running(pid)}
    for pid in pids:
        _kill(pid, signal.SIGKILL)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False
