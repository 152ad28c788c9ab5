"""Prometheus metrics (``metrics_listen``): a custom collector that reads counters at scrape time.

Nothing here touches the data path: the pipelines keep counting into their plain ints and
``Counter``s as they always do, and a scrape copies them (no lock, no per-packet work; a value
read mid-update is at most one train old).  The HTTP server is prometheus_client's, on its own
thread; it serves the Prometheus text format, or OpenMetrics when the scraper asks for it.

Per link (label ``peer_uid``; ``ipop_link_info`` adds the overlay address, path kind,
security and its reason)::

    ipop_link_{rx,tx}_bytes_total, ipop_link_{rx,tx}_packets_total    counters
    ipop_link_drops_total{reason}                                     counter
    ipop_link_rtt_seconds                                             gauge (absent until measured)
    ipop_link_state{state="up|keying|down"}                           gauge, 1 for the current one
    ipop_link_info{overlay_ip,path,security,security_reason}          gauge, always 1

Per node::

    ipop_links{state}, ipop_signaling_connected, ipop_con_req_{sent,received,refused}_total,
    ipop_rekeys_total, ipop_ondemand_queue_drops_total, ipop_build_info{version,python}
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterator
from importlib import metadata
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ipop.api import status as st
from ipop.config import parse_endpoint
from ipop.dataplane.table import ForwardingTable
from ipop.errors import IpopError

if TYPE_CHECKING:
    from ipop.node import Node

log = logging.getLogger("ipop.api.metrics")
LINK_STATES = ("up", "keying", "down")


def _copy(counts: Any) -> dict[str, int]:
    """A dict copy of a counter another thread may grow (a resize mid-copy is retried)."""
    for _ in range(5):
        try:
            return dict(counts)
        except RuntimeError:
            continue
    return {}


def _version() -> str:
    try:
        return metadata.version("ipop")
    except metadata.PackageNotFoundError:
        return "unknown"


class NodeCollector(Collector):
    """Reads one node's links and counters each time Prometheus scrapes."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.version = _version()

    def collect(self) -> Iterator[Metric]:
        node = self.node
        dp = node.dp
        links = dp.links if dp is not None else ()  # an immutable tuple, swapped whole
        lbl = ["peer_uid"]
        rx_b = CounterMetricFamily("ipop_link_rx_bytes", "Bytes received on the link", labels=lbl)
        tx_b = CounterMetricFamily("ipop_link_tx_bytes", "Bytes sent on the link", labels=lbl)
        rx_p = CounterMetricFamily("ipop_link_rx_packets", "Packets received on the link",
                                   labels=lbl)
        tx_p = CounterMetricFamily("ipop_link_tx_packets", "Packets sent on the link", labels=lbl)
        drops = CounterMetricFamily("ipop_link_drops", "Frames the link dropped, by reason",
                                    labels=["peer_uid", "reason"])
        rtt = GaugeMetricFamily("ipop_link_rtt_seconds", "Round-trip time of the link "
                                "(keepalive probes)", labels=lbl)
        state = GaugeMetricFamily("ipop_link_state", "The link's state (1 for the current one)",
                                  labels=["peer_uid", "state"])
        info = InfoMetricFamily("ipop_link", "What the link is: overlay address, path kind and "
                                "security with its reason",
                                labels=["peer_uid"])
        by_state = dict.fromkeys(LINK_STATES, 0)
        for link in links:
            uid = link.peer_uid.hex()
            s = link.stats
            rx_b.add_metric([uid], s.total("rx_bytes"))  # with the shards' copies (workers)
            tx_b.add_metric([uid], s.total("tx_bytes"))
            rx_p.add_metric([uid], s.total("rx_packets"))
            tx_p.add_metric([uid], s.total("tx_packets"))
            for reason, count in sorted(_copy(s.drops).items()):
                drops.add_metric([uid, reason], count)
            if s.rtt_ms is not None:
                rtt.add_metric([uid], s.rtt_ms / 1000.0)
            now = st.link_state(link)
            by_state[now] = by_state.get(now, 0) + 1
            for name in LINK_STATES:
                state.add_metric([uid, name], 1.0 if name == now else 0.0)
            ip = link.overlay_ip4 or link.overlay_ip6
            info.add_metric([uid], {
                "overlay_ip": ForwardingTable.ip_text(ip) if ip else "",
                "path": link.path.kind, "security": link.security,
                "security_reason": link.security_reason or "",
            })
        yield from (rx_b, tx_b, rx_p, tx_p, drops, rtt, state, info)

        links_g = GaugeMetricFamily("ipop_links", "Links by state", labels=["state"])
        for name, count in by_state.items():
            links_g.add_metric([name], count)
        yield links_g
        ctl = node.controller
        connected = getattr(ctl, "connected", None)
        if connected is not None:  # a node of static peers only has no signaling
            sig = GaugeMetricFamily("ipop_signaling_connected",
                                    "1 when the signaling (XMPP) session is up")
            sig.add_metric([], 1.0 if connected else 0.0)
            yield sig
        counts = _copy(getattr(ctl, "counters", {}))
        for key, text in (("con_req_sent", "con_req messages sent"),
                          ("con_req_received", "con_req messages received"),
                          ("con_req_refused", "con_req messages refused (bad address, conflict)")):
            c = CounterMetricFamily(f"ipop_{key}", text)
            c.add_metric([], counts.get(key, 0))
            yield c
        rekeys = CounterMetricFamily("ipop_rekeys", "Rekeys completed on encrypted links")
        rekeys.add_metric([], node.keying.rekeys if node.keying is not None else 0)
        yield rekeys
        held = CounterMetricFamily("ipop_ondemand_queue_drops",
                                   "Packets for a link being made that its queue dropped")
        held.add_metric([], dp.held_dropped if dp is not None else 0)
        yield held
        build = InfoMetricFamily("ipop_build", "ipop's version and the Python running it")
        build.add_metric([], {"version": self.version, "python": platform.python_version()})
        yield build


def serve(node: Node, listen: str) -> Any:
    """Start the HTTP server on ``listen`` (``host:port``); returns it (``shutdown()`` stops
    it)."""
    from prometheus_client import start_http_server

    host, port = parse_endpoint(listen)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise IpopError(f"metrics_listen {listen}: {exc.strerror}") from None
    log.info("metrics on http://%s/metrics", listen)
    return server


def render(node: Node) -> bytes:
    """The metrics page as a scrape would get it (Prometheus text format)."""
    from prometheus_client import generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    return generate_latest(registry)
