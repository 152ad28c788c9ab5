import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipop.errors import LocalProtocolError, MalformedMessage
from ipop.nat import filters
from ipop.nat.params import IceParams, parse_candidate

ADAPTERS = [
    ("lo", "127.0.0.1", 0),
    ("lo", "::1", 0),
    ("eth0", "198.19.2.1", 0),
    ("eth0", "100.64.0.9", 0),  # an overlay-looking address on a real NIC
    ("eth0", "fe80::1", 2),  # link-local, scoped
    ("eth0", "2001:db8:1::5", 0),
    ("ipop0", "100.64.0.2", 0),
    ("ipop0", "2001:db8::2", 0),
    ("ipop0", "198.19.9.9", 0),  # whatever sits on ipop's own interface is excluded
    ("eth1", "198.19.3.1", 0),
    ("eth1", "198.19.2.1", 0),  # duplicate of eth0's
    ("wg0", "10.9.9.9", 0),
    ("eth2", "169.254.1.1", 0),
]


def test_overlay_loopback_and_ipop_iface_never_become_host_candidates():
    got = filters.allowed_host_addresses(ADAPTERS, exclude_ifaces=["ipop0"])
    assert got == ["198.19.2.1", "2001:db8:1::5", "198.19.3.1", "10.9.9.9"]


def test_extra_prefixes_and_ifaces_are_excluded():
    got = filters.allowed_host_addresses(
        ADAPTERS, exclude_prefixes=["2001:db8::/32", ipaddress.ip_network("10.0.0.0/8")],
        exclude_ifaces=["ipop0", "wg0"],
    )
    assert got == ["198.19.2.1", "198.19.3.1"]


def test_address_on_an_excluded_iface_is_excluded_everywhere():
    rows = [("eth0", "198.19.5.5", 0), ("ipop0", "198.19.5.5", 0)]
    assert filters.allowed_host_addresses(rows, exclude_ifaces=["ipop0"]) == []


def test_ip_version_switches():
    assert filters.allowed_host_addresses(ADAPTERS, use_ipv6=False, exclude_ifaces=["ipop0"]) == [
        "198.19.2.1", "198.19.3.1", "10.9.9.9"]
    assert filters.allowed_host_addresses(ADAPTERS, use_ipv4=False, exclude_ifaces=["ipop0"]) == [
        "2001:db8:1::5"]


