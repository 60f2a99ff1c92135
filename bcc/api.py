"""The user-facing verbs: :func:`compile` (a denoiser or a whole diffusers pipeline) and :func:`find_blocks`."""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import torch

from bcc.analyze.blocks import ATTENTION, BlockSelector, find_block_regions
from bcc.capture.graph import capture
from bcc.capture.scheduler import is_pipeline
from bcc.capture.signature import split_example_inputs
from bcc.config import BccConfig
from bcc.errors import BccError, ErrorCode
from bcc.plan.budget import Plan
from bcc.plan.schedule import Schedule
from bcc.runtime.module import BccModule
from bcc.runtime.pipeline import compile_pipeline
from bcc.scale_shift.params import ScaleShift

__all__ = ["compile", "find_blocks"]


def find_blocks(
    model: torch.nn.Module,
    example_inputs: tuple[tuple, dict] | tuple,
    blocks: BlockSelector = ATTENTION,
) -> list[str]:
    """The module paths of the blocks bcc would cache, in execution order.

    Args:
        model: the denoiser.
        example_inputs: ``(args, kwargs)`` as ``torch.export.export`` takes them.
        blocks: ``"attention"`` (default: each spatial transformer of a UNet, each
            per-layer transformer block of a DiT), module-path globs, classes, or a
            predicate ``(path, class_name) -> bool``; in a list, ``"start..end"`` names
            one region spanning several modules (:func:`bcc.region`, :func:`bcc.unet_branch`).

    Example:
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))
        ...     def forward(self, x):
        ...         for layer in self.layers:
        ...             x = x + layer(x)
        ...         return x
        >>> find_blocks(Net(), ((torch.ones(1, 4),), {}), blocks="layers.*")
        ['layers.0', 'layers.1']
    """
    args, kwargs = split_example_inputs(example_inputs)
    return [b.name for b in find_block_regions(capture(model, args, kwargs).gm, blocks)]


