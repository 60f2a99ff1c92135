"""Reliability: every bad input is a coded error, state never leaks, threads and bf16.

Each test states one behaviour the README's "Step tracking and what is guaranteed"
section promises; the error-code catalogue for the schedule and the call sits here
beside the older cases in test_errors.py.
"""
import copy
import gc
import json
import threading

import pytest
import torch

import bcc
from bcc import BccError, ErrorCode, Schedule

from testing import Toy, built, reference_outputs, run, trajectory_inputs

B = torch.bool


def _code(excinfo):
    return excinfo.value.code


def _toy_steps(n, shape=(2, 3), seed=0):
    """``n`` calls ``((x, t), {})`` as :func:`conftest.run` takes them."""
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(shape, generator=g), torch.tensor(float(100 - s))), {}) for s in range(n)]


class _Net(torch.nn.Module):
    """Two residual MLP blocks: real GEMM kernels, seconds to compile (a DiT takes ~10 s)."""

    def __init__(self, width=16):
        super().__init__()
        torch.manual_seed(0)
        self.b0 = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, width), torch.nn.GELU())
        self.b1 = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, width), torch.nn.GELU())
        self.out = torch.nn.Linear(width, width)

    def forward(self, x, t):
        h = x + self.b0(x)
        h = h + self.b1(h)
        return self.out(h) * t


def _net_steps(n, seed=0):
    return _toy_steps(n, shape=(4, 16), seed=seed)


def _exact(got, want, **kw):
    for s, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m: f"step {s}: {m}", **kw)


# -- the bad-input catalogue --------------------------------------------------------

SCHEDULE_CASES = {
    "mask 1-D": (lambda: Schedule(torch.ones(3, dtype=B), ["a"]), ErrorCode.SCHEDULE_SHAPE),
    "no steps": (lambda: Schedule(torch.ones(0, 1, dtype=B), ["a"]), ErrorCode.SCHEDULE_SHAPE),
    "no blocks": (lambda: Schedule(torch.ones(2, 0, dtype=B), []), ErrorCode.SCHEDULE_SHAPE),
    "timesteps length": (lambda: Schedule(torch.ones(2, 1, dtype=B), ["a"], timesteps=[1.0]),
                         ErrorCode.SCHEDULE_SHAPE),
    "every 0": (lambda: Schedule.every(0, 4, ["a"]), ErrorCode.SCHEDULE_SHAPE),
    "int mask": (lambda: Schedule(torch.ones(2, 1, dtype=torch.int64), ["a"]), ErrorCode.SCHEDULE_DTYPE),
    "float mask": (lambda: Schedule(torch.ones(2, 1), ["a"]), ErrorCode.SCHEDULE_DTYPE),
    "list mask": (lambda: Schedule([[True]], ["a"]), ErrorCode.SCHEDULE_DTYPE),
    "row 0 reuses": (lambda: Schedule(torch.tensor([[True, False], [True, True]]), ["a", "b"]),
                     ErrorCode.SCHEDULE_FIRST_ROW),
    "too few names": (lambda: Schedule(torch.ones(2, 2, dtype=B), ["a"]), ErrorCode.SCHEDULE_NAMES),
    "duplicate names": (lambda: Schedule(torch.ones(2, 2, dtype=B), ["a", "a"]), ErrorCode.SCHEDULE_NAMES),
    "non-string name": (lambda: Schedule(torch.ones(2, 1, dtype=B), [3]), ErrorCode.SCHEDULE_NAMES),
    "costs per block": (lambda: Schedule(torch.ones(2, 2, dtype=B), ["a", "b"], block_costs=[1.0]),
                        ErrorCode.SCHEDULE_NAMES),
}


@pytest.mark.parametrize("case", list(SCHEDULE_CASES))
def test_invalid_schedule(case):
    make, code = SCHEDULE_CASES[case]
    with pytest.raises(BccError) as e:
        make()
    assert _code(e) is code


