"""The quality benchmark's resume contract: an interrupted run continues where it stopped."""
import pytest
import torch

import bcc
from bcc.tools.bench import quality
from bcc.tools.bench.resume import Resume
from bcc.tools.digits import default_model_dir, load_digits_model, make_scheduler


def _count(monkeypatch, calls, owner, name, key):
    """Replace ``owner.name`` with a wrapper that counts its calls in ``calls[key]``."""
    real = getattr(owner, name)

    def counting(*args, **kwargs):
        calls[key] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)


@pytest.mark.slow  # a whole (tiny) quality run twice: ~60 s each
def test_interrupted_quality_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    calls = {"generate": 0, "time": 0, "calibrate": 0}

    def fake_time(models, run, labels, repeats):  # timing is not under test: no compiles
        calls["time"] += 1
        return {k: 1.5 if k == "plain" else 1.0 for k in models}

    _count(monkeypatch, calls, quality, "_generate", "generate")
    _count(monkeypatch, calls, quality.bcc, "calibrate", "calibrate")
    monkeypatch.setattr(quality, "_time", fake_time)
    (tmp_path / "out").mkdir()
    kw = dict(n=10, seeds=[0, 1], budget=0.7, blocks=quality.ALL_BLOCKS, guidance=3.0, chunk=10, repeats=1,
              out_dir=tmp_path / "out", log=lambda msg: None, rows=("baseline", "fewer", "cached"),
              resume=tmp_path / "partial")
    first = quality.bench_config("unet", "ddim", 3, **kw)
    assert calls == {"generate": 6, "time": 2, "calibrate": 1} and first["fewer_steps"] == 2
    # Interrupted during the second seed: its images were never written.
    kept = tmp_path / "partial" / "unet_ddim3"
    for f in kept.glob("*_seed1.pt"):
        f.unlink()
    second = quality.bench_config("unet", "ddim", 3, **kw)
    assert calls == {"generate": 9, "time": 2, "calibrate": 1}  # seed 1 again; no calibration, timing or seed 0
    assert second["rows"] == first["rows"] and second["speedup"] == first["speedup"]
    assert torch.load(kept / "cached_seed0.pt").shape[0] == 10
    # Other parameters are another experiment: what was kept is dropped.
    state = Resume(tmp_path / "partial", "unet_ddim3", {"n": 30})
    assert state.get("timing") is None and not list(kept.glob("*.pt")) and state.file("schedule.json") is None


@pytest.mark.slow  # a whole (tiny) quality run twice: ~60 s each
def test_new_scale_shift_parameters_redo_only_the_scale_shift_row(tmp_path, monkeypatch):
    calls = {"generate": 0, "time": [], "train": 0}

    def fake_time(models, run, labels, repeats):
        calls["time"].append(sorted(models))
        return {k: {"plain": 1.5, "bcc": 1.0, "bcc_ss": 1.1}.get(k, 1.2) for k in models}

    _count(monkeypatch, calls, quality, "_generate", "generate")
    _count(monkeypatch, calls, quality.bcc, "train_scale_shift", "train")
    monkeypatch.setattr(quality, "_time", fake_time)
    (tmp_path / "out").mkdir()
    kw = dict(n=10, seeds=[0, 1], budget=0.7, blocks=quality.ALL_BLOCKS, guidance=3.0, chunk=10, repeats=1,
              out_dir=tmp_path / "out", log=lambda msg: None, rows=("baseline", "cached", "cached_ss"),
              resume=tmp_path / "partial", ss_iterations=2)
    first = quality.bench_config("unet", "ddim", 3, **kw)
    assert calls["generate"] == 6 and calls["train"] == 1 and len(calls["time"]) == 1
    kept = tmp_path / "partial" / "unet_ddim3"
    baseline_before = torch.load(kept / "baseline_seed0.pt")
    second = quality.bench_config("unet", "ddim", 3, **kw, ss_lr=1e-3)
    # Retrained and re-sampled for the scale-shift row only (two seeds), timed against the same models.
    assert calls["generate"] == 8 and calls["train"] == 2
    assert calls["time"][1] == ["bcc", "bcc_ss", "plain"]
    assert torch.equal(torch.load(kept / "baseline_seed0.pt"), baseline_before)
    assert second["rows"]["cached"] == first["rows"]["cached"] and second["scale_shift"]["lr"] == 1e-3
    assert "loss_first10" in second["scale_shift"]
    assert second["speedup"] == {"cached": 1.5, "cached_ss": 1.5 / 1.1}


