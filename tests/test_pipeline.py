"""A real diffusers pipeline with `pipe.unet` replaced: guidance, repeated calls, oracle."""
import numpy as np
import torch

import bcc
from bcc import Schedule
from bcc.runtime.reference import HookReference

from testing import Attending, tiny_sd_pipeline

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


# -- a pipeline that deep-copies its scheduler (LTX-2's audio latents, SkyReels-V2's frames) ----
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Attending()

    def forward(self, x, timestep):
        return self.block(x) * (timestep / 1000)


def _two_latent_pipeline(copy_scheduler: bool):
    import copy

    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    class TwoLatents(DiffusionPipeline):
        def __init__(self, unet, scheduler):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)

        def __call__(self, num_inference_steps):
            # LTX-2: `audio_scheduler = copy.deepcopy(self.scheduler)`, stepped beside it.
            aux = (copy.deepcopy(self.scheduler) if copy_scheduler
                   else type(self.scheduler).from_config(self.scheduler.config))
            self.scheduler.set_timesteps(num_inference_steps)
            aux.set_timesteps(num_inference_steps)
            x = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0))
            a = torch.zeros(1, 3, 4)
            for t in self.scheduler.timesteps:
                eps = self.unet(x, t)
                x = self.scheduler.step(eps, t, x).prev_sample
                a = aux.step(0.5 * eps, t, a).prev_sample
            return x, a

    torch.manual_seed(0)
    return TwoLatents(_Net().eval(), FlowMatchEulerDiscreteScheduler())


def test_a_deep_copy_of_the_pipeline_scheduler_is_a_plain_scheduler():
    steps = 5
    with torch.no_grad():
        plain = _two_latent_pipeline(True)(steps)
        fresh = _two_latent_pipeline(False)(steps)
        all_true = bcc.compile(_two_latent_pipeline(True), Schedule.all_compute(steps, ["block"]), backend="eager")
        every = {c: bcc.compile(_two_latent_pipeline(c), Schedule.every(2, steps, ["block"]), backend="eager")
                 for c in (True, False)}
        for got, want in zip(all_true(steps), plain):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        for _ in range(2):  # and again: the copy made in the first generation changed nothing
            copied, made = every[True](steps), every[False](steps)
            for got, want in zip(copied, made):  # the copy steps its own state, as from_config's does
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(copied[0], plain[0])  # blocks were reused
    assert all(torch.equal(p, f) for p, f in zip(plain, fresh))


def test_a_pipeline_that_steps_only_copies_runs_uncached_and_says_so():
    import copy
    import warnings

    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    from bcc.errors import BccWarning

    class PerFrame(DiffusionPipeline):  # SkyReels-V2's diffusion forcing: a scheduler copy per frame
        def __init__(self, unet, scheduler):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)

        def __call__(self, num_inference_steps):
            self.scheduler.set_timesteps(num_inference_steps)
            frames = [copy.deepcopy(self.scheduler) for _ in range(2)]
            x = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0))
            for t in self.scheduler.timesteps:
                eps = self.unet(x, t.repeat(1))  # per-frame timesteps, computed: not a view of the scheduler's
                x = torch.cat([f.step(eps[:, :, 2 * k:2 * k + 2], t, x[:, :, 2 * k:2 * k + 2]).prev_sample
                               for k, f in enumerate(frames)], dim=2)
            return x

    def build():
        torch.manual_seed(0)
        return PerFrame(_Net().eval(), FlowMatchEulerDiscreteScheduler())

    steps = 6
    with torch.no_grad():
        want = build()(steps)
        fast = bcc.compile(build(), Schedule.every(2, steps, ["block"]), backend="eager")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = fast(steps)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # every call computed everything
    ours = [w for w in caught if issubclass(w.category, BccWarning)]
    assert len(ours) == 1 and "runs uncached" in str(ours[0].message)
