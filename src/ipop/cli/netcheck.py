"""``ipop netcheck``: can this node reach what it needs?  From its config, with or without a
running node (it opens sockets of its own, never the node's).

Checks, in order, each a row with ``ok``, a ``cause`` when it failed and the figures found
(causes after the colon):

    xmpp_tcp    TCP connect to xmpp_host:xmpp_port: refused, timeout, unreachable, dns
    xmpp_tls    STARTTLS or direct TLS, verified as the node does it (pinned to xmpp_ca_cert
                when set): tls_mismatch, no_starttls, timeout
    xmpp_login  a real login (slixmpp), then logout: bad_credentials, tls_mismatch, timeout
    stun        each STUN server's mapped address, all from ONE local socket; two servers (or
                two ports of one) tell an endpoint-independent mapping from a symmetric one
    nat         the NAT kind: none (public), endpoint-independent, symmetric, unknown
    turn        each TURN server: an allocation with the credentials, its relayed address:
                bad_credentials, timeout, refused
    udp_out     whether any UDP answer came back at all
    mtu         the underlay route's MTU and the overlay MTU it leaves (``ipop.netinfo``)

Exit status 0 when every check passed (skipped ones do not count), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import socket
import ssl
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ipop.config import Config, parse_endpoint

RETRANSMITS = (0.25, 0.5, 1.0)  # STUN retransmission gaps (seconds)


@dataclass
class Check:
    name: str
    target: str
    ok: bool | None  # None: skipped
    detail: str
    cause: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


def _cause(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError) or (
            isinstance(exc, ssl.SSLError) and exc.reason == "CERTIFICATE_VERIFY_FAILED"):
        return "tls_mismatch"
    if isinstance(exc, ssl.SSLError):
        return "tls_error"
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "unreachable"
    return type(exc).__name__


def _text(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {exc.verify_message}"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


# ---- XMPP
def _tls_context(cfg: Config) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cfg.xmpp_ca_cert) if cfg.xmpp_ca_cert \
        else ssl.create_default_context()
    return ctx


async def _read_until(reader: asyncio.StreamReader, marks: tuple[bytes, ...],
                      wait: float) -> bytes:
    buf = b""
    deadline = time.monotonic() + wait
    while not any(m in buf for m in marks):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        chunk = await asyncio.wait_for(reader.read(4096), left)
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "server closed the stream")
        buf += chunk
    return buf


async def check_xmpp(cfg: Config, wait: float) -> list[Check]:
    if not cfg.xmpp_username or not cfg.xmpp_host or not cfg.xmpp_password:
        return [Check("xmpp", "-", None, "no xmpp_username: static peers only")]
    host, port = cfg.xmpp_host, cfg.xmpp_port
    where = f"{host}:{port}"
    domain = cfg.xmpp_username.split("@", 1)[1]
    out: list[Check] = []
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), wait)
    except (OSError, TimeoutError) as exc:
        out.append(Check("xmpp_tcp", where, False, _text(exc), _cause(exc)))
        out.append(Check("xmpp_login", cfg.xmpp_username, None, "skipped: no TCP connection"))
        return out
    ms = (time.monotonic() - t0) * 1000
    out.append(Check("xmpp_tcp", where, True, f"connected in {ms:.1f} ms",
                     data={"connect_ms": round(ms, 1)}))
    try:
        if cfg.xmpp_tls == "none":
            out.append(Check("xmpp_tls", where, None,
                             'xmpp_tls "none": plaintext (password and signaling readable)'))
        else:
            out.append(await _check_tls(cfg, reader, writer, host, port, domain, wait))
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
    out.append(await _check_login(cfg, wait))
    return out


async def _check_tls(cfg: Config, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     host: str, port: int, domain: str, wait: float) -> Check:
    where = f"{host}:{port}"
    pin = f"pinned to {cfg.xmpp_ca_cert}" if cfg.xmpp_ca_cert else "system CAs"
    ctx = _tls_context(cfg)
    try:
        if cfg.xmpp_tls == "starttls":
            writer.write((f"<?xml version='1.0'?><stream:stream to='{domain}' version='1.0' "
                          "xmlns='jabber:client' "
                          "xmlns:stream='http://etherx.jabber.org/streams'>").encode())
            features = await _read_until(reader, (b"</stream:features>",), wait)
            if b"urn:ietf:params:xml:ns:xmpp-tls" not in features:
                return Check("xmpp_tls", where, False, "the server offers no STARTTLS",
                             "no_starttls")
            writer.write(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            answer = await _read_until(reader, (b"<proceed", b"<failure"), wait)
            if b"<proceed" not in answer:
                return Check("xmpp_tls", where, False, "the server refused STARTTLS",
                             "no_starttls")
        await asyncio.wait_for(writer.start_tls(ctx, server_hostname=domain), wait)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return Check("xmpp_tls", where, False, f"{_text(exc)} ({pin})", _cause(exc))
    tls = writer.get_extra_info("ssl_object")
    version = tls.version() if tls is not None else "?"
    return Check("xmpp_tls", where, True, f"{cfg.xmpp_tls} {version}, certificate verified ({pin})",
                 data={"version": version})


async def _check_login(cfg: Config, wait: float) -> Check:
    from pathlib import Path

    from ipop.errors import ConfigError
    from ipop.signal.base import SignalListener
    from ipop.signal.xmpp import XmppSettings, XmppSignal

    assert cfg.xmpp_username and cfg.xmpp_password and cfg.xmpp_host
    settings = XmppSettings(jid=cfg.xmpp_username, password=cfg.xmpp_password,
                            host=cfg.xmpp_host, port=cfg.xmpp_port, tls=cfg.xmpp_tls,
                            ca_cert=None if cfg.xmpp_ca_cert is None else Path(cfg.xmpp_ca_cert),
                            connect_timeout=wait, resource=f"netcheck-{os.getpid()}")
    t0 = time.monotonic()
    signal = XmppSignal(settings, SignalListener())
    try:
        why = await signal.login_once()
    except ConfigError as exc:
        await _end_other_tasks()
        cause = {"xmpp_password": "bad_credentials", "xmpp_ca_cert": "tls_mismatch",
                 "xmpp_tls": "tls_required"}.get(exc.key, "config")
        return Check("xmpp_login", cfg.xmpp_username, False, str(exc), cause)
    await _end_other_tasks()
    if why is not None:
        cause = "timeout" if "within" in why or "timed out" in why else (
            "refused" if "refused" in why.lower() else "failed")
        return Check("xmpp_login", cfg.xmpp_username, False, why, cause)
    ms = (time.monotonic() - t0) * 1000
    return Check("xmpp_login", cfg.xmpp_username, True, f"logged in and out in {ms:.0f} ms",
                 data={"login_ms": round(ms)})


async def _end_other_tasks() -> None:
    """slixmpp leaves its outgoing-stanza task waiting after a logout: end it (only netcheck's
    own tasks run in this loop, and no other is running now)."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


