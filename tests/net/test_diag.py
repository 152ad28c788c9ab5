"""The diagnostics against real nodes in the NAT world: ``ipop ping`` (direct and TURN-relayed
links, an offline peer, an on-demand peer with ``--connect``), ``ipop netcheck`` (behind a cone
and a symmetric NAT, a wrong TURN password, XMPP down), the control-API CLI (``peers``,
``link add|del``, ``friend add|remove``) and the MTU taken from the underlay route.

Topology::

    srv (prosody :5222, coturn :3478, a second coturn :3479: two STUN servers) ─┐
    public hosts ───────────────────────────────────────────────────────────────┤ inet LAN
    natX ── host (inside; one NAT box per NATed node: cone or symmetric) ───────┘

Every command runs as an operator would run it: ``python -m ipop ...`` (from the root
namespace for the control socket, inside the node's namespace for netcheck).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ipop.testbed.servers import Coturn

from .helpers import ping_until, wait_for
from .world import DOMAIN, TURN_PASS, TURN_USER, World

USERS = [f"d{i}" for i in range(1, 25)]  # members of the group "diag"
OTHERS = [f"x{i}" for i in range(1, 5)]  # accounts in no group
TWIN = USERS[-1]  # claims another node's overlay address
DIRECT = {"host", "srflx", "prflx"}
STUN2 = 3479


@pytest.fixture(scope="module")
def world():
    w = World({"diag": USERS}, turn=True, users=OTHERS)
    stun2 = Coturn(w.dir / "coturn2", listen_ip=w.server_ip, relay_ip=w.server_ip,
                   users={TURN_USER: TURN_PASS}, port=STUN2, netns=w.servers.ns)
    try:
        stun2.start()
        yield w
    finally:
        stun2.stop()
        w.close()


@pytest.fixture(autouse=True)
def _stop_nodes(world):
    yield
    world.stop_nodes()


_n = iter(range(1, 1000))


def servers_cfg(world: World, **extra: Any) -> dict[str, Any]:
    srv = world.server_ip
    return {"stun": [f"{srv}:3478", f"{srv}:{STUN2}"],
            "turn": [{"server": f"{srv}:3478", "user": TURN_USER, "pass": TURN_PASS}],
            "keepalive_seconds": 1.0, **extra}


def node(world: World, kind: str | None, *, user: str | None = None, group: str | None = "diag",
         **extra: Any):
    i = next(_n)
    user = user or USERS[i - 1]
    host = world.tb.add_host(f"h{user}")
    if kind is None:
        world.tb.attach(world.inet, host)
    else:
        world.tb.add_nat(f"nat{user}", [host], world.inet, kind=kind)
    return world.node(user, f"100.64.7.{i}", host=host, group=group,
                      **servers_cfg(world, **extra))


def ipop(*args: str, host=None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ipop", *args]
    if host is not None:
        return host.run(cmd, check=False, timeout=timeout)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def ping_json(a, target: str, *extra: str) -> tuple[int, dict[str, Any]]:
    r = ipop("ping", target, "--control", str(a.control), "--json", "--interval", "0.2", *extra)
    assert r.stdout, r.stderr
    return r.returncode, json.loads(r.stdout)


def show(*args: str, host=None) -> subprocess.CompletedProcess[str]:
    """Run and print a command as an operator sees it (the transcript in the test output)."""
    r = ipop(*args, host=host)
    print(f"\n$ ipop {' '.join(args)}\n{r.stdout}{r.stderr}(exit {r.returncode})")
    return r


def up_pair(world: World, ka: str | None, kb: str | None, **extra: Any):
    a, b = node(world, ka, **extra), node(world, kb, **extra)
    a.start()
    b.start()
    ping_until(a.host, b.config["ip4"], timeout=25)
    return a, b


# ---- ipop ping
def test_ping_direct_link_by_uid_prefix_jid_and_address(world):
    a, b = up_pair(world, "cone", "cone")
    for target in (b.uid[:10], f"{b.name}@{DOMAIN}", b.config["ip4"]):
        rc, out = ping_json(a, target, "--count", "3")
        assert rc == 0, out
        s = out["summary"]
        assert s["sent"] == 3 and s["answered"] == 3
        for p in out["probes"]:
            assert p["answered"] and p["uid"] == b.uid and p["path"] in DIRECT
            assert p["direct"] is True and p["rtt_ms"] > 0 and p["endpoint"]
    r = show("ping", b.uid[:10], "--control", str(a.control), "--count", "3")
    assert r.returncode == 0 and "pong from" in r.stdout and "(direct," in r.stdout


def test_ping_relayed_link_shows_relay(world):
    a, b = up_pair(world, "symmetric", "symmetric")
    rc, out = ping_json(a, b.uid, "--count", "3")
    assert rc == 0, out
    kinds = {p["path"] for p in out["probes"]}
    assert kinds == {"relay"}, kinds
    assert all(p["direct"] is False for p in out["probes"])
    assert all(p["endpoint"].startswith(world.server_ip) for p in out["probes"])
    r = show("ping", f"{b.name}@{DOMAIN}", "--control", str(a.control), "--count", "2")
    assert r.returncode == 0 and "via relay" in r.stdout and "not direct" in r.stdout
    # netcheck behind a symmetric NAT, with the nodes running (a transcript for the report)
    r = show("netcheck", "-c", str(a.config_path), host=a.host)
    assert r.returncode == 0 and "symmetric" in r.stdout


def test_ping_offline_and_unknown_peers(world):
    a, b = up_pair(world, None, None)
    b.stop()
    wait_for(lambda: a.link_to(b) is None, timeout=15, what="link removed after b left")
    rc, out = ping_json(a, f"{b.name}@{DOMAIN}")
    assert rc == 1
    assert out["probes"][0]["reason"] == "peer_offline", out
    assert out["summary"]["sent"] == 1  # no link: it says why once, not five times
    r = show("ping", b.uid[:12], "--control", str(a.control))
    assert r.returncode == 1 and "peer_offline" in r.stdout and "is offline" in r.stdout
    # an account that is not in the group
    rc, out = ping_json(a, f"{OTHERS[0]}@{DOMAIN}")
    assert rc == 1 and out["probes"][0]["reason"] == "not_in_group", out
    rc, out = ping_json(a, "100.64.250.250")
    assert rc == 1 and out["probes"][0]["reason"] == "unknown_peer", out


def test_ping_refused_duplicate_address_and_no_signaling(world):
    a = node(world, None)
    a.start()
    a.wait_ready()
    twin = world.node(TWIN, a.config["ip4"], host=world.host("twin"), group="diag",
                      **servers_cfg(world))
    twin.start()
    rc, out = wait_for(lambda: (r := ping_json(a, f"{TWIN}@{DOMAIN}"))[1]["probes"][0][
        "reason"] == "refused" and r, timeout=15, what="refused")
    assert rc == 1 and "duplicate overlay address" in out["probes"][0]["detail"], out
    twin.stop()
    b = node(world, None)
    b.start()
    ping_until(a.host, b.config["ip4"], timeout=25)
    world.prosody.stop()
    try:
        wait_for(lambda: not a.status()["node"]["xmpp"]["connected"], timeout=15,
                 what="a notices the XMPP server is gone")
        rc, out = ping_json(a, f"{OTHERS[0]}@{DOMAIN}")
        assert rc == 1 and out["probes"][0]["reason"] == "no_signaling", out
        rc, out = ping_json(a, b.uid, "--count", "2")
        print(f"\nlink to b while XMPP is down: {out['summary']['answered']}/2 answered, "
              f"{[(p.get('reason'), p.get('detail')) for p in out['probes']]}")
    finally:
        world.prosody.start()


def test_ping_on_demand_needs_connect(world):
    a = node(world, None, **{"on-demand_connection": True})
    b = node(world, None, **{"on-demand_connection": True})
    a.start()
    b.start()
    a.wait_ready()
    wait_for(lambda: any(p.get("uid") == b.uid and p.get("online")
                         for p in a.status()["peers"]), timeout=15, what="b online at a")
    rc, out = ping_json(a, b.uid)
    assert rc == 1 and out["probes"][0]["reason"] == "on_demand", out
    assert "--connect" in out["probes"][0]["detail"]
    t0 = time.monotonic()
    rc, out = ping_json(a, b.uid, "--connect", "--count", "2")
    assert rc == 0, out
    assert out["summary"]["answered"] == 2
    print(f"\n--connect: link made and 2 probes answered in {time.monotonic() - t0:.2f} s")


# ---- ipop netcheck
def netcheck(world: World, host, cfg: dict[str, Any], name: str) -> tuple[int, dict[str, Any]]:
    path = Path(world.dir) / f"netcheck-{name}.json"
    path.write_text(json.dumps(cfg))
    path.chmod(0o600)
    r = ipop("netcheck", "-c", str(path), "--json", "--timeout", "2", host=host)
    assert r.stdout, r.stderr
    return r.returncode, json.loads(r.stdout)


def base_cfg(world: World, user: str, **extra: Any) -> dict[str, Any]:
    """examples/node-a.json with this test bed's addresses and accounts substituted."""
    from ipop.testbed.servers import examples_dir
    from tests.net.world import PASSWORD

    cfg = json.loads((examples_dir() / "node-a.json").read_text())
    cfg.update({"xmpp_username": f"{user}@{DOMAIN}", "xmpp_password": PASSWORD,
                "xmpp_host": world.server_ip, "xmpp_tls": "none",
                "allow_insecure_signaling": True, "group": "diag",
                **servers_cfg(world), **extra})
    cfg.pop("xmpp_ca_cert")
    cfg.pop("state_dir")
    return cfg


