"""UDP with kernel batching: send a train of datagrams in one call (GSO), receive many (GRO).

Sending (``send_train``): a *train* is a run of datagrams that are all ``size`` bytes long but the
last, which is ``last <= size`` bytes.  It goes out in one ``sendmsg`` per 64 datagrams (and per
65507 bytes) with a ``(SOL_UDP, UDP_SEGMENT, size)`` control message: the kernel cuts the buffers
into datagrams at every ``size`` bytes, so the sizes the caller states must be true.  The
datagrams are given flat, ``stride`` buffers each (the layout ``segment.Segments`` produces), so
no per-datagram Python work is needed.  When the kernel refuses GSO on a socket (EIO, EINVAL:
no checksum offload on the route, UDP checksums off, ...) and sending the same datagrams one by
one works, the socket is remembered and served one datagram per ``sendmsg`` from then on (logged
once).  ``send_datagrams`` takes a list of datagrams of any sizes and sends runs of equal size as
trains.

Receiving (``recv_batch``): with ``enable_gro`` the kernel hands several datagrams of one sender in
one read, back to back, all ``gso_size`` bytes but the last; ``split_gro`` cuts them apart again.
Datagrams of every kind (STUN, DTLS, TURN, ours) can arrive so batched, so every read must be split.

Errors: ``send_train`` returns ``(datagrams sent, errno of the first failure or 0)`` and never
raises OSError (with ``wait_ms`` it first waits, once, for a full send buffer to drain).
``recv_batch`` raises what ``recvmsg_into`` raises (``BlockingIOError`` when the socket is
drained) and ``MalformedFrame`` (reason ``truncated_batch``) for a datagram or batch larger than
the buffer (``RECV_BUFFER`` is enough unless the underlay device has a gro_max_size above 64 KB).
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import sys
import weakref
from collections.abc import Callable, Sequence
from itertools import repeat
from operator import getitem as _getitem
from typing import Any

from ipop.dataplane.segment import cuts
from ipop.errors import MalformedFrame
from ipop.wire.vnet import Buf

_slice_of: Callable[[Any, slice], Buf] = _getitem  # typed alias: C-level calls in map()

log = logging.getLogger("ipop.dataplane")

SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h
UDP_GRO = 104
MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS of older kernels (6.x accepts 128)
MAX_TRAIN_BYTES = 65507  # largest UDP payload over IPv4 (and IPv4-mapped IPv6)
RECV_BUFFER = 65536 + 64  # a recv_batch buffer this large never truncates
_GSO_REFUSED = frozenset({errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT})
_CMSG_SPACE = socket.CMSG_SPACE(4)
_MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: an IntFlag "&" runs Python code per read

_no_gso: weakref.WeakSet[socket.socket] = weakref.WeakSet()
_cmsgs: dict[int, list[tuple[int, int, bytes]]] = {}
_warned = False


def enable_gro(sock: socket.socket) -> bool:
    """Ask the kernel to hand ``sock`` batches of datagrams (UDP_GRO); False if it cannot."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def gso_usable(sock: socket.socket) -> bool:
    """False once the kernel has refused GSO on ``sock`` (see ``send_train``)."""
    return sock not in _no_gso


def _gso_cmsg(size: int) -> list[tuple[int, int, bytes]]:
    cmsg = _cmsgs.get(size)
    if cmsg is None:
        cmsg = _cmsgs[size] = [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))]
    return cmsg


