"""runtime: ``bcc.compile(pipe, ...)`` — a diffusers pipeline's denoisers, stepped by its scheduler.

Replacing ``pipe.unet`` by a compiled model that counts its calls is silently wrong in
real pipelines: another ``num_inference_steps``, img2img (``strength < 1``), an
interrupt or an exception in a callback leave the counter mid-trajectory, and true
CFG, Wan's guidance or SD3's skip-layer guidance call the denoiser twice per step. So
the pipeline is the unit: :func:`compile_pipeline` compiles each denoiser it holds
(``unet``, ``transformer``, and Wan 2.2's ``transformer_2``) and gives it a
:class:`PipelineLocator`, which places every call with the pipeline's scheduler
(:mod:`bcc.capture.scheduler`: ``set_timesteps`` starts a generation, the step is the
begin index plus the ``step()`` calls since, the k-th call since the last ``step()`` is
stream k), on the host, reading no tensor value.

* Pipelines made with ``from_pipe`` share the denoiser and the scheduler, so they share
  the generation state: txt2img and img2img interleave freely.
* A replaced ``pipe.scheduler`` is wrapped at its first denoiser call (it joins the
  generation under way from its own ``step_index`` / ``begin_index``).
* A denoiser driven by a scheduler bcc did not wrap (``from_pipe(pipe, scheduler=other)``,
  a hand-written loop) is ``BCC404`` where it can be told: a call outside a generation,
  past its last step, or with a timestep that is a view of another scheduler's
  timesteps. Compile that pipeline too (``bcc.compile(other, plan)`` attaches it to the
  same compiled denoiser).
"""
from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from typing import Any, Callable

from bcc.capture.scheduler import GenerationTracker, pipeline_denoisers, timestep_position, tracker_for
from bcc.capture.timestep import timestep_finder
from bcc.errors import BccError, BccWarning, ErrorCode
from bcc.runtime.module import BccModule
from bcc.lower.stepper import Located, StepRef

__all__ = ["PipelineLocator", "compile_pipeline"]

# Streams in one step beyond what guidance makes (cond, uncond, a skip-layer call): the
# pipeline is stepping a scheduler bcc does not follow.
_MANY_STREAMS = 4


class PipelineLocator:
    """Places a compiled denoiser's calls with the schedulers of the pipelines it serves.

    Set on a :class:`BccModule` as ``bcc_locator`` by :func:`compile_pipeline`; one per
    denoiser. ``check=True`` also compares each step with the scheduler's own
    ``step_index`` where it has one (a host int).

    Args:
        forward: the denoiser's ``forward`` (its signature says which argument is the timestep).
        check: the consistency check above.
    """

    def __init__(self, forward: Callable, check: bool = False):
        self._pipes: list[weakref.ref] = []
        self._find_timestep = timestep_finder(forward)
        self._check = check
        self._last: GenerationTracker | None = None
        self._warned: tuple | None = None  # the generation warned about many streams

    def attach(self, pipe: Any) -> None:
        """Serve ``pipe`` too (its scheduler is wrapped now)."""
        if not any(ref() is pipe for ref in self._pipes):
            self._pipes.append(weakref.ref(pipe))
        tracker_for(pipe.scheduler)

    def _trackers(self, timestep: Any) -> list[GenerationTracker]:
        trackers: list[GenerationTracker] = []
        for ref in self._pipes:
            pipe = ref()
            if pipe is None:
                continue
            tracker, new = tracker_for(pipe.scheduler)
            if new:  # pipe.scheduler was replaced since: join the generation it is running
                tracker.adopt(timestep)
            if tracker not in trackers:
                trackers.append(tracker)
        if not trackers:
            raise BccError(ErrorCode.STEP_UNTRACKED,
                           "the pipelines this denoiser was compiled with no longer exist, so nothing says which "
                           "step a call is. Compile the pipeline that calls it: bcc.compile(pipe, plan).")
        return trackers

    def locate(self, args: tuple, kwargs: dict) -> Located:
        """Where the call ``denoiser(*args, **kwargs)`` belongs; counts it as its step's next stream."""
        found = self._find_timestep(args, kwargs)
        timestep = None if found is None else found.value
        trackers = self._trackers(timestep)
        live = [t for t in trackers if t.live]
        if len(live) > 1:
            viewed = [t for t in live if timestep_position(timestep, t.scheduler.timesteps) is not None]
            if len(viewed) != 1:
                raise BccError(
                    ErrorCode.STEP_UNTRACKED,
                    f"{len(live)} pipelines sharing this denoiser have a generation under way on different "
                    "schedulers, and the timestep does not say which one this call belongs to. Run one "
                    "generation at a time per compiled denoiser (or compile one per pipeline).")
            live = viewed
        tracker = live[0] if live else (self._last if self._last in trackers else trackers[0])
        place = tracker.place(timestep)  # outside a generation: BCC404, with what to do
        if self._check:
            index = getattr(tracker.scheduler, "step_index", None)
            if isinstance(index, int) and not isinstance(index, bool) and index != place.step:
                raise BccError(
                    ErrorCode.STEP_MISMATCH,
                    f"bcc placed this call at step {place.step} of {place.num_steps}, but "
                    f"{type(tracker.scheduler).__name__}.step_index is {index}: the scheduler is stepped by "
                    "something bcc does not see. Please report the pipeline; meanwhile compile the denoiser "
                    "alone and call bcc_call_at.")
        self._last = tracker
        if place.stream == _MANY_STREAMS and (tracker, place.generation) != self._warned:
            self._warned = (tracker, place.generation)
            warnings.warn(
                f"{type(tracker.scheduler).__name__}.step() was not called for {_MANY_STREAMS + 1} denoiser calls in "
                "a row, so bcc counts each as a stream of one step: its first call, which computes every block "
                "and keeps caches of its own. This generation runs uncached, with cache memory growing per call. "
                "The pipeline steps another scheduler (SkyReels-V2's diffusion forcing steps a copy per frame); "
                "compile its denoiser alone and give each call its step with bcc_call_at(bcc.StepRef(...)).",
                BccWarning, stacklevel=4)
        ref = StepRef(step=place.step, num_steps=place.num_steps, stream=place.stream)
        return Located(ref, (tracker, place.generation))

    def end(self) -> None:
        """The pipeline finished its generation (diffusers' ``maybe_free_model_hooks``)."""
        if self._last is not None:
            self._last.end()


