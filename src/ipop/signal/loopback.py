"""An in-memory signaling service: a hub shared by several nodes in one event loop, for fast tests.

    hub = LoopbackHub()                         # everyone sees everyone (a GroupVPN group)
    a = hub.backend("alice@ipop.test", listener_a)
    b = hub.backend("bob@ipop.test", listener_b)
    await a.connect(); await a.set_presence(uid_a)
    await b.connect(); await b.set_presence(uid_b)   # a.on_presence("bob@…", uid_b, True), and back
    await a.send("bob@ipop.test", msg)               # b.on_message("alice@…", msg), next loop turn

With ``LoopbackHub(open_roster=False)`` nodes see each other only after both ``subscribe()`` to the
other (SocialVPN's mutual subscriptions), and ``on_roster`` reports the changes.

Every event is delivered with ``loop.call_soon`` (never inside the caller's stack), in order.
Messages go through ``to_json``/``parse`` as on a real server.  ``hub.drop(jid)`` simulates the
service dropping a node (its on_state(False, …), peers see it offline); ``connect`` brings it back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ipop.errors import ConfigError, MalformedMessage
from ipop.signal.base import Contact, SignalBackend, SignalEvents, Subscription
from ipop.wire.signal import SignalMessage

__all__ = ["LoopbackHub", "LoopbackSignal"]


class LoopbackHub:
    """The shared "server".  ``sent`` records every delivered (from, to, message)."""

    def __init__(self, *, open_roster: bool = True) -> None:
        self.open_roster = open_roster
        self.nodes: dict[str, LoopbackSignal] = {}
        self.subscriptions: set[tuple[str, str]] = set()
        """(a, b): a has asked for b's presence (a added b)."""
        self.sent: list[tuple[str, str, SignalMessage]] = []

    def backend(self, jid: str, listener: SignalEvents) -> LoopbackSignal:
        if jid in self.nodes:
            raise ConfigError("xmpp_username", f"loopback: {jid} already has a backend")
        node = LoopbackSignal(self, jid, listener)
        self.nodes[jid] = node
        return node

    def mutual(self, a: str, b: str) -> bool:
        return (a, b) in self.subscriptions and (b, a) in self.subscriptions

    def visible(self, a: str, b: str) -> bool:
        """Whether a and b see each other's presence and may message each other."""
        return a != b and (self.open_roster or self.mutual(a, b))

    def online(self) -> list[LoopbackSignal]:
        return [n for n in self.nodes.values() if n.connected]

    def drop(self, jid: str, reason: str = "dropped by the loopback hub") -> None:
        """Cut ``jid`` off the service as a server crash would."""
        node = self.nodes[jid]
        if node.connected:
            node._go_offline(error=reason)

    # -- internals used by LoopbackSignal ----------------------------------------------------
    def _announce(self, node: LoopbackSignal, online: bool) -> None:
        for other in self.online():
            if self.visible(node.jid, other.jid):
                other._present_to(node, online)

    def _roster_changed(self, a: str, b: str, before: bool) -> None:
        """Subscriptions between a and b changed; tell both and fix presence."""
        after = self.mutual(a, b)
        if before == after:
            return
        na, nb = self.nodes.get(a), self.nodes.get(b)
        for me, peer in ((na, nb), (nb, na)):
            if me is None or not me.connected:
                continue
            other = b if me.jid == a else a
            me._post(me.listener.on_roster, other, after)
            if not self.open_roster and peer is not None and peer.connected and peer.uid:
                me._present_to(peer, after)


class LoopbackSignal(SignalBackend):
    """One node's view of a LoopbackHub."""

    def __init__(self, hub: LoopbackHub, jid: str, listener: SignalEvents) -> None:
        super().__init__(listener)
        self.hub = hub
        self._jid = jid
        self.uid: str | None = None
        self.ip4: str | None = None
        self.ip6: str | None = None
        self.connected = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def jid(self) -> str:
        return self._jid

    def _post(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop or asyncio.get_running_loop()
        loop.call_soon(fn, *args)

    def _present_to(self, other: LoopbackSignal, online: bool) -> None:
        """Tell our listener about ``other``'s presence."""
        loop = self._loop or asyncio.get_running_loop()
        listener, jid, uid, ip4, ip6 = self.listener, other.jid, other.uid, other.ip4, other.ip6
        if ip6 is None:
            loop.call_soon(lambda: listener.on_presence(jid, uid, online, ip4=ip4))
        else:
            loop.call_soon(lambda: listener.on_presence(jid, uid, online, ip4=ip4, ip6=ip6))

    async def connect(self) -> None:
        if self.connected:
            return
        self._loop = asyncio.get_running_loop()
        self.connected = True
        self._post(self.listener.on_state, True, None)
        if self.uid is not None:
            self._present()

    def _present(self) -> None:
        self.hub._announce(self, True)
        for other in self.hub.online():
            if other.uid is not None and self.hub.visible(self.jid, other.jid):
                self._present_to(other, True)

    async def set_presence(self, uid: str, ip4: str | None = None,
                           ip6: str | None = None) -> None:
        first = self.uid is None
        self.uid, self.ip4, self.ip6 = uid, ip4, ip6
        if self.connected:
            if first:
                self._present()
            else:
                self.hub._announce(self, True)

    async def send(self, peer_jid: str, msg: SignalMessage) -> bool:
        peer = self.hub.nodes.get(peer_jid)
        if not self.connected:
            self.count_drop("not_connected")
            return False
        if peer is None or not peer.connected or not self.hub.visible(self.jid, peer_jid):
            self.count_drop("no_route")
            return False
        try:
            copy = SignalMessage.parse(msg.to_json())
        except MalformedMessage:  # pragma: no cover - to_json output always parses
            self.count_drop("malformed")
            return False
        self.hub.sent.append((self.jid, peer_jid, copy))
        peer._post(peer.listener.on_message, self.jid, copy)
        return True

    def _go_offline(self, error: str | None) -> None:
        self.connected = False
        self.hub._announce(self, False)
        self._post(self.listener.on_state, False, error)

    async def close(self) -> None:
        if self.connected:
            self._go_offline(error=None)

    def roster(self) -> list[Contact]:
        hub, me = self.hub, self.jid
        out: list[Contact] = []
        for other in sorted(hub.nodes):
            if other == me:
                continue
            to, frm = (me, other) in hub.subscriptions, (other, me) in hub.subscriptions
            if hub.open_roster:
                to = frm = True
            if to or frm:
                sub: Subscription = "both" if to and frm else "to" if to else "from"
                out.append(Contact(jid=other, subscription=sub))
        return out

    async def subscribe(self, jid: str) -> None:
        before = self.hub.mutual(self.jid, jid)
        self.hub.subscriptions.add((self.jid, jid))
        self.hub._roster_changed(self.jid, jid, before)

    async def unsubscribe(self, jid: str) -> None:
        before = self.hub.mutual(self.jid, jid)
        self.hub.subscriptions.discard((self.jid, jid))
        self.hub.subscriptions.discard((jid, self.jid))
        self.hub._roster_changed(self.jid, jid, before)
