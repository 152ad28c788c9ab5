"""The status document (one versioned schema, extended but never broken) and its rich table.

Schema version 1::

    {"version": 1,
     "node":  {uid, fingerprint, ip4, ip6, interface, mode, mtu, listen_port, controller,
               uptime_s, xmpp, counters, pid, runtime: {threads, asyncio_tasks}},
     "links": [{peer_uid, overlay_ip, endpoint, local, state, security, security_reason, path,
                rtt_ms, tx_packets, tx_bytes, rx_packets, rx_bytes, drops, last_rx,
                framing: {mode, trains_sent, fallbacks, hold_s}}],
     "peers": [{uid, jid, online, linked, overlay_ip, state}]}

Fields not yet known are null.  Secrets never appear here.
"""

from __future__ import annotations

import collections
import sys
import time
from typing import Any

from ipop.dataplane.link import Link
from ipop.dataplane.table import ForwardingTable

SCHEMA_VERSION = 1


def link_state(link: Link) -> str:
    if link.down:
        return "down"
    if not link.usable:
        return "keying"
    return "up"


def link_entry(link: Link) -> dict[str, Any]:
    st = link.stats
    ip = link.overlay_ip4 or link.overlay_ip6
    path = link.path
    host, port = path.addr[0].removeprefix("::ffff:"), path.addr[1]
    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    last_rx = None
    if st.heard_mono:
        last_rx = round(time.time() - (time.monotonic() - st.heard_mono), 3)
    # the link's copies in shards 1..N-1 (``workers``) count beside this one
    counts = {key: st.total(key) for key in ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes")}
    drops = collections.Counter(st.drops)
    for part in st.shards.values():
        drops.update(part["rx_drops"])
        drops.update(part["tx_drops"])
    return {
        "peer_uid": link.peer_uid.hex(),
        "overlay_ip": ForwardingTable.ip_text(ip) if ip else None,
        "endpoint": endpoint,
        "local": path.local(),
        "state": link_state(link),
        "security": link.security,
        "security_reason": link.security_reason,
        "path": path.kind,
        "rtt_ms": round(st.rtt_ms, 3) if st.rtt_ms is not None else None,
        **counts,
        "drops": dict(drops),
        "last_rx": last_rx,
        # DTLS handshakes completed on this link (the first, then one per rekey)
        "handshakes": getattr(link.session, "handshakes", None) if link.encrypted else None,
        "framing": {
            "mode": link.tx.trains.mode(time.monotonic()),
            "trains_sent": link.tx.trains_sent,
            "fallbacks": link.tx.trains.fallbacks,
            "hold_s": link.tx.trains.hold,
        },
    }


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def render(status: dict[str, Any]) -> None:
    """Print a status document as people read it."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 150, emoji=False, highlight=False)
    node = status.get("node", {})
    console.print(
        f"[bold]{node.get('interface')}[/bold] {node.get('ip4')}  uid {node.get('uid')}  "
        f"mode {node.get('mode')}  mtu {node.get('mtu')}  controller {node.get('controller')}"
    )
    console.print(f"fingerprint {node.get('fingerprint')}")
    if node.get("xmpp"):
        x = node["xmpp"]
        console.print(f"xmpp {x.get('jid')} {'connected' if x.get('connected') else 'offline'}")
    table = Table(title="links")
    for col in ("peer", "overlay ip", "local", "remote", "path", "state", "security", "why",
                "rtt ms", "tx", "rx", "drops"):
        table.add_column(col)
    for lk in status.get("links", []):
        drops = ", ".join(f"{k}={v}" for k, v in sorted(lk.get("drops", {}).items())) or "-"
        rtt = lk.get("rtt_ms")
        table.add_row(
            lk["peer_uid"][:12], str(lk.get("overlay_ip")), str(lk.get("local")),
            str(lk.get("endpoint")),
            str(lk.get("path")), lk.get("state", "?"), lk.get("security", "?"),
            str(lk.get("security_reason") or "-"), "-" if rtt is None else f"{rtt:.2f}",
            f"{lk['tx_packets']} / {_size(lk['tx_bytes'])}",
            f"{lk['rx_packets']} / {_size(lk['rx_bytes'])}", drops,
        )
    console.print(table)
    peers = status.get("peers") or []
    if peers:
        pt = Table(title="peers")
        for col in ("uid", "jid", "overlay ip", "online", "linked", "state", "auth"):
            pt.add_column(col)
        for p in peers:
            auth = p.get("auth")  # failed handshakes of its account or UID (issue 16)
            failed = (f"{auth['failures']} failed: {auth['reason']}"
                      + (f", held {auth['hold_s']} s" if auth.get("hold_s") else "")
                      if isinstance(auth, dict) else "-")
            pt.add_row(str(p.get("uid") or "-")[:12], str(p.get("jid") or "-"),
                       str(p.get("overlay_ip") or "-"), "yes" if p.get("online") else "no",
                       "yes" if p.get("linked") else "no", str(p.get("state") or "-"), failed)
        console.print(pt)
