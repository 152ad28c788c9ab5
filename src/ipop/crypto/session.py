"""One link's crypto session: keys from DTLS handshakes, sealing and opening data frames, rekeying.

The data plane holds one :class:`CryptoSession` per encrypted link.  It seals with the current
:class:`~ipop.crypto.aead.Sealer`, opens with the :class:`~ipop.crypto.aead.Opener` that the
frame's epoch byte names (the current one, or the previous one during a rekey), and runs DTLS
handshakes (``ipop.crypto.dtls``) to make keys.  There is no plaintext path: until the first
handshake completes, :meth:`CryptoSession.seal` raises and the data plane queues.

Roles.  The DTLS client is the end with the lower UID (:func:`is_client_for`).  It starts the
first handshake and every rekey; the server answers any new ClientHello while its old keys keep
working.

Epochs.  Each handshake's keys carry an epoch byte, exported from the handshake itself
(``dtls.EPOCH_LABEL``) and bumped by one if it equals the epoch in use, so both ends label the
same keys alike without counting handshakes (a count would drift apart after a handshake that
only one end completed).

Rekey, step by step (``rekey_seconds``, default 120, less a random 0-10 % drawn at each
install so that links do not rekey in waves; or ``rekey_packets`` sealed or received)::

    client                                         server
    tick(): rekey due -> ClientHello  ------>      new handshake; old keys still seal and open
                                      <------      ... handshake ...
                                                   done: new Opener added (old kept);
                                                         new Sealer *pending*
    done: new Opener added, old kept;
          new Sealer used at once     -- frame under new epoch -->
                                                   open() under the new epoch: pending Sealer
                                                   becomes current (or after confirm_seconds)
    first frame under the new epoch <-----------
    the previous Opener is dropped grace_seconds after the peer was first seen using the new
    keys (each side, at the next tick())

The server waits for that proof because the client is the one that may not have finished: if
the last flight was lost for good, the client retries with a new ClientHello, which discards the
pending Sealer.  (It waits only when its current keys were themselves proven; on the first
handshake, or after one the client never used, it switches at once.)  A failed client
handshake is retried after ``retry_seconds``, doubling up to ``max_retry_seconds``; the old
keys, if any, stay in use meanwhile.

Threads (the contract with the data plane):

- ``seal`` may be called from any thread (the data plane's poll thread, sending and echoing
  keepalives; the control thread's keepalives): the Sealer hands out counters atomically.
  ``open`` is called by the poll thread only (the replay window has a single consumer).
  Neither takes a lock per packet: ``seal`` reads ``self._sealer`` and ``open`` reads
  ``self._openers`` (a dict that is replaced, never changed) — single attribute reads of
  objects that are swapped whole.
- ``start``, ``handle_handshake_datagram``, ``tick``, ``rekey`` and ``stats`` run on the control
  thread and take ``self._lock``; so does the rare step in ``open`` that notices the peer using
  new keys (once per epoch).
- A Sealer swapped out while the poll thread is using it still seals correctly: the peer keeps the
  previous Opener for ``grace_seconds``.  Call ``tick`` at ``next_deadline()`` and at least every
  second or so, since the poll thread's observations are acted on there.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping

from ipop.crypto.aead import OVERHEAD, Opener, Sealer, Suite, choose_suite
from ipop.crypto.dtls import (
    DEFAULT_MTU,
    HANDSHAKE_TIMEOUT,
    INITIAL_RTO,
    RECORD_HEADER_LEN,
    DtlsHandshake,
    KeyMaterial,
    client_hello_random,
    is_client_hello,
    is_dtls,
)
from ipop.crypto.identity import Identity
from ipop.crypto.verdict import Confirmation
from ipop.errors import AuthError, LocalProtocolError

Buffer = bytes | bytearray | memoryview

REKEY_SECONDS = 120.0
REKEY_PACKETS = 2**48
GRACE_SECONDS = 10.0
CONFIRM_SECONDS = 15.0
"""A server uses its new Sealer after this long even without seeing the client use the keys."""
RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 30.0
NEW_HELLO_GAP = 0.5
"""A server replaces a handshake in progress by a new ClientHello at most this often."""
REKEY_JITTER = 0.1
"""Each rekey comes after ``rekey_seconds`` less up to this share of it, drawn anew each time,
so links keyed together do not rekey in waves."""
RX_REASONS = ("truncated", "unknown_epoch", "shard_mismatch", "replay", "bad_tag")


def is_client_for(local_uid: bytes, remote_uid: bytes) -> bool:
    """The end with the lower UID is the DTLS client (and starts every rekey)."""
    return local_uid < remote_uid


class CryptoSession:
    """Per-link keys and handshakes.  See the module docstring for roles, rekey and threads."""

    def __init__(
        self,
        identity: Identity,
        *,
        is_client: bool,
        expected_fingerprint: str,
        expected_uid: bytes | None = None,
        rekey_seconds: float = REKEY_SECONDS,
        rekey_packets: int = REKEY_PACKETS,
        rekey_jitter: float = REKEY_JITTER,
        grace_seconds: float = GRACE_SECONDS,
        confirm_seconds: float = CONFIRM_SECONDS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        retry_seconds: float = RETRY_SECONDS,
        max_retry_seconds: float = MAX_RETRY_SECONDS,
        suite: Suite | None = None,
        mtu: int = DEFAULT_MTU,
        confirmation: Confirmation | None = None,
        first_rto: float = INITIAL_RTO,
    ) -> None:
        if rekey_seconds <= 0 or not 0 < rekey_packets < 2**64 - 1:
            raise LocalProtocolError("rekey interval must be positive and below the counter limit")
        self.identity = identity
        self.is_client = is_client
        self.expected_fingerprint = expected_fingerprint
        self.expected_uid = expected_uid
        self.rekey_seconds = rekey_seconds
        self.rekey_packets = rekey_packets
        self.rekey_jitter = rekey_jitter
        self.grace_seconds = grace_seconds
        self.confirm_seconds = confirm_seconds
        self.handshake_timeout = handshake_timeout
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self.suite = suite if suite is not None else choose_suite()
        self.mtu = mtu
        self.first_rto = first_rto
        """Each handshake's first retransmission timer (``ipop.crypto.dtls.initial_rto``)."""
        self.confirmation = confirmation
        """The verdict every handshake of this session confirms (``ipop.crypto.verdict``)."""

        self._lock = threading.Lock()
        # Read by the hot paths without the lock; replaced whole under it.
        self._sealer: Sealer | None = None
        self._openers: Mapping[int, Opener] = {}
        self._unconfirmed: Opener | None = None  # newest Opener, until the peer is seen using it
        # Control-thread state (under the lock).
        self._started = False
        self._handshake: DtlsHandshake | None = None
        self._handshake_started = 0.0
        self._finished: DtlsHandshake | None = None
        self._current: Opener | None = None
        self._previous: Opener | None = None
        self._pending: Sealer | None = None
        self._pending_until = 0.0
        self._confirmed = False  # set by open() when the peer uses the newest keys
        self._retire_at: float | None = None
        self._keyed_at: float | None = None
        self._rekey_after = rekey_seconds  # this key's lifetime: jittered at each install
        self._retry_at: float | None = None
        self._retry_delay = retry_seconds
        self._keys: KeyMaterial | None = None
        self.handshakes = 0
        """Handshakes completed (the first one, then one per rekey)."""
        self.last_failure: AuthError | None = None
        self.handshake_failures: dict[str, int] = {}
        self.handshake_drops: dict[str, int] = {}
        # Written by the poll thread only; fixed keys, so readers never see the dict resize.
        self.rx_drops: dict[str, int] = dict.fromkeys(RX_REASONS, 0)

    # -- hot path ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Keys are in place: ``seal`` works."""
        return self._sealer is not None

    @property
    def handshaking(self) -> bool:
        """A handshake is under way (first keys, a rekey, or the client retrying)."""
        return self._handshake is not None or self._retry_at is not None

    @property
    def awaiting_keys(self) -> bool:
        """A handshake is under way, or none finished yet: a frame under an epoch we do not
        know may be sealed with keys this end is about to install (any thread)."""
        return self._handshake is not None or self._sealer is None

    def seal(self, aad: Buffer, plaintext: Buffer) -> bytes:
        """Seal one payload under the current keys (any thread).  Raises if not ready."""
        sealer = self._sealer
        if sealer is None:
            raise LocalProtocolError("link has no keys yet", reason="not_ready")
        return sealer.seal(aad, plaintext)

    def seal_into(self, aad: Buffer, plaintext: Buffer, out: bytearray) -> memoryview:
        """:meth:`seal` into a buffer the caller reuses (one thread per buffer)."""
        sealer = self._sealer
        if sealer is None:
            raise LocalProtocolError("link has no keys yet", reason="not_ready")
        return sealer.seal_into(aad, plaintext, out)

    def open(
        self, aad: bytes | bytearray | memoryview, sealed: bytes | bytearray | memoryview,
        out: bytearray | memoryview | None = None,
    ) -> bytes | memoryview:
        """Open one sealed payload (poll thread), into ``out`` if given (see ``Opener.open``);
        raises :class:`AuthError` and counts why."""
        if len(sealed) < OVERHEAD:
            self.rx_drops["truncated"] += 1
            raise AuthError(f"sealed payload of {len(sealed)} bytes", reason="truncated")
        opener = self._openers.get(sealed[0])
        if opener is None:
            self.rx_drops["unknown_epoch"] += 1
            raise AuthError(f"no keys for epoch {sealed[0]}", reason="unknown_epoch")
        try:
            plaintext = opener.open(aad, sealed, out)
        except AuthError as exc:
            self.rx_drops[exc.reason] += 1
            raise
        if opener is self._unconfirmed:
            self._peer_uses(opener)
        return plaintext

    # -- control thread ----------------------------------------------------------------------------

    def start(self, now: float) -> list[bytes]:
        """Begin: the client sends its first ClientHello; the server just waits for one."""
        with self._lock:
            if self._started:
                return []
            self._started = True
            return self._begin(now) if self.is_client else []

    def rekey(self, now: float) -> list[bytes]:
        """Start a rekey at once (client only; a server returns nothing)."""
        with self._lock:
            self._started = True
            if not self.is_client or self._handshake is not None:
                return []
            return self._begin(now)

    def handle_handshake_datagram(
        self, datagram: bytes | bytearray | memoryview, now: float
    ) -> list[bytes]:
        """A DTLS datagram (first byte 20..63) from the peer; returns datagrams to send back."""
        with self._lock:
            if len(datagram) < RECORD_HEADER_LEN or not is_dtls(datagram[0]):
                self._drop("not_dtls")
                return []
            if is_client_hello(datagram):
                return self._client_hello(datagram, now)
            handshake = self._handshake or self._finished
            if handshake is None:
                self._drop("no_handshake")
                return []
            return self._feed(handshake, datagram, now)

    def tick(self, now: float) -> list[bytes]:
        """Retransmit, time out, retire old keys, start a due rekey; returns datagrams to send."""
        with self._lock:
            out: list[bytes] = []
            handshake = self._handshake
            if handshake is not None:
                deadline = handshake.next_deadline()
                if deadline is not None and now >= deadline:
                    out += handshake.on_timeout(now)
                    self._settle(handshake, now)
            if self._pending is not None and now >= self._pending_until:
                self._sealer, self._pending = self._pending, None
            if self._confirmed:
                self._confirmed = False
                if self._previous is not None:
                    self._retire_at = now + self.grace_seconds
            if self._retire_at is not None and now >= self._retire_at:
                self._retire_previous()
            if self.is_client and self._started and self._handshake is None:
                if self._retry_at is not None:
                    if now >= self._retry_at:
                        out += self._begin(now)
                elif self._rekey_due(now):
                    out += self._begin(now)
            return out

    def next_deadline(self) -> float | None:
        """The next time ``tick`` has timed work to do (None: nothing scheduled)."""
        with self._lock:
            times = [self._retire_at, self._retry_at]
            if self._handshake is not None:
                times.append(self._handshake.next_deadline())
            if self._pending is not None:
                times.append(self._pending_until)
            if self.is_client and self._handshake is None and self._keyed_at is not None:
                times.append(self._keyed_at + self._rekey_after)
            present = [t for t in times if t is not None]
            return min(present) if present else None

    @property
    def epoch(self) -> int | None:
        """The epoch of the newest keys (None before the first handshake)."""
        current = self._current
        return current.epoch if current is not None else None

    @property
    def keys(self) -> KeyMaterial | None:
        """What the newest handshake proved and exported (peer UID, fingerprint, suite)."""
        return self._keys

    @property
    def failures(self) -> dict[str, int]:
        """Every failure and drop so far, by reason (handshakes and frames together)."""
        merged = {k: v for k, v in self.rx_drops.items() if v}
        for source in (self.handshake_failures, self.handshake_drops):
            for reason, count in source.items():
                merged[reason] = merged.get(reason, 0) + count
        return merged

    def stats(self) -> dict[str, object]:
        """A snapshot for status output."""
        with self._lock:
            sealer = self._sealer
            if self._handshake is not None:
                state = "rekeying" if sealer is not None else "keying"
            else:
                state = "ready" if sealer is not None else "idle"
            return {
                "state": state,
                "epoch": self.epoch,
                "suite": self._keys.suite.value if self._keys is not None else None,
                "handshakes": self.handshakes,
                "keyed_at": self._keyed_at,
                "tx_counter": sealer.counter if sealer is not None else None,
                "failures": self.failures,
                "last_failure": str(self.last_failure) if self.last_failure else None,
            }

    # -- internals (called with the lock held) --------------------------------------------------

    def _begin(self, now: float) -> list[bytes]:
        self._retry_at = None
        handshake = self._new_handshake()
        self._handshake = handshake
        self._handshake_started = now
        out = handshake.start(now)
        self._settle(handshake, now)
        return out

    def _new_handshake(self) -> DtlsHandshake:
        return DtlsHandshake(
            self.identity,
            self.is_client,
            self.expected_fingerprint,
            expected_uid=self.expected_uid,
            suite=self.suite,
            mtu=self.mtu,
            timeout=self.handshake_timeout,
            confirmation=self.confirmation,
            first_rto=self.first_rto,
        )

    def _client_hello(self, datagram: bytes | bytearray | memoryview, now: float) -> list[bytes]:
        if self.is_client:
            self._drop("unexpected_client_hello")
            return []
        random = client_hello_random(datagram)
        current = self._handshake
        if current is not None and (random is None or random == current.client_random):
            return self._feed(current, datagram, now)
        finished = self._finished
        if finished is not None and random is not None and random == finished.client_random:
            self._drop("stale_client_hello")
            return []
        if current is not None and now - self._handshake_started < NEW_HELLO_GAP:
            self._drop("client_hello_rate")
            return []
        # A new handshake: initial keying, a rekey, or the client retrying after a failure.
        self._pending = None
        self._started = True
        self._handshake = self._new_handshake()
        self._handshake_started = now
        self._handshake.start(now)
        return self._feed(self._handshake, datagram, now)

    def _feed(
        self, handshake: DtlsHandshake, datagram: bytes | bytearray | memoryview, now: float
    ) -> list[bytes]:
        out = handshake.receive(datagram, now)
        self._settle(handshake, now)
        return out

    def _settle(self, handshake: DtlsHandshake, now: float) -> None:
        """Act on a handshake in progress that just completed or failed."""
        if handshake is not self._handshake:
            return
        if handshake.done:
            self._handshake = None
            self._finished = handshake
            self._install(handshake.keys(), now)
        elif handshake.failure is not None:
            self._handshake = None
            self.last_failure = handshake.failure
            reason = handshake.failure.reason
            self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1
            if self.is_client:
                self._retry_at = now + self._retry_delay
                self._retry_delay = min(self._retry_delay * 2, self.max_retry_seconds)

    def _install(self, keys: KeyMaterial, now: float) -> None:
        """New keys: the new Opener at once; the new Sealer at once or pending (see above)."""
        epoch = keys.epoch
        if self._current is not None and epoch == self._current.epoch:
            epoch = (epoch + 1) & 0xFF
        sealer = Sealer(keys.tx_key, keys.tx_salt, epoch, keys.suite)
        opener = Opener(keys.rx_key, keys.rx_salt, epoch, keys.suite)
        # Were the keys in use proven to be the peer's too?  If not (a client that never
        # finished the last handshake), waiting for proof before switching gains nothing.
        old_proven = self._current is not None and self._unconfirmed is None
        self._previous, self._current = self._current, opener
        openers = {epoch: opener}
        if self._previous is not None:
            openers[self._previous.epoch] = self._previous
        self._openers = openers
        self._unconfirmed = opener
        self._confirmed = False
        self._retire_at = None
        if self.is_client or self._sealer is None or not old_proven:
            self._sealer, self._pending = sealer, None
        else:
            self._pending, self._pending_until = sealer, now + self.confirm_seconds
        self._keys = keys
        self._keyed_at = now
        self._rekey_after = self.rekey_seconds * (1.0 - self.rekey_jitter * random.random())
        self._retry_at = None
        self._retry_delay = self.retry_seconds
        self.handshakes += 1

    def _retire_previous(self) -> None:
        self._retire_at = None
        if self._previous is None or self._current is None:
            return
        self._previous = None
        self._openers = {self._current.epoch: self._current}

    def _rekey_due(self, now: float) -> bool:
        if self._keyed_at is None:
            return True  # never keyed and not retrying: (re)start
        if now - self._keyed_at >= self._rekey_after:
            return True
        sealer, current = self._sealer, self._current
        if sealer is not None and sealer.counter >= self.rekey_packets:
            return True
        highest = current.window.highest if current is not None else None
        return highest is not None and highest + 1 >= self.rekey_packets

    def _peer_uses(self, opener: Opener) -> None:
        """Poll thread: the peer sealed with the newest keys; promote a pending Sealer."""
        with self._lock:
            if opener is not self._unconfirmed:
                return
            self._unconfirmed = None
            self._confirmed = True
            pending = self._pending
            if pending is not None and pending.epoch == opener.epoch:
                self._sealer, self._pending = pending, None

    def _drop(self, reason: str) -> None:
        self.handshake_drops[reason] = self.handshake_drops.get(reason, 0) + 1
