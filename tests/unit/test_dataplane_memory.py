"""The data plane's halves in memory (``ipop.testing``): a link's send half on one node, the
receive path (``Inbound.receive`` and the link's receive half) on the other, the keying driver
between them, and ``Outbound`` on a memory TUN; over a perfect and over a seeded lossy
network.  The real tier (namespaces, TUN, iperf3) is ``tests/net``."""

from __future__ import annotations

import struct
import time
from types import SimpleNamespace
from typing import Any

import pytest

from ipop.crypto.identity import Identity
from ipop.dataplane.inbound import Inbound
from ipop.dataplane.keying import Keying
from ipop.dataplane.link import Link, Path
from ipop.dataplane.link_rx import CONTROL, DELIVER, DELIVER_PARTIAL, DROP, SUPER, WRITES
from ipop.dataplane.outbound import Outbound
from ipop.dataplane.table import ForwardingTable
from ipop.testing import Clock, FakeSocket, LossyNetwork, MemoryDevice, keyed_pair
from ipop.wire import header as wh
from ipop.wire import keepalive as wk
from ipop.wire import train as wt
from ipop.wire.vnet import VNET, VnetHdr

ADDR = {"a": ("::ffff:198.18.0.1", 5800), "b": ("::ffff:198.18.0.2", 5800)}
IP = {"a": bytes([100, 64, 0, 1]), "b": bytes([100, 64, 0, 2])}


def ip4(src: bytes, dst: bytes, payload: bytes = b"", proto: int = 17) -> bytes:
    total = 20 + 8 + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, proto, 0, src, dst)
    return hdr + struct.pack("!HHHH", 4000, 5000, 8 + len(payload), 0) + payload


