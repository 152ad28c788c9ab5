"""The control socket: newline-delimited JSON requests and notifications over a Unix socket.

A request is ``{"id": N, "method": "get_state", "params": {...}}``; the answer is
``{"id": N, "result": ...}`` or ``{"id": N, "error": "..."}``.  After ``subscribe`` the
connection also receives notifications ``{"notify": "peer_state", "data": {...}}``.
The socket is created with mode 0600 (root only); a stale socket from a killed node is replaced.
Malformed requests get an error answer and never disturb the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ipop.errors import IpopError

log = logging.getLogger("ipop.api")
MAX_LINE = 64 * 1024

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
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b'{"id": null, "error": "request too long"}\n')
                    break
                if not line:
                    break
                reply = await self._answer(line, writer)
                writer.write((json.dumps(reply, default=str) + "\n").encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.subscribers.discard(writer)
            writer.close()

    async def _answer(self, line: bytes, writer: asyncio.StreamWriter) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"id": None, "error": "malformed request: not JSON"}
        if not isinstance(req, dict):
            return {"id": None, "error": "malformed request: not an object"}
        rid = req.get("id")
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
    """One synchronous request (for the CLI); raises IpopError on failure."""
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
