"""Before/after figures for issue 16 (not a test): link set-up time, ping RTT and TCP throughput of
a plain GroupVPN link, two nodes on one LAN with a real prosody, rounds alternating between this
checkout and another source tree (``--base SRC``: e.g. an unpacked ``git archive`` of main).

    .venv/bin/python -m tests.net.bench_link_auth --base /tmp/base/src --rounds 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="src/ of the tree to compare against")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
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
