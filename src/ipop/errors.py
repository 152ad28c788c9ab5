"""The one exception tree of ipop.

    IpopError
    ├── ConfigError          a bad configuration value; ``key`` names it (exit status 2)
    ├── LocalProtocolError   we were about to send something malformed (a bug on our side)
    ├── RemoteProtocolError  a peer sent something malformed; counted and dropped, never fatal
    │   ├── MalformedFrame   an overlay datagram that does not parse
    │   ├── MalformedMessage a signaling or control-API message that does not parse
    │   └── AuthError        a frame or handshake that fails authentication or replay checks
    ├── IdentityError        the node's key material is missing, unreadable or inconsistent
    ├── StateLockedError     another node already runs on this state_dir
    └── EnvironmentFault     the machine lacks something we need (TUN, netns, a binary)

Every parser of peer input raises only ``RemoteProtocolError`` subclasses: a bare
``ValueError``/``IndexError``/``struct.error`` escaping one is a bug.  Each error carries a short
``reason`` slug used as the key of the drop counters (``drops: {reason: count}``).
"""

from __future__ import annotations


class IpopError(Exception):
    """Base of every error ipop raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(IpopError):
    """A configuration value is wrong; ``key`` names it."""

    reason = "config"

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config: {message}" if key == "config" else f"config: {key}: {message}")
        self.key = key


class LocalProtocolError(IpopError):
    """We tried to build something the protocol does not allow."""

    reason = "local_protocol"


class RemoteProtocolError(IpopError):
    """A peer sent something malformed: count it, drop it, carry on."""

    reason = "malformed"


class MalformedFrame(RemoteProtocolError):
    """An overlay datagram that does not parse."""

    reason = "malformed_frame"


class MalformedMessage(RemoteProtocolError):
    """A signaling or control message that does not parse."""

    reason = "malformed_message"


class AuthError(RemoteProtocolError):
    """Authentication, fingerprint or replay check failed."""

    reason = "auth"


class IdentityError(IpopError):
    """The node's key pair or certificate is unusable."""

    reason = "identity"


class StateLockedError(IpopError):
    """Another node holds the lock on this state_dir."""

    reason = "locked"


class EnvironmentFault(IpopError):
    """The machine lacks a facility ipop needs (TUN, netns, a program)."""

    reason = "environment"
