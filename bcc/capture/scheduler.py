"""capture: where a denoiser call belongs in a diffusers generation, read from the scheduler.

Counting denoiser calls goes wrong in real pipelines (another step count, img2img,
interrupts, exceptions in callbacks, two calls per step). The scheduler knows better,
so a :class:`GenerationTracker` wraps one scheduler *instance*'s ``set_timesteps``,
``set_begin_index`` and ``step`` (``functools.wraps``: pipelines inspect their
signatures for ``sigmas=``, ``eta``, ``generator``) and keeps Python ints only:

* ``set_timesteps`` starts a generation of ``len(scheduler.timesteps)`` steps (Heun:
  ``2N - 1``; PNDM: ``N + 1``): begin unknown, no step done, no call since;
* ``set_begin_index(b)`` (img2img) sets the begin index;
* the denoiser call at :meth:`GenerationTracker.place` is step ``begin + steps done``,
  stream ``calls since the last step()`` (the k-th call of a step is stream k);
* ``step()`` ends a step.

Schedulers without ``set_begin_index`` (DDIM, DDPM, PNDM) are driven by UNet pipelines,
which pass the loop's ``t``: a view into ``scheduler.timesteps``, whose storage offset
is its position — the begin index, with no device read (a search by value would be a
sync, and wrong where PNDM repeats a timestep). Nothing here reads a tensor's value.
"""
from __future__ import annotations

import copy
import functools
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from bcc.errors import BccError, ErrorCode

__all__ = ["CallPlace", "GenerationTracker", "tracker_for", "timestep_position", "is_pipeline", "pipeline_denoisers",
           "DENOISER_ATTRS"]

_WRAPPED = ("set_timesteps", "set_begin_index", "step")
_ABSENT = object()
# One tracker per scheduler object: pipelines made with from_pipe share the scheduler, and
# so the generation state. Weak keys: a scheduler the user drops is not kept alive here.
_TRACKERS: "weakref.WeakKeyDictionary[Any, GenerationTracker]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class CallPlace:
    """Where one denoiser call belongs: ``step`` of ``num_steps``, ``stream``, and the
    tracker's ``generation`` counter (a new value: a new generation)."""

    step: int
    num_steps: int
    stream: int
    generation: int


def timestep_position(timestep: Any, timesteps: Any) -> int | None:
    """The position of ``timestep`` in ``timesteps`` if it is a view into it (the loop's
    ``t``, or ``t.expand(B)``), from storage metadata only; ``None`` otherwise.

    Example:
        >>> ts = torch.tensor([999.0, 666.0, 666.0, 333.0])
        >>> timestep_position(ts[2], ts), timestep_position(ts[1:][1].expand(4), ts), timestep_position(ts[2] + 0, ts)
        (2, 2, None)
    """
    if not isinstance(timestep, torch.Tensor) or not isinstance(timesteps, torch.Tensor) or timesteps.dim() != 1:
        return None
    try:
        if timestep.device != timesteps.device or \
                timestep.untyped_storage().data_ptr() != timesteps.untyped_storage().data_ptr():
            return None
    except (RuntimeError, NotImplementedError):  # fake or meta tensors have no storage to compare
        return None
    offset = timestep.storage_offset() - timesteps.storage_offset()
    stride = timesteps.stride(0)
    if offset < 0 or stride <= 0 or offset % stride or offset // stride >= timesteps.shape[0]:
        return None
    return offset // stride


def _views_another_tensor(timestep: Any) -> bool:
    """Whether ``timestep`` is a view into a larger buffer (so, likely another tensor's
    timesteps) rather than a tensor of its own; storage metadata only."""
    if not isinstance(timestep, torch.Tensor):
        return False
    try:
        held = timestep.untyped_storage().nbytes() // max(timestep.element_size(), 1)
    except (RuntimeError, NotImplementedError):
        return False
    span = 1 + sum((n - 1) * s for n, s in zip(timestep.shape, timestep.stride()) if n > 0)
    return held > span


