"""Limits on what signaling may make this node do (issue 16, part 3); pure, time passed in.

* ``InboundLimits``: con_req/con_resp admitted per sender (bare JID: an account's resources
  share one budget) and in all.  What is refused is counted by the caller under the reason
  this returns (``inbound_rate_limited_jid``, ``inbound_rate_limited_global``); an over-eager
  sender cannot use up the global budget, since its messages stop at its own bucket first.
* ``peer_address_problem``: a peer's overlay address must lie inside this node's overlay
  prefix and be neither this node's own address nor the prefix's network or broadcast address.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

from ipop.ratelimit import TokenBucket

__all__ = ["GLOBAL_BURST", "GLOBAL_RATE", "JID_BURST", "JID_RATE", "InboundLimits",
           "peer_address_problem"]

JID_RATE = 1.0  # con_req/con_resp a second from one account, after a burst of JID_BURST
JID_BURST = 6.0
GLOBAL_RATE = 30.0  # from everyone together (a 32-node group starting at once fits the burst)
GLOBAL_BURST = 64.0
MAX_SENDERS = 4096  # buckets kept (least recently used dropped): bounded memory


class InboundLimits:
    """Token buckets for inbound link requests, one per sender and one for all."""

    def __init__(self, *, jid_rate: float = JID_RATE, jid_burst: float = JID_BURST,
                 rate: float = GLOBAL_RATE, burst: float = GLOBAL_BURST) -> None:
        self.jid_rate = jid_rate
        self.jid_burst = jid_burst
        self._all = TokenBucket(rate, burst)
        self._by_sender: OrderedDict[str, TokenBucket] = OrderedDict()

    def admit(self, sender: str, now: float) -> str | None:
        """None when a message from ``sender`` (bare JID) may be handled now, else the counter
        it is dropped under."""
        bucket = self._by_sender.get(sender)
        if bucket is None:
            bucket = self._by_sender[sender] = TokenBucket(self.jid_rate, self.jid_burst)
            while len(self._by_sender) > MAX_SENDERS:
                self._by_sender.popitem(last=False)
        self._by_sender.move_to_end(sender)
        if not bucket.take(now):
            return "inbound_rate_limited_jid"
        if not self._all.take(now):
            return "inbound_rate_limited_global"
        return None


def peer_address_problem(addr: str, own: str, prefixlen: int) -> str | None:
    """Why ``addr`` cannot be a peer's overlay address in this node's ``own``/``prefixlen``
    network (IPv4 or IPv6), or None when it can."""
    try:
        ip = ipaddress.ip_address(addr)
        net = ipaddress.ip_interface(f"{own}/{prefixlen}").network
    except ValueError:
        return f"{addr!r} is not an IP address"
    if ip.version != net.version or ip not in net:
        return f"{addr} is outside the overlay prefix {net}"
    if ip == ipaddress.ip_address(own):
        return f"{addr} is this node's own address"
    if ip == net.network_address:
        return f"{addr} is the network address of {net}"
    if ip.version == 4 and net.prefixlen < 31 and ip == net.broadcast_address:
        return f"{addr} is the broadcast address of {net}"
    return None
