"""The ``virtio_net_hdr`` that prefixes every read and write of a TUN opened with IFF_VNET_HDR.

Layout (10 bytes, all fields little endian, ``struct virtio_net_hdr`` of linux/virtio_net.h)::

     0        1        2        3        4        5        6        7        8        9
    +--------+--------+--------+--------+--------+--------+--------+--------+--------+--------+
    | flags  |gso_type|     hdr_len     |    gso_size     |   csum_start    |   csum_offset   |
    +--------+--------+--------+--------+--------+--------+--------+--------+--------+--------+

flags
    ``NEEDS_CSUM`` (1): the layer-4 checksum is *partial*: the 16-bit field at
    ``csum_start + csum_offset`` holds only the pseudo-header sum (folded, not complemented);
    whoever takes the packet must add the ones'-complement sum of the bytes from ``csum_start`` to
    the end and store the complement there (``complete_csum`` does it in software).
    ``DATA_VALID`` (2): the checksum was verified already (only ever set on writes).
gso_type
    ``GSO_NONE`` (0) one packet; ``GSO_TCPV4`` (1) / ``GSO_TCPV6`` (4) a TCP super-packet to be
    cut into ``gso_size``-byte segments (``GSO_ECN`` 0x80 or-ed in: CWR is set and belongs on the
    first segment only); ``GSO_UDP`` (3, UFO, obsolete); ``GSO_UDP_L4`` (5, USO): UDP payload cut
    into ``gso_size``-byte datagrams.
hdr_len
    bytes of headers (IP + L4) in front of the payload.  On reads the kernel puts the length of
    the linear part of the skb here, so readers must not trust it; writers must set it right.
gso_size
    payload bytes per segment (the MSS for TCP).
csum_start, csum_offset
    where the checksummed region starts (from the start of the IP packet on a TUN) and where in
    it the checksum field sits (16 for TCP, 6 for UDP).

Vector (a TCPv4 TSO read: NEEDS_CSUM, TCPV4, hdr_len 52, MSS 1334, start 20, offset 16)::

    01 01 34 00 36 05 14 00 10 00
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ipop.errors import MalformedFrame

Buf = bytes | bytearray | memoryview

VNET_HDR_LEN = 10
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

CSUM_OFFSET_TCP = 16
CSUM_OFFSET_UDP = 6

VNET = struct.Struct("<BBHHHH")


class VnetHdr(NamedTuple):
    """A parsed ``virtio_net_hdr``."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0


PLAIN = bytes(VNET_HDR_LEN)
"""The header of one packet whose checksums are complete: no GSO, no flags."""


def pack(hdr: VnetHdr) -> bytes:
    """The 10 bytes of ``hdr``."""
    return VNET.pack(*hdr)


def parse(buf: Buf, offset: int = 0) -> VnetHdr:
    """The header at ``offset`` of ``buf``.

    Raises ``MalformedFrame`` (reason ``vnet_truncated``) and nothing else.
    """
    if offset < 0 or len(buf) - offset < VNET_HDR_LEN:
        raise MalformedFrame(f"virtio_net_hdr needs {VNET_HDR_LEN} bytes", reason="vnet_truncated")
    return VnetHdr._make(VNET.unpack_from(buf, offset))


def needs_csum(hdr_len: int, csum_start: int, csum_offset: int) -> bytes:
    """The header of one packet (no GSO) whose L4 checksum is partial."""
    return VNET.pack(F_NEEDS_CSUM, GSO_NONE, hdr_len, 0, csum_start, csum_offset)


def ones_sum(data: Buf, start: int = 0) -> int:
    """The folded ones'-complement sum (RFC 1071) of ``data[start:]`` as 16-bit big-endian words.

    0 only for all-zero data, else in 1..0xFFFF.  Uses 2**16 = 1 (mod 0xFFFF): one big-integer
    conversion and one modulo, no Python loop (about 5 us per 1400 bytes on a slow core).
    """
    x = int.from_bytes(data[start:], "big")
    if (len(data) - start) & 1:
        x <<= 8  # an odd trailing byte is padded with a zero byte
    if not x:
        return 0
    return (x - 1) % 0xFFFF + 1


def complete_csum(pkt: bytearray | memoryview, csum_start: int, csum_offset: int) -> None:
    """Do in software what ``NEEDS_CSUM`` asks of the kernel, in place.

    The field at ``csum_start + csum_offset`` must hold the pseudo-header sum; it is replaced by
    the complement of the sum over ``pkt[csum_start:]``.  A result of 0 is stored as 0xFFFF (as
    Linux does, so that UDP never sends "no checksum").
    """
    where = csum_start + csum_offset
    if csum_start < 0 or where + 2 > len(pkt):
        raise MalformedFrame("checksum field outside the packet", reason="vnet_csum_range")
    value = 0xFFFF - ones_sum(pkt, csum_start)
    if value == 0:
        value = 0xFFFF
    pkt[where] = value >> 8
    pkt[where + 1] = value & 0xFF
