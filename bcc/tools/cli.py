"""The ``bcc`` command: calibrate change profiles, make schedules, inspect and plot them.

    bcc calibrate --model digits-unet --steps 20 --out profile.json --plot change.png
    bcc schedule --profile profile.json --speedup 1.8 --out schedule.json --plot schedule.png
    bcc show schedule.json
    bcc plot profile.json --out change.png
    bcc export --model zoo:unet-tiny --schedule schedule.json --out unet.pt2 [--aoti] [--baked]

Errors a user can fix (``BccError``, missing or unwritable files, bad values) print one
line, ``bcc: error: [BCCnnn] ...``, and exit with status 2 (``--debug`` shows the
traceback instead); anything else is a bug and keeps its traceback. ``bcc calibrate`` runs under
``torchrun``: each process takes a share of the runs, only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import bcc
from bcc import BccError, ChangeProfile, ErrorCode, Schedule
from bcc.tools.cli_common import add_sampling_args, calibration_setup, parse_int_list, process_group
from bcc.tools.cli_train import add_train_parser

__all__ = ["main", "parse_int_list"]

EXIT_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``bcc calibrate: error: ... (see --help)``)."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# -- calibrate --------------------------------------------------------------------------
def _cmd_calibrate(args) -> int:
    import torch

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    setup = calibration_setup(args)
    blocks: Any = "attention" if args.blocks == "attention" else [b.strip() for b in args.blocks.split(",") if b.strip()]
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    with process_group() as group:
        profile = bcc.calibrate(setup.model, setup.sample, setup.conditions, setup.seeds, blocks=blocks, mode=args.mode,
                                scheduler=setup.scheduler, guidance_scale=setup.guidance_scale, progress=progress)
    if group.rank != 0:
        return 0
    world = group.world_size
    profile = profile.with_extra(cli={**setup.meta, "world_size": world})
    profile.save(args.out)
    print(profile.summary())
    print(f"wrote {args.out}: {profile.num_steps} steps x {profile.num_blocks} blocks, {profile.num_runs} runs"
          + (f" on {world} processes" if world > 1 else ""))
    if args.plot:
        from bcc.tools.plot import plot_change

        print(f"wrote {plot_change(profile, args.plot)}")
    return 0


# -- schedule ---------------------------------------------------------------------------
def _cmd_schedule(args) -> int:
    sum_from = "literal" if args.literal else "next"
    if args.every is not None:
        if args.literal:
            raise BccError(ErrorCode.CONFIG_INVALID, "--literal applies to --threshold, --budget and --speedup, not --every.")
        source = args.blocks_from or args.profile
        if source is None:
            raise BccError(ErrorCode.CONFIG_INVALID, "--every needs --blocks-from FILE (a profile or schedule) or --profile.")
        src = _load(source)
        names = src.block_names
        costs, rest = ((src.block_flops, src.rest_flops) if isinstance(src, ChangeProfile)
                       else (src.block_costs, src.rest_cost))
        steps = args.steps if args.steps is not None else src.num_steps
        if args.every < 1 or steps < 1:
            raise BccError(ErrorCode.SCHEDULE_SHAPE, f"--every and --steps must be >= 1, got {args.every} and {steps}.")
        base = Schedule.every(args.every, steps, names)
        timesteps = getattr(src, "timesteps", None)
        schedule = Schedule(base.mask, names, timesteps if timesteps and len(timesteps) == steps else None,
                            costs, rest, {"every": args.every, "source": str(source)})
    else:
        if args.profile is None:
            raise BccError(ErrorCode.CONFIG_INVALID, "--threshold/--budget/--speedup need --profile P.json (from bcc calibrate).")
        if args.steps is not None or args.blocks_from is not None:
            raise BccError(ErrorCode.CONFIG_INVALID, "--steps and --blocks-from apply to --every only.")
        profile = ChangeProfile.load(args.profile)
        g = args.granularity
        if args.threshold is not None:
            schedule = Schedule.from_change(profile, args.threshold, sum_from=sum_from, granularity=g)
        elif args.budget is not None:
            schedule = Schedule.for_budget(profile, args.budget, kind="fraction", sum_from=sum_from, granularity=g)
        else:
            schedule = Schedule.for_budget(profile, args.speedup, kind="speedup", sum_from=sum_from, granularity=g)
        schedule = schedule.with_meta(profile=str(args.profile))
    schedule.save(args.out)
    print(schedule.to_text())
    _print_schedule_numbers(schedule)
    print(f"wrote {args.out}")
    if args.plot:
        from bcc.tools.plot import plot_schedule

        print(f"wrote {plot_schedule(schedule, args.plot)}")
    return 0


def _print_schedule_numbers(schedule) -> None:
    weighted = "FLOP-weighted" if schedule.block_costs is not None else "uniform block costs"
    print(f"compute fraction {schedule.compute_fraction():.4f} ({weighted}), "
          f"ideal speedup {schedule.ideal_speedup():.3f}x, "
          f"recomputes {int(schedule.mask.sum())}/{schedule.mask.numel()}")
    meta = schedule.meta
    if "threshold" in meta:
        print(f"threshold delta {meta['threshold']:.6g} (sum_from={meta.get('sum_from', 'next')})"
              + (f", target fraction {meta['target_fraction']:.4f}" if "target_fraction" in meta else ""))
    if "every" in meta:
        print(f"baseline: recompute every {meta['every']} steps")


# -- show / plot -------------------------------------------------------------------------
def _load(path: str):
    """A ChangeProfile or Schedule, told apart by the file's ``format`` field."""
    p = Path(path)
    if not p.is_file():
        raise BccError(ErrorCode.FILE_INVALID, f"{p} does not exist{' (it is a folder)' if p.is_dir() else ''}; check the path.")
    try:
        payload = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BccError(ErrorCode.FILE_INVALID, f"{p} is not valid JSON (truncated or corrupted: {e}); recreate it.") from None
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt == "bcc-change-profile":
        return ChangeProfile.load(p)
    if fmt == "bcc-schedule":
        return Schedule.load(p)
    raise BccError(ErrorCode.FILE_INVALID, f"{p} is neither a bcc change profile nor a schedule (format={fmt!r}); "
                   "use a file written by 'bcc calibrate' or 'bcc schedule'.")


