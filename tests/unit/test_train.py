"""Whole-train frames: layout, the one-read fast check, reassembly, the vnet check, the policy."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipop.errors import LocalProtocolError, MalformedFrame
from ipop.wire import header as wh
from ipop.wire import keepalive as wk
from ipop.wire import train as wt
from ipop.wire.vnet import VNET

SRC = bytes(range(1, 21))
DST = bytes(range(21, 41))
PREFIX = wh.pack(wh.T_TRAIN, SRC, DST)


def datagrams(blob: bytes, chunk: int, seq: int = 7, prefix: bytes = PREFIX) -> list[bytes]:
    parts = wt.Framer(prefix, chunk).frames(seq, blob)
    return [bytes(parts[i]) + bytes(parts[i + 1]) for i in range(0, len(parts), 2)]


def expected_datagrams(blob: bytes, chunk: int, seq: int) -> list[bytes]:
    """The layout written out by hand: prefix, seq, idx, count, then the chunk."""
    count = -(-len(blob) // chunk) if blob else 1
    return [PREFIX + struct.pack("!IBB", seq, i, count) + blob[i * chunk : (i + 1) * chunk]
            for i in range(count)]


def gro_read(dgrams: list[bytes]) -> tuple[memoryview, int, int]:
    area = bytearray(b"".join(dgrams))
    return memoryview(area), len(area), len(dgrams[0])


def test_frame_vector() -> None:
    dg = datagrams(b"0123456789", 4)
    assert len(dg) == 3
    assert dg[1] == b"\x86" + SRC + DST + bytes.fromhex("00000007" "01" "03") + b"4567"
    assert dg[2].endswith(bytes.fromhex("00000007" "02" "03") + b"89")
    assert all(len(d) == wt.FRAME_HDR + 4 for d in dg[:2])


def test_frames_refuses_more_than_64_chunks() -> None:
    with pytest.raises(LocalProtocolError) as e:
        wt.Framer(PREFIX, 10).frames(1, bytes(65 * 10))
    assert e.value.reason == "train_too_long"
    assert len(wt.Framer(PREFIX, 10).frames(1, bytes(64 * 10))) == 128


def test_parse_and_its_errors() -> None:
    dg = datagrams(b"abcdef", 2, seq=0xFFFF_FFFF)
    assert wt.parse(dg[2]) == (0xFFFF_FFFF, 2, 3)
    with pytest.raises(MalformedFrame) as e:
        wt.parse(dg[0][:46])
    assert e.value.reason == "truncated"
    for idx, count in ((3, 3), (0, 0), (0, 65)):
        bad = PREFIX + wt.TRAIN.pack(1, idx, count) + b"x"
        with pytest.raises(MalformedFrame) as e:
            wt.parse(bad)
        assert e.value.reason == "bad_train"


@given(st.binary(min_size=1, max_size=4000), st.integers(48, 1400), st.integers(0, 2**32 - 1))
def test_whole_read_gives_back_the_blob(blob: bytes, chunk: int, seq: int) -> None:
    dg = datagrams(blob, chunk, seq)
    if len(dg) > wt.MAX_COUNT:
        return
    area, n, gso = gro_read(dg)
    got = wt.whole(area, n, gso, PREFIX)
    if gso <= wt.FRAME_HDR:
        assert got is None
        return
    assert got is not None
    assert got[0] == seq
    assert b"".join(bytes(c) for c in got[1]) == blob


def test_whole_refuses_anything_but_one_complete_train() -> None:
    blob = bytes(range(256)) * 10
    dg = datagrams(blob, 500)
    assert wt.whole(*gro_read(dg), PREFIX) is not None
    assert wt.whole(*gro_read(dg[:-1]), PREFIX) is None  # the last one is missing
    assert wt.whole(*gro_read(dg[1:]), PREFIX) is None  # the first one is missing
    other = datagrams(blob, 500, seq=8)
    assert wt.whole(*gro_read([*dg[:2], other[2], *dg[3:]]), PREFIX) is None
    swapped = [dg[1], dg[0], *dg[2:]]
    assert wt.whole(*gro_read(swapped), PREFIX) is None
    assert wt.whole(*gro_read(dg), wh.pack(wh.T_TRAIN_SEALED, SRC, DST)) is None
    wrong_dst = datagrams(blob, 500, prefix=wh.pack(wh.T_TRAIN, SRC, SRC))
    assert wt.whole(*gro_read(wrong_dst), PREFIX) is None


@given(st.binary(min_size=1, max_size=3000), st.integers(48, 700), st.randoms())
def test_reassembly_in_any_order_with_duplicates(blob: bytes, chunk: int, rnd: object) -> None:
    import random

    assert isinstance(rnd, random.Random)
    dg = datagrams(blob, chunk)
    order = dg + rnd.sample(dg, k=min(3, len(dg)))  # duplicates after completion
    head = order[: len(dg)]
    rnd.shuffle(head)
    r = wt.Reassembler()
    got = []
    for d in head + order[len(dg) :]:
        seq, idx, count = wt.parse(d)
        out = r.feed(seq, idx, count, memoryview(d)[wt.FRAME_HDR :], now=1.0)
        if out is not None:
            got.append(out)
    assert got == [blob]
    assert r.lost == 0


def test_a_missing_datagram_loses_the_train_and_is_counted_once() -> None:
    r = wt.Reassembler()
    first = datagrams(b"a" * 100, 40, seq=1)
    second = datagrams(b"b" * 100, 40, seq=2)
    for d in first[:-1]:
        assert r.feed(*wt.parse(d), memoryview(d)[wt.FRAME_HDR :], now=5.0) is None
    out = None
    for d in second:
        out = r.feed(*wt.parse(d), memoryview(d)[wt.FRAME_HDR :], now=5.1)
    assert out == b"b" * 100 and r.lost == 1
    # a partial train left over from long ago is stale, not a fresh loss
    for d in first[:1]:
        r.feed(*wt.parse(d), memoryview(d)[wt.FRAME_HDR :], now=10.0)
    r.completed(3, now=20.0)
    assert r.lost == 1 and r.stale == 1
    r.feed(*wt.parse(second[0]), memoryview(second[0])[wt.FRAME_HDR :], now=21.0)
    r.completed(4, now=21.2)
    assert r.lost == 2


def tso_header(flags: int = 1, gso_type: int = 1, hdr_len: int = 999, gso_size: int = 1334,
               start: int = 20, offset: int = 16) -> bytes:
    return VNET.pack(flags, gso_type, hdr_len, gso_size, start, offset)


def ipv4_tcp(payload: int, doff_words: int = 8) -> bytes:
    ip = bytearray(20)
    ip[0] = 0x45
    ip[9] = 6
    tcp = bytearray(doff_words * 4)
    tcp[12] = doff_words << 4
    return bytes(ip + tcp) + bytes(payload)


def test_check_vnet_sets_hdr_len_from_the_tcp_header() -> None:
    blob = tso_header() + ipv4_tcp(4000)
    fixed = wt.check_vnet(blob, len(blob))
    assert fixed == tso_header(hdr_len=52)
    assert fixed.hex() == "010134003605140010 00".replace(" ", "")


@pytest.mark.parametrize("hdr", [
    tso_header(flags=2),  # DATA_VALID is never sent
    tso_header(gso_type=3),  # UFO
    tso_header(gso_type=4),  # TCPv6 on an IPv4 packet
    tso_header(flags=0),  # TSO without a partial checksum
    tso_header(start=10),
    tso_header(start=5000),
    tso_header(offset=8),
    tso_header(gso_size=0),
])
def test_check_vnet_refuses(hdr: bytes) -> None:
    blob = hdr + ipv4_tcp(2000)
    with pytest.raises(MalformedFrame) as e:
        wt.check_vnet(blob, len(blob))
    assert e.value.reason == "bad_vnet"


def test_check_vnet_refuses_short_and_non_ip() -> None:
    with pytest.raises(MalformedFrame):
        wt.check_vnet(tso_header(), 10)
    blob = bytearray(tso_header(flags=0, gso_type=0) + ipv4_tcp(10))
    blob[10] = 0x75
    with pytest.raises(MalformedFrame):
        wt.check_vnet(blob, len(blob))


@given(st.binary(max_size=200), st.integers(0, 70000))
def test_check_vnet_raises_only_malformed(data: bytes, size: int) -> None:
    try:
        out = wt.check_vnet(data, size)
    except MalformedFrame:
        return
    assert len(out) == 10


def test_policy_holds_off_and_doubles() -> None:
    p = wt.TrainPolicy()
    lo, hi = wt.TrainPolicy.MIN_HOLD, wt.TrainPolicy.MAX_HOLD
    assert p.allowed(0.0) and p.mode(0.0) == "trains"
    assert p.on_loss(10.0) and p.hold == lo
    assert not p.allowed(10.0 + lo / 2) and p.mode(10.0 + lo / 2) == "segments (loss)"
    assert not p.on_loss(10.0 + lo / 2)  # a report about a train sent before the hold-off
    assert p.allowed(10.0 + lo)
    t = 10.0 + lo + 0.1
    assert p.on_loss(t) and p.hold == 2 * lo
    t += 2 * lo + 0.1
    assert p.on_loss(t) and p.hold == 4 * lo
    for _ in range(10):
        t += p.hold + 0.1
        p.on_loss(t)
    assert p.hold == hi
    assert p.on_loss(t + hi + wt.TrainPolicy.CLEAN + 1) and p.hold == lo  # clean: from the start
    assert p.fallbacks >= 5
    off = wt.TrainPolicy(enabled=False)
    assert not off.allowed(100.0) and off.mode(0.0) == "segments"
    older = wt.TrainPolicy(False, "peer has no trains")  # the peer did not offer them
    assert not older.allowed(100.0) and older.mode(0.0) == "segments (peer has no trains)"


def test_keepalive_carries_train_loss_reports() -> None:
    assert wk.parse(wk.pack(wk.OP_TRAIN_LOSS, 3)) == (wk.OP_TRAIN_LOSS, 3)
    assert wk.parse(struct.pack("!BQ", 3, 0)) == (wk.OP_REKEY, 0)  # op 3: a rekey request
    with pytest.raises(MalformedFrame):
        wk.parse(struct.pack("!BQ", 4, 0))


def test_a_gap_in_train_numbers_counts_whole_trains_lost() -> None:
    r = wt.Reassembler()
    r.completed(10, now=1.0)
    r.completed(11, now=1.1)
    assert r.lost == 0
    r.completed(14, now=1.2)  # 12 and 13 never came
    assert r.lost == 2
    r.completed(13, now=1.3)  # a late one: reordering, not a new loss
    r.completed(15, now=1.4)
    assert r.lost == 2
    r.completed(17, now=9.0)  # after a long pause: left over, not lost now
    assert r.lost == 2 and r.stale == 1
    r.completed(5000, now=9.1)  # a restart of the peer's numbering
    assert r.lost == 2
    r.completed(0, now=9.2)
    r.completed(1, now=9.3)
    assert r.lost == 2


@given(st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=4),
       st.integers(48, 1400), st.integers(0, 2**32 - 1))
def test_framer_makes_the_datagrams_of_the_layout(blobs: list[bytes], chunk: int,
                                                   seq: int) -> None:
    framer = wt.Framer(PREFIX, chunk)
    for i, blob in enumerate(blobs):
        if -(-len(blob) // chunk) > wt.MAX_COUNT:
            continue
        got = framer.frames(seq + i, blob)
        joined = [bytes(got[k]) + bytes(got[k + 1]) for k in range(0, len(got), 2)]
        assert joined == expected_datagrams(blob, chunk, (seq + i) & 0xFFFF_FFFF)


def test_whole_refuses_a_short_last_datagram_and_short_areas() -> None:
    dg = datagrams(bytes(1000), 400)
    area, n, gso = gro_read(dg)
    assert wt.whole(area, n, gso, PREFIX) is not None
    assert wt.whole(area[: n - 1], n, gso, PREFIX) is None
    cut = gro_read([*dg[:-1], dg[-1][: wt.FRAME_HDR]])
    assert wt.whole(*cut, PREFIX) is None


def test_policy_judges_reports_by_the_share_of_trains_lost() -> None:
    p = wt.TrainPolicy()
    assert not p.on_report(1.0, 1, 100)  # 1 of 100: a congestion drop, trains stay
    assert not p.on_report(2.0, 3, 200)  # 2 of 100
    assert p.allowed(2.0) and p.fallbacks == 0
    assert p.on_report(2.1, 6, 210)  # 3 of 10: random loss, fall back
    assert not p.allowed(2.1 + p.hold / 2)
    assert not p.on_report(2.1 + p.hold / 2, 9, 215)  # trains sent before the hold-off
    assert p.allowed(2.1 + p.hold)
    assert p.on_report(2.2 + p.hold, 11, 220) and p.hold == 2 * wt.TrainPolicy.MIN_HOLD
    assert not p.on_report(100.0, 2, 5000)  # the peer's count restarted: 2 of 4780
    assert p.on_report(100.1, 4, 5004)


def test_a_link_whose_mtu_needs_too_many_chunks_sends_segments_without_a_train_number() -> None:
    import socket

    from ipop.dataplane.link import Link, Path

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        small = Link(local_uid=SRC, peer_uid=DST, path=Path(tx, rx.getsockname()),
                     overlay_ip4=bytes([100, 64, 0, 2]), mtu=576)
        small.authed = True
        raw = memoryview(bytes(60_000))
        assert not small.tx.send_whole(raw)  # 60 KB in 595-byte chunks: over 64
        assert small.tx.train_seq == 0 and small.tx.trains_sent == 0
        big = Link(local_uid=SRC, peer_uid=DST, path=Path(tx, rx.getsockname()),
                   overlay_ip4=bytes([100, 64, 0, 2]))
        assert not big.tx.send_whole(memoryview(bytes(20_000)))  # no handshake yet: no train
        big.authed = True
        assert big.tx.send_whole(memoryview(bytes(20_000)))
        assert big.tx.train_seq == 1 and big.tx.trains_sent == 1
    finally:
        rx.close()
        tx.close()
