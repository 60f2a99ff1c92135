"""The bcc command line: help, calibrate -> schedule -> show -> plot, one-line errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from bcc import ChangeProfile, Schedule
from bcc.tools.cli import main

ZOO = ["calibrate", "--model", "zoo:unet-tiny", "--steps", "5", "--seeds", "0,1", "--threads", "1"]
BCC = Path(shutil.which("bcc", path=os.path.dirname(sys.executable)) or shutil.which("bcc") or "bcc")  # console script
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("command", [[], ["calibrate"], ["schedule"], ["show"], ["plot"]])
def test_help(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bcc")
    expected = {(): "COMMAND", ("calibrate",): "--per-class", ("schedule",): "--budget", ("show",): "format",
                ("plot",): "Fig. 4"}[tuple(command)]
    assert expected in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "calibrate" in capsys.readouterr().out


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "profile.json"
    assert main([*ZOO, "--out", str(out), "--plot", str(out.with_suffix(".png"))]) == 0
    return out


def test_calibrate_zoo(profile_path):
    p = ChangeProfile.load(profile_path)
    assert p.num_steps == 5 and p.num_runs == 2 and p.num_blocks == 4
    assert p.block_flops is not None and p.rest_flops > 0
    assert p.extra["cli"]["model"] == "zoo:unet-tiny" and p.extra["cli"]["seeds"] == (0, 1)  # read-only: lists read back as tuples
    assert profile_path.with_suffix(".png").stat().st_size > 5_000


def test_schedule_show_plot(profile_path, tmp_path, capsys):
    sched = tmp_path / "s.json"
    assert main(["schedule", "--profile", str(profile_path), "--budget", "0.9", "--out", str(sched),
                 "--plot", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    s = Schedule.load(sched)
    assert s.compute_fraction() <= 0.9 and "compute fraction" in out and "threshold delta" in out
    assert s.to_text() in out and s.meta["target_fraction"] == 0.9

    assert main(["show", str(sched)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"schedule {sched}") and "ideal speedup" in out and s.to_text() in out
    assert main(["show", str(profile_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"change profile {profile_path}") and ChangeProfile.load(profile_path).summary() in out

    for src, png in ((profile_path, "p.png"), (sched, "s2.png")):
        assert main(["plot", str(src), "--out", str(tmp_path / png)]) == 0
        with Image.open(tmp_path / png) as im:
            assert im.format == "PNG"
    assert main(["plot", str(profile_path), "--out", str(tmp_path / "top.png"), "--top", "2"]) == 0


def test_an_experts_profile_through_schedule_and_show(tmp_path, capsys):
    l1 = torch.zeros(6, 2, dtype=torch.float64)
    l1[3:] = 0.2
    path = tmp_path / "lo.json"
    ChangeProfile(l1, ["a", "b"], active_steps=(2, 6), extra={"denoiser": "transformer_2"}).save(path)
    assert main(["show", str(path)]) == 0
    assert "runs at steps 2-5 of 6 only" in capsys.readouterr().out
    assert main(["schedule", "--profile", str(path), "--threshold", "0.3", "--out", str(tmp_path / "s.json")]) == 0
    capsys.readouterr()
    s = Schedule.load(tmp_path / "s.json")
    assert s.active_steps == (2, 6) and s.compute_fraction() == 0.5
    assert main(["show", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "runs at steps 2-5 of 6 only" in out and "  a   #.#." in out


def test_schedule_threshold_literal_speedup_every(profile_path, tmp_path, capsys):
    p = ChangeProfile.load(profile_path)
    a, b, c, d = (tmp_path / f"{n}.json" for n in "abcd")
    assert main(["schedule", "--profile", str(profile_path), "--threshold", "2.0", "--out", str(a)]) == 0
    assert main(["schedule", "--profile", str(profile_path), "--threshold", "2.0", "--literal", "--out", str(b)]) == 0
    assert torch.equal(Schedule.load(a).mask, Schedule.from_change(p, 2.0).mask)
    assert torch.equal(Schedule.load(b).mask, Schedule.from_change(p, 2.0, sum_from="literal").mask)
    assert main(["schedule", "--profile", str(profile_path), "--speedup", "1.1", "--out", str(c)]) == 0
    assert Schedule.load(c).ideal_speedup() >= 1.1
    assert main(["schedule", "--every", "2", "--blocks-from", str(profile_path), "--out", str(d)]) == 0
    every = Schedule.load(d)
    assert every.mask[:, 0].tolist() == [True, False, True, False, True]
    assert every.block_names == p.block_names and every.block_costs == p.block_flops
    assert "recompute every 2 steps" in capsys.readouterr().out


def test_console_script_pipeline(tmp_path):
    """The installed `bcc` command, in fresh processes, end to end."""
    assert BCC.exists(), "run `pip install -e . --no-deps` to install the console script"
    prof, sched = tmp_path / "p.json", tmp_path / "s.json"
    outs = []
    for argv in ([*ZOO, "--out", str(prof)],
                 ["schedule", "--profile", str(prof), "--budget", "0.95", "--out", str(sched)],
                 ["show", str(sched)],
                 ["plot", str(sched), "--out", str(tmp_path / "s.png")]):
        r = subprocess.run([str(BCC), *argv], capture_output=True, text=True, env=ENV, timeout=300)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert f"wrote {prof}" in outs[0] and "ideal speedup" in outs[2] and "wrote" in outs[3]
    assert Schedule.load(sched).compute_fraction() <= 0.95
    with Image.open(tmp_path / "s.png") as im:
        assert im.format == "PNG"


# -- errors -------------------------------------------------------------------------------
def _error(argv, capsys, code=None):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("bcc: error: [BCC") and "Traceback" not in captured.err
    if code:
        assert f"[{code}]" in lines[0]
    return lines[0]


def test_error_missing_file(tmp_path, capsys):
    line = _error(["show", str(tmp_path / "nope.json")], capsys, "BCC601")
    assert "does not exist" in line
    _error(["schedule", "--profile", str(tmp_path / "nope.json"), "--budget", "0.5", "--out", str(tmp_path / "s.json")],
           capsys, "BCC601")


def test_error_truncated_json(profile_path, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    text = profile_path.read_text()
    bad.write_text(text[: len(text) // 2])
    assert "truncated" in _error(["show", str(bad)], capsys, "BCC601")
    assert "truncated" in _error(["plot", str(bad), "--out", str(tmp_path / "x.png")], capsys, "BCC601")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something-else"}))
    assert "neither" in _error(["show", str(other)], capsys, "BCC601")
    assert not (tmp_path / "x.png").exists()


def test_error_negative_threshold(profile_path, tmp_path, capsys):
    line = _error(["schedule", "--profile", str(profile_path), "--threshold", "-0.5", "--out", str(tmp_path / "s.json")],
                  capsys, "BCC502")
    assert ">= 0" in line and not (tmp_path / "s.json").exists()


def test_error_unreachable_budget(profile_path, tmp_path, capsys):
    line = _error(["schedule", "--profile", str(profile_path), "--budget", "0.01", "--out", str(tmp_path / "s.json")],
                  capsys, "BCC503")
    assert "not reachable" in line and "range from" in line  # says what is reachable
    _error(["schedule", "--profile", str(profile_path), "--speedup", "100", "--out", str(tmp_path / "s.json")],
           capsys, "BCC503")


@pytest.mark.parametrize("argv, code, words", [
    (["calibrate", "--model", "digits-unet", "--classes", "", "--out", "x.json"], "BCC001", "empty"),
    (["calibrate", "--model", "digits-unet", "--classes", " , ", "--out", "x.json"], "BCC001", "empty"),
    (["calibrate", "--model", "digits-unet", "--classes", "3-1", "--out", "x.json"], "BCC001", "range"),
    (["calibrate", "--model", "digits-unet", "--classes", "12", "--out", "x.json"], "BCC001", "0-9"),
    (["calibrate", "--model", "digits-unet", "--steps", "0", "--out", "x.json"], "BCC504", ">= 2"),
    (["calibrate", "--model", "zoo:unet-tiny", "--seeds", "", "--out", "x.json"], "BCC001", "--seeds"),
    (["calibrate", "--model", "zoo:nope", "--out", "x.json"], "BCC001", "unknown zoo model"),
    (["calibrate", "--model", "zoo:unet-tiny", "--classes", "1", "--out", "x.json"], "BCC001", "digits models only"),
    (["calibrate", "--model", "bogus", "--out", "x.json"], "BCC001", "digits-unet"),
    (["calibrate", "--model", "digits-unet", "--model-dir", "/nonexistent/dir", "--out", "x.json"], "BCC601",
     "not found"),
    (["schedule", "--every", "2", "--out", "x.json"], "BCC001", "--blocks-from"),
])
def test_error_bad_arguments(argv, code, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert words in _error(argv, capsys, code)
    assert not (tmp_path / "x.json").exists()


def test_value_and_os_errors_are_one_line(tmp_path, profile_path, capsys):
    bad_model = tmp_path / "model"
    bad_model.mkdir()
    (bad_model / "bcc_digits.json").write_text("{not json")  # the digits loader raises ValueError
    line = _error(["calibrate", "--model", "digits-unet", "--model-dir", str(bad_model), "--out", "x.json"], capsys,
                  "BCC001")
    assert "unreadable" in line
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where a folder is needed
    _error(["schedule", "--profile", str(profile_path), "--budget", "0.95", "--out", str(blocker / "s.json")], capsys,
           "BCC601")


def test_argparse_errors_are_one_line(capsys):
    assert main(["calibrate", "--out", "x.json"]) == 2  # --model missing
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model" in err[0] and "--help" in err[0]
    assert main(["schedule", "--profile", "p.json", "--budget", "0.5", "--threshold", "1", "--out", "s.json"]) == 2
    assert "not allowed" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


def test_debug_shows_the_exception(tmp_path):
    from bcc import BccError

    with pytest.raises(BccError):
        main(["show", str(tmp_path / "nope.json"), "--debug"])
    with pytest.raises(BccError):
        main(["--debug", "show", str(tmp_path / "nope.json")])


def test_console_script_error_has_no_traceback(tmp_path):
    r = subprocess.run([str(BCC), "show", str(tmp_path / "missing.json")], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("bcc: error: [BCC601]")
