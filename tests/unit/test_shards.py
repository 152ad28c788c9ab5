"""Shards in memory: the steering program, the channel codec, a shard's keys, ``workers``."""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipop.config import resolve_workers, validate
from ipop.crypto.aead import Opener, Sealer, Suite
from ipop.dataplane import shardmsg as sm
from ipop.dataplane import steering
from ipop.dataplane.shards import ShardSession
from ipop.errors import AuthError, ConfigError
from ipop.wire import header as wh

KEY = bytes(range(32))
SALT = bytes.fromhex("a0a1a2a3")
SRC, DST = bytes(range(20)), bytes(range(100, 120))


# ---- the steering program
def test_steering_program_bytes_are_pinned() -> None:
    # ld [0]; jge 128 (else ret 0); jge 192 (then ret 0); rsh 3; and 7; mod N; ret a; ret 0
    assert steering.compiled(2).hex() == (
        "3000000000000000" "3500000580000000" "350004" "00c0000000"
        "7400000003000000" "5400000007000000" "9400000002000000" "1600000000000000"
        "0600000000000000")
    assert len(steering.compiled(8)) == 8 * 8
    with pytest.raises(ValueError):
        steering.program(1)
    with pytest.raises(ValueError):
        steering.program(9)


@pytest.mark.parametrize("shards", range(2, 9))
def test_steering_picks_the_senders_shard_for_frames_and_zero_for_the_rest(shards: int) -> None:
    prog = steering.program(shards)
    for first in range(256):
        got = steering.run(prog, bytes([first]) + b"rest of the datagram")
        if wh.KIND_BY_FIRST_BYTE[first] is wh.Kind.OVERLAY:
            assert got == wh.shard_of(first) % shards, first
        else:
            assert got == 0, first  # STUN, DTLS, ChannelData, unknown: the control process
    assert steering.run(prog, b"") == 0  # an empty datagram: the load fails, socket 0


def test_every_shard_number_reaches_its_own_socket() -> None:
    for shards in range(2, 9):
        prog = steering.program(shards)
        for shard in range(shards):
            frame = wh.pack(wh.T_DATA_SEALED, SRC, DST, shard)
            assert steering.run(prog, frame) == shard


