"""plan: schedules from measured change (the paper's Eq. 7) and compute budgets."""
from __future__ import annotations

import math

import torch

from bcc.errors import BccError, ErrorCode
from bcc.plan.profile import ChangeProfile
from bcc.plan.schedule import Schedule

__all__ = ["from_change", "for_budget", "GRANULARITIES"]

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


def _mask(l1: torch.Tensor, threshold: float, sum_from: str) -> torch.Tensor:
    T, K = l1.shape
    mask = torch.zeros(T, K, dtype=torch.bool)
    mask[0] = True
    for i in range(K):
        acc = 0.0  # change since the cache was filled at step t_a = 0
        for s in range(1, T):
            acc += float(l1[s, i])
            if acc > threshold:
                mask[s, i] = True
                # "next": the change accumulated from t_a + 1 on; "literal": Eq. 7 as
                # printed, whose sum starts at t_a and so counts L1(t_a) once more.
                acc = float(l1[s, i]) if sum_from == "literal" else 0.0
    return mask


def from_change(profile: ChangeProfile, threshold: float, *, sum_from: str = "next",
                granularity: str = "block") -> Schedule:
    """Block Caching's automatic schedule: reuse until the accumulated change exceeds δ.

    A block computed at step ``t_a`` is reused while the change accumulated since then
    stays within ``threshold`` (δ) and recomputed at the first step ``t_b`` where it
    exceeds it; ``t_b`` becomes the new ``t_a``. With ``sum_from="next"`` (default) the
    sum is ``Σ_{t=t_a+1}^{t_b} L1_rel(t)``: the change *after* the cache was filled.
    ``sum_from="literal"`` follows Eq. 7 as printed, ``Σ_{t=t_a}^{t_b}``, which also
    counts the change into ``t_a`` and so refreshes a little more often.

    Args:
        profile: measured change, e.g. from :func:`bcc.calibrate`.
        threshold: δ ≥ 0; 0 recomputes every block at every step where it changes at all.
        sum_from: ``"next"`` or ``"literal"``.
        granularity: ``"block"`` (the paper: each block's own curve) or ``"step"`` (one
            FLOP-weighted mean curve, all blocks refreshed at the same steps).

    Example:
        >>> p = ChangeProfile(torch.tensor([[0.0], [0.2], [0.2], [0.2], [0.2]]), ["a"])
        >>> from_change(p, 0.3).mask[:, 0].tolist()
        [True, False, True, False, True]
        >>> from_change(p, 0.3, sum_from="literal").mask[:, 0].tolist()
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
    mask = _mask(_curves(profile, granularity), float(threshold), sum_from)
    return Schedule(
        mask, profile.block_names, profile.timesteps, profile.block_flops, profile.rest_flops,
        {"threshold": float(threshold), "sum_from": sum_from, "granularity": granularity,
         "profile_fingerprint": profile.fingerprint, "scheduler": profile.scheduler,
         "guidance_scale": profile.guidance_scale},
    )


def _fraction(profile: ChangeProfile, mask: torch.Tensor) -> float:
    return Schedule(mask, profile.block_names, None, profile.block_flops, profile.rest_flops).compute_fraction()


def for_budget(profile: ChangeProfile, target: float, *, kind: str = "fraction", sum_from: str = "next",
               granularity: str = "block") -> Schedule:
    """The automatic schedule whose compute fraction is the largest not above ``target``.

    The threshold is found by bisection; compute fractions weigh blocks by the profile's
    FLOPs (uniform if it has none). The result's ``meta`` records the threshold.

    Args:
        profile: measured change.
        target: a compute fraction in (0, 1] (``kind="fraction"``) or a speedup ≥ 1
            (``kind="speedup"``, i.e. fraction = 1 / target).
        kind: ``"fraction"`` or ``"speedup"``.
        granularity: ``"block"`` or ``"step"`` (see :func:`from_change`).

    Example:
        >>> l1 = torch.tensor([[0.0, 0.0], [0.1, 0.4], [0.1, 0.4], [0.1, 0.4]])
        >>> s = for_budget(ChangeProfile(l1, ["a", "b"]), 0.5)
        >>> s.compute_fraction(), s.mask.sum().item()  # 4 of 8 is not reachable by any δ
        (0.375, 3)
        >>> for_budget(ChangeProfile(l1, ["a", "b"]), 0.5, granularity="step").mask.int().tolist()
        [[1, 1], [0, 0], [1, 1], [0, 0]]
    """
    if kind not in ("fraction", "speedup"):
        raise BccError(ErrorCode.THRESHOLD_INVALID, f"kind must be 'fraction' or 'speedup', got {kind!r}.")
    if not isinstance(target, (int, float)) or math.isnan(target) or target <= 0:
        raise BccError(ErrorCode.BUDGET_UNREACHABLE, f"target must be a positive number, got {target!r}.")
    fraction = 1.0 / target if kind == "speedup" else float(target)
    curves = _curves(profile, granularity)
    lo_mask = _mask(curves, math.inf, sum_from)  # everything reused after step 0
    f_min = _fraction(profile, lo_mask)
    if fraction > 1.0 + 1e-12 or fraction < f_min - 1e-12:
        raise BccError(
            ErrorCode.BUDGET_UNREACHABLE,
            f"a compute fraction of {fraction:.4f} is not reachable: with this profile schedules range from "
            f"{f_min:.4f} (compute every block only at step 0; ideal speedup {1 / f_min:.2f}x) to 1.0. "
            "Ask for a fraction in that range (or a speedup up to the maximum).",
        )
    lo, hi = 0.0, float(curves.sum()) + 1.0  # fraction(lo) is largest, fraction(hi) = f_min
    if _fraction(profile, _mask(curves, lo, sum_from)) <= fraction:
        hi = lo
    else:
        for _ in range(60):
            mid = (lo + hi) / 2
            if _fraction(profile, _mask(curves, mid, sum_from)) <= fraction:
                hi = mid
            else:
                lo = mid
    schedule = from_change(profile, hi, sum_from=sum_from, granularity=granularity)
    schedule.meta.update(target_fraction=fraction)
    return schedule