def test_schedule_mask_is_a_private_copy():
    mask = torch.ones(2, 1, dtype=B)
    schedule = Schedule(mask, ["a"])
    mask[0, 0] = False  # would break the row-0 invariant if the schedule shared it
    assert bool(schedule.mask[0, 0])


_EAGER: dict = {}


def _mid_trajectory_call(change):
    """Run 2 of 4 steps, then a changed call; return the error and the model."""
    model, _args, _kwargs = built("unet-tiny")
    if "unet" not in _EAGER:  # eager: no Dynamo state, so one capture serves every test
        _EAGER["unet"] = bcc.compile(model, lambda names: Schedule.every(2, 4, names), backend="eager")
    fast = _EAGER["unet"]
    fast.bcc_reset()
    inputs = trajectory_inputs("unet-tiny", model, 4)
    run(fast, inputs[:2])
    args, kwargs = change(*inputs[2])
    with pytest.raises(BccError) as e, torch.no_grad():
        fast(*args, **kwargs)
    return e, fast, inputs


def test_device_change_mid_trajectory():
    e, fast, inputs = _mid_trajectory_call(lambda a, k: ((a[0].to("meta"), a[1]), k))
    assert _code(e) is ErrorCode.SIGNATURE_CHANGED
    assert "device cpu -> meta" in str(e.value)
    assert fast.bcc_step == 0
    _exact(run(fast, inputs), reference_outputs(built("unet-tiny")[0], fast.bcc_schedule, inputs))


def test_return_dict_switch_mid_trajectory():
    e, _fast, _inputs = _mid_trajectory_call(lambda a, k: (a, {**k, "return_dict": True}))
    assert _code(e) is ErrorCode.SIGNATURE_CHANGED


def test_omitted_optional_kwarg_mid_trajectory():
    e, _fast, _inputs = _mid_trajectory_call(lambda a, k: (a, {n: v for n, v in k.items() if n != "return_dict"}))
    assert _code(e) is ErrorCode.SIGNATURE_CHANGED
    assert "argument structure" in str(e.value)


def test_return_dict_and_omitted_kwargs_at_a_trajectory_start_are_new_captures():
    model, _args, _kwargs = built("unet-tiny")
    fast = bcc.compile(model, lambda names: Schedule.every(2, 2, names), backend="eager")
    inputs = trajectory_inputs("unet-tiny", model, 2)
    with torch.no_grad():
        as_dict = [fast(*a, **{**k, "return_dict": True}) for a, k in inputs]
        # return_dict omitted: diffusers' default (True); no optional kwargs at all.
        bare = [fast(*a, encoder_hidden_states=k["encoder_hidden_states"]) for a, k in inputs]
    assert all(type(o).__name__ == "UNet2DConditionOutput" for o in as_dict + bare)
    want = reference_outputs(model, fast.bcc_schedule, inputs)
    _exact([o.sample for o in as_dict], want)
    _exact([o.sample for o in bare], want)
    assert fast.bcc_stats()["signatures"] == 2  # one capture per call structure, each kept


def test_missing_required_input_is_a_capture_error():
    model, (x, t), kwargs = built("unet-tiny")
    fast = bcc.compile(model, lambda names: Schedule.every(2, 2, names), backend="eager")
    with pytest.raises(BccError) as e, torch.no_grad():
        fast(x, t)  # no encoder_hidden_states
    assert _code(e) is ErrorCode.CAPTURE_FAILED
    assert fast.bcc_step == 0


def test_interleaved_trajectories_are_refused_in_check_mode():
    model, _args, _kwargs = built("unet-tiny")
    fast = bcc.compile(model, lambda names: Schedule.every(2, 3, names), backend="eager", check=True)
    first = trajectory_inputs("unet-tiny", model, 3, seed=0)
    second = trajectory_inputs("unet-tiny", model, 3, seed=1)
    run(fast, first)  # records the trajectory's timesteps
    run(fast, first[:1])
    with pytest.raises(BccError) as e:
        run(fast, second[:1])  # a second generation starts before the first ends
    assert _code(e) is ErrorCode.STEP_MISMATCH
    assert "bcc_reset" in str(e.value)
    _exact(run(fast, second), reference_outputs(model, fast.bcc_schedule, second))


