"""Shards: with ``workers: N`` the data plane runs as N shards, one per core.

Shard 0 is the data plane in the control process (``DataPlane``), which also keeps signaling,
ICE, DTLS, keepalives, policy and on-demand misses.  Shards 1..N-1 are child processes
(``python -m ipop.dataplane.shards FD``, started with ``subprocess`` and the descriptors they
need, never a fork of the threaded control process).  Each has:

- its own TUN queue (the device is opened with ``IFF_MULTI_QUEUE``, ``tun.open_queues``): the
  kernel puts every flow's outbound packets on one queue, by its flow hash;
- its own UDP socket on the listen port, in the reuseport group whose steering program
  (``ipop.dataplane.steering``) hands it the frames whose type byte names a sending shard ``s``
  with ``s % N`` = its number;
- its own ``DataPlane`` (poll thread, TUN writer, buffers), its own copy of every link (sending
  with its shard number in the type byte, ``ipop.wire.header``) and its own cipher objects.

So a flow stays on one shard at each end, and keeps its order.

The control process pushes links, paths, routes (a link's ``nets``) and keys over a private
channel (``ipop.dataplane.shardmsg``) whenever they change (every ``tick``, and at once when a
link gets keys), and the shards report their counters every second, which ``ipop status`` and
the metrics add up.  A shard reports a packet for a destination it has no link for to the
control process, which pushes the link (or asks for one, on demand, as today); the shard holds
such packets meanwhile and sends them on its own copy of the link once it has it, so a flow
never changes shards (which could reorder it at the receiver).

Keys, nonces and replay windows.  Every shard seals with the link's keys, in its own counter
range: the counter's top byte is the shard's number (``ipop.crypto.aead``), and the next byte the
shard's generation (how often it was restarted), so no two shards and no two lives of one shard
ever use a nonce twice.  A receiver keeps one replay window per (link, epoch, sending shard) in
each shard.  That is enough because each such stream is accepted by exactly one shard:

- a link on the steered port: only shard ``s % N`` takes sending shard ``s``'s frames (the
  kernel steers them there by the authenticated shard bits; a copy sent to any other socket of
  the node, or with other bits, is dropped as ``wrong_shard`` or fails its tag);
- any other link (ICE's sockets, TURN relays): only shard 0 receives its frames.  Shards may send
  on any path's socket (a duplicate descriptor of it), so relayed links and ICE's socket
  take-over keep working, but relayed and ICE links are received by shard 0 alone;
- a shard gets a link's receive keys only while the link is on the steered port; when a link
  moves onto it, the control process asks for a new handshake (the shards open only frames under
  keys made after the move);
- a shard that died is restarted with the same TUN queue and socket (the control process holds
  its own copies, so the queue and reuseport indexes never shift), gets only receive keys made
  after its start (its fresh windows can never accept a frame sealed before), and every
  encrypted link is asked to rekey: at once where this end is the DTLS client, by a sealed
  ``OP_REKEY`` keepalive where it is the server.

With ``workers: 1`` none of this runs: the data plane is the single in-process one.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ipop.crypto.aead import OVERHEAD, Opener, Sealer, Suite
from ipop.dataplane import shardmsg as sm
from ipop.dataplane import tun
from ipop.errors import AuthError, LocalProtocolError, RemoteProtocolError
from ipop.ratelimit import TokenBucket

log = logging.getLogger("ipop.dataplane.shards")

REPORT_SECONDS = 1.0
RESTART_GAP = 1.0  # seconds at least between two starts of one shard
GENERATION_SHIFT = 48  # the counter's second byte: the shard's generation
MAX_GENERATION = 255
# packets a shard holds per destination it has no link for, until the control process pushes
# the link (or makes one, on demand) and says where they go (``release``)
SHARD_HOLD = 64


# ---------------------------------------------------------------- keys in a shard process
class ShardSession:
    """A link's keys in a shard process: what the control process's ``CryptoSession`` made,
    pushed as they change.  Seals in this shard's counter range (its number, its generation);
    opens with a replay window per sending shard (``Opener``)."""

    def __init__(self, shard: int, generation: int) -> None:
        self.shard = shard
        self.first = generation << GENERATION_SHIFT
        self._sealer: Sealer | None = None
        self._openers: dict[int, Opener] = {}

    @property
    def ready(self) -> bool:
        return self._sealer is not None

    @property
    def awaiting_keys(self) -> bool:
        # a frame under an epoch not pushed yet is held briefly (``LinkReceiver.early``) and
        # opened once the keys arrive; the hold is bounded in count and time
        return True

    def install(self, suite: Suite, tx: dict[str, Any] | None,
                rx: list[dict[str, Any]]) -> None:
        """The keys the control process uses now (a tx key seen before keeps its Sealer)."""
        old = self._sealer
        if tx is None:
            self._sealer = None
        elif old is None or old.key != bytes.fromhex(tx["key"]) or old.epoch != tx["epoch"]:
            self._sealer = Sealer(bytes.fromhex(tx["key"]), bytes.fromhex(tx["salt"]),
                                  tx["epoch"], suite, shard=self.shard, first_counter=self.first)
        openers: dict[int, Opener] = {}
        for k in rx:
            have = self._openers.get(k["epoch"])
            if have is not None and have.key == bytes.fromhex(k["key"]):
                openers[k["epoch"]] = have  # its windows go on
            else:
                openers[k["epoch"]] = Opener(bytes.fromhex(k["key"]), bytes.fromhex(k["salt"]),
                                             k["epoch"], suite)
        self._openers = openers

    def seal(self, aad: bytes, plaintext: bytes | bytearray | memoryview) -> bytes:
        sealer = self._sealer
        if sealer is None:
            raise LocalProtocolError("link has no keys in this shard", reason="not_ready")
        return sealer.seal(aad, plaintext)

    def seal_into(self, aad: bytes, plaintext: memoryview, out: bytearray) -> memoryview:
        sealer = self._sealer
        if sealer is None:
            raise LocalProtocolError("link has no keys in this shard", reason="not_ready")
        return sealer.seal_into(aad, plaintext, out)

    def open(self, aad: bytes | memoryview, sealed: bytes | memoryview,
             out: bytearray | memoryview | None = None) -> bytes | memoryview:
        if len(sealed) < OVERHEAD:
            raise AuthError("sealed payload truncated", reason="truncated")
        opener = self._openers.get(sealed[0])
        if opener is None:
            raise AuthError(f"no keys for epoch {sealed[0]}", reason="unknown_epoch")
        return opener.open(aad, sealed, out)


# ---------------------------------------------------------------- the shard process
class ShardProcess:
    """What runs in a shard process: a ``DataPlane`` on its TUN queue and socket, kept in
    step with the control process over the channel."""

    def __init__(self, chan: socket.socket, init: dict[str, Any], fds: list[int]) -> None:
        from ipop.dataplane.facade import DataPlane

        self.chan = chan
        self.shard = int(init["shard"])
        self.shards = int(init["shards"])
        self.generation = int(init["generation"])
        self.bad_messages: collections.Counter[str] = collections.Counter()
        self._log_bucket = TokenBucket(1.0, 5)
        self.calls: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            collections.deque())
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        offload = bool(init["offload"])
        dev = tun.Device(fd=fds[0], name="shard", tap=bool(init["tap"]), vnet_hdr=offload)
        self.dp = DataPlane(
            uid=bytes.fromhex(init["uid"]), interface="", ip4=init["ip4"],
            prefixlen=int(init["prefixlen"]), ip6=init["ip6"],
            mtu=int(init["mtu"]), tap=bool(init["tap"]), ondemand_queue=SHARD_HOLD, offload=offload,
            whole_trains=bool(init["whole_trains"]), on_event=self._on_event,
            call_soon=self._call_soon, queue=dev, shard=self.shard,
        )
        self.sock: socket.socket | None = None
        group: frozenset[int] = frozenset()
        if len(fds) > 1:
            self.sock = socket.socket(fileno=fds[1])
            self.dp.adopt_socket(self.sock, owned=True, gro=False)
            group = frozenset({self.sock.fileno()})
        self.dp.inbound.steer = (self.shards, self.shard, group)
        self.path_socks: dict[bytes, socket.socket] = {}  # a link's path, not the group's

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.calls.append((fn, args))
        try:
            os.write(self._wake_w, b"c")
        except OSError:
            pass

    def _on_event(self, ev: Any) -> None:
        if ev.kind == "unknown_destination":
            self._send({"op": "miss", "dst": ev.data["dst"].hex(),
                        "packet": bytes(ev.data["packet"]).hex()})
        elif ev.kind == "roamed":
            host, port = ev.data["addr"][:2]
            self._send({"op": "roam", "peer": ev.data["peer_uid"].hex(), "host": str(host),
                        "port": int(port)})

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            sm.send(self.chan, msg)
        except (OSError, ValueError, sm.MalformedMessage) as exc:
            if self._log_bucket.take(time.monotonic()):
                log.warning("shard %d: cannot report %s: %s", self.shard, msg["op"], exc)

    def run(self) -> None:
        self.dp.start()
        sel = selectors.DefaultSelector()
        sel.register(self.chan, selectors.EVENT_READ, "chan")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        next_report = time.monotonic() + REPORT_SECONDS
        try:
            while True:
                timeout = max(0.0, next_report - time.monotonic())
                for key, _ in sel.select(timeout):
                    if key.data == "wake":
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                    elif not self._read_channel():
                        return
                while self.calls:
                    fn, args = self.calls.popleft()
                    fn(*args)
                now = time.monotonic()
                if now >= next_report:
                    next_report = now + REPORT_SECONDS
                    self._send(self.report())
        finally:
            self.dp.close()

    def _read_channel(self) -> bool:
        """Handle one message; False when the control process is gone or said stop."""
        try:
            got = sm.receive(self.chan)
        except sm.MalformedMessage as exc:
            self.bad_messages[exc.reason] += 1
            if self._log_bucket.take(time.monotonic()):
                log.warning("shard %d: bad message from the control process: %s", self.shard,
                            exc)
            return True
        except OSError:
            return False
        if got is None:
            return False
        msg, fds = got
        try:
            return self.handle(msg, fds)
        except (ValueError, RemoteProtocolError, LocalProtocolError) as exc:
            self.bad_messages["msg_apply"] += 1
            for fd in fds:
                os.close(fd)
            if self._log_bucket.take(time.monotonic()):
                log.warning("shard %d: cannot apply %s: %s", self.shard, msg["op"], exc)
            return True

    def handle(self, msg: dict[str, Any], fds: list[int]) -> bool:
        op = msg["op"]
        dp = self.dp
        if op == "stop":
            return False
        if op == "link":
            self._link(msg, fds)
        elif op == "unlink":
            peer = bytes.fromhex(msg["peer"])
            dp.remove_link(peer)
            old = self.path_socks.pop(peer, None)
            if old is not None:
                old.close()
        elif op == "release":
            dst = bytes.fromhex(msg["dst"])
            dp.release_held(dst, dp.link(bytes.fromhex(msg["peer"])))
        elif op == "keys":
            link = dp.link(bytes.fromhex(msg["peer"]))
            if link is not None and isinstance(link.session, ShardSession):
                link.session.install(Suite(msg["suite"]), msg["tx"], msg["rx"])
                dp.release_early(link)
                if link.usable:
                    link.tx.flush_pending()  # what this shard read before it had the keys
        else:
            self.bad_messages["msg_unexpected"] += 1
            for fd in fds:
                os.close(fd)
        return True

    def _link(self, msg: dict[str, Any], fds: list[int]) -> None:
        from ipop.dataplane.link import Path
        from ipop.wire.prefixes import parse_prefix

        dp = self.dp
        peer = bytes.fromhex(msg["peer"])
        addr = (msg["host"], msg["port"])
        if msg["group"]:
            if self.sock is None or fds:
                raise ValueError("a steered path in a shard without the steered socket")
            sock = self.sock
        else:
            if len(fds) != 1:
                raise ValueError("a path on another socket needs its descriptor")
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(False)
        old_sock = self.path_socks.pop(peer, None)
        if not msg["group"]:
            self.path_socks[peer] = sock
        path = Path(sock, addr, msg["channel"], msg["kind"])
        nets = tuple(parse_prefix(n) for n in msg["nets"])
        link = dp.link(peer)
        spec = (msg["encrypted"], msg["ip4"], msg["ip6"], msg["mac"], msg["trains_off"])
        if link is None or getattr(link, "shard_spec", None) != spec:
            ip4 = str(ipaddress.IPv4Address(bytes.fromhex(msg["ip4"]))) if msg["ip4"] else None
            ip6 = str(ipaddress.IPv6Address(bytes.fromhex(msg["ip6"]))) if msg["ip6"] else None
            link = dp.add_link(
                peer_uid=peer, path=path, ip4=ip4, ip6=ip6,
                mac=bytes.fromhex(msg["mac"]) if msg["mac"] else None,
                encrypted=msg["encrypted"], security_reason="shard",
                session=ShardSession(self.shard, self.generation) if msg["encrypted"] else None,
                peer_trains=not msg["trains_off"], nets=nets, serve_path=False,
            )
            link.shard_spec = spec  # type: ignore[attr-defined]
        else:
            dp.set_path(peer, path, serve=False)
            if nets != link.nets:
                dp.set_link_nets(peer, nets)
        link.authed = msg["authed"]
        if link.usable:
            link.tx.flush_pending()  # what this shard read before the link was proven
        if old_sock is not None and old_sock is not sock:
            old_sock.close()

    def report(self) -> dict[str, Any]:
        now = time.monotonic()
        c = self.dp.counters()
        drops = {k: int(v) for k, v in c["drops"].items()}
        for k, v in self.bad_messages.items():
            drops[k] = drops.get(k, 0) + v
        links = {}
        for link in self.dp.links:
            st = link.stats
            rx_drops = {k: int(v) for k, v in st.rx_drops.items()}
            links[link.peer_uid.hex()] = {
                "tx_packets": st.tx_packets, "tx_bytes": st.tx_bytes,
                "rx_packets": st.rx_packets, "rx_bytes": st.rx_bytes,
                # (the poll thread may have heard the peer since ``now`` was read)
                "rx_age": round(max(0.0, now - st.last_rx_mono), 3) if st.rx_packets else None,
                "rx_drops": rx_drops, "tx_drops": {k: int(v) for k, v in st.tx_drops.items()},
            }
        return {"op": "counters", "tun_read_packets": int(c["tun_read_packets"]),
                "tun_read_bytes": int(c["tun_read_bytes"]), "no_route": int(c["no_route"]),
                "tun_written": int(c["tun_written"]), "drops": drops, "links": links}


def main(argv: list[str] | None = None) -> int:
    """``python -m ipop.dataplane.shards FD``: run one shard on the channel ``FD``."""
    from ipop import logs

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m ipop.dataplane.shards CHANNEL_FD", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format=logs.TEXT_FORMAT if hasattr(
        logs, "TEXT_FORMAT") else "%(asctime)s %(levelname)s %(name)s: %(message)s")
    chan = socket.socket(fileno=int(args[0]))
    chan.setblocking(True)
    try:
        got = sm.receive(chan)
    except sm.MalformedMessage as exc:
        log.error("shard: bad init message: %s", exc)
        return 2
    if got is None or got[0]["op"] != "init":
        log.error("shard: the control process sent no init")
        return 2
    msg, fds = got
    proc = ShardProcess(chan, msg, fds)
    proc.run()
    return 0


# ---------------------------------------------------------------- the control process's side
@dataclass
class _Child:
    """One shard process as the control process sees it."""

    index: int
    queue: tun.Device
    sock: socket.socket | None
    generation: int = 0
    proc: subprocess.Popen[bytes] | None = None
    chan: socket.socket | None = None
    started: float = 0.0
    restarts: int = 0
    pushed: dict[bytes, tuple[Any, ...]] = field(default_factory=dict)
    keys: dict[bytes, tuple[Any, ...]] = field(default_factory=dict)
    # receive keys that existed when this life of the shard began (never pushed to it)
    stale: dict[bytes, list[Opener]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    alive: bool = False


class ShardManager:
    """The control process's side: starts, feeds, watches and restarts shards 1..N-1.

    All methods but the watcher thread's run on the control thread; the watcher thread
    (``ipop-shards``) only reads the channels and hands each message to the control thread
    through ``call_soon``."""

    def __init__(self, dp: Any, shards: int, queues: list[tun.Device],
                 socks: list[socket.socket | None], group_fds: frozenset[int], *,
                 on_rekey: Callable[[Any], None] | None = None) -> None:
        self.dp = dp
        self.shards = shards
        self.group_fds = group_fds
        self.on_rekey = on_rekey
        self.children = [_Child(i + 1, q, s) for i, (q, s) in enumerate(zip(queues, socks,
                                                                              strict=True))]
        self.bad_messages: collections.Counter[str] = collections.Counter()
        self._log_bucket = TokenBucket(1.0, 5)
        self._sel = selectors.DefaultSelector()
        self._sel_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self.stopping = False
        self.thread = threading.Thread(target=self._watch, name="ipop-shards", daemon=True)

    # ---- life cycle (control thread)
    def start(self) -> None:
        for child in self.children:
            self._spawn(child)
        self.thread.start()

    def _spawn(self, child: _Child) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                   else "")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ipop.dataplane.shards", str(child_end.fileno())],
            pass_fds=[child_end.fileno()], env=env, stdin=subprocess.DEVNULL)
        child_end.close()
        child.proc, child.chan = proc, parent_end
        child.started = time.monotonic()
        child.pushed.clear()
        child.keys.clear()
        child.alive = True
        fds = [child.queue.fd] + ([child.sock.fileno()] if child.sock is not None else [])
        dp = self.dp
        sm.send(parent_end, {
            "op": "init", "shard": child.index, "shards": self.shards,
            "generation": child.generation, "uid": dp.uid.hex(), "mtu": dp.mtu,
            "tap": dp.tap, "offload": dp.dev.vnet_hdr, "whole_trains": dp.whole_trains,
            "ip4": dp.ip4, "prefixlen": dp.prefixlen, "ip6": dp.ip6,
        }, fds)
        with self._sel_lock:
            self._sel.register(parent_end, selectors.EVENT_READ, child)
        os.write(self._wake_w, b"w")
        log.info("shard %d started (pid %d, generation %d)", child.index, proc.pid,
                 child.generation)
        self.sync(child)

    def stop(self) -> None:
        self.stopping = True
        for child in self.children:
            if child.chan is not None:
                try:
                    sm.send(child.chan, {"op": "stop"})
                except OSError:
                    pass
        for child in self.children:
            if child.proc is not None:
                try:
                    child.proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait(timeout=3)
            if child.chan is not None:
                child.chan.close()
            child.queue.close()
            if child.sock is not None:
                child.sock.close()
        os.write(self._wake_w, b"x")
        if self.thread.is_alive():
            self.thread.join(timeout=2)
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ---- the watcher thread
    def _watch(self) -> None:
        while not self.stopping:
            with self._sel_lock:
                ready = self._sel.select(timeout=1.0) if self._sel.get_map() else []
            for key, _ in ready:
                child = key.data
                if child is None:
                    try:
                        os.read(self._wake_r, 64)
                    except OSError:
                        pass
                    continue
                chan = key.fileobj
                assert isinstance(chan, socket.socket)
                try:
                    got = sm.receive(chan)
                except sm.MalformedMessage as exc:
                    self.dp.call_soon(self._bad, child, exc)
                    continue
                except OSError:
                    got = None
                if got is None:
                    with self._sel_lock:
                        self._sel.unregister(chan)
                    self.dp.call_soon(self._died, child, chan)
                    continue
                msg, fds = got
                for fd in fds:  # shards send no descriptors
                    os.close(fd)
                self.dp.call_soon(self._handle, child, msg)

    # ---- messages from shards (control thread)
    def _bad(self, child: _Child, exc: RemoteProtocolError) -> None:
        self.bad_messages[exc.reason] += 1
        if self._log_bucket.take(time.monotonic()):
            log.warning("shard %d: bad message: %s", child.index, exc)

    def _handle(self, child: _Child, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "counters":
            child.report = msg
            for link in self.dp.links:
                st = msg["links"].get(link.peer_uid.hex())
                if st is None:
                    link.stats.shards.pop(child.index, None)
                    continue
                link.stats.shards[child.index] = st
                if st["rx_age"] is not None:
                    heard = time.monotonic() - st["rx_age"] - REPORT_SECONDS
                    if heard > link.stats.shard_rx_mono:
                        link.stats.shard_rx_mono = heard
        elif op == "miss":
            dst = bytes.fromhex(msg["dst"])
            link = self.dp.on_shard_miss(dst, bytes.fromhex(msg["packet"]))
            if link is not None and child.alive and child.chan is not None:
                self.sync(only=child)  # the link first, if the shard lacks it
                try:  # then where what it holds goes
                    sm.send(child.chan, {"op": "release", "dst": msg["dst"],
                                         "peer": link.peer_uid.hex()})
                except OSError:
                    pass  # the shard is gone: a restarted one holds nothing
        elif op == "roam":
            self.dp.on_shard_roam(bytes.fromhex(msg["peer"]), (msg["host"], msg["port"]))
        else:
            self.bad_messages["msg_unexpected"] += 1

    def _died(self, child: _Child, chan: socket.socket) -> None:
        if self.stopping or chan is not child.chan:
            return
        child.alive = False
        code = child.proc.poll() if child.proc is not None else None
        if code is None and child.proc is not None:
            try:
                code = child.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                code = child.proc.wait(timeout=2)
        chan.close()
        child.chan = None
        log.warning("shard %d (pid %s) exited with %s; restarting it", child.index,
                    child.proc.pid if child.proc else "?", code)
        child.restarts += 1
        child.generation += 1
        if child.generation > MAX_GENERATION:
            log.error("shard %d restarted %d times: its flows stay on shard 0's keys no more; "
                      "not restarting", child.index, MAX_GENERATION)
            return
        # the new life gets no receive keys that exist now: only those made after its start
        child.stale = {}
        for link in self.dp.links:
            openers = _openers(link.session)
            if openers:
                child.stale[link.peer_uid] = list(openers)
        wait = max(0.0, child.started + RESTART_GAP - time.monotonic())
        timer = threading.Timer(wait, lambda: self.dp.call_soon(self._respawn, child))
        timer.daemon = True
        timer.start()

    def _respawn(self, child: _Child) -> None:
        if self.stopping:
            return
        try:
            self._spawn(child)
        except OSError as exc:
            log.error("shard %d: cannot restart: %s", child.index, exc)
            return
        for link in self.dp.links:
            if link.encrypted and self.on_rekey is not None:
                self.on_rekey(link)

    # ---- pushing state (control thread)
    def sync(self, only: _Child | None = None) -> None:
        """Push every link, path and key change to the shards (a few times a second)."""
        links = {link.peer_uid: link for link in self.dp.links}
        for child in self.children if only is None else [only]:
            if not child.alive or child.chan is None:
                continue
            try:
                self._sync_child(child, links)
            except OSError as exc:
                if self._log_bucket.take(time.monotonic()):
                    log.warning("shard %d: cannot push state: %s", child.index, exc)

    def push_keys(self, link: Any) -> None:
        """``link`` has new keys (``Keying.on_keys``): push them to every shard at once."""
        for child in self.children:
            if child.alive and child.chan is not None and link.peer_uid in child.pushed:
                try:
                    self._push_keys(child, link)
                except OSError:
                    pass

    def _sync_child(self, child: _Child, links: dict[bytes, Any]) -> None:
        assert child.chan is not None
        for peer in [p for p in child.pushed if p not in links]:
            sm.send(child.chan, {"op": "unlink", "peer": peer.hex()})
            del child.pushed[peer]
            child.keys.pop(peer, None)
        for peer, link in links.items():
            path = link.path
            group = path.sock.fileno() in self.group_fds
            spec = (link.encrypted, link.overlay_ip4, link.overlay_ip6, link.mac,
                    link.tx.trains.off_reason,
                    tuple(str(n) for n in link.nets), bool(link.authed), path.addr,
                    path.channel, path.kind, group, path.sock.fileno())
            if child.pushed.get(peer) != spec:
                was_group = child.pushed.get(peer, (None,) * 11)[10]
                self._push_link(child, link, group)
                child.pushed[peer] = spec
                if group and was_group is False and link.encrypted and self.on_rekey:
                    # moved onto the steered port: shards take only keys made from now on
                    child.stale[peer] = list(_openers(link.session))
                    self.on_rekey(link)
            self._push_keys(child, link)

    def _push_link(self, child: _Child, link: Any, group: bool) -> None:
        assert child.chan is not None
        path = link.path
        host, port = path.addr[0], int(path.addr[1])
        msg = {
            "op": "link", "peer": link.peer_uid.hex(),
            "ip4": link.overlay_ip4.hex() if link.overlay_ip4 else None,
            "ip6": link.overlay_ip6.hex() if link.overlay_ip6 else None,
            "mac": link.mac.hex() if link.mac else None, "encrypted": link.encrypted,
            "nets": [str(n) for n in link.nets], "trains_off": _trains_off(link),
            "authed": bool(link.authed), "host": str(host), "port": port,
            "channel": path.channel, "kind": path.kind, "group": group,
        }
        if group:
            sm.send(child.chan, msg)
        else:
            sm.send(child.chan, msg, [path.sock.fileno()])

    def _push_keys(self, child: _Child, link: Any) -> None:
        assert child.chan is not None
        session = link.session
        if not link.encrypted or session is None:
            return
        sealer = getattr(session, "_sealer", None)
        stale = child.stale.get(link.peer_uid, [])
        group = link.path.sock.fileno() in self.group_fds
        rx = [o for o in _openers(session) if group and not any(o is s for s in stale)]
        state = (sealer, tuple(rx))
        if child.keys.get(link.peer_uid) == state:
            return
        child.keys[link.peer_uid] = state
        suite = sealer.suite if sealer is not None else (rx[0].suite if rx else None)
        if suite is None:
            return
        sm.send(child.chan, {
            "op": "keys", "peer": link.peer_uid.hex(), "suite": suite.value,
            "tx": None if sealer is None else {"epoch": sealer.epoch, "key": sealer.key.hex(),
                                               "salt": sealer.salt.hex()},
            "rx": [{"epoch": o.epoch, "key": o.key.hex(), "salt": o.salt.hex()} for o in rx],
        })

    # ---- state (control thread)
    def status(self) -> list[dict[str, Any]]:
        out = []
        for child in self.children:
            out.append({
                "shard": child.index, "pid": child.proc.pid if child.proc else None,
                "alive": child.alive, "restarts": child.restarts,
                "generation": child.generation,
                "tun_read_packets": int(child.report.get("tun_read_packets", 0)),
                "tun_written": int(child.report.get("tun_written", 0)),
            })
        return out

    def totals(self) -> dict[str, Any]:
        """The shards' node-wide counters, added up."""
        sums: collections.Counter[str] = collections.Counter()
        drops: collections.Counter[str] = collections.Counter(self.bad_messages)
        for child in self.children:
            rep = child.report
            for key in ("tun_read_packets", "tun_read_bytes", "no_route", "tun_written"):
                sums[key] += int(rep.get(key, 0))
            drops.update(rep.get("drops", {}))
        return {"counts": dict(sums), "drops": dict(drops)}


def _openers(session: Any) -> list[Opener]:
    openers = getattr(session, "_openers", None)
    return list(openers.values()) if openers else []


def _trains_off(link: Any) -> str:
    """Why this link never sends whole trains ("" when it may)."""
    policy = link.tx.trains
    return "" if policy.enabled else (policy.off_reason or "off")[:64]


if __name__ == "__main__":
    sys.exit(main())
