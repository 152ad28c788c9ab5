"""Before/after figures for issue 16 (not a test): link set-up time, ping RTT and TCP throughput of
a plain GroupVPN link, two nodes on one LAN with a real prosody, rounds alternating between this
checkout and another source tree (``--base SRC``: e.g. an unpacked ``git archive`` of main).

    .venv/bin/python -m tests.net.bench_link_auth --base /tmp/base/src --rounds 3
    .venv/bin/python -m tests.net.bench_link_auth --base /tmp/base/src --micro

``--micro``: only the send cost of one plain ``LinkSender.send_packet`` (1400 B to localhost,
best of 7 times 50,000), each tree in its own process, alternating.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

from .helpers import gbits, iperf3, wait_for
from .world import World


def one_round(world: World, tag: str, i: int, src: str | None) -> dict[str, float]:
    a = world.node(f"{tag}{i}a", f"100.64.40.{2 * i + 1}", group=f"{tag}{i}")
    b = world.node(f"{tag}{i}b", f"100.64.40.{2 * i + 2}", group=f"{tag}{i}")
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src
    try:
        for n in (a, b):
            n.start(env=env, log_level="WARNING")
        for n in (a, b):
            n.wait_ready()
        t0 = time.monotonic()

        def up() -> bool:
            la, lb = a.link_to(b), b.link_to(a)
            return bool(la and lb and la["state"] == "up" and lb["state"] == "up")

        wait_for(up, timeout=30, step=0.01, what="link up")
        setup = time.monotonic() - t0
        r = a.host.run(["ping", "-n", "-q", "-c", "100", "-i", "0.01", b.config["ip4"]],
                       check=False, timeout=30)
        m = re.search(r"= [\d.]+/([\d.]+)/", r.stdout)
        rtt = float(m.group(1)) if m else float("nan")
        tput = gbits(iperf3(a.host, b.host, b.config["ip4"], seconds=4))
        assert a.link_to(b)["security"] == "none"
        return {"setup_s": setup, "rtt_ms": rtt, "gbit_s": tput}
    finally:
        a.stop()
        b.stop()


MICRO = """
import socket, time
from ipop.dataplane.link import Link, Path
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.bind(("127.0.0.1", 0))
rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
link = Link(local_uid=b"\\x01" * 20, peer_uid=b"\\x02" * 20, path=Path(tx, rx.getsockname()),
            overlay_ip4=bytes([100, 64, 0, 2]))
link.authed = True  # its handshake is done (an attribute the older tree ignores)
pkt = bytes(1400)
send = getattr(link, "tx", link).send_packet  # the send half (issue 15), or the older Link
best = 1e9
for _ in range(7):
    t0 = time.perf_counter()
    for _ in range(50000):
        send(pkt)
    best = min(best, (time.perf_counter() - t0) / 50000)
print(round(best * 1e9))
"""


def micro(base: str, rounds: int) -> None:
    for _ in range(rounds):
        for name, src in (("before", base), ("after", None)):
            env = dict(os.environ)
            if src is not None:
                env["PYTHONPATH"] = src
            r = subprocess.run([sys.executable, "-c", MICRO], env=env, capture_output=True,
                               text=True, check=True)
            print(f"{name}: {r.stdout.strip()} ns per plain send_packet", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="src/ of the tree to compare against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--micro", action="store_true")
    args = ap.parse_args()
    if args.micro:
        micro(args.base, args.rounds)
        return
    groups = {f"{t}{i}": [f"{t}{i}a", f"{t}{i}b"] for t in ("o", "n") for i in
              range(args.rounds)}
    world = World(groups)
    results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    try:
        for i in range(args.rounds):
            results["before"].append(one_round(world, "o", i, args.base))
            results["after"].append(one_round(world, "n", i, None))
            print(i, results["before"][-1], results["after"][-1], flush=True)
    finally:
        world.close()
    for name, rows in results.items():
        print(name, {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]})


if __name__ == "__main__":
    main()
