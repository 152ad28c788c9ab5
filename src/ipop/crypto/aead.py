"""AEAD framing of one sealed payload: seal with an explicit counter, open with a replay check.

A sealed payload follows the 41-byte overlay header (``ipop.wire.header``), which is the AAD::

     0        1                                  9
    +--------+----------------------------------+-----------------------------+------------+
    | epoch  |  counter (8 bytes, big endian)   |  ciphertext (len(plaintext))|  tag (16)  |
    +--------+----------------------------------+-----------------------------+------------+
    |<--------------- SEALED_HEADER_LEN = 9 --->|                             |<- TAG_LEN->|
    |<------------------------ OVERHEAD = 25 bytes besides the ciphertext ---------------->|

    nonce (12 bytes) = salt (4 bytes, per direction, from the key export) || counter (8 bytes)
    AAD              = the caller's bytes (the overlay header: type, source UID, dest UID)

The epoch byte names the key generation (one per DTLS handshake, see ``ipop.crypto.session``), so
a receiver can hold the old and the new keys during a rekey.  The counter is part of the nonce,
the key is chosen by the epoch, and the AAD binds the header: a change to any byte fails.

Suites: AES-256-GCM (default) and ChaCha20-Poly1305, picked by :func:`choose_suite` on CPUs
without AES instructions.  One cipher object is built per key and reused for every packet.

Shards (``workers``, ``ipop.dataplane.shards``).  Every shard of a node seals with the same link
keys, so their nonces must never meet: the top byte of the 8-byte counter is the sending shard's
number (shard ``s`` counts from ``s << 56`` to ``(s + 1) << 56 - 1``), and the same number is in
the frame's type byte (``ipop.wire.header.shard_of``), which is the first byte of the AAD.  An
:class:`Opener` refuses a payload whose counter's top byte is not the AAD's shard number
(``shard_mismatch``) and keeps one replay window per sending shard: a receiver that runs fewer
shards than its peer gets several senders' counter ranges on one Opener, and one window over
all of them would call the lower range "too old".  With one worker everything is shard 0: the
counter runs from 0, and the frames are the bytes they were before shards.

Threads: a :class:`Sealer` may be shared by several sending threads (the data plane's poll
thread, which sends data and echoes keepalives; the control thread's keepalives): each payload's
counter comes from ``next()`` on an ``itertools.count``, which is atomic under the GIL, so no two
payloads ever share a nonce, and no lock is taken.  An :class:`Opener` belongs to one receiving
thread (its replay window has a single consumer).
"""

from __future__ import annotations

import enum
import itertools
import struct
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ipop.crypto.replay import COUNTER_LIMIT, ReplayWindow
from ipop.errors import AuthError, LocalProtocolError
from ipop.wire.header import SHARD_BITS, SHARD_SHIFT

Buffer = bytes | bytearray | memoryview

EPOCH_OFF = 0
EPOCH_LEN = 1
COUNTER_OFF = EPOCH_OFF + EPOCH_LEN  # 1
COUNTER_LEN = 8
CIPHERTEXT_OFF = COUNTER_OFF + COUNTER_LEN  # 9
SEALED_HEADER_LEN = CIPHERTEXT_OFF  # 9
TAG_LEN = 16
OVERHEAD = SEALED_HEADER_LEN + TAG_LEN  # 25
KEY_LEN = 32
SALT_LEN = 4
NONCE_LEN = SALT_LEN + COUNTER_LEN  # 12

_PREFIX = struct.Struct("!BQ")  # epoch, counter
SHARD_COUNTER_SHIFT = 56  # the counter's top byte: the sending shard


def counter_range(shard: int) -> tuple[int, int]:
    """The counters shard ``shard`` seals with: ``range(*counter_range(shard))``."""
    if not 0 <= shard <= 7:
        raise LocalProtocolError(f"shard {shard} is not in 0..7")
    first = shard << SHARD_COUNTER_SHIFT
    return first, min((shard + 1) << SHARD_COUNTER_SHIFT, COUNTER_LIMIT)


class Suite(enum.Enum):
    """The AEAD that seals data frames."""

    AES_256_GCM = "aes-256-gcm"
    CHACHA20_POLY1305 = "chacha20-poly1305"


