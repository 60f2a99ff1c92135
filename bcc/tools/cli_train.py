"""``bcc train``: learn scale-shift corrections for a schedule (see :mod:`bcc.scale_shift.train`)."""
from __future__ import annotations

import argparse
import sys

import bcc
from bcc import BccError, ErrorCode
from bcc.tools.cli_common import add_sampling_args, calibration_setup, process_group

__all__ = ["add_train_parser"]


def add_train_parser(sub, common: argparse.ArgumentParser) -> None:
    """Add ``bcc train`` to the ``bcc`` parser's subcommands (``common``: the shared ``--debug``)."""
    t = sub.add_parser(
        "train", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train scale-shift corrections for a schedule (distillation)",
        description="Learn the per-block, per-channel, timestep-dependent scale and shift that\n"
        "correct reused values (paper §3.3). The model's weights stay frozen; the cached\n"
        "model unrolls trajectories from noise and, at every step, is pulled towards the\n"
        "uncached model run on the same latent. Needs only class labels, no images.\n"
        "Under torchrun each process runs its own seeds and gradients are averaged.",
        epilog="example:\n  bcc train --model digits-unet --schedule schedule.json --iterations 150 "
        "--out scale_shift.safetensors")
    add_sampling_args(t)
    t.add_argument("--schedule", required=True, metavar="FILE", help="schedule JSON from 'bcc schedule'")
    t.add_argument("--iterations", type=int, default=150, metavar="N", help="trajectories per process (default 150)")
    t.add_argument("--kind", choices=("table", "linear"), default="table",
                   help="per-step table (default) or a linear layer on the timestep embedding")
    t.add_argument("--loss", choices=("output", "block", "final"), default="output",
                   help="match the model output at each step (default), each reused block's value, or the "
                        "final sample (back-propagated through the whole trajectory)")
    t.add_argument("--groups", type=int, choices=(1, 2), default=1,
                   help="2: a correction per guidance half [uncond; cond] (default 1: shared)")
    t.add_argument("--guided-loss", action="store_true",
                   help="compare guided predictions u + w (c - u) (w = --guidance) instead of raw outputs")
    t.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (default 5e-3; use about 1e-3 for 50-step trajectories)")
    t.add_argument("--mode", choices=("residual", "output"), default="residual", help="cache mode you compile with")
    t.add_argument("--seed", type=int, default=0, help="first noise seed (default 0)")
    t.add_argument("--checkpoint-every", type=int, default=10, metavar="N", help="write --out every N iterations")
    t.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    t.add_argument("--out", required=True, metavar="FILE", help=".safetensors file to write")
    t.set_defaults(func=_cmd_train, seeds="0")


def _cmd_train(args) -> int:
    import torch

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    schedule = bcc.Schedule.load(args.schedule)
    if schedule.num_steps != args.steps:
        raise BccError(ErrorCode.SCHEDULE_MISMATCH,
                       f"the schedule has {schedule.num_steps} steps but --steps is {args.steps}; pass --steps "
                       f"{schedule.num_steps} (the corrections are trained for the schedule's trajectory).")
    if args.per_class is None and not args.model.startswith("zoo:"):
        args.per_class = 8  # a larger batch per trajectory than calibration's 4: steadier gradients
    setup = calibration_setup(args)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    with process_group() as group:
        ss = bcc.train_scale_shift(
            setup.model, schedule, setup.sample, setup.conditions, iterations=args.iterations, kind=args.kind,
            loss=args.loss, lr=args.lr, mode=args.mode, seed=args.seed, checkpoint=args.out,
            checkpoint_every=args.checkpoint_every, resume=args.resume, progress=progress, groups=args.groups,
            guidance_scale=setup.guidance_scale if args.guided_loss else None)
    world = group.world_size
    if group.rank == 0:
        first, last = ss.history[0][f"loss_{args.loss}"], ss.history[-1][f"loss_{args.loss}"]
        print(f"wrote {args.out}: {args.kind} scale-shift, {len(ss.slots)} cached tensors, {ss.num_parameters():,} "
              f"parameters; {args.loss} loss {first:.3g} -> {last:.3g} over {len(ss.history)} trajectories"
              + (f" on {world} processes" if world > 1 else ""))
    return 0
