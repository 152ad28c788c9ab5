"""GroupVPN over a real ejabberd (the seed paper's server) instead of prosody.

ejabberd runs in its own namespace on a test-bed LAN; two nodes of one group (shared roster via
mod_shared_roster) link on their own, encrypted, and ping both ways; a wrong password exits 2;
and a stopped ejabberd leaves no process behind (no epmd, no beam, no port program).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipop.testbed.ejabberd import Ejabberd, _descendants
from ipop.testbed.netns import Host, Testbed, namespace_pids
from ipop.testbed.nodes import NodeProc

from .helpers import ping, ping_until, wait_for

DOMAIN = "ipop.test"
PASSWORD = "pw-ejabberd-test"
GROUP = "ejlab"


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
    return kb / 1024


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return ""


class EjWorld:
    """One test bed LAN with ejabberd on it; nodes are added per test."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ipop-ejabberd-"))
        self.dir.chmod(0o711)  # the VM runs as user ejabberd: it must reach its work dir
        self.tb = Testbed()
        self.nodes: list[NodeProc] = []
        self.ejabberd: Ejabberd | None = None
        try:
            self.srv = self.tb.add_host("ejsrv")
            self.inet = self.tb.add_lan("inet", [self.srv])
            self.server_ip = self.inet.members["ejsrv"]
            self.ejabberd = Ejabberd(
                self.dir / "ejabberd", domain=DOMAIN, bind=self.server_ip, netns=self.srv.ns
            )
            for user in ("e1", "e2"):
                self.ejabberd.register(user, PASSWORD)
            self.ejabberd.set_groups({GROUP: ["e1", "e2"]})
            t0 = time.monotonic()
            self.ejabberd.start()  # also applies the queued accounts and group
            assert self.ejabberd.pid is not None
            print(
                f"\nejabberd: listening and set up in {time.monotonic() - t0:.2f} s, "
                f"RSS {_rss_mb(self.ejabberd.pid):.0f} MB"
            )
        except BaseException:
            self.close()
            raise

    def node(self, user: str, ip4: str, **extra: Any) -> NodeProc:
        host = self.tb.hosts.get(user) or self.tb.add_host(user)
        if user not in self.inet.members:
            self.tb.attach(self.inet, host)
        cfg: dict[str, Any] = {
            "ip4": ip4,
            "ip4_mask": 24,
            "xmpp_username": f"{user}@{DOMAIN}",
            "xmpp_password": PASSWORD,
            "xmpp_host": self.server_ip,
            "xmpp_tls": "none",
            "allow_insecure_signaling": True,
            "group": GROUP,
            "sec": True,
            "keepalive_seconds": 1.0,
            **extra,
        }
        node = NodeProc(host, self.dir, user, cfg)
        self.nodes.append(node)
        return node

    def close(self) -> None:
        try:
            for node in self.nodes:
                node.stop()
            if self.ejabberd is not None:
                self.ejabberd.close()
        finally:
            self.tb.close()
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def world() -> Iterator[EjWorld]:
    w = EjWorld()
    try:
        yield w
    finally:
        w.close()


def test_group_pair_links_and_pings_both_ways(world: EjWorld) -> None:
    a = world.node("e1", "100.64.20.1")
    b = world.node("e2", "100.64.20.2")
    t0 = time.monotonic()
    a.start()
    b.start()
    a.wait_ready()
    b.wait_ready()
    ping_until(a.host, "100.64.20.2", timeout=20)
    print(f"\nejabberd: both nodes started -> first ping reply in {time.monotonic() - t0:.2f} s")
    for x, y in ((a, b), (b, a)):
        wait_for(
            lambda x=x, y=y: (x.link_to(y) or {}).get("state") == "up",
            timeout=10,
            what=f"{x.name}->{y.name} link up",
        )
        assert ping(x.host, y.config["ip4"], count=2), f"{x.name} -> {y.name}"
    peers = a.status()["peers"]
    assert [p["jid"] for p in peers] == [f"e2@{DOMAIN}"]
    assert peers[0]["online"] and peers[0]["linked"]
    assert a.status()["node"]["xmpp"]["connected"] is True
    for n in (a, b):
        n.stop()


def test_wrong_password_exits_2(world: EjWorld) -> None:
    node = world.node("e1", "100.64.20.9", xmpp_password="wrong")
    node.start()
    assert node.proc is not None
    assert node.proc.wait(30) == 2
    lines = [ln for ln in node.log().splitlines() if ln.startswith("ipop:")]
    assert len(lines) == 1 and "xmpp_password" in lines[0], node.log()[-2000:]


def test_stop_leaves_no_process_behind(world: EjWorld) -> None:
    """A second server in its own namespace: after stop(), its namespace holds no process."""
    host: Host = world.tb.add_host("ejsrv2")
    ip = world.tb.attach(world.inet, host)
    ej = Ejabberd(world.dir / "ejabberd2", domain=DOMAIN, bind=ip, netns=host.ns)
    try:
        t0 = time.monotonic()
        ej.start()
        took = time.monotonic() - t0
        pid = ej.pid
        assert pid is not None
        assert _comm(pid) == "beam.smp"  # our child is the VM itself, not a wrapper
        kids = _descendants(pid)
        ej.register("zed", "pw")  # a running server takes accounts at once
        r = ej.ctl("srg_list", DOMAIN)  # ejabberdctl works too, and starts no epmd
        assert r.returncode == 0, r.stdout + r.stderr
        in_ns = namespace_pids(host.ns)
        assert pid in in_ns and set(kids) <= in_ns
        assert "epmd" not in {_comm(p) for p in in_ns}
        t0 = time.monotonic()
        ej.stop()
        print(
            f"\nejabberd: start {took:.2f} s, stop {time.monotonic() - t0:.2f} s, "
            f"{len(kids)} helper processes"
        )
        assert namespace_pids(host.ns) == set()
        # gone, or a zombie waiting for init to reap it (reparented when the VM exited)
        assert [p for p in kids if _state(p) not in ("", "Z")] == []
    finally:
        ej.close()
    assert not (world.dir / "ejabberd2").exists()
