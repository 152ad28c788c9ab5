"""The systems under test, each between the same two test bed hosts: traffic always goes from
``client`` (host ``a``, the sender) to ``server`` (host ``b``, the receiver).

* ``direct``: the underlay veth itself (198.18.1.0/24).
* ``ipop-enc`` / ``ipop-plain``: two ipop nodes with static peers, ``sec`` true / false,
  overlay 100.64.0.0/24 (``ipop.testbed.nodes.static_mesh``).
* ``ipop-enc-metrics`` (``--metrics``): ``ipop-enc`` with ``metrics_listen`` on both nodes and
  each endpoint scraped once a second through the run, so serving metrics is measured beside
  the same build without them.
* ``wireguard-go``: Debian's userspace WireGuard, keys from ``wg genkey``/``wg pubkey``,
  ``WG_PROCESS_FOREGROUND=1 wireguard-go IFACE`` per host, configured with ``wg set``;
  overlay 100.65.0.0/24, its default MTU (1420).
* ``tinc``: tincd 1.0.36 in router mode, one config directory per host (``tinc.conf``,
  ``hosts/``, a ``tinc-up`` that sets the address), RSA keys from ``tincd -K``, run with
  ``tincd -D``; AES-256-CBC + SHA-256 (faster than its blowfish default here); overlay
  100.66.0.0/24, its default MTU (1500).

Every process is started with ``Host.popen`` so the test bed kills it whatever happens; ``stop``
ends a system's processes by pid before the next one starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ipop
from ipop.bench import measure
from ipop.errors import EnvironmentFault, IpopError
from ipop.testbed.netns import Host, Link
from ipop.testbed.nodes import NodeProc, static_mesh
from ipop.testbed.proc import tool

_WG_PORT = 51820
_TINC_PORT = 655
_UP_TIMEOUT = 30.0


def _stop_procs(procs: list[subprocess.Popen[Any]], timeout: float = 5.0) -> None:
    """SIGTERM all of ``procs`` at once, then wait for each (SIGKILL after ``timeout``)."""
    alive = [p for p in procs if p.poll() is None]
    for proc in alive:
        proc.send_signal(signal.SIGTERM)
    for proc in alive:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)


def _pid_tag() -> str:
    return f"{os.getpid() % 100000:05d}"


class System:
    """One system under test.  ``start`` brings it up and returns when a ping crosses it."""

    name = "?"
    label = "?"
    overlay = True

    def __init__(self, link: Link, work: Path) -> None:
        self.link = link
        self.client: Host = link.a
        self.server: Host = link.b
        self.work = work / self.name
        self.target = ""
        """The address the client sends to (the server's address on this system)."""
        self.dev = ""
        """The server's interface carrying this system's packets (for its MTU)."""
        self.version = "?"
        self.security = ""
        self.up_seconds = 0.0

    @classmethod
    def missing(cls) -> str | None:
        """Why this system cannot run on this machine, or None."""
        return None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """End this system's processes (the test bed ends them anyway on close)."""

    def roots(self) -> dict[str, int]:
        """Pids whose process trees do this system's work: ``sender`` and ``receiver``."""
        return {}

    def mtu(self) -> int:
        return measure.interface_mtu(self.server, self.dev)

    def drops(self) -> dict[str, Any]:
        """Drop counters the system reports, if any."""
        return {}

    def problems(self) -> list[str]:
        """Error lines from the system's logs."""
        return []

    def _wait_up(self) -> None:
        self.up_seconds = measure.wait_ping(self.client, self.target, _UP_TIMEOUT)


class Direct(System):
    name = "direct"
    label = "direct veth"
    overlay = False

    def start(self) -> None:
        self.target = self.link.b_addr
        self.dev = self.link.b_dev
        self.version = "kernel veth"
        self.security = "none"
        self._wait_up()


class Ipop(System):
    """Two ipop nodes with static peers; ``sec`` decides whether the link is encrypted."""

    sec = True
    extra: dict[str, Any] = {}
    workers: int | None = None  # ``ipop bench --workers`` (None: the nodes' default)

    def __init__(self, link: Link, work: Path) -> None:
        super().__init__(link, work)
        self.nodes: list[NodeProc] = []

    def start(self) -> None:
        hosts = [self.link.a, self.link.b]
        self.nodes = static_mesh(hosts, self.work, underlay=[self.link.a_addr, self.link.b_addr],
                                 extra={"sec": self.sec, **self.extra,
                                        **({} if self.workers is None
                                           else {"workers": self.workers})})
        for node in self.nodes:
            node.start(log_level="WARNING")
        for node in self.nodes:
            node.wait_ready(timeout=30)
        self.target = str(self.nodes[1].config["ip4"])
        self.dev = str(self.nodes[1].config.get("interface", "ipop0"))
        self.version = f"ipop {ipop.__version__} {_git_describe()}".strip()
        self._wait_up()
        link = self.nodes[0].link_to(self.nodes[1])
        self.security = str(link["security"]) if link else "?"
        want = "dtls" if self.sec else "none"
        if self.security != want:
            raise IpopError(f"{self.name}: link security is {self.security!r}, expected {want!r}",
                            reason="bench")

    def stop(self) -> None:
        for node in self.nodes:  # both at once, then wait for each
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            node.stop()

    def roots(self) -> dict[str, int]:
        pids = [n.proc.pid for n in self.nodes if n.proc is not None]
        return dict(zip(("sender", "receiver"), pids, strict=False))

    def drops(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for role, node in zip(("sender", "receiver"), self.nodes, strict=False):
            try:
                links = node.status()["links"]
            except IpopError:
                continue
            merged: dict[str, int] = {}
            for entry in links:
                for reason, count in (entry.get("drops") or {}).items():
                    merged[reason] = merged.get(reason, 0) + int(count)
            out[role] = merged
        return out

    def problems(self) -> list[str]:
        lines: list[str] = []
        for node in self.nodes:
            for line in node.log().splitlines():
                if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
                    lines.append(f"{self.name} {node.name}: {line.strip()[:240]}")
        return lines


class IpopEnc(Ipop):
    name = "ipop-enc"
    label = "ipop encrypted"
    sec = True


class IpopPlain(Ipop):
    name = "ipop-plain"
    label = "ipop plain"
    sec = False


_SCRAPER = """
import sys, time, urllib.request
while True:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=1).read()
    except OSError:
        pass
    time.sleep(1)
"""


class IpopEncMetrics(IpopEnc):
    """``ipop-enc`` serving Prometheus metrics, each node scraped once a second."""

    name = "ipop-enc-metrics"
    label = "ipop encrypted, metrics scraped 1/s"
    extra = {"metrics_listen": "127.0.0.1:9477"}

    def __init__(self, link: Link, work: Path) -> None:
        super().__init__(link, work)
        self.scrapers: list[subprocess.Popen[Any]] = []

    def start(self) -> None:
        super().start()
        for node in self.nodes:
            self.scrapers.append(node.host.popen(
                [sys.executable, "-c", _SCRAPER, "http://127.0.0.1:9477/metrics"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def stop(self) -> None:
        _stop_procs(self.scrapers)
        self.scrapers = []
        super().stop()


class WireguardGo(System):
    """wireguard-go on both hosts; interfaces ``wgb{pid}{0,1}`` so that the UAPI sockets in the
    shared ``/var/run/wireguard`` never collide with another run's."""

    name = "wireguard-go"
    label = "wireguard-go"

    def __init__(self, link: Link, work: Path) -> None:
        super().__init__(link, work)
        self.procs: list[subprocess.Popen[Any]] = []
        self.ifaces = [f"wgb{_pid_tag()}{i}" for i in range(2)]

    @classmethod
    def missing(cls) -> str | None:
        return _missing("wireguard-go", "wg")

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.version = measure.first_line([tool("wireguard-go"), "--version"])
        hosts = [self.link.a, self.link.b]
        addrs = [self.link.a_addr, self.link.b_addr]
        keys = [_wg_keypair() for _ in hosts]
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"}
        for i, host in enumerate(hosts):
            iface = self.ifaces[i]
            log = (self.work / f"{iface}.log").open("ab")
            self.procs.append(host.popen([tool("wireguard-go"), iface], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            log.close()
            sock = Path(f"/var/run/wireguard/{iface}.sock")
            deadline = time.monotonic() + 10
            while not sock.exists():
                if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                    raise IpopError(f"wireguard-go {iface} did not start:\n"
                                    f"{_tail(self.work / f'{iface}.log')}", reason="bench")
                time.sleep(0.01)
        for i, host in enumerate(hosts):
            j = 1 - i
            keyfile = self.work / f"{self.ifaces[i]}.key"
            keyfile.touch(mode=0o600)
            keyfile.write_text(keys[i][0] + "\n")
            host.run([tool("wg"), "set", self.ifaces[i], "listen-port", str(_WG_PORT),
                      "private-key", str(keyfile), "peer", keys[j][1],
                      "allowed-ips", f"100.65.0.{j + 1}/32", "endpoint", f"{addrs[j]}:{_WG_PORT}"])
            host.run([tool("ip"), "addr", "add", f"100.65.0.{i + 1}/24", "dev", self.ifaces[i]])
            host.run([tool("ip"), "link", "set", self.ifaces[i], "up"])
        self.target = "100.65.0.2"
        self.dev = self.ifaces[1]
        self.security = "wireguard"
        self._wait_up()

    def stop(self) -> None:
        _stop_procs(self.procs)
        for iface in self.ifaces:  # wireguard-go removes its socket on SIGTERM; a kill doesn't
            Path(f"/var/run/wireguard/{iface}.sock").unlink(missing_ok=True)

    def roots(self) -> dict[str, int]:
        return dict(zip(("sender", "receiver"), (p.pid for p in self.procs), strict=False))

    def problems(self) -> list[str]:
        return _error_lines(self.name, self.work.glob("*.log"), ("ERROR",))


class Tinc(System):
    """tincd 1.0 on both hosts, router mode, static ``ConnectTo`` from the sender."""

    name = "tinc"
    label = "tinc"

    def __init__(self, link: Link, work: Path) -> None:
        super().__init__(link, work)
        self.procs: list[subprocess.Popen[Any]] = []
        self.names = ["bench_a", "bench_b"]
        self.ifaces = [f"tcb{_pid_tag()}{i}" for i in range(2)]

    @classmethod
    def missing(cls) -> str | None:
        return _missing("tincd")

    def start(self) -> None:
        tincd = tool("tincd")
        self.version = measure.first_line([tincd, "--version"])
        hosts = [self.link.a, self.link.b]
        addrs = [self.link.a_addr, self.link.b_addr]
        dirs = [self.work / n for n in self.names]
        for i, d in enumerate(dirs):
            self._configure(i, d, addrs[i])
        keygen = [subprocess.Popen([tincd, "-c", str(d), "-K2048"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                  for d in dirs]
        for proc in keygen:
            _, err = proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise IpopError(f"tincd -K failed: {err.strip()[-300:]}", reason="bench")
        for i, d in enumerate(dirs):  # each side learns the other's host file (with its key)
            other = self.names[1 - i]
            shutil.copyfile(dirs[1 - i] / "hosts" / other, d / "hosts" / other)
        # the listener first: a ConnectTo that finds nobody retries only after 5 s
        for host, d in reversed(list(zip(hosts, dirs, strict=True))):
            log = (d / "tincd.log").open("ab")
            self.procs.append(host.popen(
                [tincd, "-c", str(d), "-D", f"--pidfile={d / 'tincd.pid'}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            log.close()
            if host is self.server:
                _wait_listen(host, self.procs[-1], _TINC_PORT, d / "tincd.log")
        self.procs.reverse()  # sender, receiver
        self.target = "100.66.0.2"
        self.dev = self.ifaces[1]
        self.security = "aes-256-cbc+sha256"
        self._wait_up()

    def _configure(self, i: int, d: Path, addr: str) -> None:
        (d / "hosts").mkdir(parents=True, exist_ok=True)
        conf = [f"Name = {self.names[i]}", f"Interface = {self.ifaces[i]}", "Mode = router",
                "AddressFamily = ipv4", f"BindToAddress = {addr}", f"Port = {_TINC_PORT}"]
        if i == 0:
            conf.append(f"ConnectTo = {self.names[1]}")
        (d / "tinc.conf").write_text("\n".join(conf) + "\n")
        (d / "hosts" / self.names[i]).write_text(
            f"Address = {addr}\nPort = {_TINC_PORT}\nSubnet = 100.66.0.{i + 1}/32\n"
            "Cipher = aes-256-cbc\nDigest = sha256\n")
        up = d / "tinc-up"
        ip = tool("ip")
        up.write_text(f"#!/bin/sh\n{ip} addr add 100.66.0.{i + 1}/24 dev $INTERFACE\n"
                      f"{ip} link set $INTERFACE up\n")
        up.chmod(0o755)

    def stop(self) -> None:
        _stop_procs(self.procs)

    def roots(self) -> dict[str, int]:
        return dict(zip(("sender", "receiver"), (p.pid for p in self.procs), strict=False))

    def problems(self) -> list[str]:
        return _error_lines(self.name, self.work.glob("*/tincd.log"), ("Error", "error"))


SYSTEMS: dict[str, type[System]] = {
    cls.name: cls for cls in (Direct, IpopEnc, IpopPlain, IpopEncMetrics, WireguardGo, Tinc)
}
PEERS = ("wireguard-go", "tinc")


def _missing(*programs: str) -> str | None:
    for prog in programs:
        try:
            tool(prog)
        except EnvironmentFault:
            return f"{prog} is not installed (apt-get install wireguard-go wireguard-tools tinc)"
    return None


def _wait_listen(host: Host, proc: subprocess.Popen[Any], port: int, log: Path) -> None:
    deadline = time.monotonic() + 10
    while f":{port} " not in host.run(["ss", "-Htln"], check=False).stdout:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise IpopError(f"tincd in {host.name} is not listening on {port}:\n{_tail(log)}",
                            reason="bench")
        time.sleep(0.02)


def _wg_keypair() -> tuple[str, str]:
    wg = tool("wg")
    private = subprocess.run([wg, "genkey"], capture_output=True, text=True, check=True,
                             timeout=10).stdout.strip()
    public = subprocess.run([wg, "pubkey"], input=private, capture_output=True, text=True,
                            check=True, timeout=10).stdout.strip()
    return private, public


def _git_describe() -> str:
    root = Path(ipop.__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return ""
    try:
        r = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"],
                           capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout.strip()


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _error_lines(name: str, paths: Any, words: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for path in paths:
        for line in _tail(path, 200_000).splitlines():
            if any(w in line for w in words):
                out.append(f"{name} {Path(path).name}: {line.strip()[:240]}")
    return out
