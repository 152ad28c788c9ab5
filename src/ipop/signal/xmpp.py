"""The XMPP signaling backend (slixmpp): login, visible reconnects, UID presence, signal messages.

    connect() -> attempt ─ok─> session: fetch roster, send presence(uid), on_state(True)
                   │ unreachable/timeout: log "xmpp: cannot reach HOST:PORT (why); retrying in Ns",
                   │                      on_state(False, why), sleep 1,2,4,5,5.. s (each
                   │                      jittered to 50-100 %), attempt again
                   │ wrong password / untrusted cert / no usable SASL: raise ConfigError, no retry
    session lost (server restart, 2 pings in a row unanswered while the server sent nothing else)
        -> on_state(False, why), log, wait 0.5-1.5 s, the same loop again

- Presence: ``<presence><status>ipop UID</status>
  <ipop xmlns="urn:ipop:0" uid=".." ip4=".." ip6=".."/>``;
  a contact's available/unavailable presence becomes ``on_presence(full_jid, uid, online, ip4=)``
  (and ``ip6=`` when it announced one; ``ip6`` is optional, older peers ignore it).
  After a reconnect, contacts not heard of again within ``presence_settle`` s are reported offline.
- Who counts: with ``group`` set, roster contacts in that roster group (prosody's mod_groups puts
  every member of a ``groups_file`` group in each member's roster with subscription "both");
  without it, every contact with a mutual subscription (SocialVPN).  Other resources of our own
  account count too.  ``accept_from="any"`` turns the filter off.  Messages from anyone else are
  dropped (``drops["not_in_roster"]``).
- Subscriptions: ``subscribe(jid)`` adds the contact, asks for its presence and pre-approves its
  request; a request from a contact already in our roster is accepted, others are left unanswered.
  ``on_roster(bare_jid, mutual)`` reports each change.
- Messages: ``SignalMessage`` JSON in the body of "chat"/"normal" messages (with a no-store hint).
  Malformed bodies are counted and logged at most once a second per sender.  Sending goes through
  a token bucket (``send_rate``/``send_burst``); excess is dropped (``drops["send_rate"]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import re
import secrets
import ssl
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ipop.errors import ConfigError, MalformedMessage
from ipop.signal.base import Contact, LogLimiter, SignalBackend, SignalEvents, TokenBucket
from ipop.wire.signal import SignalMessage

__all__ = ["IPOP_NS", "TlsMode", "XmppSettings", "XmppSignal"]

log = logging.getLogger("ipop.signal.xmpp")

IPOP_NS = "urn:ipop:0"
TlsMode = Literal["starttls", "direct", "none"]
_UID_RE = re.compile(r"[0-9a-f]{40}")
_SHOW = frozenset({"available", "chat", "away", "xa", "dnd"})


@dataclass(frozen=True)
class XmppSettings:
    """What the XMPP backend needs from the node config (names in brackets are config keys)."""

    jid: str
    """Bare account JID, ``alice@ipop.test`` [xmpp_username]."""
    password: str
    """[xmpp_password]"""
    host: str
    """Server address or name to connect to [xmpp_host]."""
    port: int = 5222
    """[xmpp_port]"""
    tls: TlsMode = "starttls"
    """[xmpp_tls] "starttls" (port 5222 upgraded), "direct" (TLS from the first byte) or "none"
    (plaintext, SCRAM without TLS: tests and closed networks only)."""
    ca_cert: Path | None = None
    """[xmpp_ca_cert] PEM CA or the server's own self-signed certificate, to pin."""
    group: str | None = None
    """[group] Only roster contacts in this roster group are peers (GroupVPN)."""
    resource: str | None = None
    """XMPP resource; default ``ipop-`` + 8 random hex digits."""
    accept_from: Literal["roster", "any"] = "roster"
    send_rate: float = 20.0
    """Messages per second we send at most (token bucket refill)."""
    send_burst: float = 40.0
    keepalive_seconds: float = 60.0
    """Ping the server this often; no answer within half of it means the session is dead."""
    connect_timeout: float = 10.0
    """One attempt (TCP, TLS, SASL, bind) gets this long."""
    max_backoff: float = 5.0
    """Reconnect attempts back off 1, 2, 4 s up to this, each wait jittered (50-100 %), so a
    restarted server is neither waited on long nor stampeded by every node at once."""
    keepalive_misses: int = 2
    """Unanswered pings in a row before the session counts as dead (one late answer from a
    busy node or server is not a dead stream)."""
    presence_settle: float = 5.0

    def check(self) -> None:
        """Raise ConfigError naming the bad key."""
        user, at, domain = self.jid.partition("@")
        if not (user and at and domain) or "/" in self.jid or any(c.isspace() for c in self.jid):
            raise ConfigError("xmpp_username", f"not a bare JID (alice@example.org): {self.jid!r}")
        if not self.password:
            raise ConfigError("xmpp_password", "empty")
        if not self.host:
            raise ConfigError("xmpp_host", "empty")
        if not 0 < self.port < 65536:
            raise ConfigError("xmpp_port", f"not a port: {self.port}")
        if self.tls not in ("starttls", "direct", "none"):
            raise ConfigError("xmpp_tls", f'not "starttls", "direct" or "none": {self.tls!r}')
        if self.ca_cert is not None and not Path(self.ca_cert).is_file():
            raise ConfigError("xmpp_ca_cert", f"no such file: {self.ca_cert}")


