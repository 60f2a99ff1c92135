"""Sampling for bcc-digits: the ordinary diffusers denoising loop with batched CFG.

:func:`sample` calls the denoiser **exactly once per scheduler step** (unconditional
and conditional halves are concatenated into one batch of 2B, like
``StableDiffusionPipeline``; with ``guidance_scale == 1`` only the conditional batch
of B is run).  Code that wraps the denoiser may count calls to know the step index.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from bcc.tools.digits.model import call_denoiser, denoiser_arch

__all__ = [
    "sample",
    "make_ddim_scheduler",
    "make_dpm_solver_scheduler",
    "make_ddpm_scheduler",
    "make_scheduler",
    "make_grid",
    "save_png",
    "initial_noise",
]


def _config_of(scheduler_or_config: Any) -> dict:
    cfg = getattr(scheduler_or_config, "config", scheduler_or_config)
    return dict(cfg)


def make_ddim_scheduler(scheduler_or_config: Any, **overrides: Any):
    """A deterministic DDIM scheduler (eta=0 in ``step``) for the training schedule.

    ``clip_sample=False`` (clipping the x0 estimate collapses guided samples) and
    ``timestep_spacing="leading"``.
    """
    from diffusers import DDIMScheduler

    opts = dict(clip_sample=False, timestep_spacing="leading", set_alpha_to_one=False)
    opts.update(overrides)
    return DDIMScheduler.from_config(_config_of(scheduler_or_config), **opts)


def make_dpm_solver_scheduler(scheduler_or_config: Any, **overrides: Any):
    """DPM-Solver++ (2nd order multistep) for the training schedule.

    ``timestep_spacing="leading"``: with the cosine schedule the default "linspace"
    spacing starts at t=999 where alpha_bar ~ 0, and samples saturate.
    """
    from diffusers import DPMSolverMultistepScheduler

    opts = dict(
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="leading",
        thresholding=False,
    )
    opts.update(overrides)
    return DPMSolverMultistepScheduler.from_config(_config_of(scheduler_or_config), **opts)


def make_ddpm_scheduler(scheduler_or_config: Any, **overrides: Any):
    """Ancestral DDPM sampling with the training schedule (stochastic; pass a generator)."""
    from diffusers import DDPMScheduler

    opts = dict(clip_sample=False, timestep_spacing="leading")
    opts.update(overrides)
    return DDPMScheduler.from_config(_config_of(scheduler_or_config), **opts)


def make_scheduler(kind: str, scheduler_or_config: Any, **overrides: Any):
    """``kind`` in {"ddim", "dpm", "dpmsolver++", "ddpm"}."""
    kind = kind.lower()
    if kind == "ddim":
        return make_ddim_scheduler(scheduler_or_config, **overrides)
    if kind in ("dpm", "dpm++", "dpmsolver", "dpmsolver++", "dpm-solver++"):
        return make_dpm_solver_scheduler(scheduler_or_config, **overrides)
    if kind == "ddpm":
        return make_ddpm_scheduler(scheduler_or_config, **overrides)
    raise ValueError(f"unknown scheduler kind {kind!r} (use 'ddim', 'dpm' or 'ddpm')")


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in module.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def initial_noise(
    batch_size: int,
    *,
    image_size: int = 16,
    channels: int = 1,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal starting noise (B, C, H, W), reproducible from ``seed`` or ``generator``."""
    if generator is None and seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn((batch_size, channels, image_size, image_size), generator=generator, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def sample(
    denoiser: torch.nn.Module,
    conditioner: torch.nn.Module,
    scheduler: Any,
    labels: Sequence[int] | torch.Tensor,
    *,
    num_steps: int = 50,
    guidance_scale: float = 3.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    noise: torch.Tensor | None = None,
    callback: Any = None,
    grad: bool = False,
) -> torch.Tensor:
    """Generate digits; returns float images (B, 1, 16, 16) clamped to [-1, 1].

    ``scheduler`` is used as given (``set_timesteps(num_steps)`` is called on it), so
    pass a sampling scheduler, e.g. ``make_ddim_scheduler(train_scheduler)``.
    ``noise`` (B, 1, H, W) overrides the starting noise; otherwise it is drawn from
    ``generator`` (or a fresh one seeded with ``seed``, default 0).  Stochastic
    schedulers (DDPM) also draw their step noise from that generator.
    ``guidance_scale``: classifier-free guidance weight w in
    ``eps_u + w (eps_c - eps_u)``; 1.0 disables guidance (conditional only).
    ``callback(i, t, x)`` is called after every step, if given.
    ``grad=True`` keeps autograd on (the default samples under ``no_grad``): training that
    back-propagates through the whole trajectory (``train_scale_shift(loss="final")``) needs it.
    """
    with torch.set_grad_enabled(grad):
        device, dtype = _module_device_dtype(denoiser)
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).to(device)
        batch = labels.shape[0]
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(int(seed if seed is not None else 0))
        config = getattr(denoiser, "config", None)
        image_size = int(getattr(config, "sample_size", 16) or 16) if config is not None else 16
        channels = int(getattr(config, "in_channels", 1) or 1) if config is not None else 1
        if noise is None:
            x = initial_noise(batch, image_size=image_size, channels=channels, generator=generator, device=device,
                              dtype=dtype)
        else:
            if noise.shape[0] != batch:
                raise ValueError(f"noise has batch {noise.shape[0]} but {batch} labels were given")
            x = noise.to(device=device, dtype=dtype).clone()
        x = x * float(getattr(scheduler, "init_noise_sigma", 1.0))

        guided = float(guidance_scale) != 1.0
        cond = conditioner(labels).to(dtype)
        if guided:
            null = torch.full_like(labels, int(getattr(conditioner, "null_label", 10)))
            encoder_hidden_states = torch.cat([conditioner(null).to(dtype), cond], dim=0)
        else:
            encoder_hidden_states = cond

        arch = denoiser_arch(denoiser)
        scheduler.set_timesteps(num_steps, device=device)
        step_accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
        step_kwargs = {"generator": generator} if step_accepts_generator else {}

        for i, t in enumerate(scheduler.timesteps):
            x_in = torch.cat([x, x], dim=0) if guided else x
            x_in = scheduler.scale_model_input(x_in, t)
            eps = call_denoiser(denoiser, x_in, t, encoder_hidden_states, arch=arch)
            if guided:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            x = scheduler.step(eps, t, x, return_dict=False, **step_kwargs)[0]
            if callback is not None:
                callback(i, t, x)
        return x.float().clamp(-1.0, 1.0)


