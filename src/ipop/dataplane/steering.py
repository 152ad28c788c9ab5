"""Receive steering for shards: which socket of a ``SO_REUSEPORT`` group gets a datagram.

With ``workers: N`` (N > 1) every shard has its own UDP socket on the node's listen port, all in
one reuseport group, joined in shard order (shard ``k`` is the group's index ``k``; the control
process keeps every one of them open, so the indexes never shift when a shard process dies).
One classic BPF program (``SO_ATTACH_REUSEPORT_CBPF``) picks the socket from the datagram's
first byte, which the kernel hands the program after the UDP header::

    first byte 128..191 (an ipop frame): ((byte >> 3) & 7) % N   -- the sender's shard bits
    anything else (STUN, DTLS, TURN ChannelData, empty):  0      -- the control process

The shard bits are the sending shard's number (``ipop.wire.header``), so all frames of one
sender shard reach one receiving shard, and since the sender's TUN queue is chosen by the
kernel's flow hash, a flow stays on one shard at each end and keeps its order.  The bits are in
the AEAD's AAD: a datagram whose bits were changed on the way reaches another shard, where it
fails its tag.

Only sockets of the same effective UID can join a reuseport group (a kernel rule), so another
local user cannot bind into the node's port and take a share of its datagrams.
"""

from __future__ import annotations

import ctypes
import socket
import struct

from ipop.wire.header import FRAME_FIRST, MAX_SHARDS, SHARD_BITS, SHARD_SHIFT

SO_ATTACH_REUSEPORT_CBPF = 51

# classic BPF opcodes used here
LDB_ABS = 0x30  # A = packet[k] (a byte); outside the packet: the program returns 0
JGE_K = 0x35  # if A >= k: jt else jf
RSH_K = 0x74  # A >>= k
AND_K = 0x54  # A &= k
MOD_K = 0x94  # A %= k
RET_A = 0x16  # return A
RET_K = 0x06  # return k

Insn = tuple[int, int, int, int]  # code, jt, jf, k


def program(shards: int) -> list[Insn]:
    """The steering program for a group of ``shards`` sockets (2..8)."""
    if not 2 <= shards <= MAX_SHARDS:
        raise ValueError(f"a steering group has 2..{MAX_SHARDS} sockets, not {shards}")
    return [
        (LDB_ABS, 0, 0, 0),                    # 0: A = first byte of the UDP payload
        (JGE_K, 0, 5, FRAME_FIRST.start),      # 1: < 128 -> 7 (control)
        (JGE_K, 4, 0, FRAME_FIRST.stop),       # 2: >= 192 -> 7 (control)
        (RSH_K, 0, 0, SHARD_SHIFT),            # 3
        (AND_K, 0, 0, SHARD_BITS >> SHARD_SHIFT),  # 4: the sender's shard, 0..7
        (MOD_K, 0, 0, shards),                 # 5
        (RET_A, 0, 0, 0),                      # 6
        (RET_K, 0, 0, 0),                      # 7: socket 0, the control process's
    ]


def compiled(shards: int) -> bytes:
    """``program(shards)`` as the kernel's ``struct sock_filter`` array."""
    return b"".join(struct.pack("HBBI", *insn) for insn in program(shards))


def attach(sock: socket.socket, shards: int) -> None:
    """Give ``sock``'s reuseport group the steering program (one socket of the group is
    enough).  Raises OSError when the kernel refuses it."""
    code = compiled(shards)
    holder = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HxxxxxxP", len(code) // 8, ctypes.addressof(holder))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def group_sockets(port: int, shards: int) -> list[socket.socket]:
    """``shards`` UDP sockets (IPv6 and IPv4) bound to ``port`` in one reuseport group, in
    shard order (the first binds the port, when ``port`` is 0 the others take the port it
    got), with the steering program attached."""
    socks: list[socket.socket] = []
    try:
        for _ in range(shards):
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("::", port))
            port = sock.getsockname()[1]
        attach(socks[0], shards)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def run(prog: list[Insn], payload: bytes) -> int:
    """What ``prog`` returns for a UDP payload (a classic BPF interpreter for the opcodes above,
    for tests and ``ipop status``'s explanation; the kernel runs the real thing)."""
    a = 0
    pc = 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == LDB_ABS:
            if k >= len(payload):
                return 0
            a = payload[k]
        elif code == JGE_K:
            pc += jt if a >= k else jf
        elif code == RSH_K:
            a >>= k
        elif code == AND_K:
            a &= k
        elif code == MOD_K:
            a %= k
        elif code == RET_A:
            return a
        elif code == RET_K:
            return k
        else:
            raise ValueError(f"opcode 0x{code:02x}")
        pc += 1
