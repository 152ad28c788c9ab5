"""A sans-I/O DTLS 1.2 handshake that authenticates a peer by fingerprint and exports AEAD keys.

pyOpenSSL runs the handshake over memory BIOs: datagrams in, datagrams out, time passed in.  Both
ends present their self-signed certificate (the server demands the client's); the certificate
check is the pin from signaling — SHA-256 of the peer certificate must equal
``expected_fingerprint`` and, when given, the peer's UID must equal ``expected_uid``.  Once the
handshake completes, keys come out of the RFC 5705 exporter, split as DTLS-SRTP does (RFC 5764)::

    export_keying_material(b"EXTRACTOR-ipop-v1", 72)
     0                32                64        68        72
    +-----------------+-----------------+---------+---------+
    | client write key| server write key| c. salt | s. salt |
    +-----------------+-----------------+---------+---------+
    client: tx = client write, rx = server write;  server: the other way round.

    export_keying_material(b"EXTRACTOR-ipop-epoch-v1", 1) -> the epoch byte for these keys.

No application data ever flows through DTLS: data frames are sealed by ``ipop.crypto.aead``.

Flights and retransmission (RFC 6347 §4.2.4)::

    client                                   server
    ClientHello                   -------->                          flight 1
                                  <--------  ServerHello, Certificate,
                                             ServerKeyExchange,
                                             CertificateRequest,
                                             ServerHelloDone         flight 2
    Certificate, ClientKeyExchange,
    CertificateVerify, [CCS], Finished -->                          flight 3
                                  <--------  [CCS], Finished         flight 4 (server done)
    (client done)

A side that sent a flight and waits for the answer retransmits on its timer (``on_timeout``, 1 s
doubling to 2 s, or from ``initial_rto(rtt)`` where ICE measured the path's round trip): OpenSSL's
own ``DTLSv1_handle_timeout`` when its wall-clock timer has expired, otherwise a copy of the last
flight, so the caller's clock (a fake one in tests) drives it too. Every epoch-0 record we send
gets a fresh sequence number of our own (epoch-0 records are not authenticated), so the peer's
record layer takes a copy as new rather than as a replay; epoch-1 records (Finished) keep
OpenSSL's. As RFC 6347 §4.2.4 asks, a retransmitted flight from the peer (a datagram seen before,
up to those sequence numbers) triggers a resend of our last flight, and the server, once done,
answers a repeat of flight 3 with flight 4: at most ``MAX_REPEAT_RESENDS`` times, ``REPEAT_GAP``
apart. The whole handshake gives up after ``timeout`` seconds (reason ``timeout``).

Memory BIOs lose datagram boundaries, so output is split into records and packed into datagrams
of at most ``mtu`` bytes (at least ``MIN_MTU``); input is fed one datagram at a time.

Failures never raise out of ``receive``/``on_timeout``: they set ``failure`` (an
:class:`~ipop.errors.AuthError`) with reasons ``fingerprint_mismatch``, ``uid_mismatch``,
``bad_peer_cert``, ``peer_alert``, ``handshake_error`` or ``timeout``.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto

from ipop.crypto.aead import DEFAULT_SUITE, KEY_LEN, SALT_LEN, Suite
from ipop.crypto.identity import Identity, fingerprint_of, uid_of
from ipop.crypto.verdict import Confirmation
from ipop.errors import AuthError, IdentityError, LocalProtocolError
from ipop.wire.header import KIND_BY_FIRST_BYTE, Kind

RECORD_HEADER_LEN = 13
"""type(1) version(2) epoch(2) sequence(6) length(2)."""
CT_CHANGE_CIPHER_SPEC = 20
CT_ALERT = 21
CT_HANDSHAKE = 22
HS_CLIENT_HELLO = 1
HS_TYPE_OFF = RECORD_HEADER_LEN  # 13: first byte of the handshake header
HS_FRAG_OFF = HS_TYPE_OFF + 6  # 19: fragment_offset (3 bytes)
HELLO_RANDOM_OFF = HS_TYPE_OFF + 12 + 2  # 27: after the handshake header and client_version
HELLO_RANDOM_LEN = 32

EXPORTER_LABEL = b"EXTRACTOR-ipop-v1"
EPOCH_LABEL = b"EXTRACTOR-ipop-epoch-v1"
EXPORT_LEN = 2 * KEY_LEN + 2 * SALT_LEN  # 72
DTLS1_2_VERSION = 0xFEFD

DEFAULT_MTU = 1200
MIN_MTU = 256
"""OpenSSL cannot fit a ClientHello into less."""
HANDSHAKE_TIMEOUT = 10.0
INITIAL_RTO = 1.0
"""The first retransmission timer when the path's round trip is unknown (RFC 6347 §4.2.4.1)."""
MIN_RTO = 0.3
"""The shortest first timer on a path with a measured round trip: above ``REPEAT_GAP``, so the
peer answers a repeat of our flight, and above a busy node's handshake work."""
RTO_PER_RTT = 4.0
MAX_RTO = 2.0
MAX_REPEAT_RESENDS = 8
REPEAT_GAP = 0.25
"""Seconds between two resends triggered by the peer's repeats (one per repeated flight)."""
SEEN_LIMIT = 64
CONTEXT_CACHE = 8
"""SSL contexts kept (one per identity and suite; a node has one identity)."""

