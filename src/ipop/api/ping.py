"""``ping`` on the control API (``ipop ping PEER``): one probe over the link, overlay to overlay.

The probe is the link's keepalive probe (``ipop.wire.keepalive``), which every ipop data plane
echoes, sealed on an encrypted link: an answer proves the peer's data plane is alive, holds the
link's keys, and reaches us on the path shown.  No ICMP and no route through the TUN.

    {"method": "ping", "params": {"peer": "UID|prefix|JID|overlay address",
                                  "timeout": 1.0, "connect": false}}
    -> {"answered": true, "rtt_ms", "uid", "jid", "overlay_ip", "path", "endpoint", "local",
        "direct", "security"}
    -> {"answered": false, "uid", ..., "reason": CODE, "detail": "why, for people"}

Reason codes when nothing answers: ``unknown_peer`` (neither a link, a static peer nor a group
member of that name), ``not_in_group``, ``no_signaling``, ``peer_offline``, ``on_demand``,
``linking``, ``keying``, ``keying_failed``, ``refused``, ``failed``, ``no_link``, ``timeout``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import TYPE_CHECKING, Any

from ipop.api import status as st
from ipop.errors import IpopError

if TYPE_CHECKING:
    from ipop.controller.peers import Peer
    from ipop.node import Node

DIRECT_KINDS = ("host", "srflx", "prflx", "static")
CONNECT_WAIT = 20.0  # seconds ``connect`` waits for a link to come up


class Target:
    """What a PEER argument names: a UID (maybe), the controller's peer, the link's entry."""

    def __init__(self, uid: str | None, peer: Peer | None, jid: str | None,
                 overlay_ip: str | None) -> None:
        self.uid = uid
        self.peer = peer
        self.jid = jid
        self.overlay_ip = overlay_ip

    def fields(self) -> dict[str, Any]:
        return {"uid": self.uid, "jid": self.jid, "overlay_ip": self.overlay_ip}


def _controller_peers(node: Node) -> list[Peer]:
    table = getattr(node.controller, "peers", None)
    if table is None:
        return []
    return list(table)


def resolve(node: Node, text: str) -> Target:
    """The peer ``text`` names; IpopError when it is ambiguous or empty."""
    text = text.strip()
    if not text:
        raise IpopError("ping: name a peer (UID, unique UID prefix, JID or overlay address)")
    peers = _controller_peers(node)
    links = node.dp.links if node.dp is not None else ()
    candidates: dict[str, Target] = {}

    def add(uid: str | None, peer: Peer | None, ip: str | None) -> None:
        key = uid or (peer.jid if peer is not None else "?")
        old = candidates.get(key)
        jid = peer.jid.split("/", 1)[0] if peer is not None else None
        if old is None:
            candidates[key] = Target(uid, peer, jid, ip)
        else:
            old.peer = old.peer or peer
            old.jid = old.jid or jid
            old.overlay_ip = old.overlay_ip or ip

    try:
        ip: str | None = str(ipaddress.ip_address(text))
    except ValueError:
        ip = None
    lowered = text.lower()
    is_hex = all(c in "0123456789abcdef" for c in lowered) and 1 <= len(lowered) <= 40
    for link in links:
        uid = link.peer_uid.hex()
        addr = link.overlay_ip4 or link.overlay_ip6
        link_ip = str(ipaddress.ip_address(addr)) if addr else None
        if (is_hex and uid.startswith(lowered)) or (ip is not None and link_ip == ip):
            add(uid, None, link_ip)
    for peer in peers:
        bare = peer.jid.split("/", 1)[0]
        if ((is_hex and peer.uid is not None and peer.uid.startswith(lowered))
                or (ip is not None and peer.ip4 == ip) or bare == text.split("/", 1)[0]):
            add(peer.uid, peer, peer.ip4)
    for sp in node.cfg.peers:
        if (is_hex and sp.uid.startswith(lowered)) or (ip is not None and sp.ip4 == ip):
            add(sp.uid, None, sp.ip4)
    if len(candidates) > 1:
        names = ", ".join(sorted((t.uid or "?")[:12] for t in candidates.values()))
        raise IpopError(f"ping: {text!r} matches {len(candidates)} peers ({names}); "
                        "give more of the UID")
    if candidates:
        found = next(iter(candidates.values()))
        if found.peer is None and found.uid is not None:
            found.peer = next((p for p in peers if p.uid == found.uid), None)
            if found.peer is not None:
                found.jid = found.peer.jid.split("/", 1)[0]
        return found
    return Target(None, None, text if "@" in text else None, ip)


def _why(node: Node, target: Target) -> tuple[str, str]:
    """Why ``target`` has no link (or none that is up)."""
    ctl = node.controller
    if target.peer is not None and ctl is not None and hasattr(ctl, "why_no_link"):
        code, detail = ctl.why_no_link(target.peer)
        return str(code), str(detail)
    if target.uid is None:
        if ctl is not None and not getattr(ctl, "connected", True):
            error = getattr(ctl, "signal_error", None) or "connecting"
            return "no_signaling", (f"not connected to the XMPP server ({error}): peers are "
                                    "known only through it")
        if target.jid is not None and ctl is not None:
            group = node.cfg.group
            where = f"group {group!r}" if group else "the roster (not a mutual friend)"
            return "not_in_group", (f"{target.jid} is not in this node's {where}, or has never "
                                    "been online")
        if ctl is None:
            return "unknown_peer", ("no such static peer, and this node has no signaling "
                                    "(no xmpp_username)")
        return "unknown_peer", "no link, static peer or group member has that UID or address"
    if any(sp.uid == target.uid for sp in node.cfg.peers):
        return "no_link", "static peer's link is not up (is the peer running? keying?)"
    return "no_link", "no link to that peer"


def _link_fields(node: Node, uid: str) -> dict[str, Any] | None:
    link = node.dp.link(bytes.fromhex(uid)) if node.dp is not None else None
    if link is None:
        return None
    entry = st.link_entry(link)
    return {"path": entry["path"], "endpoint": entry["endpoint"], "local": entry["local"],
            "direct": entry["path"] in DIRECT_KINDS and link.path.channel is None,
            "security": entry["security"], "state": entry["state"],
            "overlay_ip": entry["overlay_ip"]}


async def _connect(node: Node, target: Target) -> None:
    """Ask the controller for a link and wait (bounded) until it is up or fails for a reason
    that waiting will not change."""
    ctl = node.controller
    if target.peer is None or ctl is None or not hasattr(ctl, "want_link"):
        return
    ctl.want_link(target.peer)
    deadline = time.monotonic() + CONNECT_WAIT
    while time.monotonic() < deadline:
        if target.peer.uid is not None and node.link_is_up(target.peer.uid):
            target.uid = target.peer.uid
            return
        code, _ = _why(node, target)
        if code in ("no_signaling", "peer_offline", "refused", "not_in_group"):
            return
        await asyncio.sleep(0.1)


async def ping(node: Node, params: dict[str, Any]) -> dict[str, Any]:
    """One probe to the peer ``params["peer"]`` names (see the module docstring)."""
    target = resolve(node, str(params.get("peer", "")))
    timeout = min(max(float(params.get("timeout", 1.0)), 0.05), 10.0)
    dp = node.dp
    assert dp is not None
    up = target.uid is not None and node.link_is_up(target.uid)
    if not up and params.get("connect"):
        await _connect(node, target)
        up = target.uid is not None and node.link_is_up(target.uid)
    fields = target.fields()
    link = _link_fields(node, target.uid) if target.uid is not None else None
    if link is not None:
        fields.update(link)
        fields["overlay_ip"] = target.overlay_ip or link["overlay_ip"]
    if target.uid is None or link is None:
        code, detail = _why(node, target)
        return {**fields, "answered": False, "reason": code, "detail": detail}
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[float] = loop.create_future()

    def on_echo(rtt: float) -> None:
        if not answer.done():
            answer.set_result(rtt)

    why = dp.probe(bytes.fromhex(target.uid), on_echo)
    if why == "keying":
        detail = ("the link's DTLS handshake has not finished (it proves the peer and, on an "
                  "encrypted link, makes the keys); nothing is sent before it")
        return {**fields, "answered": False, "reason": "keying", "detail": detail}
    if why is not None:
        code, detail = _why(node, target)
        return {**fields, "answered": False, "reason": code, "detail": detail}
    try:
        rtt = await asyncio.wait_for(answer, timeout)
    except TimeoutError:
        detail = f"no echo within {timeout:g} s"
        if not up:
            detail += f" (link state {link['state']})"
        return {**fields, "answered": False, "reason": "timeout", "detail": detail}
    return {**fields, "answered": True, "rtt_ms": round(rtt, 3)}
