"""The forwarding table: overlay IP, MAC and UID to link, read lock-free by the data path.

Writers (the control thread) build new dicts and swap them in; readers (TX and RX threads) take
one attribute read and see a consistent snapshot.  MAC learning writes single dict entries from
the RX thread, which is safe under the GIL.
"""

from __future__ import annotations

import ipaddress
import threading

from ipop.dataplane.link import Link


class ForwardingTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_uid: dict[bytes, Link] = {}
        self.by_ip: dict[bytes, Link] = {}
        self.by_mac: dict[bytes, Link] = {}
        self.by_source: dict[tuple[int, tuple[str, int], int | None], Link] = {}
        self.links: tuple[Link, ...] = ()

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
            if link.overlay_ip4:
                by_ip[link.overlay_ip4] = link
            if link.overlay_ip6:
                by_ip[link.overlay_ip6] = link
            by_source[link.path.source_key] = link
        by_mac = {m: lk for m, lk in list(self.by_mac.items()) if lk.peer_uid in by_uid}
        for link in by_uid.values():
            if link.mac:
                by_mac[link.mac] = link
        self.by_ip, self.by_source, self.by_mac = by_ip, by_source, by_mac
        self.by_uid = by_uid
        self.links = tuple(by_uid.values())

    def learn_mac(self, mac: bytes, link: Link) -> None:
        """Remember that ``mac`` lives behind ``link`` (called by the RX thread)."""
        if self.by_mac.get(mac) is not link:
            self.by_mac[mac] = link

    def lookup_ip(self, addr: bytes) -> Link | None:
        return self.by_ip.get(addr)

    @staticmethod
    def ip_text(addr: bytes) -> str:
        return str(ipaddress.ip_address(addr))
