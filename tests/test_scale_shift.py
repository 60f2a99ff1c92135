"""Scale-shift: exact semantics in the reuse branch, identity = naive, files, errors, training."""
import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import bcc
from bcc import BccError, ErrorCode, Schedule, ScaleShift
from bcc.runtime.reference import HookReference
from bcc.analyze.slots import CacheSlot

from testing import Toy, ToyTwoOut, built, run, trajectory_inputs

MASK = torch.tensor([[1, 1], [0, 1], [0, 0], [1, 0], [0, 0]], dtype=torch.bool)


def _steps(n, shape=(2, 3)):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(shape, generator=g), torch.tensor(float(100 - s))) for s in range(n)]


def _toy_slots(mode="residual"):
    """Toy's cached tensors: b0 = 2x has no identity path (cached whole), b1 = x + 10 is a
    residual of its one input (stream 0) in residual mode."""
    b1 = CacheSlot("b1", 0, 0, (2, 3), stream=0) if mode == "residual" else CacheSlot("b1", 0, None, (2, 3))
    return [CacheSlot("b0", 0, None, (2, 3)), b1]


def _toy_ss(schedule, mode="residual"):
    """gamma = 0.5 * (step + 1), beta = -step on every channel of both blocks."""
    ss = ScaleShift.identity(schedule, _toy_slots(mode), kind="table", mode=mode)
    # Slots pair by block and stream (or shape when cached whole), at any batch size.
    assert ss.index_of(CacheSlot("b0", 0, None, (7, 3))) == 0 and ss.index_of(_toy_slots(mode)[1]) == 1
    with torch.no_grad():
        for table in ss.table:
            for s in range(schedule.num_steps):
                table[s, 0] = 0.5 * (s + 1)
                table[s, 1] = -float(s)
    return ss


def _expected(mask, steps, mode, gb=lambda s: (1 + 0.5 * (s + 1), -float(s))):
    """Toy (b0 = 2x, cached whole; b1 = x + 10) with the corrections of _toy_ss (or ``gb``), by hand."""
    outs, c0, c1 = [], None, None
    for s, (x, t) in enumerate(steps):
        g, b = gb(s)
        if mask[s, 0]:
            h = x * 2
            c0 = h
        else:
            h = g * c0 + b
        if mask[s, 1]:
            h2 = h + 10
            c1 = h2 - h if mode == "residual" else h2
        else:
            h2 = h + (g * c1 + b) if mode == "residual" else g * c1 + b
        outs.append(h2 + t)
    return outs


@pytest.mark.parametrize("backend", ["eager", "inductor"])
@pytest.mark.parametrize("mode", ["residual", "output"])
def test_reuse_branch_applies_scale_shift_exactly(backend, mode):
    schedule = Schedule(MASK, ("b0", "b1"))
    steps = _steps(5)
    model = bcc.compile(Toy(), schedule, backend=backend, mode=mode, scale_shift=_toy_ss(schedule, mode))
    got = [model(x, t) for x, t in steps]
    for a, b in zip(got, _expected(MASK, steps, mode)):
        torch.testing.assert_close(a, b, rtol=0 if backend == "eager" else 1e-6, atol=0 if backend == "eager" else 1e-5)


def test_identity_scale_shift_reproduces_naive_caching_bitwise():
    model, args, kwargs = built("unet-tiny")
    names = bcc.find_blocks(model, (args, kwargs))
    schedule = Schedule.every(3, 6, names)
    traj = trajectory_inputs("unet-tiny", model, 6)
    naive = run(bcc.compile(model, schedule, backend="eager"), traj)
    probe = bcc.compile(model, schedule, backend="eager")
    run(probe, traj[:1])
    ss = ScaleShift.for_graph(schedule, probe.bcc_slots(), model=model)
    with_ss = run(bcc.compile(model, schedule, backend="eager", scale_shift=ss), traj)
    for a, b in zip(naive, with_ss):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["unet-tiny", "pixart"])
