"""Peeking into inner packets: IP destinations, Ethernet and ARP, and TCP MSS clamping.

All functions take the packet as bytes (or a writable bytearray for the clamp) and never raise
on garbage: they return ``None``/``False`` instead, since inner packets come from our own NIC or
from authenticated peers and a malformed one is simply not forwarded.

IPv4 header (RFC 791), the offsets used here::

     0       1       2       3
    +-------+-------+-------+-------+
    |ver/ihl|  tos  | total length  |
    +-------+-------+-------+-------+
    |   identification  |flags/frag |
    +-------+-------+-------+-------+
    |  ttl  | proto |   checksum    |
    +-------+-------+-------+-------+
    |        source address  (12)   |
    +-------------------------------+
    |      destination address (16) |
    +-------------------------------+

Ethernet II (TAP mode)::

    | dst MAC (6) | src MAC (6) | ethertype (2) | payload ...
"""

from __future__ import annotations

import struct

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST_MAC = b"\xff" * 6
BROADCAST4 = b"\xff" * 4
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMP = 1
TCPOPT_MSS = 2


def ip_version(pkt: bytes | bytearray | memoryview) -> int:
    return pkt[0] >> 4 if pkt else 0


def ip_dst(pkt: bytes | bytearray | memoryview) -> bytes | None:
    """Destination address (4 or 16 bytes) of an IPv4 or IPv6 packet."""
    n = len(pkt)
    if n >= 20 and pkt[0] >> 4 == 4:
        return bytes(pkt[16:20])
    if n >= 40 and pkt[0] >> 4 == 6:
        return bytes(pkt[24:40])
    return None


def destination(buf: bytes | bytearray | memoryview, off: int, end: int,
                ) -> tuple[bytes, bool, int, int] | None:
    """Where the IP packet at ``buf[off:end]`` goes: ``(address, group, version, protocol)``,
    ``group`` for a multicast or broadcast address (IPv4 224/4 and above, 255.255.255.255;
    IPv6 ff00::/8), ``protocol`` the IPv4 protocol or IPv6 next header; None when it is no
    IPv4 packet of 20 bytes or IPv6 packet of 40.  The data plane's one destination parser
    (TUN reads, with or without a ``virtio_net_hdr`` before the packet; TAP frames)."""
    if end - off < 20:
        return None
    ver = buf[off] >> 4
    if ver == 4:
        dst = bytes(buf[off + 16 : off + 20])
        return dst, buf[off + 16] >= 224 or dst == BROADCAST4, 4, buf[off + 9]
    if ver == 6 and end - off >= 40:
        return bytes(buf[off + 24 : off + 40]), buf[off + 24] == 0xFF, 6, buf[off + 6]
    return None


def ip_src(pkt: bytes | bytearray | memoryview) -> bytes | None:
    """Source address (4 or 16 bytes) of an IPv4 or IPv6 packet."""
    n = len(pkt)
    if n >= 20 and pkt[0] >> 4 == 4:
        return bytes(pkt[12:16])
    if n >= 40 and pkt[0] >> 4 == 6:
        return bytes(pkt[8:24])
    return None


def is_multicast_mac(mac: bytes | memoryview) -> bool:
    """True for broadcast and multicast MACs (group bit set)."""
    return len(mac) == 6 and bool(mac[0] & 1)


def eth_split(frame: bytes | bytearray | memoryview) -> tuple[bytes, bytes, int] | None:
    """(dst MAC, src MAC, ethertype) of an Ethernet II frame."""
    if len(frame) < ETH_HLEN:
        return None
    return bytes(frame[0:6]), bytes(frame[6:12]), (frame[12] << 8) | frame[13]


_ARP = struct.Struct("!HHBBH6s4s6s4s")  # htype ptype hlen plen op sha spa tha tpa
ARP_REQUEST = 1
ARP_REPLY = 2


def arp_parse(payload: bytes | memoryview) -> tuple[int, bytes, bytes, bytes, bytes] | None:
    """(op, sender MAC, sender IP, target MAC, target IP) of an Ethernet/IPv4 ARP packet."""
    if len(payload) < _ARP.size:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(payload)
    if htype != 1 or ptype != ETH_P_IP or hlen != 6 or plen != 4:
        return None
    return op, sha, spa, tha, tpa


def arp_reply_frame(our_mac: bytes, our_ip: bytes, to_mac: bytes, to_ip: bytes) -> bytes:
    """An Ethernet frame carrying an ARP reply: ``our_ip`` is at ``our_mac``."""
    eth = to_mac + our_mac + struct.pack("!H", ETH_P_ARP)
    return eth + _ARP.pack(1, ETH_P_IP, 6, 4, ARP_REPLY, our_mac, our_ip, to_mac, to_ip)


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def checksum_adjust(csum: int, old: int, new: int) -> int:
    """RFC 1624 incremental update of a ones-complement checksum for one 16-bit word."""
    return ~_fold((~csum & 0xFFFF) + (~old & 0xFFFF) + new) & 0xFFFF


def clamp_mss(pkt: bytearray | memoryview, max_mss: int, partial: bool = False) -> bool:
    """Lower the MSS option of a TCP SYN in an IPv4/IPv6 packet to ``max_mss``, in place.

    Returns True when the packet was changed.  The TCP checksum is updated incrementally,
    unless it is ``partial`` (it holds only the pseudo-header sum, which the option is not in).
    """
    n = len(pkt)
    if n < 20:
        return False
    ver = pkt[0] >> 4
    if ver == 4:
        ihl = (pkt[0] & 0x0F) * 4
        if pkt[9] != IPPROTO_TCP or ihl < 20 or (pkt[6] & 0x1F) or pkt[7]:
            return False  # not TCP, or a fragment
        tcp = ihl
    elif ver == 6:
        if n < 40 or pkt[6] != IPPROTO_TCP:
            return False
        tcp = 40
    else:
        return False
    if n < tcp + 20 or not (pkt[tcp + 13] & 0x02):  # SYN flag
        return False
    doff = (pkt[tcp + 12] >> 4) * 4
    end = min(tcp + doff, n)
    i = tcp + 20
    while i < end:
        kind = pkt[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end:
            break
        length = pkt[i + 1]
        if length < 2:
            break
        if kind == TCPOPT_MSS and length == 4 and i + 4 <= end:
            old = (pkt[i + 2] << 8) | pkt[i + 3]
            if old <= max_mss:
                return False
            pkt[i + 2], pkt[i + 3] = max_mss >> 8, max_mss & 0xFF
            if partial:
                return True
            csum = (pkt[tcp + 16] << 8) | pkt[tcp + 17]
            csum = checksum_adjust(csum, old, max_mss)
            pkt[tcp + 16], pkt[tcp + 17] = csum >> 8, csum & 0xFF
            return True
        i += length
    return False
