"""The road-warrior hello: "static peer UID is here", a STUN Binding request; pure.

A static peer may be listed without an ``endpoint`` (a laptop behind NATs).  Its address is
learned from the first frame that authenticates; to get there, the side that knows an endpoint
sends, while its encrypted link is not keyed, this hello about once a second.  It carries no data
and proves nothing: the receiver only *tries* the address for the DTLS handshake of a link whose
endpoint it does not know yet (or whose link went down); the certificate check of that handshake
decides.  Being STUN (first byte 0..3, RFC 7983), a peer that does not know it drops it quietly.

::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  0x0001 (Binding request)     |  length = 56                  |
    +-------------------------------+-------------------------------+
    |                 magic cookie 0x2112A442                       |
    +---------------------------------------------------------------+
    |          transaction ID (12 bytes: "ipop-hello" + 2 zero)     |
    +-------------------------------+-------------------------------+
    |  0x0006 (USERNAME)            |  length = 52                  |
    +-------------------------------+-------------------------------+
    |  "ipop:" + sender UID (40 hex) + ":" + receiver UID prefix    |
    +---------------------------------------------------------------+
"""

from __future__ import annotations

import re
import struct

MAGIC = 0x2112A442
TXID = b"ipop-hello\x00\x00"
USERNAME = 0x0006
_HDR = struct.Struct("!HHI12s")
_ATTR = struct.Struct("!HH")
_NAME_RE = re.compile(rb"ipop:([0-9a-f]{40}):([0-9a-f]{6})")


def pack(sender_uid: bytes, receiver_uid: bytes) -> bytes:
    """The hello ``sender_uid`` sends to the peer ``receiver_uid`` (both 20 bytes)."""
    name = b"ipop:" + sender_uid.hex().encode() + b":" + receiver_uid.hex()[:6].encode()
    body = _ATTR.pack(USERNAME, len(name)) + name + b"\x00" * (-len(name) % 4)
    return _HDR.pack(0x0001, len(body), MAGIC, TXID) + body


def parse(data: bytes, receiver_uid: bytes) -> bytes | None:
    """The sender's UID if ``data`` is a hello meant for ``receiver_uid``; None otherwise
    (anything else, malformed or not: a hello is only ever a hint)."""
    if len(data) < _HDR.size + _ATTR.size or len(data) > 128:
        return None
    mtype, length, magic, txid = _HDR.unpack_from(data)
    if mtype != 0x0001 or magic != MAGIC or txid != TXID or length != len(data) - _HDR.size:
        return None
    atype, alen = _ATTR.unpack_from(data, _HDR.size)
    start = _HDR.size + _ATTR.size
    if atype != USERNAME or start + alen > len(data):
        return None
    m = _NAME_RE.fullmatch(data[start : start + alen])
    if m is None or m.group(2).decode() != receiver_uid.hex()[:6]:
        return None
    return bytes.fromhex(m.group(1).decode())
