"""A real diffusers pipeline with `pipe.unet` replaced: guidance, repeated calls, oracle."""
import numpy as np
import torch

import bcc
from bcc import Schedule
from bcc.runtime.reference import HookReference

from testing import tiny_sd_pipeline

STEPS = 6


def _generate(pipe, seed=0):
    with torch.no_grad():
        return pipe(["a red digit", "a blue digit"], num_inference_steps=STEPS, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(seed), output_type="np").images


def _schedule(pipe):
    names = ["down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.0",
             "up_blocks.1.attentions.1"]
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1], [1, 0, 0, 1], [0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]],
                        dtype=torch.bool)
    return Schedule(mask, names)


def _reference_images(pipe, schedule):
    ref = HookReference(pipe.unet, schedule)
    try:
        return _generate(pipe)
    finally:
        ref.remove()


def test_pipeline_with_compiled_unet_matches_reference_twice():
    pipe = tiny_sd_pipeline()
    schedule = _schedule(pipe)
    plain = _generate(pipe)
    want = _reference_images(pipe, schedule)
    assert not np.allclose(plain, want)  # the schedule really reuses something
    original = pipe.unet
    pipe.unet = bcc.compile(original, schedule, backend="inductor", check=True)
    first = _generate(pipe)
    second = _generate(pipe)
    np.testing.assert_allclose(first, want, rtol=0, atol=2e-4)
    np.testing.assert_allclose(second, first, rtol=0, atol=0)


def test_pipeline_all_compute_equals_plain_pipeline():
    pipe = tiny_sd_pipeline()
    plain = _generate(pipe)
    pipe.unet = bcc.compile(pipe.unet, lambda names: Schedule.all_compute(STEPS, names), backend="eager")
    np.testing.assert_allclose(_generate(pipe), plain, rtol=0, atol=0)


def test_calibrate_schedule_compile_on_the_pipeline():
    pipe = tiny_sd_pipeline()

    def sample(unet, prompt, seed):
        with torch.no_grad():
            pipe(prompt, num_inference_steps=STEPS, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(seed), output_type="latent")

    profile = bcc.calibrate(pipe.unet, sample, ["a red digit", "a blue digit"], seeds=[0, 1],
                            scheduler=pipe.scheduler, guidance_scale=5.0, progress=False)
    assert profile.num_steps == STEPS and profile.num_runs == 4
    assert profile.block_names == tuple(_schedule(pipe).block_names)
    assert float(profile.l1_rel[1:].min()) > 0
    schedule = Schedule.for_budget(profile, 0.9)
    assert schedule.mask[1:].sum() < schedule.mask[1:].numel()  # something is reused
    want = _reference_images(pipe, schedule)
    pipe.unet = bcc.compile(pipe.unet, schedule, backend="eager")
    np.testing.assert_allclose(_generate(pipe), want, rtol=0, atol=0)
