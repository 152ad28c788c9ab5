import pytest
from aioice import stun
from hypothesis import given
from hypothesis import strategies as st

from ipop.errors import LocalProtocolError, MalformedFrame
from ipop.wire import turn as wt


def test_pack_vector():
    assert wt.pack_channel_data(0x4001, b"hello").hex() == "40010005" + b"hello".hex()
    assert wt.pack_channel_data(0x7FFF, b"") == bytes.fromhex("7fff0000")


def test_parse_vector_returns_a_view_of_the_data():
    channel, payload = wt.parse_channel_data(bytes.fromhex("4abc0003") + b"xyz")
    assert channel == 0x4ABC
    assert isinstance(payload, memoryview) and bytes(payload) == b"xyz"


def test_parse_ignores_up_to_three_padding_bytes():
    channel, payload = wt.parse_channel_data(bytes.fromhex("40000001") + b"a\0\0\0")
    assert (channel, bytes(payload)) == (0x4000, b"a")


@pytest.mark.parametrize(
    ("hexdata", "reason"),
    [
        ("", "truncated_channeldata"),
        ("4000", "truncated_channeldata"),
        ("400000", "truncated_channeldata"),
        ("40000005" + "61626364", "truncated_channeldata"),  # 4 of 5 bytes
        ("3fff0000", "bad_channel"),
        ("80000000", "bad_channel"),
        ("40000000" + "00000000", "channeldata_trailing"),
    ],
)
def test_parse_errors_are_malformed_frames(hexdata, reason):
    with pytest.raises(MalformedFrame) as e:
        wt.parse_channel_data(bytes.fromhex(hexdata))
    assert e.value.reason == reason


@pytest.mark.parametrize("channel", [0, 0x3FFF, 0x8000, 0xFFFF, -1])
def test_pack_refuses_bad_channels(channel):
    with pytest.raises(LocalProtocolError):
        wt.pack_channel_data(channel, b"x")


def test_pack_refuses_oversized_payload():
    with pytest.raises(LocalProtocolError):
        wt.pack_channel_data(0x4000, bytes(0x10000))


def test_is_channel_data_matches_first_byte():
    assert wt.is_channel_data(b"\x40\x00")
    assert wt.is_channel_data(b"\x4f")
    assert not wt.is_channel_data(b"\x00\x01")  # STUN
    assert not wt.is_channel_data(b"\x80")  # ipop frame
    assert not wt.is_channel_data(b"")


@given(st.integers(0, 255), st.binary(max_size=6))
def test_is_channel_data_is_the_classifier(first, rest):
    from ipop.wire import header as wh

    data = bytes([first]) + rest
    assert wt.is_channel_data(data) is (wh.classify(data) is wh.Kind.TURN)
    assert wt.is_channel_data(data) is (64 <= first <= 79)


def test_parse_channel_data_takes_views_and_ignores_padding():
    view = memoryview(bytes.fromhex("40010002") + b"hi\0\0")
    channel, payload = wt.parse_channel_data(view[:])
    assert channel == 0x4001 and bytes(payload) == b"hi"
    assert payload.obj is view.obj  # no copy


@given(st.integers(0x4000, 0x7FFF), st.binary(max_size=1500))
def test_round_trip(channel, payload):
    got_channel, got = wt.parse_channel_data(wt.pack_channel_data(channel, payload))
    assert (got_channel, bytes(got)) == (channel, payload)


@given(st.binary(max_size=64))
def test_parse_raises_only_malformed_frame(data):
    try:
        wt.parse_channel_data(data)
    except MalformedFrame:
        pass


def test_channel_bind_request_is_a_signed_stun_request():
    key = bytes(range(16))
    tid = bytes(12)
    raw = wt.channel_bind_request(
        0x4002, ("198.19.1.7", 40000), username="u", realm="r", nonce=b"n0nce", key=key,
        transaction_id=tid,
    )
    assert raw[:2] == b"\x00\x09"  # ChannelBind request
    msg = stun.parse_message(raw)
    assert msg.message_method == stun.Method.CHANNEL_BIND
    assert msg.message_class == stun.Class.REQUEST
    assert msg.transaction_id == tid
    assert msg.attributes["CHANNEL-NUMBER"] == 0x4002
    assert msg.attributes["XOR-PEER-ADDRESS"] == ("198.19.1.7", 40000)
    assert (msg.attributes["USERNAME"], msg.attributes["REALM"]) == ("u", "r")
    assert msg.attributes["NONCE"] == b"n0nce"
    assert msg.check_message_integrity(key)
    assert not msg.check_message_integrity(bytes(16))


def test_refresh_request_carries_lifetime():
    key = b"k" * 16
    msg = stun.parse_message(
        wt.refresh_request(0, username="u", realm="r", nonce=b"n", key=key)
    )
    assert msg.message_method == stun.Method.REFRESH
    assert msg.attributes["LIFETIME"] == 0
    assert msg.check_message_integrity(key)


def test_builders_refuse_bad_values():
    with pytest.raises(LocalProtocolError):
        wt.channel_bind_request(0x3000, ("198.19.1.7", 1), username="u", realm="r",
                                nonce=b"n", key=b"k")
    with pytest.raises(LocalProtocolError):
        wt.refresh_request(-1, username="u", realm="r", nonce=b"n", key=b"k")
