"""A whole signaled overlay in one test bed: N ipop nodes, one prosody, one LAN.

``ipop scale``, the scale test and the soak test use it.  Topology::

    +------------------------ inet (bridge 198.19.1.0/24) ------------------------+
          |               |               |                          |
       servers           n1              n2          ...            nN
       prosody :5222     198.19.1.2      198.19.1.3                 198.19.1.(N+1)
       198.19.1.1        100.64.0.1      100.64.0.2                 100.64.0.N  (ipop0)

Every node is ``nI@ipop.test`` in the shared-roster group ``scale``, so each sees every other
online at login.  With ``pin`` (the default) every host gets permanent neighbour entries for
every other (``Testbed.pin_neighbours``): the kernel's one neighbour table would otherwise
evict entries at 1,024 for all namespaces together.  ``close`` stops the nodes and prosody and
removes every namespace.
"""

from __future__ import annotations

import compileall
import tempfile
import time
from pathlib import Path
from typing import Any

from ipop.errors import IpopError
from ipop.testbed.netns import Host, Lan, Testbed
from ipop.testbed.nodes import NodeProc
from ipop.testbed.servers import Prosody

DOMAIN = "ipop.test"
PASSWORD = "pw-ipop-scale"
GROUP = "scale"
MAX_NODES = 250


def byte_compile() -> None:
    """Write the ipop package's bytecode (``__pycache__``) as an installed package has it.

    ``pip install`` compiles a wheel's modules, but an editable install does not, and with
    ``PYTHONDONTWRITEBYTECODE`` set nothing caches them: then every node compiles all of ipop
    at start, 0.3-0.4 s of CPU each, which dwarfs what set-up costs at 32 nodes."""
    import ipop

    compileall.compile_dir(Path(ipop.__file__).parent, quiet=1)


def overlay_ip(index: int) -> str:
    """The overlay address of node ``index`` (1-based)."""
    return f"100.64.0.{index}"


class Overlay:
    """A test bed with one prosody and ``n`` GroupVPN nodes (not started) on one LAN."""

    def __init__(self, n: int, *, extra: dict[str, Any] | None = None, pin: bool = True,
                 workdir: Path | None = None) -> None:
        if not 2 <= n <= MAX_NODES:
            raise IpopError(f"overlay of {n} nodes: use 2 to {MAX_NODES}", reason="bad_size")
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(
            prefix="ipop-overlay-")
        self.dir = workdir if workdir is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        self.tb = Testbed()
        self.nodes: list[NodeProc] = []
        self.pinned = 0
        byte_compile()
        try:
            self.servers = self.tb.add_host("servers")
            self.lan: Lan = self.tb.add_lan("inet", [self.servers])
            self.server_ip = self.lan.members["servers"]
            self.prosody = Prosody(self.dir / "prosody", domain=DOMAIN, bind=self.server_ip,
                                   netns=self.servers.ns)
            users = [f"n{i}" for i in range(1, n + 1)]
            for user in users:
                self.prosody.register(user, PASSWORD)
            self.prosody.set_groups({GROUP: users}, restart=False)
            for i, user in enumerate(users, 1):
                host = self.tb.add_host(user)
                self.tb.attach(self.lan, host)
                self.nodes.append(NodeProc(host, self.dir, user, self.node_config(i, extra)))
            if pin:
                self.pinned = self.tb.pin_neighbours(self.lan)
            self.prosody.start()
        except BaseException:
            self.close()
            raise

    def node_config(self, index: int, extra: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "ip4": overlay_ip(index), "ip4_mask": 24,
            "xmpp_username": f"n{index}@{DOMAIN}", "xmpp_password": PASSWORD,
            "xmpp_host": self.server_ip, "xmpp_tls": "none", "allow_insecure_signaling": True,
            "group": GROUP,
            **(extra or {}),
        }

    def host(self, index: int) -> Host:
        return self.nodes[index].host

    def start(self, log_level: str = "INFO") -> None:
        for node in self.nodes:
            node.start(log_level)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every node answers on its control socket (a busy node may take a while)."""
        deadline = time.monotonic() + timeout
        todo = list(self.nodes)
        while todo:
            node = todo[0]
            if node.proc is not None and node.proc.poll() is not None:
                raise IpopError(f"node {node.name} exited with {node.proc.returncode}:\n"
                                f"{node.log()[-2000:]}")
            if self.state(node) is not None:
                todo.pop(0)
                continue
            if time.monotonic() > deadline:
                raise IpopError(f"{len(todo)} nodes not ready after {timeout:g} s "
                                f"({', '.join(n.name for n in todo[:8])})", reason="not_ready")
            time.sleep(0.05)

    @staticmethod
    def state(node: NodeProc) -> dict[str, Any] | None:
        """The node's ``get_state``, or None when it does not answer (yet)."""
        try:
            return node.status()
        except (IpopError, OSError, ValueError):
            return None

    def states(self) -> list[dict[str, Any] | None]:
        """Every node's ``get_state`` (None for a node that does not answer)."""
        return [self.state(node) for node in self.nodes]

    def close(self) -> None:
        for node in self.nodes:
            try:
                node.stop(timeout=5.0)
            except Exception:  # the test bed kills it anyway
                pass
        try:
            if getattr(self, "prosody", None) is not None:
                self.prosody.stop()
        finally:
            self.tb.close()
            if self._tmp is not None:
                self._tmp.cleanup()


def links_up(state: dict[str, Any] | None) -> set[str]:
    """Peer UIDs of a node's links that are up."""
    if state is None:
        return set()
    return {link["peer_uid"] for link in state.get("links", []) if link.get("state") == "up"}


def setup_failures(state: dict[str, Any] | None) -> int:
    """Failed link set-ups a node counted (failed attempts and timed-out ones)."""
    if state is None:
        return 0
    xmpp = (state.get("node") or {}).get("xmpp") or {}
    counters = xmpp.get("counters") or {}
    return int(counters.get("setup_failed", 0)) + int(counters.get("setup_timed_out", 0))


def peers_online(state: dict[str, Any] | None) -> int:
    if state is None:
        return 0
    return sum(1 for p in state.get("peers", []) if p.get("online"))
