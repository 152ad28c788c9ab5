"""Underlay paths for signaled links: one ICE session per peer, its sockets lent to the data plane.

``prepare`` gathers our candidates (once per attempt), ``connect`` runs the checks and returns a
data-plane ``Path`` on the selected pair after the data plane has adopted the sockets; later
path changes (relay -> direct) and ICE failures are reported through the callbacks; ``close``
gives the sockets back and ends the session.  STUN that the data plane reads on those sockets
comes back through ``feed``.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from ipop.config import Config, parse_endpoint
from ipop.dataplane.link import Path
from ipop.fwmark import mark_socket
from ipop.nat.params import IceParams, SelectedPath, TurnConf

if TYPE_CHECKING:
    from ipop.nat.ice import IceDispatcher, IceLink

log = logging.getLogger("ipop.controller.ice")
CONNECT_DEADLINE = 8.0
DIRECT_PHASE = 1.2  # seconds of direct-only checks before relayed pairs join (LAN/NAT: < 0.1 s)
TURN_CHECK_TIMEOUT = 0.8  # seconds a TURN server gets to answer a STUN Binding request
GATHER_LIMIT = 6  # ICE gathers at once (each may query STUN and allocate on TURN)


def to_path(sp: SelectedPath) -> Path:
    return Path(sp.sock, (sp.remote_addr[0], sp.remote_addr[1]), sp.channel, sp.kind, sp.rtt_ms)


class IcePaths:
    """The ICE sessions of one node, by peer UID (hex)."""

    def __init__(
        self, cfg: Config, *,
        adopt: Callable[[socket.socket], None],
        release: Callable[[socket.socket], None],
        on_path_change: Callable[[str, Path], None],
        on_failed: Callable[[str, str], None],
    ) -> None:
        self.cfg = cfg
        # the data plane serves a session's sockets from ``adopt`` until ``release``
        # (``DataPlane.adopt_socket``, ``release_socket``)
        self.adopt = adopt
        self.release = release
        self.on_path_change = on_path_change
        self.on_failed = on_failed
        self.sessions: dict[str, IceLink] = {}
        self.connected: set[str] = set()
        # a connected session set aside: it serves the peer's working link while a new attempt
        # (in ``sessions``) is proven beside it (``set_aside``)
        self.aside: dict[str, IceLink] = {}
        self.stun = [parse_endpoint(s, default_port=3478) for s in cfg.stun]
        self.turn = [TurnConf(parse_endpoint(t.server, default_port=3478), t.user, t.password)
                     for t in cfg.turn]
        self._dispatcher: IceDispatcher | None = None
        self._gathers = asyncio.Semaphore(GATHER_LIMIT)

    def reconfigure(self, cfg: Config) -> None:
        """A reloaded config: STUN and TURN servers for the ICE sessions made from now on."""
        self.cfg = cfg
        self.stun = [parse_endpoint(s, default_port=3478) for s in cfg.stun]
        self.turn = [TurnConf(parse_endpoint(t.server, default_port=3478), t.user, t.password)
                     for t in cfg.turn]

    @property
    def dispatcher(self) -> IceDispatcher:
        if self._dispatcher is None:
            from ipop.nat.ice import IceDispatcher

            self._dispatcher = IceDispatcher()
        return self._dispatcher

    async def prepare(self, peer_uid: str, my_uid: str) -> list[str]:
        """Our ICE parameters for a link to ``peer_uid`` (gathered once per attempt)."""
        ice = self.sessions.get(peer_uid)
        if ice is None:
            from ipop.nat.ice import IceLink

            excluded = [ipaddress.ip_network("2001:db8::/32"), self.cfg.ip4_network]
            made: list[IceLink] = []  # the callbacks tell which session they come from
            ice = IceLink(
                controlling=my_uid < peer_uid, stun=self.stun, turn=self.turn,
                exclude_prefixes=excluded, exclude_ifaces=[self.cfg.interface],
                direct_timeout=DIRECT_PHASE,
                on_path_change=functools.partial(self._moved, peer_uid, made),
                on_closed=functools.partial(self._closed, peer_uid, made),
            )
            made.append(ice)
            self.sessions[peer_uid] = ice
        if ice.params is None:
            async with self._gathers:
                params = await ice.gather()
        else:
            params = await ice.gather()
        return params.to_wire()

    async def connect(self, peer_uid: str, remote: list[str]) -> tuple[Path, list[bytes]]:
        """Run the checks; returns the path (sockets already adopted) and early datagrams."""
        ice = self.sessions.get(peer_uid)
        if ice is None:
            raise LookupError("no ICE session for this peer")
        theirs = IceParams.from_wire(remote)
        sp = await ice.connect(theirs, deadline=CONNECT_DEADLINE)
        if self.sessions.get(peer_uid) is not ice:
            raise LookupError("ICE session was closed meanwhile")
        for sock in ice.sockets:  # nothing reads them now: adopt before the next await
            self.adopt(sock)
        self.dispatcher.add(ice)
        self.connected.add(peer_uid)
        log.info("path to %s: %s %s -> %s", peer_uid[:12], sp.kind, sp.local, sp.remote)
        return to_path(sp), ice.take_early()

    async def turn_answers(self) -> bool:
        """Whether the first TURN server answers a STUN Binding request now (True when none is
        configured).  A link that ran over a relay waits for this before it is made again, so
        an attempt does not spend its gather and check time on a server that is still away."""
        if not self.turn:
            return True
        from aioice import stun

        host, port = self.turn[0].server
        request = stun.Message(message_method=stun.Method.BINDING,
                               message_class=stun.Class.REQUEST,
                               transaction_id=os.urandom(12))
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            mark_socket(sock)
            try:
                await loop.sock_sendto(sock, bytes(request), (host, port))
                async with asyncio.timeout(TURN_CHECK_TIMEOUT):
                    while True:
                        data, _ = await loop.sock_recvfrom(sock, 2048)
                        if len(data) >= 20 and data[8:20] == request.transaction_id:
                            return True
            except (TimeoutError, OSError):
                return False

    def feed(self, sock: object, data: bytes, addr: tuple[str, int], channel: int | None) -> bool:
        if self._dispatcher is None:
            return False
        return self._dispatcher.feed(sock, data, addr, channel)  # type: ignore[arg-type]

    def set_aside(self, peer_uid: str) -> bool:
        """Keep the connected session of ``peer_uid`` serving its working link while a new
        attempt gathers and connects a session of its own; False: none to keep."""
        if peer_uid not in self.connected or peer_uid in self.aside:
            return False
        self.aside[peer_uid] = self.sessions.pop(peer_uid)
        self.connected.discard(peer_uid)
        return True

    async def end_aside(self, peer_uid: str, *, keep_new: bool) -> None:
        """The attempt made beside is over: its link replaced the old one (``keep_new``: the old
        session goes), or it failed (the new session goes; the old one is current again)."""
        old = self.aside.pop(peer_uid, None)
        if old is None:
            return
        if keep_new:
            await self._end(old)
            return
        new = self.sessions.pop(peer_uid, None)
        self.sessions[peer_uid] = old
        self.connected.add(peer_uid)
        if new is not None:
            await self._end(new)

    async def close(self, peer_uid: str) -> None:
        old = self.aside.pop(peer_uid, None)
        if old is not None:
            await self._end(old)
        ice = self.sessions.pop(peer_uid, None)
        self.connected.discard(peer_uid)
        if ice is None:
            return
        await self._end(ice)

    async def _end(self, ice: IceLink) -> None:
        for sock in ice.sockets:
            self.release(sock)
        if self._dispatcher is not None:
            self._dispatcher.remove(ice)
        await ice.close()

    async def close_all(self) -> None:
        for uid in {*self.sessions, *self.aside}:
            await self.close(uid)

    def kind(self, peer_uid: str) -> str | None:
        ice = self.sessions.get(peer_uid)
        return ice.selected.kind if ice is not None and ice.selected is not None else None

    def _current(self, peer_uid: str, made: list[IceLink]) -> IceLink | None:
        """The session a callback came from, if it serves the peer's link in the table: the
        one set aside while there is one, else the current one."""
        ice = self.aside.get(peer_uid) or self.sessions.get(peer_uid)
        return ice if ice is not None and made and made[0] is ice else None

    def _moved(self, peer_uid: str, made: list[IceLink], sp: SelectedPath) -> None:
        ice = self._current(peer_uid, made)
        if ice is None:
            if made and made[0] is self.sessions.get(peer_uid):
                for sock in made[0].sockets:  # an attempt beside a working link: later
                    self.adopt(sock)
            return
        for sock in ice.sockets:
            self.adopt(sock)
        log.info("path to %s moved: %s %s -> %s", peer_uid[:12], sp.kind, sp.local, sp.remote)
        self.on_path_change(peer_uid, to_path(sp))

    def _closed(self, peer_uid: str, made: list[IceLink], why: str) -> None:
        if self._current(peer_uid, made) is not None:
            log.info("ICE session with %s ended: %s", peer_uid[:12], why)
            self.on_failed(peer_uid, why)
