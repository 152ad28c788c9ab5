"""The underlay route MTU from the ``ip`` tool agrees with the netlink (pyroute2) lookup."""

from __future__ import annotations

import shutil

from ipop import netinfo


def test_route_mtu_from_ip_matches_netlink() -> None:
    assert shutil.which("ip") is not None
    for dests in ([], ["127.0.0.1"], ["198.18.0.1"]):
        assert netinfo._lookup_ip(dests) == netinfo._lookup_netlink(dests), dests
