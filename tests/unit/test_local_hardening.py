"""Local attacks on a node (issue 16, part 5): a planted or redirected state_dir, lock, key and
control socket; hostile control-API requests.  Real files, real ``ipop up`` processes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ipop import statedir
from ipop.api import server
from ipop.crypto.identity import load_or_create
from ipop.errors import ConfigError

OTHER = 65534  # nobody


def up(tmp_path: Path, state: Path) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "node.json"
    cfg.write_text(json.dumps({"ip4": "100.64.0.1", "ip4_mask": 24, "state_dir": str(state),
                               "interface": "ipoptst0"}))
    return subprocess.run([sys.executable, "-m", "ipop", "up", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, check=False)


def one_line_exit_2(res: subprocess.CompletedProcess[str], needle: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr


def test_state_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, OTHER, OTHER)
    one_line_exit_2(up(tmp_path, state), "owned by uid 65534")


def test_world_writable_parent_is_refused_but_sticky_is_not(tmp_path: Path) -> None:
    pub = tmp_path / "pub"
    pub.mkdir()
    os.chmod(pub, 0o777)
    one_line_exit_2(up(tmp_path, pub / "state"), "writable by other users")
    os.chmod(pub, 0o1777)  # sticky, as /tmp: fine
    statedir.check_state_dir(_mkdir(pub / "state2"))


def _mkdir(p: Path) -> Path:
    p.mkdir(mode=0o700)
    return p


def test_group_writable_state_dir_is_refused(tmp_path: Path) -> None:
    state = _mkdir(tmp_path / "state")
    os.chmod(state, 0o770)
    with pytest.raises(ConfigError, match=r"state_dir: .* writable by other users"):
        statedir.check_state_dir(state)


def test_parent_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    theirs = _mkdir(tmp_path / "theirs")
    os.chown(theirs, OTHER, OTHER)
    state = _mkdir(theirs / "state")
    with pytest.raises(ConfigError, match="owned by uid 65534, another user"):
        statedir.check_state_dir(state)


def test_lock_symlink_is_not_followed(tmp_path: Path) -> None:
    state = _mkdir(tmp_path / "state")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.chmod(victim, 0o600)
    (state / "lock").symlink_to(victim)
    one_line_exit_2(up(tmp_path, state), "symlink")
    assert victim.read_text() == "precious\n"


def test_planted_world_readable_key_is_refused(tmp_path: Path) -> None:
    state = _mkdir(tmp_path / "state")
    load_or_create(state)
    os.chmod(state / "node.key", 0o644)
    one_line_exit_2(up(tmp_path, state), "node.key is open to other users")
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create(state)


def test_planted_key_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    state = _mkdir(tmp_path / "state")
    load_or_create(state)
    os.chown(state / "node.crt", OTHER, OTHER)
    with pytest.raises(ConfigError, match=r"node\.crt is owned by uid 65534"):
        load_or_create(state)


def test_symlinked_key_is_refused(tmp_path: Path) -> None:
    real = _mkdir(tmp_path / "real")
    load_or_create(real)
    state = _mkdir(tmp_path / "state")
    (state / "node.key").symlink_to(real / "node.key")
    (state / "node.crt").symlink_to(real / "node.crt")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_or_create(state)


def test_planted_control_socket_is_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen()
    try:
        os.chown(path, OTHER, OTHER)
        res = subprocess.run([sys.executable, "-m", "ipop", "status", "--control", str(path)],
                             capture_output=True, text=True, timeout=30, check=False)
        one_line_exit_2(res, "owned by uid 65534")
    finally:
        s.close()


def test_socket_in_a_directory_others_can_write_is_not_trusted(tmp_path: Path) -> None:
    pub = tmp_path / "pub"  # the attacker pre-created the state_dir in a world-writable place
    pub.mkdir()
    os.chmod(pub, 0o777)
    state = pub / "state"
    state.mkdir()
    os.chown(state, OTHER, OTHER)
    path = state / "control.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    try:
        os.chown(path, OTHER, OTHER)
        with pytest.raises(ConfigError, match="cannot be trusted"):
            statedir.check_control_socket(path)
    finally:
        s.close()


def test_root_talks_to_a_service_users_own_socket(tmp_path: Path) -> None:
    home = tmp_path / "run"
    home.mkdir(mode=0o755)
    os.chown(home, OTHER, OTHER)  # as systemd's RuntimeDirectory= for User=ipop
    path = home / "control.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    try:
        os.chown(path, OTHER, OTHER)
        statedir.check_control_socket(path)  # root, the socket's owner owns its directory
        with pytest.raises(ConfigError, match="another user"):
            statedir.check_control_socket(path, uid=1000)  # not for some other user
    finally:
        s.close()


# ---- control API
def answer(line: bytes) -> dict[str, object]:
    async def handler(method: str, params: dict[str, object]) -> object:
        return {"method": method}

    async def go() -> dict[str, object]:
        srv = server.ControlServer(Path("/nonexistent"), handler)
        reply = await srv._answer(line, None)  # type: ignore[arg-type]
        out = server.encode_reply(reply)
        return json.loads(out)  # type: ignore[no-any-return]

    return asyncio.run(go())


def test_deep_nesting_gets_an_error_reply() -> None:
    deep = b'{"id": 1, "method": "get_state", "params": ' + b"[" * 60000 + b"]" * 60000 + b"}"
    reply = answer(deep)
    assert reply == {"id": None, "error": "malformed request: nested deeper than 32"}
    assert server.nesting_depth(b'{"a": "[[[[[[[[[["}', 3) == 1  # strings do not count


def test_nan_id_is_never_echoed() -> None:
    for text in (b'{"id": NaN, "method": "get_state"}', b'{"id": -Infinity, "method": "x"}'):
        assert answer(text) == {"id": None, "error": "malformed request: NaN is not JSON"
                                if b"NaN" in text else
                                "malformed request: -Infinity is not JSON"}
    assert answer(b'{"id": 1e400, "method": "get_state"}') == {
        "id": None, "result": {"method": "get_state"}}


def test_unparsable_requests_keep_the_connection(tmp_path: Path) -> None:
    async def handler(method: str, params: dict[str, object]) -> object:
        return "ok"

    async def go() -> list[dict[str, object]]:
        srv = server.ControlServer(tmp_path / "c.sock", handler)
        await srv.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "c.sock"),
                                                                limit=1 << 20)
            writer.write(b"not json\n" + b"[" * 100 + b"\n" + b"x" * (server.MAX_LINE * 2)
                         + b"\n" + b'{"id": 7, "method": "get_state"}\n')
            await writer.drain()
            replies = [json.loads(await reader.readline()) for _ in range(4)]
            writer.close()
            return replies
        finally:
            await srv.close()

    replies = asyncio.run(go())
    assert [r.get("error") for r in replies[:3]] == [
        "malformed request: not JSON", "malformed request: nested deeper than 32",
        "malformed request: too long"]
    assert replies[3] == {"id": 7, "result": "ok"}


def test_accept_errors_are_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    passed: list[dict[str, object]] = []
    handler = server.AcceptErrorLog(lambda _loop, ctx: passed.append(ctx), interval=5.0)
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level("ERROR", logger="ipop.api"):
            for _ in range(46_000):
                handler(loop, {"message": "socket.accept() out of system resource",
                               "exception": OSError(24, "Too many open files")})
            handler(loop, {"message": "something else"})
    finally:
        loop.close()
    assert len([r for r in caplog.records if "accept" in r.getMessage()]) == 1
    assert handler.suppressed == 45_999
    assert passed == [{"message": "something else"}]
