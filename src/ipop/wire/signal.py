"""Signaling messages between peers (con_req, con_resp, trim) as JSON text: build and parse, pure.

These travel in the ``<body>`` of XMPP messages (or any other signaling backend).  One message is a
JSON object, at most ``MAX_BODY`` (16 KiB) of UTF-8:

    {"v": 1,                                   protocol version, must be the integer 1
     "type": "con_req" | "con_resp" | "trim",  con_req: "link to me?"; con_resp: the answer;
                                               trim: "I have removed our link"
     "uid": "3f…(40 hex)",                     sender's UID (SHA-256(public key)[:20], hex)
     "overlay_id": "lab",                      overlay (group) the link belongs to, 1..64 chars
     "ip4": "100.64.0.2",                      sender's overlay IPv4 address   (con_req/con_resp)
     "mac": "02:00:00:00:00:02",               sender's virtual MAC, TAP mode only   (optional)
     "fingerprint": "sha-256 AB:CD:…",         SHA-256 of sender's certificate (con_req/con_resp)
     "security_groups": ["dc1", …],            sender's security groups            (optional)
     "sec": true,                              sender's plain ``sec`` setting      (optional)
     "encrypt": true,                          the verdict, repeated by con_resp   (optional)
     "candidates": ["candidate:…", …],         ICE candidates (SDP) or "host IP:PORT"  (optional)
     "features": ["trains"],                   data-plane frames the sender can receive (optional)
     "ip6": "2001:db8::2",                     sender's overlay IPv6 address       (optional)
     "routes": ["198.18.200.0/24", …],         prefixes reachable through the sender (optional)
     "update": true}                           con_resp only: a route update on a link (optional)

As in the seed paper's section 5, the group list travels in front of the fingerprint and the
candidates: the receiver of a con_req intersects the groups, decides, and its con_resp carries its
own groups, its candidates and (``encrypt``) the verdict.  A missing ``security_groups`` (None:
"this peer predates security groups, use ``sec``") is NOT the same as ``[]`` ("member of none").

``SignalMessage.parse`` never raises anything but ``MalformedMessage``: unknown fields are
ignored, a JSON ``null`` counts as missing, everything else is checked for type and size and put
into canonical form (lower-case UID and MAC, upper-case fingerprint hex).  Building a message that
breaks these rules raises ``LocalProtocolError``.

``routes`` (at most ``MAX_ROUTES``) are the sender's ``advertise_routes``: each a prefix in
canonical form (host bits zero, as ``ipaddress`` writes it); anything else refuses the whole
message.  Whether a receiver installs them is its own choice (``accept_routes``).  A peer that
does not know ``routes`` or ``ip6`` ignores them, as it ignores every unknown field.

``features`` names what the sender's data plane understands beyond the frames every version
knows: ``"trains"`` (``ipop.wire.train``, frame types 0x86/0x87), and what its controller
understands beyond con_req/con_resp/trim: ``"route-update"`` (below).  A peer that gives no
``features`` is an older one and is sent none of them: an older receiver would drop every train,
and a whole TCP transfer with it.  Unknown names are kept (and ignored by this version).

``update: true`` (route updates, sent only to a peer that offered ``"route-update"``) marks a
con_resp that sets up nothing: it tells a peer with a link to the sender that the sender's
``advertise_routes`` changed (a live reload).  It must carry ``routes`` (the whole new list, at
most ``MAX_ROUTES``, ``[]`` for none) and no candidates; ``update`` on another type, ``update``
other than ``true``, or an update without ``routes`` refuses the message.  The receiver runs
its ``accept_routes`` policy on the new list (``ipop.controller.liveroutes``).
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from ipop.errors import LocalProtocolError, MalformedMessage

__all__ = [
    "FEATURE_ROUTE_UPDATE",
    "FEATURE_TRAINS",
    "MAX_BODY",
    "MAX_CANDIDATES",
    "MAX_CANDIDATE_LEN",
    "MAX_FEATURES",
    "MAX_GROUPS",
    "MAX_GROUP_LEN",
    "MAX_OVERLAY_ID_LEN",
    "MAX_ROUTES",
    "VERSION",
    "MsgType",
    "SignalMessage",
]

VERSION: Final = 1
MAX_BODY: Final = 16 * 1024  # bytes of UTF-8
MAX_GROUPS: Final = 64
MAX_GROUP_LEN: Final = 64
MAX_CANDIDATES: Final = 32
MAX_CANDIDATE_LEN: Final = 256
MAX_OVERLAY_ID_LEN: Final = 64
MAX_FEATURES: Final = 16
FEATURE_TRAINS: Final = "trains"
FEATURE_ROUTE_UPDATE: Final = "route-update"  # the sender takes con_resp with update: true
MAX_ROUTES: Final = 64

MsgType = Literal["con_req", "con_resp", "trim"]
_TYPES: Final[frozenset[str]] = frozenset(get_args(MsgType))
# types that set up a link and so must say who we are on the overlay and how to authenticate us
_LINK_TYPES: Final = frozenset({"con_req", "con_resp"})

_UID_RE: Final = re.compile(r"[0-9a-fA-F]{40}")
_MAC_RE: Final = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
_FEATURE_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_FPR_RE: Final = re.compile(r"(?i:sha-256) ([0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){31})")


def _fail(message: str) -> MalformedMessage:
    return MalformedMessage(f"signal: {message}")


def _text(value: object, field: str, max_len: int, *, ascii_only: bool = False) -> str:
    if not isinstance(value, str):
        raise _fail(f"{field} must be a string")
    if not 1 <= len(value) <= max_len:
        raise _fail(f"{field} must be 1..{max_len} characters")
    if not value.isprintable() or (ascii_only and not value.isascii()):
        raise _fail(f"{field} holds characters that are not allowed")
    return value


def _uid(value: object) -> str:
    if not isinstance(value, str) or _UID_RE.fullmatch(value) is None:
        raise _fail("uid must be 40 hex digits")
    return value.lower()


def _ip4(value: object) -> str:
    if not isinstance(value, str) or len(value) > 15:
        raise _fail("ip4 must be an IPv4 address string")
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise _fail("ip4 must be an IPv4 address string") from None


def _ip6(value: object) -> str:
    if not isinstance(value, str) or len(value) > 45:
        raise _fail("ip6 must be an IPv6 address string")
    try:
        return str(ipaddress.IPv6Address(value))
    except ValueError:
        raise _fail("ip6 must be an IPv6 address string") from None


def _routes(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise _fail("routes must be a list")
    if len(value) > MAX_ROUTES:
        raise _fail(f"routes holds more than {MAX_ROUTES} prefixes")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str) or not 2 <= len(item) <= 43 or not item.isascii():
            raise _fail("routes item must be a prefix string")
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise _fail(f"routes item {item!r} is not a prefix") from None
            raise _fail(f"routes item {item!r} has host bits set") from None
        text = str(net)
        if text not in out:
            out.append(text)
    return tuple(out)


def _update(value: object, mtype: str, routes: tuple[str, ...] | None,
            candidates: object) -> bool:
    if value is not True:
        raise _fail("update must be true when given")
    if mtype != "con_resp":
        raise _fail("update is allowed on con_resp only")
    if routes is None:
        raise _fail("an update must carry routes (a list, [] for none)")
    if candidates:
        raise _fail("an update carries no candidates")
    return True


def _mac(value: object) -> str:
    if not isinstance(value, str) or _MAC_RE.fullmatch(value) is None:
        raise _fail("mac must look like 02:00:5e:00:00:01")
    return value.lower()


def _fingerprint(value: object) -> str:
    m = _FPR_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise _fail('fingerprint must be "sha-256 XX:XX:…" (32 hex pairs)')
    return "sha-256 " + m.group(1).upper()


def _bool(value: object, field: str) -> bool:
    if type(value) is not bool:
        raise _fail(f"{field} must be true or false")
    return value


def _str_list(
    value: object, field: str, max_items: int, max_len: int, *, ascii_only: bool
) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise _fail(f"{field} must be a list")
    if len(value) > max_items:
        raise _fail(f"{field} holds more than {max_items} items")
    return tuple(_text(v, f"{field} item", max_len, ascii_only=ascii_only) for v in value)


def _groups(value: object) -> tuple[str, ...]:
    return _str_list(value, "security_groups", MAX_GROUPS, MAX_GROUP_LEN, ascii_only=False)


def _candidates(value: object) -> tuple[str, ...]:
    return _str_list(value, "candidates", MAX_CANDIDATES, MAX_CANDIDATE_LEN, ascii_only=True)


def _features(value: object) -> tuple[str, ...]:
    names = _str_list(value, "features", MAX_FEATURES, 32, ascii_only=True)
    for name in names:
        if not _FEATURE_RE.fullmatch(name):
            raise _fail("features item must be lower-case letters, digits, '-' or '_'")
    return tuple(sorted(set(names)))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True, slots=True)
class SignalMessage:
    """One signaling message.  Construct with canonical values; see the module docstring."""

    type: MsgType
    uid: str
    """Sender's UID: 40 lower-case hex digits."""
    overlay_id: str
    """The overlay (group) this is about."""
    ip4: str | None = None
    """Sender's overlay IPv4 address; required for con_req and con_resp."""
    fingerprint: str | None = None
    """``"sha-256 AB:…"`` of the sender's certificate; required for con_req and con_resp."""
    candidates: tuple[str, ...] = ()
    """ICE candidates (SDP attribute values) or ``"host IP:PORT"`` strings."""
    mac: str | None = None
    """Sender's virtual MAC (TAP/switch mode), lower-case."""
    security_groups: tuple[str, ...] | None = None
    """Sender's security groups; None = not given (older peer), () = member of none."""
    sec: bool | None = None
    """Sender's plain ``sec`` setting, used when a side gives no security groups."""
    encrypt: bool | None = None
    """The link's verdict, repeated by con_resp so both sides can check they agree."""
    features: tuple[str, ...] | None = None
    """Data-plane features the sender can receive, sorted; None = not given (older peer)."""
    ip6: str | None = None
    """Sender's overlay IPv6 address, compressed form."""
    routes: tuple[str, ...] | None = None
    """Prefixes the sender advertises (canonical, no duplicates); None = not given."""
    update: bool | None = None
    """True: a route update on an existing link (con_resp only, with ``routes``)."""
    v: int = VERSION

    def __post_init__(self) -> None:
        try:
            canonical = _from_dict(self._fields())
        except MalformedMessage as e:
            raise LocalProtocolError(str(e)) from None
        if canonical._fields() != self._fields():
            raise LocalProtocolError(f"signal: not in canonical form: {self!r}")

    def _fields(self) -> dict[str, Any]:
        return {
            "v": self.v,
            "type": self.type,
            "uid": self.uid,
            "overlay_id": self.overlay_id,
            "ip4": self.ip4,
            "mac": self.mac,
            "fingerprint": self.fingerprint,
            "security_groups": (
                None if self.security_groups is None else list(self.security_groups)
            ),
            "sec": self.sec,
            "encrypt": self.encrypt,
            "candidates": list(self.candidates),
            "features": None if self.features is None else list(self.features),
            "ip6": self.ip6,
            "routes": None if self.routes is None else list(self.routes),
            "update": self.update,
        }

    def offers(self, feature: str) -> bool:
        """Whether the sender said it receives ``feature`` (never, for an older peer)."""
        return self.features is not None and feature in self.features

    def to_json(self) -> str:
        """Compact JSON (None fields left out).  Raises LocalProtocolError above MAX_BODY."""
        body = {k: v for k, v in self._fields().items() if v is not None}
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        if len(text.encode("utf-8")) > MAX_BODY:
            raise LocalProtocolError(f"signal: message of {len(text)} chars exceeds {MAX_BODY} B")
        return text

    @classmethod
    def parse(cls, text: str) -> SignalMessage:
        """Parse one message body.  Raises MalformedMessage, and nothing else, on bad input."""
        if not isinstance(text, str):
            raise _fail("body is not text")
        if len(text) > MAX_BODY or len(text.encode("utf-8", "surrogatepass")) > MAX_BODY:
            raise _fail(f"body larger than {MAX_BODY} bytes")
        try:
            obj = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise _fail(f"not JSON ({type(e).__name__})") from None
        if not isinstance(obj, dict):
            raise _fail("body is not a JSON object")
        return _from_dict(obj)


