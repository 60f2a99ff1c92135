"""Models and sampling loops the speed benchmark times (random-weight configs and the shipped digits).

A :class:`Workload` is a denoiser plus a function that runs one whole trajectory with
any callable standing in for it (the plain model, a compiled one, a bcc model, a
peer's wrapper), so every variant is timed through the same loop.

Example:
    >>> w = build_workload("unet-tiny", latent=8, steps=3)
    >>> tuple(w.run(w.model).shape)
    (2, 4, 8, 8)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import zoo

__all__ = ["Workload", "build_workload", "WORKLOADS", "UNET_BLOCKS"]

# Every ResNet, transformer and resampling block of a UNet: the paper's choice, and
# what leaves the least uncached work per step.
UNET_BLOCKS = ["*.attentions.*", "*.resnets.*", "*.upsamplers.*", "*.downsamplers.*"]


@dataclass
class Workload:
    """One benchmark model.

    Attributes:
        name: workload name (see :data:`WORKLOADS`).
        model: the denoiser, eval mode.
        run: ``run(denoiser, seed=0) -> final latent``; one trajectory of ``steps`` calls.
        family: ``"unet"`` or ``"dit"`` (which peers apply).
        blocks: block selector for :func:`bcc.calibrate` / :func:`bcc.compile`.
        steps: denoiser calls per trajectory.
        trained: True for the shipped models, whose paired fidelity means something.
        describe: one line for the results (config, latent, batch).
        scheduler: the sampling scheduler the loop uses (peers that look up the step need it).
    """

    name: str
    model: torch.nn.Module
    run: Callable[..., torch.Tensor]
    family: str
    blocks: Any
    steps: int
    trained: bool
    describe: str
    scheduler: Any = None


def _ddim(steps: int):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
    sched.set_timesteps(steps)
    return sched


def _zoo(name: str, latent: int, batch: int, steps: int, family: str, blocks: Any, describe: str) -> Workload:
    """A random-weight zoo model in a real DDIM loop: each step feeds the model's own
    output back, as a pipeline does, so the latents follow a genuine trajectory."""
    model, args, kwargs = zoo.build(name, latent=latent, batch=batch)
    sched = _ddim(steps)
    x0 = args[0].clone()
    channels = x0.shape[1]

    def call(denoiser, x, t):
        if name in ("pixart", "pixart-alpha", "sd3", "dit"):
            kw = dict(kwargs, timestep=t.expand(x.shape[0]))
            return denoiser(x, **kw)[0][:, :channels]
        return denoiser(x, t, **kwargs)[0]

    def run(denoiser, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(x0.shape, generator=g)
        sched.set_timesteps(steps)
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(call(denoiser, x, t), t, x, return_dict=False)[0]
        return x

    return Workload(name, model, run, family, blocks, steps, False, describe, sched)


def _digits(arch: str, steps: int, n: int) -> Workload:
    from ..digits import default_model_dir, load_digits_model, make_scheduler, sample

    model, conditioner, train_sched = load_digits_model(default_model_dir(arch))
    sched = make_scheduler("ddim", train_sched)
    labels = torch.arange(n) % 10

    def run(denoiser, seed: int = 0):
        g = torch.Generator().manual_seed(10_000 + seed)
        noise = torch.randn(n, 1, 16, 16, generator=g)
        return sample(denoiser, conditioner, sched, labels, num_steps=steps, guidance_scale=3.0, noise=noise)

    blocks = UNET_BLOCKS if arch == "unet" else "attention"
    return Workload(f"digits-{arch}", model, run, arch, blocks, steps, True,
                    f"shipped bcc-digits {arch}, 16x16, {n} labels with guidance (batch {2 * n}), DDIM-{steps}", sched)


# name -> builder(latent, batch, steps); latent None = the workload's default.
WORKLOADS: dict[str, Callable[..., Workload]] = {
    "sd15": lambda latent=None, batch=2, steps=20, n=20: _zoo(
        "sd15", latent or 32, batch, steps, "unet", UNET_BLOCKS,
        f"SD-1.5-config UNet (860M, random weights), latent {latent or 32}x{latent or 32}, batch {batch}, DDIM-{steps}"),
    "pixart-alpha": lambda latent=None, batch=2, steps=20, n=20: _zoo(
        "pixart-alpha", latent or 16, batch, steps, "dit", "attention",
        f"PixArt-alpha-config DiT (28 blocks, width 1152, random weights), latent {latent or 16}x{latent or 16} "
        f"(patch 2), batch {batch}, DDIM-{steps}"),
    "unet-tiny": lambda latent=None, batch=2, steps=20, n=20: _zoo(
        "unet-tiny", latent or 8, batch, steps, "unet", UNET_BLOCKS, f"tiny UNet (random weights), latent {latent or 8}"),
    "pixart": lambda latent=None, batch=2, steps=20, n=20: _zoo(
        "pixart", latent or 8, batch, steps, "dit", "attention", f"tiny PixArt (random weights), latent {latent or 8}"),
    "digits-unet": lambda latent=None, batch=2, steps=20, n=20: _digits("unet", steps, n),
    "digits-dit": lambda latent=None, batch=2, steps=20, n=20: _digits("dit", steps, n),
}


def build_workload(name: str, *, latent: int | None = None, batch: int = 2, steps: int = 20, n: int = 20) -> Workload:
    """Build workload ``name`` (random weights are seeded; the digits models are loaded)."""
    if name not in WORKLOADS:
        raise KeyError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    return WORKLOADS[name](latent=latent, batch=batch, steps=steps, n=n)