DEFAULT_SUITE = Suite.AES_256_GCM


def choose_suite(cpuinfo: Path = Path("/proc/cpuinfo")) -> Suite:
    """AES-256-GCM if the CPU has AES instructions (or we cannot tell), else ChaCha20-Poly1305."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return DEFAULT_SUITE
    saw_flags = False
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if not sep or name.strip().lower() not in ("flags", "features"):
            continue
        saw_flags = True
        if "aes" in value.split():
            return Suite.AES_256_GCM
    return Suite.CHACHA20_POLY1305 if saw_flags else DEFAULT_SUITE


def _cipher(suite: Suite, key: bytes) -> AESGCM | ChaCha20Poly1305:
    if len(key) != KEY_LEN:
        raise LocalProtocolError(f"AEAD key must be {KEY_LEN} bytes, not {len(key)}")
    if suite is Suite.AES_256_GCM:
        return AESGCM(key)
    return ChaCha20Poly1305(key)


def _check_params(salt: bytes, epoch: int) -> None:
    if len(salt) != SALT_LEN:
        raise LocalProtocolError(f"salt must be {SALT_LEN} bytes, not {len(salt)}")
    if not 0 <= epoch <= 255:
        raise LocalProtocolError(f"epoch must fit one byte, not {epoch}")


def peek_epoch(sealed: bytes | bytearray | memoryview) -> int:
    """The epoch byte of a sealed payload (which keys to open it with)."""
    if len(sealed) < OVERHEAD:
        raise AuthError(f"sealed payload of {len(sealed)} bytes is truncated", reason="truncated")
    return sealed[EPOCH_OFF]


class Sealer:
    """Seals payloads under one key, numbering them 0, 1, 2, ... (safe from several threads);
    shard ``s`` numbers them from ``s << 56`` (see the module docstring)."""

    __slots__ = ("_aead", "_base", "_counts", "_issued", "_limit", "_salt", "epoch", "key",
                 "salt", "shard", "suite")

    def __init__(
        self,
        key: bytes,
        salt: bytes,
        epoch: int,
        suite: Suite = DEFAULT_SUITE,
        *,
        first_counter: int = 0,
        shard: int = 0,
    ) -> None:
        _check_params(salt, epoch)
        self._aead = _cipher(suite, key)
        self._salt = bytes(salt)
        self._base, self._limit = counter_range(shard)
        self._counts = itertools.count(self._base + first_counter)
        self._issued = self._base + first_counter
        self.epoch = epoch
        self.suite = suite
        self.shard = shard
        self.key = bytes(key)  # what a shard of this node gets to seal with (``shards``)
        self.salt = self._salt

    @property
    def counter(self) -> int:
        """The counter the next payload gets (= payloads sealed so far, from a fresh key).

        Exact with one sending thread; with several it may lag by a payload or two, which is
        fine for deciding when to rekey.  Counted from the shard's first counter.
        """
        return self._issued - self._base

    def seal(self, aad: Buffer, plaintext: Buffer) -> bytes:
        """``epoch | counter | ciphertext || tag`` for ``plaintext``, authenticating ``aad``."""
        counter = next(self._counts)  # atomic: each counter is handed out once
        if counter >= self._limit:
            raise LocalProtocolError("AEAD counter exhausted: rekey", reason="counter_exhausted")
        self._issued = counter + 1
        prefix = _PREFIX.pack(self.epoch, counter)
        return prefix + self._aead.encrypt(self._salt + prefix[COUNTER_OFF:], plaintext, aad)

    def seal_into(self, aad: Buffer, plaintext: Buffer, out: bytearray) -> memoryview:
        """:meth:`seal` written into ``out`` (``len(plaintext) + OVERHEAD`` bytes at least,
        reused by the caller): a view of the sealed bytes, without a copy of the ciphertext."""
        size = len(plaintext) + OVERHEAD
        if len(out) < size:
            raise LocalProtocolError("seal buffer too small", reason="buffer_too_small")
        counter = next(self._counts)
        if counter >= self._limit:
            raise LocalProtocolError("AEAD counter exhausted: rekey", reason="counter_exhausted")
        self._issued = counter + 1
        view = memoryview(out)[:size]
        _PREFIX.pack_into(view, 0, self.epoch, counter)
        nonce = self._salt + bytes(view[COUNTER_OFF:CIPHERTEXT_OFF])
        encrypt_into = getattr(self._aead, "encrypt_into", None)
        if encrypt_into is None:  # cryptography before encrypt_into: one copy more
            view[CIPHERTEXT_OFF:] = self._aead.encrypt(nonce, plaintext, aad)
        else:
            encrypt_into(nonce, plaintext, aad, view[CIPHERTEXT_OFF:])
        return view


class Opener:
    """Opens payloads sealed under one key, rejecting forgeries and replays (one receiving
    thread)."""

    __slots__ = ("_aead", "_salt", "accepted", "epoch", "key", "salt", "suite", "window",
                 "windows")

    def __init__(self, key: bytes, salt: bytes, epoch: int, suite: Suite = DEFAULT_SUITE) -> None:
        _check_params(salt, epoch)
        self._aead = _cipher(suite, key)
        self._salt = bytes(salt)
        self.epoch = epoch
        self.suite = suite
        self.key = bytes(key)
        self.salt = self._salt
        self.window = ReplayWindow()
        """Sending shard 0's window (the only one with one worker at each end)."""
        self.windows: dict[int, ReplayWindow] = {0: self.window}
        """One window per sending shard (the counter's top byte), made on first use."""
        self.accepted = 0
        """Payloads opened successfully (written by the receiving thread only)."""

    def open(
        self, aad: bytes | bytearray | memoryview, sealed: bytes | bytearray | memoryview,
        out: bytearray | memoryview | None = None,
    ) -> bytes | memoryview:
        """The plaintext of ``sealed``; raises :class:`AuthError` if it is not authentic or fresh.

        Reasons: ``truncated``, ``unknown_epoch``, ``shard_mismatch`` (the counter's top byte
        is not the shard the AAD's type byte names), ``replay``, ``bad_tag``.  The replay window
        moves only after the tag verified.  With ``out`` (at least ``len(sealed) - OVERHEAD``
        bytes, writable) the plaintext is written there and a view of it returned, without an
        allocation; on failure ``out`` holds garbage, never to be used.
        """
        if len(sealed) < OVERHEAD:
            raise AuthError(
                f"sealed payload of {len(sealed)} bytes is truncated", reason="truncated"
            )
        if sealed[EPOCH_OFF] != self.epoch:
            raise AuthError(
                f"epoch {sealed[EPOCH_OFF]} is not {self.epoch}", reason="unknown_epoch"
            )
        counter_bytes = bytes(sealed[COUNTER_OFF:CIPHERTEXT_OFF])
        counter = int.from_bytes(counter_bytes, "big")
        shard = counter_bytes[0]
        if shard:
            if not aad or shard != (aad[0] & SHARD_BITS) >> SHARD_SHIFT:
                raise AuthError(f"counter of shard {shard} under another shard's type byte",
                                reason="shard_mismatch")
            window = self.windows.get(shard) or self.windows.setdefault(shard, ReplayWindow())
        else:
            if aad and aad[0] & SHARD_BITS:
                raise AuthError("counter of shard 0 under another shard's type byte",
                                reason="shard_mismatch")
            window = self.window
        if not window.check(counter):
            raise AuthError(f"counter {counter} replayed or too old", reason="replay")
        nonce = self._salt + counter_bytes
        body = memoryview(sealed)[CIPHERTEXT_OFF:]
        decrypt_into = getattr(self._aead, "decrypt_into", None)
        try:
            if out is not None and decrypt_into is not None:
                plaintext: bytes | memoryview = memoryview(out)[: len(body) - TAG_LEN]
                decrypt_into(nonce, body, aad, plaintext)
            else:
                plaintext = self._aead.decrypt(nonce, body, aad)
        except InvalidTag:
            raise AuthError("AEAD tag does not verify", reason="bad_tag") from None
        window.update(counter)
        self.accepted += 1
        return plaintext
