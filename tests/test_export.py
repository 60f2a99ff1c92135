"""bcc.export: programs with the branches and caches inside, saved, loaded, packaged, swapped."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import bcc
from bcc import Schedule

from testing import Toy, built, changing_schedule, run, trajectory_inputs

STEPS = 5


def _conds(ep) -> int:
    return sum(n.target is torch.ops.higher_order.cond for n in ep.graph.nodes)


@pytest.fixture(scope="module")
def unet():
    model, args, kwargs = built("unet-tiny")
    schedule = changing_schedule(STEPS, bcc.find_blocks(model, (args, kwargs)))
    inputs = trajectory_inputs("unet-tiny", model, STEPS)
    want = run(bcc.compile(model, schedule, backend="eager"), inputs * 2)
    return model, schedule, inputs, want


class Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.proj(x))


class Small(nn.Module):
    """Two weighted residual blocks: the weights must reach the AOTI package."""

    def __init__(self, width=8):
        super().__init__()
        self.blocks = nn.ModuleList(Residual(width) for _ in range(2))
        self.out = nn.Linear(width, width)

    def forward(self, x, t):
        for block in self.blocks:
            x = block(x)
        return self.out(x) * t


@pytest.fixture(scope="module")
def aoti_package(tmp_path_factory):
    """One AOTInductor package (the C++ compile is the slow part), shared by the module."""
    torch.manual_seed(0)
    model = Small().eval()
    schedule = Schedule(torch.tensor([[True, True], [False, True], [True, False], [False, False]]),
                        ["blocks.0", "blocks.1"])
    inputs = [((torch.randn(2, 8, generator=torch.Generator().manual_seed(s)), torch.tensor(1.0 - s / 4)), {})
              for s in range(4)]
    path = tmp_path_factory.mktemp("aoti") / "small.pt2"
    ep = bcc.export(model, schedule, inputs[0])
    bcc.save_exported(ep, path, aoti=True)
    return model, schedule, inputs, path


def test_exported_graph_has_one_cond_per_cached_block(unet):
    model, schedule, inputs, _ = unet
    ep = bcc.export(model, schedule, inputs[0])
    assert _conds(ep) == schedule.num_blocks == 4
    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert user[:2] == ["bcc_schedule", "bcc_step"]
    assert sum(n.startswith("bcc_cache_") for n in user) == len(ep.graph_module.meta["bcc_export"].slots)
    assert any(s.kind.name == "PARAMETER" for s in ep.graph_signature.input_specs)


def test_save_load_round_trip_equals_bcc_compile(unet, tmp_path):
    model, schedule, inputs, want = unet
    path = bcc.save_exported(bcc.export(model, schedule, inputs[0]), tmp_path / "u.pt2")
    meta = json.loads((tmp_path / "u.bcc.json").read_text())
    assert meta["block_names"] == list(bcc.find_blocks(model, inputs[0]))
    assert meta["schedule_input"] is True and meta["kind"] == "program"
    got = run(bcc.load_exported(path), inputs * 2)  # two trajectories: the second starts over at step 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_baked_schedule_round_trip(aoti_package, tmp_path):
    model, schedule, inputs, _ = aoti_package
    ep = bcc.export(model, schedule, inputs[0], schedule_input=False)
    assert not any(s.arg.name == "bcc_schedule" for s in ep.graph_signature.input_specs)
    loaded = bcc.load_exported(bcc.save_exported(ep, tmp_path / "baked.pt2"))
    want = run(bcc.compile(model, schedule, backend="eager"), inputs)
    for g, w in zip(run(loaded, inputs), want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    with pytest.raises(bcc.BccError, match="BCC704.*baked"):
        loaded.set_schedule(schedule)


def test_swapping_the_schedule_input_changes_which_blocks_run():
    # Toy: b0 doubles, b1 adds 10, output + t; output mode caches whole block outputs.
    ep = bcc.export(Toy(), Schedule.all_compute(2, ["b0", "b1"]), ((torch.ones(2), torch.tensor(0.0)), {}),
                    mode="output")
    runner = bcc.ExportedDenoiser.from_program(ep)
    program = runner.stepper.program.fn
    x0, x1, t = torch.full((2,), 1.0), torch.full((2,), 5.0), torch.tensor(0.0)

    def trajectory():
        return [runner(x0, t)[0].item(), runner(x1, t)[0].item()]

    assert trajectory() == [12.0, 20.0]
    runner.set_schedule(Schedule(torch.tensor([[True, True], [False, True]]), ["b0", "b1"]))
    assert trajectory() == [12.0, 12.0]  # b0 replays its step-0 output 2: 2 + 10
    runner.set_schedule(Schedule(torch.tensor([[True, True], [True, False]]), ["b1", "b0"]))  # columns by name
    assert trajectory() == [12.0, 12.0]
    assert runner.stepper.program.fn is program  # the loaded program, not a rebuilt one


def test_aoti_package_round_trip_in_a_fresh_process(aoti_package, tmp_path):
    model, schedule, inputs, path = aoti_package
    want = run(bcc.compile(model, schedule, backend="eager"), inputs)
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        import bcc
        runner = bcc.load_exported({str(path)!r})
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            outs = [runner(*a, **k) for a, k in inputs]
        swapped = bcc.Schedule.all_compute(4, ["blocks.0", "blocks.1"])
        runner.set_schedule(swapped)
        with torch.no_grad():
            outs += [runner(*a, **k) for a, k in inputs]
        torch.save(outs, {str(tmp_path / "outs.pt")!r})
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "outs.pt")
    full = run(model, inputs)
    for g, w in zip(got, want + full):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want[1], full[1])


def test_artifact_errors(aoti_package, tmp_path):
    model, schedule, inputs, path = aoti_package
    ep = bcc.export(model, schedule, inputs[0])
    other = bcc.save_exported(ep, tmp_path / "other.pt2")
    runner = bcc.load_exported(other)
    with pytest.raises(bcc.BccError, match=r"BCC703.*static"):
        runner(torch.ones(3, 8), torch.tensor(1.0))  # another batch size
    with pytest.raises(bcc.BccError, match="BCC105"):
        runner.set_schedule(Schedule.every(2, 4, ["blocks.0", "out"]))
    with pytest.raises(bcc.BccError, match="BCC101"):
        runner.set_schedule(Schedule.every(2, 3, ["blocks.0", "blocks.1"]))
    meta = tmp_path / "other.bcc.json"
    payload = json.loads(meta.read_text())
    (tmp_path / "swapped.pt2").write_bytes(path.read_bytes())  # the AOTI build, with other.pt2's metadata
    (tmp_path / "swapped.bcc.json").write_text(meta.read_text())
    with pytest.raises(bcc.BccError, match=r"BCC704.*digest"):
        bcc.load_exported(tmp_path / "swapped.pt2")
    for field, value in [("version", 0), ("format", "bcc-schedule")]:
        meta.write_text(json.dumps({**payload, field: value}))
        with pytest.raises(bcc.BccError, match="BCC704"):
            bcc.load_exported(other)
    meta.write_text(json.dumps({**payload, "schedule": {**payload["schedule"], "version": 2}}))
    with pytest.raises(bcc.BccError, match="BCC704.*schedule version 2"):
        bcc.load_exported(other)
    meta.unlink()
    with pytest.raises(bcc.BccError, match="BCC704.*missing"):
        bcc.load_exported(other)
    with pytest.raises(bcc.BccError, match="BCC302"):
        bcc.export(model, Schedule.every(2, 4, ["blocks.0", "down_blocks.0"]), inputs[0])
    with pytest.raises(bcc.BccError, match="BCC102"):
        bcc.export(model, {"schedule": 1}, inputs[0])


def test_cli_export_writes_a_loadable_artifact(tmp_path, capsys):
    from bcc.tools.cli import main

    model, args, kwargs = built("dit")
    names = bcc.find_blocks(model, (args, kwargs))
    Schedule.every(2, 3, names).save(tmp_path / "s.json")
    Schedule.every(2, 3, ["transformer_blocks.7"]).save(tmp_path / "other.json")
    out = tmp_path / "dit.pt2"
    assert main(["export", "--model", "zoo:dit", "--schedule", str(tmp_path / "s.json"), "--out", str(out),
                 "--baked", "--threads", "1"]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "dit.bcc.json").is_file()
    inputs = trajectory_inputs("dit", model, 3)
    want = run(bcc.compile(model, Schedule.every(2, 3, names), backend="eager"), inputs)
    for g, w in zip(run(bcc.load_exported(out), inputs), want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert main(["export", "--model", "zoo:dit", "--schedule", str(tmp_path / "other.json"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bcc: error: [BCC302]") and err.count("\n") == 1


def test_format_1_metadata_still_loads_and_a_mismatch_names_the_argument(tmp_path):
    x, t = torch.ones(2), torch.tensor(0.0)
    schedule = Schedule(torch.tensor([[True, True], [False, True]]), ["b0", "b1"])
    path = bcc.save_exported(bcc.export(Toy(), schedule, ((x, t), {})), tmp_path / "toy.pt2")
    meta = tmp_path / "toy.bcc.json"
    payload = json.loads(meta.read_text())
    assert payload["version"] == 3 and payload["signature"]["leaves"][0]["name"] == "args[0]"
    # bcc's first export format kept the signature as nested lists.
    old = [payload["signature"]["structure"],
           [["T", leaf["shape"], f"torch.{leaf['dtype']}", leaf["device"], None] for leaf in payload["signature"]["leaves"]]]
    meta.write_text(json.dumps({**payload, "version": 1, "signature": old}))
    runner = bcc.load_exported(path)
    want = run(bcc.compile(Toy(), schedule, backend="eager"), [((x, t), {}), ((3 * x, t), {})])
    for g, w in zip(run(runner, [((x, t), {}), ((3 * x, t), {})]), want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    with pytest.raises(bcc.BccError, match=r"BCC703.*dtype float32 -> float64"):
        runner(x.double(), t)