def tso_read(src: bytes, dst: bytes, payload: int = 20_000) -> bytes:
    """A TUN read with offloads: a TCPv4 TSO ``virtio_net_hdr`` and a super-packet."""
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 1, 0, 64, 6, 0, src, dst))
    tcp = bytearray(32)
    tcp[12] = 8 << 4
    body = bytes(ip + tcp) + bytes(range(256)) * (payload // 256)
    return VNET.pack(1, 1, 52, 1334, 20, 16) + body


class Side:
    """One node in memory: its UID, a socket on the network, a forwarding table and the
    receive path (``Inbound``) with a device that is never written (results are read)."""

    def __init__(self, name: str, net: LossyNetwork | None, *, ident: Identity | None = None,
                 sock_record: bool = True) -> None:
        self.name = name
        self.ident = ident
        self.uid = ident.uid if ident is not None else bytes([ord(name)]) * 20
        self.sock = FakeSocket(ADDR[name], net, record=sock_record)
        self.table = ForwardingTable()
        self.control: list[tuple[bytes, Any]] = []
        self.roamed: list[tuple[str, int]] = []
        self.confirmed: list[bytes] = []
        dev: Any = SimpleNamespace(tap=False, fd=-1, vnet_hdr=False, mac=None)
        self.inbound = Inbound(dev, self.table, self.uid, on_control=self._on_control,
                               on_roam=lambda link, sock, addr: self.roamed.append(addr),
                               on_confirm=self._on_confirm)
        self.keying: Keying | None = None

    def _on_confirm(self, link: Link) -> None:
        self.confirmed.append(link.peer_uid)
        if self.keying is not None:
            self.keying.confirmed(link.peer_uid)

    def _on_control(self, sock: Any, data: bytes, addr: Any, channel: Any, link: Any) -> None:
        self.control.append((data, link))
        if self.keying is not None and wh.is_dtls(data):
            self.keying.on_dtls(link.peer_uid if link is not None else None, data,
                                source=(sock.fileno(), addr, channel))

    def link_to(self, other: Side, *, encrypted: bool = False) -> Link:
        link = Link(local_uid=self.uid, peer_uid=other.uid, path=Path(self.sock, ADDR[other.name]),
                    overlay_ip4=IP[other.name], encrypted=encrypted)
        self.table.add(link)
        return link

    def receive(self, data: bytes, src: str) -> tuple[int, Any]:
        return self.inbound.receive(self.sock, memoryview(data), ADDR[src])  # type: ignore


def plain_pair() -> tuple[Side, Side, Link, Link]:
    a, b = Side("a", None), Side("b", None)
    la, lb = a.link_to(b), b.link_to(a)
    la.authed = lb.authed = True  # both handshakes done (``Keying``)
    return a, b, la, lb


def sealed_pair(net: LossyNetwork | None = None) -> tuple[Side, Side, Link, Link]:
    a, b = Side("a", net), Side("b", net)
    la, lb = a.link_to(b, encrypted=True), b.link_to(a, encrypted=True)
    la.session, lb.session = keyed_pair(Clock())
    la.authed = lb.authed = True
    return a, b, la, lb


# ---- the send half and the receive half, one datagram at a time


def test_a_plain_link_queues_until_proven_then_delivers() -> None:
    a, b = Side("a", None), Side("b", None)
    la, lb = a.link_to(b), b.link_to(a)
    pkt = ip4(IP["a"], IP["b"], b"hello")
    la.tx.send_packet(pkt)
    assert la.tx.pending == 1 and a.sock.sent == []  # nothing before the handshake
    la.authed = True
    assert la.tx.flush_pending() == 1
    [(dgram, dest)] = a.sock.take()
    assert dest == ADDR["b"] and dgram == la.tx.hdr_data + pkt
    assert b.receive(dgram, "a") == (DROP, "plain_before_handshake")  # b's end is not proven
    lb.authed = True
    kind, got = b.receive(dgram, "a")
    assert kind == DELIVER and bytes(got) == pkt
    assert (lb.stats.rx_packets, la.stats.tx_packets) == (1, 1)
    assert b.receive(dgram, "b") == (DROP, "unexpected_source")  # a plain link's own path only
    assert lb.stats.drops["unexpected_source"] == 1 and lb.stats.rx_drops["unexpected_source"]


def test_receive_results_for_what_is_not_a_frame_of_ours() -> None:
    a, b, la, lb = plain_pair()
    stranger = b"\x77" * 20  # a UID with no link
    forged = wh.pack(wh.T_DATA, stranger, b.uid) + ip4(IP["a"], IP["b"])
    assert b.receive(forged, "a") == (DROP, "unknown_peer")
    not_ours = wh.pack(wh.T_DATA, a.uid, stranger) + ip4(IP["a"], IP["b"])
    assert b.receive(not_ours, "a") == (DROP, "not_for_us")
    assert b.receive(b"\xc5" * 50, "a") == (DROP, "unknown_kind")  # 192-255: no kind
    assert b.receive(b"\x80" * 10, "a") == (DROP, "truncated")
    assert b.receive(bytes([0x40, 0x00, 0x00, 0x09]) + b"abc", "a") == (
        DROP, "truncated_channeldata")
    spoofed = la.tx.hdr_data + ip4(bytes([100, 64, 0, 9]), IP["b"])
    assert b.receive(spoofed, "a") == (DROP, "spoofed_source")
    stun = bytes.fromhex("0001 0000 2112a442") + bytes(12)
    assert b.receive(stun, "a") == (CONTROL, None) and b.control[-1] == (stun, lb)
    assert dict(b.inbound.drops) == {"unknown_peer": 1, "unknown_kind": 1, "truncated": 1,
                                     "truncated_channeldata": 1, "spoofed_source": 1}
    assert lb.stats.drops == {"not_for_us": 1, "spoofed_source": 1}


def test_relayed_frames_come_inside_channeldata() -> None:
    a, b, la, lb = plain_pair()
    lb.path = Path(b.sock, ADDR["a"], 0x4001, "relay")
    la.path = Path(a.sock, ADDR["b"], 0x4001, "relay")
    pkt = ip4(IP["a"], IP["b"], b"relayed")
    la.tx.send_packet(pkt)
    [(dgram, _)] = a.sock.take()
    assert dgram[:2] == b"\x40\x01" and int.from_bytes(dgram[2:4], "big") == len(dgram) - 4
    kind, got = b.receive(dgram, "a")
    assert kind == DELIVER and bytes(got) == pkt
    assert b.receive(dgram[4:], "a") == (DROP, "unexpected_source")  # not through the relay


def test_sealed_frames_round_trip_and_forgeries_are_dropped() -> None:
    a, b, la, _ = sealed_pair()
    pkt = ip4(IP["a"], IP["b"], b"secret")
    la.tx.send_packet(pkt)
    [(dgram, _)] = a.sock.take()
    assert pkt[28:] not in dgram
    kind, got = b.receive(dgram, "a")
    assert kind == DELIVER and bytes(got) == pkt
    assert b.receive(dgram, "a") == (DROP, "replay")
    la.tx.send_packet(pkt)
    [(fresh, _)] = a.sock.take()
    tampered = bytearray(fresh)
    tampered[-1] ^= 1
    assert b.receive(bytes(tampered), "a") == (DROP, "bad_tag")
    plain = wh.pack(wh.T_DATA, a.uid, b.uid) + pkt
    assert b.receive(plain, "a") == (DROP, "plaintext_on_encrypted_link")
    la.tx.send_packet(pkt)
    [(moved, _)] = a.sock.take()
    kind, _ = b.inbound.receive(b.sock, memoryview(moved), ("::ffff:198.18.0.7", 4000))
    assert kind == DELIVER and b.roamed == [("::ffff:198.18.0.7", 4000)]  # it authenticated


def test_a_probe_is_echoed_and_the_echo_measures_the_rtt() -> None:
    for pair in (plain_pair, sealed_pair):
        a, b, la, _ = pair()
        echoes: list[float] = []
        stamp = time.monotonic_ns()
        la.pings[stamp] = echoes.append
        la.tx.send_keepalive(wk.OP_PROBE, stamp)
        [(probe, _)] = a.sock.take()
        assert b.receive(probe, "a") == (CONTROL, None)
        [(echo, dest)] = b.sock.take()
        assert dest == ADDR["a"]
        assert a.receive(echo, "b") == (CONTROL, None)
        assert len(echoes) == 1 and la.stats.rtt_ms is not None and not la.pings


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_whole_train_round_trip(encrypted: bool) -> None:
    a, b, la, lb = sealed_pair() if encrypted else plain_pair()
    raw = tso_read(IP["a"], IP["b"])
    view = memoryview(raw)
    vh = VnetHdr._make(VNET.unpack_from(view))
    la.tx.send_super(vh, view[10:], view)
    sent = a.sock.take()
    assert la.tx.trains_sent == 1 and len(sent) > 10 and a.sock.calls == 1  # one GSO send
    results = [b.receive(d, "a") for d, _ in sent]
    assert [k for k, _ in results[:-1]] == [CONTROL] * (len(sent) - 1)
    kind, iov = results[-1]
    assert kind == SUPER and iov[0] == wt.check_vnet(raw, len(raw))
    assert b"".join(bytes(p) for p in iov[1:]) == raw[10:]
    assert lb.stats.rx_packets == len(sent)


def test_segments_after_a_lost_train_and_the_report() -> None:
    a, b, la, lb = sealed_pair()
    raw = tso_read(IP["a"], IP["b"])
    view = memoryview(raw)
    vh = VnetHdr._make(VNET.unpack_from(view))
    for _ in range(2):
        la.tx.send_super(vh, view[10:], view)
    trains = [d for d, _ in a.sock.take()]
    assert la.tx.trains_sent == 2 and len(trains) % 2 == 0
    one = len(trains) // 2
    # the first train loses a datagram; the second arrives whole
    for d in trains[: one - 1] + trains[one:]:
        b.receive(d, "a")
    assert lb.stats.drops["train_incomplete"] == 1
    reports = b.sock.take()
    assert len(reports) == 1  # one loss report (a sealed keepalive) back to the sender
    assert a.receive(reports[0][0], "b") == (CONTROL, None)
    assert la.tx.trains.fallbacks == 1 and la.tx.trains.mode(time.monotonic()) != "trains"
    la.tx.send_super(vh, view[10:], view)
    segs = a.sock.take()
    assert segs and {d[0] for d, _ in segs} == {wh.T_DATA_PARTIAL_SEALED}
    got = [b.receive(d, "a") for d, _ in segs]
    assert {k for k, _ in got} == {DELIVER_PARTIAL}
    assert sum(len(p) - 52 for _, p in got) == len(raw) - 10 - 52  # IPv4 + TCP with options


# ---- a seeded lossy network


@pytest.mark.parametrize("seed", [1, 7, 2026])
def test_a_sealed_link_over_a_lossy_network_delivers_each_survivor_once(seed: int) -> None:
    net = LossyNetwork(seed, loss=0.2, dup=0.1, reorder=8)
    _, b, la, lb = sealed_pair(net)
    packets = [ip4(IP["a"], IP["b"], i.to_bytes(4, "big")) for i in range(400)]
    for pkt in packets:
        la.tx.send_packet(pkt)
    arrived = net.deliver()
    results = [b.receive(d, "a") for _, d, _ in arrived]
    delivered = [bytes(v) for k, v in results if k in WRITES]
    assert len(delivered) == len(set(delivered))  # the replay window drops the copies
    assert len(delivered) == 400 - net.lost
    assert set(delivered) <= set(packets)
    assert lb.stats.drops == {"replay": net.duplicated}
    assert 40 < net.lost < 130 and net.duplicated > 10  # the network really was bad


@pytest.mark.parametrize("encrypted", [True, False])
def test_keying_driver_keys_both_ends_over_a_lossy_network(encrypted: bool) -> None:
    clock = Clock(start=time.monotonic(), step=0.0)
    net = LossyNetwork(3, loss=0.3, dup=0.05, reorder=3)
    ids = {"a": Identity.generate("a"), "b": Identity.generate("b")}
    sides = {n: Side(n, net, ident=ids[n]) for n in "ab"}
    links = {}
    for n, other in (("a", "b"), ("b", "a")):
        side = sides[n]
        side.keying = Keying(ids[n], rekey_seconds=120, on_event=lambda u, e: None)
        links[n] = side.link_to(sides[other], encrypted=encrypted)
    by_addr = {ADDR[n]: n for n in "ab"}
    for n, other in (("a", "b"), ("b", "a")):
        keying = sides[n].keying
        assert keying is not None
        keying.start(links[n], ids[other].fingerprint, clock.now)
    for _ in range(400):
        for src, data, dest in net.deliver():
            sides[by_addr[dest]].receive(data, by_addr[src.name])
        if links["a"].usable and links["b"].usable and not net.queue:
            break
        clock.advance(0.25)
        for side in sides.values():
            assert side.keying is not None
            side.keying.tick(clock.now)
        for link in links.values():  # the data plane's keepalive (``DataPlane.tick``)
            if link.usable:
                link.tx.send_keepalive(wk.OP_PROBE, time.monotonic_ns())
    assert links["a"].usable and links["b"].usable, "the handshake did not finish"
    assert net.lost > 0  # the handshake had to retransmit
    pkt = ip4(IP["a"], IP["b"], b"after keying")
    net.loss = net.dup = 0.0
    links["a"].tx.send_packet(pkt)
    got = [sides["b"].receive(d, "a") for _, d, _ in net.deliver()]
    assert (DELIVER, pkt) in [(k, bytes(v)) for k, v in got if k == DELIVER]


# ---- outbound on a memory TUN


def test_outbound_routes_floods_and_reports_misses() -> None:
    dev = MemoryDevice()
    a, b = Side("a", None), Side("b", None)
    link = a.link_to(b)
    link.authed = True
    misses: list[tuple[bytes, bytes]] = []
    out = Outbound(dev, a.table, mss=1334, on_miss=lambda dst, pkt: misses.append((dst, pkt)))
    to_b = ip4(IP["a"], IP["b"], b"unicast")
    to_nobody = ip4(IP["a"], bytes([100, 64, 0, 9]))
    group = ip4(IP["a"], bytes([224, 0, 0, 251]))
    dev.inject([to_b, to_nobody, group, b"\x00" * 30])
    try:
        out.pump()
        sent = [d for d, _ in a.sock.take()]
        assert sent == [link.tx.hdr_data + to_b, link.tx.hdr_data + group]
        assert misses == [(bytes([100, 64, 0, 9]), to_nobody)]
        assert out.counters["no_route"] == 1 and out.counters["flooded"] == 1
        assert out.counters["not_ip"] == 1 and out.counters["packets"] == 4
        b.link_to(a).authed = True
        kind, got = b.receive(sent[0], "a")
        assert kind == DELIVER and bytes(got) == to_b
    finally:
        dev.close()


def test_outbound_with_offloads_sends_small_reads_as_one_gso_train() -> None:
    dev = MemoryDevice(vnet_hdr=True)
    a, b = Side("a", None), Side("b", None)
    link = a.link_to(b)
    link.authed = True
    out = Outbound(dev, a.table, mss=1334, on_miss=lambda dst, pkt: None)
    pkts = [ip4(IP["a"], IP["b"], bytes([i]) * 100) for i in range(5)]
    dev.inject([bytes(10) + p for p in pkts])
    try:
        out.pump()
        sent = a.sock.take()
        assert a.sock.calls == 1  # one UDP GSO send for the run of equal sizes
        assert [d for d, _ in sent] == [link.tx.hdr_data + p for p in pkts]
        assert link.stats.tx_packets == 5
    finally:
        dev.close()


def test_slabs_are_made_only_as_bursts_need_them() -> None:
    """An idle node holds no receive slab; one is made when no free one is left, reused once
    given back, and never more than ``SLABS`` exist."""
    from ipop.dataplane import inbound as ib

    side = Side("a", None)
    rx = side.inbound
    assert rx.slabs == 0
    first = rx._take_slab()
    assert rx.slabs == 1 and len(first) == ib.SLOT * ib.SLOTS_PER_SLAB
    rx.free.put(first)
    assert rx._take_slab() is first and rx.slabs == 1
    held = [first] + [rx._take_slab() for _ in range(ib.SLABS - 1)]
    assert rx.slabs == ib.SLABS and len({id(s) for s in held}) == ib.SLABS
    rx.free.put(held[5])
    assert rx._take_slab() is held[5] and rx.slabs == ib.SLABS
    # the burst is over: every slab comes back; each take lets one spare go, down to SPARE_SLABS
    for slab in held:
        rx.free.put(slab)
    for _ in range(ib.SLABS * 2):
        rx.free.put(rx._take_slab())
    assert rx.slabs == ib.SPARE_SLABS + 1 and rx.free.qsize() == rx.slabs


def test_a_control_datagram_read_before_its_link_was_made_reaches_the_link() -> None:
    """The poll thread may read a DTLS flight from a socket adopted a moment before its link is
    made (``IcePaths.connect`` adopts, then the controller makes the link): the control thread
    looks the link up again when the datagram's turn comes, so the handshake gets it at once
    instead of on the peer's retransmission 1 s later."""
    from ipop.dataplane.facade import DataPlane

    a, b = Side("a", None), Side("b", None)
    queued: list[Any] = []
    events: list[Any] = []
    fake: Any = SimpleNamespace(table=a.table, call_soon=lambda f, *args: queued.append(
        (f, args)), on_event=events.append)
    flight = bytes([22, 0xFE, 0xFD]) + bytes(10)
    DataPlane._on_control(fake, a.sock, flight, ADDR["b"], None, None)  # no link yet
    link = a.link_to(b)  # the control thread makes the link before it runs the callback
    for f, args in queued:
        f(*args)
    assert [e.data["peer_uid"] for e in events] == [link.peer_uid]
    # a datagram from no link's path stays without one
    queued.clear()
    DataPlane._on_control(fake, a.sock, flight, ("::ffff:198.18.0.9", 5800), None, None)
    for f, args in queued:
        f(*args)
    assert events[-1].data["peer_uid"] is None


# ---- order: what waited goes first


def test_packets_sent_after_the_link_became_usable_go_behind_the_queued_ones() -> None:
    """The control thread has not flushed the queue yet when the data thread sends again: the
    new packets go behind the queued ones, never ahead (a flow keeps its order)."""
    a, b = Side("a", None), Side("b", None)
    la, _ = a.link_to(b), b.link_to(a)
    pkts = [ip4(IP["a"], IP["b"], bytes([i])) for i in range(4)]
    la.tx.send_packet(pkts[0])
    la.tx.send_packet(pkts[1])
    assert la.tx.pending == 2 and a.sock.sent == []
    la.authed = True  # proven; flush_pending still to come
    la.tx.send_packet(pkts[2])
    la.tx.send_packet(pkts[3])
    assert la.tx.pending == 0
    assert [d for d, _ in a.sock.take()] == [la.tx.hdr_data + p for p in pkts]
    assert la.tx.flush_pending() == 0 and la.stats.tx_packets == 4


def test_flush_pending_waits_for_a_usable_link() -> None:
    a, b = Side("a", None), Side("b", None)
    la, _ = a.link_to(b), b.link_to(a)
    la.tx.send_packet(ip4(IP["a"], IP["b"]))
    assert la.tx.flush_pending() == 0 and la.tx.pending == 1 and a.sock.sent == []


def test_frames_held_for_keys_are_opened_before_a_later_frame_of_the_batch() -> None:
    """Frames under an epoch whose keys were not in yet are held; the keys come, and the next
    frame opens before the replay ran: the held ones join the batch first, in their order."""
    from ipop.crypto.session import CryptoSession
    from ipop.dataplane.inbound import _Gather
    from ipop.dataplane.shards import ShardSession, _openers

    a, b = Side("a", None), Side("b", None)
    la, lb = a.link_to(b, encrypted=True), b.link_to(a, encrypted=True)
    sa, sb = keyed_pair(Clock())
    la.session = sa
    lb.session = ShardSession(0, 0)  # keys pushed by the control process later
    la.authed = lb.authed = True
    pkts = [ip4(IP["a"], IP["b"], bytes([i]) * 8) for i in range(5)]
    for p in pkts[:3]:
        la.tx.send_packet(p)
    held = [d for d, _ in a.sock.take()]
    assert [b.receive(d, "a") for d in held] == [(CONTROL, None)] * 3
    assert len(lb.rx.early) == 3
    assert isinstance(sb, CryptoSession)
    [opener] = _openers(sb)
    lb.session.install(opener.suite, None, [{"epoch": opener.epoch, "key": opener.key.hex(),
                                             "salt": opener.salt.hex()}])
    for p in pkts[3:]:
        la.tx.send_packet(p)
    batch = b.inbound.batch = _Gather(b.inbound)
    for d, _ in a.sock.take():
        batch.add(b.receive(d, "a"))
    b.inbound.batch = None
    assert [bytes(p) for p in batch.out] == pkts
    assert not lb.rx.early and lb.stats.rx_packets == 5
    b.inbound.replay_early()  # the replay the keys asked for finds nothing left
    assert lb.stats.rx_packets == 5


# ---- a shard's held packets (``workers`` > 1): a flow never changes shards


def memory_dataplane(events: list[Any], *, shard: int, hold: int) -> Any:
    from ipop.dataplane.facade import DataPlane

    return DataPlane(uid=b"a" * 20, interface="", ip4="100.64.0.1", prefixlen=24, mtu=1400,
                     ondemand_queue=hold, offload=False, on_event=events.append,
                     call_soon=lambda fn, *args: fn(*args), queue=MemoryDevice(),  # type: ignore
                     shard=shard)


def test_a_shard_holds_packets_until_its_link_comes_then_sends_them_first() -> None:
    """A shard that reads packets before the control process pushed it the link holds them
    (one miss report), and sends them in read order on its own copy of the link ahead of
    what it reads after; packets routed by a prefix go when the control process says
    ``release``; held packets for a link that is gone are dropped and counted."""
    from ipop.dataplane.shards import SHARD_HOLD

    events: list[Any] = []
    dp = memory_dataplane(events, shard=1, hold=SHARD_HOLD)
    sock = FakeSocket(("::", 5800))
    try:
        first = [ip4(IP["a"], IP["b"], bytes([i])) for i in range(5)]
        for pkt in first:
            dp._on_miss(IP["b"], pkt)
        assert [e.kind for e in events] == ["unknown_destination"]  # one report per second
        assert sock.sent == []
        link = dp.add_link(peer_uid=b"b" * 20, path=Path(sock, ADDR["b"]), ip4="100.64.0.2",
                           encrypted=False, security_reason="shard", serve_path=False)
        link.authed = True
        link.tx.flush_pending()
        link.tx.send_packet(ip4(IP["a"], IP["b"], b"later"))
        sent = [d[wh.PAYLOAD_OFF:] for d, _ in sock.take()]
        assert sent == [*first, ip4(IP["a"], IP["b"], b"later")]
        routed = bytes([10, 1, 0, 7])
        dp._on_miss(routed, ip4(IP["a"], routed, b"via a route"))
        dp.release_held(routed, link)
        assert [d[wh.PAYLOAD_OFF:] for d, _ in sock.take()] == [
            ip4(IP["a"], routed, b"via a route")]
        gone = bytes([100, 64, 0, 9])
        dp._on_miss(gone, ip4(IP["a"], gone))
        before = dp.held_dropped
        dp.release_held(gone, None)
        assert dp.held_dropped == before + 1 and not dp.held
    finally:
        dp.dev.close()


def test_the_control_process_holds_nothing_for_a_shard_miss() -> None:
    """A shard's miss: where the control process has the link it only names it (the shard
    sends what it holds on its own copy); where it has none it reports the miss for an
    on-demand link without holding a copy (the shard holds the packet)."""
    events: list[Any] = []
    dp = memory_dataplane(events, shard=0, hold=64)
    sock = FakeSocket(("::", 5800))
    try:
        pkt = ip4(IP["a"], IP["b"], b"x")
        assert dp.on_shard_miss(IP["b"], pkt) is None
        assert [e.kind for e in events] == ["unknown_destination"] and not dp.held
        link = dp.add_link(peer_uid=b"b" * 20, path=Path(sock, ADDR["b"]), ip4="100.64.0.2",
                           encrypted=False, security_reason="static", serve_path=False)
        link.authed = True
        assert dp.on_shard_miss(IP["b"], pkt) is link
        assert sock.sent == [] and len(events) == 1
    finally:
        dp.dev.close()
