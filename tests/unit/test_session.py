"""The per-link crypto session: keying, sealing, rekey with overlap, retries, threads."""

from __future__ import annotations

import queue
import threading

import pytest

from ipop.crypto.aead import Suite
from ipop.crypto.identity import Identity
from ipop.crypto.session import REKEY_JITTER, CryptoSession, is_client_for
from ipop.errors import AuthError, LocalProtocolError

ALICE = Identity.generate("alice")
BOB = Identity.generate("bob")
MALLORY = Identity.generate("mallory")
AAD_AB = b"\x81" + ALICE.uid + BOB.uid
AAD_BA = b"\x81" + BOB.uid + ALICE.uid


def sessions(**kw: object) -> tuple[CryptoSession, CryptoSession]:
    kw.setdefault("rekey_jitter", 0.0)  # exact rekey times; test_rekeys_are_jittered has it
    client = CryptoSession(
        ALICE, is_client=True, expected_fingerprint=BOB.fingerprint, expected_uid=BOB.uid, **kw
    )  # type: ignore[arg-type]
    server = CryptoSession(
        BOB, is_client=False, expected_fingerprint=ALICE.fingerprint, expected_uid=ALICE.uid, **kw
    )  # type: ignore[arg-type]
    return client, server


def deliver(
    client: CryptoSession, server: CryptoSession, to_server: list[bytes], now: float
) -> None:
    """Carry handshake datagrams back and forth until both sides fall quiet."""
    to_client: list[bytes] = []
    for _ in range(10):
        to_client = [o for d in to_server for o in server.handle_handshake_datagram(d, now)]
        to_server = [o for d in to_client for o in client.handle_handshake_datagram(d, now)]
        if not to_server and not to_client:
            return


def keyed(**kw: object) -> tuple[CryptoSession, CryptoSession]:
    client, server = sessions(**kw)
    assert server.start(0.0) == []
    deliver(client, server, client.start(0.0), 0.0)
    assert client.ready and server.ready
    return client, server


def both_ways(client: CryptoSession, server: CryptoSession, tag: bytes = b"") -> None:
    assert server.open(AAD_AB, client.seal(AAD_AB, b"to bob" + tag)) == b"to bob" + tag
    assert client.open(AAD_BA, server.seal(AAD_BA, b"to alice" + tag)) == b"to alice" + tag


def reason_of(session: CryptoSession, aad: bytes, sealed: bytes) -> str:
    with pytest.raises(AuthError) as info:
        session.open(aad, sealed)
    return info.value.reason


def test_roles_follow_uids() -> None:
    assert is_client_for(b"\x01" * 20, b"\x02" * 20)
    assert not is_client_for(b"\x02" * 20, b"\x01" * 20)


def test_no_plaintext_path_before_keys() -> None:
    client, server = sessions()
    assert not client.ready and not server.ready
    with pytest.raises(LocalProtocolError) as info:
        client.seal(AAD_AB, b"secret")
    assert info.value.reason == "not_ready"
    assert reason_of(server, AAD_AB, bytes(40)) == "unknown_epoch"
    assert reason_of(server, AAD_AB, bytes(3)) == "truncated"
    assert server.rx_drops["unknown_epoch"] == 1


def test_initial_handshake_and_traffic() -> None:
    client, server = keyed(suite=Suite.CHACHA20_POLY1305)
    assert client.epoch == server.epoch is not None
    assert client.handshakes == server.handshakes == 1
    both_ways(client, server)
    keys = client.keys
    assert keys is not None and keys.peer_uid == BOB.uid and keys.suite is Suite.CHACHA20_POLY1305
    assert client.stats()["state"] == "ready"
    assert client.next_deadline() == 120.0  # the rekey (no jitter in these tests)
    assert server.next_deadline() is None  # the server never starts a handshake


def test_frame_failures_are_counted_by_reason() -> None:
    client, server = keyed()
    sealed = client.seal(AAD_AB, b"x")
    assert server.open(AAD_AB, sealed) == b"x"
    assert reason_of(server, AAD_AB, sealed) == "replay"
    assert reason_of(server, AAD_BA, client.seal(AAD_AB, b"y")) == "bad_tag"
    assert reason_of(server, AAD_AB, bytes([sealed[0] ^ 1]) + sealed[1:]) == "unknown_epoch"
    assert server.failures == {"replay": 1, "bad_tag": 1, "unknown_epoch": 1}


def rekey(client: CryptoSession, server: CryptoSession, now: float) -> None:
    hello = client.tick(now)
    assert hello, "client should start a rekey"
    assert client.stats()["state"] == "rekeying"
    deliver(client, server, hello, now)


