"""SocialVPN translation: byte vectors and properties for TCP, UDP, ICMP echo, ICMP errors,
and partial (offload) checksums."""

import struct

from hypothesis import given
from hypothesis import strategies as st

from ipop.wire import nat44

A = bytes([100, 64, 0, 1])
B_LOCAL = bytes([100, 64, 0, 7])
B_REAL = bytes([100, 64, 0, 1])  # overlapping views: B's own address equals A's
A_LOCAL_AT_B = bytes([100, 64, 0, 9])


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip4(proto: int, src: bytes, dst: bytes, payload: bytes) -> bytearray:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 7, 0x4000, 64,
                                proto, 0, src, dst))
    struct.pack_into("!H", hdr, 10, csum(bytes(hdr)))
    return hdr + payload


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, proto, length)


def tcp(src: bytes, dst: bytes, data: bytes = b"hello", partial: bool = False) -> bytearray:
    seg = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, 1, 2, 5 << 4, 0x18, 500, 0, 0) + data)
    if partial:
        s = sum(struct.unpack("!6H", pseudo(src, dst, 6, len(seg))))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        struct.pack_into("!H", seg, 16, s)
    else:
        struct.pack_into("!H", seg, 16, csum(pseudo(src, dst, 6, len(seg)) + bytes(seg)))
    return ip4(6, src, dst, bytes(seg))


def udp(src: bytes, dst: bytes, data: bytes = b"x" * 11) -> bytearray:
    seg = bytearray(struct.pack("!HHHH", 5000, 53, 8 + len(data), 0) + data)
    c = csum(pseudo(src, dst, 17, len(seg)) + bytes(seg)) or 0xFFFF
    struct.pack_into("!H", seg, 6, c)
    return ip4(17, src, dst, bytes(seg))


