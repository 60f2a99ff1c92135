"""The speed benchmark's contract (it asserts no times: benchmarks measure, tests prove).

On a tiny model: every schedule runs through one compiled graph (none compiled while
the schedules are swapped), the ideal speedup follows the FLOPs, and the report files
are written.
"""
import json

import pytest

from bcc.tools.bench.speed import bench_workload
from bcc.tools.bench.speed_report import write_report
from bcc.tools.bench.workloads import build_workload


@pytest.fixture(scope="module")
def result():
    w = build_workload("pixart", steps=4)
    return bench_workload(w, schedules=("all", "every-2", "plan-0.7", "region-span-2"), repeats=1, eager=True,
                          eager_schedules=("every-2",), specialize=4, hybrid=True, search_seeds=(7,),
                          log=lambda msg: None)


def test_one_graph_serves_every_schedule(result):
    assert result["compile"]["bcc"]["graphs"] == 1
    assert result["graphs_during_timing"] == 0
    assert result["compile"]["specialize"]["graphs"] >= 2  # rows: all True, all False, the plan's
    assert 2 <= result["compile"]["hybrid"]["graphs"] <= 4  # uniform rows, one branch graph for the mixed


def test_planned_schedule_is_searched_within_its_measured_budget_or_said_unreachable(result):
    """On this tiny model what runs outside the blocks may cost more than 30% of a step, so
    the budget may be out of reach on a given machine: then the run says so and goes on."""
    found = result["search"]["plan-0.7"]
    assert len(result["cost_model"]["block_costs_s"]) == len(result["blocks"])
    if "unreachable" in found:
        assert "BCC503" in found["unreachable"] and "plan-0.7" not in result["schedules"]
        return
    assert found["budget"] == 0.7 and found["cost_source"] == "measured"
    assert found["chosen"]["fraction"] <= 0.7 and len(found["tried"]) >= 2
    assert result["schedules"]["plan-0.7"]["compiled"]["speedup"] > 0


def test_ideal_follows_the_flops(result):
    s = result["schedules"]
    assert s["all"]["compute_fraction"] == pytest.approx(1.0)
    flops, rest = sum(result["block_flops"]), result["rest_flops"]
    want = (4 * rest + 2 * flops) / (4 * (rest + flops))  # every-2 over 4 steps computes blocks twice
    assert s["every-2"]["compute_fraction"] == pytest.approx(want)
    for row in s.values():
        # A region schedule runs on a model of its own (branch strategy only).
        for backend in ("compiled",) if "blocks" in row else ("compiled", "specialize", "hybrid"):
            assert row[backend]["speedup"] > 0
            assert row[backend]["efficiency"] == pytest.approx(row[backend]["speedup"] * row["compute_fraction"])
    assert "eager" in s["every-2"] and "eager" not in s["all"]


def test_report_files(result, tmp_path):
    result.update(command="test", threads=1, torch="x")
    write_report({"pixart": result}, tmp_path)
    md = (tmp_path / "speed.md").read_text()
    assert "Gate overhead" in md and "| bcc every-2 |" in md and "hybrid: speedup | efficiency |" in md
    assert json.loads((tmp_path / "speed.json").read_text())["workloads"]["pixart"]["steps"] == 4
    assert (tmp_path / "speed.png").stat().st_size > 10_000
    assert "| plan-0.7 |" in md  # the search table (a row either way)


def test_frontier_plot_of_a_trained_workload(result, tmp_path):
    from bcc.tools.bench.speed_report import plot_frontier

    r = json.loads(json.dumps(result, default=str))
    r["fidelity"] = {k: {"psnr_db": 30.0 + i} for i, k in enumerate(r["schedules"])}
    r["fewer"] = {"3": {"steps": 3, "speedup": 1.3, "psnr_db": 33.0, "ssim": 0.9}}
    r["peers"] = {"rows": [{"method": "fbc", "label": "FBC t=0.1", "psnr_db": 31.0, "eager_speedup": 1.2}]}
    plot_frontier(r, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 10_000


def test_recost_recomputes_fractions_and_keeps_timings(result, tmp_path):
    from bcc.tools.bench.speed import recost

    result.update(command="test", threads=1, torch="x")
    doctored = json.loads(json.dumps(result, default=str))
    doctored["block_flops"] = [1.0] * len(doctored["block_flops"])  # as if counted wrong
    for row in doctored["schedules"].values():
        row["compute_fraction"] = 0.123
    (tmp_path / "speed.json").write_text(json.dumps({"workloads": {"pixart": doctored}}))
    recost(tmp_path, ["pixart"])
    again = json.loads((tmp_path / "speed.json").read_text())["workloads"]["pixart"]
    assert again["block_flops"] == pytest.approx(result["block_flops"])
    for k, row in again["schedules"].items():
        assert row["compute_fraction"] == pytest.approx(result["schedules"][k]["compute_fraction"])
        assert row["compiled"]["speedup"] == pytest.approx(result["schedules"][k]["compiled"]["speedup"])
    assert "recosted" in again


def test_region_rows_count_their_own_flops(result):
    """The span of all blocks as one region, every 2 steps: blocks computed at 2 of 4 steps, its
    FLOPs (the blocks' and the code between them) counted on its own blocks."""
    row = result["schedules"]["region-span-2"]
    assert row["blocks"] == [f"{result['blocks'][0]}..{result['blocks'][-1]}"]
    held, rest = row["block_flops"][0], row["rest_flops"]
    assert held >= sum(result["block_flops"]) * 0.999 and held + rest == pytest.approx(
        sum(result["block_flops"]) + result["rest_flops"])
    assert row["compute_fraction"] == pytest.approx((4 * rest + 2 * held) / (4 * (rest + held)))
    assert row["compiled"]["speedup"] > 0
