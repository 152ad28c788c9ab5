"""``ipop scale``'s plan checks, medians, log scraping and report (no test bed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from ipop.bench import scale, scale_report
from ipop.cli.main import main
from ipop.cli.scale import parse_sizes
from ipop.errors import ConfigError


def test_sizes_parse_and_bad_ones_name_the_key() -> None:
    assert parse_sizes("8,16, 32") == [8, 16, 32]
    for bad in ("", "8,x"):
        with pytest.raises(ConfigError) as exc:
            parse_sizes(bad)
        assert exc.value.key == "nodes"


@pytest.mark.parametrize(("plan", "key"), [
    (scale.ScalePlan(sizes=[1]), "nodes"),
    (scale.ScalePlan(sizes=[300]), "nodes"),
    (scale.ScalePlan(sizes=[8], rounds=0), "rounds"),
    (scale.ScalePlan(sizes=[4], mode="on-demand", pairs=7), "pairs"),  # 4 nodes: 6 pairs
])
def test_plan_check(plan: scale.ScalePlan, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        plan.check()
    assert exc.value.key == key


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scale", "--nodes", "1"]) == 2
    assert "nodes" in capsys.readouterr().err


def test_node_config_by_mode() -> None:
    assert scale.ScalePlan(sizes=[8]).node_extra() == {"sec": True}
    od = scale.ScalePlan(sizes=[8], mode="on-demand", encrypted=False).node_extra()
    assert od["sec"] is False and od["on-demand_connection"] is True


def test_medians_skip_missing_values() -> None:
    rounds = [{"mesh_s": 10.0, "failures": 0}, {"mesh_s": None, "failures": 2},
              {"mesh_s": 14.0, "failures": 1}]
    med = scale.summarize(rounds)
    assert med["mesh_s"] == 12.0 and med["failures"] == 1
    assert scale.summarize([{"mesh_s": None}])["mesh_s"] is None


class _Node:
    def __init__(self, text: str) -> None:
        self.text = text

    def log(self) -> str:
        return self.text


class _Overlay:
    def __init__(self, *logs: str) -> None:
        self.nodes = [_Node(t) for t in logs]


def test_failures_and_xmpp_drops_come_from_the_logs() -> None:
    ov = _Overlay(
        "x WARNING ipop.controller: link set-up with n2@ipop.test/r1 failed: ICE: no pair\n"
        "x INFO ipop.controller: link set-up with n3@ipop.test timed out in state requested\n",
        "x WARNING ipop.controller: link set-up with n1@ipop.test/r failed: ICE: no pair\n"
        "x WARNING ipop.signal.xmpp: xmpp: connection to 198.19.1.1:5222 lost (eof); ...\n"
        "x WARNING ipop.signal.xmpp: xmpp: server did not answer a ping; dropping\n",
    )
    assert scale.failure_reasons(ov) == {  # type: ignore[arg-type]
        "ICE: no pair": 2, "timed out in state requested": 1}
    assert scale.xmpp_drops(ov) == 2  # type: ignore[arg-type]


def test_pss_of_this_process() -> None:
    import os

    value = scale.pss_mb(os.getpid())
    assert value is not None and value > 1
    assert scale.pss_mb(2**22 + 12345) is None


def test_report_renders_and_writes(tmp_path: Path) -> None:
    doc = {"schema": scale.SCHEMA, "started": "t", "mode": "proactive", "encrypted": True,
           "rounds": 1, "seed": 1, "machine": {"cpus": 2, "kernel": "k"}, "failures": [],
           "notes": [], "sizes": {"8": {"rounds": [{
               "nodes": 8, "links": 56, "ready_s": 2.0, "mesh_s": 3.0,
               "mesh_after_ready_s": 1.0, "failures": 0, "xmpp_drops": 0,
               "startup_cpu_s": 4.5, "startup_cpu_median_s": 0.56, "ping_ok": 56,
               "ping_total": 56, "pss_median_mb": 56.0, "pss_max_mb": 57.0,
               "idle_cpu_total_pct": 3.8, "idle_cpu_median_pct": 0.4,
               "idle_cpu_max_pct": 0.6}]}}}
    for entry in doc["sizes"].values():  # type: ignore[attr-defined]
        entry["median"] = scale.summarize(entry["rounds"])
    console = Console(record=True, width=200)
    scale_report.render(doc, console)
    assert "3.0 s" in console.export_text()
    scale_report.write_json(doc, tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["schema"] == "ipop-scale/1"
    scale_report.write_png(doc, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