def test_resume_state_from_before_scale_shift_had_its_own_key_is_kept(tmp_path):
    import json

    d = tmp_path / "unet_ddim50"
    d.mkdir()
    (d / "baseline_seed0.pt").write_bytes(b"x")
    (d / "state.json").write_text(json.dumps({"params": {"n": 10, "ss": [150, "table", "final", 1, False]},
                                              "timing": {"speedup": {"cached": 1.3}}}))
    ss = {"iterations": 150, "kind": "table", "loss": "final", "groups": 1, "guided": False, "lr": 5e-3}
    state = Resume(tmp_path, "unet_ddim50", {"n": 10}, ss)
    assert state.file("baseline_seed0.pt") is not None and state.get("timing") == {"speedup": {"cached": 1.3}}


def test_combine_merges_runs_from_other_folders_row_by_row(tmp_path):
    import json

    import pytest

    import bcc

    floor = {"real_vs_real_2500": [0.61, 0.02]}

    def write(name, results, commands):
        (tmp_path / name).mkdir()
        (tmp_path / name / "quality.json").write_text(
            json.dumps({"commands": commands, "threads": 1, "floors": floor, "results": results}))

    def config(steps, rows):
        return {"arch": "dit", "solver": "ddim", "steps": steps, "seed_to_seed_fd": [0.2, 0.3], "compute_fraction": 0.6,
                "rows": {k: [{"fd_digits": v, "accuracy": 1.0, "precision": 1.0, "recall": 1.0,
                              "paired_psnr_db": 40.0, "paired_ssim": 0.99, "paired_label_flip_rate": 0.0}]
                         for k, v in rows.items()},
                "speedup": {k: 1.3 for k in rows if k != "baseline"}}

    write("main", [config(20, {"baseline": 6.0, "cached": 6.5, "cached_ss": 6.4})], ["first"])
    write("core0", [config(20, {"baseline": 6.0, "cached_ss": 6.3})], ["second"])  # a re-run of one row
    write("core1", [config(50, {"baseline": 5.0, "cached": 5.2})], ["third"])
    (tmp_path / "core1" / "dit_ddim50_grid.png").write_bytes(b"png")
    results = quality.combine(tmp_path / "main", [tmp_path / "core0", tmp_path / "core1"], log=lambda m: None)
    assert [r["steps"] for r in results] == [20, 50]
    assert {k: v[0]["fd_digits"] for k, v in results[0]["rows"].items()} == {
        "baseline": 6.0, "cached": 6.5, "cached_ss": 6.3}  # the untouched row survives, the re-run one is replaced
    stored = json.loads((tmp_path / "main" / "quality.json").read_text())
    assert stored["commands"] == ["first", "second", "third"]
    assert (tmp_path / "main" / "dit_ddim50_grid.png").read_bytes() == b"png"
    assert "| dit | ddim-50 | cached (per-block schedule) | 50 | 5.20" in (tmp_path / "main" / "quality.md").read_text()
    with pytest.raises(bcc.BccError, match="BCC601"):
        quality.combine(tmp_path / "main", [tmp_path / "nowhere"])


def test_scale_shift_loss_trend_compares_means_and_labels_old_rows():
    # One training trajectory's loss depends on its fresh noise and label; new rows compare
    # means of 10, rows kept from before say their first value is a single trajectory.
    new = {"loss_first": 9.0, "loss_first10": 2e-3, "loss_last10": 1e-3}
    assert quality._loss_trend(new) == "training loss 2.00e-03 -> 1.00e-03 (mean of first and last 10)"
    old = quality._loss_trend({"loss_first": 4.9e-3, "loss_last10": 5.3e-3})
    assert old.startswith("training loss 4.90e-03 (first trajectory) -> 5.30e-03") and "not a held-out" in old


