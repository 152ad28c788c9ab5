"""Test doubles that ship with the package (as trio's ``trio.testing``): the data plane's parts
run in memory with these, with no TUN, no sockets and no sleeping.

* ``Clock``: a fake monotonic clock, advanced by hand or a step per call.
* ``FakeSocket``: stands in for a UDP socket; what is sent is recorded datagram by datagram
  (a UDP GSO train is cut as the kernel cuts it), and a ``LossyNetwork`` may carry it.
* ``LossyNetwork``: a seeded terrible network that drops, duplicates and reorders datagrams.
* ``MemoryDevice``: a TUN stand-in whose fd keeps packet boundaries (a ``SOCK_SEQPACKET``
  pair): what the test writes to ``peer`` the data plane reads from ``fd``, and back.
* ``keyed_pair``: two ``CryptoSession``s keyed by a real DTLS handshake in memory.

Only the fuzz targets and the tests use this module; nothing in the node imports it.
"""

from __future__ import annotations

import os
import random
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ipop.crypto.session import CryptoSession

__all__ = ["Clock", "FakeSocket", "LossyNetwork", "MemoryDevice", "keyed_pair"]

Addr = tuple[str, int]
_SOL_UDP = 17
_UDP_SEGMENT = 103


class Clock:
    """A fake monotonic clock: ``now`` moves by ``step`` on every call (0: only by
    ``advance``)."""

    def __init__(self, start: float = 1000.0, step: float = 0.01) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class FakeSocket:
    """Stands in for a UDP socket of the data plane: a file number, a local address, and
    ``sendmsg`` that records each datagram as ``(datagram, destination)`` in ``sent`` (or
    hands it to ``network``; with ``record=False`` it only counts them, in ``count``).  A
    ``(SOL_UDP, UDP_SEGMENT, size)`` control message cuts the buffers into datagrams of ``size``
    bytes, as the kernel does for a GSO train."""

    _next_fd = 1000

    def __init__(self, name: Addr = ("::", 5800), network: LossyNetwork | None = None, *,
                 record: bool = True) -> None:
        FakeSocket._next_fd += 1
        self._fd = FakeSocket._next_fd
        self.name = name
        self.network = network
        self.record = record
        self.sent: list[tuple[bytes, Addr]] = []
        self.count = 0  # datagrams sent
        self.calls = 0  # sendmsg calls (one per GSO train)

    def fileno(self) -> int:
        return self._fd

    def getsockname(self) -> Addr:
        return self.name

    def setblocking(self, flag: bool) -> None:
        pass

    def sendmsg(self, buffers: Iterable[Any], ancdata: Iterable[tuple[int, int, bytes]] = (),
                flags: int = 0, address: Addr | None = None) -> int:
        data = b"".join(bytes(b) for b in buffers)
        size = 0
        for level, kind, value in ancdata:
            if level == _SOL_UDP and kind == _UDP_SEGMENT:
                size = int.from_bytes(value, sys.byteorder)
        dest: Addr = address if address is not None else ("", 0)
        pieces = [data[i : i + size] for i in range(0, len(data), size)] if size else [data]
        self.calls += 1
        self.count += len(pieces)
        if not self.record:
            return len(data)
        for piece in pieces:
            if self.network is not None:
                self.network.send(self, piece, dest)
            else:
                self.sent.append((piece, dest))
        return len(data)

    def take(self) -> list[tuple[bytes, Addr]]:
        """What was sent since the last ``take``."""
        out, self.sent = self.sent, []
        return out


@dataclass
class LossyNetwork:
    """Carries datagrams between ``FakeSocket``s as a bad network would, from a seed: each is
    lost with ``loss``, sent twice with ``dup``, and ``deliver`` hands them over with each
    held back by up to ``reorder`` places.  ``lost``/``duplicated`` count what it did."""

    seed: int
    loss: float = 0.0
    dup: float = 0.0
    reorder: int = 0
    queue: list[tuple[FakeSocket, bytes, Addr]] = field(default_factory=list)
    lost: int = 0
    duplicated: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def send(self, sock: FakeSocket, data: bytes, dest: Addr) -> None:
        if self.rng.random() < self.loss:
            self.lost += 1
            return
        self.queue.append((sock, data, dest))
        if self.rng.random() < self.dup:
            self.duplicated += 1
            self.queue.append((sock, data, dest))

    def deliver(self) -> list[tuple[FakeSocket, bytes, Addr]]:
        """Everything in flight, in the order it arrives (shuffled within ``reorder``)."""
        held, self.queue = self.queue, []
        if self.reorder:
            keyed = [(i + self.rng.uniform(0, self.reorder), item) for i, item in enumerate(held)]
            held = [item for _, item in sorted(keyed, key=lambda k: k[0])]
        return held


class MemoryDevice:
    """A TUN stand-in: ``fd`` is what the data plane reads and writes (``Device.fd``),
    ``peer`` the test's end; each ``os.write`` is one packet."""

    def __init__(self, *, tap: bool = False, vnet_hdr: bool = False,
                 mac: bytes | None = None) -> None:
        self._ends = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.fd = self._ends[0].fileno()
        self.peer = self._ends[1]
        self.peer.setblocking(False)
        self.name = "mem0"
        self.tap = tap
        self.vnet_hdr = vnet_hdr
        self.mac = mac

    def inject(self, packets: Sequence[bytes]) -> None:
        """Packets the host sends into the device (the data plane reads them)."""
        for pkt in packets:
            os.write(self.peer.fileno(), pkt)

    def written(self) -> list[bytes]:
        """Packets the data plane wrote to the device since the last call."""
        out = []
        while True:
            try:
                out.append(self.peer.recv(1 << 17))
            except BlockingIOError:
                return out

    def close(self) -> None:
        for end in self._ends:
            end.close()
        self.fd = -1


def keyed_pair(clock: Clock) -> tuple[CryptoSession, CryptoSession]:
    """Two sessions keyed by a real DTLS handshake in memory (the first is the server)."""
    from ipop.crypto.identity import Identity
    from ipop.crypto.session import CryptoSession

    ours_id, theirs_id = Identity.generate(), Identity.generate()
    ours = CryptoSession(ours_id, is_client=False, expected_fingerprint=theirs_id.fingerprint,
                         expected_uid=theirs_id.uid, suite=None)
    theirs = CryptoSession(theirs_id, is_client=True, expected_fingerprint=ours_id.fingerprint,
                           expected_uid=ours_id.uid, suite=None)
    to_ours = theirs.start(clock())
    for _ in range(20):
        to_theirs = [d for x in to_ours for d in ours.handle_handshake_datagram(x, clock())]
        to_ours = [d for x in to_theirs for d in theirs.handle_handshake_datagram(x, clock())]
        if ours.ready and theirs.ready and not to_ours:
            break
    if not (ours.ready and theirs.ready):
        raise RuntimeError("the in-memory DTLS handshake did not complete")
    return ours, theirs
