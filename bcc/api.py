"""The user-facing verbs: :func:`compile` and :func:`find_blocks`."""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

from bcc.analyze.blocks import ATTENTION, BlockSelector
from bcc.capture.graph import capture
from bcc.config import BccConfig
from bcc.errors import BccError, ErrorCode
from bcc.passes import AnnotateBlocksPass
from bcc.passes.annotate_blocks import BLOCKS
from bcc.runtime.module import BccModule
from bcc.scale_shift.params import ScaleShift
from bcc.plan.schedule import Schedule

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
            predicate ``(path, class_name) -> bool``.

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
    args, kwargs = _split_inputs(example_inputs)
    gm = AnnotateBlocksPass(selector=blocks)(capture(model, args, kwargs).gm).graph_module
    return list(gm.meta[BLOCKS])


def compile(  # noqa: A001 - the verb users expect, like torch.compile
    model: torch.nn.Module,
    schedule: Schedule | Callable[[tuple[str, ...]], Schedule],
    *,
    blocks: BlockSelector | None = None,
    config: BccConfig | None = None,
    scale_shift: "ScaleShift | str | os.PathLike | None" = None,
    **options: Any,
) -> BccModule:
    """Make ``model`` reuse cached block outputs according to ``schedule``.

    Nothing happens until the first call: like ``torch.compile``, the model is
    captured with that call's arguments (``torch.export``), its blocks are found and
    rewritten into schedule-gated branches, and the graph is compiled once for all
    steps. A new input signature (batch size, resolution, dtype, device) at the start
    of a trajectory is captured anew; a change in the middle of one is an error.

    Args:
        model: the denoiser (e.g. ``pipe.unet`` or ``pipe.transformer``).
        schedule: a :class:`Schedule` whose block names select the blocks, or a
            function from the discovered block names to a Schedule (then ``blocks``
            selects them, default ``"attention"``).
        blocks: block selector used with a schedule function.
        scale_shift: trained :class:`ScaleShift` parameters (or their ``.safetensors``
            path) for this schedule; applied in the reuse branches (see
            :func:`bcc.train_scale_shift`).
        config: a :class:`BccConfig`; keyword ``options`` override its fields
            (``mode``, ``backend``, ``check``, ``inductor_options``).

    Returns:
        A :class:`BccModule` that is called like ``model`` and delegates attributes to it.

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
    """
    cfg = (config or BccConfig()).replace(**options) if options else (config or BccConfig())
    if isinstance(model, BccModule):
        raise BccError(ErrorCode.CONFIG_INVALID, "model is already compiled by bcc; pass the original model.")
    if not isinstance(schedule, Schedule) and not callable(schedule):
        raise BccError(
            ErrorCode.SCHEDULE_DTYPE,
            f"schedule must be a bcc.Schedule or a function of the block names, got "
            f"{type(schedule).__name__}. Build one with bcc.Schedule.every(n, steps, names).",
        )
    if isinstance(schedule, Schedule) and blocks is not None:
        raise BccError(
            ErrorCode.CONFIG_INVALID,
            "blocks= is only used with a schedule function; a Schedule already names its blocks.",
        )
    if scale_shift is not None and not isinstance(scale_shift, ScaleShift):
        scale_shift = ScaleShift.load(scale_shift)
    if isinstance(scale_shift, ScaleShift) and isinstance(schedule, Schedule):
        scale_shift.check_compatible(schedule, model, cfg.mode)  # fail now, not at the first call
    return BccModule(model, schedule, cfg, blocks, scale_shift)


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if (
        isinstance(example_inputs, tuple)
        and len(example_inputs) == 2
        and isinstance(example_inputs[0], tuple)
        and isinstance(example_inputs[1], dict)
    ):
        return example_inputs
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}