# ---- STUN and the NAT kind
async def _stun_binding(sock: socket.socket, server: tuple[str, int],
                        wait: float) -> tuple[str, int]:
    """One Binding transaction from ``sock``: the mapped address (XOR-MAPPED-ADDRESS)."""
    from aioice import stun

    loop = asyncio.get_running_loop()
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    raw = bytes(request)
    deadline = time.monotonic() + wait
    gaps = iter(RETRANSMITS)
    while True:
        await loop.sock_sendto(sock, raw, server)
        gap = min(next(gaps, 1.0), deadline - time.monotonic())
        if gap <= 0:
            raise TimeoutError
        end = time.monotonic() + gap
        while (left := end - time.monotonic()) > 0:
            try:
                data, _addr = await asyncio.wait_for(loop.sock_recvfrom(sock, 2048), left)
            except TimeoutError:
                break
            try:
                msg = stun.parse_message(data)
            except ValueError:
                continue
            if msg.transaction_id != request.transaction_id:
                continue
            mapped = msg.attributes.get("XOR-MAPPED-ADDRESS") or msg.attributes.get(
                "MAPPED-ADDRESS")
            if mapped is None:
                raise ConnectionError("answer without a mapped address")
            return str(mapped[0]), int(mapped[1])


async def _resolve(host: str, port: int) -> tuple[str, int]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=socket.AF_INET,
                                                         type=socket.SOCK_DGRAM)
    addr = infos[0][4]
    return str(addr[0]), int(addr[1])


