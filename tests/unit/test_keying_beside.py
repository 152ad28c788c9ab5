"""Keying without a network: every link's handshake gates its data, and a new link proven beside
a working one replaces it only once it proved the same UID (issue 16, part 1)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from ipop.crypto.identity import Identity
from ipop.dataplane import keying as keying_mod
from ipop.dataplane.keying import Keying
from ipop.dataplane.link import Link, Path

A, B = Identity.generate("a"), Identity.generate("b")


def _liar() -> Identity:
    """Another key on b's side of a's UID, so the DTLS roles agree and the handshake gets as
    far as the certificate (which then does not match the claimed UID)."""
    while True:
        ident = Identity.generate("liar")
        if (ident.uid < A.uid) == (B.uid < A.uid):
            return ident


LIAR = _liar()


class Net:
    """Two Keyings; what one sends on a link reaches the other's link with the same pair."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bytes, str]] = []
        self.promoted: list[Link] = []
        self.wire: list[tuple[Link, bytes]] = []
        self.socks: list[socket.socket] = []
        self.ka = Keying(A, rekey_seconds=120, on_event=lambda u, e: self.events.append(
            ("a", u, e)), on_promote=self.promoted.append)
        self.kb = Keying(B, rekey_seconds=120, on_event=lambda u, e: self.events.append(
            ("b", u, e)))
        self.pairs: dict[int, tuple[Keying, Link]] = {}

    def link(self, local: Identity, peer_uid: bytes) -> Link:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socks.append(sock)
        return Link(local_uid=local.uid, peer_uid=peer_uid,
                    path=Path(sock, ("198.18.0.9", 5000 + len(self.socks))),
                    overlay_ip4=bytes([100, 64, 0, len(self.socks)]))

    def pair(self, x: Link, kx: Keying, y: Link, ky: Keying) -> None:
        self.pairs[id(x)] = (ky, y)
        self.pairs[id(y)] = (kx, x)

    def pump(self) -> None:
        for _ in range(20):
            wire, self.wire = self.wire, []
            if not wire:
                return
            for sender, data in wire:
                keying, link = self.pairs[id(sender)]
                keying.on_dtls(link.peer_uid if keying.links.get(link.peer_uid) is link
                               else None, data, source=link.path.source_key)


@pytest.fixture
def net(monkeypatch: pytest.MonkeyPatch) -> Iterator[Net]:
    n = Net()
    monkeypatch.setattr(keying_mod.Keying, "_send", staticmethod(
        lambda link, datagrams: n.wire.extend((link, d) for d in datagrams)))
    monkeypatch.setattr(keying_mod, "send_keepalive", lambda link, op, stamp: None)
    yield n
    for s in n.socks:
        s.close()


def test_a_plain_link_carries_nothing_before_its_handshake(net: Net):
    old_a, old_b = net.link(A, B.uid), net.link(B, A.uid)
    net.pair(old_a, net.ka, old_b, net.kb)
    net.ka.start(old_a, B.fingerprint)
    net.kb.start(old_b, A.fingerprint)
    assert not old_a.authed and not old_b.authed and not old_a.usable
    net.pump()
    # the DTLS client (lower UID) opens at once; the server once the client's first frame shows
    # it finished (the poll thread reports that: ``confirmed``)
    client, server = (old_a, old_b) if A.uid < B.uid else (old_b, old_a)
    ks = net.kb if server is old_b else net.ka
    assert client.authed and not server.authed
    ks.confirmed(server.peer_uid)
    assert server.authed and server.usable


def established(net: Net) -> tuple[Link, Link]:
    old_a, old_b = net.link(A, B.uid), net.link(B, A.uid)
    net.pair(old_a, net.ka, old_b, net.kb)
    net.ka.start(old_a, B.fingerprint)
    net.kb.start(old_b, A.fingerprint)
    net.pump()
    for k, link in ((net.ka, old_a), (net.kb, old_b)):
        k.confirmed(link.peer_uid)
    assert old_a.authed and old_b.authed
    net.events.clear()
    return old_a, old_b


def test_a_new_link_replaces_the_working_one_only_once_proven(net: Net):
    old_a, old_b = established(net)
    # b starts over (a new link on its side); a builds its new link beside the working one
    net.kb.stop(old_b)
    new_a, new_b = net.link(A, B.uid), net.link(B, A.uid)
    net.pair(new_a, net.ka, new_b, net.kb)
    net.ka.start(new_a, B.fingerprint, beside=True)
    assert net.ka.links[B.uid] is old_a and net.ka.beside[B.uid] is new_a
    net.kb.start(new_b, A.fingerprint)
    net.pump()
    assert net.promoted == [new_a]
    assert net.ka.links[B.uid] is new_a and B.uid not in net.ka.beside
    assert ("a", B.uid, "replaced") in net.events
    assert old_a.session is not None and new_a.session is not old_a.session


def test_a_new_link_that_lies_about_its_uid_leaves_the_working_one(net: Net):
    old_a, _ = established(net)
    # someone with another key claims b's UID (and signals its own fingerprint)
    liar_keying = Keying(LIAR, rekey_seconds=120, on_event=lambda u, e: None)
    new_a, liar_link = net.link(A, B.uid), net.link(LIAR, A.uid)
    net.pair(new_a, net.ka, liar_link, liar_keying)
    net.ka.start(new_a, LIAR.fingerprint, beside=True)
    liar_keying.start(liar_link, A.fingerprint)
    net.pump()
    for _ in range(3):  # the failure may surface on a retransmission tick
        net.ka.tick()
        net.pump()
    assert net.promoted == []
    assert net.ka.links[B.uid] is old_a and old_a.authed and B.uid not in net.ka.beside
    assert ("a", B.uid, "beside_failed") in net.events
    assert net.ka.beside_failure == "uid_mismatch"
