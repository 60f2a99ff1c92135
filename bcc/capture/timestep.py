"""capture: the one rule for which argument of a denoiser call is its timestep.

The runtime (to pass Python numbers as tensors, and for ``check=True``), calibration
and scale-shift training all need the timestep of a call; they all ask here, so a
model whose timestep is found by one is found by all.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["TIMESTEP_NAMES", "TimestepArg", "find_timestep", "timestep_finder"]

#: Argument names diffusers denoisers use for the timestep (UNets, DiTs, video models).
TIMESTEP_NAMES = ("timestep", "timesteps", "t")


@dataclass(frozen=True)
class TimestepArg:
    """Where a call's timestep is: ``key`` is a keyword name or a positional index.

    Attributes:
        key: the keyword (``"timestep"``) or the index into ``args``.
        value: what was passed (a tensor or a Python number).
    """

    key: str | int
    value: Any

    def replace_in(self, args: tuple, kwargs: dict, value: Any) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with this argument set to ``value``."""
        if isinstance(self.key, int):
            return args[: self.key] + (value,) + args[self.key + 1:], kwargs
        return args, {**kwargs, self.key: value}

    def as_float(self) -> float:
        """The timestep as a number (the first element of a batched tensor). Reads the tensor:
        never called on a path that must not sync."""
        v = self.value
        return float(v.flatten()[0].item()) if isinstance(v, torch.Tensor) else float(v)


def _positional_names(forward: Callable) -> list[str] | None:
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def timestep_finder(forward: Callable) -> Callable[[tuple, dict], TimestepArg | None]:
    """A :func:`find_timestep` bound to one ``forward`` (its signature is read once).

    Example:
        >>> def forward(sample, timestep, encoder_hidden_states=None): ...
        >>> find = timestep_finder(forward)
        >>> find((1, 2), {}).key, find((1,), {"timestep": 5}).value
        (1, 5)
    """
    names = _positional_names(forward)

    def find(args: tuple, kwargs: dict) -> TimestepArg | None:
        return find_timestep(names, args, kwargs)

    return find


def find_timestep(positional_names: list[str] | None, args: tuple, kwargs: dict) -> TimestepArg | None:
    """The timestep argument of a call: a keyword in :data:`TIMESTEP_NAMES`, else the
    positional argument whose parameter has such a name; ``None`` when there is none
    (callers then say so; they never guess a value).

    Example:
        >>> find_timestep(["x", "t"], ("x", 3), {}).key
        1
        >>> find_timestep(["x"], ("x",), {}) is None
        True
    """
    for name in TIMESTEP_NAMES:
        if name in kwargs:
            return TimestepArg(name, kwargs[name])
    for i, name in enumerate((positional_names or [])[: len(args)]):
        if name in TIMESTEP_NAMES:
            return TimestepArg(i, args[i])
    return None
