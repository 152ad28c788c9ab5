"""Run ipop nodes inside test bed hosts: write their configs, start, query and stop them.

Tests, the demo and the benchmark all use ``NodeProc``.  A node runs as
``python -m ipop up -c CONFIG`` in its host's namespace (a child process tracked by the test
bed, so it is always killed on close); its control socket lives on the shared filesystem, so
the caller talks to it from the root namespace.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ipop.api import server
from ipop.crypto.identity import Identity, load_or_create
from ipop.errors import IpopError
from ipop.testbed.netns import Host


class NodeProc:
    """One ipop node in a test bed host."""

    def __init__(self, host: Host, workdir: Path, name: str, config: dict[str, Any]) -> None:
        self.host = host
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.dir / "state"
        self.config: dict[str, Any] = {
            "state_dir": str(self.state_dir),
            "control_socket": str(self.dir / "control.sock"),
            **config,
        }
        self.identity: Identity = load_or_create(self.state_dir)
        self.proc: subprocess.Popen[Any] | None = None
        self.log_path = self.dir / "node.log"

    @property
    def uid(self) -> str:
        return self.identity.uid_hex

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    @property
    def control(self) -> Path:
        return Path(self.config["control_socket"])

    @property
    def config_path(self) -> Path:
        return self.dir / "config.json"

    def write_config(self) -> Path:
        path = self.config_path
        path.write_text(json.dumps(self.config, indent=2))
        path.chmod(0o600)
        return path

    def start(self, log_level: str | None = "INFO", *, env: dict[str, str] | None = None,
              prefix: list[str] | None = None) -> None:
        """Start ``ipop up``; ``env``: the whole environment (default: ours); ``prefix``: a
        command that runs it (``setpriv ...``); ``log_level`` None: the config's levels."""
        self.write_config()
        log = self.log_path.open("ab")
        level = [] if log_level is None else ["--log-level", log_level]
        self.proc = self.host.popen(
            [*(prefix or []), sys.executable, "-m", "ipop", "up", "-c", str(self.config_path),
             *level],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        log.close()

    def wait_ready(self, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise IpopError(f"node {self.name} exited with {self.proc.returncode}:\n"
                                f"{self.log()[-2000:]}")
            try:
                state: dict[str, Any] = self.call("get_state")
                return state
            except IpopError as exc:
                last = str(exc)
            time.sleep(0.05)
        raise IpopError(f"node {self.name} not ready after {timeout}s ({last}):\n"
                        f"{self.log()[-2000:]}")

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return server.call(self.control, method, params)

    def status(self) -> dict[str, Any]:
        state: dict[str, Any] = self.call("get_state")
        return state

    def link_to(self, other: NodeProc) -> dict[str, Any] | None:
        for link in self.status()["links"]:
            if link["peer_uid"] == other.uid:
                result: dict[str, Any] = link
                return result
        return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def reload(self, config: dict[str, Any]) -> None:
        """Write ``config`` as the node's config and send SIGHUP (the reload is asynchronous)."""
        self.config = config
        self.write_config()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def static_mesh(
    hosts: list[Host], workdir: Path, *, underlay: list[str], ip_base: str = "100.64.0.",
    port: int = 5800, extra: dict[str, Any] | None = None, switchmode: bool = False,
) -> list[NodeProc]:
    """Nodes on ``hosts`` that all know each other as static peers (a full mesh)."""
    extra = extra or {}
    nodes = [
        NodeProc(h, workdir, f"n{i + 1}", {
            "ip4": f"{ip_base}{i + 1}", "ip4_mask": 24, "listen_port": port,
            "switchmode": switchmode, **extra,
        })
        for i, h in enumerate(hosts)
    ]
    for i, node in enumerate(nodes):
        node.config["peers"] = [
            {"uid": other.uid, "ip4": other.config["ip4"], "endpoint": f"{underlay[j]}:{port}",
             "fingerprint": other.fingerprint}
            for j, other in enumerate(nodes) if j != i
        ]
    return nodes
