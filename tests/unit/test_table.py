import socket

import pytest

from ipop.dataplane.link import Link, Path
from ipop.dataplane.table import ForwardingTable

ME = b"\x01" * 20


@pytest.fixture()
def sock():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    yield s
    s.close()


def mk(sock, uid: bytes, ip: bytes, port: int = 5000) -> Link:
    return Link(local_uid=ME, peer_uid=uid, path=Path(sock, ("198.18.0.2", port)),
                overlay_ip4=ip)


def test_add_lookup_remove(sock):
    t = ForwardingTable()
    a = mk(sock, b"\x02" * 20, bytes([100, 64, 0, 2]))
    b = mk(sock, b"\x03" * 20, bytes([100, 64, 0, 3]), 5001)
    t.add(a)
    t.add(b)
    assert t.route(bytes([100, 64, 0, 2])) is a
    assert t.by_uid[b"\x03" * 20] is b
    assert t.by_source[(sock.fileno(), ("198.18.0.2", 5001), None)] is b
    assert set(t.links) == {a, b}
    assert t.remove(b"\x02" * 20) is a
    assert t.route(bytes([100, 64, 0, 2])) is None
    assert t.remove(b"\x02" * 20) is None


def test_replace_returns_old(sock):
    t = ForwardingTable()
    a1 = mk(sock, b"\x02" * 20, bytes([100, 64, 0, 2]))
    a2 = mk(sock, b"\x02" * 20, bytes([100, 64, 0, 9]))
    assert t.add(a1) is None
    assert t.add(a2) is a1
    assert t.route(bytes([100, 64, 0, 2])) is None
    assert t.route(bytes([100, 64, 0, 9])) is a2


def test_mac_learning_forgets_removed_links(sock):
    t = ForwardingTable()
    a = mk(sock, b"\x02" * 20, bytes([100, 64, 0, 2]))
    t.add(a)
    t.learn_mac(b"\x02\x00\x00\x00\x00\x01", a)
    assert t.by_mac[b"\x02\x00\x00\x00\x00\x01"] is a
    t.remove(a.peer_uid)
    assert b"\x02\x00\x00\x00\x00\x01" not in t.by_mac


def test_reindex_after_path_change(sock):
    t = ForwardingTable()
    a = mk(sock, b"\x02" * 20, bytes([100, 64, 0, 2]))
    t.add(a)
    a.path = Path(sock, ("198.18.0.7", 6000))
    t.reindex()
    assert t.by_source[(sock.fileno(), ("198.18.0.7", 6000), None)] is a


def test_route_verdict_owner_then_longest_prefix_not_for_groups(sock):
    import ipaddress

    t = ForwardingTable()
    a = mk(sock, b"\x02" * 20, bytes([100, 64, 0, 2]))
    b = mk(sock, b"\x03" * 20, bytes([100, 64, 0, 3]), 5001)
    a.set_nets((ipaddress.ip_network("198.18.200.0/24"),))
    b.set_nets((ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("224.0.0.0/4")))
    t.add(a)
    t.add(b)
    ip = ipaddress.IPv4Address
    assert t.route(ip("100.64.0.2").packed) is a  # the owner, though b's /0 covers it
    assert t.route(ip("198.18.200.9").packed) is a  # the longest prefix
    assert t.route(ip("198.18.201.9").packed) is b  # the default
    assert t.route(ip("224.0.0.251").packed, group=True) is None  # groups are flooded
    assert t.route(ip("224.0.0.251").packed) is b
    assert t.route(ip("100.64.0.3").packed, group=True) is b  # an owner still wins
