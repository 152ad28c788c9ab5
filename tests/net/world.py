"""A shared "internet" for signaled tests: one test bed, one LAN, one prosody (and coturn).

Topology::

    +---------------------------- inet (bridge 198.19.1.0/24) ----------------------------+
          |                        |                   |                      |
      servers                  node hosts added by each test (198.19.1.x)
      prosody :5222
      coturn  :3478

Users and groups are registered up front (a group change needs a prosody restart).
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ipop.testbed.netns import Host, Lan, Testbed
from ipop.testbed.nodes import NodeProc
from ipop.testbed.servers import Coturn, Prosody

DOMAIN = "ipop.test"
PASSWORD = "pw-ipop-test"
TURN_USER, TURN_PASS = "ipop", "turn-pass"


class World:
    def __init__(self, groups: dict[str, list[str]], *, turn: bool = False,
                 users: list[str] | None = None) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="ipop-world-")
        self.dir = Path(self.tmp.name)
        self.tb = Testbed()
        self.nodes: list[NodeProc] = []
        self._ids = itertools.count(1)
        try:
            self.servers = self.tb.add_host("srv")
            self.inet: Lan = self.tb.add_lan("inet", [self.servers])
            self.server_ip = self.inet.members["srv"]
            self.prosody = Prosody(self.dir / "prosody", domain=DOMAIN, bind=self.server_ip,
                                   netns=self.servers.ns)
            for user in {u for members in groups.values() for u in members} | set(users or []):
                self.prosody.register(user, PASSWORD)
            self.prosody.set_groups(groups, restart=False)
            self.prosody.start()
            self.coturn: Coturn | None = None
            if turn:
                self.coturn = Coturn(self.dir / "coturn", listen_ip=self.server_ip,
                                     relay_ip=self.server_ip, users={TURN_USER: TURN_PASS},
                                     netns=self.servers.ns)
                self.coturn.start()
        except BaseException:
            self.close()
            raise

    def host(self, name: str) -> Host:
        host = self.tb.add_host(f"{name}")
        self.tb.attach(self.inet, host)
        return host

    def node(self, user: str, ip4: str, *, host: Host | None = None, group: str | None,
             **extra: Any) -> NodeProc:
        host = host or self.host(user)
        cfg: dict[str, Any] = {
            "ip4": ip4, "ip4_mask": 24, "xmpp_username": f"{user}@{DOMAIN}",
            "xmpp_password": PASSWORD, "xmpp_host": self.server_ip, "xmpp_tls": "none",
            "allow_insecure_signaling": True,
            "group": group, "sec": False, "keepalive_seconds": 1.0, **extra,
        }
        node = NodeProc(host, self.dir, user, cfg)
        self.nodes.append(node)
        return node

    def stop_nodes(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()

    def close(self) -> None:
        self.stop_nodes()
        try:
            if getattr(self, "coturn", None) is not None:
                self.coturn.stop()  # type: ignore[union-attr]
            if getattr(self, "prosody", None) is not None:
                self.prosody.stop()
        finally:
            self.tb.close()
            self.tmp.cleanup()


def world_fixture(groups: dict[str, list[str]], *, turn: bool = False,
                  users: list[str] | None = None) -> Iterator[World]:
    w = World(groups, turn=turn, users=users)
    try:
        yield w
    finally:
        w.close()
