"""What a schedule costs in time: a per-block and per-step cost model, FLOP-based or measured.

FLOPs mislead on small models: a block's kernels cost a launch and a memory pass
whatever their arithmetic, and the rest of the model (time embedding, the sampler's own
arithmetic, the gate) costs time FLOP counters barely see. :meth:`CostModel.measure`
times a compiled model at a few schedules and fits ``time = T * rest + Σ_b n_b (α flops_b + β)``
(``n_b`` the steps block ``b`` runs), which keeps FLOPs' ranking of blocks and adds what a
launch and the rest really cost on this machine.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from bcc._io import freeze
from bcc.errors import BccError, ErrorCode
from bcc.plan.planner import compute_fraction
from bcc.plan.profile import ChangeProfile
from bcc.plan.schedule import Schedule

__all__ = ["CostModel"]


@dataclass(frozen=True)
class CostModel:
    """Per-step cost of each block and of everything else, in one unit (FLOPs or seconds).

    Attributes:
        block_names: one per cost, in the profile's block order.
        block_costs: a block's cost for one step it runs.
        rest_cost: the cost of one step outside the blocks (paid at every step).
        source: ``"flops"`` or ``"measured"``.
        meta: how it was made (for measured models: the schedules timed, their median
            seconds and the fit's relative error), read-only.

    Example:
        >>> cost = CostModel(("a", "b"), (3.0, 1.0), 4.0)
        >>> cost.fraction(torch.tensor([[True, True], [False, True]]))  # 13 / 16
        0.8125
    """

    block_names: tuple[str, ...]
    block_costs: tuple[float, ...]
    rest_cost: float
    source: str = "flops"
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_names", tuple(self.block_names))
        object.__setattr__(self, "block_costs", tuple(float(c) for c in self.block_costs))
        if len(self.block_costs) != len(self.block_names) or not self.block_names:
            raise BccError(ErrorCode.CALIBRATION_INVALID,
                           f"a cost model needs one cost per block: {len(self.block_names)} names, "
                           f"{len(self.block_costs)} costs.")
        if any(not math.isfinite(c) or c < 0 for c in (*self.block_costs, self.rest_cost)):
            raise BccError(ErrorCode.CALIBRATION_INVALID, "costs must be finite and >= 0.")
        if sum(self.block_costs) + self.rest_cost <= 0:
            raise BccError(ErrorCode.CALIBRATION_INVALID, "a cost model must cost something: every cost is 0.")
        object.__setattr__(self, "meta", freeze(self.meta))

    def fraction(self, mask: torch.Tensor) -> float:
        """The fraction of the all-compute cost a recompute mask still pays."""
        return compute_fraction(mask, self.block_costs, self.rest_cost)

    @classmethod
    def from_profile(cls, profile: ChangeProfile) -> "CostModel":
        """FLOPs as the profile counted them (uniform blocks, no rest, when it has none).

        Example:
            >>> CostModel.from_profile(ChangeProfile(torch.zeros(2, 2), ["a", "b"])).block_costs
            (1.0, 1.0)
        """
        costs = profile.block_flops or (1.0,) * profile.num_blocks
        return cls(profile.block_names, costs, profile.rest_flops if profile.block_flops else 0.0, "flops")

    @classmethod
    def measure(cls, denoiser: Any, run: Callable[[Any], Any], profile: ChangeProfile, *, repeats: int = 3,
                log: Callable[[str], None] | None = None,
                clock: Callable[[], float] = time.perf_counter) -> "CostModel":
        """Time ``run(denoiser)`` at five schedules (alternating, medians) and fit the model.

        Args:
            denoiser: a :func:`bcc.compile` result over the profile's blocks; its schedule is
                swapped (no recompile) and put back afterwards.
            run: one whole trajectory, e.g. ``lambda m: sample(m, ...)``.
            profile: gives the blocks, the step count and the FLOPs the fit starts from.
            repeats: timed runs per schedule after one warm-up each.
            log: called with a line after each repeat.
            clock: seconds now (a deterministic one makes the fit testable).

        Returns:
            A ``"measured"`` model in seconds per step; ``meta`` has the schedules' median
            times and the fit's worst relative error on them.
        """
        flops = torch.tensor(profile.block_flops or (1.0,) * profile.num_blocks, dtype=torch.float64)
        T, K = profile.num_steps, profile.num_blocks
        order = torch.argsort(flops)
        cheap = torch.zeros(K, dtype=torch.bool)
        cheap[order[: K // 2]] = True
        masks = {"all": torch.ones(T, K, dtype=torch.bool), "none": torch.zeros(T, K, dtype=torch.bool),
                 "every-2": (torch.arange(T) % 2 == 0)[:, None].expand(T, K).clone(),
                 "cheap-half": cheap[None].expand(T, K).clone(), "dear-half": (~cheap)[None].expand(T, K).clone()}
        for m in masks.values():
            m[0] = True
        before = getattr(denoiser, "bcc_schedule", None)
        schedules = {k: Schedule(m, profile.block_names) for k, m in masks.items()}
        times: dict[str, list[float]] = {k: [] for k in masks}
        try:
            for k, s in schedules.items():
                denoiser.set_schedule(s)
                run(denoiser)  # warm-up: first calls allocate caches
            for r in range(repeats):
                for k, s in schedules.items():
                    denoiser.set_schedule(s)
                    t0 = clock()
                    run(denoiser)
                    times[k].append(clock() - t0)
                if log:
                    log(f"cost model: repeat {r + 1}/{repeats}")
        finally:
            if before is not None:
                denoiser.set_schedule(before)
        med = {k: statistics.median(v) for k, v in times.items()}
        # Least squares for (rest, alpha, beta) over the five schedules: a schedule's time is
        # T * rest + alpha * Σ n_b flops_b + beta * Σ n_b.
        rows, ys = [], []
        for k, m in masks.items():
            n = m.double().sum(0)
            rows.append([float(T), float((n * flops).sum()), float(n.sum())])
            ys.append(med[k])
        a, y = torch.tensor(rows, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
        scale = a.abs().amax(0).clamp_min(1e-30)
        coef = torch.linalg.lstsq(a / scale, y[:, None]).solution[:, 0] / scale
        rest, alpha, beta = (float(c) for c in coef)
        if beta < 0:  # a negative launch cost is noise: refit without it
            coef2 = torch.linalg.lstsq((a / scale)[:, :2], y[:, None]).solution[:, 0] / scale[:2]
            rest, alpha, beta = float(coef2[0]), float(coef2[1]), 0.0
        rest, alpha = max(rest, 0.0), max(alpha, 0.0)
        costs = tuple(float(alpha * f + beta) for f in flops)
        total = T * (sum(costs) + rest)
        fit = {k: compute_fraction(m, costs, rest) * total for k, m in masks.items()}
        worst = max(abs(fit[k] - med[k]) / med[k] for k in med)
        return cls(profile.block_names, costs, rest, "measured",
                   {"median_seconds": med, "repeats": repeats, "alpha_s_per_flop": alpha, "beta_s_per_block": beta,
                    "fit_max_rel_error": worst, "fit_seconds": fit})

    def with_profile(self, profile: ChangeProfile) -> ChangeProfile:
        """``profile`` with these costs in place of its FLOPs, so the Eq. 7 planners
        (:meth:`bcc.Schedule.for_budget`) spend a budget of this model's unit."""
        if tuple(profile.block_names) != self.block_names:
            raise BccError(ErrorCode.PROFILE_MISMATCH, "the cost model and the profile name other blocks; "
                           "measure the cost model on the profile's blocks.")
        return dataclasses.replace(profile, block_flops=self.block_costs, rest_flops=self.rest_cost)

