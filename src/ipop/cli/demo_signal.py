"""The signaled demo overlay: prosody (and coturn) in a servers namespace, nodes on an
"internet" LAN, one of them behind a NAT box, linked by their controllers on their own::

    +--------------------------- inet (198.19.1.0/24) ---------------------------+
         |            |            |                               |
       srv           n1           n2  ...                         nat (cone)
     prosody                                                       |
     coturn                                                  n<last> (198.19.2.1)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ipop.errors import IpopError
from ipop.testbed.netns import Testbed
from ipop.testbed.nodes import NodeProc
from ipop.testbed.servers import Coturn, Prosody

DOMAIN = "ipop.test"
PASSWORD = "demo-password"
TURN_USER, TURN_PASS = "demo", "demo-turn"


def build_signaled(tb: Testbed, work: Path, n: int, mode: str) -> tuple[list[NodeProc],
                                                                        dict[str, str]]:
    srv = tb.add_host("srv")
    inet = tb.add_lan("inet", [srv])
    server_ip = inet.members["srv"]
    prosody = Prosody(work / "prosody", domain=DOMAIN, bind=server_ip, netns=srv.ns)
    users = [f"n{i + 1}" for i in range(n)]
    for u in users:
        prosody.register(u, PASSWORD)
    if mode != "socialvpn":
        prosody.set_groups({"demo": users}, restart=False)
    prosody.start()
    coturn = Coturn(work / "coturn", listen_ip=server_ip, relay_ip=server_ip,
                    users={TURN_USER: TURN_PASS}, netns=srv.ns)
    coturn.start()
    tb.servers = [prosody, coturn]  # type: ignore[attr-defined]
    nodes: list[NodeProc] = []
    under: dict[str, str] = {}
    behind_nat = n >= 3  # the last node sits behind a cone NAT
    for i, user in enumerate(users):
        host = tb.add_host(user)
        if behind_nat and i == n - 1:
            nat = tb.add_nat("nat", [host], inet, kind="cone")
            under[user] = nat.inside.members[user]
        else:
            under[user] = tb.attach(inet, host)
        social = mode == "socialvpn"
        cfg: dict[str, Any] = {
            # SocialVPN: every user picks the same subnet and address; views are private
            "ip4": "100.64.0.1" if social else f"100.64.0.{i + 1}", "ip4_mask": 24,
            "xmpp_username": f"{user}@{DOMAIN}",
            "xmpp_password": PASSWORD, "xmpp_host": server_ip, "xmpp_tls": "none",
            "allow_insecure_signaling": True,
            "controller": mode,
            "stun": [f"{server_ip}:3478"],
            "turn": [{"server": f"{server_ip}:3478", "user": TURN_USER, "pass": TURN_PASS}],
            "security_groups": ["demo"],
        }
        if not social:
            cfg["group"] = "demo"
        nodes.append(NodeProc(host, work, user, cfg))
    return nodes, under


def befriend_all(nodes: list[NodeProc]) -> None:
    """SocialVPN: every user adds every other as a friend (mutual subscriptions)."""
    for a in nodes:
        for b in nodes:
            if a is not b:
                a.call("add_friend", {"jid": f"{b.name}@{DOMAIN}"})


def address_of(a: NodeProc, b: NodeProc) -> str:
    """The address ``a`` uses for ``b``: its own for GroupVPN, a's view of b for SocialVPN."""
    if a.config.get("controller") != "socialvpn":
        return str(b.config["ip4"])
    for p in a.status()["peers"]:
        if p.get("jid") == f"{b.name}@{DOMAIN}":
            return str(p["overlay_ip"])
    raise IpopError(f"{a.name} has no friend {b.name}")


def wait_linked(nodes: list[NodeProc], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    want = len(nodes) - 1
    while time.monotonic() < deadline:
        if all(sum(1 for lk in node.status()["links"] if lk["state"] == "up") >= want
               for node in nodes):
            return
        time.sleep(0.1)
    raise IpopError(f"the overlay did not link up within {timeout:.0f} s")


def stop_servers(tb: Testbed) -> None:
    for server in getattr(tb, "servers", []):
        server.stop()
