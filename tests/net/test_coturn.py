"""coturn smoke test: our launcher's server on 127.0.0.1 grants an aioice TURN allocation."""

from __future__ import annotations

import asyncio
import ipaddress
import os
from typing import Any

import pytest

from ipop.testbed.servers import Coturn
from tests.net.fixtures_servers import running_coturn, temp_dir

pytestmark = pytest.mark.net

USERS = {"ipop": "turn-secret"}


class _Sink(asyncio.DatagramProtocol):
    pass


def test_coturn_grants_a_relay_allocation() -> None:
    with running_coturn(USERS) as turn:
        assert turn.pid is not None and "allowed-peer-ip=198.18.0.0-198.19.255.255" in (
            turn.config_path.read_text()
        )

        async def body() -> tuple[str, int]:
            from aioice.turn import create_turn_endpoint

            transport, _ = await asyncio.wait_for(
                create_turn_endpoint(
                    _Sink,
                    server_addr=(turn.listen_ip, turn.port),
                    username="ipop",
                    password=USERS["ipop"],
                ),
                5,
            )
            try:
                relayed: tuple[str, int] = transport.get_extra_info("sockname")
            finally:
                transport.close()
            return relayed

        ip, port = asyncio.run(body())
        assert ipaddress.ip_address(ip) == ipaddress.ip_address(turn.relay_ip)
        assert 0 < port < 65536
        pid = turn.pid
        assert pid is not None
    # stopped by its PID: the process is gone
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_coturn_refuses_wrong_password() -> None:
    with running_coturn(USERS) as turn:

        async def body() -> Any:
            from aioice.turn import create_turn_endpoint

            return await asyncio.wait_for(
                create_turn_endpoint(
                    _Sink,
                    server_addr=(turn.listen_ip, turn.port),
                    username="ipop",
                    password="wrong",
                ),
                5,
            )

        with pytest.raises(Exception) as err:
            asyncio.run(body())
        assert "401" in str(err.value) or "Unauthorized" in str(err.value), repr(err.value)


def test_coturn_config_allows_only_the_test_range() -> None:
    with temp_dir("ipop-coturn-") as d:
        turn = Coturn(d, "127.0.0.1", "127.0.0.1", users=USERS, port=3478)
        text = turn.config_path.read_text().splitlines()
    assert "denied-peer-ip=0.0.0.0-255.255.255.255" in text
    assert [ln for ln in text if ln.startswith("allowed-peer-ip=")] == [
        "allowed-peer-ip=198.18.0.0-198.19.255.255"
    ]
    for needed in ("lt-cred-mech", "no-tls", "no-dtls", "no-cli", "realm=ipop.test"):
        assert needed in text
    assert f"userdb={d / 'turndb'}" in text
