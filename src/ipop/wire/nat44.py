"""SocialVPN's address translation: rewrite IPv4 addresses in place, checksums updated
incrementally (RFC 1624), ICMP errors included.

Each node translates with its own view only, so the packets inside a link carry the two owners'
real addresses::

    A's view: B is 100.64.0.7          B's view: A is 100.64.0.9
    A's TUN   src A.real  dst 100.64.0.7
      tx(A):  dst 100.64.0.7 -> B.real          (``rewrite(pkt, DST, ...)``)
    link      src A.real  dst B.real
      rx(B):  src A.real -> 100.64.0.9          (``rewrite(pkt, SRC, ...)``)
    B's TUN   src 100.64.0.9  dst B.real

An ICMP error quotes the packet that caused it, whose addresses ran the other way, so with the
outer destination the quoted source is rewritten (and with the outer source the quoted
destination); the quoted IP checksum, the quoted TCP/UDP checksum (when quoted) and the ICMP
checksum are all updated.

Two checksum rules.  A complete TCP/UDP checksum is the complement of the sum, so a changed word
``m -> m'`` gives ``HC' = ~(~HC + ~m + m')``.  A packet read from a TUN with offloads may carry
a *partial* checksum (virtio NEEDS_CSUM: the kernel will finish it), which holds the plain,
uncomplemented pseudo-header sum: there ``HC' = HC + ~m + m'``.  ``partial=True`` selects that.
Malformed or non-IPv4 packets are left untouched (the functions return False).
"""

from __future__ import annotations

SRC_OFF = 12
DST_OFF = 16
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
SRC = SRC_OFF
DST = DST_OFF
_ICMP_ERRORS = frozenset({3, 4, 5, 11, 12})
_L4_CSUM = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _add_delta(csum: int, old: bytes, new: bytes, *, complemented: bool = True) -> int:
    """Adjust a 16-bit checksum for 16-bit-aligned bytes ``old`` becoming ``new``."""
    s = (~csum & 0xFFFF) if complemented else csum
    for i in range(0, len(old), 2):
        s += (~((old[i] << 8) | old[i + 1]) & 0xFFFF) + ((new[i] << 8) | new[i + 1])
    s = _fold(s)
    return (~s & 0xFFFF) if complemented else s


def _get16(pkt: bytearray | memoryview, off: int) -> int:
    return (pkt[off] << 8) | pkt[off + 1]


def _put16(pkt: bytearray | memoryview, off: int, value: int) -> None:
    pkt[off] = value >> 8
    pkt[off + 1] = value & 0xFF


def _fix(pkt: bytearray | memoryview, csum_off: int, old: bytes, new: bytes,
         complemented: bool = True, udp: bool = False) -> None:
    csum = _get16(pkt, csum_off)
    if udp and csum == 0 and complemented:
        return  # IPv4 UDP without a checksum stays without one
    value = _add_delta(csum, old, new, complemented=complemented)
    if udp and complemented and value == 0:
        value = 0xFFFF
    _put16(pkt, csum_off, value)


def rewrite(pkt: bytearray | memoryview, which: int, old: bytes, new: bytes, *,
            partial: bool = False) -> bool:
    """Replace address ``old`` by ``new`` in field ``which`` (SRC or DST) of an IPv4 packet.

    Returns True when the packet was changed (the field held ``old``)."""
    n = len(pkt)
    if n < 20 or pkt[0] >> 4 != 4 or which not in (SRC, DST) or len(new) != 4:
        return False
    ihl = (pkt[0] & 0x0F) * 4
    if ihl < 20 or n < ihl or bytes(pkt[which : which + 4]) != old:
        return False
    pkt[which : which + 4] = new
    _fix(pkt, 10, old, new)  # IPv4 header checksum
    proto = pkt[9]
    first_fragment = (_get16(pkt, 6) & 0x1FFF) == 0
    if not first_fragment:
        return True
    l4 = ihl
    if proto in _L4_CSUM and n >= l4 + _L4_CSUM[proto] + 2:
        _fix(pkt, l4 + _L4_CSUM[proto], old, new, complemented=not partial,
             udp=proto == IPPROTO_UDP)
    elif proto == IPPROTO_ICMP and n >= l4 + 8 + 20 and pkt[l4] in _ICMP_ERRORS:
        _rewrite_quoted(pkt, l4, SRC if which == DST else DST, old, new)
    return True


def _rewrite_quoted(pkt: bytearray | memoryview, icmp: int, which: int, old: bytes,
                    new: bytes) -> None:
    """Rewrite the packet quoted by an ICMP error and keep every checksum right."""
    q = icmp + 8
    if pkt[q] >> 4 != 4:
        return
    qihl = (pkt[q] & 0x0F) * 4
    if qihl < 20 or len(pkt) < q + qihl or bytes(pkt[q + which : q + which + 4]) != old:
        return
    changes: list[tuple[int, bytes, bytes]] = []  # (offset, old bytes, new bytes) in the ICMP msg

    def change(off: int, new_bytes: bytes) -> None:
        before = bytes(pkt[off : off + len(new_bytes)])
        pkt[off : off + len(new_bytes)] = new_bytes
        changes.append((off, before, new_bytes))

    change(q + which, new)
    qcsum = _add_delta(_get16(pkt, q + 10), old, new)
    change(q + 10, qcsum.to_bytes(2, "big"))
    proto = pkt[q + 9]
    l4 = q + qihl
    if proto in _L4_CSUM and len(pkt) >= l4 + _L4_CSUM[proto] + 2:
        off = l4 + _L4_CSUM[proto]
        csum = _get16(pkt, off)
        if not (proto == IPPROTO_UDP and csum == 0):
            value = _add_delta(csum, old, new)
            if proto == IPPROTO_UDP and value == 0:
                value = 0xFFFF
            change(off, value.to_bytes(2, "big"))
    icmp_csum = _get16(pkt, icmp + 2)
    for _off, before, after in changes:  # every offset is even within the ICMP message
        icmp_csum = _add_delta(icmp_csum, before, after)
    _put16(pkt, icmp + 2, icmp_csum)


class Translator:
    """One SocialVPN link's translation: ``local`` (the friend in my view) <-> ``real``."""

    __slots__ = ("local", "real")

    def __init__(self, local: bytes, real: bytes) -> None:
        self.local = local
        self.real = real

    def tx(self, pkt: bytearray | memoryview, partial: bool = False) -> None:
        """Outgoing: destination ``local`` becomes the friend's ``real`` address."""
        rewrite(pkt, DST, self.local, self.real, partial=partial)

    def rx(self, pkt: bytearray | memoryview, partial: bool = False) -> None:
        """Incoming: source ``real`` becomes ``local``, the friend's address in my view."""
        rewrite(pkt, SRC, self.real, self.local, partial=partial)