def test_steering_group_on_loopback_steers_by_the_shard_bits() -> None:
    socks = steering.group_sockets(0, 3)
    try:
        port = socks[0].getsockname()[1]
        for s in socks:
            s.settimeout(2.0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for first in (0x00, 0x16, 0x40, 0x81, 0x89, 0x91, 0x99, 0xBF, 0xC0):
                tx.sendto(bytes([first]) + b"x" * 40, ("127.0.0.1", port))
        want = {0: [0x00, 0x16, 0x40, 0x81, 0x99, 0xC0], 1: [0x89, 0xBF], 2: [0x91]}
        for index, firsts in want.items():
            got = [socks[index].recv(100)[0] for _ in firsts]
            assert got == firsts, index
    finally:
        for s in socks:
            s.close()


# ---- the channel codec
uids = st.binary(min_size=20, max_size=20).map(bytes.hex)
keys = st.fixed_dictionaries({"epoch": st.integers(0, 255),
                              "key": st.binary(min_size=32, max_size=32).map(bytes.hex),
                              "salt": st.binary(min_size=4, max_size=4).map(bytes.hex)})
messages = st.one_of(
    st.fixed_dictionaries({"op": st.just("unlink"), "peer": uids}),
    st.fixed_dictionaries({"op": st.just("stop")}),
    st.fixed_dictionaries({"op": st.just("keys"), "peer": uids,
                           "suite": st.sampled_from([s.value for s in Suite]),
                           "tx": st.none() | keys, "rx": st.lists(keys, max_size=2)}),
    st.fixed_dictionaries({
        "op": st.just("link"), "peer": uids,
        "ip4": st.none() | st.binary(min_size=4, max_size=4).map(bytes.hex),
        "ip6": st.none() | st.binary(min_size=16, max_size=16).map(bytes.hex),
        "mac": st.none() | st.binary(min_size=6, max_size=6).map(bytes.hex),
        "encrypted": st.booleans(), "nets": st.lists(st.just("10.1.0.0/16"), max_size=3),
        "trains_off": st.text(max_size=20), "authed": st.booleans(),
        "host": st.just("198.19.1.2"), "port": st.integers(0, 65535),
        "channel": st.none() | st.integers(0x4000, 0x4FFF), "kind": st.just("static"),
        "group": st.booleans()}),
    st.fixed_dictionaries({"op": st.just("miss"),
                           "dst": st.binary(min_size=4, max_size=4).map(bytes.hex),
                           "packet": st.binary(min_size=1, max_size=200).map(bytes.hex)}),
    st.fixed_dictionaries({"op": st.just("release"),
                           "dst": st.binary(min_size=4, max_size=16).map(bytes.hex),
                           "peer": uids}),
    st.fixed_dictionaries({"op": st.just("roam"), "peer": uids, "host": st.just("::1"),
                           "port": st.integers(1, 65535)}),
)


@settings(max_examples=200, deadline=None)
@given(messages)
def test_codec_round_trips_every_valid_message(msg: dict[str, Any]) -> None:
    assert sm.decode(sm.encode(msg)) == msg


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_codec_refuses_random_bytes_with_malformed_message_only(data: bytes) -> None:
    try:
        msg = sm.decode(data)
    except sm.MalformedMessage as exc:
        assert exc.reason.startswith("msg_")
        return
    sm.check(msg)  # whatever passed is a valid message


@settings(max_examples=200, deadline=None)
@given(messages, st.data())
def test_codec_refuses_a_changed_field(msg: dict[str, Any], data: st.DataObject) -> None:
    if len(msg) < 2:
        return
    key = data.draw(st.sampled_from(sorted(k for k in msg if k != "op")))
    bad = dict(msg)
    bad[key] = data.draw(st.sampled_from([None, -1, "zz", [1], {"a": 1}, True, 2**70]))
    body = json.dumps(bad).encode()
    try:
        sm.decode(struct.pack("!I", len(body)) + body)
    except sm.MalformedMessage:
        return
    sm.check(bad)  # the new value happened to be valid for that field (e.g. None)


def test_codec_names_its_reasons() -> None:
    def reason(data: bytes) -> str:
        with pytest.raises(sm.MalformedMessage) as info:
            sm.decode(data)
        return info.value.reason

    def framed(obj: Any) -> bytes:
        body = json.dumps(obj).encode()
        return struct.pack("!I", len(body)) + body

    assert reason(b"\x00\x00") == "msg_truncated"
    assert reason(struct.pack("!I", 9) + b"{}") == "msg_length"
    assert reason(struct.pack("!I", 3) + b"{x}") == "msg_json"
    assert reason(framed([1])) == "msg_shape"
    assert reason(framed({"op": "format_disk"})) == "msg_unknown_op"
    assert reason(framed({"op": "stop", "extra": 1})) == "msg_keys"
    assert reason(framed({"op": "unlink", "peer": "00" * 19})) == "msg_value"
    assert sm.fds_ok("init", 2) and sm.fds_ok("link", 0) and sm.fds_ok("link", 1)
    assert not sm.fds_ok("stop", 1) and not sm.fds_ok("link", 2)


def test_channel_carries_descriptors_and_closes_them_on_a_bad_message() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = socket.socketpair()
    try:
        sm.send(a, {"op": "unlink", "peer": "11" * 20})
        assert sm.receive(b) == ({"op": "unlink", "peer": "11" * 20}, [])
        socket.send_fds(a, [sm.encode({"op": "stop"})], [r.fileno()])  # stop takes no fds
        with pytest.raises(sm.MalformedMessage) as info:
            sm.receive(b)
        assert info.value.reason == "msg_fds"
        a.close()
        assert sm.receive(b) is None  # the other end is gone
    finally:
        for s in (a, b, r, w):
            s.close()


# ---- a shard's keys
def test_shard_session_seals_in_its_own_range_and_the_peer_opens_it() -> None:
    session = ShardSession(shard=1, generation=2)
    assert not session.ready and session.awaiting_keys
    tx = {"epoch": 5, "key": KEY.hex(), "salt": SALT.hex()}
    session.install(Suite.AES_256_GCM, tx, [tx])
    aad = wh.pack(wh.T_DATA_SEALED, SRC, DST, 1)
    sealed = session.seal(aad, b"packet")
    assert int.from_bytes(sealed[1:9], "big") == 1 << 56 | 2 << 48  # shard 1, generation 2
    peer = Opener(KEY, SALT, 5)
    assert peer.open(aad, sealed) == b"packet"
    # the control process (shard 0) seals under the same key from 0: no nonce in common
    control = Sealer(KEY, SALT, 5)
    aad0 = wh.pack(wh.T_DATA_SEALED, SRC, DST, 0)
    assert int.from_bytes(control.seal(aad0, b"x")[1:9], "big") == 0
    assert session.open(aad0, control.seal(aad0, b"y")) == b"y"
    with pytest.raises(AuthError) as info:
        session.open(aad0, bytes([9]) + bytes(30))
    assert info.value.reason == "unknown_epoch"


def test_shard_session_keeps_its_windows_when_the_same_keys_come_again() -> None:
    session = ShardSession(shard=1, generation=0)
    k = {"epoch": 5, "key": KEY.hex(), "salt": SALT.hex()}
    session.install(Suite.AES_256_GCM, k, [k])
    aad = wh.pack(wh.T_DATA_SEALED, SRC, DST, 0)
    sealed = Sealer(KEY, SALT, 5).seal(aad, b"once")
    assert session.open(aad, sealed) == b"once"
    session.install(Suite.AES_256_GCM, k, [k])  # pushed again: the window goes on
    with pytest.raises(AuthError) as info:
        session.open(aad, sealed)
    assert info.value.reason == "replay"
    session.install(Suite.AES_256_GCM, None, [])  # keys withdrawn
    assert not session.ready


# ---- workers
def test_workers_key() -> None:
    assert validate({"ip4": "100.64.0.1"})[0].workers == "auto"
    assert validate({"ip4": "100.64.0.1", "workers": 4})[0].workers == 4
    for bad in (0, 9, True, "2", 2.0, None, "many"):
        with pytest.raises(ConfigError) as info:
            validate({"ip4": "100.64.0.1", "workers": bad})
        assert "workers" in str(info.value)
    assert [resolve_workers("auto", c) for c in (1, 2, 3, 4, 8, 16, 64)] == [1] * 7
    assert resolve_workers(3, 2) == 3
    with pytest.raises(ConfigError) as info:  # shards do not translate addresses
        validate({"ip4": "100.64.0.1", "controller": "socialvpn", "workers": 2})
    assert info.value.key == "workers"
    assert validate({"ip4": "100.64.0.1", "controller": "socialvpn"})[0].workers == "auto"
