"""segment(): every datagram is a valid standalone packet once its partial checksum is finished.

The builders here (also used by test_coalesce) make packets the way the kernel hands them to a
TUN with offloads: IP header complete, TCP/UDP checksum field = pseudo-header sum (partial).
The checksum helper is a plain RFC 1071 sum, independent of the code under test.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipop.dataplane import segment as sg
from ipop.errors import LocalProtocolError
from ipop.wire import vnet

SRC4, DST4 = bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2])
SRC6 = bytes.fromhex("20010db8000000000000000000000001")
DST6 = bytes.fromhex("20010db8000000000000000000000002")
TS_OPTS = bytes.fromhex("0101080a") + struct.pack("!II", 123456789, 987654321)
FIN, PSH, ACK, ECE, CWR = 0x01, 0x08, 0x10, 0x40, 0x80


# ---- an independent checksum and packet builder
def csum16(data: bytes) -> int:
    """RFC 1071 ones'-complement sum of 16-bit big-endian words, folded (0..0xffff)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!I3xB", length, proto)


def ip4(total, ident, *, proto=6, ttl=64, tos=0, df=True, options=b"", src=SRC4, dst=DST4):
    ihl = (20 + len(options)) // 4
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, total, ident, 0x4000 if df else 0, ttl,
                    proto, 0, src, dst) + options
    return h[:10] + struct.pack("!H", 0xFFFF - csum16(h)) + h[12:]


def ip6(plen, *, proto=6, hop=64, tc=0, flow=0, src=SRC6, dst=DST6):
    return struct.pack("!IHBB16s16s", (6 << 28) | (tc << 20) | flow, plen, proto, hop, src, dst)


def tcp(seq, flags, *, sport=40000, dport=5201, ack=777, window=502, options=TS_OPTS, csum=0):
    doff = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, window, csum,
                       0) + options


def tcp_packet(v4, payload, seq, flags=ACK | PSH, *, ident=1000, options=TS_OPTS,
               ip_options=b"", ttl=64, tos=0, window=502, sport=40000, ack=777):
    """A TCP packet (or TSO super-packet) with a partial checksum, as the kernel makes it."""
    t = tcp(seq, flags, options=options, window=window, sport=sport, ack=ack)
    length = len(t) + len(payload)
    if v4:
        hdr = ip4(20 + len(ip_options) + length, ident, options=ip_options, ttl=ttl, tos=tos)
        src, dst = SRC4, DST4
    else:
        hdr = ip6(length, hop=ttl, tc=tos)
        src, dst = SRC6, DST6
    seed = csum16(pseudo(src, dst, 6, length))
    t = t[:16] + struct.pack("!H", seed) + t[18:]
    return hdr + t + payload


def udp_packet(v4, payload, *, ident=7):
    length = 8 + len(payload)
    src, dst = (SRC4, DST4) if v4 else (SRC6, DST6)
    seed = csum16(pseudo(src, dst, 17, length))
    u = struct.pack("!HHHH", 4789, 4790, length, seed) + payload
    return (ip4(20 + length, ident, proto=17) if v4 else ip6(length, proto=17)) + u


def tso_hdr(v4, mss, l4=None, ecn=False):
    gso = (vnet.GSO_TCPV4 if v4 else vnet.GSO_TCPV6) | (vnet.GSO_ECN if ecn else 0)
    start = l4 if l4 is not None else (20 if v4 else 40)
    return vnet.VnetHdr(vnet.F_NEEDS_CSUM, gso, 0, mss, start, 16)


def kernel_complete(pkt: bytes, start: int, offset: int) -> bytes:
    """What the kernel does for NEEDS_CSUM: complement of the sum from ``start``, stored."""
    c = 0xFFFF - csum16(pkt[start:])
    c = c or 0xFFFF
    return pkt[: start + offset] + struct.pack("!H", c) + pkt[start + offset + 2 :]


def parse_ip(pkt: bytes):
    """(v4, l4 offset, addresses, L4 bytes) of an IP packet, checking its lengths."""
    if pkt[0] >> 4 == 4:
        o = (pkt[0] & 15) * 4
        assert struct.unpack_from("!H", pkt, 2)[0] == len(pkt)
        assert csum16(pkt[:o]) == 0xFFFF, "IPv4 header checksum"
        return True, o, pkt[12:16], pkt[16:20], pkt[o:]
    assert struct.unpack_from("!H", pkt, 4)[0] + 40 == len(pkt)
    return False, 40, pkt[8:24], pkt[24:40], pkt[40:]


def l4_valid(pkt: bytes, proto: int = 6) -> bool:
    """Is the TCP/UDP checksum of this packet (complete form) right?"""
    _, _, src, dst, l4 = parse_ip(pkt)
    return csum16(pseudo(src, dst, proto, len(l4)) + l4) == 0xFFFF


def datagrams(seg: sg.Segments) -> list[bytes]:
    p, k = seg.parts, seg.stride
    return [b"".join(p[i : i + k]) for i in range(0, len(p), k)]


