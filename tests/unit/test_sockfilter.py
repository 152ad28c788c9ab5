"""The kernel socket filter (``ipop.dataplane.sockfilter``) on real loopback UDP sockets:
what ipop reads passes, garbage is dropped before it is queued."""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipop.dataplane import sockfilter
from ipop.wire import header as wh
from ipop.wire import hello

UID = bytes(range(1, 21))
OTHER = bytes(range(101, 121))


def frames(dst: bytes) -> list[bytes]:
    out = [wh.pack(t, OTHER, dst) + b"payload" for t in (0x80, 0x84, 0x86, 0x87)]
    return [*out, bytes([0xBF]) + out[0][1:]]  # the top of the range the filter passes


def dtls(length: int, body: int) -> bytes:
    return bytes([22, 0xFE, 0xFD]) + bytes(8) + length.to_bytes(2, "big") + os.urandom(body)


PASS = [
    bytes.fromhex("0001 000c 2112a442") + os.urandom(24),  # STUN binding request
    bytes.fromhex("0101 0000 2112a442") + os.urandom(12),  # STUN response
    dtls(40, 40),  # DTLS handshake
    dtls(20, 60),  # two records in one datagram
    *frames(UID),
]
DROP = [
    b"",
    bytes([0x00, 0x01]) + os.urandom(30),  # STUN-looking, no cookie
    bytes.fromhex("0001 0000 2112a4"),  # too short for the cookie
    bytes.fromhex("0001 0100 2112a442") + os.urandom(12),  # STUN longer than the datagram
    bytes([22, 0x03, 0x03]) + os.urandom(40),  # TLS, not DTLS
    dtls(500, 40),  # a record longer than the datagram
    bytes([0x40, 0x00, 0x00, 0x04]) + b"abcd",  # ChannelData on a socket with no TURN server
    bytes([7]) + os.urandom(50),
    bytes([100]) + os.urandom(50),
    bytes([200]) + os.urandom(50),
    bytes([255]) * 60,
    *frames(OTHER),  # not for us
    frames(UID)[0][:40],  # header cut before the end of the destination UID
]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_filter_passes_ours_and_drops_garbage(family: int) -> None:
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    rx = socket.socket(family, socket.SOCK_DGRAM)
    tx = socket.socket(family, socket.SOCK_DGRAM)
    try:
        rx.bind((host, 0))
        assert sockfilter.attach(rx, UID)
        rx.settimeout(0.3)
        hi = hello.pack(OTHER, UID)  # ipop's hello on static links is STUN-shaped
        for dgram in [*DROP, hi, *PASS]:
            tx.sendto(dgram, rx.getsockname()[:2])
        got = []
        while True:
            try:
                got.append(rx.recv(4096))
            except TimeoutError:
                break
        assert got == [hi, *PASS]
        assert sockfilter.kernel_drops(rx) == len(DROP)  # each drop counted by the kernel
        sockfilter.detach(rx)
        tx.sendto(bytes([200]), rx.getsockname()[:2])
        assert rx.recv(10) == bytes([200])
    finally:
        rx.close()
        tx.close()