def _check_measured_on(schedule: Any, attr: str, pipe: Any) -> None:
    # Wan 2.2's experts share one config, so the fingerprint cannot tell their profiles
    # apart; the attribute calibrate recorded can. A swapped plan would give right images
    # (an expert's first call computes everything) at the wrong cost, said nowhere.
    measured = {p.extra.get("denoiser") for p in getattr(schedule, "profiles", ())} - {None}
    if measured and measured != {attr}:
        raise BccError(ErrorCode.CONFIG_INVALID,
                       f"the plan for {type(pipe).__name__}.{attr} was calibrated on pipe.{sorted(measured)[0]}; "
                       f"pass the plan calibrated with denoiser={attr!r} (bcc.calibrate(pipe, ..., denoiser={attr!r})).")


def compile_pipeline(pipe: Any, schedule: Any, compile_model: Callable[[Any, Any], BccModule]) -> Any:
    """Compile every denoiser of ``pipe`` with ``compile_model(denoiser, schedule)`` and
    drive it with ``pipe``'s scheduler; returns ``pipe`` (the same object). What
    ``bcc.compile(pipe, schedule_or_plan, **options)`` does.

    Args:
        pipe: a diffusers ``DiffusionPipeline``.
        schedule: a :class:`bcc.Plan` (any step count), a :class:`bcc.Schedule` (exactly its
            step count: ``len(scheduler.timesteps)``), a schedule function, or a mapping
            from denoiser attribute (``"transformer"``, ``"transformer_2"``) to one of those.
        compile_model: builds one compiled denoiser.

    A denoiser already compiled by bcc (a pipeline made with ``from_pipe`` from a
    compiled one) is kept and also serves ``pipe``, provided ``schedule`` is the one it
    follows.

    Example:
        >>> import torch
        >>> from diffusers import DDIMScheduler, DiffusionPipeline
        >>> from bcc import BccConfig, Schedule
        >>> class Pipe(DiffusionPipeline):
        ...     def __init__(self, unet, scheduler):
        ...         super().__init__()
        ...         self.register_modules(unet=unet, scheduler=scheduler)
        ...     def __call__(self, steps):
        ...         self.scheduler.set_timesteps(steps)
        ...         x = torch.ones(1, 2)
        ...         for t in self.scheduler.timesteps:
        ...             x = self.scheduler.step(self.unet(x, t), t, x).prev_sample
        ...         return x
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.block = torch.nn.Linear(2, 2)
        ...     def forward(self, x, timestep):
        ...         return self.block(x)
        >>> pipe = Pipe(Net(), DDIMScheduler())
        >>> same = compile_pipeline(pipe, Schedule.every(2, 3, ["block"]),
        ...                         lambda m, s: BccModule(m, s, BccConfig(backend="eager")))
        >>> _ = pipe(3); same is pipe, type(pipe.unet).__name__, pipe.unet.bcc_stats()["cache_bytes"]
        (True, 'BccModule', 8)
        >>> pipe(4)  # a 3-step Schedule serves 3-step generations only
        Traceback (most recent call last):
        ...
        bcc.errors.BccError: [BCC101] this model follows a fixed 3-step Schedule, but the call belongs to a 4-step generation: ...
    """
    attrs = pipeline_denoisers(pipe)
    if not attrs:
        raise BccError(ErrorCode.CONFIG_INVALID,
                       f"{type(pipe).__name__} has no unet, transformer or transformer_2 module to compile; pass the "
                       "denoiser itself to bcc.compile(model, schedule).")
    if isinstance(schedule, Mapping):
        unknown = sorted(set(schedule) - set(attrs))
        missing = [a for a in attrs if a not in schedule]
        if unknown or missing:
            raise BccError(ErrorCode.CONFIG_INVALID,
                           f"a mapping of schedules needs one entry per denoiser of {type(pipe).__name__} {attrs}; "
                           f"unknown {unknown}, missing {missing}.")
    tracker_for(pipe.scheduler)  # fails early for a scheduler without set_timesteps/step
    for attr in attrs:
        denoiser = getattr(pipe, attr)
        wanted = schedule[attr] if isinstance(schedule, Mapping) else schedule
        _check_measured_on(wanted, attr, pipe)
        if isinstance(denoiser, BccModule):
            if wanted is not denoiser.bcc_plan and wanted is not denoiser.bcc_schedule:
                raise BccError(ErrorCode.CONFIG_INVALID,
                               f"{type(pipe).__name__}.{attr} is already compiled by bcc with another schedule. Pass "
                               "the same plan to serve this pipeline too, or compile the original model again "
                               f"(pipe.{attr} = pipe.{attr}._orig_mod).")
            if denoiser.bcc_locator is None:
                denoiser.bcc_locator = PipelineLocator(denoiser._orig_mod.forward, denoiser.bcc_config.check)
            denoiser.bcc_locator.attach(pipe)
            continue
        compiled = compile_model(denoiser, wanted)
        locator = PipelineLocator(denoiser.forward, compiled.bcc_config.check)
        locator.attach(pipe)
        compiled.bcc_locator = locator
        setattr(pipe, attr, compiled)
    return pipe
