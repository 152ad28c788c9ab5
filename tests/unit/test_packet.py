import struct

from hypothesis import given
from hypothesis import strategies as st

from ipop.wire import packet as wp


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def tcp_syn_v4(mss: int) -> bytearray:
    src, dst = bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2])
    opts = struct.pack("!BBH", 2, 4, mss) + b"\x01\x01\x04\x02"  # MSS, NOP, NOP, SACK-perm
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, 1, 0, (5 + len(opts) // 4) << 4,
                                0x02, 64240, 0, 0) + opts)
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    struct.pack_into("!H", tcp, 16, _csum(pseudo + bytes(tcp)))
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, src, dst))
    struct.pack_into("!H", ip, 10, _csum(bytes(ip)))
    return ip + tcp


def tcp_valid(pkt: bytes) -> bool:
    tcp = pkt[20:]
    pseudo = pkt[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
    return _csum(pseudo + tcp) == 0


def test_clamp_mss_lowers_and_keeps_checksum():
    pkt = tcp_syn_v4(1460)
    assert tcp_valid(bytes(pkt))
    assert wp.clamp_mss(pkt, 1334)
    assert struct.unpack_from("!H", pkt, 42)[0] == 1334
    assert tcp_valid(bytes(pkt))


def test_clamp_mss_leaves_small_mss():
    pkt = tcp_syn_v4(1200)
    before = bytes(pkt)
    assert not wp.clamp_mss(pkt, 1334)
    assert bytes(pkt) == before


@given(st.integers(min_value=536, max_value=65535), st.integers(min_value=536, max_value=9000))
def test_clamp_mss_property(mss, limit):
    pkt = tcp_syn_v4(mss)
    wp.clamp_mss(pkt, limit)
    assert struct.unpack_from("!H", pkt, 42)[0] == min(mss, limit)
    assert tcp_valid(bytes(pkt))


@given(st.binary(max_size=120))
def test_clamp_mss_never_raises(data):
    wp.clamp_mss(bytearray(data), 1000)


def test_ip_dst_and_src():
    pkt = tcp_syn_v4(1460)
    assert wp.ip_dst(pkt) == bytes([100, 64, 0, 2])
    assert wp.ip_src(pkt) == bytes([100, 64, 0, 1])
    assert wp.ip_dst(b"\x45") is None
    v6 = bytes([0x60]) + bytes(7) + bytes(range(16)) + bytes(range(16, 32))
    assert wp.ip_dst(v6) == bytes(range(16, 32))


def test_arp_round_trip():
    frame = wp.arp_reply_frame(b"\x02" * 6, bytes([100, 64, 0, 1]), b"\x04" * 6,
                               bytes([100, 64, 0, 2]))
    dst, src, et = wp.eth_split(frame)
    assert (dst, src, et) == (b"\x04" * 6, b"\x02" * 6, wp.ETH_P_ARP)
    op, _sha, spa, _tha, tpa = wp.arp_parse(frame[14:])
    assert op == wp.ARP_REPLY and spa == bytes([100, 64, 0, 1]) and tpa == bytes([100, 64, 0, 2])
    assert wp.arp_parse(b"\x00" * 5) is None
    assert wp.is_multicast_mac(wp.BROADCAST_MAC) and not wp.is_multicast_mac(b"\x02" * 6)