def send_train(
    sock: socket.socket,
    addr: Any,
    parts: Sequence[Buf],
    stride: int,
    size: int,
    last: int,
    *,
    wait_ms: int = 0,
) -> tuple[int, int]:
    """Send the datagrams ``parts`` (``stride`` buffers each; all ``size`` bytes but the last,
    which is ``last`` bytes) to ``addr``.  Returns (datagrams sent, errno or 0).

    On a non-blocking socket whose send buffer is full (EAGAIN), wait up to ``wait_ms`` for it
    to drain, once per call, and go on; with 0, return at once.
    """
    count = len(parts) // stride
    per_call = min(MAX_SEGMENTS, MAX_TRAIN_BYTES // size) if size > 0 else 0
    if count == 1 or per_call < 2 or last > size or sock in _no_gso:
        return _one_by_one(sock, addr, parts, stride, 0, count, wait_ms)
    cmsg = _gso_cmsg(size)
    sendmsg = sock.sendmsg
    sent = 0
    step = per_call * stride
    start = 0
    end = count * stride
    while start < end:
        chunk = parts[start : start + step]
        try:
            sendmsg(chunk, cmsg if len(chunk) > stride else (), 0, addr)
        except BlockingIOError:
            if wait_ms > 0 and _writable(sock, wait_ms):
                wait_ms = 0
                continue
            return sent, errno.EAGAIN
        except OSError as exc:
            if exc.errno not in _GSO_REFUSED:
                return sent, exc.errno or errno.EIO
            done, err = _one_by_one(sock, addr, parts, stride, sent, count, wait_ms)
            if not err:
                _refused(sock, exc)
            return sent + done, err
        sent += len(chunk) // stride
        start += step
    return sent, 0


def _writable(sock: socket.socket, wait_ms: int) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    return bool(poller.poll(wait_ms))


def _refused(sock: socket.socket, exc: OSError) -> None:
    global _warned
    _no_gso.add(sock)
    if not _warned:
        _warned = True
        log.warning("UDP GSO refused (%s); sending one datagram per call on such sockets",
                    exc.strerror or exc)


def _one_by_one(
    sock: socket.socket, addr: Any, parts: Sequence[Buf], stride: int, first: int, count: int,
    wait_ms: int = 0,
) -> tuple[int, int]:
    sendmsg = sock.sendmsg
    k = first
    while k < count:
        try:
            sendmsg(parts[k * stride : (k + 1) * stride], (), 0, addr)
        except BlockingIOError:
            if wait_ms > 0 and _writable(sock, wait_ms):
                wait_ms = 0
                continue
            return k - first, errno.EAGAIN
        except OSError as exc:
            return k - first, exc.errno or errno.EIO
        k += 1
    return count - first, 0


def send_datagrams(
    sock: socket.socket, addr: Any, datagrams: Sequence[Sequence[Buf]]
) -> tuple[int, int]:
    """Send datagrams of any sizes (each a list of buffers), runs of equal size as GSO trains.

    Returns (datagrams sent, errno of the first failure or 0); stops at the first failure.
    """
    sizes = [sum(map(len, d)) for d in datagrams]
    sent = 0
    n = len(datagrams)
    i = 0
    while i < n:
        size = sizes[i]
        j = i + 1
        while j < n and sizes[j] == size:
            j += 1
        if j < n and sizes[j] < size:
            j += 1  # a shorter datagram may end a train
        group = datagrams[i:j]
        stride = max(map(len, group))
        parts: list[Buf] = []
        for d in group:  # pad every datagram to ``stride`` buffers
            parts.extend(d)
            parts.extend(repeat(b"", stride - len(d)))
        done, err = send_train(sock, addr, parts, stride, size, sizes[j - 1])
        sent += done
        if err:
            return sent, err
        i = j
    return sent, 0


def recv_batch(sock: socket.socket, buf: bytearray | memoryview) -> tuple[int, Any, int]:
    """Read one datagram or GRO batch into ``buf``: (bytes, source address, segment size).

    The segment size is the size of every datagram in the batch but the last (``n`` when
    the kernel did not batch).  The address is (host, port) (AF_INET6 extras dropped).
    """
    n, anc, flags, addr = sock.recvmsg_into([buf], _CMSG_SPACE)
    if flags & _MSG_TRUNC:
        raise MalformedFrame("datagram larger than the receive buffer", reason="truncated_batch")
    gso = n
    for level, kind, data in anc:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
            gso = int.from_bytes(data[:4] if len(data) >= 4 else data[:2], sys.byteorder)
    if gso <= 0:
        gso = n
    return n, addr[:2], gso


def split_gro(view: memoryview, n: int, gso_size: int, skip: int = 0) -> list[memoryview]:
    """The datagrams of a batch of ``n`` bytes at the start of ``view``: views, in order,
    each without its first ``skip`` bytes (e.g. a frame header already checked)."""
    if n <= gso_size or gso_size <= 0:
        return [view[skip:n]]
    data = view[:n]
    return list(map(data.__getitem__, cuts(0, gso_size, -(-n // gso_size), skip)))


def same_prefix(datagrams: Sequence[Buf], prefix: bytes) -> bool:
    """True when every datagram starts with ``prefix`` (one C-level pass over the batch):
    e.g. all frames of a GRO batch carry one frame type and one pair of UIDs."""
    if not datagrams:
        return True
    head = slice(0, len(prefix))
    return b"".join(map(_slice_of, datagrams, repeat(head))) == prefix * len(datagrams)
