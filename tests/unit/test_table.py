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
    assert t.lookup_ip(bytes([100, 64, 0, 2])) is a
    assert t.by_uid[b"\x03" * 20] is b
    assert t.by_source[(sock.fileno(), ("198.18.0.2", 5001), None)] is b
    assert set(t.links) == {a, b}
    assert t.remove(b"\x02" * 20) is a
    assert t.lookup_ip(bytes([100, 64, 0, 2])) is None
    assert t.remove(b"\x02" * 20) is None


def test_replace_returns_old(sock):
    t = ForwardingTable()
    a1 = mk(sock, b"\x02" * 20, bytes([100, 64, 0, 2]))
    a2 = mk(sock, b"\x02" * 20, bytes([100, 64, 0, 9]))
    assert t.add(a1) is None
    assert t.add(a2) is a1
    assert t.lookup_ip(bytes([100, 64, 0, 2])) is None
    assert t.lookup_ip(bytes([100, 64, 0, 9])) is a2


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
