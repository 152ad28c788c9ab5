"""The forwarding table: overlay IP, MAC and UID to link, read lock-free by the data path, and
the one route verdict (``ForwardingTable.route``: exact owner, then longest-prefix match).

Writers (the control thread) build new dicts and swap them in; readers (the poll thread) take
one attribute read and see a consistent snapshot.  MAC learning writes single dict entries from
the poll thread, which is safe under the GIL.
"""

from __future__ import annotations

import ipaddress
import threading

from ipop.dataplane.link import Link
from ipop.wire.prefixes import RouteTable


class ForwardingTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_uid: dict[bytes, Link] = {}
        self.by_ip: dict[bytes, Link] = {}
        self.by_mac: dict[bytes, Link] = {}
        self.by_source: dict[tuple[int, tuple[str, int], int | None], Link] = {}
        self.links: tuple[Link, ...] = ()
        # prefixes links carry (accepted routes, ``allowed_ips``): looked up, longest prefix
        # first, only for destinations no link owns exactly
        self.routes: RouteTable[Link] = RouteTable()

    def add(self, link: Link) -> Link | None:
        """Insert ``link``, replacing (and returning) an older link to the same peer."""
        with self._lock:
            old = self.by_uid.get(link.peer_uid)
            by_uid = dict(self.by_uid)
            by_uid[link.peer_uid] = link
            self._rebuild(by_uid)
            return old

    def remove(self, peer_uid: bytes) -> Link | None:
        with self._lock:
            by_uid = dict(self.by_uid)
            old = by_uid.pop(peer_uid, None)
            if old is not None:
                self._rebuild(by_uid)
            return old

    def reindex(self) -> None:
        """Recompute the derived indexes after a link's path or addresses changed."""
        with self._lock:
            self._rebuild(dict(self.by_uid))

    def _rebuild(self, by_uid: dict[bytes, Link]) -> None:
        by_ip: dict[bytes, Link] = {}
        by_source: dict[tuple[int, tuple[str, int], int | None], Link] = {}
        for link in by_uid.values():
            # the first holder of an address keeps it (ownership: a newcomer is refused)
            if link.overlay_ip4:
                by_ip.setdefault(link.overlay_ip4, link)
            if link.overlay_ip6:
                by_ip.setdefault(link.overlay_ip6, link)
            by_source[link.path.source_key] = link
        by_mac = {m: lk for m, lk in list(self.by_mac.items()) if lk.peer_uid in by_uid}
        for link in by_uid.values():
            if link.mac:
                by_mac[link.mac] = link
        # a prefix two links claim goes to the older link (the controller refuses the newer)
        routes = RouteTable((net, lk) for lk in sorted(by_uid.values(), key=_age)
                            for net in lk.nets)
        self.by_ip, self.by_source, self.by_mac = by_ip, by_source, by_mac
        self.routes = routes
        self.by_uid = by_uid
        self.links = tuple(by_uid.values())

    def learn_mac(self, mac: bytes, link: Link) -> bool:
        """Remember that ``mac`` lives behind ``link`` (called by the poll thread); False when
        another live link holds it already (the first holder keeps it)."""
        held = self.by_mac.get(mac)
        if held is link:
            return True
        if held is not None and not held.closed and held.peer_uid in self.by_uid:
            return False
        self.by_mac[mac] = link
        return True

    def route(self, dst: bytes, group: bool = False) -> Link | None:
        """The route verdict for a destination address: the link whose peer owns it, else (for
        an address that is no ``group`` one) the link whose prefix matches it longest (subnet
        routes, exit nodes), looked up only on that miss.  None: no link; the caller floods a
        group address and holds and reports any other (``Outbound``)."""
        link = self.by_ip.get(dst)
        if link is None and not group and self.routes:
            link = self.routes.lookup(dst)
        return link

    def owner_of(self, addr: bytes) -> Link | None:
        """The link whose peer holds the overlay address ``addr`` exactly."""
        return self.by_ip.get(addr)

    @staticmethod
    def ip_text(addr: bytes) -> str:
        return str(ipaddress.ip_address(addr))


def _age(link: Link) -> float:
    return link.created