_CIPHERS = {
    Suite.AES_256_GCM: b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305",
    Suite.CHACHA20_POLY1305: b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384",
}


def is_dtls(first_byte: int) -> bool:
    """True if a datagram starting with this byte is DTLS (``ipop.wire.header.classify``)."""
    return KIND_BY_FIRST_BYTE[first_byte] is Kind.DTLS


def is_client_hello(datagram: bytes | bytearray | memoryview) -> bool:
    """True if the datagram opens with an epoch-0 handshake record carrying a ClientHello."""
    return (
        len(datagram) > HS_TYPE_OFF
        and datagram[0] == CT_HANDSHAKE
        and datagram[3] == 0
        and datagram[4] == 0
        and datagram[HS_TYPE_OFF] == HS_CLIENT_HELLO
    )


def client_hello_random(datagram: bytes | bytearray | memoryview) -> bytes | None:
    """The 32-byte random of a ClientHello datagram (None if it is not one, or is a fragment)."""
    if not is_client_hello(datagram) or len(datagram) < HELLO_RANDOM_OFF + HELLO_RANDOM_LEN:
        return None
    if any(datagram[HS_FRAG_OFF : HS_FRAG_OFF + 3]):
        return None
    return bytes(datagram[HELLO_RANDOM_OFF : HELLO_RANDOM_OFF + HELLO_RANDOM_LEN])


def _record_offsets(datagram: bytes | bytearray) -> list[int]:
    """Where each whole DTLS record in a datagram starts."""
    offsets = []
    pos = 0
    while pos + RECORD_HEADER_LEN <= len(datagram):
        offsets.append(pos)
        pos += RECORD_HEADER_LEN + int.from_bytes(datagram[pos + 11 : pos + 13], "big")
    return offsets


def _without_epoch0_seq(datagram: bytes) -> bytes:
    """The datagram with epoch-0 sequence numbers zeroed: equal for a flight and its copies."""
    buf = bytearray(datagram)
    for pos in _record_offsets(buf):
        if buf[pos + 3] == 0 and buf[pos + 4] == 0:
            buf[pos + 5 : pos + 11] = bytes(6)
    return bytes(buf)


def initial_rto(rtt_ms: float | None) -> float:
    """The first retransmission timer for a path whose round trip (ICE's check) is ``rtt_ms``:
    ``RTO_PER_RTT`` round trips, between ``MIN_RTO`` and ``INITIAL_RTO``; ``INITIAL_RTO`` when
    unknown.  RFC 6347 §4.2.4.1 allows a shorter timer than 1 s when the RTT is known; a lost
    handshake datagram on a LAN then costs 0.3 s of a link's set-up instead of 1 s."""
    if rtt_ms is None or not rtt_ms >= 0:
        return INITIAL_RTO
    return min(INITIAL_RTO, max(MIN_RTO, RTO_PER_RTT * rtt_ms / 1000))


