"""ChangeProfile: measured per-block, per-step change, the input to automatic schedules."""
from __future__ import annotations

import hashlib
import json
import os
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from bcc._io import freeze, read_json, thaw, write_json
from bcc.errors import BccError, ErrorCode

__all__ = ["ChangeProfile", "check_active_steps", "model_fingerprint", "scheduler_info"]

FORMAT = "bcc-change-profile"
VERSION = 1


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's class, config and parameter shapes (not its values).

    Example:
        >>> model_fingerprint(torch.nn.Linear(2, 3)) == model_fingerprint(torch.nn.Linear(2, 3))
        True
        >>> model_fingerprint(torch.nn.Linear(2, 3)) == model_fingerprint(torch.nn.Linear(3, 3))
        False
    """
    config = getattr(model, "config", None)
    # Private keys (diffusers' "_use_default_values" and the like) are bookkeeping whose
    # order varies between processes; they do not change the model.
    config = {k: v for k, v in dict(config).items() if not str(k).startswith("_")} if config is not None else {}
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    blob = json.dumps([type(model).__qualname__, config, shapes], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def scheduler_info(scheduler: Any) -> dict[str, Any] | None:
    """Name and config of a diffusers scheduler, as recorded in profiles."""
    if scheduler is None:
        return None
    config = getattr(scheduler, "config", {})
    keep = {k: v for k, v in dict(config).items() if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None), list))}
    return {"name": type(scheduler).__name__, "config": keep}


@dataclass(frozen=True)
class ChangeProfile:
    """How much each block's cached quantity changes from step to step.

    ``l1_rel[s, i] = ||r_i(s) - r_i(s-1)||_1 / ||r_i(s)||_1`` (the paper's Eq. 6) for
    block ``i`` at step ``s``, averaged over calibration runs; row 0 has no previous
    step and is 0.

    Args:
        l1_rel: mean change, float ``[num_steps, num_blocks]``.
        block_names: module paths, one per column.
        l1_std: standard deviation across runs (same shape), if measured.
        block_flops / rest_flops: per-step cost of each block and of everything else,
            used to turn schedules into compute fractions.
        fingerprint: :func:`model_fingerprint` of the model it was measured on.
        scheduler: :func:`scheduler_info` of the sampler's scheduler.
        guidance_scale, num_runs, mode, timesteps: how it was measured.
        extra: free-form, JSON-like provenance (e.g. the command line that measured it).
        active_steps: ``(start, stop)``: the denoiser runs at steps ``start <= s < stop``
            only (Wan 2.2's two experts each run a part of the trajectory); rows outside are
            0 and row ``start``, its first call, has no previous step either. None: every step.

    The record is immutable: tensors are private copies, ``scheduler`` and ``extra`` are
    read-only copies (add provenance with :meth:`with_extra`, which returns a new profile).

    Example:
        >>> p = ChangeProfile(torch.tensor([[0.0, 0.0], [0.1, 0.5]]), ["a", "b"])
        >>> p.num_steps, p.num_blocks
        (2, 2)
    """

    l1_rel: torch.Tensor
    block_names: tuple[str, ...]
    l1_std: torch.Tensor | None = None
    block_flops: tuple[float, ...] | None = None
    rest_flops: float = 0.0
    fingerprint: str | None = None
    scheduler: Mapping[str, Any] | None = None
    guidance_scale: float | None = None
    num_runs: int = 1
    mode: str = "residual"
    timesteps: tuple[float, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    active_steps: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        # A private copy (as_tensor alone would alias a float64 tensor the caller keeps).
        l1 = torch.as_tensor(self.l1_rel, dtype=torch.float64).detach().to("cpu").clone()
        names = tuple(self.block_names)
        if l1.dim() != 2 or l1.shape[0] < 1 or l1.shape[1] != len(names) or len(names) == 0:
            raise BccError(
                ErrorCode.CALIBRATION_INVALID,
                f"l1_rel must be [num_steps, num_blocks] = [T, {len(names)}] with T >= 1, got "
                f"{tuple(l1.shape)}.",
            )
        if not torch.isfinite(l1).all() or (l1 < 0).any():
            raise BccError(ErrorCode.CALIBRATION_INVALID, "l1_rel must be finite and >= 0 (a relative L1 change).")
        object.__setattr__(self, "l1_rel", l1)
        object.__setattr__(self, "block_names", names)
        if self.l1_std is not None:
            std = torch.as_tensor(self.l1_std, dtype=torch.float64).detach().to("cpu").clone()
            object.__setattr__(self, "l1_std", std.reshape(l1.shape))
        if self.block_flops is not None:
            if len(self.block_flops) != len(names):
                raise BccError(ErrorCode.CALIBRATION_INVALID, "block_flops needs one value per block.")
            object.__setattr__(self, "block_flops", tuple(float(f) for f in self.block_flops))
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", tuple(float(t) for t in self.timesteps))
        if self.active_steps is not None:
            object.__setattr__(self, "active_steps", check_active_steps(self.active_steps, l1.shape[0]))
            start, stop = self.active_steps
            if l1[:start].any() or l1[stop:].any():
                raise BccError(ErrorCode.CALIBRATION_INVALID,
                               f"l1_rel has change at steps outside active_steps {self.active_steps}, where the "
                               "denoiser does not run; those rows must be 0.")
        for name in ("scheduler", "extra"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise BccError(ErrorCode.CALIBRATION_INVALID,
                               f"ChangeProfile {name} must be a mapping (a dict), got {type(value).__name__}.")
            object.__setattr__(self, name, None if value is None else freeze(value))

    def __reduce__(self):  # read-only mappings do not pickle (nor deepcopy): rebuild from plain data
        plain = {f.name: thaw(getattr(self, f.name)) if f.name in ("scheduler", "extra") else getattr(self, f.name)
                 for f in dataclasses.fields(self)}
        return _rebuild, (plain,)

    def with_extra(self, **entries: Any) -> "ChangeProfile":
        """The same profile with ``entries`` added to (or replacing ones in) its ``extra``.

        Example:
            >>> p = ChangeProfile(torch.zeros(2, 1), ["a"]).with_extra(cli={"steps": 2})
            >>> p.extra["cli"]["steps"]
            2
        """
        return dataclasses.replace(self, extra={**self.extra, **entries})

    @property
    def num_steps(self) -> int:
        return int(self.l1_rel.shape[0])

    @property
    def steps_run(self) -> range:
        """The steps at which the denoiser runs: ``range(*active_steps)``, else every step."""
        return range(*(self.active_steps or (0, self.num_steps)))

    @property
    def num_blocks(self) -> int:
        return int(self.l1_rel.shape[1])

    def check_compatible(self, *, model: torch.nn.Module | None = None, scheduler: Any = None,
                         num_steps: int | None = None) -> None:
        """Raise ``PROFILE_MISMATCH`` if the profile was not measured for this setting."""
        problems = []
        if model is not None and self.fingerprint is not None and model_fingerprint(model) != self.fingerprint:
            problems.append(f"model fingerprint {model_fingerprint(model)} != profile's {self.fingerprint}")
        if num_steps is not None and num_steps != self.num_steps:
            problems.append(f"{num_steps} steps != profile's {self.num_steps}")
        if scheduler is not None and self.scheduler is not None:
            name = type(scheduler).__name__
            if name != self.scheduler["name"]:
                problems.append(f"scheduler {name} != profile's {self.scheduler['name']}")
        if problems:
            raise BccError(
                ErrorCode.PROFILE_MISMATCH,
                "this change profile was measured for another setting: " + "; ".join(problems)
                + ". Block change depends on model, solver, step count and guidance: run bcc.calibrate "
                "for this one.",
            )

    # -- files --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "block_names": list(self.block_names),
            "l1_rel": self.l1_rel.tolist(),
            "l1_std": None if self.l1_std is None else self.l1_std.tolist(),
            "block_flops": None if self.block_flops is None else list(self.block_flops),
            "rest_flops": self.rest_flops,
            "fingerprint": self.fingerprint,
            "scheduler": None if self.scheduler is None else thaw(self.scheduler),
            "guidance_scale": self.guidance_scale,
            "num_runs": self.num_runs,
            "mode": self.mode,
            "timesteps": None if self.timesteps is None else list(self.timesteps),
            "extra": thaw(self.extra),
            "active_steps": None if self.active_steps is None else list(self.active_steps),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChangeProfile":
        try:
            return cls(
                l1_rel=torch.tensor(d["l1_rel"], dtype=torch.float64),
                block_names=tuple(d["block_names"]),
                l1_std=None if d.get("l1_std") is None else torch.tensor(d["l1_std"], dtype=torch.float64),
                block_flops=d.get("block_flops"),
                rest_flops=float(d.get("rest_flops", 0.0)),
                fingerprint=d.get("fingerprint"),
                scheduler=d.get("scheduler"),
                guidance_scale=d.get("guidance_scale"),
                num_runs=int(d.get("num_runs", 1)),
                mode=d.get("mode", "residual"),
                timesteps=d.get("timesteps"),
                extra=d.get("extra") or {},
                active_steps=None if d.get("active_steps") is None else tuple(d["active_steps"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BccError(ErrorCode.FILE_INVALID, f"change profile data is incomplete or malformed ({e}); recreate it.") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the profile as JSON, atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ChangeProfile":
        """Read a profile written by :meth:`save`."""
        return cls.from_dict(read_json(path, FORMAT, VERSION))

    def summary(self) -> str:
        """One line per block: mean change, max change, cost share."""
        flops = self.block_flops or (0.0,) * self.num_blocks
        total = sum(flops) + self.rest_flops
        width = max(len(n) for n in self.block_names)
        lines = [f"{'block':<{width}}  mean_l1  max_l1  flops%"]
        run = self.steps_run
        rows = run[1:] if len(run) > 1 else run  # the first call has no previous step
        for i, name in enumerate(self.block_names):
            col = self.l1_rel[rows.start:rows.stop, i]
            share = 100 * flops[i] / total if total else float("nan")
            lines.append(f"{name:<{width}}  {col.mean():7.3f}  {col.max():6.3f}  {share:6.2f}")
        return "\n".join(lines)


def check_active_steps(active: Any, num_steps: int, code: ErrorCode = ErrorCode.CALIBRATION_INVALID) -> tuple[int, int]:
    """``active`` as a validated ``(start, stop)`` range of a ``num_steps``-step trajectory."""
    try:
        start, stop = (int(v) for v in active)
        ok = all(not isinstance(v, bool) and float(v) == int(v) for v in active)
    except (TypeError, ValueError):
        ok = False
    if not ok or not 0 <= start < stop <= num_steps:
        raise BccError(code,
                       f"active_steps must be (start, stop) with 0 <= start < stop <= {num_steps} (the steps the "
                       f"denoiser runs at), got {active!r}.")
    return start, stop


def _rebuild(fields: dict[str, Any]) -> ChangeProfile:
    return ChangeProfile(**fields)
