"""A classic BPF socket filter (``SO_ATTACH_FILTER``) for the data plane's UDP sockets: the
kernel drops what cannot be ours before it is queued, so a flood of garbage costs no Python.

What passes (RFC 7983 demultiplexing by the ranges of ``ipop.wire.header.classify``, with cheap
checks added)::

    first byte   kind                 also required
    0-3          STUN                 the magic cookie 0x2112A442 at bytes 4-7, and a message
                                      length (bytes 2-3) that fits in the datagram
    20-63        DTLS                 byte 1 = 0xFE (DTLS 1.x version major), and a first
                                      record no longer than the datagram
    64-79        TURN ChannelData     only on a connected socket (aioice's TURN client: the
                                      kernel delivers it nothing but the server's datagrams)
    128-191      ipop frames          a 40-byte header whose destination UID (bytes 21-40) is
                                      ours and whose source UID (1-20) is a peer with a link,
                                      when ``peers`` is given (at most ``MAX_PEERS``)
    else         dropped

For a UDP socket the filter sees the UDP header first: the payload starts at offset 8.  A load
past the end of the datagram ends the program with "drop", which makes the length checks free.
With UDP_GRO a coalesced train is judged by its first datagram (its others share its header).
The data plane attaches it when it adds a socket and again when its links change
(``Inbound.refresh_filters``); what it drops is counted by the kernel per socket (with
receive-queue overflows), read by ``kernel_drops`` into the data plane's ``kernel_drops``.
What a filter cannot know (a known peer's UID forged from another address, STUN with a
plausible header) still reaches Python, where it is dropped and counted.
"""

from __future__ import annotations

import ctypes
import functools
import socket
import struct
from collections.abc import Iterable

from ipop.wire import header as wh

__all__ = [
    "MAX_PEERS", "SO_ATTACH_FILTER", "SO_DETACH_FILTER", "attach", "detach", "kernel_drops",
    "program",
]

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SO_MEMINFO = 55
SK_MEMINFO_DROPS = 8  # index in the u32 array SO_MEMINFO returns
PAYLOAD = 8  # the UDP header comes first
STUN_COOKIE = 0x2112A442
STUN_HDR = 20
DTLS_HDR = 13
SRC_UID_OFF = 1
DST_UID_OFF = 21
UID_LEN = 20
MAX_PEERS = 256  # 11 instructions a peer; more peers: frames are not checked by source UID

# cBPF opcodes (linux/filter.h)
LDB_ABS = 0x30  # A = byte at k
LDH_ABS = 0x28  # A = 16-bit word at k (network order)
LDW_ABS = 0x20  # A = 32-bit word at k (network order)
LDW_LEN = 0x80  # A = length of the packet (UDP header included)
ADD_K = 0x04  # A += k
SUB_K = 0x14  # A -= k
TAX = 0x07  # X = A
JEQ = 0x15
JGT = 0x25
JGE = 0x35
JGT_X = 0x2D  # A > X
RET = 0x06
JA = 0x05  # jump k forward
ACCEPT = 0xFFFF_FFFF
DROP = 0

Insn = tuple[int, int, int, int]  # code, jt, jf, k