def check_segments(orig: bytes, mss: int, seg: sg.Segments) -> list[bytes]:
    """Every segment is a standalone valid TCP packet carrying its slice of the payload."""
    v4, o, _, _, l4 = parse_ip(orig)
    doff = (l4[12] >> 4) * 4
    size = o + doff
    payload = orig[size:]
    seq0, flags0 = struct.unpack_from("!I", orig, o + 4)[0], orig[o + 13]
    id0 = struct.unpack_from("!H", orig, 4)[0] if v4 else 0
    pkts = datagrams(seg)
    count = max(1, -(-len(payload) // mss))
    assert len(pkts) == seg.datagrams == count
    assert seg.partial
    assert all(len(p) == seg.size for p in pkts[:-1]) and len(pkts[-1]) == seg.last
    for i, p in enumerate(pkts):
        pv4, po, _, _, _ = parse_ip(p)
        assert (pv4, po) == (v4, o)
        assert p[size:] == payload[i * mss : (i + 1) * mss]
        if v4:
            assert struct.unpack_from("!H", p, 4)[0] == (id0 + i) & 0xFFFF
            assert p[6:10] == orig[6:10] and p[12:o] == orig[12:o]  # DF, TTL, addrs, options
            assert p[:2] == orig[:2]
        else:
            assert p[:4] == orig[:4] and p[6:40] == orig[6:40]
        assert struct.unpack_from("!I", p, o + 4)[0] == (seq0 + i * mss) & 0xFFFFFFFF
        assert p[o : o + 4] == orig[o : o + 4] and p[o + 8 : o + 13] == orig[o + 8 : o + 13]
        assert p[o + 14 : o + 16] == orig[o + 14 : o + 16] and p[o + 18 : size] == orig[
            o + 18 : size]
        want = flags0
        if i < count - 1:
            want &= ~(FIN | PSH)
        if i > 0:
            want &= ~CWR
        assert p[o + 13] == want, (i, p[o + 13], want)
        assert l4_valid(kernel_complete(p, o, 16)), f"segment {i} checksum"
    return pkts


# ---- properties
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    v4=st.booleans(),
    length=st.integers(1, 65535 - 40 - 32 - 40),
    mss=st.integers(500, 1400),
    seq0=st.one_of(st.integers(0, 0xFFFFFFFF), st.integers(0xFFFF0000, 0xFFFFFFFF)),
    id0=st.one_of(st.integers(0, 0xFFFF), st.integers(0xFFC0, 0xFFFF)),
    flags=st.sampled_from([ACK, ACK | PSH, ACK | PSH | FIN, ACK | CWR | ECE, ACK | ECE]),
    ts=st.booleans(),
    ip_options=st.sampled_from([b"", b"\x01\x01\x01\x00"]),
    data=st.randoms(use_true_random=False),
)
def test_tso_segments_are_standalone_packets(v4, length, mss, seq0, id0, flags, ts, ip_options,
                                             data):
    payload = data.randbytes(length)
    orig = tcp_packet(v4, payload, seq0, flags, ident=id0, options=TS_OPTS if ts else b"",
                      ip_options=ip_options if v4 else b"")
    o = 20 + len(ip_options) if v4 else 40
    seg = sg.segment(tso_hdr(v4, mss, o, ecn=bool(flags & CWR)), orig)
    check_segments(orig, mss, seg)


@settings(max_examples=30, deadline=None)
@given(v4=st.booleans(), length=st.integers(1, 60000), mss=st.integers(500, 1400),
       id0=st.integers(0, 0xFFFF), data=st.randoms(use_true_random=False))
def test_uso_segments_are_standalone_datagrams(v4, length, mss, id0, data):
    payload = data.randbytes(length)
    orig = udp_packet(v4, payload, ident=id0)
    o = 20 if v4 else 40
    hdr = vnet.VnetHdr(vnet.F_NEEDS_CSUM, vnet.GSO_UDP_L4, 0, mss, o, 6)
    pkts = datagrams(sg.segment(hdr, orig))
    assert len(pkts) == max(1, -(-length // mss))
    assert b"".join(p[o + 8 :] for p in pkts) == payload
    for i, p in enumerate(pkts):
        parse_ip(p)
        assert struct.unpack_from("!H", p, o + 4)[0] == len(p) - o
        if v4:
            assert struct.unpack_from("!H", p, 4)[0] == (id0 + i) & 0xFFFF
        assert l4_valid(kernel_complete(p, o, 6), proto=17)


# ---- examples
def test_vector_three_segments_ipv4():
    payload = bytes(range(256)) * 10  # 2560 bytes
    orig = tcp_packet(True, payload, 1000, ACK | PSH, ident=0xFFFF)
    seg = sg.segment(tso_hdr(True, 1000), orig, prefix=b"\x84PFX")
    assert seg.stride == 3 and seg.datagrams == 3
    assert seg.size == 4 + 52 + 1000 and seg.last == 4 + 52 + 560
    assert seg.parts[0::3] == [b"\x84PFX"] * 3
    pkts = [p[4:] for p in datagrams(seg)]
    # ids wrap 0xffff -> 0 -> 1, sequence numbers 1000, 2000, 3000, PSH on the last only
    assert [struct.unpack_from("!H", p, 4)[0] for p in pkts] == [0xFFFF, 0, 1]
    assert [struct.unpack_from("!I", p, 24)[0] for p in pkts] == [1000, 2000, 3000]
    assert [p[33] for p in pkts] == [ACK, ACK, ACK | PSH]
    for p in pkts:
        assert l4_valid(kernel_complete(p, 20, 16))


def test_single_segment_gso_passes_whole():
    orig = tcp_packet(False, b"x" * 800, 5, ACK | PSH)
    seg = sg.segment(tso_hdr(False, 1200), orig)
    assert datagrams(seg) == [orig] and seg.partial and seg.size == seg.last == len(orig)


def test_plain_packet_passes_untouched():
    pkt = ip4(28, 1, proto=1) + bytes(8)  # ICMP with a complete checksum
    seg = sg.segment(vnet.VnetHdr(), pkt)
    assert datagrams(seg) == [pkt] and not seg.partial


def test_plain_prefix_marks_complete_packets():
    pkt = ip4(28, 1, proto=1) + bytes(8)
    seg = sg.segment(vnet.VnetHdr(), pkt, b"PARTIAL", b"FULL")
    assert datagrams(seg) == [b"FULL" + pkt] and seg.size == seg.last == 4 + len(pkt)
    ack = tcp_packet(True, b"", 1, ACK)
    seg = sg.segment(vnet.VnetHdr(vnet.F_NEEDS_CSUM, 0, 0, 0, 20, 16), ack, b"PARTIAL", b"FULL")
    assert datagrams(seg) == [b"PARTIAL" + ack] and seg.partial
    seg = sg.segment(tso_hdr(True, 500), tcp_packet(True, bytes(1200), 1), b"P", b"F")
    assert [d[:1] for d in datagrams(seg)] == [b"P"] * 3


def test_needs_csum_standard_layout_stays_partial():
    for v4 in (True, False):
        pkt = tcp_packet(v4, b"", 1, ACK)  # a pure ACK with a partial checksum
        o = 20 if v4 else 40
        seg = sg.segment(vnet.VnetHdr(vnet.F_NEEDS_CSUM, 0, 0, 0, o, 16), pkt)
        assert seg.partial and datagrams(seg) == [pkt]
        udp = udp_packet(v4, b"hello")
        seg = sg.segment(vnet.VnetHdr(vnet.F_NEEDS_CSUM, 0, 0, 0, o, 6), udp)
        assert seg.partial and datagrams(seg) == [udp]


def test_needs_csum_unusual_layout_is_finished_in_software():
    # IPv6 with a hop-by-hop extension header in front of UDP: csum_start 48, not 40
    udp = udp_packet(False, b"payload!")
    hbh = bytes([17, 0]) + bytes(6)
    pkt = ip6(8 + len(udp) - 40, proto=0) + hbh + udp[40:]
    seg = sg.segment(vnet.VnetHdr(vnet.F_NEEDS_CSUM, 0, 0, 0, 48, 6), pkt)
    assert not seg.partial
    (out,) = datagrams(seg)
    l4 = out[48:]
    assert csum16(pseudo(SRC6, DST6, 17, len(l4)) + l4) == 0xFFFF


@pytest.mark.parametrize(
    ("hdr", "pkt", "reason"),
    [
        (tso_hdr(True, 1000), tcp_packet(False, bytes(3000), 1), "gso_malformed"),
        (tso_hdr(True, 1000), udp_packet(True, bytes(3000)), "gso_malformed"),
        (tso_hdr(True, 0), tcp_packet(True, bytes(3000), 1), "gso_malformed"),
        (vnet.VnetHdr(1, vnet.GSO_UDP, 0, 1000, 20, 6), udp_packet(True, bytes(3000)),
         "gso_unsupported"),
        (tso_hdr(True, 1000), b"\x00" * 40, "not_ip"),
        (tso_hdr(True, 1000), tcp_packet(True, b"", 1)[:30], "gso_malformed"),
    ],
)
def test_refusals(hdr, pkt, reason):
    with pytest.raises(LocalProtocolError) as e:
        sg.segment(hdr, pkt)
    assert e.value.reason == reason


def test_payload_views_borrow_the_read_buffer():
    buf = bytearray(tcp_packet(True, bytes(3000), 1))
    seg = sg.segment(tso_hdr(True, 1400), memoryview(buf))
    assert isinstance(seg.parts[1], memoryview)
    buf[-1] = 0xAB  # the last payload view sees the change: nothing was copied
    assert bytes(seg.parts[-1])[-1] == 0xAB