def test_combine_takes_only_a_separately_timed_scale_shift_row(tmp_path):
    import json

    def metrics(fd):
        return {"fd_digits": fd, "accuracy": 1.0, "precision": 1.0, "recall": 1.0, "paired_psnr_db": 30.0,
                "paired_ssim": 0.9, "paired_label_flip_rate": 0.0}

    def scale_shift(loss):
        return {"kind": "table", "loss": loss, "iterations": 150, "parameters": 10, "train_seconds": 60.0,
                "loss_first": 1e-3, "loss_last10": 1e-3, "overhead": 0.01}

    def write(name, rows, speedup, med, ss):
        (tmp_path / name).mkdir()
        r = {"arch": "unet", "solver": "dpm", "steps": 20, "seed_to_seed_fd": [0.2], "compute_fraction": 0.667,
             "fewer_steps": 16,
             "rows": {k: [metrics(v)] for k, v in rows.items()}, "speedup": speedup,
             "median_seconds": med, "scale_shift": ss}
        (tmp_path / name / "quality.json").write_text(json.dumps(
            {"commands": [name], "threads": 1, "floors": {"real_vs_real_2500": [0.61, 0.02]}, "results": [r]}))

    write("main", {"baseline": 2.5, "fewer": 2.6, "cached": 4.0, "cached_ss": 3.7},
          {"fewer": 1.24, "cached": 1.28, "cached_ss": 1.24}, {"plain": 1.3, "bcc": 1.0, "bcc_ss": 1.05, "fewer": 1.1},
          scale_shift("output"))
    write("rerun", {"baseline": 2.5, "cached": 4.0, "cached_ss": 3.3},
          {"cached": 1.36, "cached_ss": 1.35}, {"plain": 1.4, "bcc": 1.03, "bcc_ss": 1.04}, scale_shift("final"))
    [r] = quality.combine(tmp_path / "main", [tmp_path / "rerun"], log=lambda m: None, rows=["cached_ss"],
                          note="final loss")
    # The naive row and its timing stay the main run's; the rerun's plain and naive medians are kept apart.
    assert r["rows"]["cached"] == [metrics(4.0)] and r["rows"]["cached_ss"] == [metrics(3.3)]
    assert r["speedup"] == {"fewer": 1.24, "cached": 1.28, "cached_ss": 1.35}
    assert r["median_seconds"] == {"plain": 1.3, "bcc": 1.0, "bcc_ss": 1.04, "fewer": 1.1,
                                   "plain_ss_run": 1.4, "bcc_ss_run": 1.03}
    assert r["scale_shift"]["loss"] == "final" and "`rerun`" in r["scale_shift"]["note"]
    assert "1.36x" in r["scale_shift"]["note"] and r["scale_shift"]["note"].endswith("final loss")


def test_a_searched_region_row_samples_the_region_schedule(tmp_path, monkeypatch):
    """When the search picks a region, the planned row runs it on the region's own model:
    its samples are those of skipping the region by hand (a hook on its end module)."""
    real_search = bcc.search_schedule

    def region_only(fast, run, profile, budget, **kw):
        span = bcc.region(profile.block_names[0], profile.block_names[-1])
        return real_search(fast, run, profile, budget, **{**kw, "families": ("region",), "regions": [span]})

    monkeypatch.setattr(quality.bcc, "search_schedule", region_only)
    # FLOPs instead of timings: the budget must not depend on what else the machine runs.
    monkeypatch.setattr(quality.bcc.CostModel, "measure", lambda fast, run, profile, repeats=3: bcc.CostModel(
        profile.block_names, profile.block_flops, profile.rest_flops, "flops", {"fit_max_rel_error": 0.0}))
    monkeypatch.setattr(quality, "_time", lambda models, run, labels, repeats: {k: 1.0 for k in models})
    (tmp_path / "out").mkdir()
    result = quality.bench_config("unet", "ddim", 5, n=10, seeds=[0], budget=0.6, blocks=quality.ALL_BLOCKS,
                                  guidance=3.0, chunk=10, repeats=1, out_dir=tmp_path / "out", log=lambda msg: None,
                                  rows=("baseline", "planned"), resume=tmp_path / "partial")
    planned = bcc.Schedule.load(tmp_path / "out" / "unet_ddim5_planned_schedule.json")
    (span,) = planned.block_names
    assert "region" in result["search"]["chosen"]["family"] and not planned.mask.all()

    # By hand: count the steps at the root; on a reuse step the end module returns the
    # output it gave at the last computed step (the UNet's span ends in a skip concatenation,
    # so it is cached whole), and nothing the region computed before it is read.
    model, conditioner, train_sched = load_digits_model(default_model_dir("unet"))
    end = model.get_submodule(span.split("..")[1])
    state = {"calls": 0, "out": None}

    def count(module, args):
        state["calls"] += 1

    def skip(module, args, out):
        if planned.mask[(state["calls"] - 1) % 5, 0]:
            state["out"] = out
            return None
        return state["out"]

    hooks = [model.register_forward_pre_hook(count), end.register_forward_hook(skip)]
    try:
        run = quality._sampler(model, conditioner, make_scheduler("ddim", train_sched), 5, 3.0)
        with torch.no_grad():
            want = quality._generate(run, model, torch.arange(10) % 10, 0, 10)
    finally:
        for h in hooks:
            h.remove()
    got = torch.load(tmp_path / "partial" / "unet_ddim5" / "planned_seed0.pt")
    torch.testing.assert_close(got, want)
    # And the check can tell: reusing changed the samples (a reuse at the last DDIM step
    # alone would not, hence 5 steps at budget 0.6).
    base = torch.load(tmp_path / "partial" / "unet_ddim5" / "baseline_seed0.pt")
    assert not torch.allclose(got, base, atol=1e-3)


