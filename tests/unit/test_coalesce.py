"""coalesce(): segment -> coalesce gives back the super-packet; losing a segment loses only it."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipop.dataplane import coalesce as co
from ipop.dataplane import segment as sg
from ipop.errors import MalformedFrame
from ipop.wire import vnet
from tests.unit.test_segment import (
    ACK,
    CWR,
    ECE,
    FIN,
    PSH,
    TS_OPTS,
    datagrams,
    ip4,
    kernel_complete,
    l4_valid,
    parse_ip,
    tcp_packet,
    tso_hdr,
    udp_packet,
)


def writes(out):
    """(virtio header, packet bytes) for every TUN write."""
    res = []
    for iov in out:
        assert isinstance(iov, list) and len(iov) >= 2
        res.append((vnet.parse(iov[0]), b"".join(iov[1:])))
    return res


def check_write(h: vnet.VnetHdr, pkt: bytes) -> None:
    """The kernel would accept this write and find a right checksum once completed."""
    v4, o, _, _, l4 = parse_ip(pkt)
    if h.flags & vnet.F_NEEDS_CSUM:
        assert h.csum_start == o
        proto = 6 if h.csum_offset == 16 else 17
        assert l4_valid(kernel_complete(pkt, o, h.csum_offset), proto)
        assert h.hdr_len == o + ((l4[12] >> 4) * 4 if proto == 6 else 8)
    if h.gso_type != vnet.GSO_NONE:
        assert h.gso_type == (vnet.GSO_TCPV4 if v4 else vnet.GSO_TCPV6)
        assert h.flags & vnet.F_NEEDS_CSUM
        assert len(pkt) - h.hdr_len > h.gso_size > 0


def tcp_payloads(res) -> tuple[list[int], bytes]:
    """Sequence numbers and concatenated payloads of the TCP packets written."""
    seqs, data = [], []
    for _, pkt in res:
        l4 = parse_ip(pkt)[4]
        seqs.append(struct.unpack_from("!I", l4, 4)[0])
        data.append(l4[(l4[12] >> 4) * 4 :])
    return seqs, b"".join(data)


SUPER = dict(
    v4=st.booleans(),
    length=st.integers(1, 65535 - 40 - 32),
    mss=st.integers(500, 1400),
    seq0=st.integers(0, 0xFFFFFFFF),
    id0=st.integers(0, 0xFFFF),
    flags=st.sampled_from([ACK, ACK | PSH, ACK | ECE, ACK | PSH | ECE]),
    ts=st.booleans(),
    data=st.randoms(use_true_random=False),
)


def _super(v4, length, mss, seq0, id0, flags, ts, data):
    payload = data.randbytes(length)
    orig = tcp_packet(v4, payload, seq0, flags, ident=id0, options=TS_OPTS if ts else b"")
    seg = sg.segment(tso_hdr(v4, mss), orig)
    return orig, payload, [memoryview(p) for p in datagrams(seg)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**SUPER)
def test_round_trip_gives_back_the_super_packet(v4, length, mss, seq0, id0, flags, ts, data):
    orig, _, pkts = _super(v4, length, mss, seq0, id0, flags, ts, data)
    res = writes(co.coalesce(pkts, True))
    assert len(res) == 1
    h, merged = res[0]
    assert merged == orig  # every header byte, including IPv4 id and the partial checksum
    check_write(h, merged)
    if len(pkts) > 1:
        o = 20 if v4 else 40
        assert h == vnet.VnetHdr(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4 if v4 else vnet.GSO_TCPV6,
                                 o + (32 if ts else 20), mss, o, 16)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drop=st.integers(0, 1000), **SUPER)
def test_losing_one_segment_loses_only_it(drop, v4, length, mss, seq0, id0, flags, ts, data):
    _, payload, pkts = _super(v4, length, mss, seq0, id0, flags, ts, data)
    drop %= len(pkts)
    kept = pkts[:drop] + pkts[drop + 1 :]
    res = writes(co.coalesce(kept, True))
    for h, pkt in res:
        check_write(h, pkt)
    seqs, got = tcp_payloads(res)
    want = payload[: drop * mss] + payload[(drop + 1) * mss :]
    assert got == want
    # each write starts where its bytes belong in the stream
    off = 0
    for s, (_, pkt) in zip(seqs, res, strict=True):
        pos = off if off < drop * mss else off + mss
        assert s == (seq0 + pos) & 0xFFFFFFFF
        l4 = parse_ip(pkt)[4]
        off += len(l4) - (l4[12] >> 4) * 4
    assert len(res) <= (2 if 0 < drop < len(pkts) - 1 else 1) or len(kept) == 0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(v4=st.booleans(), seed=st.integers(0, 2**32), order=st.permutations(list(range(6))))
def test_reordering_keeps_every_byte(v4, seed, order):
    payload = random.Random(seed).randbytes(6 * 700)
    pkts = datagrams(sg.segment(tso_hdr(v4, 700), tcp_packet(v4, payload, 1)))
    res = writes(co.coalesce([pkts[i] for i in order]))
    for h, pkt in res:
        check_write(h, pkt)
    seqs, _ = tcp_payloads(res)
    pieces = sorted(zip(seqs, (p for _, p in res), strict=True))
    stream = b"".join(p[(20 if v4 else 40) + 32 :] for _, p in pieces)
    assert stream == payload


def _run(v4=True, n=4, mss=1000, **kw):
    payload = bytes(range(256)) * (n * mss // 256 + 1)
    return datagrams(sg.segment(tso_hdr(v4, mss), tcp_packet(v4, payload[: n * mss], 1, **kw)))


def test_non_partial_packets_pass_plain_and_break_runs():
    a = _run()
    out = co.coalesce(a, [True, True, False, True])
    assert [len(w) for w in out] == [4, 2, 2]  # merge(a0,a1), a2 plain, a3 alone
    assert out[1][0] == vnet.PLAIN and bytes(out[1][1]) == a[2]
    res = writes(out)
    assert res[2][0].flags == vnet.F_NEEDS_CSUM and res[2][0].gso_type == vnet.GSO_NONE
    assert writes(co.coalesce(a, False)) == [(vnet.VnetHdr(), p) for p in a]


def test_interleaved_flows_keep_their_order_and_merge_nothing():
    a = _run(sport=1111)
    b = _run(sport=2222)
    mixed = [a[0], b[0], a[1], b[1], a[2], b[2]]
    res = writes(co.coalesce(mixed))
    assert [p for _, p in res] == mixed
    assert all(h.gso_type == vnet.GSO_NONE for h, _ in res)


def test_back_to_back_runs_of_two_flows():
    a, b = _run(sport=1111), _run(sport=2222)
    res = writes(co.coalesce(a + b))
    assert len(res) == 2 and all(h.gso_type == vnet.GSO_TCPV4 for h, _ in res)


@pytest.mark.parametrize("field", ["ttl", "tos", "window", "ack", "ts"])
def test_header_differences_break_runs(field):
    payload = bytes(1000)
    first = tcp_packet(True, payload, 1, ACK, ident=5)
    kw = {"ttl": dict(ttl=63), "tos": dict(tos=3), "window": dict(window=1),
          "ack": dict(ack=778), "ts": dict(options=TS_OPTS[:-1] + b"\x00")}[field]
    second = tcp_packet(True, payload, 1001, ACK, ident=6, **kw)
    res = writes(co.coalesce([first, second]))
    assert len(res) == 2


def test_flags_that_never_merge():
    for bad in (FIN, CWR, 0x20, 0x04):  # FIN, CWR, URG, RST
        # not at the head of a run...
        first = tcp_packet(True, bytes(1000), 1, ACK | bad, ident=5)
        second = tcp_packet(True, bytes(1000), 1001, ACK, ident=6)
        assert len(co.coalesce([first, second])) == 2
        # ... nor at its end
        head = tcp_packet(True, bytes(1000), 1, ACK, ident=5)
        tail = tcp_packet(True, bytes(500), 1001, ACK | bad, ident=6)
        assert len(co.coalesce([head, tail])) == 2
        assert len(co.coalesce([head, tcp_packet(True, bytes(500), 1001, ACK, ident=6)])) == 1


def test_psh_ends_a_run_and_is_kept():
    pkts = _run(n=4, flags=ACK | PSH)
    extra = tcp_packet(True, bytes(1000), 4001, ACK, ident=1004)
    res = writes(co.coalesce([*pkts, extra]))
    assert len(res) == 2
    assert res[0][1][33] == ACK | PSH and res[0][0].gso_type == vnet.GSO_TCPV4


def test_shorter_segment_only_at_the_end():
    short = tcp_packet(True, bytes(500), 1, ACK, ident=1)
    full = tcp_packet(True, bytes(1000), 501, ACK, ident=2)
    assert len(co.coalesce([short, full])) == 2
    full2 = tcp_packet(True, bytes(1000), 1, ACK, ident=1)
    res = writes(co.coalesce([full2, tcp_packet(True, bytes(500), 1001, ACK, ident=2)]))
    assert len(res) == 1 and res[0][0].gso_size == 1000 and len(res[0][1]) == 20 + 32 + 1500


def test_longer_segment_starts_a_new_run():
    a = tcp_packet(True, bytes(500), 1, ACK, ident=1)
    b = tcp_packet(True, bytes(1000), 501, ACK, ident=2)
    c = tcp_packet(True, bytes(1000), 1501, ACK, ident=3)
    res = writes(co.coalesce([a, b, c]))
    assert len(res) == 2 and res[1][0].gso_type == vnet.GSO_TCPV4


def test_size_limit():
    payload = bytes(range(256)) * 330
    pkts = []
    for k in range(2):  # two trains of 30 segments, one byte stream: 60 segments in a row
        sup = tcp_packet(True, payload[k * 42000 : (k + 1) * 42000], 1 + k * 42000, ACK,
                         ident=1000 + 30 * k)
        pkts += datagrams(sg.segment(tso_hdr(True, 1400), sup))
    res = writes(co.coalesce(pkts))
    assert all(len(p) <= 65535 for _, p in res) and len(res) == 2
    assert tcp_payloads(res)[1] == b"".join(p[52:] for p in pkts)
    assert len(co.coalesce(pkts, max_size=52 + 3 * 1400)) == 20


@pytest.mark.parametrize("v4", [True, False])
@pytest.mark.parametrize("tail", [0, 1, 65, 9999])
def test_largest_super_packets_round_trip(v4, tail):
    # 49 segments of 1334 bytes and a short tail, up to 65535 bytes: the largest there are
    payload = bytes(range(251)) * 261
    payload = payload[: min(49 * 1334 + tail, 65535 - (52 if v4 else 72))]
    orig = tcp_packet(v4, payload, 0xFFFFF000, ACK | PSH)
    assert len(orig) <= 65535
    res = writes(co.coalesce(datagrams(sg.segment(tso_hdr(v4, 1334), orig))))
    assert [p for _, p in res] == [orig]
    check_write(*res[0])
    assert len(co.coalesce(datagrams(sg.segment(tso_hdr(v4, 1334), orig)),
                           max_size=len(orig) - 1)) == 2


def test_bad_ipv4_checksum_is_not_merged():
    a, b = _run(n=2)
    bad = bytearray(a)
    bad[11] ^= 1
    res = writes(co.coalesce([bytes(bad), b]))
    assert len(res) == 2 and res[0][1] == bytes(bad)


def test_length_that_lies_is_not_merged():
    a, b, c = _run(n=3)
    res = writes(co.coalesce([a, b, c + b"junk"]))
    assert [len(p) for _, p in res] == [len(a) + len(b) - 52, len(c) + 4]
    res = writes(co.coalesce([a, b[:-10], c]))
    assert len(res) == 3


def test_pure_acks_udp_and_others():
    ack4 = tcp_packet(True, b"", 1, ACK)
    ack6 = tcp_packet(False, b"", 1, ACK)
    udp = udp_packet(True, b"dns?")
    icmp = ip4(28, 1, proto=1) + bytes(8)
    junk = b"\x99" * 30
    res = writes(co.coalesce([ack4, ack4, ack6, udp, icmp, junk, b""]))
    assert [p for _, p in res] == [ack4, ack4, ack6, udp, icmp, junk, b""]
    assert res[0][0] == vnet.parse(vnet.needs_csum(52, 20, 16))
    assert res[2][0] == vnet.parse(vnet.needs_csum(72, 40, 16))
    assert res[3][0] == vnet.parse(vnet.needs_csum(28, 20, 6))
    assert all(h == vnet.VnetHdr() for h, _ in res[4:])
    for h, p in res[:4]:
        check_write(h, p)


def test_bytes_and_views_alike():
    pkts = _run(n=5)
    a = writes(co.coalesce(pkts))
    b = writes(co.coalesce([memoryview(bytearray(p)) for p in pkts]))
    assert a == b and len(a) == 1


def test_complete_partial():
    for pkt, proto in ((tcp_packet(True, b"abc", 9), 6), (tcp_packet(False, b"abcd", 9), 6),
                       (udp_packet(True, b"x"), 17), (udp_packet(False, b""), 17)):
        assert l4_valid(co.complete_partial(pkt), proto)
    with pytest.raises(MalformedFrame):
        co.complete_partial(ip4(28, 1, proto=1) + bytes(8))
    with pytest.raises(MalformedFrame):
        co.complete_partial(b"\x45" + bytes(10))


# ---- coalesce_gro: one GRO batch straight from the receive buffer
PREFIX = b"\x84" + bytes(range(40))


def gro_batch(frames: list[bytes]) -> tuple[memoryview, int, int]:
    """A receive buffer holding ``frames`` back to back, as UDP GRO hands them over."""
    gso = len(frames[0])
    assert all(len(f) == gso for f in frames[:-1]) and len(frames[-1]) <= gso
    data = b"".join(frames)
    return memoryview(bytearray(data) + bytes(100)), len(data), gso


def same_writes(a, b) -> bool:
    def flat(out):
        return [(bytes(w[0]), b"".join(w[1:])) for w in out]

    return flat(a) == flat(b)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drop=st.integers(-1, 60), cut=st.integers(0, 60), ip_opts=st.booleans(), **SUPER)
def test_gro_batch_equals_coalesce_of_its_frames(drop, cut, ip_opts, v4, length, mss, seq0, id0,
                                                 flags, ts, data):
    payload = data.randbytes(length)
    orig = tcp_packet(v4, payload, seq0, flags, ident=id0, options=TS_OPTS if ts else b"",
                      ip_options=b"\x01\x01\x01\x00" if v4 and ip_opts else b"")
    o = 24 if v4 and ip_opts else (20 if v4 else 40)
    pkts = datagrams(sg.segment(tso_hdr(v4, mss, o), orig))
    if 0 <= drop < len(pkts) - 1:
        del pkts[drop]  # a loss in the middle: frames stay equal-sized (GRO keeps a batch so)
    pkts = pkts[: max(1, len(pkts) - cut % 3)]  # the batch may end early
    view, n, gso = gro_batch([PREFIX + p for p in pkts])
    got = co.coalesce_gro(view, n, gso, PREFIX)
    assert got is not None
    assert same_writes(got, co.coalesce(pkts, True))
    for h, pkt in writes(got):
        check_write(h, pkt)


def test_gro_clean_run_is_one_write_from_the_buffer():
    for v4 in (True, False):
        orig = tcp_packet(v4, bytes(range(256)) * 150, 7, ACK | PSH)
        pkts = datagrams(sg.segment(tso_hdr(v4, 1334), orig))
        view, n, gso = gro_batch([PREFIX + p for p in pkts])
        out = co.coalesce_gro(view, n, gso, PREFIX)
        assert len(out) == 1 and b"".join(out[0][1:]) == orig
        assert all(isinstance(b, memoryview) and b.obj is view.obj for b in out[0][2:])


def test_gro_foreign_prefix_is_refused():
    pkts = _run(n=5)
    frames = [PREFIX + p for p in pkts]
    frames[3] = b"\x80" + frames[3][1:]  # one frame of another type
    assert co.coalesce_gro(*gro_batch(frames), PREFIX) is None
    frames = [PREFIX + pkts[0]]
    assert co.coalesce_gro(*gro_batch(frames), PREFIX) is not None
    assert co.coalesce_gro(*gro_batch([b"\x85" + frames[0][1:]]), PREFIX) is None
    short = [PREFIX + pkts[0], PREFIX[:10]]
    view = memoryview(bytearray(b"".join(short)))
    assert co.coalesce_gro(view, len(view), len(short[0]), PREFIX) is None


def test_gro_foreign_prefix_is_refused_in_batches_that_do_not_merge():
    acks = [PREFIX + tcp_packet(True, b"", 1, ACK)] * 4
    acks[2] = b"\x80" + acks[2][1:]
    assert co.coalesce_gro(*gro_batch(acks), PREFIX) is None
    udp = [PREFIX + udp_packet(True, b"x" * 40)] * 3
    udp[0] = PREFIX[:-1] + b"\xee" + udp[0][len(PREFIX) :]
    assert co.coalesce_gro(*gro_batch(udp), PREFIX) is None


def test_gro_batches_of_acks_and_others():
    acks = [tcp_packet(True, b"", 1, ACK)] * 5
    out = co.coalesce_gro(*gro_batch([PREFIX + a for a in acks]), PREFIX)
    assert same_writes(out, co.coalesce(acks, True)) and len(out) == 5
    udp = [udp_packet(False, b"q" * 30)] * 3
    out = co.coalesce_gro(*gro_batch([PREFIX + u for u in udp]), PREFIX)
    assert same_writes(out, co.coalesce(udp, True))