def rows(out: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [c for c in out["checks"] if c["name"] == name]


@pytest.mark.parametrize(("kind", "expect"), [("cone", "endpoint-independent"),
                                              ("symmetric", "symmetric"), (None, "none")])
def test_netcheck_reports_the_nat_kind(world, kind, expect):
    host = world.tb.add_host(f"nc{kind or 'pub'}")
    if kind is None:
        world.tb.attach(world.inet, host)
    else:
        world.tb.add_nat(f"ncn{kind}", [host], world.inet, kind=kind)
    rc, out = netcheck(world, host, base_cfg(world, USERS[0]), f"nat-{kind}")
    assert rc == 0 and out["ok"], out
    nat = rows(out, "nat")[0]
    assert nat["data"]["kind"] == expect, nat
    stun = rows(out, "stun")
    assert len(stun) == 2 and all(c["ok"] for c in stun)
    turn = rows(out, "turn")[0]
    assert turn["ok"] and turn["data"]["relayed"].startswith(world.server_ip)
    assert rows(out, "xmpp_login")[0]["ok"] and rows(out, "udp_out")[0]["ok"]
    print(f"\n{kind}: {nat['detail']}; stun {[c['data']['mapped'] for c in stun]}; "
          f"turn relayed {turn['data']['relayed']}")
    if kind == "cone":
        cfg_path = Path(world.dir) / f"netcheck-nat-{kind}.json"
        r = show("netcheck", "-c", str(cfg_path), host=host)
        assert r.returncode == 0


def test_netcheck_wrong_turn_password_is_bad_credentials(world):
    host = world.host("ncturn")
    cfg = base_cfg(world, USERS[0], turn=[{"server": f"{world.server_ip}:3478",
                                           "user": TURN_USER, "pass": "wrong"}])
    rc, out = netcheck(world, host, cfg, "turnpw")
    assert rc == 1 and not out["ok"]
    turn = rows(out, "turn")[0]
    assert turn["ok"] is False and turn["cause"] == "bad_credentials", turn
    assert rows(out, "nat")[0]["ok"]  # the rest still ran


def test_netcheck_xmpp_down_is_refused_or_timeout(world):
    host = world.host("ncxmpp")
    rc, out = netcheck(world, host, base_cfg(world, USERS[0], xmpp_port=5299), "xmppdown")
    assert rc == 1
    tcp = rows(out, "xmpp_tcp")[0]
    assert tcp["ok"] is False and tcp["cause"] == "refused", tcp
    # a server that does not answer at all: nothing holds this address on the LAN
    rc, out = netcheck(world, host, base_cfg(world, USERS[0], xmpp_host="198.19.1.250"),
                       "xmppgone")
    assert rc == 1
    tcp = rows(out, "xmpp_tcp")[0]
    assert tcp["ok"] is False and tcp["cause"] in ("timeout", "unreachable"), tcp
    world.prosody.stop()
    try:
        rc, out = netcheck(world, host, base_cfg(world, USERS[0]), "xmppstopped")
        assert rc == 1 and rows(out, "xmpp_tcp")[0]["cause"] == "refused"
    finally:
        world.prosody.start()


def test_netcheck_xmpp_bad_password(world):
    host = world.host("ncpw")
    rc, out = netcheck(world, host, base_cfg(world, USERS[0], xmpp_password="nope"), "xmpppw")
    assert rc == 1
    login = rows(out, "xmpp_login")[0]
    assert login["ok"] is False and login["cause"] == "bad_credentials", login


# ---- the control-API CLI against running nodes
def test_cli_peers_json_and_table(world):
    a, b = up_pair(world, None, None)
    r = ipop("peers", "--control", str(a.control), "--json")
    assert r.returncode == 0, r.stderr
    peers = {p["uid"]: p for p in json.loads(r.stdout)["peers"]}
    assert peers[b.uid]["state"] == "up" and peers[b.uid]["online"] is True
    assert peers[b.uid]["path"] in DIRECT
    r = show("peers", "-c", str(a.config_path))
    assert r.returncode == 0 and b.uid[:12] in r.stdout


def test_cli_link_add_del(world):
    """Two nodes without signaling, linked by hand with ``ipop link add``, then unlinked."""
    ha, hb = world.host("lka"), world.host("lkb")
    a = world.node(OTHERS[1], "100.64.8.1", host=ha, group=None, listen_port=5900, sec=False)
    b = world.node(OTHERS[2], "100.64.8.2", host=hb, group=None, listen_port=5900, sec=False)
    for n in (a, b):
        for k in ("xmpp_username", "xmpp_password", "xmpp_host"):
            n.config.pop(k)
        n.start()
        n.wait_ready()
    for x, y in ((a, b), (b, a)):
        r = ipop("link", "add", y.uid, f"{y.host.addr}:5900", "--ip4", y.config["ip4"],
                 "--fingerprint", y.fingerprint, "--plain", "--control", str(x.control),
                 "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["peer_uid"] == y.uid
    ping_until(a.host, b.config["ip4"], timeout=10)
    rc, out = ping_json(a, b.config["ip4"], "--count", "2")
    assert rc == 0 and out["probes"][0]["path"] == "static"
    r = show("link", "del", b.uid, "--control", str(a.control))
    assert r.returncode == 0 and "removed" in r.stdout
    assert a.link_to(b) is None
    r = show("link", "del", b.uid, "--control", str(a.control))
    assert r.returncode == 1 and "no such link" in r.stderr and "ipop peers" in r.stderr
    r = show("link", "add", "abc", "198.19.1.1:1", "--control", str(a.control))
    assert r.returncode == 1 and "40 hex characters" in r.stderr
    # an encrypted link whose peer certificate does not match: ping says it is not keyed
    show("link", "del", a.uid, "--control", str(b.control))
    wrong = "sha-256 " + ":".join(["AB"] * 32)
    for x, y, fp in ((a, b, wrong), (b, a, a.fingerprint)):
        r = ipop("link", "add", y.uid, f"{y.host.addr}:5900", "--ip4", y.config["ip4"],
                 "--fingerprint", fp, "--encrypted", "--control", str(x.control))
        assert r.returncode == 0, r.stderr
    time.sleep(1.0)
    rc, out = ping_json(a, b.uid, "--count", "1")
    assert rc == 1 and out["probes"][0]["reason"] == "keying", out
    assert "DTLS" in out["probes"][0]["detail"]


def test_cli_friend_add_remove(world):
    ha = world.host("fra")
    a = world.node(OTHERS[3], "100.64.6.1", host=ha, group=None, controller="socialvpn")
    a.start()
    a.wait_ready()
    r = ipop("friend", "add", f"{OTHERS[2]}@{DOMAIN}", "--control", str(a.control), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["friend"] == f"{OTHERS[2]}@{DOMAIN}"
    r = show("friend", "remove", f"{OTHERS[2]}@{DOMAIN}", "--control", str(a.control))
    assert r.returncode == 0 and "removed" in r.stdout
    r = show("friend", "add", "not-a-jid", "--control", str(a.control))
    assert r.returncode == 1 and "bare JID" in r.stderr


def test_cli_errors_say_what_to_do(world, tmp_path):
    r = show("peers", "--control", str(tmp_path / "nothing.sock"))
    assert r.returncode == 1 and "ipop up -c FILE" in r.stderr
    a = node(world, None)
    a.start()
    a.wait_ready()
    r = show("friend", "add", f"x@{DOMAIN}", "--control", str(a.control))
    assert r.returncode == 1 and "SocialVPN" in r.stderr
    # bad ping requests get an error answer and leave the node running
    from ipop.errors import IpopError

    for params, text in (({"peer": ""}, "name a peer"), ({"peer": "1", "timeout": "x"},
                                                         "bad params"),
                         ({"peer": "0"}, "")):
        try:
            a.call("ping", params)
        except IpopError as exc:
            assert text in str(exc)
    assert a.call("ping", {"peer": "f" * 5000})["reason"] == "unknown_peer"
    assert a.status()["node"]["uid"] == a.uid


# ---- the default MTU from the underlay route
def test_mtu_from_underlay_route_and_override(world):
    a = node(world, None)
    dev = json.loads(a.host.run(["ip", "-j", "route", "get", world.server_ip]).stdout)[0]["dev"]
    a.host.run(["ip", "link", "set", dev, "mtu", "1460"])
    a.start()
    assert a.wait_ready()["node"]["mtu"] == 1460 - 126
    assert "overlay mtu 1334: underlay" in a.log()
    a.stop()
    a.config["mtu"] = 1200
    a.start()
    assert a.wait_ready()["node"]["mtu"] == 1200
    out = json.loads(ipop("netcheck", "-c", str(a.config_path), "--json", host=a.host).stdout)
    mtu = rows(out, "mtu")[0]
    assert mtu["ok"] and mtu["data"]["underlay_mtu"] == 1460
    assert mtu["data"]["overlay_fits"] == 1334
    a.stop()
    a.config["mtu"] = 1400
    out = json.loads(ipop("netcheck", "-c", str(a.write_config()), "--json",
                          host=a.host).stdout)
    mtu = rows(out, "mtu")[0]
    assert mtu["ok"] is False and mtu["cause"] == "mtu_too_large", mtu
