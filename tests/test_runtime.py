"""The compiled module as a drop-in: compile contract, step tracking, attributes."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import bcc
from bcc import Schedule

from testing import built, changing_schedule, first_tensor, run, trajectory_inputs


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
