"""The underlay mark: ``SO_MARK`` on every underlay socket (data plane, ICE), so that a default
route through an exit node (``ipop.dataplane.kroutes``) never captures the links' own traffic.
Dependency-free, for the data plane and the NAT layer alike."""

from __future__ import annotations

import socket
from typing import Any

UNDERLAY_MARK = 0x6970  # "ip"


def mark_socket(sock: Any, mark: int = UNDERLAY_MARK) -> bool:
    """Put ``SO_MARK`` on a socket; False if refused (no CAP_NET_ADMIN)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    except (OSError, AttributeError):
        return False
    return True
