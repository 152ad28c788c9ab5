"""``ipop bench --quick``: every system and case gives a positive number, JSON and PNG written.

Runs in-process through ``ipop.cli.main.main`` (argument parsing included), on the unshaped veth
only, with wireguard-go and tinc when they are installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ipop.cli.main import main
from ipop.testbed.netns import list_namespaces, run_stem

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAVE_PEERS = all(shutil.which(p, path="/usr/sbin:/usr/bin:/sbin:/bin")
                 for p in ("wireguard-go", "wg", "tincd"))


@pytest.mark.timeout(240)
def test_bench_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--quick", "--seconds", "1", "--json", str(out_json), "--png", str(out_png)]
    if HAVE_PEERS:
        argv.append("--peers")
    rc = main(argv)
    printed = capsys.readouterr().out
    doc = json.loads(out_json.read_text())
    assert rc == 0, doc["failures"]
    assert doc["schema"] == "ipop-bench/1" and doc["failures"] == []

    expected = {"direct", "ipop-enc", "ipop-plain"}
    if HAVE_PEERS:
        expected |= {"wireguard-go", "tinc"}
    assert set(doc["systems"]) == expected
    assert list(doc["links"]) == ["veth"]
    for name, system in doc["systems"].items():
        assert system["mtu"] > 0 and system["up_seconds"] >= 0, name
        res = system["links"]["veth"]
        for key in ("tcp1_mbit", "tcp4_mbit", "tcp8_mbit", "ping_avg_ms", "ping_p50_ms",
                    *(f"loss{pct}_mbit" for pct in doc["losses"])):
            assert isinstance(res[key], float) and res[key] > 0, (name, key, res[key])
        assert [p["size"] for p in res["sweep"]] == doc["sizes"], name
        for point in res["sweep"]:
            assert point["mbit"] > 0 and point["pps"] > 0, (name, point)
            assert point["size_used"] == min(point["size"], system["mtu"]), (name, point)
        assert res["ratios"]["vs_direct"]["tcp1_mbit"] > 0, name
        if HAVE_PEERS:
            assert res["ratios"]["vs_wireguard-go"]["tcp1_mbit"] > 0, name
        if system["overlay"]:
            assert res["cpu_pct"]["sender"] > 0 and res["cpu_pct"]["receiver"] > 0, name
            assert set(system["idle_cpu_pct"]) == {"sender", "receiver"}, name
            assert all(v >= 0 for v in system["idle_cpu_pct"].values()), name
        else:
            assert res["cpu_pct"] == {} and system["idle_cpu_pct"] is None
    assert doc["workers"] >= 1 and doc["workers_asked"] == "auto"
    assert doc["systems"]["ipop-enc"]["security"] == "dtls"
    assert doc["systems"]["ipop-plain"]["security"] == "none"
    assert any(t["system"] == "ipop-enc" for t in doc["targets"])

    assert out_png.read_bytes()[:8] == PNG_MAGIC
    assert "TCP 1 stream" in printed and "packet-size sweep" in printed
    for name in expected:
        assert name in printed
    assert not [ns for ns in list_namespaces() if ns.startswith(run_stem())]
    assert not list(Path("/var/run/wireguard").glob(f"wgb{run_stem()[3:]}*.sock"))


def test_bench_rejects_bad_links() -> None:
    assert main(["bench", "--links", "nope"]) == 2


def test_report_with_a_system_that_did_not_start(tmp_path: Path) -> None:
    """Tables, targets and chart cope with nulls: a failed case, a system that never started."""
    from rich.console import Console

    from ipop.bench import report
    from ipop.bench.run import add_ratios

    def res(scale: float) -> dict:
        return {"ping_avg_ms": 0.1 / scale, "ping_p50_ms": 0.1 / scale, "tcp1_mbit": 900 * scale,
                "tcp4_mbit": None, "cpu_pct": {"sender": 50.0, "receiver": 40.0},
                "loss1_mbit": 300 * scale, "loss3_mbit": 100 * scale,
                "sweep": [{"size": 64, "size_used": 64, "mbit": 10 * scale, "pps": 20000 * scale},
                          {"size": 1400, "size_used": 1374, "mbit": 1.0, "pps": 90}]}

    def system(scale: float | None) -> dict:
        started = scale is not None
        return {"label": "x", "overlay": True, "version": "v" if started else None,
                "security": "none", "mtu": 1374, "up_seconds": 0.1,
                "idle_cpu_pct": {"sender": 0.1, "receiver": 0.2} if started else None,
                "links": {"veth": res(scale) if started else {"sweep": []}}}

    doc = {"started": "now", "duration_s": 1.0, "seconds": 1, "sweep_seconds": 1,
           "loss_model": "datagram", "machine": {"cpus": 2, "kernel": "k"},
           "links": {"veth": "unshaped veth"}, "sizes": [64, 1400], "losses": [1, 3],
           "systems": {"direct": system(2.0), "ipop-enc": system(1.0),
                       "ipop-plain": system(None), "wireguard-go": system(0.5)},
           "failures": ["ipop-plain: did not start"], "notes": []}
    add_ratios(doc)
    doc["targets"] = report.targets(doc)
    enc = {t["target"]: t["ok"] for t in doc["targets"] if t["system"] == "ipop-enc"}
    assert enc["veth: TCP ≥ 8 x wireguard-go"] is False
    assert enc["unshaped veth: no cliff (worst step ≥ 0.5 x previous)"] is False
    console = Console(record=True, width=160)
    report.render(doc, console)
    text = console.export_text()
    assert "did not start" in text and "*1374" in text
    report.write_png(doc, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC
