"""Fixtures and helpers for tests against real prosody/coturn (import them into a test module).

    from tests.net.fixtures_servers import running_prosody, free_port, Recorder, until

    @pytest.fixture(scope="module")
    def xmpp() -> Iterator[Prosody]:
        with group_prosody() as server:
            yield server

Servers run on 127.0.0.1 on free ports, in temp dirs removed afterwards; they are always stopped
by PID, even when a test fails.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from ipop.signal.base import SignalListener
from ipop.testbed.servers import Coturn, Prosody
from ipop.wire.signal import SignalMessage

GROUP = "lab"
GROUP_USERS = ("alice", "bob", "carol")
OTHER_USERS = ("dave", "erin", "mallory", "walt")


def password(user: str) -> str:
    return f"pw-{user}"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def running_prosody(
    users: Mapping[str, str] | None = None,
    groups: Mapping[str, list[str]] | None = None,
    *,
    tls: bool = False,
    direct_tls: bool = False,
) -> Iterator[Prosody]:
    """A started prosody with these accounts and groups; stopped and removed afterwards."""
    with temp_dir("ipop-prosody-") as d:
        server = Prosody(
            d,
            port=free_port(),
            tls=tls,
            direct_tls_port=free_port() if direct_tls else None,
        )
        for user, pw in (users or {}).items():
            server.register(user, pw)
        server.set_groups(groups or {}, restart=False)
        try:
            server.start()
            yield server
        finally:
            server.stop()


@contextmanager
def group_prosody() -> Iterator[Prosody]:
    """Accounts alice, bob, carol (group "lab") and dave, erin, mallory, walt (no group)."""
    users = {u: password(u) for u in (*GROUP_USERS, *OTHER_USERS)}
    with running_prosody(users, {GROUP: list(GROUP_USERS)}) as server:
        yield server


@contextmanager
def running_coturn(users: Mapping[str, str]) -> Iterator[Coturn]:
    with temp_dir("ipop-coturn-") as d:
        server = Coturn(
            d, "127.0.0.1", "127.0.0.1", users=users, port=free_port(socket.SOCK_DGRAM)
        )
        try:
            server.start()
            yield server
        finally:
            server.stop()


class Recorder(SignalListener):
    """Remembers every event a signaling backend reports."""

    def __init__(self) -> None:
        self.states: list[tuple[bool, str | None]] = []
        self.presence_log: list[tuple[str, str | None, bool]] = []
        self.online: dict[str, str | None] = {}
        self.ip4s: dict[str, str | None] = {}
        self.messages: list[tuple[str, SignalMessage]] = []
        self.roster_log: list[tuple[str, bool]] = []

    def on_state(self, connected: bool, error: str | None) -> None:
        self.states.append((connected, error))

    def on_presence(self, jid: str, uid: str | None, online: bool, ip4: str | None = None) -> None:
        self.presence_log.append((jid, uid, online))
        self.ip4s[jid] = ip4
        if online:
            self.online[jid] = uid
        else:
            self.online.pop(jid, None)

    def on_message(self, jid: str, msg: SignalMessage) -> None:
        self.messages.append((jid, msg))

    def on_roster(self, jid: str, subscribed_both: bool) -> None:
        self.roster_log.append((jid, subscribed_both))

    def uids(self) -> set[str | None]:
        return set(self.online.values())

    def jid_of(self, uid: str) -> str:
        return next(j for j, u in self.online.items() if u == uid)


async def until(pred: Callable[[], bool], what: str, limit: float = 5.0) -> float:
    """Wait until ``pred()``; returns the seconds it took, fails the test after ``limit`` s."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > limit:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start
