import json
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipop import config
from ipop.errors import ConfigError

# Appendix A of the seed paper, verbatim (validated, never run: its addresses are not ours).
APPENDIX_A = """{
    "ip4_mask": 24,
    "xmpp_password": "09qqik46hpm0qhf3ivakmvfdvwd4k9",
    "xmpp_host": "145.100.105.193",
    "xmpp_username": "RP2_1@ejabberd",
    "sec": false,
    "tincan_logging": 0,
    "ip4": "172.31.0.1",
    "on-demand_connection": false,
    "controller_logging": "DEBUG",
    "stat_report": false,
    "switchmode": 1,
    "group": "test"
}"""
UID = "ab" * 20
FP = "sha-256 " + ":".join(["AB"] * 32)


def test_appendix_a_validates_as_is():
    cfg, warnings = config.validate(json.loads(APPENDIX_A))
    assert cfg.switchmode is True and cfg.sec is False and cfg.group == "test"
    assert cfg.on_demand_connection is False and cfg.ip4_mask == 24
    assert warnings == ["config: stat_report is accepted and ignored"]
    assert cfg.effective_mtu == config.DEFAULT_MTU_TAP


def test_defaults():
    cfg, _ = config.validate({"ip4": "100.64.0.1"})
    assert cfg.sec is True and cfg.controller == "groupvpn" and cfg.interface == "ipop0"
    assert str(cfg.state_path) == "/var/lib/ipop/ipop0"
    assert str(cfg.control_path) == "/var/lib/ipop/ipop0/control.sock"
    assert cfg.effective_mtu == config.DEFAULT_MTU_TUN == 1374
    assert config.DEFAULT_MTU_TAP == 1360
    assert cfg.security_groups is None  # absent is not the same as []


def test_mtu_leaves_room_for_every_header():
    worst = (config.DEFAULT_MTU_TUN + 40 + 8 + 4 + 41 + 25)
    assert worst <= 1500


@pytest.mark.parametrize(("data", "key"), [
    ({"ip4": "nope"}, "ip4"),
    ({}, "ip4"),
    ({"ip4": "100.64.0.1", "mtu": 100}, "mtu"),
    ({"ip4": "100.64.0.1", "ip4_mask": 40}, "ip4_mask"),
    ({"ip4": "100.64.0.1", "xmpp_tls": "maybe"}, "xmpp_tls"),
    ({"ip4": "100.64.0.1", "xmpp_username": "alice@x"}, "xmpp_password"),
    ({"ip4": "100.64.0.1", "xmpp_username": "alice", "xmpp_password": "p"}, "xmpp_username"),
    ({"ip4": "100.64.0.1", "listen_port": 70000}, "listen_port"),
    ({"ip4": "100.64.0.1", "interface": "x" * 16}, "interface"),
    ({"ip4": "100.64.0.1", "sec": False, "peers": [{"uid": UID, "ip4": "100.64.0.2",
                                                     "endpoint": "198.18.0.2:5800"}]},
     "listen_port"),
    ({"ip4": "100.64.0.1", "listen_port": 1, "peers": [{"uid": UID, "ip4": "100.64.0.2",
                                                         "endpoint": "198.18.0.2:5800"}]},
     "peers"),
    ({"ip4": "100.64.0.1", "listen_port": 1, "sec": False,
      "peers": [{"uid": "xyz", "ip4": "100.64.0.2", "endpoint": "198.18.0.2:5800"}]},
     "peers[0].uid"),
    ({"ip4": "100.64.0.1", "listen_port": 1, "sec": False,
      "peers": [{"uid": UID, "ip4": "100.64.0.2", "endpoint": "nowhere"}]},
     "peers[0].endpoint"),
    ({"ip4": "100.64.0.1", "turn": [{"server": "198.18.0.9:3478", "user": "u"}]}, "turn[0].pass"),
    ({"ip4": "100.64.0.1", "stun": ["198.18.0.9:notaport"]}, "stun"),
    ({"ip4": "100.64.0.1", "controller": "mesh"}, "controller"),
])
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        config.validate(data)
    assert e.value.key == key
    assert "\n" not in str(e.value)


def test_static_peer_with_fingerprint():
    cfg, _ = config.validate({"ip4": "100.64.0.1", "listen_port": 5800, "peers": [
        {"uid": UID.upper(), "ip4": "100.64.0.2", "endpoint": "198.18.0.2:5800",
         "fingerprint": FP.lower().replace("sha-256", "SHA-256")}]})
    assert cfg.peers[0].uid == UID and cfg.peers[0].fingerprint == FP


def test_password_never_in_error_or_repr():
    with pytest.raises(ConfigError) as e:
        config.validate({"ip4": "100.64.0.1", "xmpp_username": "a@b", "xmpp_host": "h",
                         "xmpp_password": 12345})
    assert "12345" not in str(e.value)
    cfg, _ = config.validate({"ip4": "100.64.0.1", "xmpp_username": "a@b", "xmpp_host": "h",
                              "xmpp_password": "s3cret"})
    assert "s3cret" not in repr(cfg)


def test_unknown_key_warns():
    _, warnings = config.validate({"ip4": "100.64.0.1", "colour": "blue"})
    assert warnings == ["config: unknown key 'colour' ignored"]


def test_load_file_errors(tmp_path):
    p = tmp_path / "c.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert e.value.key == "config"
    with pytest.raises(ConfigError):
        config.load(tmp_path / "missing.json")


def test_world_readable_config_with_password_warns(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"ip4": "100.64.0.1", "xmpp_username": "a@b", "xmpp_host": "h",
                             "xmpp_password": "pw"}))
    os.chmod(p, 0o644)
    _, warnings = config.load(p)
    assert any("readable by others" in w for w in warnings)
    os.chmod(p, 0o600)
    _, warnings = config.load(p)
    assert not warnings


def test_cli_exits_2_with_one_line(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"ip4": "100.64.0.1", "mtu": "big"}))
    r = subprocess.run([sys.executable, "-m", "ipop", "up", "-c", str(p)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "mtu" in lines[0]


@given(st.dictionaries(st.sampled_from(["ip4", "mtu", "sec", "peers", "stun", "turn", "group",
                                        "security_groups", "listen_port", "xmpp_tls"]),
                       st.one_of(st.none(), st.integers(), st.text(max_size=10), st.booleans(),
                                 st.lists(st.text(max_size=5), max_size=3))))
def test_validate_only_raises_config_error(data):
    try:
        config.validate(data)
    except ConfigError:
        pass
