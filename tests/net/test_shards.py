"""Shards (``workers: 2``) on real TUN devices in namespaces: two-node static overlays whose
nodes each run a second shard process (``ipop.dataplane.shards``)."""

from __future__ import annotations

import itertools

import pytest

from ipop.testbed.nodes import NodeProc

from .helpers import gbits, iperf3, ping, ping_until
from .test_dataplane import mesh


def shard_pids(node: NodeProc) -> list[int]:
    shards = node.status()["node"]["counters"].get("shards") or []
    return [s["pid"] for s in shards if s["alive"]]


@pytest.mark.parametrize("sec", [False, True], ids=["plain", "encrypted"])
def test_two_shards_ping_and_iperf(testbed, tmp_path, sec):
    a, b = mesh(testbed, tmp_path, 2, tap=False, sec=sec, workers=2)
    ping_until(a.host, b.config["ip4"], timeout=15)
    for x, y in itertools.permutations((a, b)):
        assert ping(x.host, y.config["ip4"])
    assert len(shard_pids(a)) == 1 and len(shard_pids(b)) == 1
    result = iperf3(a.host, b.host, b.config["ip4"], seconds=3)
    assert gbits(result) > 0.01

