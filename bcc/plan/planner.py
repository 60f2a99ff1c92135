"""plan: recompute masks from measured change (the paper's Eq. 7) and compute budgets.

The planner returns plain data, a :class:`PlannedMask` (mask and how it was chosen), and never
builds a :class:`bcc.Schedule`: ``Schedule.from_change`` and ``Schedule.for_budget`` wrap
its plans, so the dependency points one way (schedule -> planner -> profile).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from bcc._io import freeze, thaw
from bcc.errors import BccError, ErrorCode
from bcc.plan.profile import ChangeProfile

__all__ = ["PlannedMask", "plan_from_change", "plan_for_budget", "compute_fraction", "GRANULARITIES"]

_SUM_FROM = ("next", "literal")
GRANULARITIES = ("block", "step")


def _curves(profile: ChangeProfile, granularity: str) -> torch.Tensor:
    """The change curves the threshold is applied to.

    ``"block"``: each block's own (the paper). ``"step"``: one curve for all blocks, their
    FLOP-weighted mean change, so every block refreshes at the same steps. In residual
    mode a block reused on top of fresh upstream output adds a residual computed for
    another input; refreshing the blocks together keeps the residuals of one step
    consistent (on both digits models it is several dB closer to the uncached model at
    equal compute: results/quality, results/speed).
    """
    if granularity not in GRANULARITIES:
        raise BccError(ErrorCode.THRESHOLD_INVALID,
                       f"granularity must be one of {GRANULARITIES}, got {granularity!r}: 'block' gives each block "
                       "its own refresh steps (the paper), 'step' refreshes all blocks together.")
    l1 = profile.l1_rel.double()
    if granularity == "block":
        return l1
    w = torch.tensor(profile.block_flops, dtype=torch.float64) if profile.block_flops else torch.ones(l1.shape[1])
    w = w / w.sum()
    return (l1 * w).sum(1, keepdim=True).expand_as(l1)


@dataclass(frozen=True)
class PlannedMask:
    """An automatic recompute mask and how it was chosen, for ``Schedule`` to wrap.

    Attributes:
        mask: bool ``[num_steps, num_blocks]``, columns in the profile's block order.
        threshold: the δ of Eq. 7 that produced ``mask``.
        meta: provenance (threshold, sum_from, granularity, the profile's fingerprint,
            scheduler and guidance; ``target_fraction`` for budgets), read-only.

    Example:
        >>> p = ChangeProfile(torch.tensor([[0.0], [0.2], [0.2]]), ["a"])
        >>> plan = plan_from_change(p, 0.3)
        >>> plan.mask[:, 0].tolist(), plan.threshold, plan.meta["sum_from"]
        ([True, False, True], 0.3, 'next')
    """

    mask: torch.Tensor
    threshold: float
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", freeze(self.meta))

    def __reduce__(self):  # a read-only mapping does not pickle (nor deepcopy): rebuild from a dict
        return PlannedMask, (self.mask, self.threshold, thaw(self.meta))


def compute_fraction(mask: torch.Tensor, block_costs: Sequence[float] | None = None, rest_cost: float = 0.0,
                     steps: range | None = None) -> float:
    """Fraction of the denoiser's work a recompute mask still executes.

    Args:
        mask: bool ``[num_steps, num_blocks]``.
        block_costs: per-step cost of each block (uniform when None).
        rest_cost: per-step cost of everything outside the blocks.
        steps: the steps the denoiser runs at (one expert's share); every step when None.

    Example:
        >>> compute_fraction(torch.tensor([[True, True], [False, True]]), [3.0, 1.0], rest_cost=4.0)  # 13 / 16
        0.8125
    """
    if steps is not None:
        mask = mask[steps.start:steps.stop]
    steps, blocks = mask.shape
    costs = torch.ones(blocks, dtype=torch.float64) if block_costs is None else torch.tensor(
        list(block_costs), dtype=torch.float64)
    executed = (mask.double() * costs).sum() + rest_cost * steps
    total = costs.sum() * steps + rest_cost * steps
    return float(executed / total)


def _mask(l1: torch.Tensor, threshold: float, sum_from: str, run: range) -> torch.Tensor:
    T, K = l1.shape
    # Steps the denoiser does not run at (another expert's) stay True: if a call lands
    # there after all (its boundary falls one step off at a resampled step count), it
    # computes, which is what its first call does anyway.
    mask = torch.ones(T, K, dtype=torch.bool)
    mask[run.start + 1:run.stop] = False
    for i in range(K):
        acc = 0.0  # change since the cache was filled at step t_a = the first step run
        for s in run[1:]:
            acc += float(l1[s, i])
            if acc > threshold:
                mask[s, i] = True
                # "next": the change accumulated from t_a + 1 on; "literal": Eq. 7 as
                # printed, whose sum starts at t_a and so counts L1(t_a) once more.
                acc = float(l1[s, i]) if sum_from == "literal" else 0.0
    return mask


def plan_from_change(profile: ChangeProfile, threshold: float, *, sum_from: str = "next",
                     granularity: str = "block") -> PlannedMask:
    """Block Caching's automatic mask: reuse until the accumulated change exceeds δ.

    A block computed at step ``t_a`` is reused while the change accumulated since then
    stays within ``threshold`` (δ) and recomputed at the first step ``t_b`` where it
    exceeds it; ``t_b`` becomes the new ``t_a``. With ``sum_from="next"`` (default) the
    sum is ``Σ_{t=t_a+1}^{t_b} L1_rel(t)``: the change *after* the cache was filled.
    ``sum_from="literal"`` follows Eq. 7 as printed, ``Σ_{t=t_a}^{t_b}``, which also
    counts the change into ``t_a`` and so refreshes a little more often.
    Most callers want :meth:`bcc.Schedule.from_change`, which wraps the plan.

    Args:
        profile: measured change, e.g. from :func:`bcc.calibrate`.
        threshold: δ ≥ 0; 0 recomputes every block at every step where it changes at all.
        sum_from: ``"next"`` or ``"literal"``.
        granularity: ``"block"`` (the paper: each block's own curve) or ``"step"`` (one
            FLOP-weighted mean curve, all blocks refreshed at the same steps).

    Returns:
        A :class:`PlannedMask` over the profile's blocks.

    Example:
        >>> p = ChangeProfile(torch.tensor([[0.0], [0.2], [0.2], [0.2], [0.2]]), ["a"])
        >>> plan_from_change(p, 0.3).mask[:, 0].tolist()
        [True, False, True, False, True]
        >>> plan_from_change(p, 0.3, sum_from="literal").mask[:, 0].tolist()
        [True, False, True, True, True]
    """
    if sum_from not in _SUM_FROM:
        raise BccError(ErrorCode.THRESHOLD_INVALID, f"sum_from must be one of {_SUM_FROM}, got {sum_from!r}.")
    if not isinstance(threshold, (int, float)) or math.isnan(threshold) or threshold < 0:
        raise BccError(
            ErrorCode.THRESHOLD_INVALID,
            f"threshold must be a number >= 0 (a relative L1 change budget), got {threshold!r}. The paper "
            "used 0.5; use Schedule.for_budget to pick it from a speed target instead.",
        )
    mask = _mask(_curves(profile, granularity), float(threshold), sum_from, profile.steps_run)
    return PlannedMask(mask, float(threshold),
                {"threshold": float(threshold), "sum_from": sum_from, "granularity": granularity,
                 "profile_fingerprint": profile.fingerprint, "scheduler": profile.scheduler,
                 "guidance_scale": profile.guidance_scale})


def _fraction(profile: ChangeProfile, mask: torch.Tensor) -> float:
    return compute_fraction(mask, profile.block_flops, profile.rest_flops, profile.steps_run)


def plan_for_budget(profile: ChangeProfile, target: float, *, kind: str = "fraction", sum_from: str = "next",
                    granularity: str = "block") -> PlannedMask:
    """The automatic mask whose compute fraction is the largest not above ``target``.

    The threshold is found by bisection; compute fractions weigh blocks by the profile's
    FLOPs (uniform if it has none). The plan's ``meta`` records the threshold and the
    target fraction. Most callers want :meth:`bcc.Schedule.for_budget`, which wraps it.

    Args:
        profile: measured change.
        target: a compute fraction in (0, 1] (``kind="fraction"``) or a speedup ≥ 1
            (``kind="speedup"``, i.e. fraction = 1 / target).
        kind: ``"fraction"`` or ``"speedup"``.
        sum_from: ``"next"`` or ``"literal"`` (see :func:`plan_from_change`).
        granularity: ``"block"`` or ``"step"`` (see :func:`plan_from_change`).

    Returns:
        A :class:`PlannedMask` over the profile's blocks.

    Example:
        >>> l1 = torch.tensor([[0.0, 0.0], [0.1, 0.4], [0.1, 0.4], [0.1, 0.4]])
        >>> plan = plan_for_budget(ChangeProfile(l1, ["a", "b"]), 0.5)
        >>> compute_fraction(plan.mask), plan.mask.sum().item()  # 4 of 8 is not reachable by any δ
        (0.375, 3)
        >>> plan_for_budget(ChangeProfile(l1, ["a", "b"]), 0.5, granularity="step").mask.int().tolist()
        [[1, 1], [0, 0], [1, 1], [0, 0]]
    """
    if kind not in ("fraction", "speedup"):
        raise BccError(ErrorCode.THRESHOLD_INVALID, f"kind must be 'fraction' or 'speedup', got {kind!r}.")
    if not isinstance(target, (int, float)) or math.isnan(target) or target <= 0:
        raise BccError(ErrorCode.BUDGET_UNREACHABLE, f"target must be a positive number, got {target!r}.")
    fraction = 1.0 / target if kind == "speedup" else float(target)
    curves = _curves(profile, granularity)
    lo_mask = _mask(curves, math.inf, sum_from, profile.steps_run)  # everything reused after the first step
    f_min = _fraction(profile, lo_mask)
    if fraction > 1.0 + 1e-12 or fraction < f_min - 1e-12:
        raise BccError(
            ErrorCode.BUDGET_UNREACHABLE,
            f"a compute fraction of {fraction:.4f} is not reachable: with this profile schedules range from "
            f"{f_min:.4f} (compute every block only at the first step; ideal speedup {1 / f_min:.2f}x) to 1.0. "
            "Ask for a fraction in that range (or a speedup up to the maximum).",
        )
    lo, hi = 0.0, float(curves.sum()) + 1.0  # fraction(lo) is largest, fraction(hi) = f_min
    if _fraction(profile, _mask(curves, lo, sum_from, profile.steps_run)) <= fraction:
        hi = lo
    else:
        for _ in range(60):
            mid = (lo + hi) / 2
            if _fraction(profile, _mask(curves, mid, sum_from, profile.steps_run)) <= fraction:
                hi = mid
            else:
                lo = mid
    plan = plan_from_change(profile, hi, sum_from=sum_from, granularity=granularity)
    return PlannedMask(plan.mask, plan.threshold, {**plan.meta, "target_fraction": fraction})
