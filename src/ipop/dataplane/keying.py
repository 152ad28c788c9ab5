"""Every link's DTLS handshake, run on the control thread: identities proven, verdict confirmed.

For every link, plain or encrypted, it creates a ``CryptoSession`` (the DTLS client is the lower
UID), sends the handshake's datagrams on the link's own path, feeds it the DTLS datagrams the RX
thread hands up (first byte 20..63) and ticks retransmissions (and, on encrypted links, rekeys).
The handshake proves that the peer holds the key whose hash is its UID and the certificate whose
fingerprint signaling carried, and confirms the security verdict (``ipop.crypto.verdict``): a
verdict that signaling changed on the way fails it with ``downgrade_detected``.

Only then does the link carry data (``Link.authed``): until that moment both kinds of link queue
what they would send, and the poll thread drops plain frames.  An encrypted link then seals with
the exported keys; a plain link sends frames without AEAD, so it costs no per-packet crypto.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ipop.crypto.dtls import initial_rto
from ipop.crypto.identity import Identity
from ipop.crypto.session import CryptoSession, is_client_for
from ipop.crypto.verdict import Confirmation
from ipop.dataplane.link import Link
from ipop.dataplane.link_tx import send_keepalive
from ipop.errors import AuthError, IpopError
from ipop.wire import keepalive as wk

log = logging.getLogger("ipop.dataplane.keying")

PLAIN_REKEY_SECONDS = 10.0 * 365 * 86400
# (peer UID, "up" | "failed" | "mismatch" | "replaced" | "beside_failed")
LinkEvent = Callable[[bytes, str], None]
KeysIn = Callable[[Link], None]  # a link has new keys (its first, or a rekey's)
SourceKey = tuple[int, tuple[str, int], int | None]


class Keying:
    """The handshakes of one node's links, and of new links proven beside working ones.

    A new link to a peer whose link works is built *beside* it (``start(..., beside=True)``):
    it is not in the forwarding table, its DTLS datagrams are told apart by their path, and only
    once its handshake proved the same UID does ``on_promote`` put it in the table in place of
    the old link (event ``replaced``).  A beside handshake that fails (``beside_failed``) leaves
    the old link as it was.  ``on_keys`` hears of every link's new keys (its first, or a
    rekey's), so frames the peer sealed before them can be replayed."""

    def __init__(self, identity: Identity, *, rekey_seconds: float, on_event: LinkEvent,
                 on_promote: Callable[[Link], None] | None = None,
                 on_keys: KeysIn | None = None) -> None:
        self.identity = identity
        self.rekey_seconds = rekey_seconds
        self.on_event = on_event
        self.on_promote = on_promote
        self.on_keys = on_keys
        self.links: dict[bytes, Link] = {}
        self.beside: dict[bytes, Link] = {}
        self._beside_paths: dict[SourceKey, bytes] = {}
        self._ready: dict[bytes, bool] = {}
        self._failures_seen: dict[bytes, int] = {}
        self._mismatch_logged: set[bytes] = set()
        self.rekeys = 0  # handshakes completed after a link's first, over the node's life
        self._handshakes: dict[bytes, int] = {}
        self._opened: set[bytes] = set()
        self.beside_failure = ""  # the reason of the last beside handshake that failed

    def start(self, link: Link, fingerprint: str | None, now: float | None = None, *,
              confirmation: Confirmation | None = None, beside: bool = False) -> None:
        """Give ``link`` a session and start its handshake; ``confirmation``: the verdict and
        its inputs to confirm (default: no signaling, only the verdict); ``beside``: the link
        is not in the table, a working link to the same peer is (see the class)."""
        if fingerprint is None:
            raise IpopError(f"link to {link.peer_uid.hex()[:12]} needs the peer's certificate "
                            "fingerprint (every link proves its peer in a DTLS handshake)")
        now = time.monotonic() if now is None else now
        if confirmation is None:
            confirmation = self.static_confirmation(link.peer_uid, link.encrypted)
        session = CryptoSession(
            self.identity, is_client=is_client_for(self.identity.uid, link.peer_uid),
            expected_fingerprint=fingerprint, expected_uid=link.peer_uid,
            # a plain link needs no new keys: its handshake proves the peer once
            rekey_seconds=self.rekey_seconds if link.encrypted else PLAIN_REKEY_SECONDS,
            confirmation=confirmation,
            first_rto=initial_rto(link.path.rtt_ms),
        )
        link.authed = False
        link.session = session
        if beside:
            self.stop_beside(link.peer_uid)
            self.beside[link.peer_uid] = link
            self._beside_paths[link.path.source_key] = link.peer_uid
            self._send(link, session.start(now))
            return
        self.links[link.peer_uid] = link
        self._ready[link.peer_uid] = False
        self._opened.discard(link.peer_uid)
        self._failures_seen[link.peer_uid] = 0
        self._handshakes[link.peer_uid] = 0
        self._send(link, session.start(now))

    def static_confirmation(self, peer_uid: bytes, encrypt: bool) -> Confirmation:
        """What a link made without signaling (a static peer, ``create_link``) confirms: no
        signaled inputs, only the verdict, so two ends that disagree refuse the link."""
        me = self.identity.uid
        client, server = (me, peer_uid) if is_client_for(me, peer_uid) else (peer_uid, me)
        return Confirmation(client, server, None, None, encrypt)

    def stop(self, link: Link) -> None:
        if self.links.get(link.peer_uid) is link:
            del self.links[link.peer_uid]
            self._ready.pop(link.peer_uid, None)
            self._failures_seen.pop(link.peer_uid, None)
            self._handshakes.pop(link.peer_uid, None)
            self._opened.discard(link.peer_uid)

    def set_rekey_seconds(self, seconds: float) -> None:
        """A reload changed ``rekey_seconds``: new encrypted links and every running one rekey
        at the new interval."""
        self.rekey_seconds = seconds
        for link in self.links.values():
            if link.encrypted and isinstance(link.session, CryptoSession):
                link.session.rekey_seconds = seconds

    def rekey(self, link: Link, now: float | None = None) -> None:
        """Start a new handshake on ``link`` at once, if this end is its DTLS client (a static
        peer that restarted asks for one with a hello); the link keeps working meanwhile."""
        session = link.session
        if self.links.get(link.peer_uid) is link and isinstance(session, CryptoSession):
            self._send(link, session.rekey(time.monotonic() if now is None else now))

    def stop_beside(self, peer_uid: bytes) -> Link | None:
        """Forget the link being proven beside ``peer_uid``'s working one, if any."""
        link = self.beside.pop(peer_uid, None)
        if link is not None:
            link.closed = True
            self._beside_paths = {k: u for k, u in self._beside_paths.items() if u != peer_uid}
        return link

    def on_dtls(self, peer_uid: bytes | None, data: bytes, now: float | None = None, *,
                source: SourceKey | None = None) -> bool:
        """A DTLS datagram from the path of ``peer_uid``'s link, or (``source``) from the path of
        a link being proven beside one; True when it was handled."""
        beside_uid = self._beside_paths.get(source) if source is not None else None
        if beside_uid is not None:
            new = self.beside[beside_uid]
            assert isinstance(new.session, CryptoSession)
            now = time.monotonic() if now is None else now
            self._send(new, new.session.handle_handshake_datagram(data, now))
            self._check_beside(new)
            return True
        if peer_uid is None:
            return False
        link = self.links.get(peer_uid)
        if link is None or not isinstance(link.session, CryptoSession):
            return False
        now = time.monotonic() if now is None else now
        self._send(link, link.session.handle_handshake_datagram(data, now))
        self._check(link, now)
        return True

    def busy(self) -> bool:
        """A link waits for keys or is rekeying: its handshake wants sub-second ticks."""
        for link in (*self.links.values(), *self.beside.values()):
            session = link.session
            if isinstance(session, CryptoSession) and (session.handshaking or not session.ready):
                return True
        return False

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for link in list(self.beside.values()):
            if isinstance(link.session, CryptoSession):
                self._send(link, link.session.tick(now))
                self._check_beside(link)
        for link in list(self.links.values()):
            session = link.session
            if not isinstance(session, CryptoSession):
                continue
            self._send(link, session.tick(now))
            self._check(link, now)

    def watch_plain(self, links: tuple[Link, ...]) -> None:
        """Log (once per link) when the two ends of a link disagree about encryption."""
        for link in links:
            drops = link.stats.drops
            odd = drops.get("sealed_on_plain_link", 0) + drops.get(
                "plaintext_on_encrypted_link", 0)
            if odd and link.peer_uid not in self._mismatch_logged:
                self._mismatch_logged.add(link.peer_uid)
                mine = "encrypted" if link.encrypted else "plain"
                theirs = "plain" if link.encrypted else "encrypted"
                log.warning("link %s: this end is %s but the peer sends %s frames; check both "
                            "ends' sec settings", link.peer_uid.hex()[:12], mine, theirs)
                self.on_event(link.peer_uid, "mismatch")

    def _check_beside(self, link: Link) -> None:
        """A beside link proven: it replaces the old one; failed: it goes, the old one stays."""
        session = link.session
        assert isinstance(session, CryptoSession)
        uid = link.peer_uid
        if session.ready:
            self.stop_beside(uid)
            link.closed = False
            old = self.links.get(uid)
            if old is not None:
                self.stop(old)
            if self.on_promote is not None:
                self.on_promote(link)  # into the forwarding table, in place of the old link
            self.links[uid] = link
            self._ready[uid] = False
            self._failures_seen[uid] = 0
            self._handshakes[uid] = session.handshakes
            log.info("link %s: the new link proved the same UID; it replaces the old one",
                     uid.hex()[:12])
            self.on_event(uid, "replaced")
            self._check(link, time.monotonic())
        elif sum(session.handshake_failures.values()):
            for reason, count in session.handshake_failures.items():
                link.stats.handshake_drops[f"handshake_{reason}"] = count
            log.warning("link %s: a new link failed its handshake (%s); the working link stays",
                        uid.hex()[:12], session.last_failure)
            self.beside_failure = session.last_failure.reason if session.last_failure else ""
            self.stop_beside(uid)
            self.on_event(uid, "beside_failed")

    def confirmed(self, peer_uid: bytes) -> None:
        """The peer of a plain link sent a frame after our handshake (the poll thread saw it)."""
        link = self.links.get(peer_uid)
        if link is not None and self._ready.get(peer_uid):
            self._open(link)

    def _open(self, link: Link) -> None:
        """The link may carry data: release what waited, and say so (once per link)."""
        uid = link.peer_uid
        if uid in self._opened:
            return
        self._opened.add(uid)
        link.authed = True
        sent = link.tx.flush_pending()
        session = link.session
        if link.encrypted:
            keys = session.keys if isinstance(session, CryptoSession) else None
            log.info("link %s keyed (%s); %d queued packets sent", uid.hex()[:12],
                     keys.suite.value if keys else "?", sent)
        else:
            # a frame at once, so the peer (if it is the DTLS server) learns that we are done
            send_keepalive(link, wk.OP_PROBE, time.monotonic_ns())
            log.info("link %s: peer proven, plain verdict confirmed; %d queued packets sent",
                     uid.hex()[:12], sent)
        self.on_event(uid, "up")

    def _check(self, link: Link, now: float) -> None:
        session = link.session
        assert isinstance(session, CryptoSession)
        uid = link.peer_uid
        seen = self._handshakes.get(uid, 0)
        if session.handshakes > seen:
            self.rekeys += session.handshakes - max(seen, 1)
            self._handshakes[uid] = session.handshakes
            if seen and not link.encrypted and session.is_client and link.authed:
                # a new handshake on a working plain link: a frame at once, so the peer (the
                # DTLS server, waiting for proof that we finished) may send again
                send_keepalive(link, wk.OP_PROBE, time.monotonic_ns())
            if self.on_keys is not None:  # frames the peer sealed before we had these keys
                self.on_keys(link)
        if session.ready and not self._ready.get(uid):
            self._ready[uid] = True
            if link.encrypted or session.is_client or link.authed:
                self._open(link)
            # else: a plain link's DTLS server finished first; it sends once the client's first
            # frame shows that the client finished too (``confirmed``)
        failures = sum(session.handshake_failures.values())
        if failures > self._failures_seen.get(uid, 0):
            self._failures_seen[uid] = failures
            err: AuthError | None = session.last_failure
            for reason, count in session.handshake_failures.items():
                link.stats.handshake_drops[f"handshake_{reason}"] = count
            log.warning("link %s: handshake failed: %s", uid.hex()[:12], err)
            self.on_event(uid, "failed")

    @staticmethod
    def _send(link: Link, datagrams: list[bytes]) -> None:
        if not link.path.addr[1]:
            return  # a road-warrior peer whose address is not known yet: nowhere to send
        for d in datagrams:
            link.tx.send_frame([d])