def _runs_at(active: tuple[int, int], num_steps: int) -> str:
    return (f"runs at steps {active[0]}-{active[1] - 1} of {num_steps} only (one expert); fractions count those "
            "steps")


def _cmd_show(args) -> int:
    obj = _load(args.file)
    if isinstance(obj, ChangeProfile):
        sched = obj.scheduler["name"] if obj.scheduler else None
        print(f"change profile {args.file}: {obj.num_steps} steps x {obj.num_blocks} blocks, {obj.num_runs} runs, "
              f"mode={obj.mode}, scheduler={sched}, guidance={obj.guidance_scale}, fingerprint={obj.fingerprint}")
        if obj.timesteps:
            print("timesteps " + " ".join(f"{t:g}" for t in obj.timesteps))
        if obj.active_steps is not None:
            print(_runs_at(obj.active_steps, obj.num_steps))
        if obj.extra:
            print("extra " + json.dumps(obj.to_dict()["extra"], sort_keys=True))
        print(obj.summary())
    else:
        print(f"schedule {args.file}: {obj.num_steps} steps x {obj.num_blocks} blocks")
        if obj.active_steps is not None:
            print(_runs_at(obj.active_steps, obj.num_steps))
        _print_schedule_numbers(obj)
        if obj.meta:
            print("meta " + json.dumps(obj.to_dict()["meta"], sort_keys=True, default=str))
        print(obj.to_text())
    return 0


