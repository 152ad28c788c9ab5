"""Keepalive payloads: a probe carries the sender's clock, the echo returns it for an RTT.

::

     0        1                                9
    +--------+--------------------------------+
    |  op    |  sender timestamp (u64, ns)    |
    +--------+--------------------------------+

``op`` is 0 for a probe and 1 for an echo.  Op 2 (``TRAIN_LOSS``) is not a keepalive but
rides in the same small authenticated frame: the receiver of whole trains
(``ipop.wire.train``) reports that it lost one; the u64 is how many it lost so far.  Op 3
(``REKEY``), sealed only, asks the peer (the link's DTLS client) for a new handshake at once: a
DTLS server whose shard process restarted needs new keys (``ipop.dataplane.shards``).
"""

from __future__ import annotations

import struct

from ipop.errors import MalformedFrame

OP_PROBE = 0
OP_ECHO = 1
OP_TRAIN_LOSS = 2
OP_REKEY = 3
_FMT = struct.Struct("!BQ")
SIZE = _FMT.size  # 9


def pack(op: int, stamp_ns: int) -> bytes:
    return _FMT.pack(op, stamp_ns & 0xFFFF_FFFF_FFFF_FFFF)


def parse(payload: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(op, timestamp) of a keepalive payload; raises MalformedFrame only."""
    if len(payload) != SIZE:
        raise MalformedFrame(f"keepalive of {len(payload)} bytes", reason="bad_keepalive")
    op, stamp = _FMT.unpack(payload)
    if op not in (OP_PROBE, OP_ECHO, OP_TRAIN_LOSS, OP_REKEY):
        raise MalformedFrame(f"keepalive op {op}", reason="bad_keepalive")
    return op, stamp