def normalize_fingerprint(fingerprint: str) -> str:
    """``sha-256 ab:cd`` and ``SHA-256 AB:CD`` compare equal."""
    algorithm, _, digest = fingerprint.strip().partition(" ")
    return f"{algorithm.lower()} {digest.strip().upper()}"


def split_records(blob: bytes, mtu: int) -> list[bytes]:
    """Cut OpenSSL's output stream into whole records and pack them into datagrams <= ``mtu``."""
    records: list[bytes] = []
    pos = 0
    while pos < len(blob):
        if len(blob) - pos < RECORD_HEADER_LEN:
            records.append(blob[pos:])
            break
        end = pos + RECORD_HEADER_LEN + int.from_bytes(blob[pos + 11 : pos + 13], "big")
        records.append(blob[pos:end])
        pos = end
    datagrams: list[bytes] = []
    current = b""
    for record in records:
        if current and len(current) + len(record) > mtu:
            datagrams.append(current)
            current = b""
        current += record
    if current:
        datagrams.append(current)
    return datagrams


@dataclass(frozen=True)
class KeyMaterial:
    """What a completed handshake yields: per-direction AEAD keys and the peer it proved."""

    tx_key: bytes = field(repr=False)
    tx_salt: bytes = field(repr=False)
    rx_key: bytes = field(repr=False)
    rx_salt: bytes = field(repr=False)
    suite: Suite
    epoch: int
    """Derived from the handshake, so both ends agree on it (see ``ipop.crypto.session``)."""
    peer_uid: bytes
    peer_fingerprint: str


