"""Keepalive payloads: a probe carries the sender's clock, the echo returns it for an RTT.

::

     0        1                                9
    +--------+--------------------------------+
    |  op    |  sender timestamp (u64, ns)    |
    +--------+--------------------------------+

``op`` is 0 for a probe and 1 for an echo.
"""

from __future__ import annotations

import struct

from ipop.errors import MalformedFrame

OP_PROBE = 0
OP_ECHO = 1
_FMT = struct.Struct("!BQ")
SIZE = _FMT.size  # 9


def pack(op: int, stamp_ns: int) -> bytes:
    return _FMT.pack(op, stamp_ns & 0xFFFF_FFFF_FFFF_FFFF)


def parse(payload: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(op, timestamp) of a keepalive payload; raises MalformedFrame only."""
    if len(payload) != SIZE:
        raise MalformedFrame(f"keepalive of {len(payload)} bytes", reason="bad_keepalive")
    op, stamp = _FMT.unpack(payload)
    if op not in (OP_PROBE, OP_ECHO):
        raise MalformedFrame(f"keepalive op {op}", reason="bad_keepalive")
    return op, stamp
