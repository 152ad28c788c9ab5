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

Shard bits.  Bits 3..5 of the type byte carry the number of the sending shard (``workers``,
``ipop.dataplane.shards``): ``0x80 | shard << 3 | type``, which stays inside 128..191 for
shards 0..7.  A node with one worker always sends 0 there, so its frames are the same bytes as
before shards existed.  The receiver's kernel steers a frame to its shard by these bits (the
reuseport program of ``ipop.dataplane.steering``); the type byte is part of the AEAD's AAD, so
the bits are authenticated.  Every comparison of a type byte goes through :func:`frame_type`,
which masks them out; :func:`shard_of` reads them.
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
SHARD_SHIFT = 3
SHARD_BITS = 0x38  # bits 3..5 of the type byte: the sending shard (0..7)
TYPE_MASK = 0xFF & ~SHARD_BITS  # 0xC7
MAX_SHARDS = 8


def frame_type(type_byte: int) -> int:
    """The frame type of a type byte, without the sender's shard bits."""
    return type_byte & TYPE_MASK


def shard_of(type_byte: int) -> int:
    """The sending shard a type byte names (0..7)."""
    return (type_byte & SHARD_BITS) >> SHARD_SHIFT


def with_shard(type_byte: int, shard: int) -> int:
    """``type_byte`` as shard ``shard`` sends it."""
    if not 0 <= shard < MAX_SHARDS:
        raise LocalProtocolError(f"shard {shard} is not in 0..{MAX_SHARDS - 1}")
    return (type_byte & TYPE_MASK) | shard << SHARD_SHIFT


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
    """A parsed overlay frame header (``type`` without the shard bits)."""

    type: int
    src: bytes
    dst: bytes


def pack(ftype: int, src: bytes, dst: bytes, shard: int = 0) -> bytes:
    """The 41 header bytes of a frame of type ``ftype`` from ``src`` to ``dst``, sent by shard
    ``shard``."""
    if ftype not in KNOWN_TYPES:
        raise LocalProtocolError(f"unknown frame type 0x{ftype:02x}")
    if len(src) != UID_LEN or len(dst) != UID_LEN:
        raise LocalProtocolError("UIDs are 20 bytes")
    return bytes((with_shard(ftype, shard),)) + src + dst


def parse(datagram: bytes | bytearray | memoryview) -> tuple[Header, memoryview]:
    """Split an overlay datagram into its header and a view of its payload.

    Raises ``MalformedFrame`` (reason ``truncated`` or ``unknown_type``) and nothing else.
    """
    if len(datagram) < HEADER_LEN:
        raise MalformedFrame(f"frame of {len(datagram)} bytes is shorter than its header",
                             reason="truncated")
    view = memoryview(datagram)
    ftype = frame_type(view[TYPE_OFF])
    if ftype not in KNOWN_TYPES:
        raise MalformedFrame(f"unknown frame type 0x{view[TYPE_OFF]:02x}", reason="unknown_type")
    hdr = Header(ftype, bytes(view[SRC_OFF:DST_OFF]), bytes(view[DST_OFF:PAYLOAD_OFF]))
    return hdr, view[PAYLOAD_OFF:]
