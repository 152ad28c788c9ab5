"""Issue 16 attack figures, before and after (not a test): the same attacks as
``test_link_auth`` run against nodes from another source tree (``--base SRC``, e.g. an unpacked
``git archive`` of main) and from this checkout, and what each attack achieved is printed.

    .venv/bin/python -m tests.net.bench_attacks --base /tmp/base/src
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

from ipop.testbed.nodes import NodeProc
from ipop.wire import header as wh

from .helpers import wait_for
from .test_link_auth import ATTACKER, data_frames, linked
from .test_security import MARK, MARK_HEX, Capture, frame_type, ping_marked, udp_datagrams
from .world import World


def start(node: NodeProc, src: str | None, **attack: Any) -> None:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src
    if attack:
        env["IPOP_ATTACK"] = json.dumps(attack)
        node.start(env=env, prefix=[sys.executable, str(ATTACKER)])
    else:
        node.start(env=env)


def impersonation(world: World, tag: str, src: str | None, net: int) -> dict[str, Any]:
    a = world.node(f"{tag}ia", f"100.64.{net}.1", group=f"{tag}i")
    b = world.node(f"{tag}ib", f"100.64.{net}.2", group=f"{tag}i")
    c = world.node(f"{tag}ic", f"100.64.{net}.3", group=f"{tag}i")
    for n in (a, b):
        start(n, src)
    for n in (a, b):
        n.wait_ready()
    wait_for(lambda: linked(a, b) and linked(b, a), timeout=20, what="a<->b up")
    cap = Capture(c.host, world.dir / f"{tag}ic.pcap")
    pinger = a.host.popen(["ping", "-n", "-i", "0.05", "-c", "300", "-W", "1", "-p", MARK_HEX,
                           b.config["ip4"]], stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    start(c, src, uid=b.uid)
    out, _ = pinger.communicate(timeout=60)
    packets = cap.stop()
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    dgrams = udp_datagrams(packets)
    resets = len(re.findall(r"link to \S+ removed", a.log()))
    result = {"pings_answered": f"{m.group(2)}/{m.group(1)}" if m else out,
              "a_link_resets": resets,
              "data_datagrams_a_to_c": len(data_frames(dgrams, world.inet.members[f"{tag}ia"])),
              "marker_datagrams_at_c": sum(1 for d in dgrams if MARK in d.payload)}
    for n in (a, b, c):
        n.stop()
    return result


def downgrade(world: World, tag: str, src: str | None, net: int) -> dict[str, Any]:
    a = world.node(f"{tag}da", f"100.64.{net}.1", group=f"{tag}d", security_groups=["blue"])
    b = world.node(f"{tag}db", f"100.64.{net}.2", group=f"{tag}d", security_groups=["blue"])
    cap = Capture(a.host, world.dir / f"{tag}da.pcap")
    for n in (a, b):
        start(n, src, rewrite_groups={"blue": "bluf"}, strip_encrypt=True)
    for n in (a, b):
        n.wait_ready()
    time.sleep(4.0)
    got = ping_marked(a.host, b.config["ip4"], count=50, interval=0.05, wait=1)
    got += ping_marked(b.host, a.config["ip4"], count=50, interval=0.05, wait=1)
    packets = cap.stop()
    dgrams = udp_datagrams(packets)
    link = a.link_to(b) or {}
    result = {"link": f"{link.get('security')}/{link.get('security_reason')}",
              "pings_answered": f"{got}/100",
              "marker_datagrams": sum(1 for d in dgrams if MARK in d.payload),
              "underlay_datagrams": len(dgrams)}
    for n in (a, b):
        n.stop()
    return result


def require_one_side(world: World, tag: str, src: str | None, net: int) -> dict[str, Any]:
    a = world.node(f"{tag}ra", f"100.64.{net}.1", group=f"{tag}r", security_groups=["red"],
                   require_encryption=True)
    b = world.node(f"{tag}rb", f"100.64.{net}.2", group=f"{tag}r", security_groups=["green"])
    cap = Capture(b.host, world.dir / f"{tag}rb.pcap")
    start(a, src, strip_encrypt=True)
    start(b, src)
    for n in (a, b):
        n.wait_ready()
    time.sleep(4.0)
    ping_marked(b.host, a.config["ip4"], count=100, interval=0.02, wait=1)
    packets = cap.stop()
    dgrams = udp_datagrams(packets)
    b_addr = world.inet.members[f"{tag}rb"]
    plain = [d for d in dgrams if d.src == b_addr and frame_type(d) is not None
             and d.payload[0] in (wh.T_DATA, wh.T_KEEPALIVE, wh.T_DATA_PARTIAL, wh.T_TRAIN)]
    link = b.link_to(a) or {}
    result = {"b_link": f"{link.get('security')}/{link.get('state')}",
              "plaintext_datagrams_from_b": len(plain),
              "marker_datagrams_from_b": sum(1 for d in dgrams if d.src == b_addr
                                             and MARK in d.payload)}
    for n in (a, b):
        n.stop()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    args = ap.parse_args()
    groups: dict[str, list[str]] = {}
    for tag in ("o", "n"):
        groups[f"{tag}i"] = [f"{tag}ia", f"{tag}ib", f"{tag}ic"]
        groups[f"{tag}d"] = [f"{tag}da", f"{tag}db"]
        groups[f"{tag}r"] = [f"{tag}ra", f"{tag}rb"]
    world = World(groups)
    try:
        for i, (name, fn) in enumerate((("impersonation", impersonation),
                                        ("downgrade", downgrade),
                                        ("require_encryption", require_one_side))):
            before = fn(world, "o", args.base, 50 + 2 * i)
            after = fn(world, "n", None, 51 + 2 * i)
            print(f"{name}: before {before}\n{name}: after  {after}", flush=True)
    finally:
        world.close()


if __name__ == "__main__":
    main()
