"""ICE for one peer link: gather, connect (direct first, then relay), and hand the chosen socket
to the data plane while keeping aioice's consent checks and TURN state alive.

Life of an ``IceLink`` (all methods on the event-loop thread)::

    ice = IceLink(controlling, stun, turn, exclude_prefixes, exclude_ifaces)
    mine = await ice.gather()                 -> IceParams   (send mine.to_wire() to the peer)
    path = await ice.connect(theirs)          -> SelectedPath
    for s in ice.sockets: dataplane.adopt_socket(s)      # at once: nothing reads them now
    ... the data plane hands every STUN datagram of those sockets back: ice.feed(...)
    ... on_path_change(new path) when a relayed link moves to a direct pair
    dataplane.release_socket(s) for s in ice.sockets; await ice.close()

connect() has two phases.  Direct: only host/server-reflexive pairs are checked, for
``direct_timeout`` seconds (aioice with TURN would otherwise nominate whichever pair answers first,
often the relay).  Relay: our relayed candidate and the peer's are paired too, until the
deadline.  Nomination is *regular* (``remote_is_lite`` makes aioice's controlling side check first
and then nominate one pair with USE-CANDIDATE), so both ends select the same pair; aggressive
nomination lets the two ends settle on different pairs.

Socket takeover.  When a pair is selected, every socket of this link stops being read by asyncio
(``pause_reading`` on its transport) and is duplicated (``os.dup``) into a plain, non-blocking
``socket.socket`` owned by the IceLink: ``sockets`` lists them, ``SelectedPath.sock`` is one of
them.  The duplicate shares the kernel socket, so aioice keeps sending on its own descriptor while
the data plane reads and sends on ours; closing either descriptor alone closes nothing.  The data
plane reads everything that arrives; STUN (first byte 0..3, possibly inside ChannelData) must come
back through ``feed``, which passes it to aioice's protocol for that socket: connectivity checks,
consent freshness (without it aioice closes the connection after ~30 s), and TURN responses.

TURN.  aioice's TURN client owns a UDP socket connected to the TURN server; a path through our
relay is ``(that socket, server address, channel)`` and the data plane wraps each datagram as
ChannelData.  aioice bound the channel while checking the pair and refreshes the allocation itself
(at 5/6 of its 600 s lifetime); this class re-binds the selected channel every
``channel_refresh`` seconds (binding lasts 600 s, its permission 300 s).  From the TURN server
come ChannelData (the data plane unwraps it; STUN inside goes to ``feed`` with ``channel``) and
plain STUN: responses to Allocate refresh/ChannelBind and Data indications (to ``feed`` with
``channel=None``).

Liveness.  aioice's consent checks are off (``IpopConnection.query_consent``): the data plane's
keepalives decide whether a link lives.  A path through our own TURN allocation is probed with a
Refresh every 1.25 s, and three misses (or an error answer) end the session within 5 s.

Upgrade.  While the selected path is relayed, both ends probe the direct pairs every
``probe_interval`` seconds; the controlling end nominates the first that answers and the
controlled end's aioice follows that nomination; both report ``on_path_change``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aioice
from aioice import stun
from aioice.candidate import Candidate
from aioice.ice import CandidatePair, ConnectionClosed, StunProtocol
from aioice.turn import TurnClientUdpProtocol, TurnTransport

from ipop.errors import IpopError, RemoteProtocolError
from ipop.fwmark import mark_socket
from ipop.nat.conn import IpopConnection
from ipop.nat.filters import IpNetwork, address_allowed, excluded_networks, host_addresses
from ipop.nat.params import (
    CANDIDATE_PREFIX,
    IceParams,
    SelectedPath,
    TurnConf,
    cap_candidates,
    parse_candidate,
)
from ipop.wire.header import is_stun
from ipop.wire.turn import pack_channel_data

__all__ = ["IceDispatcher", "IceFailed", "IceLink"]

log = logging.getLogger("ipop.nat")

if not aioice.__version__.startswith("0.13."):  # pragma: no cover
    log.warning("ipop.nat was written against aioice 0.13, found %s", aioice.__version__)

MAX_PROBE_PAIRS = 8
CLOSE_TIMEOUT = 2.0
RELAY_PROBE_INTERVAL = 1.25  # seconds between two probes of our TURN allocation while relayed
RELAY_PROBE_TIMEOUT = 1.0
RELAY_MISSES = 3  # unanswered probes in a row that make the relay dead (within 5 s)
_STUN_CLASS = {0x0000: "request", 0x0010: "indication", 0x0100: "response", 0x0110: "error"}


class IceFailed(IpopError):
    """No candidate pair worked before the deadline (or ICE could not run at all)."""

    reason = "ice_failed"


@dataclass
class _Endpoint:
    """One socket of this link after the takeover."""

    sock: socket.socket  # our duplicate, handed to the data plane
    protocol: StunProtocol
    transport: asyncio.DatagramTransport  # the asyncio transport that read it before
    turn: TurnClientUdpProtocol | None = None  # set for the TURN client's socket
    server: tuple[str, int] | None = None  # the TURN server (numeric), for relayed paths


def _turn_client(protocol: StunProtocol) -> TurnClientUdpProtocol | None:
    """aioice's TURN client behind a relayed candidate's protocol (a name-mangled attribute)."""
    transport = getattr(protocol, "transport", None)
    if not isinstance(transport, TurnTransport):
        return None
    inner = getattr(transport, "_TurnTransport__inner_protocol", None)
    if not isinstance(inner, TurnClientUdpProtocol):
        raise IceFailed("aioice's TURN client is not where ipop.nat expects it (aioice version?)")
    return inner


def _stun_kind(data: bytes) -> str:
    """``binding_request``, ``other_response``, ... from the STUN type field (for counters)."""
    if len(data) < 20:
        return "short"
    mtype = (data[0] << 8) | data[1]
    method = "binding" if mtype & 0x3EEF == 0x0001 else "other"
    return f"{method}_{_STUN_CLASS[mtype & 0x0110]}"


class IceLink:
    """ICE for one peer link."""

    def __init__(
        self,
        controlling: bool,
        stun: Sequence[tuple[str, int]],
        turn: Sequence[TurnConf],
        exclude_prefixes: Iterable[IpNetwork | str] = (),
        exclude_ifaces: Iterable[str] = (),
        *,
        direct_timeout: float = 2.5,
        probe_interval: float = 7.0,
        channel_refresh: float = 240.0,
        relay_probe_interval: float = RELAY_PROBE_INTERVAL,
        relay_probe_timeout: float = RELAY_PROBE_TIMEOUT,
        gather_timeout: int = 3,
        on_path_change: Callable[[SelectedPath], None] | None = None,
        on_closed: Callable[[str], None] | None = None,
    ) -> None:
        self.controlling = controlling
        self.stun_servers = list(stun)
        self.turn_servers = list(turn)
        self.excluded = excluded_networks(exclude_prefixes)
        self.exclude_ifaces = tuple(exclude_ifaces)
        self.direct_timeout = direct_timeout
        self.probe_interval = probe_interval
        self.channel_refresh = channel_refresh
        self.relay_probe_interval = relay_probe_interval
        self.relay_probe_timeout = relay_probe_timeout
        self.gather_timeout = gather_timeout
        self.on_path_change = on_path_change
        self.on_closed = on_closed
        self.params: IceParams | None = None
        self.selected: SelectedPath | None = None
        self.counters: collections.Counter[str] = collections.Counter()
        self._conn: IpopConnection | None = None
        self._pair: CandidatePair | None = None
        self._endpoints: dict[int, _Endpoint] = {}
        self._remote_relays: set[tuple[str, int]] = set()
        self._connect_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # ---- public API
    @property
    def sockets(self) -> list[socket.socket]:
        """Every socket of this link, taken over from asyncio once connect() has succeeded."""
        return [ep.sock for ep in self._endpoints.values()]

    @property
    def fds(self) -> list[int]:
        """The descriptors of ``sockets`` (stable until close)."""
        return list(self._endpoints)

    @property
    def closed(self) -> bool:
        return self._closed

    def owns(self, sock: socket.socket) -> bool:
        return sock.fileno() in self._endpoints

    def take_early(self) -> list[bytes]:
        """Non-STUN datagrams that reached aioice before the takeover (e.g. an early DTLS
        ClientHello from a peer that finished ICE first); at most 32, oldest first."""
        conn = self._conn
        if conn is None:
            return []
        out = list(conn.early)
        conn.early.clear()
        return out

    async def gather(self) -> IceParams:
        """Gather local candidates (host, server-reflexive, relayed) once; returns our params."""
        if self.params is not None:
            return self.params
        if self._closed:
            raise IceFailed("IceLink is closed")
        turn = self.turn_servers[0] if self.turn_servers else None
        conn = IpopConnection(
            ice_controlling=self.controlling,
            stun_server=self.stun_servers[0] if self.stun_servers else None,
            turn_server=turn.server if turn else None,
            turn_username=turn.user if turn else None,
            turn_password=turn.password if turn else None,
            addresses=host_addresses(self.excluded, self.exclude_ifaces),
            excluded=self.excluded,
            gather_timeout=self.gather_timeout,
            on_check_complete=self._on_check_complete,
        )
        conn.remote_is_lite = True  # regular nomination: see the module docstring
        self._conn = conn
        try:
            await conn.gather_candidates()
        finally:
            if self.closed:  # close() ran meanwhile: sockets made since then are ours to close
                await self._close_conn(conn)
        if self.closed:
            raise IceFailed("IceLink was closed while gathering")
        self._mark(conn)
        local = conn.local_candidates
        hosts = {(c.host, c.port) for c in local if c.type == "host"}
        others = [c for c in local if c.type != "host" and (c.host, c.port) not in hosts]
        keep = others[:31] + [c for c in local if c.type == "host"]
        # the caps every peer applies to what it receives (``cap_candidates``)
        wire, _ = cap_candidates([CANDIDATE_PREFIX + c.to_sdp() for c in keep[:31]])
        self.params = IceParams(conn.local_username, conn.local_password,
                                tuple(w[len(CANDIDATE_PREFIX):] for w in wire))
        log.info("gathered %s", ", ".join(f"{c.type} {c.host}:{c.port}" for c in keep))
        return self.params

    async def connect(self, remote: IceParams, deadline: float = 8.0) -> SelectedPath:
        """Run the checks against ``remote`` and return the selected path; raises IceFailed.

        On success the link's sockets are no longer read by asyncio: adopt ``sockets`` into the
        data plane before the next ``await``."""
        await self.gather()
        conn = self._conn
        assert conn is not None
        if self._connect_task is not None:
            raise IceFailed("connect() was already called on this IceLink")
        start = time.monotonic()
        conn.remote_username, conn.remote_password = remote.ufrag, remote.pwd
        direct: list[Candidate] = []
        relayed: list[Candidate] = []
        for sdp in remote.candidates:
            try:
                info = parse_candidate(sdp)
            except RemoteProtocolError:
                self.counters["remote_candidate_malformed"] += 1
                continue
            if not address_allowed(info.host, self.excluded):
                self.counters["remote_candidate_excluded"] += 1
                continue
            cand = Candidate.from_sdp(sdp)
            (relayed if info.type == "relay" else direct).append(cand)
        self._remote_relays = {(c.host, c.port) for c in relayed}
        has_relay = bool(relayed) or any(p.local_candidate.type == "relay" for p in conn.protocols)
        for cand in direct:
            await conn.add_remote_candidate(cand)
        if not has_relay:
            await conn.add_remote_candidate(None)
        task = self._connect_task = asyncio.create_task(conn.connect())
        try:
            first = min(self.direct_timeout, deadline) if has_relay else deadline
            await asyncio.wait({task}, timeout=max(0.0, first))
            if not task.done() and has_relay:
                log.info("no direct pair within %.1f s: adding relayed pairs", first)
                conn.pair_all_remote()
                for cand in relayed:
                    await conn.add_remote_candidate(cand)
                await conn.add_remote_candidate(None)
                left = deadline - (time.monotonic() - start)
                await asyncio.wait({task}, timeout=max(0.0, left))
            if not task.done() and self.selected is not None:
                await asyncio.wait({task}, timeout=0.5)  # selected: aioice returns within 20 ms
            if not task.done():
                raise IceFailed(f"no candidate pair answered within {deadline:.1f} s")
            if task.cancelled() or task.exception() is not None:
                raise IceFailed(f"ICE failed: {task.exception() if not task.cancelled() else ''}")
            selected = self.selected
            if selected is None:
                raise IceFailed("ICE completed without a usable pair")
        except BaseException:
            await self.close()
            raise
        self.counters["connect_ms"] = round((time.monotonic() - start) * 1000)
        self._spawn(self._watch_closed())
        if not selected.direct:  # a direct path never falls back: no timers on it
            self._spawn(self._probe_direct())
            self._spawn(self._refresh_channel())
            self._spawn(self._watch_relay())
        return selected

    def feed(
        self,
        data: bytes,
        addr: tuple[str, int],
        channel: int | None,
        sock: socket.socket | None = None,
    ) -> bool:
        """Hand a STUN datagram that the data plane read on one of ``sockets`` back to aioice.

        ``sock``: the socket it arrived on (default: the selected path's); ``channel``: the TURN
        channel it was wrapped in, if any (``data`` is then the unwrapped payload).  Returns
        whether it was taken.  Never raises; malformed input is counted in ``counters``."""
        if self._closed:
            return False
        if sock is None:
            ep = self._endpoints.get(self.selected.sock.fileno()) if self.selected else None
        else:
            ep = self._endpoints.get(sock.fileno())
        if ep is None or not is_stun(data):
            self.counters["feed_refused"] += 1
            return False
        self.counters[f"stun_in_{_stun_kind(data)}"] += 1
        addr = (addr[0], addr[1])
        try:
            if ep.turn is not None:
                if channel is not None:
                    ep.turn.datagram_received(pack_channel_data(channel, data), addr)
                else:
                    ep.turn.datagram_received(data, addr)
            elif channel is None:
                ep.protocol.datagram_received(data, addr)
            else:
                self.counters["feed_refused"] += 1
                return False
        except Exception as exc:  # aioice's parser lets struct.error & co. escape
            self.counters["stun_in_malformed"] += 1
            log.debug("STUN datagram from %s dropped: %r", addr, exc)
        return True

    async def close(self) -> None:
        """Stop everything and close the sockets (release them from the data plane first)."""
        if self._closed:
            return
        self._closed = True
        current = asyncio.current_task()
        pending = (*self._tasks, self._connect_task)
        tasks = [t for t in pending if t is not None and t is not current]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        conn = self._conn
        if conn is not None:
            await self._close_conn(conn)
        for ep in self._endpoints.values():
            ep.sock.close()

    @staticmethod
    async def _close_conn(conn: IpopConnection) -> None:
        """Close aioice's connection and every transport (socket) it made; idempotent."""
        transports: list[asyncio.DatagramTransport] = []
        for proto in conn.protocols:
            turn = _turn_client(proto) if proto.local_candidate.type == "relay" else None
            used = turn.transport if turn is not None else proto.transport
            transports.append(used)
            resume = getattr(used, "resume_reading", None)
            if callable(resume):
                resume()  # let the TURN deallocation's answer reach aioice
        try:
            await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT)
        except Exception as exc:
            log.info("aioice close did not finish (%r): closing its transports", exc)
        for used in transports:
            used.close()

    # ---- selection and takeover
    def _on_check_complete(self) -> None:
        conn = self._conn
        if conn is None or self._closed:
            return
        pair = conn.nominated
        if pair is None or pair is self._pair:
            return
        self._take_over(conn)
        path = self._make_path(conn, pair)
        if path is None:
            return
        first = self._pair is None
        self._pair = pair
        self.selected = path
        log.info("selected %s: %s -> %s", path.kind, path.local, path.remote)
        if not first:
            self.counters["path_changes"] += 1
            callback = self.on_path_change
            if callback is not None:
                asyncio.get_running_loop().call_soon(callback, path)

    @staticmethod
    def _mark(conn: IpopConnection) -> None:
        """Put the underlay mark (``SO_MARK``) on every socket of the link: its checks and
        data then bypass a default route through an exit node (``dataplane.kroutes``)."""
        for proto in conn.protocols:
            turn = _turn_client(proto) if proto.local_candidate.type == "relay" else None
            transport = turn.transport if turn is not None else proto.transport
            raw = transport.get_extra_info("socket") if transport is not None else None
            if raw is not None:
                mark_socket(raw)

    def _take_over(self, conn: IpopConnection) -> None:
        """Stop asyncio reading every socket of this link and keep a duplicate of each."""
        known = {id(ep.protocol) for ep in self._endpoints.values()}
        for proto in conn.protocols:
            if id(proto) in known:
                continue
            turn = _turn_client(proto) if proto.local_candidate.type == "relay" else None
            transport: asyncio.DatagramTransport = (
                turn.transport if turn is not None else proto.transport
            )
            if transport.is_closing():
                continue
            raw = transport.get_extra_info("socket")
            if raw is None:
                continue
            pause = getattr(transport, "pause_reading", None)
            if callable(pause):
                pause()
            else:  # pragma: no cover (selector transports have pause_reading)
                asyncio.get_running_loop().remove_reader(raw.fileno())
            sock = socket.socket(fileno=os.dup(raw.fileno()))
            sock.setblocking(False)
            server = None
            if turn is not None:
                peer = transport.get_extra_info("peername")
                server = (str(peer[0]), int(peer[1]))
            self._endpoints[sock.fileno()] = _Endpoint(sock, proto, transport, turn, server)

    def _endpoint_of(self, proto: StunProtocol) -> _Endpoint | None:
        for ep in self._endpoints.values():
            if ep.protocol is proto:
                return ep
        return None

    def _make_path(self, conn: IpopConnection, pair: CandidatePair) -> SelectedPath | None:
        ep = self._endpoint_of(pair.protocol)
        if ep is None:
            log.warning("selected pair %r has no socket", pair)
            return None
        lc, rc = pair.local_candidate, pair.remote_candidate
        remote_addr = pair.remote_addr
        relayed = lc.type == "relay" or rc.type == "relay" or remote_addr in self._remote_relays
        kind = "relay" if relayed else rc.type
        local = f"{lc.type} {lc.host}:{lc.port}"
        channel: int | None = None
        dest = remote_addr
        if ep.turn is not None:
            channel = ep.turn.peer_to_channel.get(remote_addr)
            if channel is None or ep.server is None:
                log.warning("relayed pair %r has no TURN channel", pair)
                return None
            dest = ep.server
            local += f" via {dest[0]}:{dest[1]}"
        rtt = conn.rtt.get(pair)
        return SelectedPath(
            sock=ep.sock,
            remote_addr=dest,
            channel=channel,
            kind=kind,
            local=local,
            remote=f"{rc.type} {rc.host}:{rc.port}",
            rtt_ms=None if rtt is None else round(rtt * 1000, 3),
        )

    # ---- background work after connect
    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch_closed(self) -> None:
        conn = self._conn
        assert conn is not None
        while not self._closed:
            event = await conn.get_event()
            if event is None or isinstance(event, ConnectionClosed):
                break
        if not self._closed:
            log.info("ICE connection closed by aioice (consent expired or TURN lost)")
            if self.on_closed is not None:
                self.on_closed("ice_closed")

    def _direct_pairs(self, conn: IpopConnection) -> list[CandidatePair]:
        hosts = [
            p
            for p in conn.protocols
            if p.local_candidate.type != "relay" and not p.transport.is_closing()
        ]
        out: list[CandidatePair] = []
        for rc in conn.remote_candidate_list():
            if rc.type == "relay" or (rc.host, rc.port) in self._remote_relays:
                continue
            for proto in hosts:
                if proto.local_candidate.can_pair_with(rc):
                    out.append(conn.find_or_make_pair(proto, rc))
        return out[:MAX_PROBE_PAIRS]

    async def _probe_direct(self) -> None:
        """While relayed: check the direct pairs now and then; controlling nominates a winner."""
        conn = self._conn
        assert conn is not None
        while not self._closed:
            await asyncio.sleep(self.probe_interval * (0.8 + 0.4 * random.random()))
            if self.selected is None or self.selected.direct:
                return  # upgraded: nothing more to probe
            pairs = self._direct_pairs(conn)
            self.counters["upgrade_rounds"] += 1
            await asyncio.gather(*(self._probe(conn, p) for p in pairs), return_exceptions=True)

    async def _probe(self, conn: IpopConnection, pair: CandidatePair) -> None:
        assert conn.remote_password is not None
        nominate = conn.ice_controlling
        request = conn.build_request(pair, nominate=nominate)
        try:
            _, addr = await pair.protocol.request(
                request,
                pair.remote_addr,
                integrity_key=conn.remote_password.encode("utf8"),
                retransmissions=1,
            )
        except stun.TransactionError:
            return
        if addr != pair.remote_addr or self._closed:
            return
        conn.note_success(pair)
        self.counters["upgrade_answers"] += 1
        if nominate and self.selected is not None and not self.selected.direct:
            conn.set_nominated(pair)
            self._on_check_complete()

    async def _watch_relay(self) -> None:
        """While the selected path runs through our own TURN allocation, ask the server to
        refresh it every ``RELAY_PROBE_INTERVAL`` s (probes start on a fixed beat, whatever
        each one takes).  ``RELAY_MISSES`` unanswered probes in a row, or an error answer (the
        server restarted and forgot the allocation), end the session: ``on_closed("relay
        lost")``, so the link is made again instead of staying up on a dead relay."""
        loop = asyncio.get_running_loop()
        misses = 0
        beat = loop.time()
        while not self._closed:
            beat += self.relay_probe_interval
            await asyncio.sleep(max(0.0, beat - loop.time()))
            beat = max(beat, loop.time() - self.relay_probe_interval)
            path = self.selected
            if path is None or path.direct:
                return  # upgraded to a direct path: the relay no longer matters
            ep = self._endpoints.get(path.sock.fileno())
            if path.channel is None or ep is None or ep.turn is None:
                return  # the peer's relay, not ours: its end probes it
            gone = False
            try:
                request = stun.Message(message_method=stun.Method.REFRESH,
                                       message_class=stun.Class.REQUEST)
                request.attributes["LIFETIME"] = ep.turn.lifetime
                await asyncio.wait_for(ep.turn.request_with_retry(request),
                                       self.relay_probe_timeout)
                misses = 0
                self.counters["relay_probe_ok"] += 1
                continue
            except stun.TransactionFailed as exc:  # an error answer: the allocation is gone
                gone = True
                why = f"TURN server refused the refresh ({exc})"
            except (TimeoutError, stun.TransactionError, ConnectionError, OSError) as exc:
                why = f"{RELAY_MISSES} relay probes unanswered ({exc!r})"
            misses += 1
            self.counters["relay_probe_missed"] += 1
            if gone or misses >= RELAY_MISSES:
                self.counters["relay_lost"] += 1
                log.warning("relay %s lost: %s", path.remote_addr, why)
                if self.on_closed is not None and not self._closed:
                    self.on_closed("relay lost")
                return

    async def _refresh_channel(self) -> None:
        """Re-bind the selected TURN channel before its permission (300 s) can lapse."""
        while not self._closed:
            await asyncio.sleep(self.channel_refresh)
            path = self.selected
            if path is None or path.direct:
                return
            if path.channel is None:
                continue
            ep = self._endpoints.get(path.sock.fileno())
            if ep is None or ep.turn is None:
                continue
            peer = ep.turn.channel_to_peer.get(path.channel)
            if peer is None:
                continue
            try:
                await ep.turn.channel_bind(path.channel, peer)
            except (stun.TransactionError, ConnectionError, OSError) as exc:
                self.counters["channel_refresh_failed"] += 1
                log.warning("TURN channel %#x refresh failed: %s", path.channel, exc)
                continue
            ep.turn.channel_refresh_at[path.channel] = time.time() + ep.turn.channel_refresh_time
            self.counters["channel_refresh_ok"] += 1


class IceDispatcher:
    """Routes STUN from the data plane's ``control_datagram`` events to the owning IceLink."""

    def __init__(self) -> None:
        self._by_fd: dict[int, IceLink] = {}

    def add(self, link: IceLink) -> None:
        for fd in link.fds:
            self._by_fd[fd] = link

    def remove(self, link: IceLink) -> None:
        for fd in [fd for fd, owner in self._by_fd.items() if owner is link]:
            del self._by_fd[fd]

    def feed(
        self, sock: socket.socket, data: bytes, addr: tuple[str, int], channel: int | None
    ) -> bool:
        """Give a STUN datagram to the IceLink owning ``sock``; False if none does."""
        link = self._by_fd.get(sock.fileno())
        return link.feed(data, addr, channel, sock) if link is not None else False
