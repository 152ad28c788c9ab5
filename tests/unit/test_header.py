import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipop.errors import LocalProtocolError, MalformedFrame
from ipop.wire import header as wh
from ipop.wire import keepalive as wk

SRC = bytes(range(1, 21))
DST = bytes(range(101, 121))


def test_pack_vector():
    assert wh.pack(wh.T_DATA, SRC, DST).hex() == (
        "80" "0102030405060708090a0b0c0d0e0f1011121314"
        "65666768696a6b6c6d6e6f7071727374757677 78".replace(" ", "")
    )
    assert wh.HEADER_LEN == 41 and wh.IPOP_HEADER_LEN == 40


def test_parse_vector():
    frame = bytes.fromhex("81") + SRC + DST + b"payload"
    hdr, payload = wh.parse(frame)
    assert hdr == wh.Header(0x81, SRC, DST)
    assert bytes(payload) == b"payload"


def test_parse_errors_name_their_reason():
    with pytest.raises(MalformedFrame) as e:
        wh.parse(b"\x80" + SRC)
    assert e.value.reason == "truncated"
    with pytest.raises(MalformedFrame) as e:
        wh.parse(bytes([0xC0]) + SRC + DST)  # bit 6 set: no type, whatever the shard bits
    assert e.value.reason == "unknown_type"


def test_shard_bits_vectors():
    # 0x80 | shard << 3 | type: shard 3's sealed train is 0x9f, shard 7's data 0xb8
    assert wh.pack(wh.T_TRAIN_SEALED, SRC, DST, 3)[0] == 0x9F
    assert wh.pack(wh.T_DATA, SRC, DST, 7)[0] == 0xB8
    assert (wh.frame_type(0x9F), wh.shard_of(0x9F)) == (wh.T_TRAIN_SEALED, 3)
    assert wh.with_shard(0x81, 5) == 0xA9 and wh.with_shard(0xA9, 0) == 0x81
    hdr, _ = wh.parse(bytes([0x9F]) + SRC + DST)
    assert hdr.type == wh.T_TRAIN_SEALED  # parse hands back the type without shard bits
    with pytest.raises(LocalProtocolError):
        wh.with_shard(0x80, 8)


def test_every_shard_and_type_stays_an_ipop_frame():
    for shard in range(wh.MAX_SHARDS):
        for ftype in wh.KNOWN_TYPES:
            byte = wh.with_shard(ftype, shard)
            assert wh.KIND_BY_FIRST_BYTE[byte] is wh.Kind.OVERLAY
            assert (wh.frame_type(byte), wh.shard_of(byte)) == (ftype, shard)


def test_pack_refuses_bad_input():
    with pytest.raises(LocalProtocolError):
        wh.pack(0x42, SRC, DST)
    with pytest.raises(LocalProtocolError):
        wh.pack(wh.T_DATA, SRC[:5], DST)


@pytest.mark.parametrize(("first", "kind"), [
    (0, wh.Kind.STUN), (3, wh.Kind.STUN), (4, wh.Kind.UNKNOWN), (20, wh.Kind.DTLS),
    (63, wh.Kind.DTLS), (64, wh.Kind.TURN), (79, wh.Kind.TURN), (80, wh.Kind.UNKNOWN),
    (128, wh.Kind.OVERLAY), (191, wh.Kind.OVERLAY), (192, wh.Kind.UNKNOWN),
])
def test_classify_rfc7983(first, kind):
    assert wh.classify(bytes([first, 0])) is kind


def _old_rules(b: int) -> wh.Kind:
    """The ranges as the demultiplexers wrote them out before ``classify`` (RFC 7983)."""
    if b <= 3:
        return wh.Kind.STUN
    if 20 <= b <= 63:
        return wh.Kind.DTLS
    if 64 <= b <= 79:
        return wh.Kind.TURN
    if 128 <= b <= 191:
        return wh.Kind.OVERLAY
    return wh.Kind.UNKNOWN


@given(st.integers(0, 255), st.binary(max_size=8))
def test_every_first_byte_has_exactly_one_kind(first, rest):
    data = bytes([first]) + rest
    kind = wh.classify(data)
    assert kind is _old_rules(first)
    assert kind is wh.KIND_BY_FIRST_BYTE[first]
    ranges = {wh.Kind.STUN: wh.STUN_FIRST, wh.Kind.DTLS: wh.DTLS_FIRST,
              wh.Kind.TURN: wh.CHANNEL_DATA_FIRST, wh.Kind.OVERLAY: wh.FRAME_FIRST}
    holders = [k for k, r in ranges.items() if first in r]
    assert holders == ([] if kind is wh.Kind.UNKNOWN else [kind])
    assert wh.is_stun(data) is (kind is wh.Kind.STUN)
    assert wh.is_dtls(data) is (kind is wh.Kind.DTLS)


def test_classify_empty_and_views():
    assert wh.classify(b"") is wh.Kind.UNKNOWN
    assert not wh.is_stun(b"") and not wh.is_dtls(bytearray())
    assert wh.classify(memoryview(b"\x17\xfe\xfd")) is wh.Kind.DTLS
    assert wh.classify(bytearray(b"\x01\x01")) is wh.Kind.STUN


def test_frame_types_are_in_our_range():
    for t in wh.KNOWN_TYPES:
        assert wh.classify(bytes([t])) is wh.Kind.OVERLAY


@given(st.binary(max_size=100))
def test_parse_never_raises_other_errors(data):
    try:
        hdr, payload = wh.parse(data)
    except MalformedFrame:
        return
    assert wh.pack(hdr.type, hdr.src, hdr.dst) + bytes(payload) == data


@given(st.sampled_from(sorted(wh.KNOWN_TYPES)), st.binary(min_size=20, max_size=20),
       st.binary(min_size=20, max_size=20), st.binary(max_size=64))
def test_round_trip(t, src, dst, body):
    hdr, payload = wh.parse(wh.pack(t, src, dst) + body)
    assert (hdr.type, hdr.src, hdr.dst, bytes(payload)) == (t, src, dst, body)


def test_keepalive_vectors():
    assert wk.pack(wk.OP_PROBE, 0x0102030405060708).hex() == "000102030405060708"
    assert wk.parse(bytes.fromhex("010000000000000010")) == (wk.OP_ECHO, 16)
    with pytest.raises(MalformedFrame):
        wk.parse(b"\x05" + b"\x00" * 8)
    with pytest.raises(MalformedFrame):
        wk.parse(b"\x00")


@given(st.binary(max_size=20))
def test_keepalive_parse_is_total(data):
    try:
        wk.parse(data)
    except MalformedFrame:
        pass