@pytest.mark.slow  # a whole (tiny) quality run twice, a search included
def test_the_searched_schedule_gets_scale_shift_of_its_own(tmp_path, monkeypatch):
    calls = {"train": [], "time": []}
    real_train = quality.bcc.train_scale_shift

    def train(model, schedule, *args, **kwargs):
        calls["train"].append(schedule.block_names)
        return real_train(model, schedule, *args, **kwargs)

    def fake_time(models, run, labels, repeats):
        calls["time"].append(sorted(models))
        return {k: {"plain": 1.5, "bcc_plan": 1.0, "bcc_plan_ss": 1.1}.get(k, 1.2) for k in models}

    real_search = bcc.search_schedule

    def region_only(fast, run, profile, budget, **kw):  # a short search: one span, one family
        span = bcc.region(profile.block_names[0], profile.block_names[-1])
        return real_search(fast, run, profile, budget, **{**kw, "families": ("region",), "regions": [span]})

    monkeypatch.setattr(quality.bcc, "search_schedule", region_only)
    monkeypatch.setattr(quality.bcc, "train_scale_shift", train)
    monkeypatch.setattr(quality.bcc.CostModel, "measure", lambda fast, run, profile, repeats=3: bcc.CostModel(
        profile.block_names, profile.block_flops, profile.rest_flops, "flops", {"fit_max_rel_error": 0.0}))
    monkeypatch.setattr(quality, "_time", fake_time)
    (tmp_path / "out").mkdir()
    kw = dict(n=10, seeds=[0], budget=0.6, blocks=quality.ALL_BLOCKS, guidance=3.0, chunk=10, repeats=1,
              out_dir=tmp_path / "out", log=lambda msg: None, rows=("baseline", "planned", "planned_ss"),
              resume=tmp_path / "partial", ss_iterations=2, ss_loss="final")
    first = quality.bench_config("unet", "ddim", 5, **kw)
    planned = bcc.Schedule.load(tmp_path / "out" / "unet_ddim5_planned_schedule.json")
    ss = bcc.ScaleShift.load(tmp_path / "out" / "unet_ddim5_planned_scale_shift.safetensors")
    assert calls["train"] == [planned.block_names]
    ss.check_compatible(planned)  # trained for the searched schedule (BCC505 otherwise)
    assert first["speedup"]["planned_ss"] == 1.5 / 1.1 and first["planned_scale_shift"]["overhead"] == pytest.approx(0.1)
    kept = tmp_path / "partial" / "unet_ddim5"
    corrected, uncorrected = (torch.load(kept / f"{k}_seed0.pt") for k in ("planned_ss", "planned"))
    assert not torch.equal(corrected, uncorrected)  # the corrections reached the samples
    # New training parameters: only the corrected row is trained, timed and sampled again.
    second = quality.bench_config("unet", "ddim", 5, **{**kw, "ss_lr": 1e-3})
    assert len(calls["train"]) == 2 and calls["time"][-1] == ["bcc_plan", "bcc_plan_ss", "plain"]
    assert second["rows"]["planned"] == first["rows"]["planned"] and second["planned_scale_shift"]["lr"] == 1e-3
    assert "| unet | ddim-5 | cached + scale-shift (searched) | 5 |" in quality.markdown(
        [second], {"real_vs_real_2500": [0.6, 0.1]}, ["cmd"])
