"""What ICE exchanges and yields: TURN settings, a side's ICE parameters on the wire, the chosen
path.  Pure: no sockets are opened and aioice is not imported here.

On the wire (the ``candidates`` field of a con_req/con_resp, a list of ASCII strings)::

    ["ice:UFRAG:PWD",                                     credentials, exactly one
     "candidate:FOUNDATION 1 udp PRIORITY IP PORT typ host|srflx|relay [raddr IP rport PORT]",
     ...]

Entries of other forms (for instance ``"host IP:PORT"`` for static peers) are left to their own
readers and ignored here.  ``IceParams.from_wire`` raises only ``MalformedMessage``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ipop.errors import LocalProtocolError, MalformedMessage

__all__ = [
    "CANDIDATE_CAPS",
    "CANDIDATE_PREFIX",
    "CREDENTIALS_PREFIX",
    "MAX_WIRE_CANDIDATES",
    "CandidateInfo",
    "IceParams",
    "SelectedPath",
    "TurnConf",
    "cap_candidates",
    "parse_candidate",
]

CREDENTIALS_PREFIX: Final = "ice:"
CANDIDATE_PREFIX: Final = "candidate:"
MAX_WIRE_CANDIDATES: Final = 31  # plus the credentials: the signaling message's limit of 32
MAX_ENTRY_LEN: Final = 256
CANDIDATE_TYPES: Final = frozenset({"host", "srflx", "relay"})
_UFRAG_RE = re.compile(r"^[A-Za-z0-9+/]{4,256}$")
_PWD_RE = re.compile(r"^[A-Za-z0-9+/]{22,256}$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9+/]{1,32}$")


@dataclass(frozen=True)
class TurnConf:
    """One TURN server (UDP, long-term credentials)."""

    server: tuple[str, int]
    """Host (name or IP) and port of the server."""
    user: str
    password: str


@dataclass(frozen=True)
class CandidateInfo:
    """The fields of one candidate SDP string that ipop looks at."""

    foundation: str
    component: int
    priority: int
    host: str
    port: int
    type: str
    related: tuple[str, int] | None = None


def parse_candidate(sdp: str) -> CandidateInfo:
    """Check one candidate attribute value (without the ``candidate:`` prefix); raises only
    MalformedMessage.  Only UDP candidates of component 1 with an IP literal are accepted (no
    mDNS names: resolving them would open a multicast socket)."""
    bits = sdp.split()
    if len(bits) < 8 or bits[6] != "typ":
        raise MalformedMessage(f"candidate {sdp!r}: too few fields", reason="bad_candidate")
    foundation, component, transport, priority, host, port, _, ctype = bits[:8]
    if not _TOKEN_RE.match(foundation):
        raise MalformedMessage(f"candidate foundation {foundation!r}", reason="bad_candidate")
    if component != "1" or transport.lower() != "udp":
        raise MalformedMessage(f"candidate {sdp!r}: not UDP component 1", reason="bad_candidate")
    if ctype not in CANDIDATE_TYPES:
        raise MalformedMessage(f"candidate type {ctype!r}", reason="bad_candidate")
    addr = _ip(host)
    prio = _int(priority, 1, 0xFFFF_FFFF)
    portno = _int(port, 1, 0xFFFF)
    related: tuple[str, int] | None = None
    rest = bits[8:]
    if len(rest) % 2:
        raise MalformedMessage(f"candidate {sdp!r}: odd trailing fields", reason="bad_candidate")
    extras = dict(zip(rest[::2], rest[1::2], strict=True))
    if "raddr" in extras and "rport" in extras:
        related = (_ip(extras["raddr"]), _int(extras["rport"], 0, 0xFFFF))
    if "generation" in extras:
        _int(extras["generation"], 0, 0xFFFF_FFFF)
    return CandidateInfo(foundation, 1, prio, addr, portno, ctype, related)


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        msg = f"not an IP address: {text[:64]!r}"
        raise MalformedMessage(msg, reason="bad_candidate") from None


def _int(text: str, low: int, high: int) -> int:
    if not text.isdigit() or len(text) > 10:
        raise MalformedMessage(f"not a number: {text[:16]!r}", reason="bad_candidate")
    value = int(text)
    if not low <= value <= high:
        raise MalformedMessage(f"{value} outside {low}..{high}", reason="bad_candidate")
    return value


@dataclass(frozen=True)
class IceParams:
    """One side's ICE credentials and candidates (SDP strings, without ``candidate:``)."""

    ufrag: str
    pwd: str
    candidates: tuple[str, ...]

    def to_wire(self) -> list[str]:
        """The strings for the signaling message's ``candidates`` field."""
        if not _UFRAG_RE.match(self.ufrag) or not _PWD_RE.match(self.pwd):
            raise LocalProtocolError("ICE ufrag/pwd are not ice-chars of the right length")
        if len(self.candidates) > MAX_WIRE_CANDIDATES:
            raise LocalProtocolError(f"{len(self.candidates)} candidates, at most 31 fit")
        out = [f"{CREDENTIALS_PREFIX}{self.ufrag}:{self.pwd}"]
        out += [CANDIDATE_PREFIX + c for c in self.candidates]
        if any(len(s) > MAX_ENTRY_LEN for s in out):
            raise LocalProtocolError("an ICE wire entry is longer than 256 characters")
        return out

    @classmethod
    def from_wire(cls, items: list[str] | tuple[str, ...]) -> IceParams:
        """Parse the ``candidates`` field of a peer's message; raises only MalformedMessage.

        Entries that are neither credentials nor candidates are ignored."""
        creds: tuple[str, str] | None = None
        cands: list[str] = []
        if len(items) > MAX_WIRE_CANDIDATES + 1:
            raise MalformedMessage(f"{len(items)} ICE entries", reason="bad_candidate")
        for item in items:
            if not isinstance(item, str) or len(item) > MAX_ENTRY_LEN:
                raise MalformedMessage("ICE entry is not a short string", reason="bad_candidate")
            if item.startswith(CREDENTIALS_PREFIX):
                ufrag, sep, pwd = item[len(CREDENTIALS_PREFIX) :].partition(":")
                if creds is not None or not sep:
                    raise MalformedMessage("ICE credentials repeated or cut", reason="bad_ice")
                if not _UFRAG_RE.match(ufrag) or not _PWD_RE.match(pwd):
                    raise MalformedMessage("ICE ufrag/pwd are malformed", reason="bad_ice")
                creds = (ufrag, pwd)
            elif item.startswith(CANDIDATE_PREFIX):
                sdp = item[len(CANDIDATE_PREFIX) :]
                parse_candidate(sdp)
                cands.append(sdp)
        if creds is None:
            raise MalformedMessage("no ICE credentials among the candidates", reason="bad_ice")
        return cls(creds[0], creds[1], tuple(cands))

    def infos(self) -> list[CandidateInfo]:
        """The parsed candidates (they were checked when this object was made from the wire)."""
        return [parse_candidate(c) for c in self.candidates]


