"""What the ``bcc`` subcommands share: option parsing and the trajectories they run.

Its own module so that ``bcc.tools.cli`` (the parser) and the subcommands defined
beside it (``bcc.tools.cli_train``) both import it and never each other.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from bcc.errors import BccError, ErrorCode

__all__ = ["DIGITS_MODELS", "CalibrationSetup", "ProcessGroup", "add_sampling_args", "calibration_setup",
           "parse_int_list", "process_group"]

DIGITS_MODELS = ("digits-unet", "digits-dit")


def parse_int_list(text: str, what: str) -> list[int]:
    """Parse ``"0-9"``, ``"1,3,7"`` or ``"0-2,5"`` into a list of distinct ints, in order.

    Example:
        >>> parse_int_list("0-2,5", "--classes")
        [0, 1, 2, 5]
        >>> parse_int_list(" ", "--classes")
        Traceback (most recent call last):
        ...
        bcc.errors.BccError: [BCC001] --classes is empty; give a list like 0-9 or 1,3,7.
    """
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise BccError(ErrorCode.CONFIG_INVALID, f"{what} has {part!r}, not an integer or a range like 0-9.") from None
        if b < a:
            raise BccError(ErrorCode.CONFIG_INVALID, f"{what} has the empty range {part!r}; write it low-high.")
        out.extend(v for v in range(a, b + 1) if v not in out)
    if not out:
        raise BccError(ErrorCode.CONFIG_INVALID, f"{what} is empty; give a list like 0-9 or 1,3,7.")
    return out


def add_sampling_args(c: argparse.ArgumentParser) -> None:
    """The model and sampler options shared by the commands that run trajectories.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_sampling_args(parser)
        >>> args = parser.parse_args(["--model", "zoo:unet-tiny"])
        >>> args.steps, args.latent, args.classes
        (20, 8, None)
    """
    c.add_argument("--model", required=True, metavar="NAME", help="digits-unet, digits-dit, or zoo:<name> (e.g. zoo:unet-tiny)")
    c.add_argument("--model-dir", metavar="DIR", help="digits model folder (default: the shipped one)")
    c.add_argument("--scheduler", choices=("ddim", "dpm", "ddpm"), help="digits sampler (default ddim)")
    c.add_argument("--steps", type=int, metavar="T", default=20, help="sampling steps (default 20)")
    c.add_argument("--guidance", type=float, metavar="W", help="classifier-free guidance scale for digits (default 3.0; 1 = off)")
    c.add_argument("--classes", metavar="LIST", help="digit labels, e.g. 0-9 (default) or 1,3,7")
    c.add_argument("--per-class", type=int, metavar="N", help="images per run (batch of one label; default 4)")
    c.add_argument("--latent", type=int, metavar="N", default=8, help="zoo models: latent size (default 8)")
    c.add_argument("--batch", type=int, metavar="N", default=2, help="zoo models: batch size (default 2)")
    c.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's)")
    c.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")


# -- trajectories ----------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationSetup:
    """What the trajectory commands (``bcc calibrate``, ``bcc train``) run, from their options.

    Attributes:
        model: the denoiser.
        sample: ``sample(model, condition, seed)`` runs one trajectory.
        conditions: one entry per run group (digit labels, or the zoo model's name).
        seeds: seeds per condition.
        scheduler: the sampler's scheduler (None for zoo models).
        guidance_scale: classifier-free guidance scale (None for zoo models).
        meta: the options as provenance for the profile (``extra["cli"]``), read-only.
    """

    model: Any
    sample: Callable[[Any, Any, int], Any]
    conditions: list
    seeds: list[int]
    scheduler: Any
    guidance_scale: float | None
    meta: Mapping[str, Any]

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", types.MappingProxyType(dict(self.meta)))


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a torchrun job (``world_size`` 1 and ``rank`` 0 without one)."""

    world_size: int
    rank: int


def calibration_setup(args: argparse.Namespace) -> CalibrationSetup:
    """Validate the sampling options (see :func:`add_sampling_args`, plus ``seeds``) and load the model.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_sampling_args(parser)
        >>> setup = calibration_setup(parser.parse_args(["--model", "zoo:unet-tiny", "--steps", "3"],
        ...                                             argparse.Namespace(seeds="0,1")))
        >>> setup.conditions, setup.seeds, setup.meta["latent"], setup.guidance_scale
        (['unet-tiny'], [0, 1], 8, None)
    """
    if args.steps < 2:
        raise BccError(ErrorCode.CALIBRATION_INVALID,
                       f"--steps must be >= 2 (change is measured between consecutive steps), got {args.steps}.")
    seeds = parse_int_list(args.seeds, "--seeds")
    meta: dict[str, Any] = {"model": args.model, "steps": args.steps, "seeds": seeds}
    if args.model.startswith("zoo:"):
        from bcc.tools import zoo

        name = args.model[4:]
        if name not in zoo.MODELS:
            raise BccError(ErrorCode.CONFIG_INVALID, f"unknown zoo model {name!r}; choose from {sorted(zoo.MODELS)}.")
        for flag in ("classes", "per_class", "guidance", "scheduler", "model_dir"):
            if getattr(args, flag) is not None:
                raise BccError(ErrorCode.CONFIG_INVALID,
                               f"--{flag.replace('_', '-')} applies to the digits models only, not {args.model}.")
        if args.latent < 1 or args.batch < 1:
            raise BccError(ErrorCode.CONFIG_INVALID, "--latent and --batch must be >= 1.")
        model, _, _ = zoo.build(name, latent=args.latent, batch=args.batch, seed=0)
        spec = zoo.spec_of(model)

        def sample(m, condition, seed):  # a synthetic trajectory: fresh inputs per step
            for step in range(args.steps):
                a, k = spec.step_inputs(m, step=step, seed=seed, num_steps=args.steps)
                m(*a, **k)

        meta.update(latent=spec.latent, batch=spec.batch)
        return CalibrationSetup(model, sample, [name], seeds, None, None, meta)
    if args.model not in DIGITS_MODELS:
        raise BccError(ErrorCode.CONFIG_INVALID,
                       f"unknown --model {args.model!r}; use {' or '.join(DIGITS_MODELS)}, or zoo:<name>.")
    classes = parse_int_list("0-9" if args.classes is None else args.classes, "--classes")
    if any(not 0 <= c <= 9 for c in classes):
        raise BccError(ErrorCode.CONFIG_INVALID, f"--classes must lie in 0-9, got {classes}.")
    per_class = 4 if args.per_class is None else args.per_class
    guidance = 3.0 if args.guidance is None else args.guidance
    if per_class < 1:
        raise BccError(ErrorCode.CONFIG_INVALID, f"--per-class must be >= 1, got {per_class}.")
    if not math.isfinite(guidance) or guidance < 0:
        raise BccError(ErrorCode.CONFIG_INVALID, f"--guidance must be a finite number >= 0, got {guidance}.")
    from bcc.tools import digits

    loader = digits.load_digits_unet if args.model == "digits-unet" else digits.load_digits_dit
    model, conditioner, train_scheduler = loader(args.model_dir)
    scheduler = digits.make_scheduler(args.scheduler or "ddim", train_scheduler)

    grad = getattr(args, "loss", None) == "final"  # 'bcc train --loss final' back-propagates through it

    def sample(m, label, seed):  # guided sampling of per_class images of one label
        return digits.sample(m, conditioner, scheduler, [label] * per_class, num_steps=args.steps,
                             guidance_scale=guidance, seed=seed, grad=grad)

    meta.update(classes=classes, per_class=per_class, scheduler_kind=args.scheduler or "ddim")
    return CalibrationSetup(model, sample, classes, seeds, scheduler, guidance, meta)


@contextlib.contextmanager
def process_group() -> Iterator[ProcessGroup]:
    """Under torchrun (WORLD_SIZE > 1) join a gloo group for the block; yields where this process stands.

    Example:
        >>> with process_group() as group:  # not under torchrun
        ...     group
        ProcessGroup(world_size=1, rank=0)
    """
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = torch.distributed
    created = world > 1 and not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    try:
        yield ProcessGroup(world, dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)
    finally:
        if created:
            dist.destroy_process_group()
