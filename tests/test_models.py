"""Real diffusers architectures (random weights): all-True equals the model, and
random schedules match the hook reference over whole trajectories."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bcc
from bcc import Schedule

from testing import built, random_schedule, reference_outputs, run, trajectory_inputs

TINY = ["unet-tiny", "pixart", "sd3", "flux", "dit", "sdxl-small"]
EAGER_TOL = dict(rtol=0, atol=0)
COMPILED_TOL = dict(rtol=1e-4, atol=1e-4)


def _blocks(name, **kw):
    model, args, kwargs = built(name, **kw)
    return model, bcc.find_blocks(model, (args, kwargs))


# SDXL's structure under inductor is a ~2 min compile even at 1/16 width: make test-all.
COMBOS = [pytest.param(n, b, marks=pytest.mark.slow) if (n, b) == ("sdxl-small", "inductor") else (n, b)
          for b in ("eager", "inductor") for n in TINY]


@pytest.mark.parametrize("name,backend", COMBOS)
def test_all_compute_equals_model(name, backend):
    model, names = _blocks(name)
    inputs = trajectory_inputs(name, model, 3)
    fast = bcc.compile(model, Schedule.all_compute(3, names), backend=backend)
    want = run(model, inputs)
    got = run(fast, inputs)
    tol = EAGER_TOL if backend == "eager" else COMPILED_TOL
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("name", ["unet-tiny", "flux", "sd3", "pixart", "dit"])
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_eager_rewrite_equals_reference_exactly(name, data):
    num_steps = 5
    model, names = _blocks(name)
    mode = data.draw(st.sampled_from(["residual", "output"]))
    schedule = random_schedule(data, names, num_steps)
    inputs = trajectory_inputs(name, model, num_steps)
    fast = bcc.compile(model, schedule, backend="eager", mode=mode)
    for g, w in zip(run(fast, inputs), reference_outputs(model, schedule, inputs, mode)):
        torch.testing.assert_close(g, w, **EAGER_TOL)


@pytest.mark.parametrize("name", ["unet-tiny", "flux"])
def test_compiled_random_schedules_equal_reference(name):
    """One compiled model, many hypothesis schedules swapped in without recompiling."""
    from torch._dynamo.testing import CompileCounterWithBackend

    num_steps = 6
    model, names = _blocks(name)
    inputs = trajectory_inputs(name, model, num_steps)
    counter = CompileCounterWithBackend("inductor")
    fast = bcc.compile(model, Schedule.all_compute(num_steps, names), backend=counter)
    run(fast, inputs)

    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data):
        schedule = random_schedule(data, names, num_steps)
        fast.set_schedule(schedule)
        for g, w in zip(run(fast, inputs), reference_outputs(model, schedule, inputs)):
            torch.testing.assert_close(g, w, **COMPILED_TOL)

    check()
    assert counter.frame_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_sd15_config_all_compute_and_every2(backend):
    model, args, kwargs = built("sd15", latent=8, batch=2)
    names = bcc.find_blocks(model, (args, kwargs))
    assert len(names) == 16  # SD-1.x has 16 spatial transformers (6 down, 1 mid, 9 up)
    inputs = trajectory_inputs("sd15", model, 2, latent=8)
    want = run(model, inputs)
    fast = bcc.compile(model, Schedule.all_compute(2, names), backend=backend)
    for g, w in zip(run(fast, inputs), want):
        torch.testing.assert_close(g, w, **(EAGER_TOL if backend == "eager" else dict(rtol=1e-3, atol=1e-3)))
    every = Schedule.every(2, 2, names)
    fast.set_schedule(every)
    for g, w in zip(run(fast, inputs), reference_outputs(model, every, inputs)):
        torch.testing.assert_close(g, w, **(EAGER_TOL if backend == "eager" else dict(rtol=1e-3, atol=1e-3)))


@pytest.mark.slow
def test_sdxl_config_with_added_cond_kwargs():
    model, args, kwargs = built("sdxl", latent=8, batch=1)
    assert set(kwargs["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    names = bcc.find_blocks(model, (args, kwargs))
    assert len(names) == 11  # 2 + 2 down, 1 mid, 3 + 3 up Transformer2DModels
    inputs = trajectory_inputs("sdxl", model, 2, latent=8, batch=1)
    want = run(model, inputs)
    fast = bcc.compile(model, Schedule.all_compute(2, names), backend="eager")
    for g, w in zip(run(fast, inputs), want):
        torch.testing.assert_close(g, w, **EAGER_TOL)
