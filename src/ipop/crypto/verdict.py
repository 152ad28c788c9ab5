"""The security verdict, confirmed inside the DTLS handshake (ALPN): signaling cannot downgrade it.

Signaling (XMPP) carries each end's verdict inputs: its ``security_groups``, its ``sec`` and
whether it insists on encryption.  Whoever can rewrite signaling (a man in the middle on plaintext
XMPP, a malicious server) could change them and turn an encrypted link plain.  So every link runs
the DTLS handshake, plain links included, and each end puts into it what it believes:

    digest = SHA-256("ipop-verdict-v1" || client UID || server UID
                     || view(client, as the client signaled it)
                     || view(server, as the server signaled it))
    offer  = "ipop1/" || hex(digest) || "/" || ("e" | "p")        (the verdict: encrypt or plain)

Each end knows its own view as it signaled it (it built that message) and the peer's as it
received it.  Without tampering the two ends compute the same digest; a rewrite on either
message makes them differ.  The client offers, as ALPN protocols, that string and two refusals
(``ipop1/refuse/downgrade_detected``, ``ipop1/refuse/verdict_mismatch``); the server selects the
string when digest and verdict match its own, else the refusal that says why.  ALPN is part of
the handshake transcript that both Finished messages authenticate, so nobody on the path can
change the choice, and both ends learn the same outcome: the link is refused on both sides with
the same reason, and neither end sends data first.

A view's encoding (``encode_view``), canonical so both ends hash the same bytes::

    absent (a static peer, no signaling):  0x00
    present:  0x01 | sec (0/1) | require_encryption (0/1) | groups
    groups:   0xFF when no list was sent, else a count byte, then each group (sorted) as
              a length byte and its UTF-8 bytes (at most 255 groups of at most 255 bytes)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ipop.crypto.policy import SecurityView

PREFIX = b"ipop1/"
REFUSE_DOWNGRADE = b"ipop1/refuse/downgrade_detected"
REFUSE_MISMATCH = b"ipop1/refuse/verdict_mismatch"
REFUSALS = {REFUSE_DOWNGRADE: "downgrade_detected", REFUSE_MISMATCH: "verdict_mismatch"}
DOMAIN = b"ipop-verdict-v1"
DIGEST_HEX = 64


def encode_view(view: SecurityView | None) -> bytes:
    """The canonical bytes of one end's verdict inputs (see the module docstring)."""
    if view is None:
        return b"\x00"
    out = bytearray(b"\x01")
    out.append(1 if view.sec else 0)
    out.append(1 if view.require_encryption else 0)
    groups = view.security_groups
    if groups is None:
        out.append(0xFF)
        return bytes(out)
    names = sorted(g.encode() for g in groups)
    if len(names) > 254 or any(len(n) > 255 for n in names):
        raise ValueError("too many or too long security groups to confirm")
    out.append(len(names))
    for name in names:
        out.append(len(name))
        out += name
    return bytes(out)


@dataclass(frozen=True)
class Confirmation:
    """What one end confirms in a link's handshake: both ends' inputs (each as that end signaled
    it, by DTLS role) and the verdict it reached."""

    client_uid: bytes
    server_uid: bytes
    client_view: SecurityView | None
    server_view: SecurityView | None
    encrypt: bool

    def digest(self) -> bytes:
        h = hashlib.sha256(DOMAIN)
        for part in (self.client_uid, self.server_uid):
            h.update(len(part).to_bytes(1, "big") + part)
        h.update(encode_view(self.client_view))
        h.update(encode_view(self.server_view))
        return h.digest()

    def protocol(self) -> bytes:
        """The ALPN string that stands for these inputs and this verdict."""
        return PREFIX + self.digest().hex().encode() + (b"/e" if self.encrypt else b"/p")

    def offer(self) -> list[bytes]:
        """The client's ALPN list: the confirmation first, then the two refusals."""
        return [self.protocol(), REFUSE_DOWNGRADE, REFUSE_MISMATCH]

    def select(self, offered: list[bytes]) -> tuple[bytes | None, str | None]:
        """The server's choice among the client's ``offered`` protocols, and the reason this end
        refuses (None: confirmed).  None as the protocol: nothing selectable (no refusal was
        offered either), the handshake then aborts."""
        mine = self.protocol()
        if mine in offered:
            return mine, None
        theirs = next((p for p in offered if p.startswith(PREFIX) and p not in REFUSALS), None)
        same_inputs = theirs is not None and theirs[: -2] == mine[: -2]
        reason = "verdict_mismatch" if same_inputs else "downgrade_detected"
        refusal = REFUSE_MISMATCH if same_inputs else REFUSE_DOWNGRADE
        return (refusal if refusal in offered else None), reason

    def check_selected(self, selected: bytes | None) -> str | None:
        """The client's check of what the server selected: None when confirmed, else why not."""
        if selected == self.protocol():
            return None
        if selected in REFUSALS:
            return REFUSALS[selected]
        return "downgrade_detected"
