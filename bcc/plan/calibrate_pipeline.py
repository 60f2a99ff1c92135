"""plan: ``bcc.calibrate(pipe, prompts, ...)`` — change profiles measured in a real pipeline.

:func:`bcc.plan.calibrate.calibrate` counts one model call as one step. A pipeline
may call its denoiser twice per step (Flux true CFG, Wan guidance, SD3 skip-layer
guidance), and then consecutive calls belong to different streams whose values must
not be compared. :func:`calibrate_pipeline` keeps the step identity bcc compiles with
(:mod:`bcc.capture.scheduler`: the scheduler's steps, the k-th call of a step is
stream k) and measures each stream apart, on calibrate's public API: for stream k,
calls of stream k go to a twin of the denoiser (new module objects sharing every
parameter and buffer, so no weights are copied) that ``calibrate`` hooks, and the
other streams' calls go to the denoiser itself. The runs are repeated once per stream.

:func:`calibrate` is what ``bcc.calibrate`` exports: a pipeline goes here, a denoiser
to :func:`bcc.plan.calibrate.calibrate`.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any, Sequence

import torch

from bcc.analyze.blocks import ATTENTION, BlockSelector
from bcc.capture.scheduler import is_pipeline, pipeline_denoisers, tracker_for
from bcc.capture.timestep import timestep_finder
from bcc.errors import BccError, ErrorCode
from bcc.plan.calibrate import calibrate as calibrate_model
from bcc.plan.profile import ChangeProfile

__all__ = ["calibrate", "calibrate_pipeline"]


def calibrate(model: Any, *args: Any, **kwargs: Any) -> ChangeProfile:
    """``bcc.calibrate``: :func:`calibrate_pipeline` for a diffusers pipeline, else
    :func:`bcc.plan.calibrate.calibrate` (``calibrate(model, sample, conditions, seeds, ...)``).

    Example:
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.block = torch.nn.Linear(2, 2)
        ...     def forward(self, x, t):
        ...         return x + self.block(x) * t
        >>> def sample(model, cond, seed):
        ...     x = torch.full((1, 2), float(cond + seed))
        ...     for t in (3.0, 2.0, 1.0):
        ...         x = model(x, torch.tensor(t))
        >>> calibrate(Net(), sample, [1, 2], seeds=[0], blocks=["block"], progress=False).num_steps
        3
    """
    if is_pipeline(model):
        return calibrate_pipeline(model, *args, **kwargs)
    return calibrate_model(model, *args, **kwargs)


class _Router(torch.nn.Module):
    """Stands in for the pipeline's denoiser during calibration: sends stream ``k``'s calls
    to ``targets[k]`` (a hooked twin) and every other call to the denoiser itself."""

    def __init__(self, denoiser: torch.nn.Module, pipe: Any):
        super().__init__()
        self.denoiser = denoiser
        self.targets: dict[int, torch.nn.Module] = {}
        self._pipe = pipe
        self._find = timestep_finder(denoiser.forward)
        self.seen: dict[int, set[tuple[int, int]]] = {}  # generation -> (step, stream) of its calls
        self.num_steps: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:  # config, dtype, ... come from the denoiser
        try:
            return torch.nn.Module.__getattr__(self, name)
        except AttributeError:
            return getattr(self._modules["denoiser"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        tracker, new = tracker_for(self._pipe.scheduler)
        found = self._find(args, kwargs)
        timestep = None if found is None else found.value
        if new:  # pipe.scheduler was replaced: join the generation it is running
            tracker.adopt(timestep)
        place = tracker.place(timestep)
        self.seen.setdefault(place.generation, set()).add((place.step, place.stream))
        self.num_steps[place.generation] = place.num_steps
        return self.targets.get(place.stream, self.denoiser)(*args, **kwargs)

    def coverage(self) -> tuple[tuple[int, int], list[int], int]:
        """In the last generation seen (a complete run of calibrate's): the steps
        ``(start, stop)`` this denoiser ran at, the streams that ran at every one of them,
        and the generation's step count."""
        generation = max(self.seen)
        calls, steps = self.seen[generation], self.num_steps[generation]
        ran = sorted({s for s, _ in calls})
        start, stop = ran[0], ran[-1] + 1
        if ran != list(range(start, stop)):
            raise BccError(ErrorCode.CALIBRATION_INVALID,
                           f"the denoiser ran at steps {ran} of {steps}, with gaps; bcc calibrates a denoiser over "
                           "one run of consecutive steps (an expert's share of the trajectory).")
        streams = {k for _, k in calls}
        return (start, stop), sorted(k for k in streams if all((s, k) in calls for s in range(start, stop))), steps


def _twin(model: torch.nn.Module) -> torch.nn.Module:
    # New module objects (calibrate patches the twin's block forwards and hooks it),
    # the same parameter and buffer tensors: no weights are copied.
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _mean(profiles: Sequence[ChangeProfile], streams: Sequence[int]) -> ChangeProfile:
    if len(profiles) == 1:
        return profiles[0].with_extra(streams=list(streams))
    first = profiles[0]
    l1 = torch.stack([p.l1_rel for p in profiles]).mean(0)
    second = torch.stack([p.l1_rel ** 2 + (p.l1_std if p.l1_std is not None else 0.0) ** 2 for p in profiles]).mean(0)
    std = (second - l1 ** 2).clamp_min(0).sqrt()  # the pooled spread over every stream's runs
    return ChangeProfile(
        l1_rel=l1, block_names=first.block_names, l1_std=std, block_flops=first.block_flops,
        rest_flops=first.rest_flops, fingerprint=first.fingerprint,
        scheduler=None if first.scheduler is None else dict(first.scheduler), guidance_scale=first.guidance_scale,
        num_runs=first.num_runs, mode=first.mode, timesteps=first.timesteps,
        extra={**first.extra, "streams": list(streams),
               "per_stream_l1_rel": [p.l1_rel.tolist() for p in profiles]}, active_steps=first.active_steps)


def _placed(profile: ChangeProfile, active: tuple[int, int], num_steps: int, timesteps: Any,
            denoiser: str) -> ChangeProfile:
    """``profile`` (one row per call of the measured stream) as rows of the generation's
    ``num_steps`` steps: the denoiser's calls are steps ``start <= s < stop``."""
    start, stop = active
    if profile.num_steps != stop - start:
        raise BccError(ErrorCode.CALIBRATION_INVALID,
                       f"the measured stream made {profile.num_steps} calls per generation but ran at {stop - start} "
                       "steps; a stream that runs at only some steps cannot be calibrated.")
    l1 = torch.zeros(num_steps, profile.num_blocks, dtype=torch.float64)
    l1[start:stop] = profile.l1_rel
    std = None
    if profile.l1_std is not None:
        std = torch.zeros_like(l1)
        std[start:stop] = profile.l1_std
    ts = [float(t) for t in timesteps] if timesteps is not None and len(timesteps) == num_steps else None
    return dataclasses.replace(profile, l1_rel=l1, l1_std=std, timesteps=ts,
                               active_steps=None if active == (0, num_steps) else active,
                               extra={**profile.extra, "denoiser": denoiser})


def calibrate_pipeline(
    pipe: Any,
    prompts: Sequence[Any],
    seeds: Sequence[int] = (0, 1),
    *,
    num_inference_steps: int,
    guidance_scale: float | None = None,
    denoiser: str | None = None,
    blocks: BlockSelector | Sequence[str] = ATTENTION,
    mode: str = "residual",
    progress: bool = True,
    **pipe_kwargs: Any,
) -> ChangeProfile:
    """Measure per-block change in real generations of ``pipe``, with caching off.

    Each prompt runs with each seed (``generator=torch.Generator().manual_seed(seed)``,
    ``output_type="latent"``) at ``num_inference_steps``; the profile has one row per
    scheduler step (``len(scheduler.timesteps)``: Heun makes ``2N - 1``), which is what
    ``bcc.compile(pipe, bcc.Plan(profile, ...))`` schedules. Pass it to a
    :class:`bcc.Plan` to serve other step counts too.

    **Two calls per step** (true CFG, Wan guidance): each stream's change is measured
    against that stream's own previous step, never against the other stream's call, and
    the profile is their **mean**, one curve per block (the per-stream curves are kept in
    ``extra["per_stream_l1_rel"]``). One mean, not a profile per stream, because every
    stream follows the same schedule row (one compiled schedule per step count; the
    cond and uncond calls of a step are reused together, so their guided difference
    stays consistent), so the row has to fit both. Streams that run only at some steps
    (SD3's skip-layer call) are not measured; they follow the same rows and recompute at
    their first call. FLOP counts are per call of stream 0 (true-CFG streams cost the
    same, so the compute fraction is the same).

    **Several denoisers** (Wan 2.2's high- and low-noise experts switch at a boundary
    timestep): each is calibrated on its own, ``denoiser="transformer"`` then
    ``denoiser="transformer_2"``, and compiled with a mapping of plans, one per expert.
    A profile covers the steps its denoiser runs at, ``active_steps``; its first step
    there has no previous one (row 0 of change), and plans count the compute fraction
    over those steps only. A generation that starts later (``strength < 1``) is
    calibrated the same way: the profile covers the steps it ran.

    Args:
        pipe: a diffusers pipeline (not yet compiled by bcc).
        prompts: the prompts (the paper: 32); each runs with each seed.
        seeds: generator seeds per prompt (the paper: 2).
        num_inference_steps, guidance_scale: passed to the pipeline (and recorded;
            ``guidance_scale=None`` keeps the pipeline's default).
        denoiser: which attribute to calibrate (default: the pipeline's only one; with
            several, required).
        blocks, mode, progress: as in :func:`bcc.plan.calibrate.calibrate`.
        pipe_kwargs: more pipeline arguments (``negative_prompt``, ``true_cfg_scale``,
            ``height``, ...).

    Returns:
        A :class:`ChangeProfile` (``extra["streams"]``: the streams measured;
        ``extra["denoiser"]``: the attribute; ``active_steps`` where it ran at only some steps).

    Example:
        >>> from diffusers import DDIMScheduler, DiffusionPipeline
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.block = torch.nn.Linear(2, 2)
        ...     def forward(self, x, t):
        ...         return x + self.block(x)
        >>> class Pipe(DiffusionPipeline):  # two denoiser calls per step, like true CFG
        ...     def __init__(self, unet, scheduler):
        ...         super().__init__()
        ...         self.register_modules(unet=unet, scheduler=scheduler)
        ...     def __call__(self, prompt, num_inference_steps, generator=None, output_type=None):
        ...         self.scheduler.set_timesteps(num_inference_steps)
        ...         x = torch.randn(1, 2, generator=generator) * len(prompt)
        ...         for t in self.scheduler.timesteps:
        ...             eps = 2 * self.unet(x, t) - self.unet(-x, t)
        ...             x = self.scheduler.step(eps, t, x).prev_sample
        >>> p = calibrate_pipeline(Pipe(Net(), DDIMScheduler()), ["a", "bb"], seeds=[0], num_inference_steps=4,
        ...                        blocks=["block"], progress=False)
        >>> p.num_steps, p.extra["streams"], p.num_runs
        (4, (0, 1), 2)
    """
    if not is_pipeline(pipe):
        raise BccError(ErrorCode.CALIBRATION_INVALID,
                       f"calibrate_pipeline needs a diffusers pipeline, got {type(pipe).__name__}; for a denoiser use "
                       "bcc.calibrate(model, sample, conditions, seeds).")
    attrs = pipeline_denoisers(pipe)
    if denoiser is None:
        if len(attrs) != 1:
            raise BccError(ErrorCode.CALIBRATION_INVALID,
                           f"{type(pipe).__name__} has {len(attrs)} denoisers {attrs}; calibrate each with denoiser=... "
                           "(each profile covers the steps that denoiser runs at) and compile with one Plan per "
                           "denoiser: bcc.compile(pipe, {name: bcc.Plan(profile, budget=...) for name, profile in "
                           "profiles.items()}).")
        denoiser = attrs[0]
    if denoiser not in attrs:
        raise BccError(ErrorCode.CALIBRATION_INVALID, f"{type(pipe).__name__} has no denoiser {denoiser!r}; it has {attrs}.")
    original = getattr(pipe, denoiser)
    if hasattr(original, "bcc_stepper"):
        raise BccError(ErrorCode.CALIBRATION_INVALID,
                       f"pipe.{denoiser} is compiled by bcc; calibrate the pipeline before compiling it (caching "
                       "must be off while change is measured).")
    extra = dict(pipe_kwargs)
    if guidance_scale is not None:
        extra["guidance_scale"] = guidance_scale
    tracker_for(pipe.scheduler)  # wrapped before the first generation starts
    router = _Router(original, pipe)

    def sample(model: torch.nn.Module, prompt: Any, seed: int) -> None:
        with torch.no_grad():
            pipe(prompt=prompt, num_inference_steps=num_inference_steps,
                 generator=torch.Generator().manual_seed(int(seed)), output_type="latent", **extra)

    setattr(pipe, denoiser, router)
    try:
        profiles, streams = [], [0]
        k = 0
        while k < len(streams):
            twin = _twin(original)
            router.targets = {streams[k]: twin}
            profiles.append(calibrate_model(twin, sample, list(prompts), seeds, blocks=blocks, mode=mode,
                                            scheduler=pipe.scheduler, guidance_scale=guidance_scale,
                                            progress=progress))
            active, covered, num_steps = router.coverage()
            if k == 0:
                streams = covered
            profiles[-1] = _placed(profiles[-1], active, num_steps, getattr(pipe.scheduler, "timesteps", None),
                                   denoiser)
            k += 1
    finally:
        setattr(pipe, denoiser, original)
    return _mean(profiles, streams)
