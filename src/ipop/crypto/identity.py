"""A node's identity: key pair, self-signed certificate, and the UID and fingerprint they give.

The UID is the first 20 bytes of SHA-256 over the DER SubjectPublicKeyInfo; the fingerprint is
SHA-256 over the certificate's DER, written as RFC 4572 does (``sha-256 AB:CD:...``).  Both live
in ``state_dir`` (``node.key`` mode 0600, ``node.crt``).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ipop.errors import IdentityError
from ipop.statedir import check_secret_file

UID_LEN = 20
KEY_FILE = "node.key"
CERT_FILE = "node.crt"


def uid_of_public_key(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The 20-byte UID of a public key."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()[:UID_LEN]


def uid_of(cert_der: bytes) -> bytes:
    """The 20-byte UID that a DER certificate's public key gives."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        key = cert.public_key()
    except ValueError as exc:
        raise IdentityError(f"not a certificate: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise IdentityError("certificate key is not an EC key")
    return uid_of_public_key(key)


def fingerprint_of(cert_der: bytes) -> str:
    """RFC 4572 fingerprint of a DER certificate: ``sha-256 AB:CD:...``."""
    digest = hashlib.sha256(cert_der).digest()
    return "sha-256 " + ":".join(f"{b:02X}" for b in digest)


@dataclass(frozen=True)
class Identity:
    """A key pair with its self-signed certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def uid(self) -> bytes:
        return uid_of_public_key(self.key.public_key())

    @property
    def uid_hex(self) -> str:
        return self.uid.hex()

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.cert_der)

    @classmethod
    def generate(cls, common_name: str = "ipop-node") -> Identity:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)


def load_or_create(state_dir: Path) -> Identity:
    """Load the identity in ``state_dir``, creating it (mode 0600) on first start.  Files owned
    by another user or open to others are refused (``ipop.statedir``: ConfigError)."""
    key_path, cert_path = state_dir / KEY_FILE, state_dir / CERT_FILE
    if key_path.exists() and cert_path.exists():
        check_secret_file(key_path)
        check_secret_file(cert_path)
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (ValueError, OSError) as exc:
            raise IdentityError(f"cannot read identity in {state_dir}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise IdentityError(f"{key_path} is not an EC private key")
        cert_key = cert.public_key()
        if not isinstance(cert_key, ec.EllipticCurvePublicKey) or uid_of_public_key(
            cert_key
        ) != uid_of_public_key(key.public_key()):
            raise IdentityError(f"{cert_path} does not match {key_path}")
        return Identity(key, cert)
    if key_path.exists() != cert_path.exists():
        raise IdentityError(f"{state_dir} holds only one of {KEY_FILE} and {CERT_FILE}")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ident = Identity.generate()
    pem_key = ident.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem_key)
    fd = os.open(cert_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(ident.cert.public_bytes(serialization.Encoding.PEM))
    return ident