class DtlsHandshake:
    """One DTLS 1.2 handshake, as client or server, driven by datagrams and the caller's clock."""

    def __init__(
        self,
        identity: Identity,
        is_client: bool,
        expected_fingerprint: str,
        *,
        expected_uid: bytes | None = None,
        suite: Suite = DEFAULT_SUITE,
        mtu: int = DEFAULT_MTU,
        timeout: float = HANDSHAKE_TIMEOUT,
        confirmation: Confirmation | None = None,
        first_rto: float = INITIAL_RTO,
    ) -> None:
        self.is_client = is_client
        self.confirmation = confirmation
        self._alpn_refusal: str | None = None
        self._alpn_selected = False
        self.expected_fingerprint = normalize_fingerprint(expected_fingerprint)
        self.expected_uid = expected_uid
        if mtu < MIN_MTU:
            raise LocalProtocolError(f"DTLS MTU {mtu} is below {MIN_MTU}")
        self.mtu = mtu
        self.timeout = timeout
        self.done = False
        self.failure: AuthError | None = None
        self.client_random: bytes | None = None
        """The ClientHello random: tells this handshake's hellos from a new handshake's."""
        self.ignored = 0
        """Datagrams dropped before reaching OpenSSL (not DTLS, or after the end)."""
        self._verify_failure: AuthError | None = None
        self._keys: KeyMaterial | None = None
        self._deadline: float | None = None
        self._rtx_at: float | None = None
        self._first_rto = first_rto
        self._rto = first_rto
        self._last_flight: list[bytes] = []
        self._repeat_resends = 0
        self._last_sent_at = -math.inf
        self._seq0 = 0
        self._seen: set[bytes] = set()
        self._conn = self._connection(identity, suite)

    # -- public surface --------------------------------------------------------------------

    @property
    def failed_reason(self) -> str | None:
        return self.failure.reason if self.failure is not None else None

    @property
    def started(self) -> bool:
        return self._deadline is not None

    def start(self, now: float) -> list[bytes]:
        """Begin; the client returns its ClientHello, the server returns nothing and waits."""
        if self.started:
            return []
        self._deadline = now + self.timeout
        if not self.is_client:
            return []
        out = self._advance(now)
        if out:
            self.client_random = client_hello_random(out[0])
        return out

    def receive(self, datagram: bytes | bytearray | memoryview, now: float) -> list[bytes]:
        """Feed one datagram from the peer; returns the datagrams to send back."""
        if not self.started:
            self.start(now)
        if self.failure is not None:
            self.ignored += 1
            return []
        if len(datagram) < RECORD_HEADER_LEN or not is_dtls(datagram[0]):
            self.ignored += 1
            return []
        if self.done:
            return self._answer_retransmission(datagram, now)
        if self._deadline is not None and now >= self._deadline:
            self._fail("timeout", "handshake deadline passed")
            return []
        data = bytes(datagram)
        shape = _without_epoch0_seq(data)
        repeat = shape in self._seen
        if not repeat and len(self._seen) < SEEN_LIMIT:
            self._seen.add(shape)
        if self.client_random is None and not self.is_client:
            self.client_random = client_hello_random(data)
        try:
            self._conn.bio_write(data)
        except SSL.Error as exc:
            self._fail("handshake_error", f"bio_write: {exc}")
            return []
        out = self._advance(now)
        if not out and repeat and not self.done and self.failure is None:
            # The peer retransmitted a flight we already had: our answer was probably lost.
            out = self._resend_on_repeat(now)
        return out

    def on_timeout(self, now: float) -> list[bytes]:
        """Call at ``next_deadline()``: retransmits the last flight, or fails at the deadline."""
        if self.done or self.failure is not None or self._deadline is None:
            return []
        if now >= self._deadline:
            self._fail("timeout", f"no handshake after {self.timeout:g} s")
            return []
        if self._rtx_at is None or now < self._rtx_at:
            return []
        out: list[bytes] = []
        try:
            if self._conn.DTLSv1_handle_timeout():
                out = self._drain()
        except SSL.Error as exc:
            self._fail("timeout", f"OpenSSL gave up retransmitting: {exc}")
            return []
        if out:
            self._last_flight = out
        else:
            out = self._renumber(self._last_flight)
        self._rto = min(self._rto * 2, MAX_RTO)
        self._rtx_at = now + self._rto
        self._last_sent_at = now
        return out

    def next_deadline(self) -> float | None:
        """When ``on_timeout`` next has something to do; None once done or failed."""
        if self.done or self.failure is not None or self._deadline is None:
            return None
        if self._rtx_at is None:
            return self._deadline
        return min(self._rtx_at, self._deadline)

    def keys(self) -> KeyMaterial:
        """The exported keys; only after ``done``."""
        if self._keys is None:
            raise LocalProtocolError("DTLS handshake has not completed")
        return self._keys

    # -- internals ---------------------------------------------------------------------------

    def _connection(self, identity: Identity, suite: Suite) -> SSL.Connection:
        ctx = shared_context(identity, suite)
        conn = SSL.Connection(ctx, None)
        # The shared context's verify callback finds this handshake through a weak
        # reference: no cycle (handshake -> connection -> callback -> handshake) keeps a
        # finished handshake and its OpenSSL objects alive until a full GC pass.
        conn.set_app_data(weakref.ref(self))
        conn.set_ciphertext_mtu(self.mtu)
        if self.confirmation is not None and self.is_client:
            conn.set_alpn_protos(self.confirmation.offer())
        if self.is_client:
            conn.set_connect_state()
        else:
            conn.set_accept_state()
        return conn

    def _verify(self, cert: crypto.X509, depth: int) -> bool:
        """OpenSSL's verify callback: accept self-signed, but pin the leaf to the fingerprint."""
        if depth != 0:
            return True
        try:
            der = cert.to_cryptography().public_bytes(serialization.Encoding.DER)
            problem = self._check_peer(der)
        except Exception as exc:  # nothing may escape into OpenSSL's callback
            problem = AuthError(f"unusable peer certificate: {exc}", reason="bad_peer_cert")
        if problem is not None:
            self._verify_failure = problem
            return False
        return True

    def _select_alpn(self, conn: SSL.Connection, offered: list[bytes]) -> bytes:
        """Server: confirm the verdict the client offered, or select the refusal that says why
        (the refusal takes effect once the handshake has authenticated the client)."""
        assert self.confirmation is not None
        self._alpn_selected = True
        try:
            chosen, refusal = self.confirmation.select(list(offered))
        except Exception:  # nothing may escape into OpenSSL's callback
            chosen, refusal = None, "downgrade_detected"
        self._alpn_refusal = refusal
        return chosen if chosen is not None else SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]

    def _confirmation_problem(self) -> str | None:
        """Why the verdict was not confirmed in this handshake (None: confirmed, or not asked)."""
        if self.confirmation is None:
            return None
        if self.is_client:
            selected = self._conn.get_alpn_proto_negotiated() or None
            return self.confirmation.check_selected(selected)
        if not self._alpn_selected:
            return "downgrade_detected"  # the client confirmed nothing
        return self._alpn_refusal

    def _check_peer(self, cert_der: bytes) -> AuthError | None:
        fingerprint = fingerprint_of(cert_der)
        if normalize_fingerprint(fingerprint) != self.expected_fingerprint:
            return AuthError(
                f"peer certificate {fingerprint} is not the expected {self.expected_fingerprint}",
                reason="fingerprint_mismatch",
            )
        try:
            uid = uid_of(cert_der)
        except IdentityError as exc:
            return AuthError(f"peer certificate: {exc}", reason="bad_peer_cert")
        if self.expected_uid is not None and uid != self.expected_uid:
            return AuthError(
                f"peer UID {uid.hex()} does not match its claim {self.expected_uid.hex()}",
                reason="uid_mismatch",
            )
        return None

    def _advance(self, now: float) -> list[bytes]:
        """Run OpenSSL as far as it goes; collect what it wants to send."""
        finished = False
        try:
            self._conn.do_handshake()
            finished = True
        except SSL.WantReadError:
            pass
        except SSL.Error as exc:
            out = self._drain()
            if self._verify_failure is not None:
                self._fail(self._verify_failure.reason, str(self._verify_failure))
            elif "alert" in str(exc):
                self._fail("peer_alert", f"peer aborted the handshake: {exc}")
            else:
                self._fail("handshake_error", f"handshake failed: {exc}")
            return out  # an alert for the peer, if OpenSSL wrote one
        out = self._drain()
        if out:
            self._last_flight = out
            self._last_sent_at = now
            self._rto = self._first_rto
            self._rtx_at = now + self._rto
        if finished:
            self._finish()
        return out

    def _renumber(self, datagrams: list[bytes]) -> list[bytes]:
        """Give every epoch-0 record a fresh sequence number of our own.

        Epoch-0 records are not authenticated, and a byte copy would be dropped by the peer's
        replay window; renumbered, a retransmitted copy counts as new.  Epoch-1 records (the
        Finished message) keep OpenSSL's numbers.
        """
        out = []
        for datagram in datagrams:
            buf = bytearray(datagram)
            for pos in _record_offsets(buf):
                if buf[pos + 3] == 0 and buf[pos + 4] == 0:
                    buf[pos + 5 : pos + 11] = self._seq0.to_bytes(6, "big")
                    self._seq0 += 1
            out.append(bytes(buf))
        return out

    def _drain(self) -> list[bytes]:
        blob = b""
        while True:
            try:
                chunk = self._conn.bio_read(65536)
            except SSL.Error:  # WantReadError: the BIO is empty
                break
            if not chunk:
                break
            blob += chunk
        return self._renumber(split_records(blob, self.mtu)) if blob else []

    def _finish(self) -> None:
        """Check the peer once more and export the keys."""
        self._rtx_at = None
        cert = self._conn.get_peer_certificate(as_cryptography=True)
        if cert is None:
            self._fail("bad_peer_cert", "peer sent no certificate")
            return
        cert_der = cert.public_bytes(serialization.Encoding.DER)
        problem = self._check_peer(cert_der)
        if problem is not None:
            self._fail(problem.reason, str(problem))
            return
        refusal = self._confirmation_problem()
        if refusal is not None:
            self._fail(refusal, f"security verdict not confirmed in the handshake: {refusal}")
            return
        try:
            km = self._conn.export_keying_material(EXPORTER_LABEL, EXPORT_LEN)
            epoch = self._conn.export_keying_material(EPOCH_LABEL, 1)[0]
        except SSL.Error as exc:
            self._fail("handshake_error", f"key export failed: {exc}")
            return
        cipher = self._conn.get_cipher_name() or ""
        suite = Suite.CHACHA20_POLY1305 if "CHACHA20" in cipher else Suite.AES_256_GCM
        c_key, s_key = km[:KEY_LEN], km[KEY_LEN : 2 * KEY_LEN]
        c_salt, s_salt = km[2 * KEY_LEN : 2 * KEY_LEN + SALT_LEN], km[2 * KEY_LEN + SALT_LEN :]
        if self.is_client:
            tx_key, tx_salt, rx_key, rx_salt = c_key, c_salt, s_key, s_salt
        else:
            tx_key, tx_salt, rx_key, rx_salt = s_key, s_salt, c_key, c_salt
        self._keys = KeyMaterial(
            tx_key=tx_key,
            tx_salt=tx_salt,
            rx_key=rx_key,
            rx_salt=rx_salt,
            suite=suite,
            epoch=epoch,
            peer_uid=uid_of(cert_der),
            peer_fingerprint=fingerprint_of(cert_der),
        )
        self.done = True
        if self.is_client:
            self._last_flight = []

    def _answer_retransmission(
        self, datagram: bytes | bytearray | memoryview, now: float
    ) -> list[bytes]:
        """A done server resends its final flight when the client repeats its last flight."""
        if (
            self.is_client
            or datagram[0] not in (CT_HANDSHAKE, CT_CHANGE_CIPHER_SPEC)
            or is_client_hello(datagram)
        ):
            self.ignored += 1
            return []
        return self._resend_on_repeat(now)

    def _resend_on_repeat(self, now: float) -> list[bytes]:
        if (
            not self._last_flight
            or self._repeat_resends >= MAX_REPEAT_RESENDS
            or now - self._last_sent_at < REPEAT_GAP
        ):
            return []
        self._repeat_resends += 1
        self._last_sent_at = now
        return self._renumber(self._last_flight)

    def _fail(self, reason: str, message: str) -> None:
        if self.failure is None:
            self.failure = AuthError(message, reason=reason)
        self._rtx_at = None