def _cmd_plot(args) -> int:
    from bcc.tools.plot import plot_change, plot_schedule

    obj = _load(args.file)
    if isinstance(obj, ChangeProfile):
        if args.top is not None and args.top < 1:
            raise BccError(ErrorCode.CONFIG_INVALID, f"--top must be >= 1, got {args.top}.")
        out = plot_change(obj, args.out, top=args.top)
    else:
        if args.top is not None:
            raise BccError(ErrorCode.CONFIG_INVALID, "--top applies to change profiles, not schedules.")
        out = plot_schedule(obj, args.out)
    print(f"wrote {out}")
    return 0


# -- export ------------------------------------------------------------------------------
def _export_model(args) -> tuple[Any, tuple, dict]:
    """The model and one step's example inputs (every shape of the artifact comes from them)."""
    import torch

    if args.latent < 1 or args.batch < 1:
        raise BccError(ErrorCode.CONFIG_INVALID, "--latent and --batch must be >= 1.")
    if args.model.startswith("zoo:"):
        from bcc.tools import zoo

        name = args.model[4:]
        if name not in zoo.MODELS:
            raise BccError(ErrorCode.CONFIG_INVALID, f"unknown zoo model {name!r}; choose from {sorted(zoo.MODELS)}.")
        return zoo.build(name, latent=args.latent, batch=args.batch, seed=0)
    if args.model != "digits-unet":
        raise BccError(ErrorCode.CONFIG_INVALID, f"unknown --model {args.model!r}; use digits-unet or zoo:<name>.")
    from bcc.tools.digits import model as digits_model

    unet, _, _ = digits_model.load_digits_unet(args.model_dir)
    size = int(unet.config.sample_size)
    x = torch.zeros(args.batch, unet.config.in_channels, size, size)
    context = torch.zeros(args.batch, digits_model.TOKENS_PER_LABEL, digits_model.CROSS_ATTENTION_DIM)
    return unet, (x, torch.tensor(999)), {"encoder_hidden_states": context, "return_dict": False}


def _cmd_export(args) -> int:
    import torch

    from bcc.lower.export import meta_path

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    schedule = Schedule.load(args.schedule)
    model, margs, mkwargs = _export_model(args)
    ss = None
    if args.scale_shift:
        ss = bcc.ScaleShift.load(args.scale_shift)
    ep = bcc.export(model, schedule, (margs, mkwargs), schedule_input=not args.baked, mode=args.mode, scale_shift=ss)
    path = bcc.save_exported(ep, args.out, aoti=args.aoti)
    print(f"wrote {path} ({'AOTInductor package' if args.aoti else 'torch.export program'}, "
          f"{schedule.num_blocks} gated blocks, {schedule.num_steps} steps, schedule "
          f"{'baked in' if args.baked else 'as an input'}, static input shape {tuple(margs[0].shape)})")
    print(f"wrote {meta_path(path)}")
    return 0


