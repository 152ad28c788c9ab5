"""A test agent: one side of an ICE link with a stand-in data plane, driven from the command line.

Run in a namespace of the test bed, one per side::

    python -m ipop.nat.probe --name a --peer b --dir /tmp/x --controlling \
        --stun 198.19.1.5:3478 --turn 198.19.1.5:3478:user:pass --ping --hold 7

It gathers, writes its ``IceParams`` to ``DIR/NAME.json``, waits for ``DIR/PEER.json``, connects,
then does what the real data plane does with the sockets: a thread reads every socket of the link
(epoll), unwraps ChannelData and hands STUN back to ``IceLink.feed`` on the event loop.  An
ipop-type frame (first byte 0x80) counts only if it arrives on the selected path (socket, source
address and channel: the data plane's check on plain links); ``ping:…`` is answered ``pong:…`` on
our own selected path (as ChannelData when the path has a channel), so a pong proves that both
ends selected mirrored pairs.  With ``--ping`` it pings until a pong returns, and again after
``--hold``.

Each step prints one JSON line on stdout (``gathered``, ``exchanged``, ``connected``, ``pong``,
``path_change``, ``pong_final``, ``counters``, ``failed``, ``done``, ``closed``); times are
seconds since the agent started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import select
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ipop.errors import RemoteProtocolError
from ipop.nat.ice import IceFailed, IceLink
from ipop.nat.params import IceParams, SelectedPath, TurnConf
from ipop.wire.header import is_stun
from ipop.wire.turn import is_channel_data, pack_channel_data, parse_channel_data

FRAME = 0x80
T0 = time.monotonic()


def emit(event: str, **fields: Any) -> None:
    fields = {"event": event, "t": round(time.monotonic() - T0, 4), **fields}
    print(json.dumps(fields), flush=True)


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _turn(text: str) -> TurnConf:
    host, port, user, password = text.split(":", 3)
    return TurnConf((host, int(port)), user, password)


def path_fields(path: SelectedPath) -> dict[str, Any]:
    return {
        "kind": path.kind,
        "channel": path.channel,
        "local": path.local,
        "remote": path.remote,
        "remote_addr": list(path.remote_addr),
        "rtt_ms": path.rtt_ms,
    }


class MiniPlane:
    """Reads the link's sockets on a thread, like ``ipop.dataplane.inbound`` does."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, link: IceLink, path: SelectedPath
    ) -> None:
        self.loop = loop
        self.link = link
        self.path: SelectedPath | None = path
        self.pongs: asyncio.Queue[bytes] = asyncio.Queue()
        self.frames = 0
        self.off_path = 0
        self.stop = threading.Event()
        self.epoll = select.epoll()
        self.socks = {s.fileno(): s for s in link.sockets}
        for fd in self.socks:
            self.epoll.register(fd, select.EPOLLIN)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def send(self, payload: bytes) -> None:
        path = self.path
        if path is None:
            return
        data = bytes([FRAME]) + payload
        if path.channel is not None:
            data = pack_channel_data(path.channel, data)
        with contextlib.suppress(OSError):
            path.sock.sendto(data, path.remote_addr)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        self.epoll.close()

    def _run(self) -> None:
        while not self.stop.is_set():
            for fd, _ in self.epoll.poll(0.2):
                sock = self.socks[fd]
                while True:
                    try:
                        data, raw = sock.recvfrom(2048)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    self._demux(sock, data, (raw[0], raw[1]))

    def _demux(self, sock: socket.socket, data: bytes, addr: tuple[str, int]) -> None:
        channel = None
        if is_channel_data(data):
            try:
                channel, inner = parse_channel_data(data)
            except RemoteProtocolError:
                return
            data = bytes(inner)
        if not data:
            return
        if is_stun(data):
            self.loop.call_soon_threadsafe(self.link.feed, data, addr, channel, sock)
        elif data[0] == FRAME:
            path = self.path
            if path is None or (sock.fileno(), addr, channel) != (
                path.sock.fileno(), path.remote_addr, path.channel
            ):
                self.off_path += 1  # the data plane drops these on plain links
                return
            self.frames += 1
            body = data[1:]
            if body.startswith(b"ping:"):
                self.loop.call_soon_threadsafe(self.send, b"pong:" + body[5:])
            elif body.startswith(b"pong:"):
                self.loop.call_soon_threadsafe(self.pongs.put_nowait, body[5:])