_contexts: dict[tuple[int, Suite], tuple[weakref.ref[Identity], SSL.Context]] = {}
_contexts_lock = threading.Lock()


def _verify_shared(
    conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    """The shared contexts' verify callback: hands the check to the connection's handshake."""
    ref = conn.get_app_data()
    handshake = ref() if isinstance(ref, weakref.ref) else None
    if not isinstance(handshake, DtlsHandshake):
        return False
    return handshake._verify(cert, depth)


def _select_alpn_shared(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    """The shared contexts' ALPN callback (server): hands the choice to the connection's
    handshake; a handshake that asks for no confirmation selects nothing."""
    ref = conn.get_app_data()
    handshake = ref() if isinstance(ref, weakref.ref) else None
    if not isinstance(handshake, DtlsHandshake) or handshake.confirmation is None:
        return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]
    return handshake._select_alpn(conn, offered)


def shared_context(identity: Identity, suite: Suite) -> SSL.Context:
    """One DTLS context per identity and suite, shared by every handshake (a rekey makes a
    connection, not a context: building a context per handshake cost tens of KB each time,
    which the allocator did not give back)."""
    key = (id(identity), suite)
    with _contexts_lock:
        found = _contexts.get(key)
        if found is not None and found[0]() is identity:
            return found[1]
        try:
            ctx = SSL.Context(SSL.DTLS_METHOD)
            ctx.set_min_proto_version(DTLS1_2_VERSION)
            ctx.set_max_proto_version(DTLS1_2_VERSION)
            ctx.use_certificate(identity.cert)
            ctx.use_privatekey(identity.key)
            ctx.check_privatekey()
            ctx.set_cipher_list(_CIPHERS[suite])
            ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET)
            ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _verify_shared)
            ctx.set_alpn_select_callback(_select_alpn_shared)  # clients offer per connection
        except SSL.Error as exc:
            raise IdentityError(f"cannot use this identity for DTLS: {exc}") from None
        for stale in [k for k, (ref, _) in _contexts.items() if ref() is None]:
            del _contexts[stale]
        while len(_contexts) >= CONTEXT_CACHE:
            del _contexts[next(iter(_contexts))]
        _contexts[key] = (weakref.ref(identity), ctx)
        return ctx
