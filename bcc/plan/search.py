"""Search for the schedule that keeps the final samples closest to the uncached ones at a budget.

The paper's Eq. 7 picks each block's refresh steps from its own change curve, a proxy:
what a user sees is the final sample, and a block reused on top of fresh upstream output
errs in ways its own curve does not show. :func:`search_schedule` scores candidates by
what the proxy stands for, the paired PSNR of final samples against the all-compute
ones from the same noise, on seeds the caller keeps apart from those it evaluates on, and
spends the budget in the units of a :class:`~bcc.plan.cost.CostModel` (measured time
where FLOPs mislead). Candidates come from schedule families:

* ``"block"``: Eq. 7 per block (the paper's);
* ``"step"``: Eq. 7 on one FLOP-weighted curve, all blocks refreshed together;
* ``"nested"``: the ``k`` blocks whose change costs least per second saved are refreshed
  together at ``m`` steps, placed at equal quantiles of their accumulated change or by
  Eq. 7 on their mean curve, the others run at every step (``k`` = all blocks is a step-level schedule; a UNet's inner
  blocks cached and its outer ones computed is DeepCache's shape);

* ``"region"``: a multi-module region (:mod:`bcc.analyze.regions`) refreshed at ``m`` steps
  and cached as one unit behind one gate (a residual of the stream entering it where
  :mod:`bcc.analyze.residual` finds one, else whole), the blocks outside it run at every step:
  the span of all the profile's blocks, and on a UNet DeepCache's branches
  (:func:`~bcc.analyze.regions.unet_branch`). Each region is compiled once
  (:meth:`~bcc.BccModule.bcc_recompile`) and costed as the profile blocks inside it, an
  upper bound: it also skips the code between them.

and the best one whose cached blocks share their refresh steps (step-level, nested and
region ones) is refined by moving one refresh step at a time to a neighbouring step (same
cost) while the score improves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from bcc._io import freeze
from bcc.analyze.regions import region, split_region, unet_branch
from bcc.errors import BccError, ErrorCode
from bcc.plan.cost import CostModel
from bcc.plan.planner import plan_from_change
from bcc.plan.profile import ChangeProfile
from bcc.plan.schedule import Schedule

__all__ = ["Candidate", "SearchResult", "search_schedule", "frontier", "refresh_steps", "propose_regions",
           "FAMILIES"]

FAMILIES = ("block", "step", "nested", "region")


@dataclass(frozen=True)
class Candidate:
    """One schedule the search scored.

    Attributes:
        family: ``"block"``, ``"step"``, ``"nested-k"`` (``k`` blocks refreshed together),
            ``"region <name>"`` or ``"refined"`` / ``"refined region <name>"`` (after
            refresh-step moves).
        schedule: the schedule (a region candidate's names the region and the blocks
            outside it).
        fraction: its cost as a fraction of the all-compute cost (the cost model's unit).
        psnr_db: mean paired PSNR of its final samples against the all-compute ones.
        recipe: where every reused block refreshes at the same steps (step-level, nested,
            region and refined candidates), ``{"cached": [profile block index...], "refresh":
            [step...]}``; empty otherwise.
    """

    family: str
    schedule: Schedule
    fraction: float
    psnr_db: float
    recipe: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "recipe", freeze(self.recipe))


def frontier(candidates: Sequence[Candidate]) -> tuple[Candidate, ...]:
    """The candidates no other one beats in both cost and PSNR, cheapest first.

    Example:
        >>> s = Schedule.all_compute(1, ["a"])
        >>> pts = [Candidate("x", s, f, p) for f, p in [(0.5, 30.0), (0.6, 29.0), (0.7, 35.0)]]
        >>> [(c.fraction, c.psnr_db) for c in frontier(pts)]
        [(0.5, 30.0), (0.7, 35.0)]
    """
    best: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.fraction, -c.psnr_db)):
        if not best or c.psnr_db > best[-1].psnr_db:
            best.append(c)
    return tuple(best)


@dataclass(frozen=True)
class SearchResult:
    """What :func:`search_schedule` found.

    Attributes:
        chosen: the best-scoring candidate within the budget.
        tried: every candidate scored, in the order tried.
        budget: the budget, a fraction of the cost model's all-compute cost.
        cost: the cost model the budget was spent in.
        seeds: the seeds the scores were measured on.
        denoiser: a compiled model the chosen schedule runs on: the one searched with
            (its schedule as before the search; ``set_schedule(result.schedule)``), or for
            a region the model compiled for it (the chosen schedule set).
    """

    chosen: Candidate
    tried: tuple[Candidate, ...]
    budget: float
    cost: CostModel
    seeds: tuple[int, ...]
    denoiser: Any = field(default=None, compare=False, repr=False)

    @property
    def schedule(self) -> Schedule:
        return self.chosen.schedule

    @property
    def frontier(self) -> tuple[Candidate, ...]:
        return frontier(self.tried)

    def to_dict(self) -> dict:
        """Plain data (no schedules): the chosen point and every tried one."""
        def point(c: Candidate) -> dict:
            return {"family": c.family, "fraction": c.fraction, "psnr_db": c.psnr_db,
                    "recipe": {k: list(v) for k, v in c.recipe.items()}}
        return {"budget": self.budget, "seeds": list(self.seeds), "cost_source": self.cost.source,
                "chosen": point(self.chosen), "tried": [point(c) for c in self.tried]}


def refresh_steps(curve: torch.Tensor, m: int) -> list[int]:
    """``m`` refresh steps (step 0 first) at equal quantiles of the accumulated change.

    Step 0 always computes; the other ``m - 1`` steps are where the change accumulated
    since step 0 first reaches ``k / m`` of its total, ``k = 1 .. m-1``, so refreshes crowd
    where the curve is steep. Collisions move to the nearest free step.

    Example:
        >>> refresh_steps(torch.tensor([0.0, 1, 1, 1, 1, 1]), 3)
        [0, 2, 4]
        >>> refresh_steps(torch.tensor([0.0, 4, 1, 1, 1, 1]), 3)
        [0, 1, 3]
    """
    T = int(curve.numel())
    m = max(1, min(int(m), T))
    cum = torch.cumsum(curve.double().clamp_min(0), 0)
    total = float(cum[-1])
    if total <= 0:
        cum, total = torch.arange(T, dtype=torch.float64), float(T - 1)
    chosen = {0}
    for k in range(1, m):
        s = int(torch.searchsorted(cum, torch.tensor(total * k / m, dtype=torch.float64)))
        s = min(max(s, 1), T - 1)
        for d in range(T):  # nearest free step, later first
            for c in (s + d, s - d):
                if 1 <= c < T and c not in chosen:
                    chosen.add(c)
                    break
            else:
                continue
            break
    return sorted(chosen)


def _nested_mask(T: int, K: int, cached: Sequence[int], refresh: Sequence[int]) -> torch.Tensor:
    mask = torch.ones(T, K, dtype=torch.bool)
    idx = torch.tensor(list(cached), dtype=torch.long)
    mask[:, idx] = False
    mask[torch.tensor(list(refresh), dtype=torch.long)[:, None], idx[None]] = True
    return mask


@dataclass
class _Lowering:
    """How a profile-space mask runs as a region schedule: the region's column follows its
    inside blocks (which share their refresh steps), the others their own."""

    name: str
    inside: list[int]
    outside: list[int]
    names: tuple[str, ...]
    costs: list[float]
    score: Any = None  # a _Scorer on the region's compiled model, made at first use

    def mask(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([mask[:, self.inside[:1]], mask[:, self.outside]], 1)


def _inside(name: str, names: Sequence[str]) -> list[int] | None:
    """The profile blocks a region holds, by execution order (the profile's): from the first
    block under its start module to the last under its end; None if either has none."""
    start, end = split_region(name)
    under = lambda path, mod: path == mod or path.startswith(mod + ".")  # noqa: E731
    first = next((i for i, n in enumerate(names) if under(n, start)), None)
    last = max((i for i, n in enumerate(names) if under(n, end)), default=None)
    if first is None or last is None or last < first:
        return None
    return list(range(first, last + 1))


def propose_regions(denoiser: Any, names: Sequence[str]) -> list[str]:
    """The regions the ``"region"`` family tries: the first to the last of ``names`` (the
    profile's blocks, in execution order), and on a UNet each of DeepCache's branches.

    Example:
        >>> propose_regions(torch.nn.Linear(2, 2), ["layers.0", "layers.1"])
        ['layers.0..layers.1']
    """
    out = [region(names[0], names[-1])] if len(names) > 1 else []
    if all(hasattr(denoiser, a) for a in ("down_blocks", "mid_block", "up_blocks")):
        for b in range(3 * len(denoiser.down_blocks)):
            try:
                out.append(unet_branch(denoiser, b))
            except BccError:
                continue
    return list(dict.fromkeys(out))


class _Scorer:
    """Final samples of a schedule against the all-compute ones, per seed."""

    def __init__(self, denoiser: Any, run: Callable[[Any, int], torch.Tensor], names: Sequence[str], T: int,
                 seeds: Sequence[int], data_range: float | None, bar: Any, ref: dict | None = None):
        self.denoiser, self.run, self.names, self.seeds, self.bar = denoiser, run, tuple(names), tuple(seeds), bar
        if ref is None:
            denoiser.set_schedule(Schedule.all_compute(T, self.names))
            ref = {s: run(denoiser, s).detach().float() for s in self.seeds}
        self.ref = ref
        self.range = data_range
        self.seen: dict[bytes, float] = {}

    def __call__(self, mask: torch.Tensor) -> float:
        key = mask.numpy().tobytes()
        if key not in self.seen:
            self.denoiser.set_schedule(Schedule(mask, self.names))
            scores = [self._psnr(self.run(self.denoiser, s).detach().float(), self.ref[s]) for s in self.seeds]
            self.seen[key] = sum(scores) / len(scores)
            self.bar.update(1)
        return self.seen[key]

    def _psnr(self, got: torch.Tensor, ref: torch.Tensor) -> float:
        peak = self.range if self.range is not None else float(ref.max() - ref.min()) or 1.0
        mse = (got - ref).pow(2).flatten(1).mean(1).clamp_min(1e-30)
        return float((10 * torch.log10(peak ** 2 / mse)).clamp(max=100.0).mean())


def search_schedule(denoiser: Any, run: Callable[[Any, int], torch.Tensor], profile: ChangeProfile,
                    budget: float, *, cost: CostModel | None = None, seeds: Sequence[int] = (0,),
                    families: Sequence[str] = FAMILIES, regions: Sequence[str] | None = None, sweeps: int = 2,
                    data_range: float | None = None, progress: bool = True) -> SearchResult:
    """The schedule with the best paired PSNR of final samples within ``budget``.

    Args:
        denoiser: a :func:`bcc.compile` result over the profile's blocks (any backend;
            schedules are swapped, nothing recompiles). Its schedule is put back afterwards.
        run: ``run(denoiser, seed)`` -> the final samples of one trajectory from ``seed``'s
            noise (any batch). Keep these seeds apart from those you evaluate on.
        profile: measured change (:func:`bcc.calibrate`) at the trajectory's step count.
        budget: the largest cost allowed, a fraction in (0, 1] of the all-compute cost.
        cost: what a block and the rest cost per step (:meth:`CostModel.measure` for
            measured time); FLOPs of the profile when None.
        seeds: the seeds every candidate is scored on (the score is their mean).
        families: which of :data:`FAMILIES` to start from.
        regions: the region names (``"start..end"``) the ``"region"`` family tries;
            :func:`propose_regions` when None. Each is compiled once (a region whose ends
            hold no profile block, or that the graph refuses, is skipped).
        sweeps: rounds of refresh-step moves on the best nested candidate (0: none).
        data_range: the samples' value range for PSNR (2 for images in [-1, 1]); the
            reference batch's range when None.
        progress: a tqdm bar over scored candidates.

    Returns:
        A :class:`SearchResult`; ``.schedule`` is the chosen one, with ``meta["search"]``,
        and ``.denoiser`` a model that runs it (a region schedule names other blocks than
        ``denoiser``'s, so it runs on the model compiled for it).

    Example:
        >>> import bcc
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        ...     def forward(self, x, t):
        ...         return self.b(self.a(x) * t)
        >>> def run(m, seed):
        ...     x = torch.randn(4, 2, generator=torch.Generator().manual_seed(seed))
        ...     for s in range(6):
        ...         x = x - 0.1 * m(x, torch.tensor(1.0 - s / 6))
        ...     return x
        >>> net = Net()
        >>> profile = bcc.calibrate(net, lambda m, c, seed: run(m, seed), [0], seeds=[9], blocks=["a", "b"],
        ...                         progress=False)
        >>> fast = bcc.compile(net, bcc.Schedule.all_compute(6, ["a", "b"]), backend="eager")
        >>> found = search_schedule(fast, run, profile, 0.7, seeds=[1], progress=False)
        >>> found.chosen.fraction <= 0.7, found.schedule.meta["search"]["family"] == found.chosen.family
        (True, True)
    """
    if not isinstance(budget, (int, float)) or math.isnan(budget) or not 0 < budget <= 1:
        raise BccError(ErrorCode.BUDGET_UNREACHABLE, f"budget must be a fraction in (0, 1], got {budget!r}.")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise BccError(ErrorCode.CONFIG_INVALID, f"families must be a non-empty subset of {FAMILIES}, got "
                       f"{tuple(families)!r}.")
    if not seeds:
        raise BccError(ErrorCode.CONFIG_INVALID, "search_schedule needs at least one seed to score on.")
    if profile.active_steps is not None:
        raise BccError(ErrorCode.CONFIG_INVALID,
                       f"this profile covers steps {profile.active_steps} of {profile.num_steps} only (one expert, or a "
                       "generation that started late); the search scores whole trajectories of one denoiser. Use "
                       "bcc.Plan(profile, budget=...) for it.")
    cost = cost or CostModel.from_profile(profile)
    timed = cost.with_profile(profile)  # refuses a cost model of other blocks
    T, K = profile.num_steps, profile.num_blocks
    from tqdm.auto import tqdm

    before = getattr(denoiser, "bcc_schedule", None)
    bar = tqdm(desc="bcc search", unit="schedule", disable=not progress)
    tried: list[Candidate] = []
    try:
        score = _Scorer(denoiser, run, profile.block_names, T, seeds, data_range, bar)
        via: dict[int, _Lowering] = {}  # id(candidate) -> its region

        def rank(c: Candidate) -> tuple:
            # A region is costed as the blocks it holds, an upper bound (it also skips the
            # code between them, behind one gate instead of many): it wins a tie.
            return c.psnr_db, -c.fraction, id(c) in via

        def add(family: str, mask: torch.Tensor, recipe: Mapping[str, Any] | None = None,
                low: _Lowering | None = None) -> Candidate:
            recipe = recipe or _recipe(mask)
            if low is None:
                c = Candidate(family, Schedule(mask, profile.block_names), cost.fraction(mask), score(mask), recipe)
            else:
                if low.score is None:
                    model = denoiser.bcc_recompile(Schedule.all_compute(T, low.names))
                    low.score = _Scorer(model, run, low.names, T, seeds, data_range, bar, ref=score.ref)
                rmask = low.mask(mask)
                c = Candidate(family, Schedule(rmask, low.names), cost.fraction(mask), low.score(rmask), recipe)
                via[id(c)] = low
            tried.append(c)
            return c

        for fam, gran in (("block", "block"), ("step", "step")):
            if fam in families:
                try:
                    add(fam, Schedule.for_budget(timed, budget, granularity=gran).mask)
                except BccError as e:
                    if e.code is not ErrorCode.BUDGET_UNREACHABLE:
                        raise
        if "nested" in families:
            for cached, refresh in _nested_recipes(profile, cost, budget):
                add(f"nested-{len(cached)}", _nested_mask(T, K, cached, refresh),
                    {"cached": list(cached), "refresh": list(refresh)})
        if "region" in families:
            for low in _lowerings(profile, cost, propose_regions(denoiser, profile.block_names)
                                  if regions is None else regions):
                for cached, refresh in _region_recipes(profile, cost, budget, low.inside):
                    try:
                        add(f"region {low.name}", _nested_mask(T, K, cached, refresh),
                            {"cached": list(cached), "refresh": list(refresh)}, low)
                    except BccError as e:  # the graph refuses this region: not a candidate
                        if e.code not in (ErrorCode.BLOCK_NOT_REGION, ErrorCode.BLOCK_NOT_FOUND):
                            raise
                        break
        # Any candidate whose cached blocks share their refresh steps (step-level ones too)
        # can be refined; the best of them is.
        shared = [c for c in tried if c.recipe and c.fraction <= budget + 1e-9]
        if shared and sweeps > 0:
            start = max(shared, key=rank)
            low = via.get(id(start))
            prefix = "refined" if low is None else f"refined region {low.name}"
            _refine(start, lambda fam, mask, recipe: add(prefix, mask, recipe, low), T, K, sweeps)
    finally:
        bar.close()
        if before is not None:
            denoiser.set_schedule(before)
    fits = [c for c in tried if c.fraction <= budget + 1e-9]
    if not fits:
        floor = torch.zeros(T, K, dtype=torch.bool)
        floor[0] = True
        raise BccError(ErrorCode.BUDGET_UNREACHABLE,
                       f"no schedule of the families {tuple(families)} costs at most {budget:.3f} of the "
                       f"all-compute cost with this {cost.source} cost model: even reusing every block after "
                       f"step 0 costs {cost.fraction(floor):.3f} (what runs outside the blocks costs "
                       f"{cost.rest_cost / (cost.rest_cost + sum(cost.block_costs)):.0%} of a step). Raise the "
                       "budget, or cache more of the model.")
    best = max(fits, key=rank)
    meta = {"search": {"family": best.family, "psnr_db": best.psnr_db, "budget": float(budget),
                       "fraction": best.fraction, "cost_source": cost.source, "seeds": list(seeds),
                       "tried": len(tried)}, "profile_fingerprint": profile.fingerprint}
    low = via.get(id(best))
    chosen = Candidate(best.family, Schedule(best.schedule.mask, best.schedule.block_names,
                                             block_costs=cost.block_costs if low is None else low.costs,
                                             rest_cost=cost.rest_cost, meta=meta),
                       best.fraction, best.psnr_db, best.recipe)
    runner = denoiser if low is None else low.score.denoiser
    if low is not None:
        runner.set_schedule(chosen.schedule)
    return SearchResult(chosen, tuple(tried), float(budget), cost, tuple(seeds), runner)


def _lowerings(profile: ChangeProfile, cost: CostModel, regions: Sequence[str]) -> list[_Lowering]:
    out = []
    for name in regions:
        inside = _inside(name, profile.block_names)
        if inside is None:
            continue
        outside = [i for i in range(profile.num_blocks) if i not in inside]
        costs = [sum(cost.block_costs[i] for i in inside)] + [cost.block_costs[i] for i in outside]
        out.append(_Lowering(name, inside, outside, (name, *(profile.block_names[i] for i in outside)), costs))
    return out


def _region_recipes(profile: ChangeProfile, cost: CostModel, budget: float,
                    inside: list[int]) -> list[tuple[list[int], list[int]]]:
    """(cached = the region's blocks, refresh steps) at the budget (see :func:`_shared_recipes`)."""
    return _shared_recipes(profile, cost, budget, sorted(inside))


def _shared_recipes(profile: ChangeProfile, cost: CostModel, budget: float,
                    cached: list[int]) -> list[tuple[list[int], list[int]]]:
    """(cached, refresh steps) with ``cached`` refreshed together at the most steps the budget
    affords, placed by quantiles of their cost-weighted change and by Eq. 7 on it (one
    recipe when both place them alike; none when not even one refresh fits)."""
    T = profile.num_steps
    c = torch.tensor(cost.block_costs, dtype=torch.float64)
    total, held = float(c.sum()) + cost.rest_cost, float(c[cached].sum())
    if held <= 0:
        return []
    m = math.floor((budget * total - (total - held)) / held * T + 1e-9)
    if m < 1:
        return []
    m = min(m, T)
    curve = (profile.l1_rel.double()[:, cached] * (c[cached] / held)).sum(1)
    placed = [refresh_steps(curve, m)]
    eq7 = _eq7_steps(curve, m)
    if eq7 != placed[0]:
        placed.append(eq7)
    return [(cached, p) for p in placed]


def _recipe(mask: torch.Tensor) -> dict:
    """``{"cached", "refresh"}`` when every block that is ever reused refreshes at the same
    steps (a step-level or nested schedule), else ``{}``."""
    cached = [i for i in range(mask.shape[1]) if not bool(mask[:, i].all())]
    if not cached:
        return {}
    refresh = [s for s in range(mask.shape[0]) if bool(mask[s, cached].all())]
    if not torch.equal(mask, _nested_mask(mask.shape[0], mask.shape[1], cached, refresh)):
        return {}
    return {"cached": cached, "refresh": refresh}


def _nested_recipes(profile: ChangeProfile, cost: CostModel, budget: float) -> list[tuple[list[int], list[int]]]:
    """(cached blocks, refresh steps) at the budget for a few sizes of the cached set."""
    K = profile.num_blocks
    c = torch.tensor(cost.block_costs, dtype=torch.float64)
    # Change per unit of cost saved: the blocks whose reuse errs least for the time it saves first.
    rank = torch.argsort(profile.l1_rel.double().sum(0) / c.clamp_min(1e-30)).tolist()
    out = []
    for k in sorted({K, math.ceil(3 * K / 4), math.ceil(K / 2), math.ceil(K / 4)}, reverse=True):
        out += _shared_recipes(profile, cost, budget, sorted(rank[:k]))
    return out


def _eq7_steps(curve: torch.Tensor, m: int) -> list[int]:
    """At most ``m`` refresh steps by Eq. 7 on one curve: the smallest δ that needs no more."""
    one = ChangeProfile(curve[:, None], ["x"])
    lo, hi = 0.0, float(curve.sum()) + 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if int(plan_from_change(one, mid).mask.sum()) <= m:
            hi = mid
        else:
            lo = mid
    return [s for s, v in enumerate(plan_from_change(one, hi).mask[:, 0].tolist()) if v]


def _refine(start: Candidate, add: Callable[..., Candidate], T: int, K: int, sweeps: int) -> None:
    """Move one refresh step at a time to a free neighbour (cost unchanged) while PSNR improves."""
    cached, refresh = list(start.recipe["cached"]), list(start.recipe["refresh"])
    best = start.psnr_db
    for _ in range(sweeps):
        improved = False
        for i in range(1, len(refresh)):
            for d in (-1, 1):
                s = refresh[i] + d
                if not 1 <= s < T or s in refresh:
                    continue
                trial = sorted(refresh[:i] + [s] + refresh[i + 1:])
                c = add("refined", _nested_mask(T, K, cached, trial), {"cached": cached, "refresh": trial})
                if c.psnr_db > best + 1e-6:
                    refresh, best, improved = trial, c.psnr_db, True
                    break
        if not improved:
            break
