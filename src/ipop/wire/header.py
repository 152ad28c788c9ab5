"""The overlay frame header: a type byte, then IPOP's 40-byte UID header.

Every overlay datagram on the underlay looks like this::

     0        1                             21                            41
    +--------+-----------------------------+-----------------------------+------------
    |  type  |   source UID (20 bytes)     | destination UID (20 bytes)  | payload ...
    +--------+-----------------------------+-----------------------------+------------

The 40 bytes after the type byte are IPOP's header as ipop-tap writes it (source UID, then
destination UID).  The type byte comes first so that one UDP port can carry STUN, DTLS, TURN
ChannelData and overlay frames, told apart by the first byte alone (RFC 7983)::

    0..3     STUN            20..63   DTLS            64..79  TURN ChannelData
    128..191 ipop frames     anything else: dropped and counted ("unknown_kind")

ipop frame types (bit 0 set = payload sealed with the link's AEAD, see ``ipop.crypto.aead``):

    0x80 DATA            plain IP packet (TUN) or Ethernet frame (TAP)
    0x81 DATA_SEALED     the same, sealed
    0x82 KEEPALIVE       plain keepalive probe/echo (payload: ``ipop.wire.keepalive``)
    0x83 KEEPALIVE_SEALED
    0x84 DATA_PARTIAL    one IP packet whose TCP/UDP checksum holds only the pseudo-header sum
    0x85 DATA_PARTIAL_SEALED  (the fast path's segments: ``ipop.dataplane.segment``)
    0x86 TRAIN           one chunk of a whole TSO super-packet (``ipop.wire.train``)
    0x87 TRAIN_SEALED    the same, the super-packet sealed once
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from ipop.errors import LocalProtocolError, MalformedFrame

UID_LEN = 20
TYPE_OFF = 0
SRC_OFF = 1
DST_OFF = SRC_OFF + UID_LEN  # 21
PAYLOAD_OFF = DST_OFF + UID_LEN  # 41
HEADER_LEN = PAYLOAD_OFF  # type byte + 40-byte IPOP header
IPOP_HEADER_LEN = 2 * UID_LEN  # 40

T_DATA = 0x80
T_DATA_SEALED = 0x81
T_KEEPALIVE = 0x82
T_KEEPALIVE_SEALED = 0x83
T_DATA_PARTIAL = 0x84
T_DATA_PARTIAL_SEALED = 0x85
T_TRAIN = 0x86
T_TRAIN_SEALED = 0x87
SEALED_BIT = 0x01
PARTIAL_BIT = 0x04
DATA_TYPES = frozenset({T_DATA, T_DATA_SEALED, T_DATA_PARTIAL, T_DATA_PARTIAL_SEALED})
TRAIN_TYPES = frozenset({T_TRAIN, T_TRAIN_SEALED})
KNOWN_TYPES = DATA_TYPES | TRAIN_TYPES | {T_KEEPALIVE, T_KEEPALIVE_SEALED}


# The first-byte ranges (RFC 7983), written out here and nowhere else: every demultiplexer of
# underlay datagrams asks ``classify`` (or ``KIND_BY_FIRST_BYTE``); the kernel filter
# (``ipop.dataplane.sockfilter``) compiles these bounds into its program.
STUN_FIRST = range(0, 4)
DTLS_FIRST = range(20, 64)
CHANNEL_DATA_FIRST = range(64, 80)  # TURN channels 0x4000..0x4FFF (RFC 8656)
FRAME_FIRST = range(128, 192)


class Kind(enum.Enum):
    """What the first byte of an underlay datagram says it is (RFC 7983 ranges)."""

    STUN = "stun"
    DTLS = "dtls"
    TURN = "turn"  # TURN ChannelData (``ipop.wire.turn.parse_channel_data``)
    OVERLAY = "overlay"  # an ipop frame (``parse``)
    UNKNOWN = "unknown"


def _build_kind_table() -> tuple[Kind, ...]:
    ranges = ((STUN_FIRST, Kind.STUN), (DTLS_FIRST, Kind.DTLS),
              (CHANNEL_DATA_FIRST, Kind.TURN), (FRAME_FIRST, Kind.OVERLAY))
    return tuple(next((kind for r, kind in ranges if b in r), Kind.UNKNOWN) for b in range(256))


KIND_BY_FIRST_BYTE = _build_kind_table()
"""``classify`` as a table indexed by the first byte (for loops that hold the byte already)."""


def classify(datagram: bytes | bytearray | memoryview) -> Kind:
    """The kind of an underlay datagram, from its first byte; empty datagrams are UNKNOWN."""
    if not datagram:
        return Kind.UNKNOWN
    return KIND_BY_FIRST_BYTE[datagram[0]]


def is_stun(datagram: bytes | bytearray | memoryview) -> bool:
    """Whether ``classify`` says STUN."""
    return bool(datagram) and KIND_BY_FIRST_BYTE[datagram[0]] is Kind.STUN


def is_dtls(datagram: bytes | bytearray | memoryview) -> bool:
    """Whether ``classify`` says DTLS."""
    return bool(datagram) and KIND_BY_FIRST_BYTE[datagram[0]] is Kind.DTLS


class Header(NamedTuple):
    """A parsed overlay frame header."""

    type: int
    src: bytes
    dst: bytes


def pack(frame_type: int, src: bytes, dst: bytes) -> bytes:
    """The 41 header bytes of a frame of ``frame_type`` from ``src`` to ``dst``."""
    if frame_type not in KNOWN_TYPES:
        raise LocalProtocolError(f"unknown frame type 0x{frame_type:02x}")
    if len(src) != UID_LEN or len(dst) != UID_LEN:
        raise LocalProtocolError("UIDs are 20 bytes")
    return bytes((frame_type,)) + src + dst


def parse(datagram: bytes | bytearray | memoryview) -> tuple[Header, memoryview]:
    """Split an overlay datagram into its header and a view of its payload.

    Raises ``MalformedFrame`` (reason ``truncated`` or ``unknown_type``) and nothing else.
    """
    if len(datagram) < HEADER_LEN:
        raise MalformedFrame(f"frame of {len(datagram)} bytes is shorter than its header",
                             reason="truncated")
    view = memoryview(datagram)
    frame_type = view[TYPE_OFF]
    if frame_type not in KNOWN_TYPES:
        raise MalformedFrame(f"unknown frame type 0x{frame_type:02x}", reason="unknown_type")
    hdr = Header(frame_type, bytes(view[SRC_OFF:DST_OFF]), bytes(view[DST_OFF:PAYLOAD_OFF]))
    return hdr, view[PAYLOAD_OFF:]