def test_rekey_overlap_and_switch_order() -> None:
    client, server = keyed()
    both_ways(client, server)  # traffic proves the first keys on both ends
    old_epoch = client.epoch
    in_flight_ab = client.seal(AAD_AB, b"old a->b")
    in_flight_ba = server.seal(AAD_BA, b"old b->a")
    very_late_ab = client.seal(AAD_AB, b"too late")
    very_late_ba = server.seal(AAD_BA, b"too late")
    assert client.tick(119.0) == []
    rekey(client, server, 120.0)
    new_epoch = client.epoch
    assert new_epoch == server.epoch and new_epoch != old_epoch
    assert client.handshakes == server.handshakes == 2
    # Frames sealed under the old keys still open on both sides.
    assert server.open(AAD_AB, in_flight_ab) == b"old a->b"
    assert client.open(AAD_BA, in_flight_ba) == b"old b->a"
    # The client switched at once; the server keeps sealing under the old keys ...
    from_client = client.seal(AAD_AB, b"new")
    assert from_client[0] == new_epoch
    assert server.seal(AAD_BA, b"still old")[0] == old_epoch
    # ... until it sees the client use the new ones.
    assert server.open(AAD_AB, from_client) == b"new"
    from_server = server.seal(AAD_BA, b"new too")
    assert from_server[0] == new_epoch
    assert client.open(AAD_BA, from_server) == b"new too"
    # Old keys are dropped grace_seconds after each side saw the peer switch.
    assert client.tick(121.0) == [] and server.tick(121.0) == []
    assert client.next_deadline() == 131.0
    client.tick(130.9)
    server.tick(130.9)
    assert len(server._openers) == len(client._openers) == 2
    client.tick(131.0)
    server.tick(131.0)
    assert reason_of(server, AAD_AB, very_late_ab) == "unknown_epoch"
    assert reason_of(client, AAD_BA, very_late_ba) == "unknown_epoch"
    both_ways(client, server, b"after")


def test_rekey_on_packet_count() -> None:
    client, server = keyed(rekey_packets=5)
    for _ in range(4):
        server.open(AAD_AB, client.seal(AAD_AB, b"x"))
    assert client.tick(1.0) == []
    client.seal(AAD_AB, b"fifth")
    rekey(client, server, 2.0)
    assert client.handshakes == 2
    both_ways(client, server)


def test_rekey_when_the_peer_sent_many() -> None:
    client, server = keyed(rekey_packets=3)
    for _ in range(3):
        client.open(AAD_BA, server.seal(AAD_BA, b"x"))
    rekey(client, server, 1.0)
    assert server.handshakes == 2


def test_server_falls_back_to_new_keys_without_client_traffic() -> None:
    client, server = keyed(confirm_seconds=15.0)
    both_ways(client, server)  # the first keys are proven
    old_epoch = server.epoch
    rekey(client, server, 120.0)
    assert server.seal(AAD_BA, b"x")[0] == old_epoch
    assert server.next_deadline() == 135.0
    server.tick(135.0)
    sealed = server.seal(AAD_BA, b"y")
    assert sealed[0] == server.epoch != old_epoch
    assert client.open(AAD_BA, sealed) == b"y"


def test_client_retries_after_failure_with_backoff() -> None:
    client = CryptoSession(ALICE, is_client=True, expected_fingerprint=MALLORY.fingerprint)
    server = CryptoSession(BOB, is_client=False, expected_fingerprint=ALICE.fingerprint)
    deliver(client, server, client.start(0.0), 0.0)
    assert client.failures["fingerprint_mismatch"] == 1
    assert server.failures["peer_alert"] == 1
    assert client.last_failure is not None
    assert not client.ready and not server.ready
    starts = []
    now = 0.0
    for _ in range(5):
        deadline = client.next_deadline()
        assert deadline is not None
        now = deadline
        hello = client.tick(now)
        assert hello
        starts.append(now)
        deliver(client, server, hello, now)
    assert starts == [1.0, 3.0, 7.0, 15.0, 31.0]
    assert client.failures["fingerprint_mismatch"] == 6
    # A stale or a reflected ClientHello is not taken for a new handshake.
    assert client.handle_handshake_datagram(hello[0], now) == []
    assert client.failures["unexpected_client_hello"] == 1