@dataclass(frozen=True)
class SelectedPath:
    """The path ICE chose, ready for the data plane: ``Path(sock, remote_addr, channel, kind)``.

    ``sock`` is owned by the ``IceLink`` (closed by ``IceLink.close``).  For a path through our
    own TURN allocation, ``sock`` is the TURN client's socket, ``remote_addr`` the TURN server
    and ``channel`` the bound channel number: every datagram goes out as ChannelData.
    """

    sock: socket.socket
    remote_addr: tuple[str, int]
    channel: int | None
    kind: str
    """``relay`` when either end is a relay candidate, else the remote candidate's type:
    ``host`` | ``srflx`` | ``prflx``."""
    local: str
    """E.g. ``host 198.19.2.1:40000`` or ``relay 198.19.1.5:50123 via 198.19.1.5:3478``."""
    remote: str
    """E.g. ``srflx 198.19.1.4:40001`` (the remote candidate, as the peer signalled or as
    learned from its checks)."""
    rtt_ms: float | None = None
    """Round trip of the last connectivity check on this pair, when it was not retransmitted."""

    @property
    def direct(self) -> bool:
        return self.kind != "relay"


# ---- caps on a peer's candidates (issue 16: one message must not make us check many addresses)
CANDIDATE_CAPS: Final = {"host": 8, "srflx": 4, "relay": 4}
MAX_PER_ADDRESS: Final = 2


def cap_candidates(entries: Sequence[str]) -> tuple[list[str], int]:
    """``entries`` (a con_req/con_resp ``candidates`` list) with at most ``CANDIDATE_CAPS``
    candidates of each type and ``MAX_PER_ADDRESS`` per IP address, in the order given (the
    sender's priority order); other entries (credentials, malformed ones: their readers count
    them) pass.  Returns the kept entries and how many candidates were dropped."""
    kept: list[str] = []
    by_type: dict[str, int] = {}
    by_addr: dict[str, int] = {}
    dropped = 0
    for entry in entries:
        if not entry.startswith(CANDIDATE_PREFIX):
            kept.append(entry)
            continue
        try:
            info = parse_candidate(entry[len(CANDIDATE_PREFIX):])
        except MalformedMessage:
            kept.append(entry)
            continue
        if (by_type.get(info.type, 0) >= CANDIDATE_CAPS.get(info.type, 0)
                or by_addr.get(info.host, 0) >= MAX_PER_ADDRESS):
            dropped += 1
            continue
        by_type[info.type] = by_type.get(info.type, 0) + 1
        by_addr[info.host] = by_addr.get(info.host, 0) + 1
        kept.append(entry)
    return kept, dropped
