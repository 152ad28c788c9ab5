"""TURN ChannelData framing (RFC 8656 section 12.4) and TURN request builders: pure, over bytes.

A relayed datagram travels between a TURN client and its server as ChannelData::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-------------------------------+-------------------------------+
    |        channel number         |            length             |
    +-------------------------------+-------------------------------+
    |                     application data (length bytes)           |
    +---------------------------------------------------------------+

The channel number lies in 0x4000..0x7FFF (RFC 5766; RFC 8656 narrowed bindings to 0x4000..0x4FFF,
the range whose first byte, 64..79, RFC 7983 demultiplexes as ChannelData).  Over UDP no padding
is required; a sender may still pad to a multiple of four, so up to three trailing bytes after the
data are accepted and ignored.  Over TCP (not used here) padding is mandatory.

``channel_bind_request`` and ``refresh_request`` build the authenticated STUN requests a TURN
client sends to keep a channel binding (10 minutes) and an allocation alive; they use aioice's STUN
message classes, imported lazily.
"""

from __future__ import annotations

import struct
from typing import Final

from ipop.errors import LocalProtocolError, MalformedFrame
from ipop.wire.header import Kind, classify

__all__ = [
    "CHANNEL_MAX",
    "CHANNEL_MIN",
    "HEADER_LEN",
    "MAX_PAYLOAD",
    "channel_bind_request",
    "is_channel_data",
    "pack_channel_data",
    "parse_channel_data",
    "refresh_request",
]

CHANNEL_MIN: Final = 0x4000
CHANNEL_MAX: Final = 0x7FFF
HEADER_LEN: Final = 4
MAX_PAYLOAD: Final = 0xFFFF
MAX_PADDING: Final = 3
_HDR = struct.Struct("!HH")


def is_channel_data(datagram: bytes | bytearray | memoryview) -> bool:
    """Whether a datagram's first byte says ChannelData (``ipop.wire.header.classify``: 64..79,
    channels 0x4000..0x4FFF; 80..127 is no protocol's, RFC 7983)."""
    return classify(datagram) is Kind.TURN


def pack_channel_data(channel: int, payload: bytes | bytearray | memoryview) -> bytes:
    """Wrap ``payload`` for ``channel``; raises LocalProtocolError on a bad channel or size."""
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise LocalProtocolError(f"TURN channel {channel:#06x} outside 0x4000..0x7FFF")
    if len(payload) > MAX_PAYLOAD:
        raise LocalProtocolError(f"ChannelData payload of {len(payload)} bytes")
    return _HDR.pack(channel, len(payload)) + bytes(payload)


def parse_channel_data(datagram: bytes | bytearray | memoryview) -> tuple[int, memoryview]:
    """``(channel, payload)`` of a ChannelData datagram; raises MalformedFrame only.

    The one ChannelData parser (the data plane, ``ipop.nat.probe``).  The payload is a view
    into ``datagram`` (no copy)."""
    view = memoryview(datagram)
    if len(view) < HEADER_LEN:
        raise MalformedFrame(f"ChannelData of {len(view)} bytes", reason="truncated_channeldata")
    channel, length = _HDR.unpack_from(view)
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise MalformedFrame(f"TURN channel {channel:#06x}", reason="bad_channel")
    rest = len(view) - HEADER_LEN
    if length > rest:
        raise MalformedFrame(
            f"ChannelData claims {length} bytes, has {rest}", reason="truncated_channeldata"
        )
    if rest - length > MAX_PADDING:
        raise MalformedFrame(
            f"ChannelData has {rest - length} bytes after its data", reason="channeldata_trailing"
        )
    return channel, view[HEADER_LEN : HEADER_LEN + length]


def channel_bind_request(
    channel: int,
    peer: tuple[str, int],
    *,
    username: str,
    realm: str,
    nonce: bytes,
    key: bytes,
    transaction_id: bytes | None = None,
) -> bytes:
    """A ChannelBind request binding ``channel`` to ``peer``, signed with the long-term ``key``
    (MD5 of ``username:realm:password``, RFC 8489 section 9.2.2)."""
    from aioice import stun

    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise LocalProtocolError(f"TURN channel {channel:#06x} outside 0x4000..0x7FFF")
    msg = stun.Message(
        message_method=stun.Method.CHANNEL_BIND,
        message_class=stun.Class.REQUEST,
        transaction_id=transaction_id,
    )
    msg.attributes["CHANNEL-NUMBER"] = channel
    msg.attributes["XOR-PEER-ADDRESS"] = peer
    return _signed(msg, username, realm, nonce, key)


def refresh_request(
    lifetime: int,
    *,
    username: str,
    realm: str,
    nonce: bytes,
    key: bytes,
    transaction_id: bytes | None = None,
) -> bytes:
    """A Refresh request asking for ``lifetime`` more seconds (0 deletes the allocation)."""
    from aioice import stun

    if not 0 <= lifetime <= 0xFFFF_FFFF:
        raise LocalProtocolError(f"TURN lifetime {lifetime}")
    msg = stun.Message(
        message_method=stun.Method.REFRESH,
        message_class=stun.Class.REQUEST,
        transaction_id=transaction_id,
    )
    msg.attributes["LIFETIME"] = lifetime
    return _signed(msg, username, realm, nonce, key)


def _signed(msg: object, username: str, realm: str, nonce: bytes, key: bytes) -> bytes:
    from aioice import stun

    assert isinstance(msg, stun.Message)
    msg.attributes["USERNAME"] = username
    msg.attributes["REALM"] = realm
    msg.attributes["NONCE"] = nonce
    msg.add_message_integrity(key)
    return bytes(msg)
