"""The plan: which block is recomputed at which sampling step.

A :class:`Schedule` is a validated boolean tensor ``S[T, K]`` plus the names of the
``K`` blocks (module paths). ``S[s, i]`` is True when block ``i`` is recomputed at
step ``s``; otherwise the block reuses what it cached when it last ran.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from bcc._io import freeze, read_json, thaw, write_json
from bcc.errors import BccError, ErrorCode
from bcc.plan import planner
from bcc.plan.profile import check_active_steps

__all__ = ["Schedule"]


def _names(blocks: Iterable[str] | int) -> tuple[str, ...]:
    if isinstance(blocks, int):
        return tuple(f"block{i}" for i in range(blocks))
    return tuple(getattr(blocks, "names", blocks))


@dataclass(frozen=True, eq=False)
class Schedule:
    """A recompute mask over steps × blocks.

    Args:
        mask: bool tensor of shape ``[num_steps, num_blocks]``; row 0 must be all True,
            since nothing is cached before the first step.
        block_names: one module path per column, e.g. ``"down_blocks.1.attentions.0"``.
        timesteps: optional per-step timesteps the schedule was made for; with
            ``check=True`` each call's timestep is validated against them.
        block_costs / rest_cost: per-step cost (FLOPs) of each block and of the rest of
            the model; when given, :meth:`compute_fraction` weighs blocks by them.
        meta: free-form, JSON-like provenance (threshold, profile fingerprint, ...),
            saved along; copied read-only at construction (add to it with
            :meth:`with_meta`, which returns a new schedule).
        active_steps: ``(start, stop)``: the denoiser runs at steps ``start <= s < stop``
            only (one of Wan 2.2's two experts), so :meth:`compute_fraction` counts those
            steps. It does not gate anything: a call at any step follows its row (the first
            call of a trajectory recomputes every block whatever the row says).

    Example:
        >>> s = Schedule.every(2, 4, ["a", "b"])
        >>> s.mask.int().tolist()
        [[1, 1], [0, 0], [1, 1], [0, 0]]
        >>> s.compute_fraction()
        0.5
    """

    mask: torch.Tensor
    block_names: tuple[str, ...]
    timesteps: tuple[float, ...] | None = field(default=None)
    block_costs: tuple[float, ...] | None = field(default=None)
    rest_cost: float = 0.0
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)
    active_steps: tuple[int, int] | None = None

    # The generated __eq__ would compare masks with ``==`` (a tensor, whose truth value is
    # ambiguous); Dynamo compares backend options when it recompiles, so equality must work.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return (self.block_names == other.block_names and self.timesteps == other.timesteps
                and self.block_costs == other.block_costs and self.rest_cost == other.rest_cost
                and self.active_steps == other.active_steps and self.mask.shape == other.mask.shape and torch.equal(self.mask, other.mask))

    def __hash__(self) -> int:
        return hash((self.block_names, tuple(self.mask.shape), self.timesteps))

    def __post_init__(self) -> None:
        mask = self.mask
        if not isinstance(mask, torch.Tensor):
            raise BccError(
                ErrorCode.SCHEDULE_DTYPE,
                f"Schedule mask must be a torch.Tensor of dtype bool, got {type(mask).__name__}. "
                "Build it with torch.tensor(..., dtype=torch.bool) or use Schedule.every(...).",
            )
        if mask.dtype != torch.bool:
            raise BccError(
                ErrorCode.SCHEDULE_DTYPE,
                f"Schedule mask must have dtype torch.bool, got {mask.dtype}. Convert it with "
                "mask.bool() after checking it holds only 0/1.",
            )
        if mask.dim() != 2 or mask.shape[0] < 1 or mask.shape[1] < 1:
            raise BccError(
                ErrorCode.SCHEDULE_SHAPE,
                f"Schedule mask must be 2-D [num_steps, num_blocks] with both >= 1, got shape "
                f"{tuple(mask.shape)}.",
            )
        names = tuple(self.block_names)
        if len(names) != mask.shape[1]:
            raise BccError(
                ErrorCode.SCHEDULE_NAMES,
                f"Schedule has {mask.shape[1]} columns but {len(names)} block names; pass exactly "
                "one name per column (bcc.find_blocks lists a model's blocks).",
            )
        if len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
            raise BccError(ErrorCode.SCHEDULE_NAMES, f"Schedule block names must be unique strings, got {names}.")
        if not bool(mask[0].all()):
            missing = [n for n, v in zip(names, mask[0].tolist()) if not v]
            raise BccError(
                ErrorCode.SCHEDULE_FIRST_ROW,
                f"Schedule row 0 must be all True (nothing is cached before the first step), but "
                f"it reuses {missing}. Set mask[0] = True.",
            )
        if self.timesteps is not None and len(self.timesteps) != mask.shape[0]:
            raise BccError(
                ErrorCode.SCHEDULE_SHAPE,
                f"Schedule has {mask.shape[0]} steps but {len(self.timesteps)} timesteps.",
            )
        # Frozen dataclass: normalise through object.__setattr__ so the stored mask is a
        # private CPU copy the caller cannot mutate behind our back.
        object.__setattr__(self, "mask", mask.detach().to("cpu").clone())
        object.__setattr__(self, "block_names", names)
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", tuple(float(t) for t in self.timesteps))
        if self.block_costs is not None:
            if len(self.block_costs) != len(names):
                raise BccError(ErrorCode.SCHEDULE_NAMES, "block_costs needs one cost per block.")
            object.__setattr__(self, "block_costs", tuple(float(c) for c in self.block_costs))
        if self.active_steps is not None:
            object.__setattr__(self, "active_steps",
                               check_active_steps(self.active_steps, mask.shape[0], ErrorCode.SCHEDULE_SHAPE))
        if not isinstance(self.meta, Mapping):
            raise BccError(ErrorCode.CONFIG_INVALID,
                           f"Schedule meta must be a mapping (a dict of provenance), got {type(self.meta).__name__}.")
        # Read-only deep copy: a frozen schedule's provenance must not change behind it
        # (the caller's dict, or a reader writing into schedule.meta).
        object.__setattr__(self, "meta", freeze(self.meta))

    def __reduce__(self):  # a read-only mapping does not pickle (nor deepcopy): rebuild from a dict
        return Schedule, (self.mask, self.block_names, self.timesteps, self.block_costs, self.rest_cost,
                          thaw(self.meta), self.active_steps)

    def with_meta(self, **entries: Any) -> "Schedule":
        """The same schedule with ``entries`` added to (or replacing ones in) its ``meta``.

        Example:
            >>> s = Schedule.every(2, 4, 1).with_meta(source="profile.json")
            >>> s.meta["source"], Schedule.every(2, 4, 1).meta
            ('profile.json', mappingproxy({}))
        """
        return dataclasses.replace(self, meta={**self.meta, **entries})

    # -- constructors -------------------------------------------------------------
    @classmethod
    def all_compute(cls, num_steps: int, blocks: Sequence[str] | int) -> "Schedule":
        """Recompute every block at every step: reproduces the original model.

        Example:
            >>> Schedule.all_compute(3, ["a"]).mask.all().item()
            True
        """
        names = _names(blocks)
        return cls(torch.ones(num_steps, len(names), dtype=torch.bool), names)

    @classmethod
    def every(cls, n: int, num_steps: int, blocks: Sequence[str] | int, offset: int = 0) -> "Schedule":
        """Recompute all blocks every ``n``-th step (DeepCache/ModelOpt style), reuse between.

        Step ``s`` recomputes when ``(s - offset) % n == 0``; step 0 always recomputes.

        Example:
            >>> Schedule.every(3, 5, 1).mask[:, 0].tolist()
            [True, False, False, True, False]
        """
        if not isinstance(n, int) or n < 1:
            raise BccError(ErrorCode.SCHEDULE_SHAPE, f"Schedule.every needs n >= 1, got {n!r}.")
        names = _names(blocks)
        steps = torch.arange(num_steps)
        col = ((steps - offset) % n) == 0
        col[0] = True
        return cls(col[:, None].expand(num_steps, len(names)).contiguous(), names)

    # -- queries ------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return int(self.mask.shape[0])

    @property
    def num_blocks(self) -> int:
        return int(self.mask.shape[1])

    @property
    def steps_run(self) -> range:
        """The steps at which the denoiser runs: ``range(*active_steps)``, else every step."""
        return range(*(self.active_steps or (0, self.num_steps)))

    def compute_fraction(self, block_costs: Sequence[float] | None = None, rest_cost: float | None = None) -> float:
        """Fraction of the denoiser's work still executed.

        Args:
            block_costs: cost (e.g. FLOPs) of each block per step; defaults to the
                schedule's own costs, else uniform.
            rest_cost: per-step cost of everything outside the cached blocks (defaults to
                the schedule's own when its costs are used).

        Example:
            >>> Schedule.every(2, 4, ["a", "b"]).compute_fraction([3.0, 1.0], rest_cost=4.0)
            0.75
        """
        if block_costs is None and self.block_costs is not None:
            block_costs = self.block_costs
            rest_cost = self.rest_cost if rest_cost is None else rest_cost
        return planner.compute_fraction(self.mask, block_costs, 0.0 if rest_cost is None else rest_cost, self.steps_run)

    def ideal_speedup(self, block_costs: Sequence[float] | None = None, rest_cost: float | None = None) -> float:
        """Total work divided by executed work: the speedup if time followed FLOPs."""
        return 1.0 / self.compute_fraction(block_costs, rest_cost)

    def reorder(self, names: Sequence[str]) -> "Schedule":
        """The same schedule with its columns in the order of ``names`` (same set)."""
        names = tuple(names)
        if set(names) != set(self.block_names) or len(names) != len(self.block_names):
            missing = sorted(set(names) - set(self.block_names))
            extra = sorted(set(self.block_names) - set(names))
            raise BccError(
                ErrorCode.SCHEDULE_MISMATCH,
                f"the schedule's blocks do not match the model's: the model has {missing} that the "
                f"schedule lacks, the schedule has {extra} that the model lacks. Rebuild the "
                "schedule from bcc.find_blocks(model, example_inputs).",
            )
        index = [self.block_names.index(n) for n in names]
        costs = None if self.block_costs is None else tuple(self.block_costs[i] for i in index)
        return Schedule(self.mask[:, index], names, self.timesteps, costs, self.rest_cost, self.meta, self.active_steps)

    def __repr__(self) -> str:
        return (
            f"Schedule(steps={self.num_steps}, blocks={self.num_blocks}, "
            f"compute_fraction={self.compute_fraction():.3f})"
        )

    # -- automatic schedules (bcc.plan.planner) ----------------------------------
    @classmethod
    def from_plan(cls, profile, plan: planner.PlannedMask) -> "Schedule":
        """Wrap a :class:`bcc.plan.planner.PlannedMask` made from ``profile``: its blocks, timesteps and costs."""
        return cls(plan.mask, profile.block_names, profile.timesteps, profile.block_flops, profile.rest_flops,
                   plan.meta, profile.active_steps)

    @classmethod
    def from_change(cls, profile, threshold: float, *, sum_from: str = "next", granularity: str = "block") -> "Schedule":
        """The paper's automatic schedule (Eq. 7): reuse a block until its accumulated change exceeds ``threshold``.

        See :func:`bcc.plan.planner.plan_from_change` for ``sum_from`` and ``granularity``;
        ``meta`` records the threshold and the profile's provenance.

        Example:
            >>> from bcc import ChangeProfile
            >>> p = ChangeProfile(torch.tensor([[0.0], [0.2], [0.2], [0.2], [0.2]]), ["a"])
            >>> s = Schedule.from_change(p, 0.3)
            >>> s.mask[:, 0].tolist(), s.meta["threshold"]
            ([True, False, True, False, True], 0.3)
        """
        return cls.from_plan(profile, planner.plan_from_change(profile, threshold, sum_from=sum_from,
                                                               granularity=granularity))

    @classmethod
    def for_budget(cls, profile, target: float, *, kind: str = "fraction", sum_from: str = "next",
                   granularity: str = "block") -> "Schedule":
        """The automatic schedule with the largest compute fraction not above ``target``.

        ``kind="speedup"`` reads ``target`` as an ideal speedup (fraction ``1 / target``);
        see :func:`bcc.plan.planner.plan_for_budget`. Fractions weigh blocks by the
        profile's FLOPs; ``meta`` records the threshold found and the target.

        Example:
            >>> from bcc import ChangeProfile
            >>> l1 = torch.tensor([[0.0, 0.0], [0.1, 0.4], [0.1, 0.4], [0.1, 0.4]])
            >>> s = Schedule.for_budget(ChangeProfile(l1, ["a", "b"]), 0.5)
            >>> s.compute_fraction(), s.meta["target_fraction"]
            (0.375, 0.5)
        """
        return cls.from_plan(profile, planner.plan_for_budget(profile, target, kind=kind, sum_from=sum_from,
                                                              granularity=granularity))

    # -- files --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": "bcc-schedule",
            "version": 1,
            "block_names": list(self.block_names),
            "mask": self.mask.int().tolist(),
            "timesteps": None if self.timesteps is None else list(self.timesteps),
            "block_costs": None if self.block_costs is None else list(self.block_costs),
            "rest_cost": self.rest_cost,
            "compute_fraction": self.compute_fraction(),
            "meta": thaw(self.meta),
            "active_steps": None if self.active_steps is None else list(self.active_steps),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        try:
            mask = torch.tensor(d["mask"], dtype=torch.int64)
            if ((mask != 0) & (mask != 1)).any():
                raise ValueError("mask holds values other than 0/1")
            active = d.get("active_steps")
            return cls(mask.bool(), tuple(d["block_names"]), d.get("timesteps"), d.get("block_costs"),
                       float(d.get("rest_cost", 0.0)), d.get("meta") or {}, None if active is None else tuple(active))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise BccError(ErrorCode.FILE_INVALID, f"schedule data is incomplete or malformed ({e}); recreate it.") from None

    def save(self, path) -> None:
        """Write the schedule (mask, names, costs, provenance) as JSON, atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "Schedule":
        """Read a schedule written by :meth:`save`."""
        return cls.from_dict(read_json(path, "bcc-schedule", 1))

    def to_text(self) -> str:
        """A table, one row per block: ``#`` recompute, ``.`` reuse, `` `` a step the denoiser does not run.

        Example:
            >>> print(Schedule(torch.tensor([[True], [True], [False], [True]]), ["a"], active_steps=(1, 4)).to_text())
            step 0123
               a  #.#
        """
        width = max(len("step"), *(len(n) for n in self.block_names))
        run = self.steps_run
        rows = [f"{'step':>{width}} " + "".join(str(s % 10) for s in range(self.num_steps))]
        for i, name in enumerate(self.block_names):
            rows.append(f"{name:>{width}} " + "".join(
                " " if s not in run else "#" if v else "." for s, v in enumerate(self.mask[:, i].tolist())))
        return "\n".join(rows)
