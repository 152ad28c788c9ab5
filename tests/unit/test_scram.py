"""ipop.signal.scram: OpenSSL's PBKDF2 gives the bytes slixmpp's own SCRAM loop gives."""

from __future__ import annotations

import base64
import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st
from slixmpp.util.sasl import mechanisms

from ipop.signal import scram

_ORIGINAL_HI = mechanisms.SCRAM.Hi


class _Mech:
    """Just enough of slixmpp's SCRAM object for its Hi and HMAC methods."""

    def __init__(self, name: str) -> None:
        self.hash = getattr(hashlib, name)

    HMAC = mechanisms.SCRAM.HMAC


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["sha1", "sha256", "sha512"]), st.binary(max_size=40),
       st.binary(min_size=1, max_size=32), st.integers(min_value=1, max_value=64))
def test_same_bytes_as_slixmpp(name: str, password: bytes, salt: bytes, iterations: int) -> None:
    mech = _Mech(name)
    assert scram.salted_password(name, password, salt, iterations) == _ORIGINAL_HI(
        mech, password, salt, iterations)


def test_rfc7677_vector() -> None:
    # RFC 7677 section 3: user "user", password "pencil", SCRAM-SHA-256, 4096 iterations; the
    # ClientKey is HMAC(SaltedPassword, "Client Key"), whose SHA-256 is the StoredKey that
    # the proof uses.  Checked through the client proof of the RFC's exchange.
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    salted = scram.salted_password("sha256", b"pencil", salt, 4096)
    client_key = hashlib.new("sha256")
    import hmac

    ck = hmac.new(salted, b"Client Key", "sha256").digest()
    client_key.update(ck)
    auth = (b"n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
            b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)"
            b"hNlF$k0")
    sig = hmac.new(client_key.digest(), auth, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(ck, sig, strict=True))
    assert base64.b64encode(proof) == b"dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="


def test_install_swaps_the_loop_for_pbkdf2() -> None:
    scram.install()
    scram.install()  # idempotent
    mech = _Mech("sha1")
    assert mechanisms.SCRAM.Hi(mech, "pencil", b"salt", 4096) == hashlib.pbkdf2_hmac(
        "sha1", b"pencil", b"salt", 4096)