def test_lost_final_flight_then_client_retry() -> None:
    """The server finishes, the client never hears it: the retry must re-align both ends."""
    client2, server2 = sessions(handshake_timeout=5.0)
    flight1 = client2.start(0.0)
    flight2 = [o for d in flight1 for o in server2.handle_handshake_datagram(d, 0.0)]
    flight3 = [o for d in flight2 for o in client2.handle_handshake_datagram(d, 0.0)]
    lost = [o for d in flight3 for o in server2.handle_handshake_datagram(d, 0.0)]
    assert lost and server2.ready and not client2.ready
    now = 0.0
    while not client2.failures.get("timeout"):
        deadline = client2.next_deadline()
        assert deadline is not None
        now = deadline
        for d in client2.tick(now):
            server2.handle_handshake_datagram(d, now)  # answers lost too
    assert not client2.ready
    # The client retries; the server, whose keys were never used, switches at once.
    retry_at = client2.next_deadline()
    assert retry_at is not None
    deliver(client2, server2, client2.tick(retry_at), retry_at)
    assert client2.ready and client2.epoch == server2.epoch
    assert server2.handshakes == 2 and client2.handshakes == 1
    both_ways(client2, server2)


def test_unsolicited_handshake_datagrams_are_dropped() -> None:
    client, server = sessions()
    assert server.handle_handshake_datagram(b"\x17" + bytes(20), 0.0) == []
    assert server.handle_handshake_datagram(b"\x81" + bytes(20), 0.0) == []
    assert server.failures == {"no_handshake": 1, "not_dtls": 1}
    assert client.tick(5.0) == []  # not started: the client keeps quiet


def test_manual_rekey() -> None:
    client, server = keyed()
    assert server.rekey(1.0) == []
    deliver(client, server, client.rekey(1.0), 1.0)
    assert client.handshakes == server.handshakes == 2
    both_ways(client, server)


def test_threads_seal_and_open_across_rekeys() -> None:
    """TX and RX threads run flat out while the control thread rekeys: nothing is lost."""
    client, server = keyed()
    wire: queue.Queue[bytes | None] = queue.Queue(maxsize=32)
    opened: list[bytes] = []
    errors: list[BaseException] = []
    total = 3000
    rekeyed = threading.Semaphore(0)  # the sender waits for a rekey every 750 packets

    def tx() -> None:
        try:
            for i in range(total):
                if i and i % 750 == 0:
                    rekeyed.acquire(timeout=10)
                wire.put(client.seal(AAD_AB, i.to_bytes(4, "big")))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        wire.put(None)

    def rx() -> None:
        while (sealed := wire.get()) is not None:
            try:
                opened.append(server.open(AAD_AB, sealed))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

    threads = [threading.Thread(target=f, daemon=True) for f in (tx, rx)]
    for t in threads:
        t.start()
    now = 0.0
    rekeys = 0
    while threads[0].is_alive() and rekeys < 4:
        now += 120.0
        deliver(client, server, client.tick(now), now)
        seen = len(opened)
        rekeys += 1
        rekeyed.release()
        # Let the queue turn over before the next rekey drops the keys before last.
        while threads[1].is_alive() and len(opened) < seen + 64 and threads[0].is_alive():
            threading.Event().wait(0.001)
        server.tick(now + 0.5)
    for t in threads:
        t.join(timeout=20)
    assert not errors, [(type(e).__name__, e) for e in errors]
    assert [int.from_bytes(p, "big") for p in opened] == list(range(total))
    assert server.failures == {}
    assert client.handshakes == server.handshakes >= 3


def test_rekeys_are_jittered() -> None:
    """Keys installed at the same moment expire at different times (0-10 % early), so links
    keyed together do not rekey in waves."""
    deadlines = set()
    for _ in range(8):
        client, _server = keyed(rekey_jitter=REKEY_JITTER)
        deadline = client.next_deadline()
        assert deadline is not None and 108.0 <= deadline <= 120.0
        deadlines.add(round(deadline, 6))
    assert len(deadlines) > 1


def test_rekeys_leave_no_garbage_cycles() -> None:
    """A finished handshake is freed by reference counting (no cycle through OpenSSL's verify
    callback): after many rekeys, with the cycle collector off, no more handshakes are alive
    than before them (the last finished one per end)."""
    import gc

    from ipop.crypto.dtls import DtlsHandshake

    def alive() -> int:
        return sum(isinstance(o, DtlsHandshake) for o in gc.get_objects())

    client, server = keyed()
    gc.collect()
    gc.disable()
    try:
        before = alive()  # ours: the last finished handshake of each end
        now = 0.0
        for _ in range(30):
            now += 121.0
            rekey(client, server, now)
            both_ways(client, server)
        assert alive() <= before
    finally:
        gc.enable()
    assert client.handshakes == server.handshakes == 31
