"""``ipop.bench.rounds``: several rounds of one system fold into medians with the spread kept,
and the report shows both."""

from __future__ import annotations

import statistics
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from ipop.bench import report, rounds
from ipop.bench.run import add_ratios
from ipop.cli.main import main


def _link(tcp1: float | None, ping: float, pps: int, sender_cpu: float) -> dict[str, Any]:
    return {"ping_avg_ms": ping, "ping_p50_ms": ping, "tcp1_mbit": tcp1, "tcp4_mbit": 100.0,
            "loss1_mbit": 50.0, "loss3_mbit": 20.0,
            "cpu_pct": {"sender": sender_cpu, "receiver": 10.0},
            "sweep": [{"size": 64, "size_used": 64, "mbit": pps * 64 * 8 / 1e6, "pps": pps},
                      {"size": 1400, "size_used": 1374, "mbit": 500.0, "pps": 45000}]}


def _system(version: str | None, link: dict[str, Any], up: float = 0.1) -> dict[str, Any]:
    return {"label": "x", "overlay": True, "version": version, "security": "dtls", "mtu": 1374,
            "up_seconds": up, "idle_cpu_pct": {"sender": 0.2, "receiver": 0.4},
            "links": {"veth": link}}


def test_fold_takes_medians_and_keeps_every_round() -> None:
    runs = [_system("v1", _link(2000.0, 1.5, 20000, 80.0), up=0.3),
            _system("v1", _link(1800.0, 0.9, 18000, 70.0), up=0.1),
            _system("v1", _link(None, 1.1, 25000, 90.0), up=0.2)]  # round 3's TCP case failed
    out = rounds.fold(runs, [1, 3])
    res = out["links"]["veth"]
    assert out["rounds"] == 3 and out["up_seconds"] == 0.2
    assert res["tcp1_mbit"] == 1900.0  # median of the rounds that measured it
    assert res["ping_avg_ms"] == 1.1
    assert res["runs"]["tcp1_mbit"] == [2000.0, 1800.0, None]
    assert res["cpu_pct"] == {"sender": 80.0, "receiver": 10.0}
    assert [p["pps"] for p in res["sweep"]] == [20000, 45000]
    assert [p["size_used"] for p in res["sweep"]] == [64, 1374]
    assert rounds.spread(res, "tcp1_mbit") == (1800.0, 2000.0)
    assert rounds.spread(runs[0]["links"]["veth"], "tcp1_mbit") is None  # a single round


def test_fold_of_a_system_that_started_only_once() -> None:
    empty = {"ping_avg_ms": None, "ping_p50_ms": None, "tcp1_mbit": None, "tcp4_mbit": None,
             "loss1_mbit": None, "loss3_mbit": None, "cpu_pct": {}, "sweep": []}
    never = _system(None, empty)
    never["idle_cpu_pct"] = None
    out = rounds.fold([_system("v2", _link(900.0, 0.7, 1000, 5.0)), never], [1, 3])
    assert out["version"] == "v2"  # labels come from a round that started
    assert out["links"]["veth"]["tcp1_mbit"] == 900.0
    all_failed = rounds.fold([never, never], [1, 3])
    assert all_failed["links"]["veth"]["tcp1_mbit"] is None
    assert all_failed["idle_cpu_pct"] is None


@given(st.lists(st.one_of(st.none(), st.floats(0, 1e5, allow_nan=False)), min_size=1,
                max_size=9))
def test_median_ignores_failed_rounds(values: list[float | None]) -> None:
    nums = [v for v in values if v is not None]
    m = rounds.median(values)
    if not nums:
        assert m is None
    else:
        assert m is not None
        assert min(nums) - 1e-3 <= m <= max(nums) + 1e-3
        assert abs(m - statistics.median(nums)) < 1e-3


def test_report_shows_medians_and_spread() -> None:
    doc: dict[str, Any] = {
        "started": "now", "duration_s": 1.0, "seconds": 1, "sweep_seconds": 1, "rounds": 2,
        "loss_model": "testbed", "machine": {"cpus": 2, "kernel": "k"},
        "links": {"veth": "unshaped veth"}, "sizes": [64, 1400], "losses": [1, 3],
        "failures": [], "notes": [],
        "systems": {
            "direct": rounds.fold([_system("k", _link(16000.0, 0.06, 90000, 0.0)),
                                   _system("k", _link(15000.0, 0.07, 80000, 0.0))], [1, 3]),
            "ipop-enc": rounds.fold([_system("i", _link(2100.0, 1.2, 20000, 80.0)),
                                     _system("i", _link(1900.0, 1.0, 19000, 80.0))], [1, 3]),
        },
    }
    add_ratios(doc)
    assert doc["systems"]["ipop-enc"]["links"]["veth"]["ratios"]["vs_direct"]["tcp1_mbit"] == (
        round(2000.0 / 15500.0, 3))
    console = Console(record=True, width=200)
    report.render(doc, console)
    text = console.export_text()
    assert "medians of 2 rounds" in text and "2 rounds" in text
    assert "1,900-2,100" in text and "1.000-1.200" in text


def test_bench_refuses_a_bad_round_count() -> None:
    assert main(["bench", "--rounds", "0"]) == 2


def test_bench_metrics_adds_the_scraped_system() -> None:
    from ipop.bench.peers import SYSTEMS
    from ipop.cli.bench import make_plan
    from ipop.cli.main import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--metrics"])
    plan, _ = make_plan(args)
    assert plan.systems[-1] == "ipop-enc-metrics"
    assert SYSTEMS["ipop-enc-metrics"].extra == {"metrics_listen": "127.0.0.1:9477"}
    plain, _ = make_plan(build_parser().parse_args(["bench", "--quick"]))
    assert "ipop-enc-metrics" not in plain.systems
