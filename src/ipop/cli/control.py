"""The subcommands that talk to a running node's control socket (``ipop ping``, ``ipop peers``,
``ipop link add|del``, ``ipop friend add|remove``), and ``ipop check``.

Each prints a table, or JSON with ``--json``.  Errors from the node come back with a line that
says what to do (``_hint``).  Exit status: 0 success, 1 failure (a peer that did not answer, a
node that refused), 2 a bad config.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ipop.errors import IpopError


def control_path(args: argparse.Namespace) -> Path:
    if getattr(args, "control", None):
        return Path(args.control)
    if getattr(args, "config", None):
        from ipop import config

        cfg, _ = config.load(args.config)
        return cfg.control_path
    return Path("/var/lib/ipop/ipop0/control.sock")


HINTS = {
    "no node answers": "is the node running (`ipop up -c FILE`)? Give the same -c FILE, or "
                       "--control PATH of its control socket",
    "Permission denied": "the control socket is root's (mode 0600): run as root",
    "unknown method 'add_friend'": "friends are a SocialVPN feature: this node's controller is "
                                   'not "socialvpn"',
    "unknown method 'remove_friend'": "friends are a SocialVPN feature: this node's controller "
                                      'is not "socialvpn"',
    "create_link needs a listen_port": 'set "listen_port" in the config and restart the node',
    "no such link": "see `ipop peers` for the links this node has",
    "signaling is not running": "the node has no XMPP signaling: set xmpp_username",
    "peer_uid must be": "give the peer's UID: 40 hex characters from `ipop id` on that peer",
    "jid must be": "give a bare JID like bob@example.org",
    "unknown method 'ping'": "this node is older than `ipop ping`: restart it with this ipop",
}


def _hint(error: str) -> str:
    for key, hint in HINTS.items():
        if key in error:
            return f"{error}\n  what to do: {hint}"
    return error


def call(args: argparse.Namespace, method: str, params: dict[str, Any] | None = None,
         timeout: float = 5.0) -> Any:
    from ipop.api import server

    path = control_path(args)
    try:
        return server.call(path, method, params, timeout=timeout)
    except IpopError as exc:
        raise IpopError(_hint(str(exc))) from None
    except OSError as exc:
        raise IpopError(_hint(f"control socket {path}: {exc.strerror or exc}")) from None


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


# ---- ipop check
def cmd_check(args: argparse.Namespace) -> int:
    """Validate a config: nothing is created, nothing on the system is touched."""
    from ipop import config

    cfg, warnings = config.load(args.config)
    warnings = warnings + config.risks(cfg)
    if args.json:
        _print_json({"config": args.config, "ok": True, "warnings": warnings,
                     "interface": cfg.interface, "mtu": cfg.mtu,
                     "state_dir": str(cfg.state_path)})
        return 0
    for w in warnings:
        print(f"warning: {w}")
    print(f"ok: {args.config} is valid ({len(warnings)} warning{'s' * (len(warnings) != 1)})")
    return 0


# ---- ipop ping
def _ping_line(r: dict[str, Any], seq: int) -> str:
    who = r.get("jid") or (r.get("uid") or "?")[:12]
    if r.get("answered"):
        direct = "direct" if r.get("direct") else "not direct"
        return (f"pong from {who} ({r.get('overlay_ip')}) seq={seq} rtt={r['rtt_ms']:.2f} ms "
                f"via {r.get('path')} {r.get('endpoint')} ({direct}, {r.get('security')})")
    return f"no answer from {who} seq={seq}: {r.get('reason')}: {r.get('detail')}"


def cmd_ping(args: argparse.Namespace) -> int:
    results: list[dict[str, Any]] = []
    answered = 0
    for seq in range(1, args.count + 1):
        params = {"peer": args.peer, "timeout": args.timeout,
                  "connect": bool(args.connect and seq == 1)}
        r = call(args, "ping", params, timeout=args.timeout + (25.0 if args.connect else 5.0))
        r["seq"] = seq
        results.append(r)
        answered += bool(r.get("answered"))
        if not args.json:
            print(_ping_line(r, seq), flush=True)
        if not r.get("answered") and r.get("reason") not in ("timeout", "keying", "linking"):
            break  # no link, and waiting will not make one: say why once
        if seq < args.count:
            time.sleep(args.interval)
    rtts = [r["rtt_ms"] for r in results if r.get("answered")]
    summary = {"peer": args.peer, "sent": len(results), "answered": answered,
               "rtt_ms": {"min": min(rtts), "avg": round(sum(rtts) / len(rtts), 3),
                          "max": max(rtts)} if rtts else None}
    if args.json:
        _print_json({"summary": summary, "probes": results})
    else:
        tail = ""
        if rtts:
            s = summary["rtt_ms"]
            tail = f", rtt min/avg/max {s['min']:.2f}/{s['avg']:.2f}/{s['max']:.2f} ms"
        print(f"--- {args.peer}: {len(results)} probes, {answered} answered{tail}")
    return 0 if answered else 1


# ---- ipop peers
def cmd_peers(args: argparse.Namespace) -> int:
    state = call(args, "get_state")
    links = {lk["peer_uid"]: lk for lk in state.get("links", [])}
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for p in state.get("peers") or []:
        lk = links.get(p.get("uid") or "")
        seen.add(p.get("uid") or "")
        rows.append({"uid": p.get("uid"), "jid": p.get("jid"), "overlay_ip": p.get("overlay_ip"),
                     "online": p.get("online"), "state": lk["state"] if lk else p.get("state"),
                     "path": lk["path"] if lk else None,
                     "endpoint": lk["endpoint"] if lk else None,
                     "security": lk["security"] if lk else p.get("security"),
                     "rtt_ms": lk["rtt_ms"] if lk else None})
    for uid, lk in links.items():
        if uid not in seen:
            rows.append({"uid": uid, "jid": None, "overlay_ip": lk["overlay_ip"], "online": None,
                         "state": lk["state"], "path": lk["path"], "endpoint": lk["endpoint"],
                         "security": lk["security"], "rtt_ms": lk["rtt_ms"]})
    if args.json:
        _print_json({"peers": rows})
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"peers of {state['node'].get('uid', '?')[:12]}")
    for col in ("uid", "jid", "overlay ip", "online", "state", "path", "remote", "security",
                "rtt ms"):
        table.add_column(col)

    def show(v: Any) -> str:
        return "-" if v is None else ("yes" if v is True else "no" if v is False else str(v))

    for r in rows:
        table.add_row(show((r["uid"] or "")[:12] or None), show(r["jid"]), show(r["overlay_ip"]),
                      show(r["online"]), show(r["state"]), show(r["path"]), show(r["endpoint"]),
                      show(r["security"]), show(r["rtt_ms"]))
    Console(width=None if sys.stdout.isatty() else 150, emoji=False, highlight=False).print(table)
    return 0


# ---- ipop link add|del, ipop friend add|remove
def cmd_link(args: argparse.Namespace) -> int:
    if args.action == "add":
        params: dict[str, Any] = {"peer_uid": args.uid, "endpoint": args.endpoint}
        if args.ip4:
            params["ip4"] = args.ip4
        if args.fingerprint:
            params["fingerprint"] = args.fingerprint
        if args.plain or args.encrypted:
            params["sec"] = bool(args.encrypted)
        result = call(args, "create_link", params)
        text = (f"link to {result['peer_uid'][:12]} via {result['endpoint']}: "
                f"{result['state']}, {result['security']}")
    else:
        result = call(args, "trim_link", {"peer_uid": args.uid})
        text = f"link to {result['trimmed'][:12]} removed"
    if args.json:
        _print_json(result)
    else:
        print(text)
    return 0


def cmd_friend(args: argparse.Namespace) -> int:
    method = "add_friend" if args.action == "add" else "remove_friend"
    result = call(args, method, {"jid": args.jid})
    if args.json:
        _print_json(result)
    elif args.action == "add":
        print(f"asked {result['friend']} for a mutual subscription; "
              f"local address {result['local_ip']}")
    else:
        print(f"friend {result['removed']} removed")
    return 0


def add_parsers(sub: Any) -> None:
    """The subparsers of this module's commands."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", help="the node's config (finds its control socket)")
        p.add_argument("--control", help="path of the control socket")
        p.add_argument("--json", action="store_true", help="print JSON")

    chk = sub.add_parser("check", help="validate a config (creates nothing, touches nothing)")
    chk.add_argument("-c", "--config", required=True)
    chk.add_argument("--json", action="store_true")
    chk.set_defaults(func=cmd_check)

    png = sub.add_parser("ping", help="probe a peer over its link (not ICMP)")
    png.add_argument("peer", help="UID, unique UID prefix, JID or overlay address")
    common(png)
    png.add_argument("--count", type=int, default=5)
    png.add_argument("--interval", type=float, default=0.5, help="seconds between probes")
    png.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for each echo")
    png.add_argument("--connect", action="store_true",
                     help="ask for a link first (on-demand links), then probe")
    png.set_defaults(func=cmd_ping)

    prs = sub.add_parser("peers", help="list peers and their links")
    common(prs)
    prs.set_defaults(func=cmd_peers)

    lnk = sub.add_parser("link", help="add or remove a link (control API create_link/trim_link)")
    lsub = lnk.add_subparsers(dest="action", required=True)
    ladd = lsub.add_parser("add", help="link to a peer at an underlay endpoint")
    ladd.add_argument("uid")
    ladd.add_argument("endpoint", help="host:port where the peer listens")
    ladd.add_argument("--ip4", help="the peer's overlay address")
    ladd.add_argument("--fingerprint", help="the peer's certificate fingerprint (`ipop id`)")
    how = ladd.add_mutually_exclusive_group()
    how.add_argument("--plain", action="store_true", help="an unencrypted link")
    how.add_argument("--encrypted", action="store_true",
                     help="an encrypted link (default: the node's sec)")
    common(ladd)
    ldel = lsub.add_parser("del", help="remove a link")
    ldel.add_argument("uid")
    common(ldel)
    lnk.set_defaults(func=cmd_link)

    frd = sub.add_parser("friend", help="SocialVPN: add or remove a friend")
    fsub = frd.add_subparsers(dest="action", required=True)
    for action in ("add", "remove"):
        fp = fsub.add_parser(action)
        fp.add_argument("jid")
        common(fp)
    frd.set_defaults(func=cmd_friend)
