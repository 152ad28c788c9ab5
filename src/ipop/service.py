"""Running under a service manager: systemd's notify protocol and its watchdog.

``sd_notify(3)`` is one datagram of ``KEY=VALUE`` lines to the Unix socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).  Without that variable
every call here does nothing, so ``ipop up`` behaves the same outside systemd.

What the node sends, and when::

    start: NIC up, control socket listening  -> READY=1, STATUS=...
    SIGHUP / `ipop reload`                    -> RELOADING=1, MONOTONIC_USEC=...; then READY=1
    every WATCHDOG_USEC / 2 from the event loop -> WATCHDOG=1   (only when systemd asks for it)
    SIGINT / SIGTERM                           -> STOPPING=1

The watchdog ping is sent from the node's asyncio loop (its ticker), so a wedged loop stops
the pings and systemd restarts the node.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """The notify socket of this process (``$NOTIFY_SOCKET``), if there is one."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if raw.startswith("@"):
            self.address = b"\0" + raw[1:].encode()
        elif raw.startswith("/"):
            self.address = raw
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines (keys upper-cased); False when there is no socket or it
        refused (never raises: the node runs on whatever systemd does)."""
        if self.address is None:
            return False
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.address)
                s.sendall(msg)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status)

    def reloading(self) -> None:
        self.send(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.send(stopping=1)

    def watchdog(self, now: float) -> None:
        """Ping the watchdog if systemd asked for one and half its period has passed."""
        if self.watchdog_interval is None or now - self._last_ping < self.watchdog_interval:
            return
        self._last_ping = now
        self.send(watchdog=1)
