"""The shipped, trained digits UNet: quality floors that a broken cache fails."""
import pytest
import torch

import bcc
from bcc.tools.digits import load_digits_unet, make_ddim_scheduler, sample
from bcc.tools.metrics import paired_report

STEPS = 10
N = 100
PSNR_FLOOR = 30.0  # dB, cached vs uncached from the same noise
FLIP_CEILING = 0.02
ACCURACY_FLOOR = 0.95


@pytest.fixture(scope="module")
def digits():
    unet, conditioner, train_scheduler = load_digits_unet()
    scheduler = make_ddim_scheduler(train_scheduler)
    labels = torch.arange(N) % 10

    def run(model, labels=labels, seed=0):
        return sample(model, conditioner, scheduler, labels, num_steps=STEPS, guidance_scale=3.0, seed=seed)

    return unet, run, labels, run(unet)


def _passes_floors(report):
    return (report["psnr_db"] >= PSNR_FLOOR and report["label_flip_rate"] <= FLIP_CEILING
            and report["accuracy_candidate"] >= ACCURACY_FLOOR)


def test_uncached_model_draws_the_requested_digits(digits):
    unet, run, labels, ref = digits
    report = paired_report(ref, ref, labels=labels)
    assert report["accuracy_reference"] >= ACCURACY_FLOOR


def test_cached_model_keeps_fidelity_and_a_stale_cache_fails(digits):
    unet, run, labels, ref = digits
    fast = bcc.compile(unet, lambda names: bcc.Schedule.every(2, STEPS, names), backend="eager")
    good = paired_report(run(fast), ref, labels=labels)
    assert _passes_floors(good), good

    # Fault injection: every block replays its step-0 value for the whole trajectory.
    # (Caches left by another trajectory cannot be served: the stepper recomputes every
    # block at a stream's first call.) The floors must catch it.
    run(fast, labels=(labels + 3) % 10, seed=1)
    names = fast.bcc_blocks
    stale = torch.zeros(STEPS, len(names), dtype=torch.bool)
    stale[0] = True
    fast.set_schedule(bcc.Schedule(stale, names))
    bad = paired_report(run(fast), ref, labels=labels)
    assert not _passes_floors(bad), bad


def test_wrapped_dit_is_still_called_as_a_dit():
    import bcc
    from bcc.tools.digits import default_model_dir, load_digits_model
    from bcc.tools.digits.model import denoiser_arch

    dit, _, _ = load_digits_model(default_model_dir("dit"))
    assert denoiser_arch(bcc.compile(dit, lambda names: bcc.Schedule.every(2, 20, names))) == "dit"
    assert denoiser_arch(torch.compile(dit)) == "dit"


def test_committed_scale_shift_beats_naive_caching_on_the_shipped_unet():
    """The benchmark's trained corrections (results/quality) at its 1.5x-ideal schedule."""
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "results" / "quality"
    unet, conditioner, train_scheduler = load_digits_unet()
    scheduler = make_ddim_scheduler(train_scheduler)
    schedule = bcc.Schedule.load(results / "unet_ddim20_schedule.json")
    ss = bcc.ScaleShift.load(results / "unet_ddim20_scale_shift.safetensors")
    labels = torch.arange(100) % 10
    noise = torch.randn(100, 1, 16, 16, generator=torch.Generator().manual_seed(77))

    def run(model):
        return sample(model, conditioner, scheduler, labels, num_steps=schedule.num_steps, guidance_scale=3.0,
                      noise=noise)

    ref = run(unet)
    naive = paired_report(run(bcc.compile(unet, schedule, backend="eager")), ref, labels=labels)
    fixed = paired_report(run(bcc.compile(unet, schedule, backend="eager", scale_shift=ss)), ref, labels=labels)
    assert fixed["psnr_db"] > naive["psnr_db"] + 0.5, (naive, fixed)
    assert fixed["ssim"] > naive["ssim"] and fixed["label_flip_rate"] <= naive["label_flip_rate"]
    assert fixed["accuracy_candidate"] >= ACCURACY_FLOOR