def _from_dict(obj: dict[str, Any]) -> SignalMessage:
    """Check a decoded object and build the canonical message (MalformedMessage otherwise)."""
    v = obj.get("v")
    if type(v) is not int or v != VERSION:
        raise _fail(f"v must be {VERSION}")
    mtype = obj.get("type")
    if not isinstance(mtype, str) or mtype not in _TYPES:
        raise _fail(f"unknown type (expected one of {sorted(_TYPES)})")

    def opt(name: str) -> object:
        return obj.get(name)  # JSON null and a missing key both give None

    link = mtype in _LINK_TYPES
    ip4 = opt("ip4")
    fpr = opt("fingerprint")
    if link and (ip4 is None or fpr is None):
        raise _fail(f"{mtype} needs ip4 and fingerprint")
    mac, groups, sec, enc, cands, feats = (
        opt("mac"),
        opt("security_groups"),
        opt("sec"),
        opt("encrypt"),
        opt("candidates"),
        opt("features"),
    )
    routes = None if opt("routes") is None else _routes(opt("routes"))
    update = None if opt("update") is None else _update(opt("update"), mtype, routes, cands)
    return _build(
        type=mtype,  # checked against _TYPES above
        uid=_uid(obj.get("uid")),
        overlay_id=_text(obj.get("overlay_id"), "overlay_id", MAX_OVERLAY_ID_LEN),
        ip4=None if ip4 is None else _ip4(ip4),
        fingerprint=None if fpr is None else _fingerprint(fpr),
        candidates=() if cands is None else _candidates(cands),
        mac=None if mac is None else _mac(mac),
        security_groups=None if groups is None else _groups(groups),
        sec=None if sec is None else _bool(sec, "sec"),
        encrypt=None if enc is None else _bool(enc, "encrypt"),
        features=None if feats is None else _features(feats),
        ip6=None if opt("ip6") is None else _ip6(opt("ip6")),
        routes=routes,
        update=update,
    )


def _build(**fields: Any) -> SignalMessage:
    """Make a message from already checked, canonical values, skipping ``__post_init__``."""
    msg = object.__new__(SignalMessage)
    for name, value in {"v": VERSION, **fields}.items():
        object.__setattr__(msg, name, value)
    return msg
