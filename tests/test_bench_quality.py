"""The quality benchmark's resume contract: an interrupted run continues where it stopped."""
import torch

from bcc.bench import quality


def test_interrupted_quality_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    calls = {"generate": 0, "time": 0, "calibrate": 0}
    generate, calibrate = quality._generate, quality.bcc.calibrate

    def counting_calibrate(*args, **kwargs):
        calls["calibrate"] += 1
        return calibrate(*args, **kwargs)

    def counting_generate(*args, **kwargs):
        calls["generate"] += 1
        return generate(*args, **kwargs)

    def fake_time(models, run, labels, repeats):  # timing is not under test: no compiles
        calls["time"] += 1
        return {k: 1.5 if k == "plain" else 1.0 for k in models}

    monkeypatch.setattr(quality, "_generate", counting_generate)
    monkeypatch.setattr(quality, "_time", fake_time)
    monkeypatch.setattr(quality.bcc, "calibrate", counting_calibrate)
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
    state = quality._Resume(tmp_path / "partial", "unet_ddim3", {"n": 30})
    assert state.get("timing") is None and not list(kept.glob("*.pt")) and state.file("schedule.json") is None