class GenerationTracker:
    """The generation state of one scheduler instance (see the module docstring).

    Build it with :func:`tracker_for`, which wraps the scheduler once.

    Example:
        >>> from diffusers import DDIMScheduler
        >>> sched = DDIMScheduler()
        >>> tracker, _ = tracker_for(sched)
        >>> sched.set_timesteps(4)
        >>> t = sched.timesteps[0]
        >>> [tracker.place(t) for _ in range(2)][1]  # two calls in one step: streams 0 and 1
        CallPlace(step=0, num_steps=4, stream=1, generation=1)
        >>> _ = sched.step(torch.zeros(1), t, torch.zeros(1)); tracker.place(sched.timesteps[1]).step
        1
    """

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler
        self.generation = 0  # set_timesteps calls seen (0: none yet)
        self.num_steps: int | None = None
        self.begin: int | None = None
        self.steps_done = 0
        self.calls_since_step = 0
        self.ended = False  # the pipeline said the generation is over (maybe_free_model_hooks)
        self._has_begin = hasattr(type(scheduler), "set_begin_index")
        self._undo: list[Callable[[], None]] = []
        self._before: dict[str, Any] = {}  # what the instance held under each wrapped name

    # -- wrapping ----------------------------------------------------------------------
    def install(self) -> None:
        for name in _WRAPPED:
            if hasattr(self.scheduler, name):
                self._wrap(name, getattr(self, f"_on_{name}"))
        self._keep_copies_plain()

    def _keep_copies_plain(self) -> None:
        # The wrappers live in the instance's __dict__ and call *this* scheduler's methods,
        # so a deepcopy would carry them along: LTX-2 copies its scheduler for the audio
        # latents, SkyReels-V2's diffusion forcing one per frame, and every step() of a copy
        # would step this scheduler (its step_index twice per step: the video at the wrong
        # sigmas). copy.deepcopy looks __deepcopy__ up on the instance: copies are made of
        # the scheduler as it was before bcc wrapped it, and are not tracked.
        obj = self.scheduler
        had, previous = "__deepcopy__" in vars(obj), vars(obj).get("__deepcopy__")
        before = dict(self._before)  # the wrapped names, and what the instance held under each

        def deepcopy_unwrapped(memo: dict) -> Any:
            attrs = vars(obj)
            ours = {n: attrs.pop(n) for n in (*before, "__deepcopy__") if n in attrs}
            attrs.update({n: v for n, v in before.items() if v is not _ABSENT})
            if had:
                attrs["__deepcopy__"] = previous
            try:
                return copy.deepcopy(obj, memo)
            finally:
                for n in (*before, "__deepcopy__"):
                    attrs.pop(n, None)
                attrs.update(ours)

        obj.__deepcopy__ = deepcopy_unwrapped
        self._undo.append(lambda: setattr(obj, "__deepcopy__", previous) if had else delattr(obj, "__deepcopy__"))

    def remove(self) -> None:
        """Put the scheduler's methods back (latest wrapper first)."""
        while self._undo:
            self._undo.pop()()
        _TRACKERS.pop(self.scheduler, None)

    def _wrap(self, name: str, after: Callable[..., None]) -> None:
        obj = self.scheduler
        had, previous = name in vars(obj), vars(obj).get(name)
        self._before[name] = previous if had else _ABSENT
        original = getattr(obj, name)

        @functools.wraps(original)  # keeps inspect.signature(scheduler.step) right
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            after(*args, **kwargs)
            return result

        setattr(obj, name, wrapped)
        self._undo.append(lambda: setattr(obj, name, previous) if had else delattr(obj, name))

    def _on_set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        self._start(len(self.scheduler.timesteps))

    def _on_set_begin_index(self, begin_index: int = 0, *args: Any, **kwargs: Any) -> None:
        self.begin = int(begin_index)

    def _on_step(self, *args: Any, **kwargs: Any) -> None:
        self.steps_done += 1
        self.calls_since_step = 0

    def _start(self, num_steps: int) -> None:
        self.generation += 1
        self.num_steps = num_steps
        self.begin = None
        self.steps_done = 0
        self.calls_since_step = 0
        self.ended = False

    # -- state -------------------------------------------------------------------------
    @property
    def live(self) -> bool:
        """A generation is under way: started, not ended, its next step within it."""
        if self.num_steps is None or self.ended:
            return False
        return self.begin is None or self.begin + self.steps_done < self.num_steps

    def end(self) -> None:
        """The generation is over: a denoiser call before the next ``set_timesteps`` is refused."""
        self.ended = True

    def adopt(self, timestep: Any) -> None:
        """Join a generation that started before this tracker wrapped the scheduler (a
        replaced ``pipe.scheduler``): its step is the scheduler's own ``step_index``, else
        its ``begin_index``, else the timestep's position, else 0 for a scheduler that has
        ``set_begin_index`` (the pipeline would have called it for img2img)."""
        sched = self.scheduler
        ts = getattr(sched, "timesteps", None)
        if not isinstance(ts, torch.Tensor) or ts.dim() != 1:
            raise BccError(ErrorCode.STEP_UNTRACKED,
                           f"the pipeline's scheduler ({type(sched).__name__}) was replaced and has no timesteps yet; "
                           "call the pipeline again (its set_timesteps starts a generation bcc can follow).")
        for source in (getattr(sched, "step_index", None), getattr(sched, "begin_index", None),
                       timestep_position(timestep, ts), 0 if self._has_begin else None):
            if isinstance(source, int) and not isinstance(source, bool):
                self._start(len(ts))
                self.begin = source
                return
        raise BccError(ErrorCode.STEP_UNTRACKED,
                       f"the pipeline's scheduler was replaced by a {type(sched).__name__} in the middle of a "
                       "generation, and this scheduler does not say which step it is on. Replace the scheduler "
                       "between generations and call the pipeline again.")

    def place(self, timestep: Any) -> CallPlace:
        """Where the denoiser call with ``timestep`` belongs; counts it as the next stream."""
        name = type(self.scheduler).__name__
        if self.num_steps is None or self.ended:
            raise BccError(
                ErrorCode.STEP_UNTRACKED,
                f"the compiled denoiser was called outside a generation of its pipeline's {name} (no "
                f"set_timesteps since {'the last one ended' if self.ended else 'bcc.compile'}): it is driven by a "
                "scheduler bcc did not wrap (from_pipe(..., scheduler=...) or a hand-written loop). Compile that "
                "pipeline too (bcc.compile(other_pipe, plan) shares the denoiser), or use "
                "`with pipe.unet.trajectory(steps=T):` around a hand-written loop.")
        ts = self.scheduler.timesteps
        position = timestep_position(timestep, ts)
        if position is None and _views_another_tensor(timestep):
            raise BccError(
                ErrorCode.STEP_UNTRACKED,
                f"the timestep is a view of another tensor than {name}.timesteps: the denoiser is driven by a "
                "scheduler bcc did not wrap (from_pipe(..., scheduler=...)?). Compile that pipeline too "
                "(bcc.compile(other_pipe, plan)).")
        if self.begin is None:
            if position is not None:
                self.begin = position - self.steps_done
            elif self._has_begin:
                self.begin = 0  # the pipeline calls set_begin_index whenever it does not start at 0
            else:
                raise BccError(
                    ErrorCode.STEP_UNTRACKED,
                    f"{name} has no set_begin_index and the timestep the pipeline passed is not a view of "
                    f"{name}.timesteps, so where this generation starts cannot be told without reading values. "
                    "Pass the loop's timestep as is, or use a scheduler with set_begin_index.")
        step = self.begin + self.steps_done
        if step >= self.num_steps:
            raise BccError(
                ErrorCode.STEP_UNTRACKED,
                f"denoiser call at step {step} of a {self.num_steps}-step generation of {name}: more steps than "
                "the scheduler has timesteps. The denoiser is driven by a scheduler bcc did not wrap "
                "(from_pipe(..., scheduler=...)?); compile that pipeline too.")
        if position is not None and position != step:
            raise BccError(
                ErrorCode.STEP_UNTRACKED,
                f"the pipeline passed the timestep at position {position} of {name}.timesteps but step() was "
                f"called for {self.steps_done} steps from {self.begin}, i.e. step {step}: the scheduler and the "
                "denoiser calls disagree (a scheduler shared by two pipelines running at once, or a pipeline that "
                "steps copies of its scheduler instead of it?).")
        stream = self.calls_since_step
        self.calls_since_step += 1
        return CallPlace(step, self.num_steps, stream, self.generation)


