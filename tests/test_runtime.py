"""The compiled module as a drop-in: compile contract, step tracking, attributes."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import bcc
from bcc import BccError, ErrorCode, Schedule, StepRef

from testing import Double, Toy, ToySkip, built, changing_schedule, first_tensor, run, trajectory_inputs


def test_one_graph_zero_recompiles_over_two_20_step_trajectories():
    model, args, kwargs = built("unet-tiny")
    names = bcc.find_blocks(model, (args, kwargs))
    counter = CompileCounterWithBackend("inductor")
    fast = bcc.compile(model, changing_schedule(20, names), backend=counter)
    inputs = trajectory_inputs("unet-tiny", model, 20)
    counters.clear()
    first = run(fast, inputs)
    second = run(fast, inputs)
    assert counter.frame_count == 1
    assert counter.op_count > 0
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0 if "recompiles" in counters else True
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_drop_in_attributes_and_return_types():
    model, args, kwargs = built("unet-tiny")
    fast = bcc.compile(model, lambda names: Schedule.every(2, 2, names), backend="eager")
    assert fast.config is model.config
    assert fast.config.in_channels == 4
    assert fast.dtype == torch.float32 and fast.device.type == "cpu"
    with torch.no_grad():
        out = fast(*args, **{**kwargs, "return_dict": True})
    assert type(out).__name__ == "UNet2DConditionOutput"
    assert fast.bcc_blocks == tuple(bcc.find_blocks(model, (args, kwargs)))


def test_python_number_timestep_does_not_recapture_each_step():
    model, args, kwargs = built("unet-tiny")
    x, _t = args
    fast = bcc.compile(model, lambda names: Schedule.all_compute(3, names), backend="eager")
    with torch.no_grad():
        outs = [first_tensor(fast(x, 999 - 100 * s, **kwargs)) for s in range(3)]
        want = [first_tensor(model(x, torch.tensor(999 - 100 * s), **kwargs)) for s in range(3)]
    assert fast.bcc_stats()["signatures"] == 1
    for a, b in zip(outs, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_new_batch_size_at_step_zero_is_a_new_capture_not_an_error():
    model, args, kwargs = built("unet-tiny")
    fast = bcc.compile(model, lambda names: Schedule.every(2, 2, names), backend="eager")
    run(fast, trajectory_inputs("unet-tiny", model, 2))
    small_model, *_ = built("unet-tiny")
    one = [((a[0][:1], a[1]), {**k, "encoder_hidden_states": k["encoder_hidden_states"][:1]})
           for a, k in trajectory_inputs("unet-tiny", model, 2)]
    run(fast, one)
    assert fast.bcc_stats()["signatures"] == 2


def test_two_compiled_models_do_not_share_caches():
    model, args, kwargs = built("unet-tiny")
    names = bcc.find_blocks(model, (args, kwargs))
    lazy = bcc.compile(model, Schedule(torch.tensor([[True] * 4, [False] * 4]), names), backend="eager")
    full = bcc.compile(model, Schedule.all_compute(2, names), backend="eager")
    inputs = trajectory_inputs("unet-tiny", model, 2)
    want_full = run(model, inputs)
    # Interleave: a shared cache would leak full's step-1 values into lazy's reuse.
    with torch.no_grad():
        got = []
        for a, k in inputs:
            got.append((first_tensor(lazy(*a, **k)), first_tensor(full(*a, **k))))
    lazy_alone = run(bcc.compile(model, lazy.bcc_schedule, backend="eager"), inputs)
    for (g_lazy, g_full), w_full, w_lazy in zip(got, want_full, lazy_alone):
        torch.testing.assert_close(g_full, w_full, rtol=0, atol=0)
        torch.testing.assert_close(g_lazy, w_lazy, rtol=0, atol=0)


def test_exception_mid_trajectory_restarts_clean():
    model, args, kwargs = built("unet-tiny")
    fast = bcc.compile(model, lambda names: Schedule.every(3, 3, names), backend="eager")
    inputs = trajectory_inputs("unet-tiny", model, 3)
    want = run(fast, inputs)
    with torch.no_grad():
        fast(*inputs[0][0], **inputs[0][1])
        with pytest.raises(Exception):
            fast(inputs[1][0][0], "not a timestep", **inputs[1][1])
    assert fast.bcc_step == 0
    for a, b in zip(run(fast, inputs), want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_check_mode_accepts_a_correct_loop_twice():
    model, args, kwargs = built("unet-tiny")
    fast = bcc.compile(model, lambda names: Schedule.every(2, 4, names), backend="eager", check=True)
    inputs = trajectory_inputs("unet-tiny", model, 4)
    a = run(fast, inputs)
    b = run(fast, inputs)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# -- a hand-written loop: the trajectory marker, plans, check mode -----------------------------

def _toy_plan(steps=4):
    l1 = torch.tensor([[0.0, 0.0]] + [[0.3, 0.1]] * (steps - 1), dtype=torch.float64)
    return bcc.Plan(bcc.ChangeProfile(l1, ["b0", "b1"]), budget=0.75)


def _loop(fast, steps, streams=1, start=999.0):
    xs = [torch.full((2,), float(s + 1)) for s in range(steps)]
    out = []
    with torch.no_grad():
        for s in range(steps):
            t = torch.tensor(start - 100.0 * s)
            out += [fast(xs[s] * (k + 1), t) for k in range(streams)]
    return out


def test_a_marked_trajectory_serves_a_plan_at_any_step_count_and_two_streams():
    plan = _toy_plan()
    fast = bcc.compile(ToySkip(), plan, backend="eager")
    explicit = bcc.compile(ToySkip(), plan, backend="eager")
    for steps in (4, 7, 4):
        with fast.trajectory(steps=steps, streams=2):
            got = _loop(fast, steps, streams=2)
        want = []
        with torch.no_grad():
            for s in range(steps):
                t = torch.tensor(999.0 - 100.0 * s)
                want += [explicit.bcc_call_at(StepRef(step=s, num_steps=steps, stream=k),
                                              torch.full((2,), float(s + 1)) * (k + 1), t) for k in range(2)]
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
    assert fast.bcc_schedule_for(7).meta["plan_resampled_from"] == 4
    assert fast.bcc_stats()["streams"] == 2 and fast.bcc_stats()["step_counts"] == 2


def test_a_plan_without_a_marker_says_how_to_give_the_step_count():
    fast = bcc.compile(Toy(), _toy_plan(), backend="eager")
    with pytest.raises(BccError) as e:
        fast(torch.ones(2), torch.tensor(1.0))
    assert e.value.code is ErrorCode.STEP_UNTRACKED and "trajectory(steps=" in str(e.value)


def test_the_marker_refuses_more_calls_and_in_check_mode_fewer():
    fast = bcc.compile(Toy(), Schedule.every(2, 3, ["b0", "b1"]), backend="eager")
    with pytest.raises(BccError) as e, fast.trajectory(steps=3):
        _loop(fast, 4)
    assert e.value.code is ErrorCode.STEP_OVERFLOW and "marked as 3 steps" in str(e.value)
    checked = bcc.compile(Toy(), _toy_plan(), backend="eager", check=True)
    with pytest.raises(BccError) as e, checked.trajectory(steps=4):
        _loop(checked, 2)
    assert e.value.code is ErrorCode.STEP_MISMATCH and "ended after 2 calls" in str(e.value)
    with checked.trajectory(steps=4):  # an interrupted loop leaves nothing behind
        assert len(_loop(checked, 4)) == 4


def test_a_new_step_count_or_stream_compiles_nothing():
    counter = CompileCounterWithBackend("inductor")
    fast = bcc.compile(ToySkip(), _toy_plan(), backend=counter)
    eager = bcc.compile(ToySkip(), _toy_plan(), backend="eager")
    for steps, streams in ((4, 1), (6, 1), (3, 2)):
        for model in (fast, eager):
            with model.trajectory(steps=steps, streams=streams):
                got = _loop(model, steps, streams)
            if model is fast:
                compiled_out = got
        for a, b in zip(compiled_out, got):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1


def test_check_mode_is_not_poisoned_by_a_wrong_first_generation():
    fast = bcc.compile(Toy(), Schedule.every(2, 4, ["b0", "b1"]), backend="eager", check=True)
    _loop(fast, 2)  # a first generation of 2 steps on a 4-step schedule ...
    with pytest.raises(BccError) as e:
        _loop(fast, 4)  # ... is found at the next one's first call, and named
    assert e.value.code is ErrorCode.STEP_MISMATCH and "went up" in str(e.value) and "fewer steps" in str(e.value)
    for _ in range(2):
        _loop(fast, 4)  # correct generations then pass: nothing was learned from the wrong one
    with pytest.raises(BccError) as e:
        _loop(fast, 4, start=1500.0)  # other timesteps than the last good generation's
    assert e.value.code is ErrorCode.STEP_MISMATCH and "last complete generation" in str(e.value)
    _loop(fast, 4)
    with pytest.raises(BccError) as e:
        _loop(fast, 5)  # a fifth call continues downwards: more calls than steps
    assert e.value.code is ErrorCode.STEP_OVERFLOW
    fast.bcc_reset()  # forgets the last generation: another sampler setting is fine now
    _loop(fast, 4, start=1500.0)
    fast.bcc_reset()
    with pytest.raises(BccError) as e:
        _loop(fast, 4, streams=2)  # two calls per step
    assert e.value.code is ErrorCode.STEP_MISMATCH and "streams=2" in str(e.value)


class _Scaled(torch.nn.Module):
    """A block whose forward reads a plain Python attribute (like FreeU's b1)."""

    def __init__(self):
        super().__init__()
        self.b0 = Double()
        self.scale = 2.0

    def forward(self, x, t):
        return self.b0(x) * self.scale + t


def test_python_state_the_capture_froze_is_recaptured_when_it_changes():
    model = _Scaled()
    fast = bcc.compile(model, Schedule.all_compute(2, ["b0"]), backend="eager")
    x, t = torch.ones(2), torch.tensor(0.0)
    assert fast(x, t).tolist() == [4.0, 4.0]
    model.scale = 3.0  # mid-trajectory: takes effect at the next trajectory
    assert fast(x, t).tolist() == [4.0, 4.0]
    assert fast(x, t).tolist() == [6.0, 6.0] and fast.bcc_stats()["signatures"] == 1
    model.b0.register_forward_hook(lambda m, a, out: out + 1)  # a hook added after compiling
    assert fast(x, t).tolist() == [6.0, 6.0]
    assert fast(x, t).tolist() == [9.0, 9.0]


class _Processor:
    def __init__(self):
        self.scale = 1.0


class _Stateful(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        self.scale = 2.0
        self.sizes = [1, 2]
        self.options = {"mode": "a"}
        self.processor = _Processor()


# (what is done to the model, whether the graph may now compute something else)
_MUTATIONS = {
    "nothing": (lambda m: None, False),
    "a number replaced": (lambda m: setattr(m, "scale", 3.0), True),
    "an equal number, another object": (lambda m: setattr(m, "scale", float("2.0")), False),
    "a list appended to": (lambda m: m.sizes.append(3), True),
    "a dict changed in place": (lambda m: m.options.update(mode="b"), True),
    "a hook registered": (lambda m: m.inner[0].register_forward_hook(lambda *a: None), True),
    "a submodule replaced": (lambda m: m.inner.__setitem__(1, torch.nn.GELU()), True),
    "a processor replaced": (lambda m: setattr(m, "processor", _Processor()), True),
    "a processor's attribute changed": (lambda m: setattr(m.processor, "scale", 0.5), True),
    "a public attribute added": (lambda m: setattr(m.inner[1], "b1", 1.2), True),
    "a private bookkeeping object added": (lambda m: setattr(m, "_cache", object()), False),
    "an attribute deleted": (lambda m: delattr(m, "sizes"), True),
    "train mode": (lambda m: m.train(not m.training), True),
    "a parameter replaced": (lambda m: setattr(m.inner[0], "weight", torch.nn.Parameter(torch.ones(2, 2))), True),
    "weights updated in place": (lambda m: m.inner[0].weight.data.add_(1.0), False),
    "another dtype": (lambda m: m.to(torch.float64), True),
    "a buffer registered": (lambda m: m.register_buffer("mean", torch.zeros(2)), True),
}


@pytest.mark.parametrize("what", list(_MUTATIONS))
def test_frozen_state_fast_check_answers_as_a_new_snapshot_would(what):
    # Differential: the per-trajectory check (matches) against a full new snapshot, and
    # both against what the change means for a captured graph.
    from bcc.capture.frozen import frozen_state

    model = _Stateful()
    before = frozen_state(model)
    mutate, changed = _MUTATIONS[what]
    mutate(model)
    assert (frozen_state(model) != before) is changed
    assert before.matches(model) is not changed
