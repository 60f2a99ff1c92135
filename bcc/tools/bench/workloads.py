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

from bcc.tools import zoo

__all__ = ["Workload", "ZooWorkload", "build_workload", "WORKLOADS", "ZOO_WORKLOADS", "UNET_BLOCKS"]

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
        at_steps: ``at_steps(k)`` -> the same model and noise in a ``k``-step loop (the
            fewer-steps baseline); None where fidelity means nothing (random weights).
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
    at_steps: Callable[[int], "Workload"] | None = None


def _ddim(steps: int):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
    sched.set_timesteps(steps)
    return sched


def _zoo(name: str, latent: int, batch: int, steps: int, family: str, blocks: Any, describe: str,
         device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Workload:
    """A random-weight zoo model in a real DDIM loop: each step feeds the model's own
    output back, as a pipeline does, so the latents follow a genuine trajectory."""
    model, args, _ = zoo.build(name, latent=latent, batch=batch)
    model.to(device=device, dtype=dtype)
    sched = _ddim(steps)
    x0 = args[0].clone()
    conditions = torch.utils._pytree.tree_map(
        lambda v: v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v,
        zoo.conditions(model))

    def call(denoiser, x, t):
        a, kw = zoo.call_inputs(model, x, t, conditions)
        a, kw = torch.utils._pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, (a, kw))
        # Learned-sigma DiTs return twice the channels: the first half is the noise.
        return denoiser(*a, **kw)[0][tuple(slice(None, n) for n in x.shape)]

    def run(denoiser, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(x0.shape, generator=g).to(device=device, dtype=dtype)
        sched.set_timesteps(steps, device=device)
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(call(denoiser, x, t), t, x, return_dict=False)[0]
        return x

    return Workload(name, model, run, family, blocks, steps, False, describe, sched)


def _digits(arch: str, steps: int, n: int, loaded: tuple | None = None) -> Workload:
    from bcc.tools.digits import default_model_dir, load_digits_model, make_scheduler, sample

    loaded = loaded or load_digits_model(default_model_dir(arch))
    model, conditioner, train_sched = loaded
    sched = make_scheduler("ddim", train_sched)
    labels = torch.arange(n) % 10

    def run(denoiser, seed: int = 0):
        g = torch.Generator().manual_seed(10_000 + seed)
        noise = torch.randn(n, 1, 16, 16, generator=g)
        return sample(denoiser, conditioner, sched, labels, num_steps=steps, guidance_scale=3.0, noise=noise)

    blocks = UNET_BLOCKS if arch == "unet" else "attention"
    return Workload(f"digits-{arch}", model, run, arch, blocks, steps, True,
                    f"shipped bcc-digits {arch}, 16x16, {n} labels with guidance (batch {2 * n}), DDIM-{steps}", sched,
                    at_steps=lambda k: _digits(arch, k, n, loaded))


@dataclass(frozen=True)
class ZooWorkload:
    """How a random-weight workload is built from a :mod:`bcc.tools.zoo` model.

    Attributes:
        model: the zoo model's name.
        latent: default latent side.
        family: ``"unet"`` or ``"dit"``.
        blocks: block selector (a tuple of globs, or ``"attention"``).
        describe: one line for the results; ``{l}`` stands for the latent side.
    """

    model: str
    latent: int
    family: str
    blocks: Any
    describe: str


_UNET = tuple(UNET_BLOCKS)
# The random-weight workloads by name; the digits models are apart.
ZOO_WORKLOADS = {
    "sd15": ZooWorkload("sd15", 32, "unet", _UNET, "SD-1.5-config UNet (860M, random weights), latent {l}x{l}"),
    "pixart-alpha": ZooWorkload(
        "pixart-alpha", 16, "dit", "attention",
        "PixArt-alpha-config DiT (28 blocks, width 1152, random weights), latent {l}x{l} (patch 2)"),
    "unet-tiny": ZooWorkload("unet-tiny", 8, "unet", _UNET, "tiny UNet (random weights), latent {l}x{l}"),
    "pixart": ZooWorkload("pixart", 8, "dit", "attention", "tiny PixArt (random weights), latent {l}x{l}"),
    "wan-bench": ZooWorkload(
        "wan-bench", 32, "dit", "attention",
        "Wan-2.x-like video DiT (6 blocks, width 256, random weights), latent 5x{l}x{l} (patch 1x2x2: "
        "5x{l}x{l}/4 tokens), 5 text tokens"),
    "hunyuan-video-bench": ZooWorkload(
        "hunyuan-video-bench", 32, "dit", "attention",
        "HunyuanVideo-like DiT (3 double + 3 single blocks, width 256, random weights), latent 5x{l}x{l} "
        "(patch 1x2x2), 5 text tokens"),
}
WORKLOADS = (*ZOO_WORKLOADS, "digits-unet", "digits-dit")


def build_workload(name: str, *, latent: int | None = None, batch: int = 2, steps: int = 20, n: int = 20,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Workload:
    """Build workload ``name`` (random weights are seeded; the digits models are loaded).

    ``latent``, ``batch``, ``device`` and ``dtype`` apply to the random-weight models;
    ``n`` is the number of labels for the digits models (batch ``2 n`` with guidance).
    """
    if name in ("digits-unet", "digits-dit"):
        return _digits(name.split("-")[1], steps, n)
    if name not in ZOO_WORKLOADS:
        raise KeyError(f"unknown workload {name!r}; choose from {list(WORKLOADS)}")
    spec = ZOO_WORKLOADS[name]
    latent = latent or spec.latent
    describe = spec.describe.format(l=latent) + f", batch {batch}, DDIM-{steps}" + (
        f", {dtype} on {device}" if str(device) != "cpu" or dtype != torch.float32 else "")
    blocks = list(spec.blocks) if isinstance(spec.blocks, tuple) else spec.blocks
    return _zoo(spec.model, latent, batch, steps, spec.family, blocks, describe, device, dtype)
