"""Cryptokey routing on the inbound side: whether an inner packet's source is one its sending
peer may use, and what happens when it is not (dropped, counted, logged at a bounded rate).

TUN: ``Link.source_ok`` (the peer's overlay addresses, then the prefixes its link carries).
TAP: a member sends only from MACs no other member (nor this node) holds, and an ARP or IP
sender inside the overlay prefix must be one of its own addresses.  The inbound pipeline calls
these once per packet on its per-datagram path, and once per whole train or merged GRO run
(whose segments all share one header) on the others.  Runs on the poll thread.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import time
from typing import Any

from ipop.dataplane.link import Link
from ipop.dataplane.table import ForwardingTable
from ipop.dataplane.tun import Device
from ipop.ratelimit import TokenBucket
from ipop.wire import packet as wp
from ipop.wire.prefixes import PrefixSet

log = logging.getLogger("ipop.dataplane")

LOG_RATE = 1.0  # log lines a second, at most, about packets from sources not allowed
LOG_BURST = 5


class SourceCheck:
    """The source checks of one data plane; ``drops`` is the node-wide counter it adds to."""

    def __init__(self, dev: Device, table: ForwardingTable,
                 drops: collections.Counter[str]) -> None:
        self.dev = dev
        self.table = table
        self.drops = drops
        self.overlay = PrefixSet()  # the overlay prefixes (TAP checks); set by the facade
        self._log = TokenBucket(LOG_RATE, LOG_BURST)

    def spoofed(self, link: Link, pkt: Any, why: str = "") -> str:
        """Count (node-wide and per link) and log, at a bounded rate, an inner packet whose
        source the sending peer may not use.  IPv6 link-local sources (what a kernel sends
        on its own, e.g. MLD reports) are dropped too, but counted apart and not logged.
        Returns the reason counted."""
        if not self.dev.tap and len(pkt) >= 40 and pkt[0] >> 4 == 6 and pkt[8] == 0xFE and (
                pkt[9] & 0xC0) == 0x80:
            self.drops["link_local_source"] += 1
            return "link_local_source"
        self.drops["spoofed_source"] += 1
        link.stats.rx_drops["spoofed_source"] += 1
        if self._log.take(time.monotonic()):
            log.warning("link %s: dropped a packet from %s: %s", link.peer_uid.hex()[:12],
                        _source_text(pkt, self.dev.tap),
                        why or "not an address or prefix this peer may use")
        return "spoofed_source"

    def filter(self, link: Link, iovs: list[list[Any]]) -> list[list[Any]]:
        """The TUN writes of ``iovs`` whose source ``link``'s peer may use (the others are
        counted and logged)."""
        kept = []
        for iov in iovs:
            if link.source_ok(iov[1]):
                kept.append(iov)
            else:
                self.spoofed(link, iov[1])
        return kept

    def tap_ok(self, link: Link, frame: Any) -> bool:
        """TAP: a member sends only from MACs no other member (nor this node) holds, and an ARP
        or IP sender inside the overlay prefix must be one of its own addresses; learns the
        source MAC."""
        if len(frame) < wp.ETH_HLEN:
            return True  # the device drops a runt; nothing to claim
        src_mac = bytes(frame[6:12])
        if src_mac[0] & 1 or src_mac == self.dev.mac or not self.table.learn_mac(src_mac, link):
            self.spoofed(link, frame, "source MAC of this node or another member")
            return False
        ethertype = (frame[12] << 8) | frame[13]
        sender: bytes | None = None
        if ethertype == wp.ETH_P_ARP:
            arp = wp.arp_parse(frame[wp.ETH_HLEN:])
            if arp is not None:
                sha, sender = arp[1], arp[2]
                held = self.table.by_mac.get(sha)
                if sha == self.dev.mac or (held is not None and held is not link):
                    self.spoofed(link, frame, "ARP sender MAC of another member")
                    return False
        elif ethertype == wp.ETH_P_IP and len(frame) >= wp.ETH_HLEN + 20:
            sender = bytes(frame[26:30])
        elif ethertype == wp.ETH_P_IPV6 and len(frame) >= wp.ETH_HLEN + 40:
            sender = bytes(frame[22:38])
        if sender is not None and sender in self.overlay and sender not in link.src_exact and (
                link.src_nets is None or sender not in link.src_nets):
            self.spoofed(link, frame, "sender inside the overlay prefix that is not its own")
            return False
        return True


def _source_text(pkt: Any, tap: bool) -> str:
    try:
        if tap:
            return ":".join(f"{b:02x}" for b in bytes(pkt[6:12]))
        ver = pkt[0] >> 4
        if ver == 4:
            return str(ipaddress.IPv4Address(bytes(pkt[12:16])))
        if ver == 6:
            return str(ipaddress.IPv6Address(bytes(pkt[8:24])))
    except (IndexError, ValueError):
        pass
    return "a packet that is not IP"