def test_compiled_scale_shift_equals_hook_reference_with_random_tables(name):
    model, args, kwargs = built(name)
    names = bcc.find_blocks(model, (args, kwargs))
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(6, len(names), generator=g) < 0.5
    mask[0] = True
    schedule = Schedule(mask, tuple(names))
    traj = trajectory_inputs(name, model, 6)
    probe = bcc.compile(model, schedule, backend="eager")
    run(probe, traj[:1])
    ss = ScaleShift.for_graph(schedule, probe.bcc_slots(), model=model)
    with torch.no_grad():
        for t in ss.table:
            t.copy_(0.2 * torch.randn(t.shape, generator=g))
    ref = HookReference(model, schedule, scale_shift=ss)
    try:
        want = run(model, traj)
    finally:
        ref.remove()
    counter = CompileCounterWithBackend("inductor")
    compiled = bcc.compile(model, schedule, backend=counter, scale_shift=ss)
    got = run(compiled, traj) + run(compiled, traj)
    for a, b in zip(got, want + want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert counter.frame_count == 1  # one graph for both trajectories, corrections included
    naive = run(bcc.compile(model, schedule, backend="eager"), traj)
    assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(naive, want))  # the tables did something


@pytest.mark.parametrize("ctx_width", [5, 3])
def test_two_output_block_gets_a_correction_per_stream(ctx_width):
    # Width 5: the streams differ in shape (Flux: text vs image tokens); width 3: they do not
    # (Flux with as many text as image tokens), and the residual streams still tell them apart.
    schedule = Schedule.every(2, 4, ["pair"])
    model = ToyTwoOut()
    x, ctx = torch.randn(2, 3), torch.randn(2, ctx_width)
    probe = bcc.compile(model, schedule, backend="eager")
    probe(x, ctx, torch.tensor(1.0))
    ss = ScaleShift.for_graph(schedule, probe.bcc_slots())
    with torch.no_grad():
        ss.table[0][:, 0] = 1.0   # stream 0: doubled
        ss.table[1][:, 1] = 5.0   # stream 1: shifted
    ref = HookReference(model, schedule, scale_shift=ss)
    try:
        want = [model(x + s, ctx - s, torch.tensor(2.0)) for s in range(4)]
    finally:
        ref.remove()
    compiled = bcc.compile(model, schedule, backend="inductor", scale_shift=ss)
    got = [compiled(x + s, ctx - s, torch.tensor(2.0)) for s in range(4)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_block_whose_two_outputs_share_a_stream_is_refused():
    # One tensor passed as both streams: both outputs are residuals of it, so nothing
    # tells their corrections apart.
    schedule = Schedule.every(2, 4, ["pair"])
    model = ToyTwoOut()
    x = torch.randn(2, 3)
    probe = bcc.compile(model, schedule, backend="eager")
    probe(x, x, torch.tensor(1.0))
    with pytest.raises(BccError) as e:
        ScaleShift.for_graph(schedule, probe.bcc_slots()).tables_for(probe.bcc_slots())
    assert e.value.code is ErrorCode.SCALE_SHIFT_MISMATCH
    with pytest.raises(BccError) as e:
        bcc.train_scale_shift(model, schedule, lambda m, c, s: [m(x, x, torch.tensor(1.0)) for _ in range(4)], [None],
                              iterations=1, progress=False)
    assert e.value.code is ErrorCode.SCALE_SHIFT_MISMATCH


def test_save_load_round_trip_and_bad_files(tmp_path):
    schedule = Schedule(MASK, ("b0", "b1"))
    ss = _toy_ss(schedule)
    path = ss.save(tmp_path / "ss.safetensors", iteration=7)
    back = ScaleShift.load(path)
    assert back.header["iteration"] == 7 and back.slots == ss.slots
    # The schedule travels in the same file.
    assert torch.equal(back.schedule.mask, schedule.mask) and back.schedule.block_names == schedule.block_names
    for a, b in zip(back.tables(), ss.tables()):
        assert torch.equal(a, b)
    back.check_compatible(schedule)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:50])
    with pytest.raises(BccError) as e:
        ScaleShift.load(truncated)
    assert e.value.code is ErrorCode.FILE_INVALID
    with pytest.raises(BccError) as e:
        ScaleShift.load(tmp_path / "missing.safetensors")
    assert e.value.code is ErrorCode.FILE_INVALID


