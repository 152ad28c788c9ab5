"""``ipop check`` (vectors of good and bad configs; nothing is created on disk), ``ipop
--version``, the examples (node configs validate, the groups file is what the test bed writes,
the server configs render), the NAT-kind verdict and the overlay MTU arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipop import __version__, config, netinfo
from ipop.cli.netcheck import nat_kind
from ipop.testbed.servers import Coturn, Prosody, examples_dir, make_self_signed_cert

GOOD = {"ip4": "100.64.0.1", "xmpp_username": "alice@vpn.example.org",
        "xmpp_password": "pw", "xmpp_host": "203.0.113.10", "security_groups": ["lab"]}


def ipop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ipop", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def write(tmp_path: Path, data: object, mode: int = 0o600, name: str = "node.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    path.chmod(mode)
    return path


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_version():
    r = ipop("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"ipop {__version__}"


def test_check_good_config_creates_nothing(tmp_path):
    state = tmp_path / "state"
    path = write(tmp_path, {**GOOD, "state_dir": str(state),
                            "control_socket": str(tmp_path / "c.sock")})
    before = tree(tmp_path)
    r = ipop("check", "-c", str(path))
    assert r.returncode == 0, r.stderr
    assert "ok:" in r.stdout
    assert tree(tmp_path) == before and not state.exists()  # no key, no lock, no socket
    r = ipop("check", "-c", str(path), "--json")
    out = json.loads(r.stdout)
    assert out["ok"] is True and out["state_dir"] == str(state)


@pytest.mark.parametrize(("data", "key"), [
    ({**GOOD, "ip4": "100.64.0.300"}, "ip4"),
    ({**GOOD, "ip4_mask": 40}, "ip4_mask"),
    ({**GOOD, "xmpp_tls": "sslv3"}, "xmpp_tls"),
    ({k: v for k, v in GOOD.items() if k != "xmpp_password"}, "xmpp_password"),
    ({**GOOD, "xmpp_username": "alice"}, "xmpp_username"),
    ({**GOOD, "stun": ["203.0.113.10:99999"]}, "stun"),
    ({**GOOD, "turn": [{"server": "203.0.113.10:3478", "user": "u"}]}, "turn[0].pass"),
    ({**GOOD, "mtu": 100}, "mtu"),
    ({**GOOD, "peers": [{"uid": "ab", "ip4": "100.64.0.2", "endpoint": "1.2.3.4:5"}],
      "listen_port": 5800}, "peers[0].uid"),
    ({**GOOD, "xmpp_ca_cert": "/nonexistent/ca.pem"}, "xmpp_ca_cert"),
    ([1, 2], "config"),
    ("{not json", "config"),
])
def test_check_bad_configs_exit_2_naming_the_key(tmp_path, data, key):
    path = write(tmp_path, data)
    before = tree(tmp_path)
    r = ipop("check", "-c", str(path))
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    prefix = "ipop: config:" if key == "config" else f"ipop: config: {key}"
    assert len(lines) == 1 and lines[0].startswith(prefix), lines
    assert tree(tmp_path) == before


def test_check_ca_cert_must_hold_a_certificate(tmp_path):
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    r = ipop("check", "-c", str(write(tmp_path, {**GOOD, "xmpp_ca_cert": str(bogus)})))
    assert r.returncode == 2 and "xmpp_ca_cert" in r.stderr and "no PEM" in r.stderr


def test_check_warns_on_risky_settings(tmp_path):
    path = write(tmp_path, {**GOOD, "xmpp_tls": "none", "allow_insecure_signaling": True,
                            "sec": False, "security_groups": None}, mode=0o644)
    r = ipop("check", "-c", str(path))
    assert r.returncode == 0
    text = r.stdout
    assert 'xmpp_tls: "none" sends the XMPP password' in text
    assert "readable by others and holds xmpp_password" in text
    assert "sec: false with no security_groups" in text
    assert "3 warnings" in text
    not_pem = write(tmp_path, {**GOOD, "xmpp_tls": "direct", "xmpp_ca_cert": str(
        examples_dir() / "prosody.cfg.lua")}, name="q.json")
    r = ipop("check", "-c", str(not_pem))
    assert r.returncode == 2 and "no PEM certificate" in r.stderr


def test_check_missing_file(tmp_path):
    r = ipop("check", "-c", str(tmp_path / "nope.json"))
    assert r.returncode == 2 and "cannot read" in r.stderr


# ---- the examples
@pytest.mark.parametrize("name", ["node-a.json", "node-b.json"])
def test_example_node_configs_validate_without_warnings(tmp_path, name):
    data = json.loads((examples_dir() / name).read_text())
    cfg, warnings = config.validate(data)
    assert warnings == []
    assert cfg.xmpp_tls == "starttls" and cfg.xmpp_ca_cert and cfg.turn and cfg.security_groups
    cert = tmp_path / "vpn.example.org.crt"
    make_self_signed_cert("vpn.example.org", cert, tmp_path / "key.pem")
    path = write(tmp_path, {**data, "xmpp_ca_cert": str(cert)})
    r = ipop("check", "-c", str(path))
    assert r.returncode == 0 and "(0 warnings)" in r.stdout, r.stdout + r.stderr


def test_example_groups_file_is_the_test_beds_format(tmp_path):
    server = Prosody(tmp_path, domain="vpn.example.org")
    server.set_groups({"lab": ["alice", "bob"]}, restart=False)
    assert server.groups_path.read_text() == (examples_dir() / "ipop-groups.txt").read_text()


def test_servers_render_from_the_examples(tmp_path):
    tls = Prosody(tmp_path / "tls", domain="ipop.test", bind="198.18.0.9", port=5333, tls=True,
                  direct_tls_port=5334)
    text = tls.config_path.read_text()
    assert 'interfaces = { "198.18.0.9" }' in text and "c2s_ports = { 5333 }" in text
    assert "c2s_direct_tls_ports = { 5334 }" in text and 'VirtualHost "ipop.test"' in text
    assert "c2s_require_encryption = true" in text and str(tls.cert_path) in text
    settings = [ln for ln in text.splitlines() if not ln.lstrip().startswith("--")]
    assert not [ln for ln in settings if "example" in ln]  # every example value replaced
    plain = Prosody(tmp_path / "plain", domain="ipop.test", bind="198.18.0.9")
    text = plain.config_path.read_text()
    assert "c2s_require_encryption = false" in text and '"tls"' not in text
    assert "ssl =" not in text and "c2s_direct_tls_ports = { }" in text
    turn = Coturn(tmp_path / "turn", "198.18.0.9", "198.18.0.9", users={"u": "p"},
                  realm="ipop.test", port=3555)
    text = turn.config_path.read_text()
    assert "listening-port=3555" in text and "user=u:p" in text and "realm=ipop.test" in text
    assert "allowed-peer-ip=198.18.0.0-198.19.255.255" in text
    settings = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert not [ln for ln in settings if "198.51.100" in ln or "203.0.113" in ln
                or "10.0.0.5" in ln or "example" in ln]
    assert "lt-cred-mech" in text and "min-port=49152" in text


# ---- pure verdicts
def test_nat_kind_verdicts():
    local = ("0.0.0.0", 40000)
    a, b = ("198.18.0.1", 3478), ("198.18.0.1", 3479)
    cone = nat_kind(local, {a: ("198.19.0.7", 40000), b: ("198.19.0.7", 40000)})
    assert cone.data["kind"] == "endpoint-independent" and "source port kept" in cone.detail
    sym = nat_kind(local, {a: ("198.19.0.7", 1111), b: ("198.19.0.7", 2222)})
    assert sym.data["kind"] == "symmetric" and sym.ok
    one = nat_kind(local, {a: ("198.19.0.7", 1111)})
    assert one.data["kind"] == "unknown" and one.ok is None and "two" in one.detail
    assert nat_kind(local, {}).ok is None


def test_overlay_mtu_from_underlay():
    assert netinfo.overlay_mtu(1500, tap=False) == config.DEFAULT_MTU_TUN == 1374
    assert netinfo.overlay_mtu(1500, tap=True) == config.DEFAULT_MTU_TAP
    assert netinfo.overlay_mtu(1460, tap=False) == 1334
    assert netinfo.overlay_mtu(9001, tap=False) == 8875
    assert netinfo.overlay_mtu(600, tap=False) == 576


def test_default_mtu_override_and_route():
    cfg, _ = config.validate({**GOOD, "mtu": 1300})
    assert netinfo.default_mtu(cfg) == (1300, "mtu set in the config")
    cfg, _ = config.validate({"ip4": "100.64.0.1", "peers": [], "xmpp_host": None})
    mtu, why = netinfo.default_mtu(cfg)  # the default route of this machine, or the fallback
    assert 576 <= mtu <= 9000 and why
    assert os.path.exists("/proc/net/route")
