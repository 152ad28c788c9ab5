"""The sans-I/O DTLS handshake: keys, pinning, retransmission over a lossy network, garbage."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipop.crypto.aead import Opener, Sealer, Suite
from ipop.crypto.dtls import (
    INITIAL_RTO,
    MIN_RTO,
    REPEAT_GAP,
    DtlsHandshake,
    client_hello_random,
    initial_rto,
    is_client_hello,
    is_dtls,
    normalize_fingerprint,
    split_records,
)
from ipop.crypto.identity import Identity
from ipop.errors import LocalProtocolError

ALICE = Identity.generate("alice")
BOB = Identity.generate("bob")
MALLORY = Identity.generate("mallory")


def pair(
    client_id: Identity = ALICE, server_id: Identity = BOB, **kw: object
) -> tuple[DtlsHandshake, DtlsHandshake]:
    client = DtlsHandshake(client_id, True, server_id.fingerprint, **kw)  # type: ignore[arg-type]
    server = DtlsHandshake(server_id, False, client_id.fingerprint, **kw)  # type: ignore[arg-type]
    return client, server


def pump(client: DtlsHandshake, server: DtlsHandshake, now: float = 0.0) -> None:
    """Run a handshake over a perfect network until nothing moves."""
    to_server = client.start(now)
    server.start(now)
    for _ in range(10):
        to_client = [out for d in to_server for out in server.receive(d, now)]
        to_server = [out for d in to_client for out in client.receive(d, now)]
        if not to_server and not to_client:
            return


@dataclass
class LossyNet:
    """A seeded network between two handshakes: drops, duplicates and reorders (random delay)."""

    seed: int
    drop: float = 0.0
    dup: float = 0.0
    max_delay: float = 0.05
    now: float = 0.0
    sent: int = 0
    queue: list[tuple[float, int, int, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def send(self, dst: int, datagrams: list[bytes]) -> None:
        for d in datagrams:
            self.sent += 1
            if self.rng.random() < self.drop:
                continue
            for _ in range(2 if self.rng.random() < self.dup else 1):
                at = self.now + self.rng.uniform(0.001, self.max_delay)
                heapq.heappush(self.queue, (at, self.sent, dst, d))

    def run(self, client: DtlsHandshake, server: DtlsHandshake, until: float = 20.0) -> None:
        ends = (client, server)
        server.start(self.now)
        self.send(1, client.start(self.now))
        while self.now < until:
            if all(h.done for h in ends) or any(h.failure for h in ends):
                return
            times = [h.next_deadline() for h in ends]
            candidates = [t for t in times if t is not None]
            if self.queue:
                candidates.append(self.queue[0][0])
            if not candidates:
                return
            self.now = max(self.now, min(candidates))
            if self.queue and self.queue[0][0] <= self.now:
                _, _, dst, d = heapq.heappop(self.queue)
                self.send(1 - dst, ends[dst].receive(d, self.now))
                continue
            for i, h in enumerate(ends):
                t = h.next_deadline()
                if t is not None and t <= self.now:
                    self.send(1 - i, h.on_timeout(self.now))


def assert_matching(client: DtlsHandshake, server: DtlsHandshake) -> None:
    assert client.done and server.done, (client.failure, server.failure)
    ck, sk = client.keys(), server.keys()
    assert (ck.tx_key, ck.tx_salt) == (sk.rx_key, sk.rx_salt)
    assert (ck.rx_key, ck.rx_salt) == (sk.tx_key, sk.tx_salt)
    assert ck.tx_key != ck.rx_key
    assert len(ck.tx_key) == 32 and len(ck.tx_salt) == 4
    assert ck.epoch == sk.epoch and ck.suite is sk.suite
    assert ck.peer_uid == BOB.uid and sk.peer_uid == ALICE.uid
    assert ck.peer_fingerprint == BOB.fingerprint and sk.peer_fingerprint == ALICE.fingerprint
    # The keys work with the AEAD framing in both directions.
    aad = b"\x81" + ALICE.uid + BOB.uid
    sealed = Sealer(ck.tx_key, ck.tx_salt, ck.epoch, ck.suite).seal(aad, b"ping")
    assert Opener(sk.rx_key, sk.rx_salt, sk.epoch, sk.suite).open(aad, sealed) == b"ping"
    sealed = Sealer(sk.tx_key, sk.tx_salt, sk.epoch, sk.suite).seal(aad, b"pong")
    assert Opener(ck.rx_key, ck.rx_salt, ck.epoch, ck.suite).open(aad, sealed) == b"pong"


def test_handshake_derives_matching_keys() -> None:
    client, server = pair(expected_uid=None)
    pump(client, server)
    assert_matching(client, server)
    assert client.keys().suite is Suite.AES_256_GCM
    assert client.next_deadline() is None and server.next_deadline() is None
    assert "tx_key" not in repr(client.keys())


def test_client_preference_picks_the_suite() -> None:
    client = DtlsHandshake(ALICE, True, BOB.fingerprint, suite=Suite.CHACHA20_POLY1305)
    server = DtlsHandshake(BOB, False, ALICE.fingerprint, suite=Suite.AES_256_GCM)
    pump(client, server)
    assert_matching(client, server)
    assert server.keys().suite is Suite.CHACHA20_POLY1305


def test_fresh_keys_every_handshake() -> None:
    first, second = pair(), pair()
    pump(*first)
    pump(*second)
    assert first[0].keys().tx_key != second[0].keys().tx_key


def test_expected_uid_and_fingerprint_spelling() -> None:
    client = DtlsHandshake(ALICE, True, BOB.fingerprint.lower(), expected_uid=BOB.uid)
    server = DtlsHandshake(BOB, False, "SHA-256 " + ALICE.fingerprint[8:], expected_uid=ALICE.uid)
    pump(client, server)
    assert_matching(client, server)
    assert normalize_fingerprint(" sha-256 ab:cd ") == "sha-256 AB:CD"


def test_client_rejects_wrong_server() -> None:
    client = DtlsHandshake(ALICE, True, BOB.fingerprint)
    impostor = DtlsHandshake(MALLORY, False, ALICE.fingerprint)
    pump(client, impostor)
    assert client.failed_reason == "fingerprint_mismatch"
    assert not client.done and not impostor.done
    assert impostor.failed_reason == "peer_alert"
    with pytest.raises(LocalProtocolError):
        client.keys()


def test_server_rejects_wrong_client() -> None:
    impostor = DtlsHandshake(MALLORY, True, BOB.fingerprint)
    server = DtlsHandshake(BOB, False, ALICE.fingerprint)
    pump(impostor, server)
    assert server.failed_reason == "fingerprint_mismatch"
    assert impostor.failed_reason == "peer_alert"
    assert not server.done and not impostor.done


def test_uid_mismatch() -> None:
    client = DtlsHandshake(ALICE, True, BOB.fingerprint, expected_uid=MALLORY.uid)
    server = DtlsHandshake(BOB, False, ALICE.fingerprint)
    pump(client, server)
    assert client.failed_reason == "uid_mismatch"
    assert not server.done


def test_timeout_with_retransmissions() -> None:
    client = DtlsHandshake(ALICE, True, BOB.fingerprint, timeout=10.0)
    hello = client.start(100.0)
    assert len(hello) == 1 and is_client_hello(hello[0])
    resent_at = []
    now = 100.0
    while client.failure is None:
        deadline = client.next_deadline()
        assert deadline is not None and deadline > now
        now = deadline
        out = client.on_timeout(now)
        if out:
            resent_at.append(now - 100.0)
            assert client_hello_random(out[0]) == client.client_random
            assert out[0] != hello[0]  # same hello, fresh record sequence number
    assert resent_at == [1.0, 3.0, 5.0, 7.0, 9.0]
    assert client.failed_reason == "timeout"
    assert client.next_deadline() is None
    assert client.on_timeout(now + 1) == []


def test_server_times_out_without_client() -> None:
    server = DtlsHandshake(BOB, False, ALICE.fingerprint, timeout=5.0)
    assert server.start(0.0) == []
    assert server.next_deadline() == 5.0
    assert server.on_timeout(4.9) == []
    server.on_timeout(5.0)
    assert server.failed_reason == "timeout"


def test_lost_final_flight_is_resent_by_done_server() -> None:
    client, server = pair()
    flight1 = client.start(0.0)
    flight2 = [o for d in flight1 for o in server.receive(d, 0.0)]
    flight3 = [o for d in flight2 for o in client.receive(d, 0.0)]
    flight4 = [o for d in flight3 for o in server.receive(d, 0.0)]
    assert server.done and flight4 and not client.done
    # flight 4 is lost; the client's timer resends flight 3, and the done server answers it.
    deadline = client.next_deadline()
    assert deadline == 1.0
    again = client.on_timeout(deadline)
    answer = [o for d in again for o in server.receive(d, deadline)]
    assert answer
    for d in answer:
        client.receive(d, deadline)
    assert_matching(client, server)


@pytest.mark.parametrize("seed", range(12))
def test_lossy_network_completes(seed: int) -> None:
    client, server = pair()
    net = LossyNet(seed, drop=0.2, dup=0.2)
    net.run(client, server)
    assert_matching(client, server)


@pytest.mark.parametrize("seed", range(6))
def test_reordered_fragments_complete(seed: int) -> None:
    """A small MTU splits flights over several datagrams, which then arrive out of order."""
    client, server = pair(mtu=300)
    net = LossyNet(seed, drop=0.05, dup=0.3, max_delay=0.2)
    net.run(client, server)
    assert_matching(client, server)


def test_mtu_floor() -> None:
    with pytest.raises(LocalProtocolError):
        DtlsHandshake(ALICE, True, BOB.fingerprint, mtu=200)


def test_non_dtls_garbage_is_ignored_mid_handshake() -> None:
    client, server = pair()
    flight1 = client.start(0.0)
    for junk in (b"", b"\x16", b"\x00" * 40, b"\x81" + bytes(60), b"\xff" * 13):
        assert server.receive(junk, 0.0) == []
        assert client.receive(junk, 0.0) == []
    assert server.ignored == 5 and client.ignored == 5
    flight2 = [o for d in flight1 for o in server.receive(d, 0.0)]
    for junk in (b"\x40" + bytes(20), b"\x14"):
        assert client.receive(junk, 0.0) == []
    flight3 = [o for d in flight2 for o in client.receive(d, 0.0)]
    flight4 = [o for d in flight3 for o in server.receive(d, 0.0)]
    for d in flight4:
        client.receive(d, 0.0)
    assert_matching(client, server)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    junk=st.lists(
        st.one_of(
            st.binary(max_size=300),
            st.builds(lambda t, b: bytes([t]) + b, st.integers(20, 63), st.binary(max_size=300)),
            st.builds(
                lambda b: bytes([22, 0xFE, 0xFD, 0, 0]) + bytes(6) + len(b).to_bytes(2, "big") + b,
                st.binary(max_size=200),
            ),
        ),
        min_size=1,
        max_size=4,
    ),
    stage=st.integers(0, 3),
)
def test_garbage_never_raises(junk: list[bytes], stage: int) -> None:
    """Whatever arrives, at any stage, receive() returns datagrams or fails cleanly."""
    client, server = pair()
    flights = [client.start(0.0)]
    for i in range(stage):
        side = server if i % 2 == 0 else client
        flights.append([o for d in flights[-1] for o in side.receive(d, 0.0)])
    for d in junk:
        for side in (client, server):
            out = side.receive(d, 0.5)
            assert isinstance(out, list)
            assert side.failure is None or side.failure.reason in {
                "handshake_error",
                "peer_alert",
                "bad_peer_cert",
            }
            side.on_timeout(1.0)


def test_demux_helpers() -> None:
    client, _ = pair()
    hello = client.start(0.0)[0]
    assert is_dtls(hello[0])
    assert [b for b in range(256) if is_dtls(b)] == list(range(20, 64))
    assert is_client_hello(hello) and is_client_hello(memoryview(hello))
    assert client_hello_random(hello) == client.client_random
    assert client.client_random is not None and len(client.client_random) == 32
    assert not is_client_hello(hello[:13])
    assert not is_client_hello(b"\x17" + hello[1:])  # application data
    assert not is_client_hello(hello[:3] + b"\x00\x01" + hello[5:])  # epoch 1
    assert not is_client_hello(hello[:13] + b"\x02" + hello[14:])  # ServerHello
    assert client_hello_random(hello[:40]) is None
    fragment = hello[:19] + b"\x00\x00\x10" + hello[22:]
    assert is_client_hello(fragment) and client_hello_random(fragment) is None


def test_split_records_packs_whole_records() -> None:
    def record(n: int) -> bytes:
        return bytes([22, 0xFE, 0xFD, 0, 0]) + bytes(6) + n.to_bytes(2, "big") + bytes(n)

    blob = record(100) + record(100) + record(200) + record(10)
    out = split_records(blob, 256)
    assert [len(d) for d in out] == [226, 236]
    assert b"".join(out) == blob
    assert split_records(record(5) + b"\x16\x00", 256) == [record(5) + b"\x16\x00"]


def test_first_rto_follows_the_measured_round_trip() -> None:
    assert initial_rto(None) == INITIAL_RTO == 1.0
    assert initial_rto(0.2) == MIN_RTO  # a LAN: the floor, above the peer's REPEAT_GAP
    assert MIN_RTO > REPEAT_GAP
    assert initial_rto(150.0) == pytest.approx(0.6)
    assert initial_rto(900.0) == INITIAL_RTO  # never slower than RFC 6347's 1 s
    assert initial_rto(float("nan")) == INITIAL_RTO


def test_lost_server_flight_costs_the_short_timer() -> None:
    """Flight 2 is lost: the client resends its hello after ``first_rto``, the server answers the
    repeat (it is past REPEAT_GAP) and the handshake completes at once."""
    client = DtlsHandshake(ALICE, True, BOB.fingerprint, first_rto=MIN_RTO)
    server = DtlsHandshake(BOB, False, ALICE.fingerprint, first_rto=MIN_RTO)
    server.start(0.0)
    flight1 = client.start(0.0)
    for d in flight1:
        server.receive(d, 0.0)  # flight 2, lost
    assert client.next_deadline() == MIN_RTO
    again = client.on_timeout(MIN_RTO)
    assert again
    flight2 = [o for d in again for o in server.receive(d, MIN_RTO)]
    assert flight2
    now = MIN_RTO
    flight3 = [o for d in flight2 for o in client.receive(d, now)]
    flight4 = [o for d in flight3 for o in server.receive(d, now)]
    for d in flight4:
        client.receive(d, now)
    assert client.done and server.done
    assert_matching(client, server)