def test_parameters_for_another_schedule_model_steps_or_mode_are_refused():
    schedule = Schedule(MASK, ("b0", "b1"))
    ss = _toy_ss(schedule)
    ss.model_fp = bcc.plan.profile.model_fingerprint(Toy())
    for other, kwargs in [
        (Schedule.every(2, 5, ["b0", "b1"]), {}),                       # another pattern
        (Schedule.every(2, 6, ["b0", "b1"]), {}),                       # another step count
        (schedule, {"mode": "output"}),                                 # another cache mode
    ]:
        with pytest.raises(BccError) as e:
            bcc.compile(Toy(), other, backend="eager", scale_shift=ss, **kwargs)
        assert e.value.code is ErrorCode.SCALE_SHIFT_MISMATCH
    with pytest.raises(BccError) as e:
        bcc.compile(torch.nn.Linear(3, 3), schedule, backend="eager", scale_shift=ss)
    assert e.value.code is ErrorCode.SCALE_SHIFT_MISMATCH


def test_set_schedule_without_parameters_falls_back_to_naive_caching():
    schedule = Schedule(MASK, ("b0", "b1"))
    steps = _steps(5)
    model = bcc.compile(Toy(), schedule, backend="eager", scale_shift=_toy_ss(schedule))
    [model(x, t) for x, t in steps]
    other = Schedule.every(2, 5, ["b0", "b1"])
    model.set_schedule(other)
    got = [model(x, t) for x, t in steps]
    naive = bcc.compile(Toy(), other, backend="eager")
    for a, b in zip(got, [naive(x, t) for x, t in steps]):
        assert torch.equal(a, b)


