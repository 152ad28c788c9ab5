"""Prefix sets and longest-prefix match: vectors, and properties against a brute-force model."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipop.wire.prefixes import PrefixSet, RouteTable, parse_prefix, parse_prefixes


def v4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def v6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def test_lpm_vectors():
    t = RouteTable([(parse_prefix("198.18.0.0/15"), "wide"),
                    (parse_prefix("198.18.200.0/24"), "lan"),
                    (parse_prefix("198.18.200.7/32"), "host"),
                    (parse_prefix("0.0.0.0/0"), "exit"),
                    (parse_prefix("2001:db8:1::/48"), "v6lan"),
                    (parse_prefix("::/0"), "exit6")])
    assert t.lookup(v4("198.18.200.7")) == "host"
    assert t.lookup(v4("198.18.200.8")) == "lan"
    assert t.lookup(v4("198.19.3.4")) == "wide"
    assert t.lookup(v4("100.64.0.1")) == "exit"
    assert t.lookup(v6("2001:db8:1::5")) == "v6lan"
    assert t.lookup(v6("2001:db8:2::5")) == "exit6"
    assert t.lookup(b"\x01\x02") is None
    assert RouteTable().lookup(v4("1.2.3.4")) is None
    assert str(t.match(v4("198.18.200.9"))) == "198.18.200.0/24"


def test_first_entry_of_a_prefix_wins():
    t = RouteTable([(parse_prefix("198.18.200.0/24"), 1), (parse_prefix("198.18.200.0/24"), 2)])
    assert t.lookup(v4("198.18.200.1")) == 1
    assert len(t) == 1


def test_prefix_set_membership_and_overlap():
    s = PrefixSet([parse_prefix("198.18.200.0/24"), parse_prefix("2001:db8::/32")])
    assert v4("198.18.200.1") in s and v4("198.18.201.1") not in s
    assert v6("2001:db8::1") in s and v6("2001:db9::1") not in s
    assert str(s.overlapping(parse_prefix("198.18.0.0/16"))) == "198.18.200.0/24"
    assert s.overlapping(parse_prefix("198.19.0.0/16")) is None
    assert not PrefixSet() and s


@pytest.mark.parametrize("bad", ["198.18.200.1/24", "198.18.200.0/33", "x", "", " 1.2.3.0/24",
                                 "2001:db8::1/32", "1.2.3.0/24\n", 5, None, "١٢٣.0.0.0/8"])
def test_parse_refuses(bad):
    with pytest.raises(ValueError):
        parse_prefix(bad)


def test_parse_list_limit_and_duplicates():
    assert parse_prefixes(["198.18.0.0/24", "198.18.0.0/24"]) == (parse_prefix("198.18.0.0/24"),)
    with pytest.raises(ValueError, match="more than 64"):
        parse_prefixes([f"198.18.{i}.0/24" for i in range(65)])


nets4 = st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False),
                  st.integers(0, 2**32 - 1), st.integers(0, 32))
nets6 = st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False),
                  st.integers(0, 2**128 - 1), st.integers(0, 128))


def brute(nets, addr):
    ip = ipaddress.ip_address(addr)
    best = None
    for i, n in enumerate(nets):
        longer = best is None or n.prefixlen > best[0].prefixlen
        if n.version == ip.version and ip in n and longer:
            best = (n, i)
    return None if best is None else best[1]


@settings(max_examples=300, deadline=None)
@given(st.lists(nets4 | nets6, max_size=20, unique=True), st.lists(
    st.integers(0, 2**32 - 1).map(lambda a: a.to_bytes(4, "big"))
    | st.integers(0, 2**128 - 1).map(lambda a: a.to_bytes(16, "big")), max_size=20))
def test_lpm_matches_brute_force(nets, addrs):
    table = RouteTable((n, i) for i, n in enumerate(nets))
    pset = PrefixSet(nets)
    for addr in addrs:
        assert table.lookup(addr) == brute(nets, addr)
        assert (addr in pset) == (brute(nets, addr) is not None)


@settings(max_examples=200, deadline=None)
@given(st.lists(nets4, min_size=1, max_size=10, unique=True), st.data())
def test_every_address_inside_a_prefix_is_held(nets, data):
    table = RouteTable((n, i) for i, n in enumerate(nets))
    net = data.draw(st.sampled_from(nets))
    offset = data.draw(st.integers(0, net.num_addresses - 1))
    addr = (int(net.network_address) + offset).to_bytes(4, "big")
    found = table.lookup(addr)
    assert found is not None and nets[found].prefixlen >= net.prefixlen
