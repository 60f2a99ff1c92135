"""calibrate: measure each block's step-to-step change on the real sampling loop.

Hooks record, for every block and step, ``L1_rel = ||r(s) - r(s-1)||_1 / ||r(s)||_1`` of
the quantity bcc would cache (the residual or the whole output), with caching off.
Statistics are streamed (sums and sums of squares over runs), so only the previous
step's value per block is kept in memory. Under ``torchrun`` each rank takes a share
of the runs and the sums are all-reduced in float64, so the result equals a
single-process calibration over the same runs.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from bcc.analyze.blocks import ATTENTION, BlockSelector, find_block_regions
from bcc.analyze.recording import BlockResiduals
from bcc.capture.graph import capture
from bcc.capture.timestep import timestep_finder
from bcc.errors import BccError, ErrorCode
from bcc.plan.profile import ChangeProfile, model_fingerprint, scheduler_info
from bcc.analyze.hooks import patch_forwards
from bcc.analyze.regions import is_region

__all__ = ["calibrate", "block_flops", "region_members"]


def region_members(model: torch.nn.Module, args: tuple, kwargs: dict, names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """For each region among ``names``, the outermost modules wholly inside it (one capture
    of ``model`` with these inputs; none without regions)."""
    regions = [n for n in names if is_region(n)]
    if not regions:
        return {}
    blocks = find_block_regions(capture(model, args, kwargs).gm, regions)
    return {b.name: b.members for b in blocks}


def block_flops(model: torch.nn.Module, args: tuple, kwargs: dict, names: Sequence[str],
                members: dict[str, tuple[str, ...]] | None = None) -> tuple[list[float], float]:
    """FLOPs per call of each named block and of the rest of the model, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` on one forward. A region's
    (``"start..end"``) are its member modules' (``members``, or found on a capture).

    Attention runs on the math SDPA kernel while counting: the counter has no formula
    for the fused CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``) and would
    count attention as free, underrating attention blocks and every compute fraction.

    Example:
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.att = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        ...     def forward(self, x):
        ...         return self.att(x, x, x, need_weights=False)[0]
        >>> per_block, rest = block_flops(Net(), (torch.randn(1, 16, 8),), {}, ["att"])
        >>> per_block[0] > 4 * 2 * 16 * 8 * 8  # projections plus q k^T and attn v
        True
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(*args, **kwargs)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    members = region_members(model, args, kwargs, names) if members is None else members
    per_block = [float(sum(sum(counts.get(f"{root}.{m}", {}).values()) for m in members.get(n, (n,))))
                 for n in names]
    total = float(sum(counts.get("Global", {}).values()))
    return per_block, max(total - sum(per_block), 0.0)


class _Recorder:
    def __init__(self, model, names, mode):
        self.model, self.names, self.mode = model, list(names), mode
        self.step = -1
        self.prev: dict[str, list[torch.Tensor]] = {}
        self.rows: list[torch.Tensor] = []  # per step: [K] L1_rel of the current run
        self.timesteps: list[float] = []
        # The quantity measured is what bcc caches, so its base comes from the same rule.
        self.residuals = BlockResiduals(mode)
        self.find_timestep = timestep_finder(model.forward)
        self.handles = [model.register_forward_pre_hook(self._on_step, with_kwargs=True)]
        self._restore = patch_forwards(model, self.names, self._wrap, self.residuals)

    def _on_step(self, module, args, kwargs):
        self.step += 1
        self.rows.append(torch.zeros(len(self.names), dtype=torch.float64))
        # Recorded only where the call names its timestep; without one the profile simply
        # has no timesteps (nothing is guessed).
        found = self.find_timestep(tuple(args), dict(kwargs))
        if found is not None and (not isinstance(found.value, torch.Tensor) or found.value.numel() >= 1):
            self.timesteps.append(found.as_float())

    def _wrap(self, name, index, forward):
        def wrapped(*args, **kwargs):
            out, slots, inputs = self.residuals.call(name, forward, args, kwargs)
            current = [
                (v - s.identity(inputs) if s.base is not None else v).detach().float()
                for v, s in zip(pytree.tree_leaves(out), slots) if s is not None
            ]
            prev = self.prev.get(name)
            if prev is not None and self.step > 0:
                num = sum(float((c - p).abs().sum()) for c, p in zip(current, prev))
                den = sum(float(c.abs().sum()) for c in current)
                self.rows[self.step][index] = num / max(den, 1e-12)
            self.prev[name] = current
            return out

        return wrapped

    def new_run(self):
        self.step, self.prev, self.rows, self.timesteps = -1, {}, [], []

    def remove(self):
        self._restore()
        for h in self.handles:
            h.remove()


def calibrate(
    model: torch.nn.Module,
    sample: Callable[[torch.nn.Module, Any, int], Any],
    conditions: Sequence[Any],
    seeds: Sequence[int] = (0, 1),
    *,
    example_inputs: tuple[tuple, dict] | None = None,
    blocks: BlockSelector | Sequence[str] = ATTENTION,
    mode: str = "residual",
    scheduler: Any = None,
    guidance_scale: float | None = None,
    progress: bool = True,
) -> ChangeProfile:
    """Measure per-block change over real sampling runs, with caching off.

    Args:
        model: the denoiser (e.g. ``pipe.unet``); it is hooked, not modified.
        sample: runs one full trajectory, ``sample(model, condition, seed)``, calling
            ``model`` once per step (e.g. a wrapper around a diffusers pipeline).
        conditions: prompts, class labels, ...; every condition runs with every seed.
        seeds: random seeds per condition (the paper: 2).
        example_inputs: ``(args, kwargs)`` of one model call, used to find the blocks and
            count their FLOPs; if omitted, the first call inside ``sample`` is used.
        blocks: block selector as in :func:`bcc.find_blocks`, or explicit module paths.
        mode: ``"residual"`` or ``"output"``: which cached quantity to measure; match
            the ``mode`` you will compile with.
        scheduler, guidance_scale: recorded in the profile (solver and guidance change
            the curves, so a profile is only valid for its own).
        progress: show a tqdm bar (rank 0 only under torch.distributed).

    Returns:
        A :class:`ChangeProfile` with the mean and std of ``L1_rel`` over runs.

    Example:
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.block = torch.nn.Linear(2, 2)
        ...     def forward(self, x, t):
        ...         return x + self.block(x) * t
        >>> def sample(model, cond, seed):
        ...     x = torch.full((1, 2), float(cond + seed))
        ...     for t in (3.0, 2.0, 1.0):
        ...         x = model(x, torch.tensor(t))
        >>> p = calibrate(Net(), sample, [1, 2], seeds=[0], blocks=["block"], progress=False)
        >>> p.num_steps, p.num_runs, p.block_names
        (3, 2, ('block',))
    """
    if not conditions:
        raise BccError(ErrorCode.CALIBRATION_INVALID, "calibrate needs at least one condition (prompt, label, ...).")
    if not seeds:
        raise BccError(ErrorCode.CALIBRATION_INVALID, "calibrate needs at least one seed.")
    runs = list(itertools.product(conditions, seeds))
    dist = torch.distributed if torch.distributed.is_available() and torch.distributed.is_initialized() else None
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    mine = runs[rank::world]

    names, flops, rest = _resolve_blocks(model, sample, runs[0], example_inputs, blocks)
    recorder = _Recorder(model, names, mode)
    sums = sq = None
    steps = None
    timesteps: list[float] = []
    try:
        from tqdm.auto import tqdm

        bar = tqdm(mine, desc="bcc calibrate", disable=not progress or rank != 0, unit="run")
        for condition, seed in bar:
            recorder.new_run()
            with torch.no_grad():
                sample(model, condition, seed)
            if recorder.step < 0:
                raise BccError(ErrorCode.CALIBRATION_INVALID, "sample() never called the model; it must run a trajectory.")
            table = torch.stack(recorder.rows)
            if steps is None:
                steps, timesteps = table.shape[0], list(recorder.timesteps)
                sums = torch.zeros_like(table)
                sq = torch.zeros_like(table)
            elif table.shape[0] != steps:
                raise BccError(
                    ErrorCode.CALIBRATION_INVALID,
                    f"runs differ in step count ({steps} vs {table.shape[0]}); calibrate one step count at a time.",
                )
            sums += table
            sq += table * table
    finally:
        recorder.remove()
    if dist:
        sums, sq, steps, timesteps = _reduce(dist, sums, sq, steps, timesteps, len(names))
    n = len(runs)
    mean = sums / n
    std = (sq / n - mean * mean).clamp_min(0).sqrt()
    return ChangeProfile(
        l1_rel=mean, block_names=tuple(names), l1_std=std, block_flops=flops, rest_flops=rest,
        fingerprint=model_fingerprint(model), scheduler=scheduler_info(scheduler), guidance_scale=guidance_scale,
        num_runs=n, mode=mode, timesteps=timesteps if len(timesteps) == steps else None,
    )


def _resolve_blocks(model, sample, first_run, example_inputs, blocks):
    if example_inputs is None:
        example_inputs = _first_call(model, sample, first_run)
    args, kwargs = example_inputs
    if (isinstance(blocks, (list, tuple)) and blocks and not any(is_region(b) for b in blocks)
            and all(isinstance(b, str) and not any(c in b for c in "*?[") for b in blocks)):
        names = list(blocks)
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise BccError(ErrorCode.BLOCK_NOT_FOUND, f"model has no module(s) {missing}; list blocks with bcc.find_blocks.")
        members = {}
    else:
        found = find_block_regions(capture(model, args, kwargs).gm, blocks)
        names, members = [b.name for b in found], {b.name: b.members for b in found if b.members}
    flops, rest = block_flops(model, args, kwargs, names, members)  # the graph is captured once
    return names, flops, rest


class _Stop(Exception):
    pass


def _first_call(model, sample, run):
    captured = {}

    def grab(module, args, kwargs):
        captured["inputs"] = (tuple(args), dict(kwargs))
        raise _Stop

    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            sample(model, *run)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "inputs" not in captured:
        raise BccError(ErrorCode.CALIBRATION_INVALID, "sample() never called the model; it must run a trajectory.")
    return captured["inputs"]


def _reduce(dist, sums, sq, steps, timesteps, num_blocks):
    # Ranks with no runs still take part; the step count is agreed on first.
    local_steps = torch.tensor([steps or 0], dtype=torch.int64)
    all_steps = [torch.zeros_like(local_steps) for _ in range(dist.get_world_size())]
    dist.all_gather(all_steps, local_steps)
    agreed = {int(s) for s in all_steps if int(s) > 0}
    if len(agreed) != 1:
        raise BccError(ErrorCode.CALIBRATION_INVALID, f"ranks measured different step counts {sorted(agreed)}.")
    steps = agreed.pop()
    if sums is None:
        sums = torch.zeros(steps, num_blocks, dtype=torch.float64)
        sq = torch.zeros_like(sums)
    dist.all_reduce(sums)
    dist.all_reduce(sq)
    ts = torch.tensor(timesteps if len(timesteps) == steps else [float("nan")] * steps, dtype=torch.float64)
    dist.broadcast(ts, src=int(min(range(len(all_steps)), key=lambda r: 0 if int(all_steps[r]) else 1)))
    return sums, sq, steps, [float(t) for t in ts] if not torch.isnan(ts).any() else []
