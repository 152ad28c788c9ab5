"""The signaling backend interface (aiortc-style): connect, send, set_presence, close, and events.

A backend carries presence (who is online, with which UID) and ``SignalMessage``s between nodes.
It reports what happens through a listener object:

    listener.on_state(connected, error)       our link to the signaling service came up / went down
    listener.on_presence(jid, uid, online, ip4=None)
                                              a peer appeared or left; uid None = not an ipop node,
                                              ip4 = the overlay address it announced (or None)
    listener.on_message(jid, msg)             a peer sent a (well-formed) SignalMessage
    listener.on_roster(jid, subscribed_both)  a contact was added, changed or removed

``jid`` in on_presence and on_message is the peer's full address (XMPP: ``user@domain/resource``);
reply to exactly that.  Callbacks run on the event loop and must not block.  The same ``online``
may be reported twice (e.g. after a reconnect): listeners must be idempotent.

Also here, because every backend needs them: a token bucket for the sending rate and a limiter
for log lines about misbehaving peers.  Both are pure (time comes in as an argument).
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, Protocol

from ipop.ratelimit import TokenBucket
from ipop.wire.signal import SignalMessage

__all__ = [
    "Contact",
    "LogLimiter",
    "SignalBackend",
    "SignalEvents",
    "SignalListener",
    "Subscription",
    "TokenBucket",
]

Subscription = Literal["none", "to", "from", "both"]


class SignalEvents(Protocol):
    """What a backend calls; implement all four (or subclass ``SignalListener``)."""

    def on_state(self, connected: bool, error: str | None) -> None: ...

    def on_presence(
        self, jid: str, uid: str | None, online: bool, ip4: str | None = None, *,
        ip6: str | None = None,
    ) -> None: ...

    def on_message(self, jid: str, msg: SignalMessage) -> None: ...

    def on_roster(self, jid: str, subscribed_both: bool) -> None: ...


class SignalListener:
    """A listener that ignores everything; override what you need."""

    def on_state(self, connected: bool, error: str | None) -> None:
        """The backend connected (error None) or lost/failed its connection (error says why)."""

    def on_presence(self, jid: str, uid: str | None, online: bool, ip4: str | None = None, *,
                    ip6: str | None = None) -> None:
        """``jid`` (full) came online with ``uid`` (and overlay ``ip4``, ``ip6``) or went
        offline.  Backends pass ``ip6`` only when the peer announced one."""

    def on_message(self, jid: str, msg: SignalMessage) -> None:
        """``jid`` (full) sent ``msg``."""

    def on_roster(self, jid: str, subscribed_both: bool) -> None:
        """Contact ``jid`` (bare) was added/changed (mutual subscription or not) or removed."""


@dataclass(frozen=True, slots=True)
class Contact:
    """One roster entry."""

    jid: str
    """Bare JID."""
    subscription: Subscription
    pending_out: bool = False
    """We asked to subscribe and have no answer yet."""
    name: str = ""
    groups: tuple[str, ...] = ()
    """Roster groups (a prosody mod_groups group shows up here)."""

    @property
    def mutual(self) -> bool:
        return self.subscription == "both"


class SignalBackend(abc.ABC):
    """A signaling service: XMPP for real, a loopback hub in tests."""

    def __init__(self, listener: SignalEvents) -> None:
        self.listener = listener
        self.drops: dict[str, int] = {}
        """Messages dropped, by reason (sending and receiving)."""
        self.last_refused: dict[str, str] | None = None
        """The last message refused as malformed: its sender and why (shown in status)."""

    def count_drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    @property
    @abc.abstractmethod
    def jid(self) -> str:
        """Our own address (full, once connected)."""

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect; returns once online.  Bad credentials raise ConfigError (no retry)."""

    @abc.abstractmethod
    async def send(self, peer_jid: str, msg: SignalMessage) -> bool:
        """Send ``msg``; False when it was dropped (rate limit, offline: see ``drops``)."""

    @abc.abstractmethod
    async def set_presence(self, uid: str, ip4: str | None = None,
                           ip6: str | None = None) -> None:
        """Announce ourselves as ipop node ``uid`` at overlay address ``ip4`` (and ``ip6``), now
        and after every reconnect.  Call it before ``connect()`` so no presence goes out
        without it."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Go offline and release everything; idempotent."""

    def roster(self) -> list[Contact]:
        """Our contacts (empty for backends without a roster)."""
        return []

    async def subscribe(self, jid: str) -> None:
        """Ask ``jid`` for a (mutual) presence subscription; for SocialVPN."""
        raise NotImplementedError(f"{type(self).__name__} has no subscriptions")

    async def unsubscribe(self, jid: str) -> None:
        """Drop ``jid`` from the roster, ending both subscriptions."""
        raise NotImplementedError(f"{type(self).__name__} has no subscriptions")


class LogLimiter:
    """Allow one log line per ``interval`` seconds per key (e.g. per sender); bounded memory."""

    def __init__(self, interval: float = 1.0, max_keys: int = 1024) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._last: OrderedDict[str, float] = OrderedDict()
        self.suppressed = 0

    def allow(self, key: str, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self.suppressed += 1
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        return True
