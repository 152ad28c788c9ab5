"""The XMPP signaling backend against a real prosody on 127.0.0.1 (one server per module).

Covers: group presence with UIDs (2 and 3 nodes), a con_req/con_resp round trip, the send rate
limit, a wrong password, an unreachable server (visible retries), a server restart (reconnect on
its own), malformed bodies, strangers, mutual subscriptions, and TLS with a pinned certificate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from ipop.errors import ConfigError
from ipop.signal.xmpp import TlsMode, XmppSettings, XmppSignal
from ipop.testbed.servers import Prosody
from ipop.wire.signal import SignalMessage
from tests.net.fixtures_servers import (
    GROUP,
    GROUP_USERS,
    Recorder,
    free_port,
    group_prosody,
    password,
    running_prosody,
    until,
)

pytestmark = pytest.mark.net


@pytest.fixture(scope="module")
def prosody() -> Iterator[Prosody]:
    """One server for the module: alice, bob, carol in group "lab"; dave, erin, mallory, walt."""
    with group_prosody() as server:
        yield server

FPR = "sha-256 " + ":".join(["5A"] * 32)


def uid_of(n: int) -> str:
    return f"{n:040x}"


def settings(
    server: Prosody,
    user: str,
    *,
    group: str | None = GROUP,
    tls: TlsMode = "none",
    ca_cert: Path | None = None,
    port: int | None = None,
    pw: str | None = None,
    **kw: Any,
) -> XmppSettings:
    return XmppSettings(
        jid=server.jid(user),
        password=pw if pw is not None else password(user),
        host="127.0.0.1",
        port=port if port is not None else server.port,
        tls=tls,
        ca_cert=ca_cert,
        group=group,
        **kw,
    )


@asynccontextmanager
async def nodes(*configs: tuple[XmppSettings, str | None]) -> AsyncIterator[list[Node]]:
    """Connected backends (presence set before connect), always closed afterwards."""
    made: list[Node] = []
    try:
        for cfg, uid in configs:
            node = Node(cfg, uid)
            made.append(node)
            await node.start()
        yield made
    finally:
        for node in made:
            await node.signal.close()


class Node:
    def __init__(self, cfg: XmppSettings, uid: str | None) -> None:
        self.rec = Recorder()
        self.signal = XmppSignal(cfg, self.rec)
        self.uid = uid

    async def start(self) -> None:
        if self.uid is not None:
            await self.signal.set_presence(self.uid, f"100.64.0.{int(self.uid, 16)}")
        await self.signal.connect()


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(coro_fn())


def con_req(uid: str, candidates: tuple[str, ...] = ()) -> SignalMessage:
    return SignalMessage(
        type="con_req",
        uid=uid,
        overlay_id=GROUP,
        ip4="100.64.0.1",
        fingerprint=FPR,
        security_groups=("dc1",),
        candidates=candidates,
    )


def test_group_members_see_each_other_with_uids(prosody: Prosody) -> None:
    async def body() -> None:
        a_cfg, b_cfg, c_cfg = (settings(prosody, u) for u in GROUP_USERS)
        async with nodes((a_cfg, uid_of(1)), (b_cfg, uid_of(2))) as (a, b):
            await until(lambda: uid_of(2) in a.rec.uids(), "alice sees bob")
            await until(lambda: uid_of(1) in b.rec.uids(), "bob sees alice")
            assert a.rec.ip4s[a.rec.jid_of(uid_of(2))] == "100.64.0.2"
            assert a.rec.states[-1] == (True, None)
            assert {c.jid for c in a.signal.roster() if c.mutual} >= {prosody.jid("bob")}
            assert all(GROUP in c.groups for c in a.signal.roster())
            # a third member joins: everybody sees everybody
            async with nodes((c_cfg, uid_of(3))) as (c,):
                for n, others in ((a, (2, 3)), (b, (1, 3)), (c, (1, 2))):
                    want = {uid_of(i) for i in others}
                    await until(lambda n=n, w=want: n.rec.uids() >= w, f"{n.signal.jid} sees all")
                assert uid_of(1) not in a.rec.uids()  # no echo of ourselves
            # carol leaves: the others see her go, with her uid
            await until(lambda: uid_of(3) not in a.rec.uids(), "alice sees carol leave")
            assert any(u == uid_of(3) and not on for _, u, on in a.rec.presence_log)

    run(body)


def test_con_req_round_trip_and_send_rate_limit(prosody: Prosody) -> None:
    async def body() -> None:
        cfgs = ((settings(prosody, "alice"), uid_of(1)), (settings(prosody, "bob"), uid_of(2)))
        async with nodes(*cfgs) as (a, b):
            await until(lambda: uid_of(2) in a.rec.uids(), "alice sees bob")
            bob_jid = a.rec.jid_of(uid_of(2))
            req = con_req(uid_of(1), ("host 198.18.0.1:40000",))
            t0 = time.monotonic()
            assert await a.signal.send(bob_jid, req)
            await until(lambda: bool(b.rec.messages), "bob gets con_req")
            sender, got = b.rec.messages[0]
            assert got == req and sender == a.signal.jid
            resp = SignalMessage(
                type="con_resp",
                uid=uid_of(2),
                overlay_id=GROUP,
                ip4="100.64.0.2",
                fingerprint=FPR,
                security_groups=(),
                encrypt=False,
                candidates=("host 198.18.0.2:40001",),
            )
            assert await b.signal.send(sender, resp)
            await until(lambda: bool(a.rec.messages), "alice gets con_resp")
            rtt = time.monotonic() - t0
            assert a.rec.messages[0] == (bob_jid, resp)
            assert a.rec.messages[0][1].security_groups == ()
            assert rtt < 1.0, rtt
            # token bucket: the burst goes out, the rest is dropped and counted
            sent = [await a.signal.send(bob_jid, req) for _ in range(60)]
            assert 38 <= sum(sent) <= 42  # 40 minus the con_req, plus a refill
            assert a.signal.drops["send_rate"] == 60 - sum(sent)
            await until(lambda: len(b.rec.messages) == 1 + sum(sent), "the burst arrives")

    run(body)


def test_wrong_password_is_a_config_error(prosody: Prosody, caplog: Any) -> None:
    async def body() -> None:
        rec = Recorder()
        sig = XmppSignal(settings(prosody, "alice", pw="wrong"), rec)
        t0 = time.monotonic()
        with pytest.raises(ConfigError) as err:
            await sig.connect()
        assert time.monotonic() - t0 < 3
        assert err.value.key == "xmpp_password"
        assert "authentication failed" in str(err.value)
        assert not sig.connected
        await sig.close()

    with caplog.at_level(logging.WARNING, logger="ipop.signal.xmpp"):
        run(body)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


def test_unreachable_server_retries_visibly(caplog: Any) -> None:
    port = free_port()  # nothing listens here

    async def body() -> Recorder:
        rec = Recorder()
        cfg = XmppSettings(
            jid="alice@ipop.test", password="pw", host="127.0.0.1", port=port, tls="none"
        )
        sig = XmppSignal(cfg, rec)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sig.connect(), 3.3)
        await sig.close()
        # close() from elsewhere ends a retrying connect() (CancelledError), and the retries stop
        other = XmppSignal(cfg, Recorder())
        task = asyncio.create_task(other.connect())
        await asyncio.sleep(0.2)
        await other.close()
        with pytest.raises(asyncio.CancelledError):
            await task
        seen = len(caplog.records)
        await asyncio.sleep(1.2)
        assert len(caplog.records) == seen
        return rec

    with caplog.at_level(logging.INFO, logger="ipop.signal.xmpp"):
        rec = run(body)
    lines = [r.getMessage() for r in caplog.records if r.name == "ipop.signal.xmpp"]
    retry = [ln for ln in lines if "cannot reach" in ln]
    # attempts at 0 s, after 0.5-1 s and after 1-2 s more (backoff 1, 2, 4 s capped at 5, each
    # wait jittered to 50-100 %); then the other's at 0 s
    assert len(retry) == 4, lines
    prefix = f"xmpp: cannot reach 127.0.0.1:{port} (Connection refused); retrying in "
    assert all(ln.startswith(prefix) and ln.endswith("s") for ln in retry), retry
    waits = [float(ln[len(prefix):-1]) for ln in retry]
    for wait, full in zip(waits, (1.0, 2.0, 4.0), strict=False):
        assert full * 0.5 - 0.05 <= wait <= full + 0.05, waits
    assert [s for s in rec.states if s[0]] == []
    assert all("cannot reach" in (err or "") for _, err in rec.states)


def test_server_restart_reconnects_and_presence_returns(caplog: Any) -> None:
    users = {u: password(u) for u in ("alice", "bob")}
    with running_prosody(users, {GROUP: list(users)}) as server:

        async def body() -> None:
            cfgs = ((settings(server, "alice"), uid_of(1)), (settings(server, "bob"), uid_of(2)))
            async with nodes(*cfgs) as (a, b):
                await until(lambda: uid_of(1) in b.rec.uids(), "bob sees alice")
                server.stop()
                await until(lambda: not a.signal.connected, "alice notices")
                await asyncio.sleep(0.3)
                server.start()
                took = await until(
                    lambda: a.signal.connected and b.signal.connected, "reconnect", limit=10
                )
                assert took < 5
                assert a.rec.states[-1] == (True, None) and (False, None) not in a.rec.states
                before = len(b.rec.presence_log)
                await until(
                    lambda: any(u == uid_of(1) for _, u, _on in b.rec.presence_log[before - 1 :]),
                    "alice's presence again",
                )
                await until(lambda: uid_of(1) in b.rec.uids(), "bob sees alice again")
                # and signaling works again
                assert await b.signal.send(b.rec.jid_of(uid_of(1)), con_req(uid_of(2)))
                await until(lambda: bool(a.rec.messages), "message after reconnect")

        with caplog.at_level(logging.INFO, logger="ipop.signal.xmpp"):
            run(body)
    lines = [r.getMessage() for r in caplog.records if r.name == "ipop.signal.xmpp"]
    # the first reconnect waits 0.5-1.5 s (jittered: a restarted server is not stampeded)
    waits = [float(m.group(1)) for ln in lines if "lost" in ln
             for m in [re.search(r"reconnecting in ([\d.]+)s", ln)] if m]
    assert waits and all(0.5 <= w <= 1.5 for w in waits), lines


def test_malformed_bodies_and_strangers_are_ignored(prosody: Prosody, caplog: Any) -> None:
    async def body() -> None:
        cfgs = (
            (settings(prosody, "alice"), uid_of(1)),
            (settings(prosody, "bob"), uid_of(2)),
            (settings(prosody, "mallory", group=None, accept_from="any"), uid_of(9)),
        )
        async with nodes(*cfgs) as (a, b, m):
            await until(lambda: uid_of(1) in b.rec.uids(), "bob sees alice")
            alice_raw = a.signal._client
            for text in ["{not json", "[]", '{"v":2}', "x" * 20000, '{"v":1,"type":"con_req"}']:
                alice_raw.send_message(mto=b.signal.jid, mbody=text, mtype="chat")
            alice_raw.send_message(mto=b.signal.jid, mbody="still junk", mtype="normal")
            # mallory is not in bob's roster: even a good message is dropped
            assert await m.signal.send(b.signal.jid, con_req(uid_of(9)))
            assert await a.signal.send(b.signal.jid, con_req(uid_of(1)))
            await until(lambda: bool(b.rec.messages), "the good message")
            await until(lambda: b.signal.drops.get("not_in_roster") == 1, "stranger dropped")
            assert b.signal.drops["malformed_message"] == 6
            assert [j for j, _ in b.rec.messages] == [a.signal.jid]
            assert uid_of(9) not in b.rec.uids()
            assert b.signal.connected

    with caplog.at_level(logging.INFO, logger="ipop.signal.xmpp"):
        run(body)
    malformed = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(malformed) == 1  # rate limited: one line per second per sender


def test_mutual_subscription_fires_on_roster(prosody: Prosody) -> None:
    async def body() -> None:
        cfgs = (
            (settings(prosody, "dave", group=None), uid_of(4)),
            (settings(prosody, "erin", group=None), uid_of(5)),
        )
        dave_jid, erin_jid = prosody.jid("dave"), prosody.jid("erin")
        async with nodes(*cfgs) as (d, e):
            await d.signal.subscribe(erin_jid)
            await asyncio.sleep(0.2)
            assert (erin_jid, True) not in d.rec.roster_log  # one side is not mutual
            await e.signal.subscribe(dave_jid)
            await until(lambda: (erin_jid, True) in d.rec.roster_log, "dave: erin mutual")
            await until(lambda: (dave_jid, True) in e.rec.roster_log, "erin: dave mutual")
            assert [c.subscription for c in d.signal.roster() if c.jid == erin_jid] == ["both"]
            # mutual contacts see each other's presence (SocialVPN mode: no group)
            await until(lambda: uid_of(5) in d.rec.uids(), "dave sees erin")
            await until(lambda: uid_of(4) in e.rec.uids(), "erin sees dave")
            await d.signal.unsubscribe(erin_jid)
            await until(lambda: d.rec.roster_log[-1] == (erin_jid, False), "dave: removed")
            await until(lambda: e.rec.roster_log[-1] == (dave_jid, False), "erin: not mutual")
            assert erin_jid not in {c.jid for c in d.signal.roster()}
            await until(lambda: uid_of(4) not in e.rec.uids(), "erin no longer sees dave")

    run(body)


def test_tls_with_pinned_certificate() -> None:
    users = {"alice": password("alice"), "bob": password("bob")}
    with running_prosody(users, {GROUP: list(users)}, tls=True, direct_tls=True) as server:
        assert server.cert_path is not None and server.direct_tls_port is not None
        ca = server.cert_path

        async def body() -> None:
            cfgs = (
                (settings(server, "alice", tls="starttls", ca_cert=ca), uid_of(1)),
                (
                    settings(server, "bob", tls="direct", ca_cert=ca, port=server.direct_tls_port),
                    uid_of(2),
                ),
            )
            async with nodes(*cfgs) as (a, b):
                await until(lambda: uid_of(2) in a.rec.uids(), "alice sees bob over TLS")
                assert await a.signal.send(a.rec.jid_of(uid_of(2)), con_req(uid_of(1)))
                await until(lambda: bool(b.rec.messages), "message over TLS")
            # not pinned: the self-signed certificate is refused, clearly and at once
            for tls, port in (("starttls", server.port), ("direct", server.direct_tls_port)):
                sig = XmppSignal(settings(server, "alice", tls=tls, port=port), Recorder())
                with pytest.raises(ConfigError) as err:
                    await asyncio.wait_for(sig.connect(), 5)
                assert err.value.key == "xmpp_ca_cert"
                await sig.close()
            # plaintext login against a server that requires TLS: told so, not retried
            sig = XmppSignal(settings(server, "alice", tls="none"), Recorder())
            with pytest.raises(ConfigError) as err:
                await asyncio.wait_for(sig.connect(), 5)
            assert err.value.key == "xmpp_tls"
            await sig.close()

        run(body)


def test_starttls_against_a_plaintext_server_is_a_config_error(prosody: Prosody) -> None:
    async def body() -> None:
        sig = XmppSignal(settings(prosody, "alice", tls="starttls"), Recorder())
        with pytest.raises(ConfigError) as err:
            await asyncio.wait_for(sig.connect(), 5)
        assert err.value.key == "xmpp_tls"
        await sig.close()

    run(body)


def test_a_hung_server_is_noticed_by_ping_and_left(caplog: Any) -> None:
    users = {"alice": password("alice")}
    with running_prosody(users, {GROUP: list(users)}) as server:
        pid = server.pid
        assert pid is not None

        async def body() -> None:
            cfg = settings(server, "alice", keepalive_seconds=1.0, connect_timeout=1.5)
            async with nodes((cfg, uid_of(1))) as (a,):
                os.kill(pid, signal.SIGSTOP)  # the server hangs: TCP stays up, nothing answers
                try:
                    # two pings in a row go unanswered (a busy server may miss one)
                    took = await until(lambda: not a.signal.connected, "ping timeout", limit=8)
                    assert took < 5.5
                    await asyncio.sleep(1.0)
                finally:
                    os.kill(pid, signal.SIGCONT)
                await until(lambda: a.signal.connected, "back after SIGCONT", limit=10)

        with caplog.at_level(logging.INFO, logger="ipop.signal.xmpp"):
            run(body)
    lines = [r.getMessage() for r in caplog.records if r.name == "ipop.signal.xmpp"]
    assert any("did not answer a ping" in ln for ln in lines), lines
    assert any("lost (ping timeout)" in ln for ln in lines), lines