# -- training -----------------------------------------------------------------------------
class Scaled(torch.nn.Module):
    """Output ``a(t) * conv(x) + b(t)``: on a fixed input, a reused output is wrong by exactly
    a per-step affine map, which scale-shift can learn (output mode)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x, t):
        return self.conv(x) * (1 + t / 1000) + t / 1000


class Drift(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blk = Scaled()
        self.out = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x, t):
        return self.out(self.blk(x, t))


def _drift_sample(model, cond, seed):
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))  # a fixed batch
    return [model(x, torch.tensor(900.0 - 150 * s)) for s in range(6)]


@pytest.mark.parametrize("kind", ["table", "linear"])
@pytest.mark.parametrize("loss", ["output", "block", "trajectory"])
def test_training_loss_falls_on_a_fixed_batch(kind, loss):
    torch.manual_seed(0)
    model = Drift()
    schedule = Schedule.every(3, 6, ["blk"])
    before = [p.detach().clone() for p in model.parameters()]
    ss = bcc.train_scale_shift(model, schedule, _drift_sample, [None], iterations=60, kind=kind, loss=loss,
                               lr=2e-2, mode="output", progress=False)
    first, last = ss.history[0][f"loss_{loss}"], ss.history[-1][f"loss_{loss}"]
    assert last < 0.1 * first, (first, last)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weights stay frozen
    assert all(p.requires_grad for p in model.parameters())                   # and are restored
    assert ss.meta["embedding"] == ("sinusoidal" if kind == "linear" else None)
    # The trained corrections, compiled, bring the cached outputs close to the uncached ones.
    with torch.no_grad():
        teacher = torch.stack(_drift_sample(model, None, 0))
        naive = torch.stack(_drift_sample(bcc.compile(model, schedule, backend="eager", mode="output"), None, 0))
        fixed = torch.stack(_drift_sample(
            bcc.compile(model, schedule, backend="inductor", mode="output", scale_shift=ss), None, 0))
    assert (fixed - teacher).abs().mean() < 0.2 * (naive - teacher).abs().mean()


def _halves_sample(same: bool):
    def sample(model, cond, seed):
        x = torch.randn(1 if same else 2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
        x = torch.cat([x, x]) if same else x  # [uncond; cond], as with classifier-free guidance
        return [model(x, torch.tensor(900.0 - 150 * s)) for s in range(6)]
    return sample


def test_guided_loss_compares_what_the_sampler_steps_with():
    schedule = Schedule.every(3, 6, ["blk"])

    def train(sample, w):
        torch.manual_seed(0)
        return bcc.train_scale_shift(Drift(), schedule, sample, [None], iterations=20, lr=2e-2, mode="output",
                                     progress=False, guidance_scale=w).history
    # Equal halves: u + w (c - u) = c, so the guided loss is the raw loss, step for step.
    raw, guided = train(_halves_sample(True), None), train(_halves_sample(True), 3.0)
    assert [h["loss_output"] for h in raw] == pytest.approx([h["loss_output"] for h in guided], rel=1e-5)
    # Different halves: the guided loss weighs c - u by w, and it still trains.
    raw, guided = train(_halves_sample(False), None), train(_halves_sample(False), 3.0)
    assert guided[0]["loss_output"] != pytest.approx(raw[0]["loss_output"], rel=1e-3)
    assert guided[-1]["loss_output"] < 0.5 * guided[0]["loss_output"]


def test_nothing_to_train_and_bad_options():
    model = Drift()
    with pytest.raises(BccError) as e:
        bcc.train_scale_shift(model, Schedule.all_compute(6, ["blk"]), _drift_sample, [None], progress=False)
    assert e.value.code is ErrorCode.NOTHING_TO_TRAIN
    for kwargs in ({"kind": "mlp"}, {"loss": "l1"}, {"lr": -1.0}, {"iterations": 0}):
        with pytest.raises(BccError) as e:
            bcc.train_scale_shift(model, Schedule.every(2, 6, ["blk"]), _drift_sample, [None], progress=False, **kwargs)
        assert e.value.code is ErrorCode.CONFIG_INVALID


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    model = Drift()
    calls = {"n": 0}

    def sample(m, cond, seed):
        calls["n"] += 1
        x = torch.randn(2, 4, 3, 3)
        if calls["n"] == 4:
            x[0, 0, 0, 0] = math.nan
        for s in range(6):
            m(x, torch.tensor(float(6 - s)))

    path = tmp_path / "ss.safetensors"
    with pytest.raises(BccError) as e:
        bcc.train_scale_shift(model, Schedule.every(2, 6, ["blk"]), sample, [None], iterations=10, kind="table",
                              checkpoint=path, checkpoint_every=1, progress=False)
    assert e.value.code is ErrorCode.TRAINING_DIVERGED and str(path) in str(e.value)
    kept = ScaleShift.load(path)
    assert kept.header["iteration"] == 3
    assert all(torch.isfinite(t).all() for t in kept.tables())
    assert all(p.requires_grad for p in model.parameters())  # restored on the error path too


def test_resume_continues_from_the_checkpoint(tmp_path):
    model, schedule = Drift(), Schedule.every(3, 6, ["blk"])
    path = tmp_path / "ss.safetensors"
    bcc.train_scale_shift(model, schedule, _drift_sample, [None], iterations=4, kind="table", checkpoint=path,
                          checkpoint_every=2, progress=False)
    ss = bcc.train_scale_shift(model, schedule, _drift_sample, [None], iterations=6, kind="table", checkpoint=path,
                               resume=True, progress=False)
    assert [h["iteration"] for h in ss.history] == [1, 2, 3, 4, 5, 6]
    assert ScaleShift.load(path).header["iteration"] == 6


def test_sampler_with_the_wrong_step_count_is_refused():
    def sample(m, cond, seed):
        for s in range(5):
            m(torch.randn(2, 4, 3, 3), torch.tensor(float(s)))

    with pytest.raises(BccError) as e:
        bcc.train_scale_shift(Drift(), Schedule.every(2, 6, ["blk"]), sample, [None], iterations=1, progress=False)
    assert e.value.code is ErrorCode.STEP_MISMATCH


# -- command line and torchrun --------------------------------------------------------------
def _tiny_schedule(tmp_path):
    model, args, kwargs = built("unet-tiny")
    names = bcc.find_blocks(model, (args, kwargs))
    path = tmp_path / "schedule.json"
    Schedule.every(2, 4, names).save(path)
    return path


def test_cli_train_writes_parameters_and_refuses_a_step_mismatch(tmp_path, capsys):
    from bcc.tools.cli import main

    schedule = _tiny_schedule(tmp_path)
    out = tmp_path / "ss.safetensors"
    argv = ["train", "--model", "zoo:unet-tiny", "--schedule", str(schedule), "--iterations", "2", "--out", str(out)]
    assert main([*argv, "--steps", "4"]) == 0
    assert "wrote" in capsys.readouterr().out
    ss = ScaleShift.load(out)
    ss.check_compatible(Schedule.load(schedule))
    assert ss.header["iteration"] == 2
    assert main([*argv, "--steps", "5"]) == 2
    assert "[BCC105]" in capsys.readouterr().err


def test_torchrun_ranks_end_with_identical_parameters(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    schedule = _tiny_schedule(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("dist_train_worker.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(worker), str(schedule), str(tmp_path / "rank")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    a, b = (ScaleShift.load(tmp_path / f"rank{i}.safetensors") for i in range(2))
    # Each rank sampled other seeds; only the averaged gradients keep them in lockstep.
    for x, y in zip(a.tables(), b.tables()):
        assert torch.equal(x, y)
    assert any(x.abs().max() > 0 for x in a.tables())  # and they did train


def test_export_bakes_scale_shift_and_matches_compile(tmp_path):
    schedule = Schedule(MASK, ("b0", "b1"))
    ss = _toy_ss(schedule)
    steps = _steps(5)
    ep = bcc.export(Toy(), schedule, (steps[0], {}), scale_shift=ss)
    assert [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"][:2] == [
        "bcc_schedule", "bcc_step"]
    path = bcc.save_exported(ep, tmp_path / "toy.pt2")
    loaded = bcc.load_exported(path)
    got = [loaded(x, t) for x, t in steps]
    for a, b in zip(got, _expected(MASK, steps, "residual")):
        torch.testing.assert_close(a, b)
    with pytest.raises(BccError) as e:
        loaded.set_schedule(Schedule.every(2, 5, ["b0", "b1"]))
    assert e.value.code is ErrorCode.SCALE_SHIFT_MISMATCH
    with pytest.raises(BccError) as e:
        bcc.export(Toy(), Schedule.every(2, 5, ["b0", "b1"]), (steps[0], {}), scale_shift=ss)
    assert e.value.code is ErrorCode.SCALE_SHIFT_MISMATCH


def _grouped_ss(schedule):
    """Two guidance halves (rows 0 and 1 of a batch of 2) with different corrections."""
    ss = ScaleShift.identity(schedule, _toy_slots(), groups=2)
    with torch.no_grad():
        for table in ss.table:
            for s in range(schedule.num_steps):
                table[s, 0, 0], table[s, 0, 1] = 0.5 * (s + 1), float(s + 1)
                table[s, 1, 0], table[s, 1, 1] = -float(s), 2.0 * s
    return ss


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_grouped_corrections_apply_per_guidance_half(backend):
    schedule = Schedule(MASK, ("b0", "b1"))
    steps = _steps(5)
    model = bcc.compile(Toy(), schedule, backend=backend, scale_shift=_grouped_ss(schedule))
    got = [model(x, t) for x, t in steps]
    for row, (scale, shift) in enumerate(((0.5, -1.0), (1.0, 2.0))):
        # Row r of the batch follows the by-hand recurrence with its group's gamma and beta.
        want = _expected(MASK, [(x[row:row + 1], t) for x, t in steps], "residual",
                         lambda s: (1 + scale * (s + 1), shift * s))
        for a, b in zip(got, want):
            torch.testing.assert_close(a[row:row + 1], b, rtol=1e-6, atol=1e-5)


def test_grouped_parameters_round_trip_and_refuse_an_odd_batch(tmp_path):
    schedule = Schedule(MASK, ("b0", "b1"))
    ss = _grouped_ss(schedule)
    back = ScaleShift.load(ss.save(tmp_path / "g.safetensors"))
    assert back.groups == 2 and all(torch.equal(a, b) for a, b in zip(back.tables(), ss.tables()))
    model = bcc.compile(Toy(), schedule, backend="eager", scale_shift=back)
    with pytest.raises(BccError) as e:
        model(torch.randn(3, 3), torch.tensor(1.0))  # three rows do not split into two halves
    assert e.value.code is ErrorCode.SCALE_SHIFT_MISMATCH and "groups" in str(e.value)
    with pytest.raises(BccError) as e:
        ScaleShift.identity(schedule, ss.slots, groups=0)
    assert e.value.code is ErrorCode.CONFIG_INVALID


class HalfScaled(torch.nn.Module):
    """Like Scaled, but the two guidance halves drift in opposite directions: a shared
    correction cannot follow both, one per half can."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x, t):
        sign = torch.tensor([1.0, -1.0]).repeat_interleave(x.shape[0] // 2).view(-1, 1, 1, 1)
        return self.conv(x) * (1 + sign * t / 1000) + sign * t / 1000


class HalfDrift(Drift):
    def __init__(self):
        super().__init__()
        self.blk = HalfScaled()


def test_a_correction_per_guidance_half_fits_what_a_shared_one_cannot():
    schedule = Schedule.every(3, 6, ["blk"])

    def train(groups):
        torch.manual_seed(0)
        return bcc.train_scale_shift(HalfDrift(), schedule, _halves_sample(False), [None], iterations=60, lr=2e-2,
                                     mode="output", progress=False, guidance_scale=3.0, groups=groups).history
    shared, grouped = train(1), train(2)
    assert grouped[-1]["loss_output"] < 0.1 * grouped[0]["loss_output"]
    assert grouped[-1]["loss_output"] < 0.5 * shared[-1]["loss_output"], (shared[-1], grouped[-1])
    # The corrected cached values themselves: near the teacher's per half, far off shared.
    assert grouped[-1]["loss_block"] < 0.1 * shared[-1]["loss_block"], (shared[-1], grouped[-1])


def _drift_trajectory(model, cond, seed):
    """A deterministic sampler that returns its final sample, gradients on."""
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    for s in range(6):
        x = x - 0.1 * model(x, torch.tensor(900.0 - 150 * s))
    return x


def test_final_loss_trains_through_the_whole_trajectory():
    torch.manual_seed(0)
    model = Drift()
    schedule = Schedule.every(3, 6, ["blk"])
    ss = bcc.train_scale_shift(model, schedule, _drift_trajectory, [None], iterations=60, lr=2e-2, mode="output",
                               loss="final", progress=False)
    first, last = ss.history[0]["loss_final"], ss.history[-1]["loss_final"]
    assert last < 0.1 * first, (first, last)
    with torch.no_grad():
        teacher = _drift_trajectory(model, None, 0)
        naive = _drift_trajectory(bcc.compile(model, schedule, backend="eager", mode="output"), None, 0)
        fixed = _drift_trajectory(bcc.compile(model, schedule, backend="inductor", mode="output", scale_shift=ss),
                                  None, 0)
    assert (fixed - teacher).abs().mean() < 0.3 * (naive - teacher).abs().mean()


def test_final_loss_refuses_a_sampler_without_gradients():
    @torch.no_grad()
    def sampler(model, cond, seed):
        return _drift_trajectory(model, cond, seed)

    with pytest.raises(BccError) as e:
        bcc.train_scale_shift(Drift(), Schedule.every(3, 6, ["blk"]), sampler, [None], iterations=2, loss="final",
                              progress=False)
    assert e.value.code is ErrorCode.CONFIG_INVALID and "grad" in str(e.value)


# -- configuration and files ----------------------------------------------------------------
def test_training_config_is_validated_and_keywords_override_it():
    from bcc.scale_shift.train import ScaleShiftTrainConfig

    for bad in ({"groups": 0}, {"mode": "both"}, {"checkpoint_every": 0}, {"guidance_scale": math.inf}):
        with pytest.raises(BccError) as e:
            ScaleShiftTrainConfig(**bad)
        assert e.value.code is ErrorCode.CONFIG_INVALID
    with pytest.raises(BccError, match="unknown training option.*'iteration'"):
        ScaleShiftTrainConfig().replace(iteration=3)
    config = ScaleShiftTrainConfig(iterations=50, lr=2e-2, mode="output")
    ss = bcc.train_scale_shift(Drift(), Schedule.every(3, 6, ["blk"]), _drift_sample, [None], config,
                               iterations=2, progress=False)
    assert len(ss.history) == 2 and ss.meta["lr"] == 2e-2 and ss.mode == "output"
    assert config.iterations == 50  # frozen: overrides make a copy


class _NoTimestepName(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blk = Scaled()

    def forward(self, x, noise_level):
        return self.blk(x, noise_level)


def test_linear_kind_needs_a_timestep_it_can_find():
    def sample(model, cond, seed):
        x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(seed))
        return [model(x, torch.tensor(900.0 - 150 * s)) for s in range(6)]

    schedule = Schedule.every(3, 6, ["blk"])
    with pytest.raises(BccError) as e:  # no argument named timestep/t: never guessed as 0
        bcc.train_scale_shift(_NoTimestepName(), schedule, sample, [None], iterations=1, kind="linear", progress=False)
    assert e.value.code is ErrorCode.CONFIG_INVALID and "timestep_of=" in str(e.value)
    ss = bcc.train_scale_shift(_NoTimestepName(), schedule, sample, [None], iterations=1, kind="linear",
                               progress=False, timestep_of=lambda args, kwargs: float(args[1]))
    rows = ss.embedding[schedule.mask[:, 0].logical_not()]
    assert len({tuple(r.tolist()) for r in rows}) == len(rows)  # a different embedding per reuse step


def test_version_1_files_still_load_and_pair_by_shape(tmp_path):
    import json

    from safetensors.torch import save_file

    schedule = Schedule(MASK, ("b0", "b1"))
    ss = _toy_ss(schedule)
    path = ss.save(tmp_path / "v2.safetensors")
    head = dict(ScaleShift.load(path).header)
    # What version 1 wrote: shape-only slots (channels, rank, shape without the batch).
    head.update(version=1, slots=[{"block": b, "output": 0, "channels": 3, "rank": 2, "shape": [3]} for b in ("b0", "b1")])
    old = tmp_path / "v1.safetensors"
    save_file({k: v.contiguous() for k, v in ss.state_dict().items()}, str(old), metadata={"bcc": json.dumps(head)})
    back = ScaleShift.load(old)
    assert back.by_shape and [s.sample_shape for s in back.slots] == [(3,), (3,)]
    steps = _steps(5)
    model = bcc.compile(Toy(), schedule, backend="eager", scale_shift=back)
    got = [model(x, t) for x, t in steps]
    for a, b in zip(got, _expected(MASK, steps, "residual")):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
