import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipop.errors import MalformedFrame
from ipop.wire import vnet


def test_tso_read_vector():
    raw = bytes.fromhex("01 01 34 00 36 05 14 00 10 00")
    hdr = vnet.parse(raw)
    assert hdr == vnet.VnetHdr(
        flags=vnet.F_NEEDS_CSUM, gso_type=vnet.GSO_TCPV4, hdr_len=52, gso_size=1334,
        csum_start=20, csum_offset=16,
    )
    assert vnet.pack(hdr) == raw


def test_tcpv6_ecn_vector():
    raw = bytes.fromhex("01 84 48 00 22 05 28 00 10 00")
    hdr = vnet.parse(raw)
    assert hdr.gso_type & ~vnet.GSO_ECN == vnet.GSO_TCPV6 and hdr.gso_type & vnet.GSO_ECN
    assert (hdr.hdr_len, hdr.gso_size, hdr.csum_start) == (72, 1314, 40)


def test_plain_and_needs_csum_headers():
    assert bytes(10) == vnet.PLAIN
    assert vnet.parse(vnet.PLAIN) == vnet.VnetHdr()
    assert vnet.needs_csum(28, 20, 6) == bytes.fromhex("01 00 1c 00 00 00 14 00 06 00")
    assert vnet.VNET_HDR_LEN == vnet.VNET.size == 10


def test_constants_match_linux():
    assert (vnet.F_NEEDS_CSUM, vnet.F_DATA_VALID) == (1, 2)
    assert (vnet.GSO_NONE, vnet.GSO_TCPV4, vnet.GSO_UDP, vnet.GSO_TCPV6) == (0, 1, 3, 4)
    assert (vnet.GSO_UDP_L4, vnet.GSO_ECN) == (5, 0x80)


def test_parse_at_offset_and_truncated():
    assert vnet.parse(b"xx" + bytes.fromhex("01 01 34 00 36 05 14 00 10 00"), 2).gso_size == 1334
    for bad in (b"", bytes(9)):
        with pytest.raises(MalformedFrame) as e:
            vnet.parse(bad)
        assert e.value.reason == "vnet_truncated"
    with pytest.raises(MalformedFrame):
        vnet.parse(bytes(12), 3)
    with pytest.raises(MalformedFrame):
        vnet.parse(bytes(12), -1)


@given(st.tuples(st.integers(0, 255), st.integers(0, 255), *[st.integers(0, 0xFFFF)] * 4))
def test_round_trip(fields):
    hdr = vnet.VnetHdr(*fields)
    raw = vnet.pack(hdr)
    assert raw == struct.pack("<BBHHHH", *fields)
    assert vnet.parse(raw) == hdr


@given(st.binary(max_size=64))
def test_parse_raises_only_malformed_frame(data):
    try:
        vnet.parse(data)
    except MalformedFrame:
        assert len(data) < 10


def _ref_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def test_ones_sum_rfc1071_example():
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2
    assert vnet.ones_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2
    assert vnet.ones_sum(b"") == 0 and vnet.ones_sum(bytes(7)) == 0
    assert vnet.ones_sum(b"\xff\xff") == 0xFFFF
    assert vnet.ones_sum(b"\x01") == 0x0100  # odd byte padded with zero


@given(st.binary(max_size=300), st.integers(0, 10))
def test_ones_sum_matches_reference(data, start):
    start = min(start, len(data))
    assert vnet.ones_sum(data, start) == _ref_sum(data[start:])


def test_complete_csum_udp_example():
    # IPv4 UDP 192.0.2.1:1000 -> 192.0.2.2:2000, payload "hi": field seeded with the pseudo sum
    src, dst = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
    udp = bytearray(struct.pack("!HHHH", 1000, 2000, 10, 0) + b"hi")
    seed = _ref_sum(src + dst + struct.pack("!BBH", 0, 17, 10))
    udp[6:8] = seed.to_bytes(2, "big")
    vnet.complete_csum(udp, 0, 6)
    assert _ref_sum(src + dst + struct.pack("!BBH", 0, 17, 10) + bytes(udp)) == 0xFFFF


def test_complete_csum_never_writes_zero():
    buf = bytearray(b"\xff\xff\x00\x00")  # sum 0xffff -> complement 0 -> stored as 0xffff
    vnet.complete_csum(buf, 0, 2)
    assert buf[2:4] == b"\xff\xff"


def test_complete_csum_range():
    with pytest.raises(MalformedFrame) as e:
        vnet.complete_csum(bytearray(10), 4, 6)
    assert e.value.reason == "vnet_csum_range"