# -- parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    parser = _Parser(prog="bcc", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="bcc: the block caching compiler for diffusion models.\n"
                     "Measure how much each block changes per sampling step, turn that into a cache\n"
                     "schedule, inspect and plot both. 'bcc COMMAND --help' explains each command.",
                     epilog="example:\n"
                     "  bcc calibrate --model digits-unet --steps 20 --out profile.json --plot change.png\n"
                     "  bcc schedule --profile profile.json --budget 0.9 --out schedule.json --plot schedule.png\n"
                     "  bcc show schedule.json\n"
                     "  torchrun --nproc_per_node 4 -m bcc.tools.cli calibrate --model digits-unet --out profile.json")
    parser.add_argument("--version", action="version", version=f"bcc {bcc.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter

    c = sub.add_parser("calibrate", parents=[common], formatter_class=fmt, help="measure per-block change (a change profile)",
                       description="Run real sampling with caching off and record, per block and step, the\n"
                       "relative L1 change of what bcc would cache (Eq. 6) into a change profile.\n\n"
                       "digits-unet / digits-dit: one run = one class label x one seed, a batch of\n"
                       "  --per-class images of that label with classifier-free guidance.\n"
                       "zoo:<name>: a random-weight model on a synthetic trajectory, one run per\n"
                       "  seed (for tests; its curves mean nothing).\n"
                       "Under torchrun (WORLD_SIZE > 1) the runs are split over the processes (gloo)\n"
                       "and rank 0 writes the files; the profile equals a single-process one.")
    add_sampling_args(c)
    c.add_argument("--seeds", metavar="LIST", default="0,1", help="seeds per condition, e.g. 0,1 (default) or 0-3")
    c.add_argument("--mode", choices=("residual", "output"), default="residual",
                   help="quantity measured; match the mode you compile with (default residual)")
    c.add_argument("--blocks", metavar="SEL", default="attention",
                   help="'attention' (default) or comma-separated module paths/globs, e.g. 'transformer_blocks.*'")
    c.add_argument("--out", required=True, metavar="FILE", help="change profile JSON to write")
    c.add_argument("--plot", metavar="PNG", help="also write the change curves to this PNG")
    c.set_defaults(func=_cmd_calibrate)

    s = sub.add_parser("schedule", parents=[common], formatter_class=fmt, help="make a cache schedule from a profile",
                       description="Make a schedule (which block recomputes at which step) from a change profile:\n"
                       "  --threshold D  Eq. 7: reuse a block until its accumulated change exceeds D\n"
                       "  --budget F     the Eq. 7 schedule with the largest compute fraction <= F\n"
                       "  --speedup X    the same for an ideal speedup >= X (fraction 1/X)\n"
                       "  --every N      baseline: recompute all blocks every N steps (blocks from\n"
                       "                 --blocks-from or --profile, --steps defaults to theirs)\n"
                       "Compute fractions weigh blocks by the FLOPs in the profile. Prints the table.")
    s.add_argument("--profile", metavar="FILE", help="change profile JSON from 'bcc calibrate'")
    how = s.add_mutually_exclusive_group(required=True)
    how.add_argument("--threshold", type=float, metavar="D", help="change threshold delta >= 0 (the paper used 0.5)")
    how.add_argument("--budget", type=float, metavar="F", help="compute fraction in (0, 1]")
    how.add_argument("--speedup", type=float, metavar="X", help="ideal speedup >= 1")
    how.add_argument("--every", type=int, metavar="N", help="baseline: recompute every N steps")
    s.add_argument("--literal", action="store_true",
                   help="sum Eq. 7 from t_a as printed in the paper (default: from t_a + 1)")
    s.add_argument("--granularity", choices=["block", "step"], default="block",
                   help="'block': each block its own refresh steps (the paper); 'step': all blocks refresh "
                   "together, on their FLOP-weighted mean change (better paired fidelity on the digits models)")
    s.add_argument("--steps", type=int, metavar="T", help="--every: number of steps")
    s.add_argument("--blocks-from", metavar="FILE", help="--every: profile or schedule JSON giving the block names and costs")
    s.add_argument("--out", required=True, metavar="FILE", help="schedule JSON to write")
    s.add_argument("--plot", metavar="PNG", help="also write the lifetimes chart to this PNG")
    s.set_defaults(func=_cmd_schedule)

    sh = sub.add_parser("show", parents=[common], help="print a profile or schedule",
                        description="Print a change profile (per-block summary, how it was measured) or a schedule "
                        "(compute fraction, ideal speedup, provenance, table), told apart by the file's format.")
    sh.add_argument("file", help="a .json written by 'bcc calibrate' or 'bcc schedule'")
    sh.set_defaults(func=_cmd_show)

    p = sub.add_parser("plot", parents=[common], help="plot a profile or schedule to PNG",
                       description="Plot a change profile as change-per-step curves (the paper's Fig. 2b) or a "
                       "schedule as cache lifetimes per block (Fig. 4).")
    p.add_argument("file", help="a .json written by 'bcc calibrate' or 'bcc schedule'")
    p.add_argument("--out", required=True, metavar="PNG", help="PNG to write")
    p.add_argument("--top", type=int, metavar="N", help="profiles: only the N blocks with the largest mean change")
    p.set_defaults(func=_cmd_plot)

    e = sub.add_parser("export", parents=[common], formatter_class=fmt, help="write a .pt2 with the schedule inside",
                       description="Export a model with its blocks gated on a schedule as one torch.export program\n"
                       "(or, with --aoti, an AOTInductor package) plus FILE.bcc.json beside it (schedule,\n"
                       "block names, cache shapes, format version). Load it with bcc.load_exported(FILE).\n"
                       "Shapes are static: batch --batch, resolution --latent (zoo) or the model's own.")
    e.add_argument("--model", required=True, metavar="NAME", help="digits-unet or zoo:<name> (e.g. zoo:unet-tiny)")
    e.add_argument("--model-dir", metavar="DIR", help="digits model folder (default: the shipped one)")
    e.add_argument("--schedule", required=True, metavar="FILE", help="schedule JSON from 'bcc schedule'")
    e.add_argument("--out", required=True, metavar="FILE", help=".pt2 to write")
    e.add_argument("--aoti", action="store_true", help="compile an AOTInductor package (C++, slower to build)")
    e.add_argument("--baked", action="store_true",
                   help="bake the schedule in as a constant (default: a program input, swappable)")
    e.add_argument("--mode", choices=("residual", "output"), default="residual", help="what is cached (default residual)")
    e.add_argument("--scale-shift", metavar="FILE", help="bake in scale-shift corrections from 'bcc train'")
    e.add_argument("--latent", type=int, metavar="N", default=8, help="zoo models: latent size (default 8)")
    e.add_argument("--batch", type=int, metavar="N", default=2, help="batch size (default 2)")
    e.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's)")
    e.set_defaults(func=_cmd_export)

    b = sub.add_parser("bench", help="run a benchmark (measures and writes results; asserts nothing)",
                       description="Benchmarks. 'bcc bench quality [options]' runs the paper's Table 1 protocol on "
                       "the shipped digits model (see 'bcc bench quality --help'); 'bcc bench speed [options]' "
                       "times bcc against the plain model, the schedule's ideal and the peers (see "
                       "'bcc bench speed --help').")
    b.add_argument("which", choices=["quality", "speed"], help="which benchmark")
    b.add_argument("options", nargs=argparse.REMAINDER, help="passed to the benchmark")
    b.set_defaults(func=_cmd_bench)
    add_train_parser(sub, common)
    return parser


def _cmd_bench(args) -> int:
    if args.which == "speed":
        from bcc.tools.bench import speed

        return speed.main(list(args.options))
    from bcc.tools.bench import quality

    return quality.main(list(args.options))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``bcc`` command line; returns the exit status (0 ok, 2 error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_ERROR)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_ERROR
    debug = getattr(args, "debug", False)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("bcc: interrupted", file=sys.stderr)
        return 130
    except (BccError, OSError, ValueError) as e:
        if debug:
            raise
        print("bcc: error: " + _one_line(e), file=sys.stderr)
        return EXIT_ERROR


def _one_line(e: Exception) -> str:
    if isinstance(e, BccError):
        message = str(e)
    elif isinstance(e, OSError) and e.filename and e.strerror:
        message = f"[{ErrorCode.FILE_INVALID.value}] {e.filename}: {e.strerror}; check the path."
    else:
        code = ErrorCode.FILE_INVALID if isinstance(e, OSError) else ErrorCode.CONFIG_INVALID
        message = f"[{code.value}] {e}"
    return " ".join(message.split())

if __name__ == "__main__":  # python -m bcc.tools.cli (e.g. under torchrun)
    sys.exit(main())
