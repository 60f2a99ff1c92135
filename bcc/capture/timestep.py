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

from bcc.errors import BccError, ErrorCode

__all__ = ["TIMESTEP_NAMES", "TimestepArg", "TimestepWatch", "find_timestep", "timestep_finder"]

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


class TimestepWatch:
    """``check=True`` for counted steps: what a trajectory's timesteps say about how the
    model is driven. It reads each timestep's value (a device sync per call on a GPU).

    Diffusion samplers step through non-increasing timesteps (Heun and PNDM repeat some,
    never the first), and a new generation starts high again. So, per stream: a timestep
    *above* the previous one at step ``s > 0`` means a new generation started after ``s``
    steps (fewer than the schedule's, or an abandoned one); the first timestep again at
    step 1 means two calls per step; step 0 continuing the previous trajectory's descent
    means more calls than steps. A schedule that recorded its timesteps (a calibrated
    one) is checked against them. Without them, a trajectory is compared with the last
    one that passed every check to its end *and* was followed by a proper new start (so a
    run with more calls than steps never becomes the reference); a wrong first
    generation is refused before it could, so it cannot poison later checks.
    :meth:`reset` (``model.bcc_reset()``) forgets it all, e.g. after changing the sampler.

    Example:
        >>> w = TimestepWatch()
        >>> for s, t in enumerate([999.0, 500.0, 1.0]):
        ...     w.check(s, 3, 0, t, None)
        >>> w.check(0, 3, 0, 999.0, None)  # a new trajectory ...
        >>> w.check(1, 3, 0, 999.0, None)  # ... whose second call repeats the first timestep
        Traceback (most recent call last):
        ...
        bcc.errors.BccError: [BCC402] at step 1 of 3 (stream 0) the model got timestep 999 again, the same as at step 0: ...
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._last: dict[int, tuple[int, int, float]] = {}  # stream -> (step, num_steps, timestep)
        self._run: dict[Any, list[float]] = {}  # key -> stream 0's timesteps of the trajectory under way
        self._reference: dict[Any, tuple[float, ...]] = {}  # key -> the last good trajectory's

    def check(self, step: int, num_steps: int, stream: int, t: float,
              expected: "tuple[float, ...] | None", key: Any = None) -> None:
        """Check the call at ``step`` of ``num_steps`` on ``stream`` with timestep ``t``;
        ``key`` keeps references apart (an input signature: Flux shifts its timesteps by
        resolution)."""
        try:
            self._check(step, num_steps, stream, t, expected, key)
        except BccError:
            self._last = {}
            self._run.pop(key, None)
            raise

    def _check(self, step: int, num_steps: int, stream: int, t: float,
               expected: "tuple[float, ...] | None", key: Any) -> None:
        last = self._last.get(stream)
        self._last[stream] = (step, num_steps, t)
        if expected is not None and step < len(expected) and t != expected[step]:
            raise BccError(
                ErrorCode.STEP_MISMATCH,
                f"at step {step} of {num_steps} the model got timestep {t:g} but the schedule was made for "
                f"{expected[step]:g} (it was calibrated with another scheduler or step count, or the model is "
                "called more than once per step). Use the scheduler and num_inference_steps the schedule was made "
                "for, or a bcc.Plan.")
        where = f"at step {step} of {num_steps} (stream {stream})"
        if last is not None:
            prev_step, prev_steps, prev_t = last
            if step == 0 and prev_step == prev_steps - 1 and t < prev_t:
                raise BccError(
                    ErrorCode.STEP_OVERFLOW,
                    f"call {prev_steps + 1} of a {prev_steps}-step trajectory: the model was called more times "
                    f"than the schedule has steps (timestep {t:g} continues below the last step's {prev_t:g}; a "
                    "new generation would start high again). Build the schedule for the pipeline's "
                    "num_inference_steps (len(scheduler.timesteps) steps), use a bcc.Plan, or compile the "
                    "pipeline: bcc.compile(pipe, plan).")
            if step > 0 and prev_step == step - 1 and step == 1 and t == prev_t:
                raise BccError(
                    ErrorCode.STEP_MISMATCH,
                    f"{where} the model got timestep {t:g} again, the same as at step 0: either the pipeline "
                    "calls the model twice per step (true classifier-free guidance, video guidance: give each call "
                    "its stream with `with model.trajectory(steps=T, streams=2):` or bcc_call_at(bcc.StepRef(step=i, "
                    "num_steps=T, stream=k), ...)), or a generation was abandoned after its first step and a new one "
                    "started (call model.bcc_reset() before each generation). Compiling the pipeline, "
                    "bcc.compile(pipe, plan), gets both right.")
            if step > 0 and prev_step == step - 1 and t > prev_t:
                raise BccError(
                    ErrorCode.STEP_MISMATCH,
                    f"{where} the timestep went up ({prev_t:g} -> {t:g}): a new generation started after {step} "
                    f"step{'s' if step > 1 else ''} of the previous one, either because it ran fewer steps than "
                    f"the schedule's {num_steps} (build the schedule for its num_inference_steps, or use a "
                    "bcc.Plan) or because it was abandoned (an interrupt or an exception). Mark each generation "
                    "with `with model.trajectory(steps=T):` (or call model.bcc_reset() before it), or compile the "
                    "pipeline: bcc.compile(pipe, plan).")
        if stream != 0:
            return
        run = self._run.get(key)
        if step == 0:
            if run is not None and len(run) == num_steps:
                self._reference[key] = tuple(run)  # it ran to its end and this is a proper new start
            self._run[key] = [t]
        elif run is not None and len(run) == step:
            run.append(t)
        reference = self._reference.get(key)
        if reference is not None and len(reference) == num_steps and t != reference[step]:
            raise BccError(
                ErrorCode.STEP_MISMATCH,
                f"{where} the model got timestep {t:g}, but the last complete generation had {reference[step]:g} "
                "there: the steps do not match the schedule's (another scheduler or num_inference_steps, or a call "
                "counted at the wrong step). After changing the sampler on purpose call model.bcc_reset(), which "
                "forgets the last generation; otherwise use the settings the schedule was made for.")


