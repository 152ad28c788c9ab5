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


# ---- the one destination parser (outbound: TUN, TUN with a vnet header, TAP)
def _old_destination(buf: bytes, off: int, n: int) -> tuple[bytes, bool, int, int] | None:
    """The rules the three parsers of ``outbound`` wrote out before ``destination``."""
    if n - off < 20:
        return None
    ver = buf[off] >> 4
    if ver == 4:
        dst = bytes(buf[off + 16 : off + 20])
        return dst, buf[off + 16] >= 224 or dst == b"\xff\xff\xff\xff", 4, buf[off + 9]
    if ver == 6 and n - off >= 40:
        return bytes(buf[off + 24 : off + 40]), buf[off + 24] == 0xFF, 6, buf[off + 6]
    return None


def test_destination_vectors():
    syn = bytes(tcp_syn_v4(1460))
    assert wp.destination(syn, 0, len(syn)) == (bytes([100, 64, 0, 2]), False, 4, 6)
    vnet = bytes(10) + syn
    assert wp.destination(vnet, 10, len(vnet)) == (bytes([100, 64, 0, 2]), False, 4, 6)
    assert wp.destination(memoryview(vnet), 10, len(vnet))[0] == bytes([100, 64, 0, 2])
    bcast = bytearray(syn)
    bcast[16:20] = b"\xff" * 4
    assert wp.destination(bcast, 0, len(bcast))[1] is True
    mcast = bytearray(syn)
    mcast[16:20] = bytes([224, 0, 0, 251])
    assert wp.destination(mcast, 0, len(mcast))[1] is True
    v6 = bytes([0x60, 0, 0, 0, 0, 8, 17, 64]) + bytes(16) + bytes([0xFF, 2]) + bytes(14) + bytes(8)
    assert wp.destination(v6, 0, len(v6)) == (bytes([0xFF, 2]) + bytes(14), True, 6, 17)
    assert wp.destination(v6[:39], 0, 39) is None  # an IPv6 header cut short
    assert wp.destination(syn[:19], 0, 19) is None
    assert wp.destination(b"\x00" * 40, 0, 40) is None  # no IP version
    frame = bytes(14) + syn  # TAP: after the Ethernet header
    assert wp.destination(frame, wp.ETH_HLEN, len(frame))[0] == bytes([100, 64, 0, 2])


@given(st.binary(max_size=80), st.integers(0, 20))
def test_destination_is_the_old_rules(data, off):
    n = len(data)
    assert wp.destination(data, off, n) == _old_destination(data, off, n)
    assert wp.destination(bytearray(data), off, n) == _old_destination(data, off, n)
