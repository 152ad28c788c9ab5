"""``ipop``: the command line entry point; every subcommand is a small function here or beside it.

Exit status: 0 on success, 2 on a configuration error (one line naming the key), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from ipop.errors import ConfigError, IpopError

# ipop uses no pydantic plugins: spare pydantic the scan of every installed package's entry
# points when the config model is built (measured with -X importtime)
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")


def _load_config(path: str):  # type: ignore[no-untyped-def]
    from ipop import config

    cfg, warnings = config.load(path)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return cfg


def cmd_up(args: argparse.Namespace) -> int:
    # slixmpp colours its XML debug lines with pygments when it finds it (rich brings it in):
    # a node's logs stay plain text, and it spares 27 modules (~3 MB) per node
    sys.modules.setdefault("pygments", None)  # type: ignore[arg-type]
    # slixmpp resolves SRV records with aiodns (c-ares) when it finds it; ipop always gives it
    # the server's host and port (xmpp_host, xmpp_port), so it looks up no SRV record and the
    # connection resolves the host with getaddrinfo: 8 modules, ~10 ms of CPU spared per node
    sys.modules.setdefault("aiodns", None)  # type: ignore[arg-type]
    from ipop import logs
    from ipop.node import Node

    cfg = _load_config(args.config)
    from ipop import statedir

    statedir.prepare(cfg.state_path)  # refuse a state_dir others could plant files in
    logs.configure(log_format=cfg.log_format, controller_logging=cfg.controller_logging,
                   tincan_logging=cfg.tincan_logging, override=args.log_level)
    node = Node(cfg, config_path=args.config, log_override=args.log_level)
    if cfg.xmpp_username:
        from ipop.controller import make_controller

        node.controller = make_controller(node)
    elif not cfg.peers:
        print("warning: config: neither xmpp_username nor peers: this node will have no links",
              file=sys.stderr)
    asyncio.run(node.run())
    return 0


def cmd_id(args: argparse.Namespace) -> int:
    from ipop.crypto.identity import load_or_create

    cfg = _load_config(args.config)
    from ipop import statedir

    statedir.prepare(cfg.state_path)
    ident = load_or_create(cfg.state_path)
    if args.json:
        print(json.dumps({"uid": ident.uid_hex, "fingerprint": ident.fingerprint}))
    else:
        print(f"uid         {ident.uid_hex}")
        print(f"fingerprint {ident.fingerprint}")
    return 0


def _control_path(args: argparse.Namespace) -> Path:
    if args.control:
        return Path(args.control)
    if args.config:
        return Path(_load_config(args.config).control_path)
    return Path("/var/lib/ipop/ipop0/control.sock")


def cmd_status(args: argparse.Namespace) -> int:
    from ipop.api import server

    state = server.call(_control_path(args), "get_state")
    if args.json:
        print(json.dumps(state, indent=2))
    else:
        from ipop.api.status import render

        render(state)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask a running node to re-read its config; prints what changed, or why nothing did."""
    from ipop.api import server

    result = server.call(_control_path(args), "reload", timeout=30.0)
    if args.json:
        print(json.dumps(result))
    if result.get("refused"):
        # one line naming the key; exit 2 as a bad config does at start
        print(f"ipop reload: refused: {result.get('error')}", file=sys.stderr)
        return 2
    if args.json:
        return 0
    changed = result.get("changed") or []
    if not changed:
        print("ipop reload: nothing changed")
        return 0
    print(f"ipop reload: changed {', '.join(changed)}")
    for item in result.get("links") or []:
        print(f"  link {item}")
    for item in result.get("routes") or []:
        print(f"  routing: {item}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ipop.cli.demo import run_demo

    return run_demo(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from ipop.cli.bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    from ipop import __version__
    from ipop.cli import control, netcheck, scale

    p = argparse.ArgumentParser(prog="ipop", description="IP-over-P2P overlay VPN")
    p.add_argument("--version", action="version", version=f"ipop {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    control.add_parsers(sub)
    netcheck.add_parser(sub)
    up = sub.add_parser("up", help="run a node in the foreground")
    up.add_argument("-c", "--config", required=True)
    up.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    up.set_defaults(func=cmd_up)
    idp = sub.add_parser("id", help="print this node's UID and certificate fingerprint")
    idp.add_argument("-c", "--config", required=True)
    idp.add_argument("--json", action="store_true")
    idp.set_defaults(func=cmd_id)
    stp = sub.add_parser("status", help="show a running node and its links")
    stp.add_argument("-c", "--config")
    stp.add_argument("--control", help="path of the control socket")
    stp.add_argument("--json", action="store_true")
    stp.set_defaults(func=cmd_status)
    rlp = sub.add_parser("reload", help="re-read a running node's config and apply what can "
                                        "change live (as SIGHUP does)")
    rlp.add_argument("-c", "--config")
    rlp.add_argument("--control", help="path of the control socket")
    rlp.add_argument("--json", action="store_true")
    rlp.set_defaults(func=cmd_reload)
    demo = sub.add_parser("demo", help="run a demo overlay in network namespaces")
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--controller", choices=["groupvpn", "socialvpn", "static"],
                      default="groupvpn")
    demo.add_argument("--seconds", type=int, default=3, help="iperf3 duration")
    demo.add_argument("--plain", dest="sec", action="store_false",
                      help="static mode: plain links (default: encrypted)")
    demo.set_defaults(func=cmd_demo)
    bench = sub.add_parser("bench", help="measure ipop side by side with direct and its peers")
    bench.add_argument("--peers", action="store_true",
                       help="also measure wireguard-go and tinc (skipped when not installed)")
    bench.add_argument("--seconds", type=int, default=5,
                       help="iperf3 TCP duration per case (sweep points: half, at least 1)")
    bench.add_argument("--quick", action="store_true",
                       help="fewer cases: unshaped veth only, 2 packet sizes, 1 s sweep points")
    bench.add_argument("--links", help="comma list of link conditions: veth,tbf1g "
                                       "(default: both; --quick: veth)")
    bench.add_argument("--loss-model", choices=["testbed", "datagram"], default="testbed",
                       help="testbed: Testbed.set_loss, nftables drop per skb at egress; "
                            "datagram: per wire datagram, offloads off on the veth during the "
                            "loss cases, so the receiver loses GRO too (diagnostic)")
    bench.add_argument("--metrics", action="store_true",
                       help="also measure ipop encrypted with metrics_listen on, scraped once "
                            "a second (the cost of serving metrics, same run)")
    bench.add_argument("--rounds", type=int, default=1,
                       help="measure every system this many times, interleaved, and report "
                            "medians with the spread (a shared machine drifts; default 1)")
    bench.add_argument("--workers", type=int, default=None, metavar="N",
                       help="data-plane shards of both ipop nodes (1-8; default: their "
                            "config default, auto)")
    bench.add_argument("--json", metavar="FILE", help="write the results as JSON")
    bench.add_argument("--png", metavar="FILE", help="write a throughput/packet-size chart")
    bench.set_defaults(func=cmd_bench)
    scale.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
        return rc
    except ConfigError as exc:
        print(f"ipop: {exc}", file=sys.stderr)
        return 2
    except IpopError as exc:
        print(f"ipop: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
