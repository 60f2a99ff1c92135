"""plan: :class:`Plan`, a schedule recipe (profile + budget) that serves any step count.

A :class:`bcc.Schedule` has one row per step, so it fits one ``num_inference_steps``. A
:class:`Plan` keeps what the schedule is made *from* — one or more change profiles
and a budget, speedup or threshold — and derives the schedule for whatever step
count a generation runs (:meth:`Plan.schedule_for`): from a profile calibrated at that
step count when the plan has one, else from the nearest one resampled over normalised
time (:func:`resample_profile`). ``bcc.compile`` derives each step count's schedule once
and keeps it; the compiled graph does not depend on the step count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from bcc.errors import BccError, ErrorCode
from bcc.plan.planner import GRANULARITIES
from bcc.plan.profile import ChangeProfile
from bcc.plan.schedule import Schedule

__all__ = ["Plan", "resample_profile"]

_SUM_FROM = ("next", "literal")


def resample_profile(profile: ChangeProfile, num_steps: int) -> ChangeProfile:
    """``profile``'s change curves for a ``num_steps``-step trajectory of the same sampler.

    Step ``s`` of a ``T``-step trajectory sits at normalised time ``u = s / (T - 1)``, and
    ``l1_rel[s]`` is the change over ``(u_{s-1}, u_s]``. The cumulative change ``C(u)``
    (the running sum of ``l1_rel``) is interpolated linearly at the new steps and
    differenced again, so the total change over the trajectory is kept and a block's
    change spreads over more (or fewer) steps in proportion to the time each covers:
    with fewer steps each step carries more change, and a threshold keeps its meaning.
    Nothing is read from the timesteps (they are not known for the new step count, and
    are dropped with ``l1_std``); ``extra["resampled_from"]`` records the source's step count.

    A profile of one expert (``active_steps``: Wan 2.2's experts switch at a boundary
    timestep) keeps its boundaries at the same normalised time: the switch between steps
    ``b - 1`` and ``b`` sits at ``u = (b - 1/2) / (T - 1)``. That is where the switch falls
    when timesteps are a fixed function of ``u``; if a generation's boundary lands a step
    off, its calls are still right (an expert's first call recomputes every block; a
    step outside the range computes).

    Args:
        profile: measured at ``profile.num_steps`` steps.
        num_steps: the step count wanted, ``>= 1``.

    Returns:
        A :class:`ChangeProfile` of ``num_steps`` rows (``profile`` itself when equal).

    Example:
        >>> p = ChangeProfile(torch.tensor([[0.0], [0.4], [0.2], [0.2]]), ["a"])  # total change 0.8
        >>> q = resample_profile(p, 7)
        >>> q.num_steps, round(float(q.l1_rel.sum()), 6), q.extra["resampled_from"]
        (7, 0.8, 4)
        >>> [round(v, 3) for v in resample_profile(p, 2).l1_rel[:, 0].tolist()]
        [0.0, 0.8]
        >>> low = ChangeProfile(torch.tensor([[0.0], [0.0], [0.3], [0.2]]), ["a"], active_steps=(1, 4))
        >>> resample_profile(low, 7).active_steps
        (1, 7)
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise BccError(ErrorCode.SCHEDULE_SHAPE, f"num_steps must be an int >= 1, got {num_steps!r}.")
    if num_steps == profile.num_steps:
        return profile
    l1 = profile.l1_rel
    T = profile.num_steps
    cum = l1.cumsum(0)
    if T == 1 or num_steps == 1:  # one step holds no change between steps
        new = torch.zeros(num_steps, l1.shape[1], dtype=torch.float64)
    else:
        pos = torch.linspace(0, T - 1, num_steps, dtype=torch.float64)
        lo = pos.floor().long().clamp(max=T - 1)
        hi = (lo + 1).clamp(max=T - 1)
        frac = (pos - lo.double())[:, None]
        at = cum[lo] * (1 - frac) + cum[hi] * frac
        new = torch.cat([torch.zeros(1, l1.shape[1], dtype=torch.float64), (at[1:] - at[:-1]).clamp_min(0)])
    active = None
    if profile.active_steps is not None:
        active = _rescale_range(profile.active_steps, T, num_steps)
        new[:active[0] + 1] = 0  # the expert's first step has no previous one; before it, it does not run
        new[active[1]:] = 0
    return ChangeProfile(
        l1_rel=new, block_names=profile.block_names, block_flops=profile.block_flops, rest_flops=profile.rest_flops,
        fingerprint=profile.fingerprint, scheduler=None if profile.scheduler is None else dict(profile.scheduler),
        guidance_scale=profile.guidance_scale, num_runs=profile.num_runs, mode=profile.mode,
        extra={**profile.extra, "resampled_from": T}, active_steps=active)