def tracker_for(scheduler: Any) -> tuple[GenerationTracker, bool]:
    """The tracker of ``scheduler``, wrapping it on first use; and whether it was new."""
    tracker = _TRACKERS.get(scheduler)
    if tracker is not None:
        return tracker, False
    for name in ("set_timesteps", "step"):
        if not callable(getattr(scheduler, name, None)):
            raise BccError(ErrorCode.CONFIG_INVALID,
                           f"the pipeline's scheduler ({type(scheduler).__name__}) has no {name}(); bcc follows a "
                           "diffusers scheduler's set_timesteps/step to know each denoiser call's step.")
    tracker = GenerationTracker(scheduler)
    tracker.install()
    _TRACKERS[scheduler] = tracker
    return tracker, True


#: Pipeline attributes that hold a denoiser (Wan 2.2's low-noise expert is ``transformer_2``).
DENOISER_ATTRS = ("unet", "transformer", "transformer_2")


def is_pipeline(obj: Any) -> bool:
    """Whether ``obj`` is a diffusers ``DiffusionPipeline`` (diffusers is imported only if installed).

    Example:
        >>> is_pipeline(torch.nn.Linear(2, 2))
        False
    """
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # without diffusers nothing is a pipeline
        return False
    return isinstance(obj, DiffusionPipeline)


def pipeline_denoisers(pipe: Any) -> list[str]:
    """The attributes of ``pipe`` in :data:`DENOISER_ATTRS` that hold a module, in that order."""
    return [a for a in DENOISER_ATTRS if isinstance(getattr(pipe, a, None), torch.nn.Module)]
