"""The control socket: newline-delimited JSON requests and notifications over a Unix socket.

A request is ``{"id": N, "method": "get_state", "params": {...}}``; the answer is
``{"id": N, "result": ...}`` or ``{"id": N, "error": "..."}``.  After ``subscribe`` the
connection also receives notifications ``{"notify": "peer_state", "data": {...}}``.
The socket is created with mode 0600 (root only); a stale socket from a killed node is replaced.
Malformed requests get an error answer and never disturb the node: a line that is too long,
not JSON, nested deeper than ``MAX_DEPTH`` or holding NaN/Infinity gets ``{"id": null, "error":
...}`` and the connection stays open.  Replies are strict JSON (an ``id`` that cannot be
written as JSON, such as ``1e400``, is answered as null).  Errors accepting connections (at the
fd limit) are logged at most once per ``ACCEPT_LOG_INTERVAL`` seconds, with the count of those
left out.
The client (``call``) talks only to a socket that the running user or root owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ipop.errors import IpopError
from ipop.statedir import check_control_socket

log = logging.getLogger("ipop.api")
MAX_LINE = 64 * 1024
MAX_DEPTH = 32  # nesting of arrays/objects in a request (json would recurse ~1000 deep)
ACCEPT_LOG_INTERVAL = 5.0


class MalformedRequest(ValueError):
    """A request line that is not a JSON object ipop may parse."""


def _no_constant(name: str) -> Any:
    raise MalformedRequest(f"{name} is not JSON")


def nesting_depth(line: bytes, limit: int) -> int:
    """The deepest nesting of ``[``/``{`` in JSON text ``line`` (strings skipped); stops
    counting once past ``limit`` (returns limit + 1)."""
    depth = deepest = 0
    in_str = escaped = False
    for ch in line:
        if in_str:
            if escaped:
                escaped = False
            elif ch == 0x5C:  # backslash
                escaped = True
            elif ch == 0x22:  # quote
                in_str = False
        elif ch == 0x22:
            in_str = True
        elif ch in (0x5B, 0x7B):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif ch in (0x5D, 0x7D):
            depth -= 1
    return deepest


def parse_request(line: bytes) -> dict[str, Any]:
    """One request line as an object; raises MalformedRequest (depth, NaN, not JSON)."""
    if nesting_depth(line, MAX_DEPTH) > MAX_DEPTH:
        raise MalformedRequest(f"nested deeper than {MAX_DEPTH}")
    try:
        req = json.loads(line, parse_constant=_no_constant)
    except MalformedRequest:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise MalformedRequest("not JSON") from None
    if not isinstance(req, dict):
        raise MalformedRequest("not an object")
    return req


def _reply_id(rid: Any) -> Any:
    """The id to echo: as it came, unless it cannot be written as JSON (``1e400`` parses as
    infinity, and so does anything holding it): then null."""
    try:
        json.dumps(rid, allow_nan=False)
    except (ValueError, TypeError):
        return None
    return rid


def encode_reply(reply: dict[str, Any]) -> bytes:
    """A reply as one line of strict JSON (a NaN in a result becomes an error reply)."""
    try:
        return (json.dumps(reply, default=str, allow_nan=False) + "\n").encode()
    except ValueError:
        bad = {"id": reply.get("id"), "error": "internal error: reply is not JSON"}
        return (json.dumps(bad) + "\n").encode()


class AcceptErrorLog:
    """A loop exception handler that lets through one accept error per ``interval`` seconds
    (at the fd limit asyncio reports every failed accept) and passes the rest on."""

    def __init__(self, previous: Any, interval: float = ACCEPT_LOG_INTERVAL) -> None:
        self.previous = previous
        self.interval = interval
        self.last = -interval
        self.suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if "accept" in message:
            now = time.monotonic()
            if now - self.last < self.interval:
                self.suppressed += 1
                return
            self.last = now
            exc = context.get("exception")
            log.error("control socket: %s: %s (%d more left out)", message, exc, self.suppressed)
            self.suppressed = 0
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


def remove_stale_socket(path: Path) -> None:
    """Remove ``path`` if it is a socket nobody answers on; refuse if a node is listening."""
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise IpopError(f"another node answers on {path}")


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.server: asyncio.base_events.Server | None = None
        self.subscribers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_stale_socket(self.path)
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_LINE
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        loop = asyncio.get_running_loop()
        if not isinstance(loop.get_exception_handler(), AcceptErrorLog):
            loop.set_exception_handler(AcceptErrorLog(loop.get_exception_handler()))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self.subscribers):
                w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
        self.path.unlink(missing_ok=True)

    def notify(self, kind: str, data: dict[str, Any]) -> None:
        if not self.subscribers:
            return
        line = (json.dumps({"notify": kind, "data": data}, default=str) + "\n").encode()
        for w in list(self.subscribers):
            if w.is_closing():
                self.subscribers.discard(w)
                continue
            if w.transport.get_write_buffer_size() > 1 << 20:
                continue  # a slow reader loses notifications, never stalls the node
            w.write(line)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        skipping = False  # the rest of a too-long line is skipped, then requests go on
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError) as exc:
                    if not skipping:
                        writer.write(b'{"id": null, "error": "malformed request: too long"}\n')
                        await writer.drain()
                    # asyncio dropped the line if its end was in the buffer, else what it had
                    skipping = "not found" in str(exc)
                    continue
                if not line:
                    break
                if skipping:
                    skipping = not line.endswith(b"\n")
                    continue
                if not line.strip():
                    continue
                reply = await self._answer(line, writer)
                writer.write(encode_reply(reply))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.subscribers.discard(writer)
            writer.close()

    async def _answer(self, line: bytes, writer: asyncio.StreamWriter) -> dict[str, Any]:
        try:
            req = parse_request(line)
        except MalformedRequest as exc:
            return {"id": None, "error": f"malformed request: {exc}"}
        rid = _reply_id(req.get("id"))
        method = req.get("method")
        params = req.get("params") or {}
        if not isinstance(method, str) or not isinstance(params, dict):
            return {"id": rid, "error": "malformed request: method and params"}
        if method == "subscribe":
            self.subscribers.add(writer)
            return {"id": rid, "result": "subscribed"}
        try:
            result = await self.handler(method, params)
        except IpopError as exc:
            return {"id": rid, "error": str(exc)}
        except (KeyError, TypeError, ValueError) as exc:
            return {"id": rid, "error": f"bad params: {exc}"}
        except Exception as exc:  # never let a request take the node down
            log.exception("control request %s failed", method)
            return {"id": rid, "error": f"internal error: {type(exc).__name__}"}
        return {"id": rid, "result": result}


def call(path: Path, method: str, params: dict[str, Any] | None = None,
         timeout: float = 5.0) -> Any:
    """One synchronous request (for the CLI); raises IpopError on failure (ConfigError when
    the socket could have been planted by another user)."""
    check_control_socket(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except OSError as exc:
        raise IpopError(f"no node answers on {path}: {exc.strerror}") from None
    try:
        s.sendall((json.dumps({"id": 1, "method": method, "params": params or {}}) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    reply = json.loads(buf)
    if "error" in reply:
        raise IpopError(str(reply["error"]))
    return reply.get("result")