class _Prog:
    """Instructions with named labels; jumps are resolved at the end (8-bit offsets)."""

    def __init__(self) -> None:
        self.insns: list[tuple[int, str | int, str | int, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def op(self, code: int, k: int = 0, jt: str | int = 0, jf: str | int = 0) -> None:
        self.insns.append((code, jt, jf, k))

    def build(self) -> list[Insn]:
        out: list[Insn] = []
        for i, (code, jt, jf, k) in enumerate(self.insns):
            offs = [self.labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf)]
            if not all(0 <= o <= 255 for o in offs):
                raise ValueError(f"jump out of range at {i}")
            out.append((code, offs[0], offs[1], k))
        return out


def program(uid: bytes, peers: Iterable[bytes] | None = None, *,
            channeldata: bool = False) -> list[Insn]:
    """The filter for a node whose UID is ``uid`` (20 bytes); ``peers``: the UIDs frames may
    come from (None: any); ``channeldata``: whether TURN ChannelData may arrive."""
    if len(uid) != UID_LEN:
        raise ValueError("uid must be 20 bytes")
    known = None if peers is None else sorted(set(peers))
    if known is not None and (len(known) > MAX_PEERS or any(len(u) != UID_LEN for u in known)):
        known = None
    p = _Prog()
    # the first-byte ranges of ``ipop.wire.header`` (RFC 7983), compiled from the top down
    # (DTLS ends where ChannelData starts, so 20-63 needs no upper test)
    frame, chan, dtls, stun = wh.FRAME_FIRST, wh.CHANNEL_DATA_FIRST, wh.DTLS_FIRST, wh.STUN_FIRST
    p.op(LDB_ABS, PAYLOAD)                              # A = first byte
    p.op(JGT, frame[-1], "drop", 0)                     # 192-255
    p.op(JGE, frame[0], "frame", 0)                     # 128-191
    p.op(JGT, chan[-1], "drop", 0)                      # 80-127
    p.op(JGE, chan[0], "chan" if channeldata else "drop", 0)  # 64-79
    p.op(JGE, dtls[0], "dtls", 0)                       # 20-63
    p.op(JGT, stun[-1], "drop", 0)                      # 4-19; 0-3 fall through: STUN
    p.op(LDW_ABS, PAYLOAD + 4)                          # the magic cookie
    p.op(JEQ, STUN_COOKIE, 0, "drop")
    p.op(LDW_LEN)                                       # X = datagram length
    p.op(TAX)
    p.op(LDH_ABS, PAYLOAD + 2)                          # A = STUN length + 20 + 8
    p.op(ADD_K, STUN_HDR + PAYLOAD)
    p.op(JGT_X, 0, "drop", "accept")  # (not "equal": GRO may join two of them)
    p.label("dtls")
    p.op(LDB_ABS, PAYLOAD + 1)
    p.op(JEQ, 0xFE, 0, "drop")
    p.op(LDW_LEN)
    p.op(TAX)
    p.op(LDH_ABS, PAYLOAD + 11)                         # first record's length
    p.op(ADD_K, DTLS_HDR + PAYLOAD)
    p.op(JGT_X, 0, "drop", "accept")
    p.label("accept")
    p.label("chan")
    p.op(RET, ACCEPT)
    p.label("drop")
    p.op(RET, DROP)
    # frames last: each check jumps a short way forward (jump offsets are 8 bits)
    p.label("frame")
    for i, word in enumerate(struct.unpack("!5I", uid)):  # destination UID
        p.op(LDW_ABS, PAYLOAD + DST_UID_OFF + 4 * i)
        p.op(JEQ, word, 0, "not_ours")
    if known is None:
        p.op(RET, ACCEPT)
    else:
        p.op(JA, 1)
    p.label("not_ours")
    p.op(RET, DROP)
    if known is not None:
        for n, peer in enumerate(known):                # source UID: one block per peer
            nxt = f"peer{n + 1}"
            for i, word in enumerate(struct.unpack("!5I", peer)):
                p.op(LDW_ABS, PAYLOAD + SRC_UID_OFF + 4 * i)
                p.op(JEQ, word, 0, nxt)
            p.op(RET, ACCEPT)
            p.label(nxt)
        p.op(RET, DROP)
    return p.build()


INSN_SIZE = struct.calcsize("HBBI")  # struct sock_filter
PEER_BLOCK = 11  # instructions in a peer's block of ``program``: 5 x (load, compare), accept


def _pack(prog: list[Insn]) -> bytes:
    return b"".join(struct.pack("HBBI", *i) for i in prog)


@functools.lru_cache(maxsize=8)
def _head(uid: bytes, channeldata: bool) -> bytes:
    """``program(uid, [])`` packed, less its last instruction (``RET DROP``): what comes before
    the peers' blocks."""
    return _pack(program(uid, [], channeldata=channeldata)[:-1])


@functools.lru_cache(maxsize=MAX_PEERS * 2)
def _peer_block(peer: bytes) -> bytes:
    """One peer's block of ``program`` packed: its jumps lead only to the next block, so the
    block is the same wherever it stands."""
    return _pack(program(bytes(UID_LEN), [peer])[-PEER_BLOCK - 1:-1])


_RET_DROP = _pack([(RET, 0, 0, DROP)])


@functools.lru_cache(maxsize=8)
def _compiled(uid: bytes, peers: tuple[bytes, ...] | None, channeldata: bool) -> tuple[bytes, int]:
    """The program packed for the kernel, and its length in instructions: the same as packing
    ``program``, but assembled from cached parts (the head and one block per peer), so a mesh
    whose peer set grows by one with each new link does not build N programs of N peers."""
    if peers is None or len(peers) > MAX_PEERS or any(len(u) != UID_LEN for u in peers):
        prog = program(uid, peers, channeldata=channeldata)
        return _pack(prog), len(prog)
    if len(uid) != UID_LEN:
        raise ValueError("uid must be 20 bytes")
    code = b"".join([_head(uid, channeldata), *map(_peer_block, peers), _RET_DROP])
    return code, len(code) // INSN_SIZE


def attach(sock: socket.socket, uid: bytes, peers: Iterable[bytes] | None = None) -> bool:
    """Attach (or replace) the filter on ``sock``; ChannelData passes only on a connected
    socket.  False if the kernel refused (the data plane then drops the same datagrams in
    Python)."""
    try:
        sock.getpeername()
        connected = True
    except OSError:
        connected = False
    known = None if peers is None else tuple(sorted(set(peers)))
    code, count = _compiled(uid, known, connected)
    buf = ctypes.create_string_buffer(code)
    fprog = struct.pack("HxxxxxxP", count, ctypes.addressof(buf))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True


def detach(sock: socket.socket) -> None:
    """Remove the filter (a socket given back to its owner)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError:
        pass


def kernel_drops(sock: socket.socket) -> int:
    """Datagrams the kernel dropped for ``sock`` (the filter's, and a full receive queue's);
    0 where the kernel does not say."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * (SK_MEMINFO_DROPS + 1))
    except OSError:
        return 0
    if len(raw) < 4 * (SK_MEMINFO_DROPS + 1):
        return 0
    return int(struct.unpack_from("I", raw, 4 * SK_MEMINFO_DROPS)[0])