def _rescale_range(active: tuple[int, int], T: int, num_steps: int) -> tuple[int, int]:
    # A boundary between steps b - 1 and b sits at b - 1/2 in step units: scaled to the new
    # step count, the first new step past it is where the range starts (or stops).
    scale = (num_steps - 1) / (T - 1) if T > 1 else 0.0

    def past(b: int) -> int:
        return 0 if b == 0 else num_steps if b == T else min(max(math.ceil((b - 0.5) * scale), 0), num_steps)

    start, stop = past(active[0]), past(active[1])
    if stop <= start:  # a range of one step shrunk to none: keep the step nearest it
        start = min(start, num_steps - 1)
        stop = start + 1
    return start, stop


@dataclass(frozen=True)
class Plan:
    """How to cache, for any number of steps: change profile(s) and one target.

    Give exactly one of ``budget``, ``speedup`` or ``threshold``. ``bcc.compile(pipe,
    plan)`` (or ``bcc.compile(model, plan)`` with ``model.trajectory(steps=T)``) derives
    the schedule for each step count a generation runs, once, and keeps it.

    Args:
        profile: a :class:`ChangeProfile`, or several measured at different step
            counts (a tuple; a list is copied to one). All must cover the same blocks.
        budget: the compute fraction to keep, in (0, 1]: a fraction of the *whole
            denoiser's* FLOPs per trajectory (the cached blocks and everything outside
            them, as the profile counted them), so 0.6 predicts an ideal 1/0.6 = 1.67x.
        speedup: the ideal speedup wanted, >= 1 (``budget = 1 / speedup``).
        threshold: Eq. 7's δ on the (resampled) change curves instead of a budget.
        granularity: ``"block"`` (each block its own refresh steps, the paper) or
            ``"step"`` (all blocks refresh together; higher fidelity at equal compute
            on the shipped models, see the README).
        sum_from: ``"next"`` or ``"literal"`` (see :func:`bcc.plan.planner.plan_from_change`).
        version: format version.

    Example:
        >>> p = ChangeProfile(torch.tensor([[0.0, 0.0], [0.3, 0.1], [0.3, 0.1], [0.3, 0.1]]), ["a", "b"])
        >>> plan = Plan(p, budget=0.75)
        >>> plan.schedule_for(4).mask.int().tolist()
        [[1, 1], [1, 0], [1, 1], [1, 0]]
        >>> plan.schedule_for(7).num_steps, plan.schedule_for(7).meta["plan_resampled_from"]
        (7, 4)
        >>> Plan(p, budget=0.5, speedup=2.0)
        Traceback (most recent call last):
        ...
        bcc.errors.BccError: [BCC001] a Plan takes exactly one of budget, speedup or threshold; got budget, speedup. ...
    """

    profile: ChangeProfile | tuple[ChangeProfile, ...]
    budget: float | None = None
    speedup: float | None = None
    threshold: float | None = None
    granularity: str = "block"
    sum_from: str = "next"
    version: int = 1

    def __post_init__(self) -> None:
        profiles = tuple(self.profile) if isinstance(self.profile, (list, tuple)) else (self.profile,)
        if not profiles or not all(isinstance(p, ChangeProfile) for p in profiles):
            raise BccError(ErrorCode.CONFIG_INVALID,
                           "Plan(profile=...) needs a bcc.ChangeProfile (from bcc.calibrate) or a tuple of them, got "
                           f"{type(self.profile).__name__}.")
        names = {p.block_names for p in profiles}
        if len(names) != 1:
            raise BccError(ErrorCode.CONFIG_INVALID,
                           "a Plan's profiles must cover the same blocks; calibrate the same model and blocks at "
                           "each step count.")
        steps = [p.num_steps for p in profiles]
        if len(set(steps)) != len(steps):
            raise BccError(ErrorCode.CONFIG_INVALID,
                           f"a Plan has two profiles for one step count ({sorted(steps)}); keep one per step count.")
        given = [n for n in ("budget", "speedup", "threshold") if getattr(self, n) is not None]
        if len(given) != 1:
            raise BccError(ErrorCode.CONFIG_INVALID,
                           f"a Plan takes exactly one of budget, speedup or threshold; got {', '.join(given) or 'none'}. "
                           "budget=0.6 keeps 60% of the denoiser's FLOPs, speedup=1.5 asks for an ideal 1.5x, "
                           "threshold=0.5 is Eq. 7's δ.")
        value = getattr(self, given[0])
        bounds = {"budget": (0.0, 1.0), "speedup": (1.0, math.inf), "threshold": (0.0, math.inf)}[given[0]]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
        if not ok or not (bounds[0] < value <= bounds[1] if given[0] == "budget" else bounds[0] <= value < bounds[1]):
            raise BccError(ErrorCode.CONFIG_INVALID,
                           f"Plan {given[0]} must be a number in {'(0, 1]' if given[0] == 'budget' else '[1, inf)' if given[0] == 'speedup' else '[0, inf)'}, "
                           f"got {value!r}.")
        if self.granularity not in GRANULARITIES:
            raise BccError(ErrorCode.CONFIG_INVALID,
                           f"Plan granularity must be one of {GRANULARITIES}, got {self.granularity!r}.")
        if self.sum_from not in _SUM_FROM:
            raise BccError(ErrorCode.CONFIG_INVALID, f"Plan sum_from must be one of {_SUM_FROM}, got {self.sum_from!r}.")
        # A private tuple: the frozen plan must not follow a list the caller changes later.
        object.__setattr__(self, "profile", profiles if len(profiles) > 1 else profiles[0])
        # A budget out of reach at a calibrated step count is an error now, not at the first
        # denoiser call of a generation (BCC503, with the reachable range).
        for p in profiles:
            self.schedule_for(p.num_steps)

    @property
    def profiles(self) -> tuple[ChangeProfile, ...]:
        """The profiles, as a tuple."""
        return self.profile if isinstance(self.profile, tuple) else (self.profile,)

    @property
    def block_names(self) -> tuple[str, ...]:
        return self.profiles[0].block_names

    def profile_for(self, num_steps: int) -> ChangeProfile:
        """The profile measured at ``num_steps``, else the one with the nearest step count
        (the longer one on a tie: it resolves the curve more finely) resampled to it."""
        exact = [p for p in self.profiles if p.num_steps == num_steps]
        if exact:
            return exact[0]
        nearest = min(self.profiles, key=lambda p: (abs(p.num_steps - num_steps), -p.num_steps))
        return resample_profile(nearest, num_steps)

    def schedule_for(self, num_steps: int) -> Schedule:
        """The schedule for a ``num_steps``-step generation (deterministic; callers keep it).

        ``meta`` says where it came from: ``plan_profile_steps`` (the profile's step count)
        and ``plan_resampled_from`` (that count when resampled, else None).
        """
        profile = self.profile_for(num_steps)
        if self.threshold is not None:
            schedule = Schedule.from_change(profile, self.threshold, sum_from=self.sum_from,
                                            granularity=self.granularity)
        else:
            target, kind = (self.budget, "fraction") if self.budget is not None else (self.speedup, "speedup")
            schedule = Schedule.for_budget(profile, target, kind=kind, sum_from=self.sum_from,
                                           granularity=self.granularity)
        source = profile.extra.get("resampled_from")
        return schedule.with_meta(plan_profile_steps=source or num_steps, plan_resampled_from=source)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the profiles (``ChangeProfile.to_dict``) and the settings; :meth:`from_dict` reads it."""
        return {"format": "bcc-plan", "version": self.version, "profiles": [p.to_dict() for p in self.profiles],
                "budget": self.budget, "speedup": self.speedup, "threshold": self.threshold,
                "granularity": self.granularity, "sum_from": self.sum_from}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        try:
            profiles = tuple(ChangeProfile.from_dict(p) for p in data["profiles"])
            return cls(profiles, budget=data.get("budget"), speedup=data.get("speedup"),
                       threshold=data.get("threshold"), granularity=data.get("granularity", "block"),
                       sum_from=data.get("sum_from", "next"), version=int(data.get("version", 1)))
        except (KeyError, TypeError, ValueError) as e:
            raise BccError(ErrorCode.FILE_INVALID, f"plan data is incomplete or malformed ({e}); recreate it.") from None
