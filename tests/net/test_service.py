"""Running as a service (issue 13), on real namespaces: systemd's notify protocol, a node without
root, live reload under a running TCP stream, Prometheus metrics scraped by a real Prometheus,
and JSON logs.

Static tests (``testbed``)::

    +------------------- lan (bridge, 198.19.1.0/24) -------------------+
         |                         |                          |
      h1 (n1) 100.64.0.1        h2 (n2) 100.64.0.2        h3 (n3) 100.64.0.3
      iperf3 n1 -> n2 runs across every reload of n1; n3 is added to and removed from n1

Signaled test (``World``: one prosody, group ``r``)::

    x1 [red]   x2 [green] -> reload -> [green, red]   x3 [blue]
    x1 <-> x2: plain (no_common_group) -> encrypted (group:red), checked on the wire
    x2 <-> x3: plain before and after; an iperf3 stream x2 -> x3 crosses the reload
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipop.testbed.netns import Testbed
from ipop.testbed.nodes import NodeProc, static_mesh
from ipop.testbed.prometheus import Prometheus, fetch

from .helpers import ping, wait_for
from .test_security import assert_sealed, leak_run, security_of
from .world import World

NOBODY = 65534
CAP_NET_ADMIN = 12


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A work directory an unprivileged user can reach (pytest's tmp_path is root's, 0700)."""
    d = Path(tempfile.mkdtemp(prefix="ipop-svc-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def mesh(testbed: Testbed, workdir: Path, n: int, **extra: Any) -> list[NodeProc]:
    hosts = [testbed.add_host(f"h{i + 1}") for i in range(n)]
    lan = testbed.add_lan("lan", hosts)
    underlay = [lan.members[h.name] for h in hosts]
    return static_mesh(hosts, workdir, underlay=underlay, extra={"sec": True, **extra})


def wait_up(a: NodeProc, b: NodeProc, timeout: float = 15.0) -> dict[str, Any]:
    link: dict[str, Any] = wait_for(
        lambda: (lk := a.link_to(b)) is not None and lk["state"] == "up" and lk,
        timeout=timeout, what=f"{a.name}->{b.name} up\n{a.log()[-1500:]}")
    return link


class Stream:
    """An iperf3 TCP stream a -> b over the overlay, in the background, for ``seconds``."""

    def __init__(self, a: NodeProc, b: NodeProc, seconds: int = 6, port: int = 5202) -> None:
        self.a, self.b, self.seconds = a, b, seconds
        addr = b.config["ip4"]
        self.srv = b.host.popen(["iperf3", "-s", "-1", "-B", addr, "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: f":{port} " in b.host.run(["ss", "-Htln"], check=False).stdout,
                 timeout=5, what="iperf3 server")
        self.before = a.link_to(b)
        self.cli = a.host.popen(["iperf3", "-c", addr, "-p", str(port), "-t", str(seconds),
                                 "-J"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # the stream is running before the caller changes anything

    def finish(self) -> float:
        """Wait for the stream; asserts it ran its whole time on the same link; Mbit/s."""
        try:
            out, err = self.cli.communicate(timeout=self.seconds + 30)
        finally:
            if self.srv.poll() is None:
                self.srv.terminate()
            self.srv.wait(5)
        result = json.loads(out or "{}")
        assert self.cli.returncode == 0 and "error" not in result, (
            f"iperf3 lost its connection: {result.get('error')} {err[-300:]}\n"
            f"{self.a.log()[-1500:]}")
        end = result["end"]
        assert end["sum_received"]["seconds"] >= self.seconds - 0.5
        after = self.a.link_to(self.b)
        assert self.before is not None and after is not None
        # the same link all along: its counters only grew (a rebuilt link starts from zero)
        assert after["tx_bytes"] > self.before["tx_bytes"] + end["sum_received"]["bytes"] // 2
        mbits = float(end["sum_received"]["bits_per_second"]) / 1e6
        print(f"stream {self.a.name}->{self.b.name}: {mbits:.0f} Mbit/s, "
              f"{end['sum_sent'].get('retransmits', 0)} retransmits")
        return mbits


def ipop_reload(node: NodeProc) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ipop", "reload", "--control",
                           str(node.control)], capture_output=True, text=True, timeout=60)


# ---- systemd's notify protocol ---------------------------------------------------------------


def test_notify_socket_gets_ready_watchdog_and_stopping(testbed, tmp_path):
    """``ipop up`` under a NOTIFY_SOCKET: READY=1 once the NIC is up and the control socket
    answers, WATCHDOG=1 at half of WATCHDOG_USEC, RELOADING=1/READY=1 on SIGHUP, STOPPING=1."""
    host = testbed.add_host("h1")
    node = NodeProc(host, tmp_path, "n1", {"ip4": "100.64.0.1", "ip4_mask": 24,
                                           "interface": "ipsvc0"})
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(20)
    try:
        t0 = time.monotonic()
        node.start(env={**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000",
                        "JOURNAL_STREAM": "8:12345"})
        first = sock.recv(4096).decode()
        ready_s = time.monotonic() - t0
        assert first.startswith("READY=1\n"), first
        # at READY=1 the NIC is up with its address and the control socket answers
        shown = host.run(["ip", "-4", "addr", "show", "ipsvc0"]).stdout
        assert "100.64.0.1/24" in shown and ",UP" in shown
        assert node.status()["node"]["ip4"] == "100.64.0.1"
        got = [sock.recv(4096).decode() for _ in range(2)]
        assert got == ["WATCHDOG=1", "WATCHDOG=1"]
        node.proc.send_signal(1)  # SIGHUP: nothing changed, still a reload
        msgs = [sock.recv(4096).decode() for _ in range(4)]
        assert any(m.startswith("RELOADING=1\nMONOTONIC_USEC=") for m in msgs), msgs
        assert any(m.startswith("READY=1") for m in msgs), msgs
        assert node.proc.poll() is None
        node.stop()
        rest = []
        sock.settimeout(2)
        while True:
            try:
                rest.append(sock.recv(4096).decode())
            except TimeoutError:
                break
        assert "STOPPING=1" in rest, rest
        assert node.proc.returncode == 0
        # under journald: no timestamp of our own, the syslog priority first
        lines = [ln for ln in node.log().splitlines() if ln.startswith("<")]
        assert any(ln.startswith("<6>ipop.node INFO node ") for ln in lines), node.log()
        assert not any(re.match(r"<\d>\d{4}-\d\d-\d\d", ln) for ln in lines)
        print(f"READY=1 after {ready_s:.2f} s")
    finally:
        sock.close()
        node.stop()


# ---- without root -----------------------------------------------------------------------------


def unprivileged(node: NodeProc) -> list[str]:
    """The command prefix that runs ``node`` as nobody with CAP_NET_ADMIN and nothing else.

    /dev/net/tun is 0600 root on this machine (Debian's udev makes it 0666), so the node gets
    its own device node, owned by nobody, bound over /dev/net/tun in a private mount namespace."""
    tun = node.dir / "tun"
    os.mknod(tun, 0o600 | stat.S_IFCHR, os.makedev(10, 200))
    for dirpath, _dirs, files in os.walk(node.dir):
        os.chown(dirpath, NOBODY, NOBODY)
        for f in files:
            os.chown(os.path.join(dirpath, f), NOBODY, NOBODY)
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
               "--inh-caps=-all,+net_admin", "--ambient-caps=-all,+net_admin",
               "--bounding-set=-all,+net_admin", "--"]
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount --bind {tun} /dev/net/tun && exec "$@"', "sh", *setpriv]


def test_up_without_root_holding_only_cap_net_admin(testbed, open_dir):
    a, b = mesh(testbed, open_dir, 2)
    a.write_config()
    prefix = unprivileged(a)
    a.start(prefix=prefix)
    b.start()
    a.wait_ready()
    b.wait_ready()
    status = Path(f"/proc/{a.proc.pid}/status").read_text()
    ids = {k: v.split() for k, v in re.findall(r"^(Uid|Gid|CapEff|CapPrm|CapAmb):\s+(.*)$",
                                                 status, re.M)}
    assert ids["Uid"] == [str(NOBODY)] * 4 and ids["Gid"] == [str(NOBODY)] * 4
    for key in ("CapEff", "CapPrm", "CapAmb"):
        assert int(ids[key][0], 16) == 1 << CAP_NET_ADMIN, (key, ids[key])
    link = wait_up(a, b)
    assert link["security"] == "dtls"
    assert ping(a.host, b.config["ip4"], count=5)
    assert ping(b.host, a.config["ip4"], count=5)
    assert (a.state_dir / "lock").stat().st_uid == NOBODY
    assert a.control.stat().st_uid == NOBODY
    mbits = Stream(a, b, seconds=2).finish()
    print(f"nobody node: CapEff {ids['CapEff'][0]}, link {link['security']} {link['path']}, "
          f"{mbits:.0f} Mbit/s")


# ---- live reload: static peers, refusals ------------------------------------------------------


def test_reload_static_peers_and_refusals_keep_a_running_stream(testbed, tmp_path):
    n1, n2, n3 = mesh(testbed, tmp_path, 3)
    full = json.loads(json.dumps(n1.config))
    n3_peer = next(p for p in full["peers"] if p["uid"] == n3.uid)
    n1.config["peers"] = [p for p in full["peers"] if p["uid"] != n3.uid]
    for node in (n1, n2, n3):
        node.start()
    for node in (n1, n2, n3):
        node.wait_ready()
    wait_up(n1, n2)
    assert n1.link_to(n3) is None

    # 1. SIGHUP with a peer added
    stream = Stream(n1, n2)
    n1.reload({**n1.config, "peers": [*n1.config["peers"], n3_peer]})
    wait_up(n1, n3)
    assert ping(n1.host, n3.config["ip4"], count=3)
    stream.finish()

    # 2. SIGHUP with that peer removed
    stream = Stream(n1, n2)
    n1.reload({**n1.config, "peers": [p for p in n1.config["peers"] if p["uid"] != n3.uid]})
    wait_for(lambda: n1.link_to(n3) is None, timeout=10, what="n3's link removed")
    assert not ping(n1.host, n3.config["ip4"], count=2, wait=1)
    stream.finish()

    # 3. an invalid config: refused whole, by `ipop reload` and by SIGHUP; the node runs on
    good = dict(n1.config)
    stream = Stream(n1, n2)
    n1.config = {**good, "ip4_mask": 99, "controller_logging": "DEBUG"}
    n1.write_config()
    r = ipop_reload(n1)
    assert r.returncode == 2, r
    assert r.stderr.count("\n") == 1 and "ip4_mask" in r.stderr, r.stderr
    n1.proc.send_signal(1)
    wait_for(lambda: n1.log().count("reload refused: config: ip4_mask") >= 2, timeout=10,
             what="the SIGHUP refusal logged")
    assert n1.proc.poll() is None and n1.status()["node"]["ip4_mask"] == 24
    stream.finish()

    # 4. ip4 changed: refused with one line naming the key; nothing else applied
    stream = Stream(n1, n2)
    n1.config = {**good, "ip4": "100.64.0.9", "controller_logging": "DEBUG"}
    n1.write_config()
    r = ipop_reload(n1)
    assert r.returncode == 2 and "ip4:" in r.stderr and "restart" in r.stderr, r
    assert r.stderr.count("\n") == 1
    assert n1.status()["node"]["ip4"] == "100.64.0.1"
    assert "100.64.0.1/24" in n1.host.run(["ip", "-4", "addr", "show", "ipop0"]).stdout
    stream.finish()

    # 5. a live change through `ipop reload`: printed; then nothing left to change
    n1.config = {**good, "controller_logging": "DEBUG", "rekey_seconds": 60}
    n1.write_config()
    r = ipop_reload(n1)
    assert r.returncode == 0 and "changed controller_logging, rekey_seconds" in r.stdout, r
    r = ipop_reload(n1)
    assert r.returncode == 0 and "nothing changed" in r.stdout, r
    assert ping(n1.host, n2.config["ip4"], count=3)
    removed = [line for line in n1.log().splitlines() if f"link {n2.uid[:12]} removed" in line]
    assert not removed, removed


# ---- live reload: security groups turn a link from plain to encrypted --------------------------


@pytest.fixture
def world():
    w = World({"r": ["x1", "x2", "x3"]})
    try:
        yield w
    finally:
        w.close()


def test_reload_security_groups_encrypts_a_plain_link(world, tmp_path):
    x1 = world.node("x1", "100.64.21.1", group="r", security_groups=["red"])
    x2 = world.node("x2", "100.64.21.2", group="r", security_groups=["green"],
                    metrics_listen="127.0.0.1:9477")
    x3 = world.node("x3", "100.64.21.3", group="r", security_groups=["blue"])
    for node in (x1, x2, x3):
        node.start()
    for node in (x1, x2, x3):
        node.wait_ready()
    for a, b in ((x1, x2), (x2, x1), (x2, x3), (x3, x2)):
        wait_up(a, b, timeout=30)
    assert security_of(x1, x2) == ("none", "no_common_group")
    assert security_of(x2, x3) == ("none", "no_common_group")

    stream = Stream(x2, x3)
    x2.reload({**x2.config, "security_groups": ["green", "red"]})
    for a, b in ((x2, x1), (x1, x2)):
        wait_for(lambda a=a, b=b: (a.link_to(b) or {}).get("security") == "dtls"
                 and a.link_to(b)["state"] == "up", timeout=30,
                 what=f"{a.name}->{b.name} encrypted\n{a.log()[-1500:]}")
    stream.finish()
    assert security_of(x2, x1) == ("dtls", "group:red")
    assert security_of(x1, x2) == ("dtls", "group:red")
    assert security_of(x2, x3) == ("none", "no_common_group")  # the unchanged link
    # on the wire: no marker crosses x2's underlay in plaintext any more
    raw, dgrams = leak_run(x2, x1, tmp_path)
    assert_sealed(raw, dgrams, 10)
    # the metrics say it too, with the signaling counters of a signaled node
    text = fetch("http://127.0.0.1:9477/metrics", x2.host.ns)
    assert sample(text, "ipop_link_info", peer_uid=x1.uid, security="dtls",
                  security_reason="group:red") == 1.0
    assert sample(text, "ipop_link_info", peer_uid=x3.uid, security="none",
                  security_reason="no_common_group") == 1.0
    assert sample(text, "ipop_signaling_connected") == 1.0
    sent = sample(text, "ipop_con_req_sent_total") or 0
    received = sample(text, "ipop_con_req_received_total") or 0
    assert sent + received >= 3  # x1, x3, and x1 again after the reload


# ---- metrics and a real Prometheus ------------------------------------------------------------


def sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_pass_promtool_and_a_real_prometheus_scrapes_them(testbed, tmp_path):
    assert shutil.which("promtool") and shutil.which("prometheus"), "setup.sh installs them"
    n1, n2 = mesh(testbed, tmp_path, 2, rekey_seconds=5)
    n1.config["metrics_listen"] = "127.0.0.1:9477"
    for node in (n1, n2):
        node.start()
    for node in (n1, n2):
        node.wait_ready()
    wait_up(n1, n2)
    Stream(n2, n1, seconds=2).finish()  # n1 receives the bulk
    text = fetch("http://127.0.0.1:9477/metrics", n1.host.ns)
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr + text
    rx = sample(text, "ipop_link_rx_bytes_total", peer_uid=n2.uid)
    assert rx is not None and rx > 1_000_000
    assert sample(text, "ipop_link_state", peer_uid=n2.uid, state="up") == 1.0
    assert sample(text, "ipop_link_info", peer_uid=n2.uid, path="static", security="dtls",
                  security_reason="static_sec") == 1.0
    assert sample(text, "ipop_links", state="up") == 1.0
    assert sample(text, "ipop_build_info") == 1.0
    assert sample(text, "ipop_rekeys_total") is not None

    prom = Prometheus(tmp_path / "prometheus", ["127.0.0.1:9477"], netns=n1.host.ns)
    prom.start()
    try:
        def scraped() -> list[dict[str, Any]]:
            try:
                result = prom.query(f'ipop_link_rx_bytes_total{{peer_uid="{n2.uid}"}}')
            except Exception:
                return []
            return [s for s in result if float(s["value"][1]) > 0]
        got = wait_for(scraped, timeout=30, step=0.5, what="prometheus scraped ipop")
        value = float(got[0]["value"][1])
        assert value >= rx
        up = prom.query('up{job="ipop"}')
        assert up and up[0]["value"][1] == "1"
        print(f"prometheus: ipop_link_rx_bytes_total = {value:.0f}; {len(text.splitlines())} "
              "lines of metrics")
    finally:
        prom.stop()
    # rekey_seconds 5: the rekeys counter moves
    wait_for(lambda: (sample(fetch("http://127.0.0.1:9477/metrics", n1.host.ns),
                             "ipop_rekeys_total") or 0) >= 1, timeout=20, step=0.5,
             what="a rekey counted")


# ---- JSON logs -----------------------------------------------------------------------------


def test_json_logs_parse_and_carry_the_peer_uid(testbed, tmp_path):
    n1, n2 = mesh(testbed, tmp_path, 2, log_format="json")
    for node in (n1, n2):
        node.start(log_level=None)
    for node in (n1, n2):
        node.wait_ready()
    wait_up(n1, n2)
    n1.stop()
    lines = [ln for ln in n1.log().splitlines() if ln.startswith("{")]
    others = [ln for ln in n1.log().splitlines() if ln and not ln.startswith("{")]
    assert not others, others  # every log line is JSON
    objs = [json.loads(ln) for ln in lines]
    assert all({"time", "level", "logger", "message"} <= o.keys() for o in objs)
    link_events = [o for o in objs if o.get("peer_uid") == n2.uid]
    assert any("up" in o["message"] and o.get("link") for o in link_events), link_events
    assert any(o["message"].startswith("static link") for o in link_events), link_events
    print(f"{len(objs)} JSON lines, {len(link_events)} about the link to n2")


def test_reload_sec_rebuilds_static_links_encrypted(testbed, tmp_path):
    """``sec`` false -> true on both ends of a static link: each end rebuilds it encrypted."""
    n1, n2 = mesh(testbed, tmp_path, 2, sec=False)
    for node in (n1, n2):
        node.start()
    for node in (n1, n2):
        node.wait_ready()
    assert wait_up(n1, n2)["security"] == "none"
    for node in (n1, n2):
        node.reload({**node.config, "sec": True})
    for a, b in ((n1, n2), (n2, n1)):
        wait_for(lambda a=a, b=b: (a.link_to(b) or {}).get("security") == "dtls"
                 and a.link_to(b)["state"] == "up", timeout=15,
                 what=f"{a.name}->{b.name} rebuilt encrypted\n{a.log()[-1500:]}")
    assert n1.link_to(n2)["security_reason"] == "static_sec"
    assert ping(n1.host, n2.config["ip4"], count=3)
    assert f"{n2.uid[:12]} rebuilt (dtls)" in n1.log()
