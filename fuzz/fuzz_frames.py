"""Fuzz target: underlay datagrams through the data plane's receive path, with no sockets.

One input is one datagram, handed to ``Inbound.receive`` exactly as the poll thread hands it a
datagram it read: first-byte demultiplexing (RFC 7983), TURN ChannelData unwrapping, the frame
header, the source check of a plain link, AEAD opening and the replay window of an encrypted link
(a real ``CryptoSession``, keyed by a real DTLS handshake at start-up), keepalive parsing and the
echo it sends.  DTLS datagrams that the demux hands up go on into the handshake demux of a server
``CryptoSession``, as the node does with them.  ``ipop.wire.header.parse`` and
``ipop.wire.keepalive.parse`` see every input as well.

The first input byte picks how the rest is used, so the fuzzer reaches past the 40 UID bytes::

    0  the rest is the datagram, as is
    1  a plain link's header + the rest                  (from its own or another address)
    2  the encrypted link's header + the rest            (sealed part forged by the fuzzer)
    3  the encrypted link's header + a real seal of the rest, then one byte changed (or none)
    4  case 1, 2 or 3 inside TURN ChannelData            (channel and length from the input)

Passing means: nothing but ``RemoteProtocolError`` (counted and dropped) ever escapes, and the
device only receives payloads that a plain link's own path sent or that authenticated.

Run it (libFuzzer options after the script; a corpus directory is optional)::

    .venv/bin/python fuzz/fuzz_frames.py -atheris_runs=100000
"""

from __future__ import annotations

import contextlib
import socket
import sys
from types import SimpleNamespace
from typing import Any


def _instrumented() -> contextlib.AbstractContextManager[object]:
    """Coverage instrumentation of ipop's modules when run as a fuzzer; nothing under pytest."""
    if __name__ != "__main__":
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=["ipop"])


with _instrumented():
    from ipop.crypto.identity import Identity
    from ipop.crypto.session import CryptoSession
    from ipop.dataplane.inbound import Inbound
    from ipop.dataplane.link import Link, Path
    from ipop.dataplane.link_rx import WRITES, Result
    from ipop.dataplane.table import ForwardingTable
    from ipop.errors import RemoteProtocolError
    from ipop.testing import Clock, FakeSocket, keyed_pair
    from ipop.wire import header as wh
    from ipop.wire import keepalive as wk
    from ipop.wire import train as wt


LOCAL = bytes.fromhex("33" * 20)
PLAIN_PEER = bytes.fromhex("11" * 20)
SEALED_PEER = bytes.fromhex("22" * 20)
PLAIN_ADDR = ("::ffff:198.19.1.2", 5800)
SEALED_ADDR = ("::ffff:198.19.1.3", 5800)
OTHER_ADDR = ("::ffff:198.19.1.9", 5800)


