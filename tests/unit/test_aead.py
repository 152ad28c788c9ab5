"""AEAD framing: pinned vectors, round trips, tampering, truncation, replays, properties."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from ipop.crypto import aead
from ipop.crypto.aead import (
    OVERHEAD,
    Opener,
    Sealer,
    Suite,
    choose_suite,
    peek_epoch,
)
from ipop.errors import AuthError, LocalProtocolError

KEY = bytes(range(32))
SALT = bytes.fromhex("a0a1a2a3")
AAD = bytes([0x81]) + bytes(range(1, 21)) + bytes(range(101, 121))  # type, src UID, dst UID
EPOCH = 7
COUNTER = 0x0002030405060708  # top byte 0: shard 0's counter range
PLAINTEXT = b"hello, overlay"

VECTORS = {
    Suite.AES_256_GCM: (
        "070002030405060708"
        "df437c4c23715f00793cd683072e"
        "8e2ef1feef7fe286921ae038117db82c"
    ),
    Suite.CHACHA20_POLY1305: (
        "070002030405060708"
        "5c9bb16fc6f19c89255c5e4726ef"
        "019ad7859afc9788f70103cbbbc41e45"
    ),
}


def pair(suite: Suite = Suite.AES_256_GCM, epoch: int = EPOCH) -> tuple[Sealer, Opener]:
    return Sealer(KEY, SALT, epoch, suite), Opener(KEY, SALT, epoch, suite)


def test_layout_constants() -> None:
    assert (aead.EPOCH_OFF, aead.COUNTER_OFF, aead.CIPHERTEXT_OFF) == (0, 1, 9)
    assert (aead.TAG_LEN, OVERHEAD, aead.NONCE_LEN) == (16, 25, 12)
    assert len(AAD) == 41


@pytest.mark.parametrize("suite", list(Suite))
def test_pinned_vector(suite: Suite) -> None:
    sealer = Sealer(KEY, SALT, EPOCH, suite, first_counter=COUNTER)
    sealed = sealer.seal(AAD, PLAINTEXT)
    assert sealed.hex() == VECTORS[suite]
    assert sealer.counter == COUNTER + 1
    # The same bytes from the primitive directly: nonce = salt || counter, AAD = the header.
    prim = AESGCM(KEY) if suite is Suite.AES_256_GCM else ChaCha20Poly1305(KEY)
    nonce = SALT + COUNTER.to_bytes(8, "big")
    assert sealed[9:] == prim.encrypt(nonce, PLAINTEXT, AAD)
    assert Opener(KEY, SALT, EPOCH, suite).open(AAD, sealed) == PLAINTEXT


@pytest.mark.parametrize("suite", list(Suite))
def test_round_trip_and_counters(suite: Suite) -> None:
    sealer, opener = pair(suite)
    for i, pt in enumerate([b"", b"x", b"y" * 1400, bytes(range(256))]):
        assert sealer.counter == i
        sealed = sealer.seal(AAD, pt)
        assert len(sealed) == len(pt) + OVERHEAD
        assert peek_epoch(sealed) == EPOCH
        assert int.from_bytes(sealed[1:9], "big") == i
        assert opener.open(AAD, sealed) == pt
    assert opener.accepted == 4


def test_memoryview_inputs() -> None:
    sealer, opener = pair()
    sealed = sealer.seal(memoryview(AAD), memoryview(b"abc"))
    frame = memoryview(AAD + sealed)
    assert opener.open(frame[:41], frame[41:]) == b"abc"


def test_every_bit_flip_fails() -> None:
    sealer, _ = pair()
    sealed = sealer.seal(AAD, PLAINTEXT)
    for i in range(len(sealed) * 8):
        bad = bytearray(sealed)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(AuthError) as info:
            Opener(KEY, SALT, EPOCH).open(AAD, bytes(bad))
        # a flip in the counter's top byte names another shard than the type byte does
        expected = ("unknown_epoch" if i < 8 else "shard_mismatch" if i < 16 else "bad_tag")
        assert info.value.reason == expected
    for i in range(len(AAD) * 8):
        bad_aad = bytearray(AAD)
        bad_aad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(AuthError) as info:
            Opener(KEY, SALT, EPOCH).open(bytes(bad_aad), sealed)
        # the type byte's shard bits (3..5) must name the counter's shard
        assert info.value.reason == ("shard_mismatch" if i in (3, 4, 5) else "bad_tag")


def test_wrong_key_or_salt_fails() -> None:
    sealer, _ = pair()
    sealed = sealer.seal(AAD, PLAINTEXT)
    for opener in (Opener(bytes(32), SALT, EPOCH), Opener(KEY, b"\0\0\0\0", EPOCH)):
        with pytest.raises(AuthError, match="tag") as info:
            opener.open(AAD, sealed)
        assert info.value.reason == "bad_tag"


def test_truncation_fails() -> None:
    sealer, opener = pair()
    sealed = sealer.seal(AAD, PLAINTEXT)
    for n in range(len(sealed)):
        with pytest.raises(AuthError) as info:
            opener.open(AAD, sealed[:n])
        assert info.value.reason == ("truncated" if n < OVERHEAD else "bad_tag")
    with pytest.raises(AuthError) as info:
        peek_epoch(b"\x07" * 24)
    assert info.value.reason == "truncated"
    assert opener.open(AAD, sealed) == PLAINTEXT


def test_replay_fails_and_forgery_does_not_move_window() -> None:
    sealer, opener = pair()
    first = sealer.seal(AAD, b"1")
    second = sealer.seal(AAD, b"2")
    assert opener.open(AAD, second) == b"2"
    assert opener.open(AAD, first) == b"1"  # out of order is fine
    for again in (first, second):
        with pytest.raises(AuthError) as info:
            opener.open(AAD, again)
        assert info.value.reason == "replay"
    # A forged packet with a fresh counter is rejected and does not burn that counter.
    third = sealer.seal(AAD, b"3")
    forged = third[:-1] + bytes([third[-1] ^ 1])
    with pytest.raises(AuthError):
        opener.open(AAD, forged)
    assert opener.open(AAD, third) == b"3"


def test_counter_exhaustion() -> None:
    # each shard owns 2**56 counters; shard 7's last one is 8 * 2**56 - 1
    aad7 = bytes([0x81 | 7 << 3]) + AAD[1:]
    sealer = Sealer(KEY, SALT, EPOCH, first_counter=2**56 - 1, shard=7)
    opener = Opener(KEY, SALT, EPOCH)
    last = sealer.seal(aad7, b"last")
    assert int.from_bytes(last[1:9], "big") == 8 * 2**56 - 1
    assert opener.open(aad7, last) == b"last"
    with pytest.raises(LocalProtocolError) as info:
        sealer.seal(aad7, b"one too many")
    assert info.value.reason == "counter_exhausted"


def test_shard_zero_ends_below_shard_one() -> None:
    sealer = Sealer(KEY, SALT, EPOCH, first_counter=2**56 - 1)
    assert Opener(KEY, SALT, EPOCH).open(AAD, sealer.seal(AAD, b"x")) == b"x"
    with pytest.raises(LocalProtocolError) as info:
        sealer.seal(AAD, b"into shard 1's range")
    assert info.value.reason == "counter_exhausted"


def test_sealer_shared_by_threads_never_repeats_a_counter() -> None:
    sealer, _ = pair()
    results: list[list[bytes]] = [[] for _ in range(4)]

    def work(out: list[bytes]) -> None:
        for _ in range(3000):
            out.append(sealer.seal(AAD, b"x")[1:9])

    threads = [threading.Thread(target=work, args=(r,)) for r in results]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    counters = [c for r in results for c in r]
    assert len(set(counters)) == len(counters) == 12000
    assert sealer.counter <= 12000


def test_bad_parameters_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError):
        Sealer(KEY[:16], SALT, 0)
    with pytest.raises(LocalProtocolError):
        Opener(KEY, SALT + b"x", 0)
    with pytest.raises(LocalProtocolError):
        Sealer(KEY, SALT, 256)


@pytest.mark.parametrize(
    ("text", "suite"),
    [
        ("processor\t: 0\nflags\t\t: fpu vme sse2 aes avx\n", Suite.AES_256_GCM),
        ("processor\t: 0\nflags\t\t: fpu vme sse2 avx\n", Suite.CHACHA20_POLY1305),
        ("processor\t: 0\nFeatures\t: fp asimd aes pmull\n", Suite.AES_256_GCM),
        ("Features\t: fp asimd\n", Suite.CHACHA20_POLY1305),
        ("nothing useful\n", Suite.AES_256_GCM),
    ],
)
def test_choose_suite(tmp_path: Path, text: str, suite: Suite) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert choose_suite(path) is suite


def test_choose_suite_without_cpuinfo(tmp_path: Path) -> None:
    assert choose_suite(tmp_path / "missing") is Suite.AES_256_GCM


@settings(max_examples=200, deadline=None)
@given(
    suite=st.sampled_from(list(Suite)),
    aad=st.binary(max_size=64),
    plaintext=st.binary(max_size=2000),
    epoch=st.integers(0, 255),
)
def test_property_round_trip(suite: Suite, aad: bytes, plaintext: bytes, epoch: int) -> None:
    sealer, opener = pair(suite, epoch)
    aad = aad[:1] and bytes([aad[0] & ~0x38]) + aad[1:]  # a type byte of shard 0
    assert opener.open(aad, sealer.seal(aad, plaintext)) == plaintext


@settings(max_examples=100, deadline=None)
@given(
    shards=st.lists(st.integers(0, 7), min_size=1, max_size=40),
    other=st.integers(0, 7),
)
def test_property_shards_partition_nonces_and_windows(shards: list[int], other: int) -> None:
    """Every shard seals under the same key from its own counter range; one Opener opens them
    all in any interleaving (a window per sending shard), refuses each payload a second time,
    and refuses it under a type byte that names another shard."""
    sealers = {s: Sealer(KEY, SALT, EPOCH, shard=s) for s in range(8)}
    opener = Opener(KEY, SALT, EPOCH)
    nonces = set()
    for s in shards:
        aad = bytes([0x81 | s << 3]) + AAD[1:]
        sealed = sealers[s].seal(aad, b"p")
        counter = int.from_bytes(sealed[1:9], "big")
        assert counter >> 56 == s and counter not in nonces
        nonces.add(counter)
        if other != s:
            with pytest.raises(AuthError) as info:
                opener.open(bytes([0x81 | other << 3]) + AAD[1:], sealed)
            assert info.value.reason == "shard_mismatch"
        assert opener.open(aad, sealed) == b"p"
        with pytest.raises(AuthError) as info:
            opener.open(aad, sealed)
        assert info.value.reason == "replay"
    assert set(opener.windows) == {0} | set(shards)


@settings(max_examples=150, deadline=None)
@given(
    suite=st.sampled_from(list(Suite)),
    plaintext=st.binary(max_size=200),
    data=st.data(),
)
def test_property_any_mutation_raises_auth_error(
    suite: Suite, plaintext: bytes, data: st.DataObject
) -> None:
    sealer, opener = pair(suite)
    sealed = sealer.seal(AAD, plaintext)
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "replace"]))
    if kind == "flip":
        pos = data.draw(st.integers(0, len(sealed) - 1))
        mask = data.draw(st.integers(1, 255))
        mutated = sealed[:pos] + bytes([sealed[pos] ^ mask]) + sealed[pos + 1 :]
    elif kind == "truncate":
        mutated = sealed[: data.draw(st.integers(0, len(sealed) - 1))]
    elif kind == "extend":
        mutated = sealed + data.draw(st.binary(min_size=1, max_size=32))
    else:
        mutated = data.draw(st.binary(max_size=300).filter(lambda b: b != sealed))
    with pytest.raises(AuthError):
        opener.open(AAD, mutated)
    assert opener.open(AAD, sealed) == plaintext  # the mutation did not poison the window


@pytest.mark.parametrize("suite", list(Suite))
def test_seal_into_writes_the_same_bytes_as_seal(suite: Suite) -> None:
    into = Sealer(KEY, SALT, EPOCH, suite, first_counter=COUNTER)
    buf = bytearray(100)
    view = into.seal_into(AAD, memoryview(PLAINTEXT), buf)
    assert bytes(view) == bytes.fromhex(VECTORS[suite])
    assert into.counter == COUNTER + 1
    second = into.seal_into(AAD, b"next", buf)  # the buffer is reused
    assert Opener(KEY, SALT, EPOCH, suite).open(AAD, bytes(second)) == b"next"
    with pytest.raises(LocalProtocolError):
        into.seal_into(AAD, bytes(100), buf)


def test_open_into_a_buffer_gives_a_view_and_checks_the_same() -> None:
    sealer, opener = pair()
    sealed = sealer.seal(AAD, b"z" * 1000)
    out = bytearray(2000)
    view = opener.open(AAD, sealed, out)
    assert isinstance(view, memoryview) and bytes(view) == b"z" * 1000
    assert bytes(out[:1000]) == b"z" * 1000
    with pytest.raises(AuthError) as e:
        opener.open(AAD, sealed, out)  # the same counter again
    assert e.value.reason == "replay"
    forged = bytearray(sealer.seal(AAD, b"y" * 10))
    forged[-1] ^= 1
    with pytest.raises(AuthError) as e:
        opener.open(AAD, bytes(forged), out)
    assert e.value.reason == "bad_tag"
