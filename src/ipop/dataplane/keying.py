"""Keys for encrypted links: runs each link's DTLS handshakes on the control thread.

For every encrypted link it creates a ``CryptoSession`` (the DTLS client is the lower UID),
sends the handshake's datagrams on the link's own path, feeds it the DTLS datagrams the RX
thread hands up (first byte 20..63), ticks retransmissions and rekeys, and once the link is keyed
releases the packets that waited for keys.  Nothing meant for an encrypted link ever leaves in
plaintext: until ``session.ready`` the link queues (``Link.send_packet``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ipop.crypto.identity import Identity
from ipop.crypto.session import CryptoSession, is_client_for
from ipop.dataplane.link import Link
from ipop.errors import AuthError, IpopError

log = logging.getLogger("ipop.dataplane.keying")

LinkEvent = Callable[[bytes, str], None]  # (peer UID, "up" | "failed" | "mismatch")
KeysIn = Callable[[Link], None]  # a link has new keys (its first, or a rekey's)


class Keying:
    """The crypto sessions of one node's encrypted links."""

    def __init__(self, identity: Identity, *, rekey_seconds: float, on_event: LinkEvent,
                 on_keys: KeysIn | None = None) -> None:
        self.identity = identity
        self.rekey_seconds = rekey_seconds
        self.on_event = on_event
        self.on_keys = on_keys
        self.links: dict[bytes, Link] = {}
        self._ready: dict[bytes, bool] = {}
        self._failures_seen: dict[bytes, int] = {}
        self._mismatch_logged: set[bytes] = set()
        self.rekeys = 0  # handshakes completed after a link's first, over the node's life
        self._handshakes: dict[bytes, int] = {}

    def start(self, link: Link, fingerprint: str | None, now: float | None = None) -> None:
        """Give ``link`` a session and start keying it."""
        if fingerprint is None:
            raise IpopError(f"encrypted link to {link.peer_uid.hex()[:12]} needs the peer's "
                            "certificate fingerprint")
        now = time.monotonic() if now is None else now
        session = CryptoSession(
            self.identity, is_client=is_client_for(self.identity.uid, link.peer_uid),
            expected_fingerprint=fingerprint, expected_uid=link.peer_uid,
            rekey_seconds=self.rekey_seconds,
        )
        link.session = session
        self.links[link.peer_uid] = link
        self._ready[link.peer_uid] = False
        self._failures_seen[link.peer_uid] = 0
        self._handshakes[link.peer_uid] = 0
        self._send(link, session.start(now))

    def stop(self, link: Link) -> None:
        if self.links.get(link.peer_uid) is link:
            del self.links[link.peer_uid]
            self._ready.pop(link.peer_uid, None)
            self._failures_seen.pop(link.peer_uid, None)
            self._handshakes.pop(link.peer_uid, None)

    def on_dtls(self, peer_uid: bytes | None, data: bytes, now: float | None = None) -> bool:
        """A DTLS datagram from the path of ``peer_uid``'s link; True when it was handled."""
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
        for link in self.links.values():
            session = link.session
            if isinstance(session, CryptoSession) and (session.handshaking or not session.ready):
                return True
        return False

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
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

    def _check(self, link: Link, now: float) -> None:
        session = link.session
        assert isinstance(session, CryptoSession)
        uid = link.peer_uid
        seen = self._handshakes.get(uid, 0)
        if session.handshakes > seen:
            self.rekeys += session.handshakes - max(seen, 1)
            self._handshakes[uid] = session.handshakes
            if self.on_keys is not None:  # frames the peer sealed before we had these keys
                self.on_keys(link)
        if session.ready and not self._ready.get(uid):
            self._ready[uid] = True
            sent = link.flush_pending()
            log.info("link %s keyed (%s); %d queued packets sent", uid.hex()[:12],
                     session.keys.suite.value if session.keys else "?", sent)
            self.on_event(uid, "up")
        failures = sum(session.handshake_failures.values())
        if failures > self._failures_seen.get(uid, 0):
            self._failures_seen[uid] = failures
            err: AuthError | None = session.last_failure
            for reason, count in session.handshake_failures.items():
                link.stats.drops[f"handshake_{reason}"] = count
            log.warning("link %s: handshake failed: %s", uid.hex()[:12], err)
            self.on_event(uid, "failed")

    @staticmethod
    def _send(link: Link, datagrams: list[bytes]) -> None:
        if not link.path.addr[1]:
            return  # a road-warrior peer whose address is not known yet: nowhere to send
        for d in datagrams:
            link.send_frame([d])