async def check_stun(cfg: Config, wait: float) -> list[Check]:
    servers = [parse_endpoint(s, 3478) for s in cfg.stun]
    if not servers:
        return [Check("stun", "-", None, "no stun servers: no server-reflexive candidates"),
                Check("nat", "-", None, "unknown: no stun servers")]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    out: list[Check] = []
    try:
        sock.bind(("0.0.0.0", 0))
        local = sock.getsockname()
        mapped: dict[tuple[str, int], tuple[str, int]] = {}
        for host, port in servers:
            where = f"{host}:{port}"
            try:
                addr = await _resolve(host, port)
                t0 = time.monotonic()
                got = await _stun_binding(sock, addr, wait)
            except (OSError, TimeoutError, ConnectionError) as exc:
                out.append(Check("stun", where, False, _text(exc), _cause(exc)))
                continue
            ms = (time.monotonic() - t0) * 1000
            mapped[addr] = got
            out.append(Check("stun", where, True, f"mapped address {got[0]}:{got[1]} "
                             f"({ms:.1f} ms)", data={"mapped": f"{got[0]}:{got[1]}",
                                                     "rtt_ms": round(ms, 2)}))
        out.append(nat_kind(local, mapped))
    finally:
        sock.close()
    return out


def nat_kind(local: tuple[str, int], mapped: dict[tuple[str, int], tuple[str, int]]) -> Check:
    """The NAT kind from one local socket's mapped addresses toward several servers.

    The same mapping toward every server: endpoint-independent (a "cone" NAT; peers link
    directly by hole punching, ICE srflx candidates).  Different mappings: symmetric
    (address/port-dependent; a peer behind one needs the other side public, or a TURN relay).
    """
    values = set(mapped.values())
    data: dict[str, Any] = {"local_port": local[1],
                            "mapped": sorted(f"{h}:{p}" for h, p in values)}
    if not mapped:
        return Check("nat", "-", None, "unknown: no STUN server answered", data=data)
    ports_kept = all(p == local[1] for _h, p in values)
    if len(values) > 1:
        data["kind"] = "symmetric"
        return Check("nat", "-", True, "symmetric: a new mapping per destination "
                     f"({len(values)} mappings for {len(mapped)} servers); direct links only "
                     "to public peers, others through TURN", data=data)
    if len(mapped) < 2:
        data["kind"] = "unknown"
        return Check("nat", "-", None, "unknown: one STUN server answered; list two servers, "
                     "or two ports of one, in stun to tell cone from symmetric", data=data)
    own = {a[0] for a in values}
    data["kind"] = "endpoint-independent"
    if _is_local_address(next(iter(own))):
        data["kind"] = "none"
        return Check("nat", "-", True, "none: the mapped address is this host's own", data=data)
    return Check("nat", "-", True, "endpoint-independent (cone): one mapping for every "
                 f"destination{', source port kept' if ports_kept else ''}; direct links by hole "
                 "punching", data=data)


