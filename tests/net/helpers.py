"""Shared helpers for the net tier: waiting, ping, iperf3, control-socket notifications."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ipop.testbed.netns import Host


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, step: float = 0.05,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def ping(host: Host, addr: str, count: int = 3, interval: float = 0.2, wait: int = 2,
         size: int | None = None) -> bool:
    cmd = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(wait)]
    if size is not None:
        cmd += ["-s", str(size)]
    r = host.run([*cmd, addr], check=False, timeout=count * (interval + wait) + 10)
    return r.returncode == 0


def ping_until(host: Host, addr: str, timeout: float = 10.0) -> float:
    """Ping once every 0.1 s until a reply comes; returns the seconds it took."""
    t0 = time.monotonic()
    wait_for(lambda: ping(host, addr, count=1, interval=0.2, wait=1), timeout=timeout,
             step=0.0, what=f"ping {addr}")
    return time.monotonic() - t0


def iperf3(client: Host, server: Host, addr: str, seconds: int = 5,
           extra: list[str] | None = None, connect: str | None = None) -> dict[str, Any]:
    """Run an iperf3 test (server bound to ``addr``, client to ``connect`` or ``addr``)."""
    srv = server.popen(["iperf3", "-s", "-1", "-B", addr], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: ":5201 " in server.run(["ss", "-Htln"], check=False).stdout,
                 timeout=5, what="iperf3 server")
        r = client.run(["iperf3", "-c", connect or addr, "-t", str(seconds), "-J",
                        *(extra or [])],
                       check=False, timeout=seconds + 30)
        result: dict[str, Any] = json.loads(r.stdout or "{}")
        assert r.returncode == 0 and "error" not in result, (
            f"iperf3 failed: {result.get('error')} {r.stderr[-500:]}")
        return result
    finally:
        srv.terminate()
        srv.wait(5)


def gbits(result: dict[str, Any]) -> float:
    return float(result["end"]["sum_received"]["bits_per_second"]) / 1e9


class Subscriber:
    """A control-socket connection that receives a node's notifications."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.sendall(b'{"id": 1, "method": "subscribe"}\n')
        self.buf = b""
        self.sock.settimeout(5.0)
        # wait for the node's answer: a notification sent before it would not reach us
        kept: list[bytes] = []  # notifications that came first: events() reads them
        while True:
            if b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                assert chunk, "the node closed its control socket"
                self.buf += chunk
                continue
            line, self.buf = self.buf.split(b"\n", 1)
            msg = json.loads(line)
            if msg.get("id") == 1:
                assert msg.get("result") == "subscribed", line
                break
            kept.append(line + b"\n")
        self.buf = b"".join(kept) + self.buf
        self.sock.settimeout(0.2)

    def events(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                msg = json.loads(line)
                if "notify" in msg:
                    out.append(msg)
            if time.monotonic() >= deadline:
                break
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                if out:
                    break
                continue
            if not chunk:
                break
            self.buf += chunk
        return out

    def close(self) -> None:
        self.sock.close()