@pytest.mark.parametrize(
    ("addr", "ok"),
    [
        ("198.19.1.1", True),
        ("100.64.0.1", False),
        ("100.127.255.255", False),
        ("100.128.0.1", True),
        ("127.0.0.2", False),
        ("0.0.0.0", False),
        ("224.0.0.251", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("::ffff:100.64.0.1", False),
        ("2001:db8::1", True),
        ("not-an-ip", False),
        ("host.local", False),
    ],
)
def test_address_allowed(addr, ok):
    assert filters.address_allowed(addr, filters.excluded_networks()) is ok


def test_the_overlay_is_always_excluded():
    assert ipaddress.ip_network("100.64.0.0/10") in filters.excluded_networks(["2001:db8::/32"])


def test_host_addresses_reads_this_machine():
    got = filters.host_addresses(exclude_ifaces=["lo"])
    assert all(filters.address_allowed(a, filters.excluded_networks()) for a in got)
    assert "127.0.0.1" not in got


# ---- IceParams on the wire
HOST = "0b9ab6b4f8e6e0f2d3d0c8f0a7a5e4f1 1 udp 2130706431 198.19.2.1 40000 typ host"
SRFLX = ("5b7a2c 1 udp 1694498815 198.19.1.2 40000 typ srflx raddr 198.19.2.1 rport 40000")
RELAY = ("77aa 1 udp 16777215 198.19.1.5 50123 typ relay raddr 198.19.1.2 rport 40001 "
         "generation 0")
UFRAG, PWD = "abCD", "A" * 11 + "b/+" + "c" * 8


def test_params_round_trip():
    p = IceParams(UFRAG, PWD, (HOST, SRFLX, RELAY))
    wire = p.to_wire()
    assert wire[0] == f"ice:{UFRAG}:{PWD}"
    assert wire[1] == "candidate:" + HOST
    assert IceParams.from_wire(wire) == p


def test_from_wire_ignores_other_entries_and_order():
    wire = ["host 198.19.2.1:5800", "candidate:" + HOST, f"ice:{UFRAG}:{PWD}"]
    assert IceParams.from_wire(wire) == IceParams(UFRAG, PWD, (HOST,))


def test_parse_candidate_fields():
    c = parse_candidate(SRFLX)
    assert (c.type, c.host, c.port, c.priority, c.related) == (
        "srflx", "198.19.1.2", 40000, 1694498815, ("198.19.2.1", 40000))


@pytest.mark.parametrize(
    "wire",
    [
        [],
        ["candidate:" + HOST],  # no credentials
        [f"ice:{UFRAG}:{PWD}", f"ice:{UFRAG}:{PWD}"],
        [f"ice:{UFRAG}"],
        [f"ice:ab:{PWD}"],  # ufrag too short
        [f"ice:{UFRAG}:short"],
        [f"ice:{UFRAG}:{PWD}!"],
        [f"ice:{UFRAG}:{PWD}", "candidate:1 1 udp 1 host.local 9 typ host"],  # mDNS name
        [f"ice:{UFRAG}:{PWD}", "candidate:1 2 udp 1 198.19.2.1 9 typ host"],  # component 2
        [f"ice:{UFRAG}:{PWD}", "candidate:1 1 tcp 1 198.19.2.1 9 typ host"],
        [f"ice:{UFRAG}:{PWD}", "candidate:1 1 udp 1 198.19.2.1 9 typ prflx"],
        [f"ice:{UFRAG}:{PWD}", "candidate:1 1 udp 1 198.19.2.1 0 typ host"],  # port 0
        [f"ice:{UFRAG}:{PWD}", "candidate:1 1 udp 1 198.19.2.1 70000 typ host"],
        [f"ice:{UFRAG}:{PWD}", "candidate:1 1 udp -5 198.19.2.1 9 typ host"],
        [f"ice:{UFRAG}:{PWD}", "candidate:1 1 udp 1 198.19.2.1 9 tpy host"],
        [f"ice:{UFRAG}:{PWD}", "candidate:1 1 udp 1 198.19.2.1 9 typ host raddr"],
        [f"ice:{UFRAG}:{PWD}", "candidate:x" * 100],
        [f"ice:{UFRAG}:{PWD}", 7],
        [f"ice:{UFRAG}:{PWD}"] + ["candidate:" + HOST] * 32,
    ],
)
def test_from_wire_raises_only_malformed_message(wire):
    with pytest.raises(MalformedMessage):
        IceParams.from_wire(wire)


@given(st.lists(st.text(max_size=80), max_size=6))
def test_from_wire_never_raises_anything_else(wire):
    try:
        IceParams.from_wire(wire)
    except MalformedMessage:
        pass


@given(st.text(max_size=120))
def test_parse_candidate_never_raises_anything_else(sdp):
    try:
        parse_candidate(sdp)
    except MalformedMessage:
        pass


def test_to_wire_refuses_what_the_peer_would_reject():
    with pytest.raises(LocalProtocolError):
        IceParams("a:b", PWD, ()).to_wire()
    with pytest.raises(LocalProtocolError):
        IceParams(UFRAG, PWD, (HOST,) * 32).to_wire()


# ---- feed: STUN handed back by the data plane never raises out of the IceLink
def _hostile_stun() -> bytes:
    import struct

    # a Binding response whose LIFETIME attribute is 2 bytes long: aioice's parser raises
    # struct.error (not ValueError) on it
    header = struct.pack("!HHI12s", 0x0101, 8, 0x2112A442, b"x" * 12)
    return header + bytes.fromhex("000d0002") + bytes(4)


class _FakeSock:
    def __init__(self, fd):
        self.fd = fd

    def fileno(self):
        return self.fd


class _Receiver:
    def __init__(self):
        self.got = []

    def data_received(self, data, component):
        self.got.append(data)

    def request_received(self, *args):
        self.got.append(args)


def test_feed_counts_and_swallows_malformed_stun():
    from aioice.ice import StunProtocol

    from ipop.nat.ice import IceDispatcher, IceLink, _Endpoint

    link = IceLink(True, [], [])
    proto = StunProtocol.__new__(StunProtocol)  # no event loop needed for parsing
    proto.receiver = _Receiver()
    proto.transactions = {}
    sock = _FakeSock(1000)
    link._endpoints[1000] = _Endpoint(sock, proto, None)  # type: ignore[arg-type]
    disp = IceDispatcher()
    disp.add(link)
    assert disp.feed(sock, _hostile_stun(), ("198.19.1.2", 5), None) is True
    assert link.counters["stun_in_malformed"] == 1
    assert disp.feed(sock, b"\x17\xfe\xfd", ("198.19.1.2", 5), None) is False  # DTLS: not ours
    assert disp.feed(_FakeSock(7), _hostile_stun(), ("198.19.1.2", 5), None) is False
    assert link.feed(b"", ("198.19.1.2", 5), None, sock) is False
    assert link.counters["feed_refused"] == 2
    disp.remove(link)
    assert disp.feed(sock, _hostile_stun(), ("198.19.1.2", 5), None) is False
