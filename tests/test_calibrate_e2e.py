"""End to end: calibrate -> Schedule.for_budget -> bcc.compile -> sample.

On the shipped, trained digits UNet (real guided DDIM sampling) and on a random-weight
PixArt DiT from the zoo (synthetic trajectory).
"""
import pytest
import torch

import bcc
from bcc import Schedule
from bcc.tools import zoo
from bcc.runtime.reference import HookReference

STEPS = 10
LABELS = [1, 7]  # 2 classes x 1 seed


@pytest.fixture(scope="module")
def digits_setup():
    from bcc.tools.digits import load_digits_unet, make_scheduler, sample

    try:
        unet, conditioner, train = load_digits_unet()
    except FileNotFoundError as e:  # pragma: no cover - weights are shipped
        pytest.skip(str(e))
    scheduler = make_scheduler("ddim", train)

    def generate(model, labels, seed=0):
        return sample(model, conditioner, scheduler, labels, num_steps=STEPS, guidance_scale=3.0, seed=seed)

    def one_run(model, label, seed):
        generate(model, [label], seed)

    profile = bcc.calibrate(unet, one_run, LABELS, seeds=[0], scheduler=scheduler, guidance_scale=3.0, progress=False)
    return unet, generate, profile


def test_digits_profile(digits_setup):
    unet, _, profile = digits_setup
    assert profile.num_steps == STEPS and profile.num_runs == 2 and profile.num_blocks >= 2
    assert profile.scheduler["name"] == "DDIMScheduler" and profile.guidance_scale == 3.0
    assert len(profile.timesteps) == STEPS and profile.timesteps[0] > profile.timesteps[-1]
    assert bool((profile.l1_rel[1:] > 0).all()) and bool((profile.l1_rel[0] == 0).all())
    profile.check_compatible(model=unet, num_steps=STEPS)


def test_digits_budget_schedule_compiles_and_samples(digits_setup):
    unet, generate, profile = digits_setup
    schedule = Schedule.for_budget(profile, 0.9)
    assert schedule.compute_fraction() <= 0.9 and not bool(schedule.mask.all())
    plain = generate(unet, LABELS)
    fast = bcc.compile(unet, schedule, backend="eager", check=True)
    cached = generate(fast, LABELS)
    assert cached.shape == plain.shape == (2, 1, 16, 16) and bool(torch.isfinite(cached).all())
    assert fast.bcc_step == 0  # exactly one trajectory of STEPS calls
    again = generate(fast, LABELS)  # a second trajectory needs no reset
    torch.testing.assert_close(again, cached, rtol=0, atol=0)
    # The compiled model follows the plain-Python reference of the same schedule.
    ref = HookReference(unet, schedule)
    try:
        want = generate(unet, LABELS)
    finally:
        ref.remove()
    torch.testing.assert_close(cached, want, rtol=0, atol=1e-4)
    assert not torch.equal(want, plain)  # the schedule really reused something
    # Reuse degrades the samples only mildly at this budget.
    assert float((cached - plain).abs().mean()) < 0.1  # measured: 0.03


def test_digits_all_compute_equals_uncached(digits_setup):
    unet, generate, profile = digits_setup
    plain = generate(unet, LABELS, seed=3)
    full = bcc.compile(unet, Schedule.all_compute(STEPS, profile.block_names), backend="eager")
    torch.testing.assert_close(generate(full, LABELS, seed=3), plain, rtol=0, atol=0)


def test_pixart_zoo_end_to_end():
    name, steps = "pixart", 6
    model, _, _ = zoo.build(name, latent=8, batch=2, seed=0)
    spec = zoo.spec_of(model)
    extra, latent, batch = spec.extra, spec.latent, spec.batch

    def inputs(seed):
        return [zoo.step_inputs(name, model, extra, latent=latent, batch=batch, step=s, seed=seed, num_steps=steps)
                for s in range(steps)]

    def trajectory(m, condition, seed):
        return [m(*a, **k)[0] for a, k in inputs(seed)]

    profile = bcc.calibrate(model, trajectory, [name], seeds=[0, 1], progress=False)
    assert profile.block_names == ("transformer_blocks.0", "transformer_blocks.1")
    f_min = Schedule.from_change(profile, float("inf")).compute_fraction()  # reuse all after step 0
    schedule = Schedule.for_budget(profile, (1.0 + f_min) / 2)
    assert f_min < schedule.compute_fraction() < 1.0
    with torch.no_grad():
        plain = trajectory(model, name, 2)
        ref = HookReference(model, schedule)
        try:
            want = trajectory(model, name, 2)
        finally:
            ref.remove()
        fast = bcc.compile(model, schedule, backend="eager")
        got = trajectory(fast, name, 2)
        full = bcc.compile(model, Schedule.all_compute(steps, profile.block_names), backend="eager")
        exact = trajectory(full, name, 2)
    for g, w, p, e in zip(got, want, plain, exact):
        assert g.shape == p.shape and bool(torch.isfinite(g).all())
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(e, p, rtol=0, atol=0)