async def exchange(args: argparse.Namespace, mine: IceParams) -> IceParams:
    folder = Path(args.dir)
    tmp = folder / f".{args.name}.json"
    tmp.write_text(json.dumps(mine.to_wire()))
    os.replace(tmp, folder / f"{args.name}.json")
    theirs = folder / f"{args.peer}.json"
    give_up = time.monotonic() + args.wait
    while not theirs.exists():
        if time.monotonic() > give_up:
            raise IceFailed(f"no parameters from {args.peer}")
        await asyncio.sleep(0.01)
    return IceParams.from_wire(json.loads(theirs.read_text()))


async def ping(plane: MiniPlane, within: float) -> float | None:
    give_up = time.monotonic() + within
    seq = 0
    while time.monotonic() < give_up:
        seq += 1
        sent = time.monotonic()
        plane.send(b"ping:%d" % seq)
        try:
            async with asyncio.timeout(0.1):
                await plane.pongs.get()
            return (time.monotonic() - sent) * 1000
        except TimeoutError:
            continue
    return None


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def run(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    plane: MiniPlane | None = None
    fds_before = open_fds()

    def changed(path: SelectedPath) -> None:
        if plane is not None:
            plane.path = path
        emit("path_change", **path_fields(path))

    link = IceLink(
        args.controlling,
        [_addr(s) for s in args.stun],
        [_turn(t) for t in args.turn],
        args.exclude_prefix,
        args.exclude_iface,
        direct_timeout=args.direct_timeout,
        probe_interval=args.probe_interval,
        channel_refresh=args.refresh,
        on_path_change=changed,
        on_closed=lambda why: emit("closed_by_ice", reason=why),
    )
    try:
        mine = await link.gather()
        emit("gathered", candidates=list(mine.candidates))
        theirs = await exchange(args, mine)
        t_exchanged = time.monotonic()
        emit("exchanged")
        path = await link.connect(theirs, deadline=args.deadline)
        took = time.monotonic() - t_exchanged
        plane = MiniPlane(loop, link, path)  # adopt the sockets at once, as the data plane would
        emit("connected", connect_s=round(took, 4), sockets=len(link.sockets), **path_fields(path))
        if args.ping:
            rtt = await ping(plane, 5.0)
            emit("pong", ok=rtt is not None, rtt_ms=None if rtt is None else round(rtt, 3))
        if args.hold:
            await asyncio.sleep(args.hold)
            if args.ping:
                rtt = await ping(plane, 5.0)
                ok = rtt is not None
                emit("pong_final", ok=ok, rtt_ms=None if rtt is None else round(rtt, 3))
        emit("counters", frames=plane.frames, off_path=plane.off_path, **dict(link.counters))
        emit("done")
        return 0
    except IceFailed as exc:
        emit("failed", error=str(exc), counters=dict(link.counters))
        return 1
    finally:
        if plane is not None:
            plane.close()
        started = time.monotonic()
        await link.close()
        took = round(time.monotonic() - started, 3)
        emit("closed", close_s=took, fds_before=fds_before, fds_after=open_fds())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ipop.nat.probe", description=__doc__)
    p.add_argument("--name", required=True)
    p.add_argument("--peer", required=True)
    p.add_argument("--dir", required=True, help="folder where both sides leave their params")
    p.add_argument("--controlling", action="store_true")
    p.add_argument("--stun", action="append", default=[], help="IP:PORT")
    p.add_argument("--turn", action="append", default=[], help="IP:PORT:USER:PASSWORD")
    p.add_argument("--exclude-prefix", action="append", default=[])
    p.add_argument("--exclude-iface", action="append", default=[])
    p.add_argument("--deadline", type=float, default=8.0)
    p.add_argument("--direct-timeout", type=float, default=2.5)
    p.add_argument("--probe-interval", type=float, default=7.0)
    p.add_argument("--refresh", type=float, default=240.0, help="TURN channel re-bind period")
    p.add_argument("--wait", type=float, default=10.0, help="how long to wait for the peer")
    p.add_argument("--ping", action="store_true")
    p.add_argument("--hold", type=float, default=0.0, help="seconds to stay up after connecting")
    p.add_argument("--log", help="write logs (debug) to this file")
    args = p.parse_args(argv)
    if args.log:
        logging.basicConfig(
            filename=args.log,
            level=logging.DEBUG,
            format="%(relativeCreated)8.1f %(name)s %(levelname)s %(message)s",
        )
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