def received(rx: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(rx.recv(4096))
        except TimeoutError:
            return got


def test_source_uids_and_channeldata_on_a_connected_socket() -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        tx.bind(("127.0.0.1", 0))
        rx.connect(tx.getsockname())  # as aioice's TURN client socket is
        rx.settimeout(0.3)
        assert sockfilter.attach(rx, UID, [bytes(20), OTHER])
        chan = bytes([0x40, 0x00, 0x00, 0x04]) + b"abcd"
        stranger = wh.pack(0x80, bytes([9]) * 20, UID) + b"x"
        for dgram in (chan, stranger, *frames(UID)):
            tx.sendto(dgram, rx.getsockname())
        assert received(rx) == [chan, *frames(UID)]
        assert sockfilter.attach(rx, UID, [])  # no links: no frames at all
        for dgram in frames(UID):
            tx.sendto(dgram, rx.getsockname())
        assert received(rx) == []
    finally:
        rx.close()
        tx.close()


def test_program_shape() -> None:
    prog = sockfilter.program(UID, [bytes([i]) * 20 for i in range(sockfilter.MAX_PEERS)])
    assert len(prog) < 4096 and prog[-1] == (sockfilter.RET, 0, 0, 0)
    for i, (code, jt, jf, _k) in enumerate(prog):
        if code in (sockfilter.JEQ, sockfilter.JGT, sockfilter.JGE):
            assert i + 1 + jt < len(prog) and i + 1 + jf < len(prog)
    with pytest.raises(ValueError):
        sockfilter.program(b"short")


def test_a_new_peer_passes_its_own_socket_at_once_and_the_others_once_links_settle() -> None:
    """``Inbound.filters_changed``: the new link's socket takes the new peer set at once; the
    other sockets only in ``refresh_due``, after ``FILTER_SETTLE`` without a change or at most
    ``FILTER_LAG_MAX`` after the first one."""
    from types import SimpleNamespace
    from typing import Any

    from ipop.dataplane import inbound as ib
    from ipop.dataplane.table import ForwardingTable

    table = ForwardingTable()
    dev: Any = SimpleNamespace(tap=False, fd=-1, vnet_hdr=False, mac=None)
    rx = ib.Inbound(dev, table, UID, on_control=lambda *a: None, on_roam=lambda *a: None)
    own, other = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for s in (own, other):
            s.bind(("127.0.0.1", 0))
            assert rx.add_socket(s)
            s.settimeout(0.3)
        frame = frames(UID)[0]  # from OTHER
        table.by_uid[OTHER] = SimpleNamespace()  # what the filters read: the links' peer UIDs
        rx.filters_changed(own, now=100.0)
        for s in (own, other):
            tx.sendto(frame, s.getsockname())
        assert received(own) == [frame] and received(other) == []
        assert not rx.refresh_due(100.0 + ib.FILTER_SETTLE / 2)
        rx.filters_changed(now=100.0 + ib.FILTER_SETTLE / 2)  # another change: wait on
        assert not rx.refresh_due(100.0 + ib.FILTER_SETTLE)
        assert rx.refresh_due(100.0 + ib.FILTER_SETTLE * 1.5)
        assert rx.filters_stale_since is None and not rx.refresh_due(200.0)
        tx.sendto(frame, other.getsockname())
        assert received(other) == [frame]
        # changes that never settle still reach every socket after FILTER_LAG_MAX
        t = 300.0
        rx.filters_changed(now=t)
        while not rx.refresh_due(t):
            t += ib.FILTER_SETTLE / 2
            rx.filters_changed(now=t)
        assert t - 300.0 >= ib.FILTER_LAG_MAX and t - 300.0 < ib.FILTER_LAG_MAX + ib.FILTER_SETTLE
    finally:
        for s in (own, other, tx):
            s.close()


@given(st.lists(st.binary(min_size=20, max_size=20), max_size=40), st.booleans())
def test_assembled_program_equals_the_built_one(peers: list[bytes], channeldata: bool) -> None:
    """``_compiled`` assembles the program from cached parts; it must equal ``program``."""
    known = tuple(sorted(set(peers)))
    code, count = sockfilter._compiled(UID, known, channeldata)
    prog = sockfilter.program(UID, known, channeldata=channeldata)
    assert count == len(prog)
    assert code == b"".join(struct.pack("HBBI", *i) for i in prog)


def test_assembled_program_falls_back_past_max_peers() -> None:
    many = tuple(sorted(i.to_bytes(20, "big") for i in range(sockfilter.MAX_PEERS + 1)))
    _code, count = sockfilter._compiled(UID, many, False)
    assert count == len(sockfilter.program(UID, None))  # frames not checked by source UID