def make_grid(images: torch.Tensor | np.ndarray, nrow: int = 10, *, padding: int = 1, scale: int = 1, as_pil: bool = True):
    """Tile images (N, 1, H, W) in [-1, 1] into one grayscale picture.

    ``nrow`` images per row; ``scale`` enlarges each pixel (nearest neighbour).
    Returns a ``PIL.Image`` (mode "L"), or a uint8 array (H', W') with ``as_pil=False``.
    """
    imgs = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images).detach().float().cpu()
    if imgs.ndim == 3:
        imgs = imgs.unsqueeze(1)
    if imgs.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(imgs.shape)}")
    imgs = imgs[:, :1]
    n, _, h, w = imgs.shape
    nrow = max(1, min(int(nrow), max(n, 1)))
    nrows = (n + nrow - 1) // nrow
    pix = ((imgs.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).numpy()[:, 0]
    grid = np.zeros((nrows * (h + padding) + padding, nrow * (w + padding) + padding), dtype=np.uint8)
    grid[:] = 64  # dark grey frame
    for k in range(n):
        r, c = divmod(k, nrow)
        y0, x0 = padding + r * (h + padding), padding + c * (w + padding)
        grid[y0 : y0 + h, x0 : x0 + w] = pix[k]
    if scale > 1:
        grid = np.kron(grid, np.ones((scale, scale), dtype=np.uint8))
    if not as_pil:
        return grid
    from PIL import Image

    return Image.fromarray(grid)  # 2-D uint8 -> mode "L"


def save_png(images: torch.Tensor | np.ndarray, path: str | os.PathLike, nrow: int = 10, *, scale: int = 2, padding: int = 1) -> Path:
    """Save a grid of images in [-1, 1] as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images, nrow, padding=padding, scale=scale, as_pil=False)
    from PIL import Image

    Image.fromarray(grid).save(path)
    return path
