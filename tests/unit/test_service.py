"""Running as a service (issue 13), the parts that need no namespace: the systemd unit, the
notify protocol, the reload plan, and the log formats."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ipop import logs
from ipop import reload as rl
from ipop.config import validate
from ipop.service import Notifier

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "contrib" / "systemd" / "ipop@.service"
UID_A = "aa" * 20
UID_B = "bb" * 20


def test_systemd_unit_verifies(tmp_path):
    """``systemd-analyze verify`` accepts the unit, with ExecStart pointing at this install."""
    assert shutil.which("systemd-analyze"), "scripts/setup.sh installs the systemd package"
    ipop = Path(sys.executable).parent / "ipop"
    assert ipop.exists()
    text = UNIT.read_text()
    assert "ExecStart=/opt/ipop/bin/ipop up -c /etc/ipop/%i.json" in text
    unit = tmp_path / "ipop@.service"
    unit.write_text(text.replace("/opt/ipop/bin/ipop", str(ipop)))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no",
                        str(tmp_path / "ipop@lab.service")],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ipop@" not in r.stderr, r.stderr  # no warning about our unit either
    keys = dict(line.split("=", 1) for line in text.splitlines() if "=" in line
                and not line.startswith("#"))
    assert keys["Type"] == "notify"
    assert keys["RestartPreventExitStatus"] == "2"
    assert keys["AmbientCapabilities"] == "CAP_NET_ADMIN"
    assert keys["CapabilityBoundingSet"] == "CAP_NET_ADMIN"
    assert keys["User"] == "ipop" and keys["NoNewPrivileges"] == "yes"
    assert keys["StateDirectory"] == "ipop/%i" and keys["RuntimeDirectory"] == "ipop/%i"


def _notify_socket(tmp_path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify"))
    s.settimeout(2)
    return s


def test_notifier_sends_datagrams_and_watchdog(tmp_path):
    sock = _notify_socket(tmp_path)
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000",
                  "WATCHDOG_PID": str(os.getpid())})
    assert n.enabled and n.watchdog_interval == 1.0
    n.ready("ipop0 up")
    assert sock.recv(4096) == b"READY=1\nSTATUS=ipop0 up"
    n.reloading()
    msg = sock.recv(4096).decode()
    assert msg.startswith("RELOADING=1\nMONOTONIC_USEC=") and msg.split("=")[-1].isdigit()
    n.watchdog(100.0)
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.watchdog(100.5)  # within half the period: nothing
    n.watchdog(101.0)
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_notifier_without_socket_or_for_another_pid_does_nothing(tmp_path):
    assert not Notifier({}).enabled and Notifier({}).send(ready=1) is False
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone"), "WATCHDOG_USEC": "1000",
                  "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None  # the watchdog is meant for another process
    assert n.send(ready=1) is False  # no one listens: never raises


def cfg(**kw):
    base = {"ip4": "100.64.0.1", "listen_port": 5800, "sec": False}
    return validate({**base, **kw})[0]


FPR = "sha-256 " + ":".join(["AB"] * 32)


def peer(uid, endpoint="198.18.0.2:5800", ip4="100.64.0.2"):
    return {"uid": uid, "ip4": ip4, "endpoint": endpoint, "fingerprint": FPR}


@pytest.mark.parametrize("key,value", [
    ("ip4", "100.64.0.9"), ("ip6", "2001:db8::1/64"), ("interface", "ipop9"),
    ("switchmode", 1), ("controller", "socialvpn"), ("xmpp_port", 5223),
    ("listen_port", 5900), ("state_dir", "/tmp/x"), ("metrics_listen", "127.0.0.1:9477"),
])
def test_plan_refuses_keys_that_need_a_restart(key, value):
    p = rl.plan(cfg(), cfg(**{key: value}))
    assert p.refused == key and key in p.changed


def test_plan_lists_live_changes_and_flags_security_and_logging():
    old = cfg(peers=[peer(UID_A)])
    new = cfg(peers=[peer(UID_A), peer(UID_B, ip4="100.64.0.3")], security_groups=["red"],
              controller_logging="DEBUG", log_format="json", stun=["198.18.0.1:3478"],
              rekey_seconds=60, **{"on-demand_inactive_timeout": 30})
    p = rl.plan(old, new)
    assert p.refused is None
    assert set(p.changed) == {"peers", "security_groups", "controller_logging", "log_format",
                              "stun", "rekey_seconds", "on-demand_inactive_timeout"}
    assert p.security and p.logging
    assert rl.plan(old, old).changed == []
    assert not rl.plan(old, cfg(peers=[peer(UID_A)], stun=["198.18.0.1"])).security


def test_peer_changes_by_uid():
    old = cfg(peers=[peer(UID_A), peer(UID_B, ip4="100.64.0.3")])
    new = cfg(peers=[peer(UID_B, endpoint="198.18.0.3:5800", ip4="100.64.0.3"),
                     peer("cc" * 20, ip4="100.64.0.4")])
    ch = rl.peer_changes(old, new)
    assert ch == rl.PeerChanges(added=("cc" * 20,), removed=(UID_A,), changed=(UID_B,))


def test_bad_log_format_and_metrics_listen_name_the_key():
    from ipop.errors import ConfigError

    with pytest.raises(ConfigError, match="log_format"):
        validate({"ip4": "100.64.0.1", "log_format": "xml"})
    with pytest.raises(ConfigError, match="metrics_listen"):
        validate({"ip4": "100.64.0.1", "metrics_listen": "localhost"})
    with pytest.raises(ConfigError, match="metrics_listen"):
        validate({"ip4": "100.64.0.1", "metrics_listen": "example.org:9477"})


def _record(msg: str, level: int = logging.INFO, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("ipop.node", level, __file__, 1, msg, (), None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_json_lines_carry_time_level_logger_message_and_peer():
    f = logs.JsonFormatter()
    line = f.format(_record("link aabb up", **logs.link_extra(bytes.fromhex(UID_A), "host x")))
    obj = json.loads(line)
    assert "\n" not in line
    assert obj["level"] == "INFO" and obj["logger"] == "ipop.node"
    assert obj["message"] == "link aabb up" and obj["peer_uid"] == UID_A
    assert obj["link"] == "host x" and obj["time"].endswith("Z")
    plain = json.loads(f.format(_record("node up")))
    assert "peer_uid" not in plain and "link" not in plain
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        rec = logging.LogRecord("ipop", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = f.format(rec)
    assert "\n" not in line and "boom" in json.loads(line)["exception"]


def test_text_under_journald_has_priority_and_no_timestamp():
    f = logs.make_formatter("text", {"JOURNAL_STREAM": "8:1234"})
    assert f.format(_record("hello", logging.ERROR)) == "<3>ipop.node ERROR hello"
    assert f.format(_record("hello", logging.INFO)).startswith("<6>")
    plain = logs.make_formatter("text", {})
    assert plain.format(_record("hello")).split(" ")[0][:2] == "20"  # a date first


def test_configure_replaces_its_handler_on_reload():
    out = io.StringIO()
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        logs.configure(log_format="text", controller_logging="INFO", tincan_logging=1,
                       stream=out)
        logs.configure(log_format="json", controller_logging="DEBUG", tincan_logging=3)
        ours = [h for h in root.handlers if h.get_name() == logs.HANDLER_NAME]
        assert len(ours) == 1
        logging.getLogger("ipop.test").debug("x", extra=logs.link_extra(UID_A))
        assert json.loads(out.getvalue())["peer_uid"] == UID_A
        assert logging.getLogger("ipop.dataplane").level == logging.DEBUG
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
        root.setLevel(level)
        for name in ("ipop", "ipop.dataplane", "slixmpp"):
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_runtime_install_declares_runtime_dependencies_only():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[<>=;\[ ]", d, maxsplit=1)[0].lower(): d for d in project["dependencies"]}
    assert {"pyroute2", "pydantic", "rich", "cryptography", "pyopenssl", "slixmpp", "aioice",
            "ifaddr", "prometheus_client"} <= deps.keys()
    assert not {"pytest", "mypy", "ruff", "hypothesis", "matplotlib"} & deps.keys()
    # nat/ reaches into aioice's internals: pinned to the minor version it was written for
    import aioice

    assert "<0.14" in deps["aioice"] and aioice.__version__.startswith("0.13.")


def test_library_info_lines_only_at_debug() -> None:
    """aioice's INFO lines (every candidate pair's state changes) show only at DEBUG, slixmpp's
    never; ipop's own INFO lines stay."""
    import io
    import logging

    from ipop import logs

    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    try:
        for level, lib_info in (("INFO", False), ("DEBUG", True)):
            out = io.StringIO()
            for h in [h for h in root.handlers if h.get_name() == logs.HANDLER_NAME]:
                root.removeHandler(h)
            logs.configure(log_format="text", controller_logging=level, tincan_logging=1,
                           stream=out)
            logging.getLogger("aioice.ice").info("pair check")
            logging.getLogger("slixmpp.xmlstream").info("stream chatter")
            logging.getLogger("ipop.nat").info("selected host")
            text = out.getvalue()
            assert "selected host" in text
            assert ("pair check" in text) is lib_info and "stream chatter" not in text
    finally:
        for h in [h for h in root.handlers if h.get_name() == logs.HANDLER_NAME]:
            root.removeHandler(h)
        root.setLevel(before[0])
        for h in before[1]:
            if h not in root.handlers:
                root.addHandler(h)
        for name in ("ipop", "ipop.dataplane", "slixmpp", "aioice"):
            logging.getLogger(name).setLevel(logging.NOTSET)