class Harness:
    """An ``Inbound`` with one plain and one encrypted link, and a device that only counts."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.sock = FakeSocket(record=False)
        self.session, self.peer_session = keyed_pair(self.clock)
        self.handshake_session = CryptoSession(
            Identity.generate(), is_client=False,
            expected_fingerprint=Identity.generate().fingerprint, suite=None)
        sock: Any = self.sock
        self.table = ForwardingTable()
        self.plain = Link(local_uid=LOCAL, peer_uid=PLAIN_PEER, path=Path(sock, PLAIN_ADDR),
                          overlay_ip4=bytes([100, 64, 0, 2]))
        self.sealed = Link(local_uid=LOCAL, peer_uid=SEALED_PEER, path=Path(sock, SEALED_ADDR),
                           overlay_ip4=bytes([100, 64, 0, 3]), encrypted=True)
        self.sealed.session = self.session
        self.plain.authed = self.sealed.authed = True  # both handshakes done (``Keying``)
        self.table.add(self.plain)
        self.table.add(self.sealed)
        # what the peer's end would put in a header: its UID as source, ours as destination
        self.hdr = {
            PLAIN_PEER: (wh.pack(wh.T_DATA, PLAIN_PEER, LOCAL),
                         wh.pack(wh.T_KEEPALIVE, PLAIN_PEER, LOCAL),
                         wh.pack(wh.T_TRAIN, PLAIN_PEER, LOCAL)),
            SEALED_PEER: (wh.pack(wh.T_DATA_SEALED, SEALED_PEER, LOCAL),
                          wh.pack(wh.T_KEEPALIVE_SEALED, SEALED_PEER, LOCAL),
                          wh.pack(wh.T_TRAIN_SEALED, SEALED_PEER, LOCAL)),
        }
        self.roamed = 0
        dev: Any = SimpleNamespace(tap=False, fd=-1, vnet_hdr=False)
        self.inbound = Inbound(dev, self.table, LOCAL, on_control=self._on_control,
                               on_roam=self._on_roam)

    def _on_control(self, sock: socket.socket, data: bytes, addr: tuple[str, int],
                    channel: int | None, link: Link | None) -> None:
        if wh.is_dtls(data):  # DTLS: the node hands it to the link's session
            self.handshake_session.handle_handshake_datagram(data, self.clock())

    def _on_roam(self, link: Link, *where: Any) -> None:  # (sock,) addr: the peer moved
        self.roamed += 1

    def datagram(self, data: bytes) -> tuple[bytes, tuple[str, int], bool]:
        """(datagram, source address, whether a payload may reach the device) for one input."""
        if not data:
            return b"", PLAIN_ADDR, False
        mode, rest = data[0] % 5, data[1:]
        wrap = mode == 4
        if wrap:
            mode = 1 + (rest[0] % 3 if rest else 0)
            rest = rest[1:]
        if mode == 0:
            addr = OTHER_ADDR if len(rest) % 2 else PLAIN_ADDR
            dgram, may = rest, addr == PLAIN_ADDR
        elif mode == 1:
            kind = rest[0] if rest else 0
            addr = PLAIN_ADDR if kind & 1 else OTHER_ADDR
            dgram = self.hdr[PLAIN_PEER][(kind >> 1) % 3] + rest[1:]
            may = addr == PLAIN_ADDR
        elif mode == 2:
            kind = rest[0] if rest else 0
            dgram = self.hdr[SEALED_PEER][(kind >> 1) % 3] + rest[1:]
            addr, may = SEALED_ADDR, False  # the fuzzer cannot forge a tag
        else:
            kind = rest[0] if rest else 0
            hdr = self.hdr[SEALED_PEER][(kind >> 1) % 3]
            body = rest[3:]
            if hdr[0] == wh.T_KEEPALIVE_SEALED and kind & 4:
                body = wk.pack(wk.OP_PROBE if kind & 8 else wk.OP_ECHO, len(body))
            # a sealed train here is one whole chunk: train header, then the sealed blob
            train = wt.TRAIN.pack(len(body), 0, 1) if hdr[0] == wh.T_TRAIN_SEALED else b""
            dgram = bytearray(hdr + train + self.peer_session.seal(hdr, body))
            changed = len(rest) > 2 and rest[1] & 1
            if changed:
                dgram[rest[2] % len(dgram)] ^= 1 << (rest[1] >> 5)
            dgram = bytes(dgram)
            addr, may = SEALED_ADDR if kind & 16 else OTHER_ADDR, not changed
        if wrap:  # relayed: a plain link never takes it, and a cut frame never authenticates
            channel, cut = 0x4000 | data[-1], data[-1] % 4
            dgram = (channel.to_bytes(2, "big") + max(len(dgram) - cut, 0).to_bytes(2, "big")
                     + dgram)
            may = may and mode == 3 and not cut
        return dgram, addr, may

    def feed(self, data: bytes) -> Result | None:
        """One input: the receive path's result (None when a ``RemoteProtocolError`` escaped,
        which the poll thread counts and drops)."""
        for parse in (wh.parse, wk.parse):
            try:
                parse(data)
            except RemoteProtocolError:
                pass
        dgram, addr, may = self.datagram(data)
        sock: Any = self.sock
        try:
            result = self.inbound.receive(sock, memoryview(dgram), addr)
        except RemoteProtocolError:
            return None
        if result[0] in WRITES and not may:
            raise AssertionError(f"a payload reached the device from {addr}: {dgram.hex()}")
        return result


_HARNESS: Harness | None = None


def TestOneInput(data: bytes) -> None:  # the name atheris and libFuzzer expect
    global _HARNESS
    if _HARNESS is None:
        _HARNESS = Harness()
    _HARNESS.feed(bytes(data))


def main() -> None:
    import atheris

    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
