"""Routing pieces without a network: the routes/ip6 signaling fields (vectors and refusals),
the route verdict, a link's allowed sources and the forwarding table's longest-prefix match."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipop.config import validate
from ipop.controller.routes import RoutePolicy, decide
from ipop.dataplane.link import Link, Path
from ipop.dataplane.table import ForwardingTable
from ipop.errors import ConfigError, LocalProtocolError, MalformedMessage
from ipop.wire.prefixes import parse_prefix
from ipop.wire.signal import MAX_ROUTES, SignalMessage

from .test_signal_msg import CON_REQ, CON_REQ_JSON, base, parse_obj

ROUTED = dataclasses.replace(CON_REQ, ip6="2001:db8::2", routes=("198.18.200.0/24", "::/0"))
ROUTED_JSON = CON_REQ_JSON[:-1] + ',"ip6":"2001:db8::2","routes":["198.18.200.0/24","::/0"]}'


# ---- signaling: the routes and ip6 fields
def test_routes_vector_round_trip():
    assert ROUTED.to_json() == ROUTED_JSON
    assert SignalMessage.parse(ROUTED_JSON) == ROUTED


def test_a_message_without_the_fields_is_unchanged():
    msg = SignalMessage.parse(CON_REQ_JSON)
    assert msg.routes is None and msg.ip6 is None
    assert msg.to_json() == CON_REQ_JSON


def test_routes_are_canonical_and_deduplicated():
    msg = parse_obj(base(routes=["198.18.200.0/24", "198.18.200.0/24", "2001:DB8:1::/48"],
                         ip6="2001:DB8:0::0002"))
    assert msg.routes == ("198.18.200.0/24", "2001:db8:1::/48")
    assert msg.ip6 == "2001:db8::2"


@pytest.mark.parametrize(("routes", "why"), [
    ("198.18.200.0/24", "routes must be a list"),
    ({"a": 1}, "routes must be a list"),
    ([1], "routes item must be a prefix string"),
    (["198.18.200.1/24"], "has host bits set"),
    (["198.18.200.0/33"], "is not a prefix"),
    (["banana"], "is not a prefix"),
    (["198.18.200.0/24 "], "is not a prefix"),
    (["١٩٨.18.200.0/24"], "routes item must be a prefix string"),
    ([f"198.18.{i}.0/24" for i in range(MAX_ROUTES + 1)], "more than 64"),
])
def test_bad_routes_refuse_the_message(routes, why):
    with pytest.raises(MalformedMessage, match=why):
        parse_obj(base(routes=routes))


@pytest.mark.parametrize("ip6", ["100.64.0.2", "2001:db8::/64", 6, "2001:db8::g", "x" * 50])
def test_bad_ip6_refuses_the_message(ip6):
    with pytest.raises(MalformedMessage, match="ip6"):
        parse_obj(base(ip6=ip6))


def test_exactly_64_routes_pass_and_build_refuses_non_canonical():
    routes = [f"198.18.{i}.0/24" for i in range(MAX_ROUTES)]
    assert len(parse_obj(base(routes=routes)).routes or ()) == MAX_ROUTES
    with pytest.raises(LocalProtocolError):
        dataclasses.replace(CON_REQ, routes=("198.18.200.1/24",))


def test_null_routes_count_as_missing():
    assert parse_obj(base(routes=None, ip6=None)).routes is None
    assert json.loads(CON_REQ.to_json()).get("routes") is None


# ---- the route verdict
POLICY = RoutePolicy(accept=True, overlay=(parse_prefix("100.64.0.0/24"),
                                           parse_prefix("2001:db8::/64")),
                     own=(parse_prefix("198.19.1.0/24"),))


def verdict(offered, policy=POLICY, *, is_exit=False, owner=lambda net: None):
    accepted, refused = decide(offered, policy, is_exit=is_exit, owner=owner)
    return [str(n) for n in accepted], dict(refused)


def test_accept_true_takes_a_lan_and_refuses_with_reasons():
    acc, ref = verdict(["198.18.200.0/24", "100.64.0.0/16", "198.19.0.0/16", "0.0.0.0/0",
                        "2001:db8::/48"])
    assert acc == ["198.18.200.0/24"]
    assert ref["100.64.0.0/16"].startswith("overlaps the overlay prefix")
    assert ref["198.19.0.0/16"].startswith("overlaps this node's own network")
    assert "exit_node" in ref["0.0.0.0/0"]
    assert "overlay" in ref["2001:db8::/48"]


def test_accept_false_and_accept_list():
    none = dataclasses.replace(POLICY, accept=False)
    assert verdict(["198.18.200.0/24"], none) == ([], {"198.18.200.0/24":
                                                       "accept_routes is false"})
    listed = dataclasses.replace(POLICY, accept=(parse_prefix("198.18.200.0/23"),))
    acc, ref = verdict(["198.18.200.0/24", "198.18.202.0/24", "198.18.0.0/15"], listed)
    assert acc == ["198.18.200.0/24"]
    assert ref == {"198.18.202.0/24": "outside accept_routes",
                   "198.18.0.0/15": "outside accept_routes"}


def test_exit_default_routes_and_owned_prefixes():
    none = dataclasses.replace(POLICY, accept=False)
    acc, ref = verdict(["0.0.0.0/0", "::/0", "198.18.200.0/24"], none, is_exit=True)
    assert acc == ["0.0.0.0/0", "::/0"] and ref == {"198.18.200.0/24": "accept_routes is false"}
    acc, ref = verdict(["198.18.200.0/24"], owner=lambda net: "aabbccddeeff")
    assert acc == [] and ref == {"198.18.200.0/24": "already routed to peer aabbccddeeff"}


# ---- a link's allowed sources and the table
ME = b"\x01" * 20


@pytest.fixture()
def sock():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    yield s
    s.close()


def ip4_packet(src: str, dst: str = "100.64.0.1") -> bytes:
    return (bytes([0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0]) + ipaddress.IPv4Address(src).packed
            + ipaddress.IPv4Address(dst).packed)


def ip6_packet(src: str, dst: str = "2001:db8::1") -> bytes:
    return (bytes([0x60, 0, 0, 0, 0, 0, 17, 64]) + ipaddress.IPv6Address(src).packed
            + ipaddress.IPv6Address(dst).packed)


def mk(sock, uid: bytes, ip4: str, ip6: str | None = None, port: int = 5000) -> Link:
    link = Link(local_uid=ME, peer_uid=uid, path=Path(sock, ("198.18.0.2", port)),
                overlay_ip4=ipaddress.IPv4Address(ip4).packed,
                overlay_ip6=ipaddress.IPv6Address(ip6).packed if ip6 else None)
    link.authed = True  # its handshake is done (``Keying``)
    return link


def test_source_ok_own_addresses_and_carried_prefixes(sock):
    link = mk(sock, b"\x02" * 20, "100.64.0.2", "2001:db8::2")
    assert link.source_ok(ip4_packet("100.64.0.2"))
    assert link.source_ok(ip6_packet("2001:db8::2"))
    assert not link.source_ok(ip4_packet("100.64.0.3"))
    assert not link.source_ok(ip6_packet("2001:db8::3"))
    assert not link.source_ok(ip4_packet("198.18.200.5"))
    assert not link.source_ok(b"\x45" + b"\x00" * 10)  # too short
    assert not link.source_ok(b"\x20" * 40)  # not IP
    assert not link.source_ok(b"")
    link.set_nets((parse_prefix("198.18.200.0/24"), parse_prefix("2001:db8:1::/48")))
    assert link.source_ok(ip4_packet("198.18.200.5"))
    assert link.source_ok(ip6_packet("2001:db8:1::9"))
    assert not link.source_ok(ip4_packet("198.18.201.5"))


def test_table_routes_longest_prefix_and_ownership(sock):
    t = ForwardingTable()
    r = mk(sock, b"\x02" * 20, "100.64.0.2")
    r.set_nets((parse_prefix("198.18.200.0/24"),))
    e = mk(sock, b"\x03" * 20, "100.64.0.3", port=5001)
    e.set_nets((parse_prefix("0.0.0.0/0"), parse_prefix("198.18.200.0/24")))
    t.add(r)
    t.add(e)
    assert t.route(ipaddress.IPv4Address("198.18.200.9").packed) is r  # older link keeps it
    assert t.route(ipaddress.IPv4Address("198.18.1.1").packed) is e  # the exit
    assert t.route(ipaddress.IPv4Address("100.64.0.3").packed) is e  # its own address
    # a newcomer claiming an address another link holds does not take it over
    claim = mk(sock, b"\x04" * 20, "100.64.0.2", port=5002)
    t.add(claim)
    assert t.owner_of(ipaddress.IPv4Address("100.64.0.2").packed) is r
    t.remove(r.peer_uid)
    assert t.route(ipaddress.IPv4Address("198.18.200.9").packed) is e


def test_learned_mac_stays_with_its_first_live_holder(sock):
    t = ForwardingTable()
    a = mk(sock, b"\x02" * 20, "100.64.0.2")
    b = mk(sock, b"\x03" * 20, "100.64.0.3", port=5001)
    t.add(a)
    t.add(b)
    mac = b"\x02\x00\x00\x00\x00\x02"
    assert t.learn_mac(mac, a) and t.learn_mac(mac, a)
    assert not t.learn_mac(mac, b)
    t.remove(a.peer_uid)
    assert t.learn_mac(mac, b)


# ---- config
BASE = {"ip4": "100.64.0.1", "ip4_mask": 24, "ip6": "2001:db8::1/64"}


@pytest.mark.parametrize(("extra", "key"), [
    ({"advertise_routes": ["198.18.200.1/24"]}, "advertise_routes"),
    ({"advertise_routes": ["100.64.0.0/16"]}, "advertise_routes"),
    ({"advertise_routes": ["2001:db8::/48"]}, "advertise_routes"),
    ({"advertise_routes": [f"198.18.{i}.0/24" for i in range(65)]}, "advertise_routes"),
    ({"accept_routes": "yes"}, "accept_routes"),
    ({"accept_routes": ["nope"]}, "accept_routes"),
    ({"exit_node": "bob"}, "exit_node"),
    ({"switchmode": 1, "accept_routes": True}, "accept_routes"),
    ({"switchmode": 1, "advertise_routes": ["198.18.200.0/24"]}, "advertise_routes"),
    ({"listen_port": 5000, "sec": False, "peers": [{
        "uid": "a" * 40, "ip4": "100.64.0.2", "endpoint": "198.18.0.2:5000",
        "allowed_ips": ["198.18.0.0/33"]}]}, "peers[0].allowed_ips"),
    ({"listen_port": 5000, "sec": False, "peers": [{
        "uid": "a" * 40, "ip4": "100.64.0.2", "endpoint": "198.18.0.2:5000",
        "allowed_ips": ["100.64.0.0/25"]}]}, "peers"),
    ({"listen_port": 5000, "sec": False, "peers": [{"uid": "a" * 40, "ip4": "100.64.0.2"}]},
     "peers"),
])
def test_bad_routing_config_names_the_key(extra, key):
    with pytest.raises(ConfigError) as err:
        validate({**BASE, **extra})
    assert str(err.value).startswith(f"config: {key}")
    assert "\n" not in str(err.value)


def test_good_routing_config():
    cfg, warnings = validate({**BASE, "advertise_routes": ["198.18.200.0/24", "0.0.0.0/0"],
                              "accept_routes": ["198.18.0.0/15"], "exit_node": "100.64.0.9",
                              "snat_routes": True})
    assert warnings == []
    assert cfg.advertise_routes == ["198.18.200.0/24", "0.0.0.0/0"]
    assert cfg.accept_routes == ["198.18.0.0/15"] and cfg.exit_node == "100.64.0.9"
    assert validate(BASE)[0].accept_routes is False


def test_road_warrior_peer_needs_encryption():
    peer = {"uid": "a" * 40, "ip4": "100.64.0.2", "fingerprint": "sha-256 " + ":".join(["AB"] * 32)}
    cfg, _ = validate({**BASE, "listen_port": 5000, "sec": True, "peers": [peer]})
    assert cfg.peers[0].endpoint is None
    with pytest.raises(ConfigError, match="no endpoint and its link would be plain"):
        validate({**BASE, "listen_port": 5000, "sec": False, "peers": [peer]})


def test_hello_vectors():
    from ipop.wire import hello

    a, b = bytes(range(20)), bytes(range(20, 40))
    msg = hello.pack(a, b)
    assert msg[:2] == b"\x00\x01" and msg[4:8] == bytes.fromhex("2112a442") and len(msg) == 76
    assert hello.parse(msg, b) == a
    assert hello.parse(msg, a) is None  # meant for someone else
    for bad in (b"", msg[:30], msg + b"x", b"\x01" + msg[1:], msg[:8] + b"x" * 12 + msg[20:]):
        assert hello.parse(bad, b) is None


# ---- the inbound checks, driven in memory (the fuzz harness's Inbound, links and sessions)
from ipop.dataplane.link_rx import DELIVER, SUPER  # noqa: E402


def _harness():
    import importlib.util
    import sys
    from pathlib import Path as FsPath

    root = FsPath(__file__).resolve().parents[2]
    path = root / "fuzz" / "fuzz_frames.py"
    spec = importlib.util.spec_from_file_location("fuzz_frames_rt", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module, module.Harness()


def _super(src: str) -> bytes:
    """A vnet header and an IPv4/TCP packet from ``src`` (what a train carries)."""
    ip = bytearray(ip4_packet(src, "100.64.0.1"))
    ip[3] = 40  # total length: IP + TCP header
    ip[9] = 6  # TCP
    tcp = bytes([0x10, 0x00, 0x00, 0x50]) + bytes(8) + b"\x50\x10" + bytes(6)
    return bytes(10) + bytes(ip) + tcp


@pytest.mark.parametrize(("src", "delivered"), [("100.64.0.3", True), ("100.64.0.2", False),
                                                ("198.18.200.9", False)])
def test_a_sealed_train_is_source_checked_once(src, delivered):
    from ipop.wire import header as wh
    from ipop.wire import train as wt

    fz, h = _harness()
    hdr = wh.pack(wh.T_TRAIN_SEALED, fz.SEALED_PEER, fz.LOCAL)
    sealed = h.peer_session.seal(hdr, _super(src))
    dgram = hdr + wt.TRAIN.pack(7, 0, 1) + sealed
    kind, _ = h.inbound.receive(h.sock, memoryview(dgram), fz.SEALED_ADDR)
    assert (kind == SUPER) is delivered
    spoofed = h.sealed.stats.drops.get("spoofed_source", 0)
    assert spoofed == (0 if delivered else 1)
    assert h.inbound.drops.get("spoofed_source", 0) == spoofed


def test_a_carried_prefix_lets_a_train_through():
    from ipop.wire import header as wh
    from ipop.wire import train as wt

    fz, h = _harness()
    h.sealed.set_nets((parse_prefix("198.18.200.0/24"),))
    hdr = wh.pack(wh.T_TRAIN_SEALED, fz.SEALED_PEER, fz.LOCAL)
    dgram = hdr + wt.TRAIN.pack(8, 0, 1) + h.peer_session.seal(hdr, _super("198.18.200.9"))
    kind, _ = h.inbound.receive(h.sock, memoryview(dgram), fz.SEALED_ADDR)
    assert kind == SUPER and not h.sealed.stats.drops.get("spoofed_source")


def test_a_plain_datagram_is_source_checked():
    fz, h = _harness()
    from ipop.wire import header as wh

    hdr = wh.pack(wh.T_DATA, fz.PLAIN_PEER, fz.LOCAL)
    for src, ok in (("100.64.0.2", True), ("100.64.0.3", False), ("2001:db8::9", False)):
        pkt = ip6_packet(src) if ":" in src else ip4_packet(src)
        kind, _ = h.inbound.receive(h.sock, memoryview(hdr + pkt), fz.PLAIN_ADDR)
        assert (kind == DELIVER) is ok, src
    assert h.plain.stats.drops["spoofed_source"] == 2


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=140))
def test_hello_parse_never_raises(data):
    from ipop.wire import hello

    assert hello.parse(data, bytes(20)) is None or len(data) == 76


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60) | st.integers() | st.none())
def test_prefix_parse_raises_only_value_error(value):
    try:
        net = parse_prefix(value)
    except ValueError:
        return
    assert str(net) == value or str(net) == str(ipaddress.ip_network(value))