def _describe(exc: object) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # "Connection refused", not asyncio's "Connect call failed"
    return str(exc) or type(exc).__name__


def _ip6(text: str) -> str | None:
    try:
        return str(ipaddress.IPv6Address(text)) if 0 < len(text) <= 45 else None
    except ValueError:
        return None


def _ip4(text: str) -> str | None:
    try:
        return str(ipaddress.IPv4Address(text)) if 0 < len(text) <= 15 else None
    except ValueError:
        return None


def _cert_rejected(exc: object) -> bool:
    return isinstance(exc, ssl.SSLCertVerificationError) or (
        isinstance(exc, ssl.SSLError) and exc.reason == "CERTIFICATE_VERIFY_FAILED"
    )


class XmppSignal(SignalBackend):
    """Signaling over one XMPP account."""

    def __init__(self, settings: XmppSettings, listener: SignalEvents) -> None:
        super().__init__(listener)
        settings.check()
        self.settings = settings
        self._resource = settings.resource or f"ipop-{secrets.token_hex(4)}"
        self._client: Any = None
        self._uid: str | None = None
        self._ip4: str | None = None
        self._ip6: str | None = None
        self._session_up = False
        self._closing = False
        self._silent = False  # login_once: log in without presence
        self._attempt: asyncio.Future[str | None] | None = None
        self._lost = asyncio.Event()
        self._last_error: str | None = None
        self._seen_at = 0.0  # monotonic time the server last sent us a stanza
        self._tasks: set[asyncio.Task[None]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[Any] | None = None
        self._stale_timer: asyncio.TimerHandle | None = None
        self._contacts: dict[str, Contact] = {}
        # full jid: (uid, ip4, ip6)
        self._online: dict[str, tuple[str | None, str | None, str | None]] = {}
        self._stale: set[str] = set()
        self._pending_roster: list[tuple[str, bool]] = []
        self._bucket = TokenBucket(settings.send_rate, settings.send_burst)
        self._log_limit = LogLimiter(1.0)
        self.sent = 0
        self.received = 0

    # -- public API ---------------------------------------------------------------------------
    @property
    def jid(self) -> str:
        if self._client is not None and self._session_up:
            return str(self._client.boundjid.full)
        return f"{self.settings.jid}/{self._resource}"

    @property
    def connected(self) -> bool:
        return self._session_up

    @property
    def _where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    async def connect(self) -> None:
        if self._supervisor is not None or self._connecting is not None:
            return
        self._closing = False
        self._lost.clear()
        self._client = self._make_client()
        self._connecting = asyncio.current_task()
        try:
            await self._establish()
        except BaseException:
            self._abort_client()
            raise
        finally:
            self._connecting = None
        self._supervisor = asyncio.create_task(self._supervise(), name="xmpp-supervisor")

    async def login_once(self) -> str | None:
        """One login attempt, then log out (``ipop netcheck``): None when a session came up,
        else why not (unreachable, timeout).  A wrong password, an untrusted certificate or no
        usable login raise ConfigError naming the key, as ``connect`` does."""
        self._closing = False
        self._silent = True  # no presence: group members never see this login
        self._client = self._make_client()
        try:
            why = await self._attempt_once()
        except BaseException:
            self._abort_client()
            raise
        if why is None:
            await self.close()
        return why

    async def set_presence(self, uid: str, ip4: str | None = None,
                           ip6: str | None = None) -> None:
        if _UID_RE.fullmatch(uid) is None:
            raise ConfigError("uid", f"not 40 lower-case hex digits: {uid!r}")
        if ip4 is not None and _ip4(ip4) is None:
            raise ConfigError("ip4", f"not an IPv4 address: {ip4!r}")
        if ip6 is not None and _ip6(ip6) is None:
            raise ConfigError("ip6", f"not an IPv6 address: {ip6!r}")
        self._uid, self._ip4, self._ip6 = uid, ip4, ip6
        if self._session_up:
            self._send_presence()

    async def send(self, peer_jid: str, msg: SignalMessage) -> bool:
        if not self._session_up:
            self.count_drop("not_connected")
            return False
        now = asyncio.get_running_loop().time()
        if not self._bucket.take(now):
            self.count_drop("send_rate")
            if self._log_limit.allow("\0send_rate", now):
                log.warning("xmpp: sending faster than %.0f/s; dropping", self.settings.send_rate)
            return False
        body = msg.to_json()  # LocalProtocolError here is our bug: let it rise
        from slixmpp.jid import JID, InvalidJID

        try:
            to = JID(peer_jid)
        except InvalidJID:
            self.count_drop("bad_jid")
            return False
        stanza = self._client.make_message(mto=to, mbody=body, mtype="chat")
        stanza.xml.append(ET.Element("{urn:xmpp:hints}no-store"))
        stanza.send()
        self.sent += 1
        return True

    async def close(self) -> None:
        self._closing = True
        was_up = self._session_up
        connecting = self._connecting
        if connecting is not None and connecting is not asyncio.current_task():
            connecting.cancel()  # a connect() still retrying elsewhere ends with CancelledError
        tasks = [*self._tasks, *([self._supervisor] if self._supervisor else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._supervisor = None
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        client, self._session_up = self._client, False
        if client is not None and was_up:
            with contextlib.suppress(Exception):
                client.send_presence(ptype="unavailable")
                await asyncio.wait_for(client.disconnect(wait=1.0), 2.0)
        self._abort_client()
        if was_up:
            self.listener.on_state(False, None)

    def roster(self) -> list[Contact]:
        return sorted(self._contacts.values(), key=lambda c: c.jid)

    async def subscribe(self, jid: str) -> None:
        await self._roster_op(jid, True)

    async def unsubscribe(self, jid: str) -> None:
        await self._roster_op(jid, False)

    # -- connection management ------------------------------------------------------------------
    def _make_client(self) -> Any:
        from slixmpp import ClientXMPP

        from ipop.signal import scram

        scram.install()  # SCRAM's 10,000 PBKDF2 rounds in C, not a Python loop
        s = self.settings
        plugin_config: dict[str, dict[str, Any]] = {}
        extra: dict[str, Any] = {}
        if s.tls == "none":
            plugin_config["feature_mechanisms"] = {"unencrypted_scram": True}
            # no TLS: skip loading the system's CA store (about 30 ms of CPU) for a context
            # that is never used
            extra["ssl_context"] = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client = ClientXMPP(f"{s.jid}/{self._resource}", s.password, plugin_config=plugin_config,
                            **extra)
        client.enable_plaintext = s.tls == "none"
        client.enable_starttls = s.tls == "starttls"
        client.enable_direct_tls = s.tls == "direct"
        if s.ca_cert is not None:
            client.ca_certs = Path(s.ca_cert)
        client.auto_authorize = None
        client.auto_subscribe = False
        client.whitespace_keepalive = False
        client.register_plugin("xep_0199")
        client.exception = self._client_exception  # type: ignore[method-assign]
        for event, handler in (
            ("connection_failed", self._ev_connection_failed),
            ("ssl_invalid_chain", self._ev_invalid_cert),
            ("failed_auth", self._ev_failed_auth),
            ("no_auth", self._ev_no_auth),
            ("session_start", self._ev_session_start),
            ("stream_negotiated", self._ev_stream_negotiated),
            ("disconnected", self._ev_disconnected),
            ("stream_error", self._ev_stream_error),
            ("presence", self._ev_presence),
            ("presence_subscribe", self._ev_subscribe_request),
            ("message", self._ev_message),
            ("message_error", self._ev_message_error),
            ("roster_update", self._ev_roster_push),
        ):
            client.add_event_handler(event, handler)
        return client

    def _client_exception(self, exc: Exception) -> None:
        log.error("xmpp: error in a stanza handler: %r", exc, exc_info=exc)

    def _abort_client(self) -> None:
        client = self._client
        if client is None:
            return
        client.cancel_connection_attempt()
        if client.transport is not None:
            client.abort()

    async def _establish(self) -> None:
        """Attempt until a session is up, with visible exponential backoff."""
        s = self.settings
        backoff = 1.0
        while True:
            why = await self._attempt_once()
            if why is None:
                return
            wait = backoff * random.uniform(0.5, 1.0)
            log.warning("xmpp: cannot reach %s (%s); retrying in %.1fs", self._where, why, wait)
            self.listener.on_state(False, f"cannot reach {self._where} ({why})")
            await asyncio.sleep(wait)
            backoff = min(backoff * 2, s.max_backoff)

    async def _attempt_once(self) -> str | None:
        """One connection attempt: None when the session is up, else why it failed."""
        s = self.settings
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._attempt = fut
        self._last_error = None
        self._client.connect(s.host, s.port)
        try:
            why = await asyncio.wait_for(fut, s.connect_timeout)
        except TimeoutError:
            why = f"no session within {s.connect_timeout:g} s"
        except ConfigError:
            self._abort_client()
            raise
        finally:
            self._attempt = None
        if why is None:
            try:
                await self._session_setup()
            except Exception as exc:  # IqTimeout/IqError from slixmpp, a lost stream
                why = f"session setup failed: {_describe(exc)}"
        if why is not None:
            self._session_up = False
            self._abort_client()
        return why

    def _resolve(self, why: str | None = None, error: ConfigError | None = None) -> bool:
        fut = self._attempt
        if fut is None or fut.done():
            return False
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(why)
        return True

    async def _session_setup(self) -> None:
        await self._load_roster()
        self._session_up = True
        self._stale = set(self._online)
        loop = asyncio.get_running_loop()
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        self._stale_timer = loop.call_later(self.settings.presence_settle, self._expire_stale)
        if not self._silent:
            self._send_presence()
        pending, self._pending_roster = self._pending_roster, []
        for jid, add in pending:
            await self._roster_op(jid, add)
        log.info("xmpp: online as %s via %s (tls %s)", self.jid, self._where, self.settings.tls)
        self.listener.on_state(True, None)
        task = asyncio.create_task(self._keepalive(), name="xmpp-keepalive")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _supervise(self) -> None:
        while True:
            await self._lost.wait()
            self._lost.clear()
            if self._closing:
                return
            why = self._last_error or "closed"
            wait = random.uniform(0.5, 1.5)
            log.warning("xmpp: connection to %s lost (%s); reconnecting in %.1fs", self._where,
                        why, wait)
            await asyncio.sleep(wait)
            try:
                await self._establish()
            except ConfigError as exc:
                log.error("xmpp: %s; not reconnecting", exc)
                self.listener.on_state(False, str(exc))
                return

    async def _keepalive(self) -> None:
        from slixmpp.exceptions import IqError, IqTimeout

        period = self.settings.keepalive_seconds
        misses = 0
        while True:
            await asyncio.sleep(period * random.uniform(0.9, 1.1))
            if not self._session_up:
                return
            sent = time.monotonic()
            try:
                await self._client.plugin["xep_0199"].ping(timeout=max(period / 2, 1.0))
                misses = 0
                continue
            except IqError:
                misses = 0  # an error reply is still a reply: the stream is alive
                continue
            except IqTimeout:
                pass
            if self._seen_at > sent:
                misses = 0  # the server spoke meanwhile: slow, not dead
                continue
            misses += 1
            if misses < self.settings.keepalive_misses:
                log.info("xmpp: server did not answer a ping (%d of %d)", misses,
                         self.settings.keepalive_misses)
                continue
            log.warning("xmpp: server did not answer %d pings; dropping the connection", misses)
            self._last_error = "ping timeout"
            self._client.abort()
            return

    # -- slixmpp events: connection ---------------------------------------------------------------
    def _ev_connection_failed(self, exc: Any) -> None:
        self._client.cancel_connection_attempt()  # we retry ourselves, visibly
        if _cert_rejected(exc):
            self._ev_invalid_cert(exc)
            return
        self._resolve(why=_describe(exc))

    def _refuse(self, key: str, text: str) -> None:
        """End the current attempt with a ConfigError: retrying would not help."""
        self._resolve(error=ConfigError(key, text))

    def _ev_invalid_cert(self, exc: Any) -> None:
        why = getattr(exc, "verify_message", None) or _describe(exc)
        hint = "" if self.settings.ca_cert else "; pin the server's certificate with xmpp_ca_cert"
        self._refuse("xmpp_ca_cert", f"{self._where}: server certificate not trusted ({why}){hint}")
        if self._client.transport is not None:
            self._client.abort()

    def _ev_failed_auth(self, stanza: Any) -> None:
        cond = stanza["condition"] if stanza is not None else "?"
        self._refuse(
            "xmpp_password",
            f"authentication failed for {self.settings.jid} ({cond}); check xmpp_username and "
            "xmpp_password",
        )

    def _ev_no_auth(self, _event: Any) -> None:
        self._refuse(
            "xmpp_tls",
            f'{self._where} offers no login usable with xmpp_tls = "{self.settings.tls}" '
            "(does the server offer STARTTLS?)",
        )

    def _ev_stream_negotiated(self, _event: Any) -> None:
        if not self._client.authenticated:  # features done, yet no SASL: it wants TLS first
            self._refuse(
                "xmpp_tls",
                f'{self._where} offers no login before TLS (xmpp_tls = "{self.settings.tls}"); '
                'use "starttls" or "direct"',
            )

    def _ev_session_start(self, _event: Any) -> None:
        self._resolve(None)

    def _ev_stream_error(self, error: Any) -> None:
        self._last_error = f"stream error {error['condition']}"

    def _ev_disconnected(self, reason: Any) -> None:
        if self._attempt is not None and _cert_rejected(reason):
            self._ev_invalid_cert(reason)  # a STARTTLS handshake that failed verification
            return
        why = self._last_error or (_describe(reason) if reason else "connection closed")
        if self._resolve(why=why):
            return
        if self._session_up:
            self._session_up = False
            self._last_error = why
            self.listener.on_state(False, why)
            self._lost.set()

    # -- presence ---------------------------------------------------------------------------------
    def _send_presence(self) -> None:
        pres = self._client.make_presence()
        if self._uid is not None:
            pres["status"] = f"ipop {self._uid}"
            attrs = {"uid": self._uid} | ({"ip4": self._ip4} if self._ip4 else {}) | (
                {"ip6": self._ip6} if self._ip6 else {})
            pres.xml.append(ET.Element(f"{{{IPOP_NS}}}ipop", attrs))
        pres.send()

    def _allowed(self, bare: str) -> bool:
        if self.settings.accept_from == "any" or bare == self.settings.jid:
            return True
        contact = self._contacts.get(bare)
        if contact is None or contact.subscription != "both":
            return False
        return self.settings.group is None or self.settings.group in contact.groups

    @staticmethod
    def _ipop_of(pres: Any) -> tuple[str | None, str | None, str | None]:
        """(uid, ip4, ip6) announced in a presence; None for what is missing or malformed."""
        elem = pres.xml.find(f"{{{IPOP_NS}}}ipop")
        uid = elem.get("uid", "") if elem is not None else ""
        ip4 = _ip4(elem.get("ip4", "")) if elem is not None else None
        ip6 = _ip6(elem.get("ip6", "")) if elem is not None else None
        if not uid:
            status = str(pres["status"] or "")
            uid = status[5:] if status.startswith("ipop ") else ""
        uid = uid.lower()
        return (uid if _UID_RE.fullmatch(uid) else None), ip4, ip6

    def _ev_presence(self, pres: Any) -> None:
        self._seen_at = time.monotonic()
        frm = pres["from"]
        full = str(frm)
        ptype = pres["type"]
        if full == str(self._client.boundjid.full) or not frm.resource:
            return
        if ptype == "unavailable":
            if full in self._online:
                self._stale.discard(full)
                self._notify_presence(full, self._online.pop(full), False)
            return
        if ptype not in _SHOW or not self._allowed(frm.bare):
            return
        seen = self._ipop_of(pres)
        fresh = self._online.get(full) != seen or full in self._stale
        self._online[full] = seen
        self._stale.discard(full)
        if fresh:
            self._notify_presence(full, seen, True)

    def _expire_stale(self) -> None:
        self._stale_timer = None
        for full in sorted(self._stale):
            self._notify_presence(full, self._online.pop(full, (None, None, None)), False)
        self._stale.clear()

    def _notify_presence(self, full: str, seen: tuple[str | None, str | None, str | None],
                         on: bool) -> None:
        try:
            if seen[2] is None:
                self.listener.on_presence(full, seen[0], on, ip4=seen[1])
            else:
                self.listener.on_presence(full, seen[0], on, ip4=seen[1], ip6=seen[2])
        except Exception:
            log.exception("xmpp: on_presence(%s) failed", full)

    # -- messages ---------------------------------------------------------------------------------
    def _ev_message(self, stanza: Any) -> None:
        self._seen_at = time.monotonic()
        if stanza["type"] not in ("chat", "normal"):
            return
        body = stanza["body"]
        if not body:
            return
        frm = stanza["from"]
        full, bare = str(frm), frm.bare
        now = asyncio.get_running_loop().time()
        if not self._allowed(bare):
            self.count_drop("not_in_roster")
            if self._log_limit.allow(full, now):
                log.info("xmpp: ignored a message from %s (not a peer in our roster)", full)
            return
        try:
            msg = SignalMessage.parse(body)
        except MalformedMessage as exc:
            self.count_drop(exc.reason)
            self.last_refused = {"from": full, "reason": str(exc)}
            if self._log_limit.allow(full, now):
                log.warning("xmpp: ignored a malformed message from %s: %s", full, exc)
            return
        self.received += 1
        try:
            self.listener.on_message(full, msg)
        except Exception:
            log.exception("xmpp: on_message from %s failed", full)

    def _ev_message_error(self, stanza: Any) -> None:
        self.count_drop("bounced")
        full = str(stanza["from"])
        if self._log_limit.allow(full, asyncio.get_running_loop().time()):
            log.info("xmpp: %s did not take our message (%s)", full, stanza["error"]["condition"])

    # -- roster -----------------------------------------------------------------------------------
    @staticmethod
    def _contact(jid: str, item: dict[str, Any]) -> Contact:
        sub = item.get("subscription")
        return Contact(
            jid=jid,
            subscription=sub if sub in ("to", "from", "both") else "none",
            pending_out=item.get("ask") == "subscribe",
            name=str(item.get("name") or ""),
            groups=tuple(sorted(str(g) for g in item.get("groups") or ())),
        )

    async def _load_roster(self) -> None:
        iq = self._client.make_iq_get(queryxmlns="jabber:iq:roster")
        resp = await iq.send(timeout=self.settings.connect_timeout)
        items = resp["roster"]["items"]
        fresh = {str(jid): self._contact(str(jid), item) for jid, item in items.items()}
        fresh = {j: c for j, c in fresh.items() if items[j].get("subscription") != "remove"}
        self._apply_roster(fresh, removed=set(self._contacts) - set(fresh))

    def _ev_roster_push(self, iq: Any) -> None:
        if iq["type"] != "set":
            return
        changed: dict[str, Contact] = {}
        removed: set[str] = set()
        for jid, item in iq["roster"]["items"].items():
            if item.get("subscription") == "remove":
                removed.add(str(jid))
            else:
                changed[str(jid)] = self._contact(str(jid), item)
        self._apply_roster(changed, removed)

    def _apply_roster(self, changed: dict[str, Contact], removed: set[str]) -> None:
        events: list[tuple[str, bool]] = []
        for jid in sorted(removed):
            if self._contacts.pop(jid, None) is not None:
                events.append((jid, False))
        for jid, contact in sorted(changed.items()):
            old = self._contacts.get(jid)
            self._contacts[jid] = contact
            if old is None or old.mutual != contact.mutual:
                events.append((jid, contact.mutual))
        for jid, mutual in events:
            try:
                self.listener.on_roster(jid, mutual)
            except Exception:
                log.exception("xmpp: on_roster(%s) failed", jid)
        for full in [f for f in self._online if not self._allowed(f.partition("/")[0])]:
            self._stale.discard(full)  # no longer a peer: gone, whatever its presence says
            self._notify_presence(full, self._online.pop(full), False)

    def _ev_subscribe_request(self, pres: Any) -> None:
        bare = pres["from"].bare
        if bare in self._contacts:
            self._client.send_presence(pto=bare, ptype="subscribed")
            log.info("xmpp: accepted the subscription request of %s", bare)
        else:
            log.info("xmpp: left the subscription request of %s unanswered (not in roster)", bare)

    async def _roster_op(self, jid: str, add: bool) -> None:
        from slixmpp.jid import JID, InvalidJID

        try:
            bare = JID(jid).bare
        except InvalidJID:
            raise ConfigError("jid", f"not a JID: {jid!r}") from None
        if not self._session_up:
            self._pending_roster.append((bare, add))
            return
        client = self._client
        iq = client.make_iq_set()
        iq["roster"]["items"] = {bare: {"subscription": "remove"} if add is False else {}}
        await iq.send(timeout=self.settings.connect_timeout)
        if add:
            client.send_presence(pto=bare, ptype="subscribe")
            client.send_presence(pto=bare, ptype="subscribed")  # pre-approve (RFC 6121 3.4)