def _is_local_address(ip: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


# ---- TURN
async def check_turn(cfg: Config, wait: float) -> list[Check]:
    from aioice import stun
    from aioice.turn import create_turn_endpoint

    out: list[Check] = []
    for t in cfg.turn:
        host, port = parse_endpoint(t.server, 3478)
        where = f"{host}:{port}"
        transport = None
        try:
            addr = await _resolve(host, port)
            t0 = time.monotonic()
            transport, _ = await asyncio.wait_for(create_turn_endpoint(
                asyncio.DatagramProtocol, addr, t.user, t.password, lifetime=60), wait)
            relayed = transport.get_extra_info("sockname")
            ms = (time.monotonic() - t0) * 1000
            out.append(Check("turn", where, True,
                             f"allocation as {t.user!r}: relayed address {relayed[0]}:{relayed[1]} "
                             f"({ms:.1f} ms)", data={"relayed": f"{relayed[0]}:{relayed[1]}",
                                                     "user": t.user}))
        except stun.TransactionFailed as exc:
            code = exc.response.attributes.get("ERROR-CODE", (0, ""))
            cause = "bad_credentials" if code[0] in (401, 403, 441) else f"error_{code[0]}"
            text = f"server answered {code[0]} {code[1]}"
            if cause == "bad_credentials":
                text += f" for user {t.user!r}: check the turn user and pass"
            out.append(Check("turn", where, False, text, cause))
        except stun.TransactionTimeout:
            out.append(Check("turn", where, False, "no answer (timed out)", "timeout"))
        except (OSError, TimeoutError, ConnectionError) as exc:
            out.append(Check("turn", where, False, _text(exc), _cause(exc)))
        finally:
            if transport is not None:
                transport.close()  # aioice deletes the allocation (a Refresh with lifetime 0)
                await asyncio.sleep(0.05)
    if not cfg.turn:
        out.append(Check("turn", "-", None,
                         "no turn servers: peers behind symmetric NATs cannot link"))
    return out


# ---- all of it
def check_mtu(cfg: Config) -> Check:
    from ipop.netinfo import default_mtu, overlay_mtu, route_mtu, underlay_dests

    found = route_mtu(underlay_dests(cfg))
    if found is None:
        return Check("mtu", "-", None, "no underlay route found")
    fits = overlay_mtu(found.mtu, cfg.switchmode)
    mtu, _why = default_mtu(cfg)
    data = {"underlay_dev": found.dev, "underlay_mtu": found.mtu, "overlay_mtu": mtu,
            "overlay_fits": fits}
    where = f"{found.dev} (route to {found.dest})" if found.dest else f"{found.dev} (default)"
    if mtu > fits:
        return Check("mtu", where, False, f"underlay mtu {found.mtu}: an overlay mtu of {mtu} "
                     f"does not fit (at most {fits}); lower mtu or leave it unset",
                     "mtu_too_large", data)
    how = "set by mtu" if cfg.mtu is not None else "the default from this route"
    return Check("mtu", where, True, f"underlay mtu {found.mtu} -> overlay mtu {mtu} ({how})",
                 data=data)


async def run_checks(cfg: Config, wait: float) -> list[Check]:
    checks = await check_xmpp(cfg, wait)
    checks += await check_stun(cfg, wait)
    checks += await check_turn(cfg, wait)
    udp = [c for c in checks if c.name in ("stun", "turn") and c.ok is not None]
    if not udp:
        checks.append(Check("udp_out", "-", None, "untested: no stun or turn servers"))
    elif any(c.ok for c in udp):
        checks.append(Check("udp_out", "-", True, "UDP answers come back"))
    else:
        checks.append(Check("udp_out", "-", False, "no UDP answer from any STUN/TURN server "
                            "(UDP blocked outbound?)", "timeout"))
    checks.append(check_mtu(cfg))
    return checks


def cmd_netcheck(args: argparse.Namespace) -> int:
    from ipop import config

    cfg, warnings = config.load(args.config)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    checks = asyncio.run(run_checks(cfg, args.timeout))
    failed = [c for c in checks if c.ok is False]
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"ipop netcheck {args.config}")
        for col in ("check", "target", "result", "cause", "detail"):
            table.add_column(col)
        for c in checks:
            result = "skip" if c.ok is None else ("ok" if c.ok else "FAIL")
            table.add_row(c.name, c.target, result, c.cause or "-", c.detail)
        Console(width=None if sys.stdout.isatty() else 160, emoji=False,
                highlight=False).print(table)
    return 1 if failed else 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("netcheck", help="check XMPP, STUN, TURN, UDP and the MTU from a config")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per check")
    p.set_defaults(func=cmd_netcheck)
