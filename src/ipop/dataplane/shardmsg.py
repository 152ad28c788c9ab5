"""The messages between the control process and its shard processes, checked on arrival.

The channel is a private ``AF_UNIX`` ``SOCK_SEQPACKET`` socket pair the control process makes
before it starts a shard (nobody else holds either end).  Each packet is one message: a 4-byte
big-endian length, then that many bytes of a JSON object whose ``op`` names it; bytes travel as
hex, file descriptors beside the packet (``SCM_RIGHTS``).  Every message is checked against its
schema before it is used: a malformed or unknown one raises ``MalformedMessage``, which the
receiver counts and logs, never a crash.

control -> shard::

    init    shard, shards, generation, uid, mtu, tap, offload, whole_trains,
            ip4, prefixlen, ip6 (the overlay: TAP source checks)    fds: TUN queue, socket
    link    peer, ip4, ip6, mac, encrypted, nets, trains_off, authed,
            addr, channel, kind, group                      fds: the path's socket unless group
    unlink  peer
    release dst, peer         (send the packets held for dst on the link to peer)
    keys    peer, suite, tx ({epoch, key, salt} or null), rx (list of them)
    stop

shard -> control::

    counters  tun_read_packets, tun_read_bytes, no_route, tun_written, drops, links
    miss      dst, packet         (no link for a destination: the shard holds the packets)
    roam      peer, host, port    (an authenticated frame came from a new address)
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable
from typing import Any

from ipop.errors import RemoteProtocolError

MAX_MESSAGE = 1 << 16
MAX_FDS = 4
_LEN = struct.Struct("!I")


class MalformedMessage(RemoteProtocolError):
    """A channel message that is not what its schema says."""


Check = Callable[[Any], bool]


def _int(lo: int, hi: int) -> Check:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _hex(lo: int, hi: int) -> Check:
    def check(v: Any) -> bool:
        if not isinstance(v, str) or not lo * 2 <= len(v) <= hi * 2:
            return False
        try:
            bytes.fromhex(v)
        except ValueError:
            return False
        return True
    return check


def _opt(inner: Check) -> Check:
    return lambda v: v is None or inner(v)


def _str(hi: int) -> Check:
    return lambda v: isinstance(v, str) and len(v) <= hi


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _list(inner: Check, hi: int) -> Check:
    return lambda v: isinstance(v, list) and len(v) <= hi and all(inner(x) for x in v)


def _counts(v: Any) -> bool:
    return (isinstance(v, dict) and len(v) <= 256
            and all(isinstance(k, str) and len(k) <= 64 and _int(0, 2**63)(c)
                    for k, c in v.items()))


_KEY = {"epoch": _int(0, 255), "key": _hex(32, 32), "salt": _hex(4, 4)}


def _key(v: Any) -> bool:
    return isinstance(v, dict) and set(v) == set(_KEY) and all(c(v[k]) for k, c in _KEY.items())


_LINK_STATS = {"tx_packets": _int(0, 2**63), "tx_bytes": _int(0, 2**63),
               "rx_packets": _int(0, 2**63), "rx_bytes": _int(0, 2**63),
               "rx_age": _opt(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                              and 0 <= v < 1e9),
               "rx_drops": _counts, "tx_drops": _counts}


def _link_stats(v: Any) -> bool:
    return (isinstance(v, dict) and len(v) <= 4096
            and all(_hex(20, 20)(peer) and isinstance(s, dict) and set(s) == set(_LINK_STATS)
                    and all(c(s[k]) for k, c in _LINK_STATS.items()) for peer, s in v.items()))


UID = _hex(20, 20)
SCHEMAS: dict[str, dict[str, Check]] = {
    "init": {"shard": _int(1, 7), "shards": _int(2, 8), "generation": _int(0, 255),
             "uid": UID, "mtu": _int(576, 9000), "tap": _bool, "offload": _bool,
             "whole_trains": _bool, "ip4": _str(15), "prefixlen": _int(0, 32),
             "ip6": _opt(_str(64))},
    "link": {"peer": UID, "ip4": _opt(_hex(4, 4)), "ip6": _opt(_hex(16, 16)),
             "mac": _opt(_hex(6, 6)), "encrypted": _bool,
             "nets": _list(_str(64), 256), "trains_off": _str(64), "authed": _bool,
             "host": _str(64), "port": _int(0, 65535), "channel": _opt(_int(0, 0xFFFF)),
             "kind": _str(16), "group": _bool},
    "unlink": {"peer": UID},
    "release": {"dst": _hex(4, 16), "peer": UID},
    "keys": {"peer": UID, "suite": _str(32), "tx": _opt(_key), "rx": _list(_key, 4)},
    "stop": {},
    "counters": {"tun_read_packets": _int(0, 2**63), "tun_read_bytes": _int(0, 2**63),
                 "no_route": _int(0, 2**63), "tun_written": _int(0, 2**63),
                 "drops": _counts, "links": _link_stats},
    "miss": {"dst": _hex(4, 16), "packet": _hex(1, 9000)},
    "roam": {"peer": UID, "host": _str(64), "port": _int(1, 65535)},
}
FDS = {"init": (1, 2), "link": (0, 1)}  # how many descriptors come with a message


def encode(msg: dict[str, Any]) -> bytes:
    """One message as it goes on the channel (checked: a bad one is a bug here)."""
    check(msg)
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) + _LEN.size > MAX_MESSAGE:
        raise ValueError(f"{msg['op']} message of {len(body)} bytes is too long")
    return _LEN.pack(len(body)) + body


def decode(data: bytes) -> dict[str, Any]:
    """The message in one channel packet; raises ``MalformedMessage``."""
    if len(data) < _LEN.size:
        raise MalformedMessage("message shorter than its length", reason="msg_truncated")
    (size,) = _LEN.unpack_from(data)
    if size != len(data) - _LEN.size:
        raise MalformedMessage(f"length {size} is not {len(data) - _LEN.size}",
                               reason="msg_length")
    try:
        msg = json.loads(data[_LEN.size:])
    except (ValueError, RecursionError):
        raise MalformedMessage("not JSON", reason="msg_json") from None
    check(msg)
    return dict(msg)


def check(msg: Any) -> None:
    """Raise ``MalformedMessage`` unless ``msg`` is a message its schema accepts."""
    if not isinstance(msg, dict):
        raise MalformedMessage("not an object", reason="msg_shape")
    op = msg.get("op")
    schema = SCHEMAS.get(op) if isinstance(op, str) else None
    if schema is None:
        raise MalformedMessage(f"unknown op {op!r}"[:80], reason="msg_unknown_op")
    if set(msg) != set(schema) | {"op"}:
        raise MalformedMessage(f"{op}: keys {sorted(msg)}"[:200], reason="msg_keys")
    for key, ok in schema.items():
        if not ok(msg[key]):
            raise MalformedMessage(f"{op}: bad {key}", reason="msg_value")


def fds_ok(op: str, count: int) -> bool:
    """Whether ``count`` descriptors may come with a message ``op``."""
    want = FDS.get(op, 0)
    return count in want if isinstance(want, tuple) else count == want


def send(chan: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = encode(msg)
    if fds:
        socket.send_fds(chan, [data], fds)
    else:
        chan.send(data)


def receive(chan: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The next message and its descriptors (the caller owns them); None when the other end
    closed.  A malformed message raises ``MalformedMessage`` after its descriptors are closed."""
    import os

    data, fds, flags, _ = socket.recv_fds(chan, MAX_MESSAGE, MAX_FDS)
    if not data and not fds:
        return None
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise MalformedMessage("message or descriptors cut", reason="msg_truncated")
        msg = decode(data)
        if not fds_ok(msg["op"], len(fds)):
            raise MalformedMessage(f"{msg['op']} with {len(fds)} descriptors", reason="msg_fds")
    except MalformedMessage:
        for fd in fds:
            os.close(fd)
        raise
    return msg, list(fds)