def icmp_echo(src: bytes, dst: bytes) -> bytearray:
    msg = bytearray(struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping")
    struct.pack_into("!H", msg, 2, csum(bytes(msg)))
    return ip4(1, src, dst, bytes(msg))


def icmp_error(src: bytes, dst: bytes, quoted: bytes) -> bytearray:
    msg = bytearray(struct.pack("!BBHI", 3, 3, 0, 0) + quoted)
    struct.pack_into("!H", msg, 2, csum(bytes(msg)))
    return ip4(1, src, dst, bytes(msg))


def valid_ip(pkt: bytes) -> bool:
    return csum(pkt[:20]) == 0


def valid_l4(pkt: bytes) -> bool:
    proto, src, dst = pkt[9], pkt[12:16], pkt[16:20]
    body = pkt[20:]
    if proto == 1:
        return csum(body) == 0
    return csum(pseudo(src, dst, proto, len(body)) + body) == 0


def test_tcp_vector_dst_then_src():
    pkt = tcp(A, B_LOCAL)
    assert nat44.rewrite(pkt, nat44.DST, B_LOCAL, B_REAL)
    assert pkt.hex() == (
        "4500002d000740004006724264400001644000019c4014510000000100000002501801f4f0ea0000"
        + b"hello".hex()
    )
    assert valid_ip(pkt) and valid_l4(pkt)
    assert nat44.rewrite(pkt, nat44.SRC, A, A_LOCAL_AT_B)
    assert pkt[12:16] == A_LOCAL_AT_B and valid_ip(pkt) and valid_l4(pkt)


def test_udp_and_udp_without_checksum():
    pkt = udp(A, B_LOCAL)
    nat44.Translator(B_LOCAL, B_REAL).tx(pkt)
    assert pkt[16:20] == B_REAL and valid_ip(pkt) and valid_l4(pkt)
    zero = udp(A, B_LOCAL)
    struct.pack_into("!H", zero, 26, 0)
    nat44.rewrite(zero, nat44.DST, B_LOCAL, B_REAL)
    assert struct.unpack_from("!H", zero, 26)[0] == 0 and valid_ip(zero)


def test_icmp_echo():
    pkt = icmp_echo(A, B_LOCAL)
    before_icmp = bytes(pkt[20:])
    nat44.Translator(B_LOCAL, B_REAL).tx(pkt)
    assert bytes(pkt[20:]) == before_icmp  # ICMP has no pseudo-header
    assert valid_ip(pkt) and valid_l4(pkt)


def test_icmp_error_quoting_a_udp_packet():
    # B (in A's view B_LOCAL) sent A a UDP packet; A's kernel answers "port unreachable"
    quoted = bytes(udp(B_LOCAL, A))
    err = icmp_error(A, B_LOCAL, quoted)
    nat44.Translator(B_LOCAL, B_REAL).tx(err)
    assert err[16:20] == B_REAL
    inner = bytes(err[28:])
    assert inner[12:16] == B_REAL and inner[16:20] == A  # quoted source rewritten too
    assert valid_ip(err) and valid_l4(err) and valid_ip(inner) and valid_l4(inner)
    # and at B, the outer source and the quoted destination move into B's view
    nat44.Translator(A_LOCAL_AT_B, A).rx(err)
    inner = bytes(err[28:])
    assert err[12:16] == A_LOCAL_AT_B and inner[16:20] == A_LOCAL_AT_B
    assert valid_ip(err) and valid_l4(err) and valid_ip(inner) and valid_l4(inner)


def test_icmp_error_quoting_tcp_header_only_partly():
    quoted = bytes(tcp(B_LOCAL, A))[:28]  # IP header + 8 bytes: no TCP checksum quoted
    err = icmp_error(A, B_LOCAL, quoted)
    nat44.rewrite(err, nat44.DST, B_LOCAL, B_REAL)
    assert valid_ip(err) and valid_l4(err) and valid_ip(bytes(err[28:48]))


def test_partial_checksum_rule():
    pkt = tcp(A, B_LOCAL, partial=True)
    assert nat44.rewrite(pkt, nat44.DST, B_LOCAL, B_REAL, partial=True)
    expect = tcp(A, B_REAL, partial=True)
    assert pkt == expect  # the field holds the new pseudo-header's partial sum
    # the complete rule would have produced something else
    wrong = tcp(A, B_LOCAL, partial=True)
    nat44.rewrite(wrong, nat44.DST, B_LOCAL, B_REAL, partial=False)
    assert wrong[36:38] != expect[36:38]


def test_partial_checksum_vector():
    pkt = tcp(A, B_LOCAL, partial=True)
    assert pkt[36:38].hex() == "c8a7"
    nat44.rewrite(pkt, nat44.DST, B_LOCAL, B_REAL, partial=True)
    assert pkt[36:38].hex() == "c8a1"  # the plain sum moves by 0x0001 - 0x0007


def test_not_matching_or_garbage_is_untouched():
    pkt = tcp(A, B_LOCAL)
    before = bytes(pkt)
    assert not nat44.rewrite(pkt, nat44.DST, bytes([1, 2, 3, 4]), B_REAL)
    assert bytes(pkt) == before
    assert not nat44.rewrite(bytearray(b"\x60" + bytes(39)), nat44.DST, B_LOCAL, B_REAL)
    assert not nat44.rewrite(bytearray(b"\x45"), nat44.DST, B_LOCAL, B_REAL)


addr = st.binary(min_size=4, max_size=4)


@given(addr, addr, addr, st.binary(max_size=200), st.sampled_from(["tcp", "udp", "icmp"]))
def test_checksums_stay_valid(src, dst, new, data, kind):
    pkt = {"tcp": lambda: tcp(src, dst, data), "udp": lambda: udp(src, dst, data),
           "icmp": lambda: icmp_echo(src, dst)}[kind]()
    nat44.rewrite(pkt, nat44.DST, dst, new)
    assert valid_ip(pkt)
    if not (kind == "udp" and struct.unpack_from("!H", pkt, 26)[0] == 0):
        assert valid_l4(pkt)


@given(addr, addr, addr, st.integers(min_value=0, max_value=400))
def test_partial_property(src, dst, new, size):
    pkt = tcp(src, dst, bytes(size), partial=True)
    nat44.rewrite(pkt, nat44.DST, dst, new, partial=True)
    assert pkt == tcp(src, new, bytes(size), partial=True)


@given(st.binary(max_size=120), addr, addr)
def test_never_raises(data, old, new):
    nat44.rewrite(bytearray(data), nat44.DST, old, new)
    nat44.rewrite(bytearray(data), nat44.SRC, old, new)
