"""SocialVPN: each user's own view of the network, friends from the XMPP roster.

A node's peers are its roster contacts with a mutual subscription (no group).  The node's
``ip4``/``ip4_mask`` is its own subnet, and every friend gets a local address in it from the
address book (``friends.json`` in ``state_dir``: the same friend keeps the same address across
restarts).  Views are private, so two users may use the same subnet and overlapping addresses:
the data plane translates (``ipop.wire.nat44``) so that packets inside a link carry the two
owners' own addresses, and each end maps them into its own view.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipop.controller.groupvpn import GroupVPN
from ipop.controller.peers import Peer, bare
from ipop.errors import ConfigError, IpopError
from ipop.wire.signal import SignalMessage

if TYPE_CHECKING:
    from ipop.node import Node

log = logging.getLogger("ipop.controller.social")
BOOK_FILE = "friends.json"


class AddressBook:
    """Stable friend -> local address assignments inside this node's own subnet."""

    def __init__(self, path: Path, network: ipaddress.IPv4Network, own: str) -> None:
        self.path = path
        self.network = network
        self.own = own
        self.book: dict[str, str] = {}
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                for jid, addr in data.items():
                    if (isinstance(jid, str) and isinstance(addr, str)
                            and ipaddress.IPv4Address(addr) in network and addr != own):
                        self.book[jid] = addr
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("address book %s unreadable (%s); starting a new one", path, exc)

    def address(self, jid: str) -> str:
        """The local address of friend ``jid``, assigned (and saved) on first use."""
        addr = self.book.get(jid)
        if addr is not None:
            return addr
        used = set(self.book.values()) | {self.own}
        for host in self.network.hosts():
            candidate = str(host)
            if candidate not in used:
                self.book[jid] = candidate
                self._save()
                return candidate
        raise ConfigError("ip4_mask", f"subnet {self.network} has no free address for {jid}")

    def name_of(self, addr: str) -> str | None:
        for jid, a in self.book.items():
            if a == addr:
                return jid
        return None

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.book, fh, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


class SocialVPN(GroupVPN):
    """The SocialVPN controller of one node."""

    name = "socialvpn"

    def __init__(self, node: Node, backend: Any = None) -> None:
        super().__init__(node, backend)
        self.overlay_id = "socialvpn"
        self.book = AddressBook(node.cfg.state_path / BOOK_FILE, node.cfg.ip4_network,
                                node.cfg.ip4)

    def group_filter(self) -> str | None:
        return None  # peers are mutual subscriptions, not a group

    def _set_ip(self, peer: Peer, ip4: str) -> bool:
        # the peer's own address may overlap ours or other friends': views are private
        peer.real_ip4 = ip4
        peer.ip4 = self.book.address(bare(peer.jid))
        peer.conflict = None
        return True

    def link_addresses(self, peer: Peer, msg: SignalMessage) -> tuple[str | None, str | None]:
        return peer.ip4, msg.ip4

    def announced_ip6(self) -> str | None:
        return None  # SocialVPN is IPv4-only: each friend's address is translated (NAT44)

    def advertised_routes(self) -> tuple[str, ...] | None:
        return None

    def on_presence(self, jid: str, uid: str | None, online: bool,
                    ip4: str | None = None, *, ip6: str | None = None) -> None:
        if not online and bare(jid) not in self.peers.by_jid:
            return  # an ex-friend's last presence: nothing to tear down
        if online:
            self.peers.get(jid).ip4 = self.book.address(bare(jid))
        super().on_presence(jid, uid, online, ip4)

    def on_roster(self, jid: str, subscribed_both: bool) -> None:
        key = bare(jid)
        peer = self.peers.by_jid.get(key)
        if subscribed_both:
            self.peers.get(key).ip4 = self.book.address(key)
            log.info("friend %s added (local address %s)", key, self.book.address(key))
            return
        if peer is not None:
            self._drop_link(peer, "friendship ended", tell=False)
            self.peers.remove(key)
            log.info("friend %s removed", key)
            self.node.notify("con_stat", {"peer": key, "event": "friend_removed"})

    async def handle_api(self, method: str, params: dict[str, Any]) -> Any:
        """``add_friend``/``remove_friend`` {"jid"}: ask for or end a mutual subscription."""
        if method not in ("add_friend", "remove_friend"):
            raise IpopError(f"unknown method {method!r}")
        jid = str(params.get("jid", ""))
        user, at, domain = jid.partition("@")
        if not (user and at and domain) or "/" in jid:
            raise IpopError("jid must be a bare JID like bob@example.org")
        if self.backend is None:
            raise IpopError("signaling is not running")
        if method == "add_friend":
            await self.backend.subscribe(jid)
            return {"friend": jid, "local_ip": self.book.address(jid)}
        await self.backend.unsubscribe(jid)
        self.on_roster(jid, False)
        return {"removed": jid}

    def peer_entry(self, peer: Peer) -> dict[str, Any]:
        entry = super().peer_entry(peer)
        entry["real_ip"] = peer.real_ip4
        return entry