def test_interleaved_trajectories_of_another_shape_are_refused_without_check():
    model, _args, _kwargs = built("unet-tiny")
    fast = bcc.compile(model, lambda names: Schedule.every(2, 3, names), backend="eager")
    big = trajectory_inputs("unet-tiny", model, 3, batch=2)
    small = trajectory_inputs("unet-tiny", model, 3, batch=1)
    run(fast, big[:1])
    with pytest.raises(BccError) as e:
        run(fast, small[:1])
    assert _code(e) is ErrorCode.SIGNATURE_CHANGED


def _file_schedule(tmp_path):
    schedule = Schedule.every(2, 3, ["b0", "b1"])
    schedule.save(tmp_path / "s.json")
    return json.loads((tmp_path / "s.json").read_text())


@pytest.mark.parametrize("version", [0, 2])
def test_schedule_file_from_another_format_version(tmp_path, version):
    payload = _file_schedule(tmp_path)
    payload["version"] = version
    (tmp_path / "v.json").write_text(json.dumps(payload))
    with pytest.raises(BccError) as e:
        Schedule.load(tmp_path / "v.json")
    assert _code(e) is ErrorCode.FILE_VERSION
    assert "version" in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "no mask", "mask not 0/1", "empty"])
def test_damaged_schedule_file(tmp_path, damage):
    payload = _file_schedule(tmp_path)
    text = (tmp_path / "s.json").read_text()
    if damage == "truncated":
        text = text[: len(text) // 2]
    elif damage == "no mask":
        text = json.dumps({k: v for k, v in payload.items() if k != "mask"})
    elif damage == "mask not 0/1":
        text = json.dumps({**payload, "mask": [[1, 1], [2, 0], [1, 1]]})
    else:
        text = ""
    (tmp_path / "d.json").write_text(text)
    with pytest.raises(BccError) as e:
        Schedule.load(tmp_path / "d.json")
    assert _code(e) is ErrorCode.FILE_INVALID


def test_schedule_file_naming_only_another_models_blocks(tmp_path):
    Schedule.every(2, 2, ["transformer_blocks.0"]).save(tmp_path / "names.json")
    fast = bcc.compile(Toy(), Schedule.load(tmp_path / "names.json"), backend="eager")
    with pytest.raises(BccError) as e:
        fast(torch.ones(2), torch.tensor(1.0))
    assert _code(e) is ErrorCode.BLOCK_NOT_FOUND


def test_schedule_file_of_another_model(tmp_path):
    from bcc.plan.profile import model_fingerprint

    # One name the other model has and this one lacks.
    Schedule.every(2, 2, ["b0", "transformer_blocks.0"]).save(tmp_path / "names.json")
    fast = bcc.compile(Toy(), Schedule.load(tmp_path / "names.json"), backend="eager")
    with pytest.raises(BccError) as e:
        fast(torch.ones(2), torch.tensor(1.0))
    assert _code(e) is ErrorCode.BLOCK_NOT_FOUND
    assert "transformer_blocks.0" in str(e.value)
    # Same block names, but planned from another model's change profile.
    other = torch.nn.Linear(3, 3)
    profile = bcc.ChangeProfile(torch.tensor([[0.0, 0.0], [0.3, 0.3]]), ["b0", "b1"],
                                fingerprint=model_fingerprint(other))
    profile.save(tmp_path / "p.json")
    Schedule.from_change(bcc.ChangeProfile.load(tmp_path / "p.json"), 0.5).save(tmp_path / "planned.json")
    fast = bcc.compile(Toy(), Schedule.load(tmp_path / "planned.json"), backend="eager")
    with pytest.raises(BccError) as e:
        fast(torch.ones(2), torch.tensor(1.0))
    assert _code(e) is ErrorCode.PROFILE_MISMATCH
    with pytest.raises(BccError) as e:
        bcc.ChangeProfile.load(tmp_path / "p.json").check_compatible(model=Toy())
    assert _code(e) is ErrorCode.PROFILE_MISMATCH


# -- NaN and inf: propagated like the model, never checked ---------------------------

def test_nan_and_inf_propagate_like_the_reference_and_end_with_the_trajectory():
    # Toy: b0 = 2x, b1 = x + 10, so a non-finite input element stays in its place.
    mask = torch.tensor([[True, True], [False, True], [False, False]])
    schedule = Schedule(mask, ["b0", "b1"])
    fast = bcc.compile(Toy(), schedule, backend="inductor")
    steps = _toy_steps(3)
    bad = [((x.clone(), t), k) for (x, t), k in steps]
    bad[0][0][0][0, 0] = float("nan")
    bad[0][0][0][1, 2] = float("inf")
    got = run(fast, bad)
    _exact(got, reference_outputs(Toy(), schedule, bad), equal_nan=True)
    # Reused caches carry the step-0 NaN and inf into steps whose inputs are clean (a
    # residual of inf is inf - inf = NaN, in the reference too) ...
    assert got[1][0, 0].isnan() and got[2][0, 0].isnan() and got[2][1, 2].isnan()
    assert torch.isfinite(bad[1][0][0]).all()
    # ... but not into the next trajectory: step 0 recomputes and overwrites every cache.
    _exact(run(fast, steps), reference_outputs(Toy(), schedule, steps))


def test_nan_trajectory_aborted_by_an_error_leaves_nothing_behind():
    schedule = Schedule(torch.tensor([[True, True], [False, False], [False, True]]), ["b0", "b1"])
    fast = bcc.compile(Toy(), schedule, backend="inductor")
    steps = _toy_steps(3)
    t0 = steps[0][0][1]
    fast(torch.full((2, 3), float("nan")), t0)
    with pytest.raises(BccError) as e:
        fast(torch.ones(5), t0)
    assert _code(e) is ErrorCode.SIGNATURE_CHANGED
    _exact(run(fast, steps), reference_outputs(Toy(), schedule, steps))


# -- the model changed after compile -------------------------------------------------

def test_weights_updated_in_place_are_seen():
    net = _Net()
    schedule = Schedule.every(2, 3, ["b0", "b1"])
    fast = bcc.compile(net, schedule, backend="inductor")
    steps = _net_steps(3)
    before = run(fast, steps)
    with torch.no_grad():
        net.b0[1].weight.mul_(2)
        net.out.bias.add_(1)
    after = run(fast, steps)
    assert not torch.allclose(after[0], before[0])
    for g, w in zip(after, reference_outputs(net, schedule, steps), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_replaced_parameter_or_module_is_recaptured_at_the_next_trajectory():
    model = copy.deepcopy(built("pixart")[0])
    schedule = Schedule.every(2, 3, ["transformer_blocks.0", "transformer_blocks.1"])
    inputs = trajectory_inputs("pixart", model, 3)
    fast = bcc.compile(model, schedule, backend="eager")
    run(fast, inputs)
    proj = model.transformer_blocks[0].ff.net[0].proj
    proj.weight = torch.nn.Parameter(proj.weight.detach() * 3)  # a new object, not an update
    model.proj_out = torch.nn.Linear(model.proj_out.in_features, model.proj_out.out_features)
    _exact(run(fast, inputs), reference_outputs(model, schedule, inputs))
    assert fast.bcc_stats()["signatures"] == 1  # the stale capture is gone, not kept beside


# -- state isolation -----------------------------------------------------------------

def test_one_model_compiled_twice_alternating_per_step():
    net = _Net()
    lazy = Schedule(torch.tensor([[True, True], [False, False], [False, True], [True, False]]), ["b0", "b1"])
    other = Schedule(torch.tensor([[True, True], [True, False], [False, False], [False, True]]), ["b0", "b1"])
    a = bcc.compile(net, lazy, backend="inductor")
    b = bcc.compile(net, other, backend="inductor")
    steps_a, steps_b = _net_steps(4, seed=1), _net_steps(4, seed=2)
    got_a, got_b = [], []
    with torch.no_grad():
        for (args_a, _), (args_b, _) in zip(steps_a, steps_b):
            got_a.append(a(*args_a))
            got_b.append(b(*args_b))
    for got, schedule, steps in ((got_a, lazy, steps_a), (got_b, other, steps_b)):
        for g, w in zip(got, reference_outputs(net, schedule, steps), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_200_guided_generations_have_flat_memory():
    from diffusers import DDIMScheduler

    # A pipeline's denoising loop (DDIM, classifier-free guidance as one batch of two)
    # around a compiled DiT; the SD pipeline's UNet would spend most of CI compiling.
    model = copy.deepcopy(built("pixart")[0])
    fast = bcc.compile(model, lambda names: Schedule.every(2, 3, names), backend="inductor")
    scheduler = DDIMScheduler(clip_sample=False)
    (x0,), kwargs = trajectory_inputs("pixart", model, 1, batch=1)[0]
    cond = kwargs["encoder_hidden_states"]
    emb = torch.cat([torch.zeros_like(cond), cond])

    def generate(seed):
        scheduler.set_timesteps(3)
        x = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for t in scheduler.timesteps:
                out = fast(torch.cat([x, x]), encoder_hidden_states=emb, timestep=t.expand(2),
                           added_cond_kwargs=kwargs["added_cond_kwargs"], return_dict=False)[0]
                uncond, text = out[:, :4].chunk(2)
                x = scheduler.step(uncond + 3.0 * (text - uncond), t, x).prev_sample
        return x

    first = generate(0)
    for seed in range(1, 6):  # allocator and lazy-initialisation warm-up
        generate(seed)
    tensors, rss = _live_tensors(), _rss_bytes()
    for seed in range(200):
        generate(seed % 3)
    # A leak of one cache or output per call would add hundreds of tensors; the bounds
    # leave room for allocator noise and nothing per call.
    assert _live_tensors() - tensors < 50
    assert _rss_bytes() - rss < 64 * 2**20
    assert fast.bcc_stats()["signatures"] == 1 and fast.bcc_step == 0
    torch.testing.assert_close(generate(0), first, rtol=0, atol=0)


# -- threads -------------------------------------------------------------------------

def _in_threads(*jobs):
    """Run each job in its own thread, started together; return results or exceptions."""
    barrier = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)

    def body(i, job):
        barrier.wait()
        try:
            with torch.no_grad():  # grad mode is per thread
                results[i] = job()
        except BaseException as e:  # handed back to the test thread
            results[i] = e

    threads = [threading.Thread(target=body, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, AssertionError):
            raise r
    return results


def test_two_compiled_instances_in_two_threads_equal_sequential():
    net = _Net()
    every2 = Schedule.every(2, 4, ["b0", "b1"])
    other = Schedule(torch.tensor([[True, True], [False, True], [True, False], [False, False]]), ["b0", "b1"])
    fast_a = bcc.compile(net, every2, backend="inductor")
    fast_b = bcc.compile(net, other, backend="inductor")
    steps = _net_steps(4)

    def trajectories(fast):
        return [run(fast, steps) for _ in range(20)]

    # Not warmed up: the two captures and compilations race too (torch.export alone
    # is not thread-safe; bcc serialises it).
    got_a, got_b = _in_threads(lambda: trajectories(fast_a), lambda: trajectories(fast_b))
    for got, schedule, fast in ((got_a, every2, fast_a), (got_b, other, fast_b)):
        assert not isinstance(got, BaseException), got
        for trajectory in got:
            _exact(trajectory, run(fast, steps))
        for g, w in zip(got[0], reference_outputs(net, schedule, steps), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_shared_instance_refuses_a_second_thread_mid_trajectory():
    schedule = Schedule(torch.tensor([[True, True], [False, False], [False, True]]), ["b0", "b1"])
    fast = bcc.compile(Toy(), schedule, backend="inductor")
    steps = _toy_steps(3)
    want = reference_outputs(Toy(), schedule, steps)
    owner_started, intruder_done = threading.Event(), threading.Event()
    refused: list = []

    def owner():
        got = run(fast, steps[:1])
        owner_started.set()
        intruder_done.wait()
        return got + run(fast, steps[1:])

    def intruder():
        owner_started.wait()
        try:
            run(fast, steps[:1])
        except BccError as e:
            refused.append(e)
        finally:
            intruder_done.set()

    got, _ = _in_threads(owner, intruder)
    assert [e.code for e in refused] == [ErrorCode.CONCURRENT_TRAJECTORY]
    assert "bcc.compile" in str(refused[0])
    _exact(got, want)  # the refused call did not disturb the owner's trajectory
    assert fast.bcc_step == 0
    # Once the owner's trajectory has ended, any thread may start the next one.
    (later,) = _in_threads(lambda: run(fast, steps))
    _exact(later, want)


def test_shared_instance_under_contention_never_mixes_trajectories():
    net = _Net()
    schedule = Schedule(torch.tensor([[True, True], [False, False], [False, True], [True, False]]), ["b0", "b1"])
    fast = bcc.compile(net, schedule, backend="inductor")
    steps = _net_steps(4)
    want = run(fast, steps)

    def generations():
        # Retry until 15 generations finished: how often the other thread holds the
        # trajectory depends on scheduling, so only the outcome is asserted, not a count.
        done, refused = [], 0
        while len(done) < 15 and refused < 100_000:
            try:
                done.append(run(fast, steps))
            except BccError as e:
                assert e.code is ErrorCode.CONCURRENT_TRAJECTORY, e
                refused += 1  # the other thread owns the trajectory; try again after it
        return done, refused

    results = _in_threads(generations, generations)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    assert [len(done) for done, _ in results] == [15, 15]  # a refusal never costs the owner's generation
    for done, _ in results:
        for trajectory in done:
            _exact(trajectory, want)


# -- bf16 on CPU ---------------------------------------------------------------------

def _bf16(inputs):
    def cast(v):
        return v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return [(tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}) for args, kwargs in inputs]


def test_bf16_eager_all_true_equals_the_bf16_model():
    model = copy.deepcopy(built("unet-tiny")[0]).to(torch.bfloat16)
    inputs = _bf16(trajectory_inputs("unet-tiny", model, 3))
    fast = bcc.compile(model, lambda names: Schedule.all_compute(3, names), backend="eager")
    got = run(fast, inputs)
    assert got[0].dtype == torch.bfloat16
    _exact(got, run(model, inputs))
    every2 = Schedule.every(2, 3, fast.bcc_blocks)
    fast.set_schedule(every2)
    _exact(run(fast, inputs), reference_outputs(model, every2, inputs))


def test_bf16_compiled_matches_the_bf16_reference():
    model = copy.deepcopy(built("pixart")[0]).to(torch.bfloat16)
    schedule = Schedule(torch.tensor([[True, True], [False, True], [True, False], [False, False]]),
                        ["transformer_blocks.0", "transformer_blocks.1"])
    inputs = _bf16(trajectory_inputs("pixart", model, 4))
    fast = bcc.compile(model, schedule, backend="inductor")
    got = run(fast, inputs)
    for g, w in zip(got, reference_outputs(model, schedule, inputs), strict=True):
        assert g.dtype == torch.bfloat16
        # Inductor computes fused bf16 ops in fp32 and rounds once where eager rounds
        # after every op: a few bf16 ulps (2^-8 relative) apart, not more.
        torch.testing.assert_close(g, w, rtol=4e-2, atol=4e-2)
