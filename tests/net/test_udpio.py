"""udpio on loopback (127.0.0.1): GSO trains out, GRO batches in, and the fallbacks.

Loopback keeps a GSO train whole up to a UDP_GRO socket, which gets it as one batch; a socket
without UDP_GRO gets the datagrams one by one.  Either way the boundaries must be exact.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Iterator

import pytest

from ipop.dataplane import coalesce as co
from ipop.dataplane import segment as sg
from ipop.dataplane import udpio
from ipop.errors import MalformedFrame
from ipop.wire import vnet

SO_NO_CHECK = 11  # asm-generic/socket.h: UDP checksums off -> the kernel refuses GSO (EINVAL)


class CountingSocket(socket.socket):
    """A UDP socket that records, per sendmsg call, how many control messages it carried."""

    def __init__(self, family: int = socket.AF_INET) -> None:
        super().__init__(family, socket.SOCK_DGRAM)
        self.calls: list[int] = []

    def sendmsg(self, buffers, ancdata=(), flags=0, address=None):  # type: ignore[override]
        self.calls.append(len(ancdata))
        return super().sendmsg(buffers, ancdata, flags, address)


@pytest.fixture
def rx() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("127.0.0.1", 0))
    s.settimeout(2.0)
    yield s
    s.close()


@pytest.fixture
def tx() -> Iterator[CountingSocket]:
    s = CountingSocket()
    s.bind(("127.0.0.1", 0))
    yield s
    s.close()


def make_datagrams(sizes: list[int]) -> list[bytes]:
    """Datagrams that name their own index, filled with a pattern."""
    return [struct.pack("!I", i) + bytes([i & 0xFF]) * (n - 4) for i, n in enumerate(sizes)]


def as_train(dgrams: list[bytes]) -> tuple[list[bytes | memoryview], int]:
    """Split each datagram in two buffers (stride 2), as segment() lays out header + payload."""
    parts: list[bytes | memoryview] = []
    for d in dgrams:
        parts += [d[:7], memoryview(d)[7:]]
    return parts, 2


def receive(rx: socket.socket, count: int, gro: bool) -> tuple[list[bytes], list[int]]:
    """``count`` datagrams from ``rx`` and the number of datagrams in each read."""
    buf = bytearray(udpio.RECV_BUFFER)
    view = memoryview(buf)
    got: list[bytes] = []
    reads: list[int] = []
    while len(got) < count:
        if gro:
            n, _addr, gso = udpio.recv_batch(rx, buf)
            parts = udpio.split_gro(view, n, gso)
        else:
            parts = [rx.recv(70000)]
        reads.append(len(parts))
        got += [bytes(p) for p in parts]
    return got, reads


@pytest.mark.parametrize("gro", [False, True])
@pytest.mark.parametrize("last", [1000, 517, 5])
def test_train_of_40_in_one_call(rx, tx, gro, last):
    if gro:
        assert udpio.enable_gro(rx)
    dgrams = make_datagrams([1000] * 39 + [last])
    parts, stride = as_train(dgrams)
    assert udpio.send_train(tx, rx.getsockname(), parts, stride, 1000, last) == (40, 0)
    assert tx.calls == [1]  # one sendmsg, with the UDP_SEGMENT control message
    got, reads = receive(rx, 40, gro)
    assert got == dgrams
    if gro:
        assert reads == [40]  # loopback hands the whole train to a GRO socket at once
    else:
        assert reads == [1] * 40


def test_long_trains_are_cut_by_count_and_bytes(rx, tx):
    assert udpio.enable_gro(rx)
    dgrams = make_datagrams([200] * 100 + [7])
    assert udpio.send_train(tx, rx.getsockname(), *as_train(dgrams), 200, 7) == (101, 0)
    assert tx.calls == [1, 1]  # 64 + 37 datagrams
    assert receive(rx, 101, True)[0] == dgrams
    tx.calls.clear()
    dgrams = make_datagrams([1400] * 50)
    assert udpio.send_train(tx, rx.getsockname(), *as_train(dgrams), 1400, 1400) == (50, 0)
    assert tx.calls == [1, 1]  # 65507 // 1400 = 46 datagrams per call at most
    assert receive(rx, 50, True)[0] == dgrams


def test_a_single_datagram_or_an_odd_train_goes_without_gso(rx, tx):
    dgrams = make_datagrams([300])
    assert udpio.send_train(tx, rx.getsockname(), *as_train(dgrams), 300, 300) == (1, 0)
    dgrams2 = make_datagrams([300, 400])  # last > size: no valid train, sent one by one
    assert udpio.send_train(tx, rx.getsockname(), *as_train(dgrams2), 300, 400) == (2, 0)
    assert tx.calls == [0, 0, 0]
    assert receive(rx, 3, False)[0] == dgrams + dgrams2


def test_kernel_refusal_falls_back_and_is_remembered(rx, tx, caplog):
    tx.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    udpio._warned = False
    dgrams = make_datagrams([500] * 10 + [100])
    with caplog.at_level(logging.WARNING, logger="ipop.dataplane"):
        assert udpio.send_train(tx, rx.getsockname(), *as_train(dgrams), 500, 100) == (11, 0)
        assert tx.calls == [1] + [0] * 11  # GSO tried once (EINVAL), then one by one
        assert not udpio.gso_usable(tx)
        tx.calls.clear()
        assert udpio.send_train(tx, rx.getsockname(), *as_train(dgrams), 500, 100) == (11, 0)
        assert tx.calls == [0] * 11  # not tried again on this socket
    assert len([r for r in caplog.records if "GSO refused" in r.message]) == 1
    assert receive(rx, 22, False)[0] == dgrams + dgrams


def test_too_big_is_an_error_not_a_refusal(rx, tx):
    big = make_datagrams([66000, 66000])  # larger than any UDP datagram: EMSGSIZE either way
    sent, err = udpio.send_train(tx, rx.getsockname(), *as_train(big), 66000, 66000)
    assert (sent, err) == (0, errno.EMSGSIZE)
    assert udpio.gso_usable(tx)


class OversizeSocket(CountingSocket):
    """GSO refused with EINVAL because a segment exceeds the MTU; one by one fails too."""

    def sendmsg(self, buffers, ancdata=(), flags=0, address=None):  # type: ignore[override]
        self.calls.append(len(ancdata))
        raise OSError(errno.EINVAL if ancdata else errno.EMSGSIZE, "no")


def test_refusal_for_size_is_not_remembered(rx):
    with OversizeSocket() as tx:
        dgrams = make_datagrams([3000] * 4)
        sent, err = udpio.send_train(tx, rx.getsockname(), *as_train(dgrams), 3000, 3000)
        assert (sent, err) == (0, errno.EMSGSIZE)
        assert tx.calls == [1, 0]
        assert udpio.gso_usable(tx)


class RefusingSocket(CountingSocket):
    def sendmsg(self, buffers, ancdata=(), flags=0, address=None):  # type: ignore[override]
        if ancdata:
            self.calls.append(len(ancdata))
            raise OSError(errno.EIO, "Input/output error")
        return super().sendmsg(buffers, ancdata, flags, address)


def test_eio_falls_back(rx):
    with RefusingSocket() as tx:
        dgrams = make_datagrams([300] * 5)
        assert udpio.send_train(tx, rx.getsockname(), *as_train(dgrams), 300, 300) == (5, 0)
        assert not udpio.gso_usable(tx)
        assert receive(rx, 5, False)[0] == dgrams


class FullSocket(CountingSocket):
    """A socket whose send buffer is full for the first ``full`` calls."""

    full = 1

    def sendmsg(self, buffers, ancdata=(), flags=0, address=None):  # type: ignore[override]
        if self.full:
            self.full -= 1
            self.calls.append(-1)
            raise BlockingIOError(errno.EAGAIN, "full")
        return super().sendmsg(buffers, ancdata, flags, address)


@pytest.mark.parametrize("sizes", [[300] * 5, [300]])
def test_full_send_buffer(rx, sizes):
    dgrams = make_datagrams(sizes)
    with FullSocket() as tx:
        sent = udpio.send_train(tx, rx.getsockname(), *as_train(dgrams), 300, 300)
        assert sent == (0, errno.EAGAIN)
        assert udpio.gso_usable(tx)
    with FullSocket() as tx:  # with a wait: the socket is writable again, the train goes out
        sent = udpio.send_train(tx, rx.getsockname(), *as_train(dgrams), 300, 300, wait_ms=50)
        assert sent == (len(sizes), 0) and tx.calls[0] == -1
    with FullSocket() as tx:  # waits once per call only
        tx.full = 2
        sent = udpio.send_train(tx, rx.getsockname(), *as_train(dgrams), 300, 300, wait_ms=50)
        assert sent == (0, errno.EAGAIN)
    assert receive(rx, len(sizes), False)[0] == dgrams


def test_send_datagrams_groups_runs_of_equal_size(rx, tx):
    assert udpio.enable_gro(rx)
    sizes = [100] * 5 + [50] + [200] * 3 + [10, 10, 10] + [999]
    dgrams = make_datagrams(sizes)
    lists = [[d[:3], d[3:]] if i % 2 else [d] for i, d in enumerate(dgrams)]  # mixed shapes
    assert udpio.send_datagrams(tx, rx.getsockname(), lists) == (len(dgrams), 0)
    # [100 x5 + 50] [200 x3 + 10] [10, 10] [999]
    assert tx.calls == [1, 1, 1, 0]
    assert receive(rx, len(dgrams), True)[0] == dgrams


def test_ipv6_dual_stack_socket(rx):
    with CountingSocket(socket.AF_INET6) as tx:
        tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        tx.bind(("::", 0))
        host, port = rx.getsockname()
        dgrams = make_datagrams([800] * 20 + [33])
        addr = ("::ffff:" + host, port)
        assert udpio.send_train(tx, addr, *as_train(dgrams), 800, 33) == (21, 0)
        assert tx.calls == [1]
        assert receive(rx, 21, False)[0] == dgrams


def test_recv_batch_without_gro_and_truncation(rx, tx):
    tx.sendto(b"hello", rx.getsockname())
    buf = bytearray(100)
    n, addr, gso = udpio.recv_batch(rx, buf)
    assert (n, gso, addr) == (5, 5, tx.getsockname())
    tx.sendto(b"x" * 200, rx.getsockname())
    with pytest.raises(MalformedFrame) as e:
        udpio.recv_batch(rx, buf)
    assert e.value.reason == "truncated_batch"


def test_recv_batch_on_a_drained_socket_raises_blockingioerror(rx):
    rx.setblocking(False)
    with pytest.raises(BlockingIOError):
        udpio.recv_batch(rx, bytearray(100))


def test_split_gro_and_same_prefix():
    view = memoryview(bytearray(b"aaabbbcc" + b"zzzz"))
    assert [bytes(p) for p in udpio.split_gro(view, 8, 3)] == [b"aaa", b"bbb", b"cc"]
    assert [bytes(p) for p in udpio.split_gro(view, 8, 8)] == [b"aaabbbcc"]
    assert [bytes(p) for p in udpio.split_gro(view, 6, 0)] == [b"aaabbb"]
    assert [bytes(p) for p in udpio.split_gro(view, 8, 3, skip=1)] == [b"aa", b"bb", b"c"]
    assert [bytes(p) for p in udpio.split_gro(view, 8, 8, skip=2)] == [b"abbbcc"]
    assert udpio.same_prefix([b"\x80abc1", memoryview(b"\x80abc22")], b"\x80abc")
    assert not udpio.same_prefix([b"\x80abc1", b"\x81abc2"], b"\x80abc")
    assert not udpio.same_prefix([b"\x80abc1", b"\x80a"], b"\x80abc")
    assert udpio.same_prefix([], b"x")


def _tso(payload: bytes) -> bytes:
    """A TCPv4 super-packet with a partial checksum (see tests/unit/test_segment.py)."""
    src, dst = bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2])
    tcp_len = 20 + len(payload)
    words = struct.unpack("!6H", src + dst + struct.pack("!BBH", 0, 6, tcp_len))
    seed = sum(words)
    while seed >> 16:
        seed = (seed & 0xFFFF) + (seed >> 16)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 42, 0x4000, 64, 6, 0, src, dst)
    s = sum(struct.unpack("!10H", ip))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    ip = ip[:10] + struct.pack("!H", 0xFFFF - s) + ip[12:]
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 5 << 4, 0x18, 500, seed, 0)
    return ip + tcp + payload


def test_segment_train_gro_coalesce_end_to_end(rx, tx):
    """TUN read -> segment -> one GSO sendmsg -> one GRO read -> coalesce -> the same packet."""
    assert udpio.enable_gro(rx)
    payload = bytes(range(256)) * 200  # 51200 bytes
    orig = _tso(payload)
    prefix = b"\x84" + bytes(40)  # a frame header: type byte + two UIDs
    hdr = vnet.VnetHdr(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 40, 1334, 20, 16)
    segs = sg.segment(hdr, orig, prefix)
    assert segs.datagrams == 39
    sent = udpio.send_train(tx, rx.getsockname(), segs.parts, segs.stride, segs.size, segs.last)
    assert sent == (39, 0) and tx.calls == [1]
    buf = bytearray(udpio.RECV_BUFFER)
    n, _, gso = udpio.recv_batch(rx, buf)
    frames = udpio.split_gro(memoryview(buf), n, gso)
    assert len(frames) == 39 and udpio.same_prefix(frames, prefix)
    inner = udpio.split_gro(memoryview(buf), n, gso, skip=len(prefix))
    assert [bytes(f[len(prefix) :]) for f in frames] == [bytes(x) for x in inner]
    out = co.coalesce(inner, True)
    assert len(out) == 1
    assert vnet.parse(out[0][0]).gso_size == 1334
    assert b"".join(out[0][1:]) == orig