def compile(  # noqa: A001 - the verb users expect, like torch.compile
    model: Any,
    schedule: "Schedule | Plan | Callable[[tuple[str, ...]], Schedule] | Mapping[str, Any]",
    *,
    blocks: BlockSelector | None = None,
    config: BccConfig | None = None,
    scale_shift: "ScaleShift | str | os.PathLike | None" = None,
    **options: Any,
) -> Any:
    """Make ``model`` reuse cached block outputs according to ``schedule``.

    Nothing happens until the first call: like ``torch.compile``, the model is
    captured with that call's arguments (``torch.export``), its blocks are found and
    rewritten into schedule-gated branches, and the graph is compiled once for all
    steps (and, with a :class:`Plan`, for all step counts). A new input signature
    (batch size, resolution, dtype, device, other arguments) at the start of a
    trajectory, or in a stream of its own, is captured anew; a change in the middle of
    one stream's trajectory is an error.

    Given a diffusers ``DiffusionPipeline``, it compiles the pipeline's denoisers
    (``unet`` or ``transformer``, and Wan 2.2's ``transformer_2``) in place and returns
    the same pipeline: each denoiser call's step and stream then come from the
    pipeline's scheduler (see :mod:`bcc.runtime.pipeline`), so other step counts,
    img2img, interrupts, exceptions in callbacks, ``from_pipe`` sharing and two calls
    per step (true CFG, Wan guidance, SD3 skip-layer guidance) are all right.

    Args:
        model: the denoiser (e.g. ``pipe.unet`` or ``pipe.transformer``), or a pipeline.
        schedule: a :class:`Plan` (a profile and a budget: serves any step count), a
            :class:`Schedule` (one step count; its block names select the blocks: module
            paths, or ``"start..end"`` regions cached as one unit), or a
            function from the discovered block names to a Schedule (then ``blocks``
            selects them, default ``"attention"``). For a pipeline, also a mapping from
            denoiser attribute to one of those (Wan 2.2's two experts).
        blocks: block selector used with a schedule function.
        scale_shift: trained :class:`ScaleShift` parameters (or their ``.safetensors``
            path) for this schedule; applied in the reuse branches (see
            :func:`bcc.train_scale_shift`). Not with a Plan (they are trained for one schedule).
        config: a :class:`BccConfig`; keyword ``options`` override its fields
            (``mode``, ``backend``, ``check``, ``inductor_options``).

    Returns:
        A :class:`BccModule` that is called like ``model`` and delegates attributes to
        it; for a pipeline, the pipeline itself.

    Example:
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.block = torch.nn.Linear(2, 2)
        ...     def forward(self, x, t):
        ...         return self.block(x) * t
        >>> net = Net()
        >>> fast = compile(net, lambda names: Schedule.every(2, 3, names), blocks="block", backend="eager")
        >>> x = torch.ones(1, 2)
        >>> outs = [fast(x, torch.tensor(s)) for s in range(3)]
        >>> fast.bcc_schedule.mask[:, 0].tolist()
        [True, False, True]

        A pipeline (any diffusers ``DiffusionPipeline``; this one is the smallest that
        drives a scheduler like the real ones do):

        >>> from diffusers import DDIMScheduler, DiffusionPipeline
        >>> class Pipe(DiffusionPipeline):
        ...     def __init__(self, unet, scheduler):
        ...         super().__init__()
        ...         self.register_modules(unet=unet, scheduler=scheduler)
        ...     def __call__(self, num_inference_steps):
        ...         self.scheduler.set_timesteps(num_inference_steps)
        ...         x = torch.ones(1, 2)
        ...         for t in self.scheduler.timesteps:
        ...             x = self.scheduler.step(self.unet(x, t), t, x).prev_sample
        ...         return x
        >>> pipe = Pipe(Net(), DDIMScheduler())
        >>> from bcc import ChangeProfile
        >>> profile = ChangeProfile(torch.tensor([[0.0], [0.1], [0.1], [0.1]]), ["block"])
        >>> pipe = compile(pipe, Plan(profile, budget=0.6), backend="eager")
        >>> _ = pipe(num_inference_steps=4); _ = pipe(num_inference_steps=7)  # one graph, two step counts
        >>> pipe.unet.bcc_stats()["graphs"], pipe.unet.bcc_schedule.num_steps
        (1, 7)
    """
    if is_pipeline(model):
        return compile_pipeline(model, schedule, lambda denoiser, s: compile(
            denoiser, s, blocks=blocks, config=config, scale_shift=scale_shift, **options))
    cfg = (config or BccConfig()).replace(**options) if options else (config or BccConfig())
    if isinstance(model, BccModule):
        raise BccError(ErrorCode.CONFIG_INVALID, "model is already compiled by bcc; pass the original model.")
    if not isinstance(model, torch.nn.Module):
        raise BccError(ErrorCode.CONFIG_INVALID,
                       f"bcc.compile takes a denoiser (torch.nn.Module) or a diffusers pipeline, got "
                       f"{type(model).__name__}.")
    if not isinstance(schedule, (Schedule, Plan)) and not callable(schedule):
        raise BccError(
            ErrorCode.SCHEDULE_DTYPE,
            f"schedule must be a bcc.Plan, a bcc.Schedule or a function of the block names, got "
            f"{type(schedule).__name__}. Build one with bcc.Plan(profile, budget=0.6) or "
            "bcc.Schedule.every(n, steps, names).",
        )
    if isinstance(schedule, (Schedule, Plan)) and blocks is not None:
        raise BccError(
            ErrorCode.CONFIG_INVALID,
            "blocks= is only used with a schedule function; a Schedule or Plan already names its blocks.",
        )
    if scale_shift is not None and isinstance(schedule, Plan):
        raise BccError(
            ErrorCode.CONFIG_INVALID,
            "scale-shift corrections are trained for one schedule (one step count), and a Plan makes one per step "
            "count; compile with the Schedule they were trained for (plan.schedule_for(T)).",
        )
    if scale_shift is not None and not isinstance(scale_shift, ScaleShift):
        scale_shift = ScaleShift.load(scale_shift)
    if isinstance(scale_shift, ScaleShift) and isinstance(schedule, Schedule):
        scale_shift.check_compatible(schedule, model, cfg.mode)  # fail now, not at the first call
    return BccModule(model, schedule, cfg, blocks, scale_shift)


