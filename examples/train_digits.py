#!/usr/bin/env python
"""Train the bcc-digits denoiser (class-conditional diffusion on 16x16 MNIST digits).

Examples (from the repository root):

    # full UNet run (one CPU thread, ~1.5-2 h), exports EMA weights to bcc/tools/data/digits_unet/
    python examples/train_digits.py
    # continue an interrupted run from runs/digits_unet/checkpoint.pt
    python examples/train_digits.py --resume
    # write the EMA weights of the latest checkpoint to the package folder and exit
    python examples/train_digits.py --export
    # the DiT twin (PixArtTransformer2DModel), weights to bcc/tools/data/digits_dit/
    python examples/train_digits.py --arch dit

Everything random (initialisation, batch order, timesteps, noise, label dropout)
comes from ``--seed``; checkpoints hold model, EMA, optimizer, step and RNG states,
so ``--resume`` continues the same trajectory.  A run folder holds
``checkpoint.pt``, ``loss.csv``, ``samples/step_XXXXXXX.png`` (guided DDIM samples
of the EMA model, one row per digit) and ``run_config.json``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bcc.tools.digits.data import load_digits  # noqa: E402
from bcc.tools.digits.model import (  # noqa: E402
    NULL_LABEL,
    DigitsConditioner,
    build_denoiser,
    call_denoiser,
    count_parameters,
    default_model_dir,
    make_train_scheduler,
    save_digits_model,
)
from bcc.tools.digits.sampling import make_ddim_scheduler, sample, save_png  # noqa: E402

DEFAULTS = {
    # measured on one core (2-core box, other core busy): UNet ~2.6 it/s, DiT ~3.3 it/s at batch 64,
    # so 16k steps take ~1.75 h incl. checkpoints/sample grids
    "unet": {"max_steps": 16000, "lr": 1e-3},
    "dit": {"max_steps": 16000, "lr": 5e-4},
}
CKPT_NAME = "checkpoint.pt"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("unet", "dit"), default="unet")
    ap.add_argument("--run-dir", type=Path, default=None, help="default runs/digits_<arch>")
    ap.add_argument("--out", type=Path, default=None, help="export folder (default bcc/tools/data/digits_<arch>)")
    ap.add_argument("--max-steps", type=int, default=None, help="total optimisation steps (default per arch)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default per arch)")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=500, help="linear LR warm-up steps")
    ap.add_argument("--min-lr-frac", type=float, default=0.05, help="cosine decay floor as a fraction of --lr")
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--p-uncond", type=float, default=0.1, help="probability of the null label (CFG dropout)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--ckpt-every", type=int, default=750, help="checkpoint + sample grid every N steps (~4-5 min)")
    ap.add_argument("--log-every", type=int, default=50, help="loss.csv row every N steps")
    ap.add_argument("--sample-steps", type=int, default=25, help="DDIM steps for the sample grids")
    ap.add_argument("--guidance", type=float, default=3.0, help="CFG scale for the sample grids")
    ap.add_argument("--samples-per-class", type=int, default=8)
    ap.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoint.pt")
    ap.add_argument("--fresh", action="store_true", help="start over even if a checkpoint exists (overwrites it)")
    ap.add_argument("--export", action="store_true", help="only export the EMA weights of the checkpoint, then exit")
    ap.add_argument(
        "--no-export-checkpoints",
        dest="export_checkpoints",
        action="store_false",
        help="do not export intermediate EMA weights to --out at every checkpoint",
    )
    ap.add_argument("--no-final-export", dest="final_export", action="store_false")
    args = ap.parse_args(argv)
    d = DEFAULTS[args.arch]
    if args.max_steps is None:
        args.max_steps = d["max_steps"]
    if args.lr is None:
        args.lr = d["lr"]
    if args.run_dir is None:
        args.run_dir = REPO_ROOT / "runs" / f"digits_{args.arch}"
    if args.out is None:
        args.out = default_model_dir(args.arch)
    return args


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    span = max(1, args.max_steps - args.warmup)
    progress = min(1.0, (step - args.warmup) / span)
    floor = args.lr * args.min_lr_frac
    return floor + (args.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, args):
        self.args = args
        self.run_dir: Path = args.run_dir
        self.ckpt_path = self.run_dir / CKPT_NAME
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
        self.denoiser = build_denoiser(args.arch)
        self.conditioner = DigitsConditioner()
        self.ema_denoiser = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
        self.ema_conditioner = copy.deepcopy(self.conditioner).requires_grad_(False).eval()
        self.params = list(self.denoiser.parameters()) + list(self.conditioner.parameters())
        self.ema_params = list(self.ema_denoiser.parameters()) + list(self.ema_conditioner.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
        self.scheduler = make_train_scheduler()
        self.alphas_cumprod = self.scheduler.alphas_cumprod.clone().float()
        self.gen = torch.Generator().manual_seed(args.seed + 1)
        self.x_train, self.y_train = load_digits("train")
        self.step = 0
        self.perm = torch.randperm(len(self.x_train), generator=self.gen)
        self.pos = 0
        self.loss_smooth = None
        self.elapsed = 0.0  # training seconds over all sessions

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "format": "bcc-digits-train/1",
            "arch": self.args.arch,
            "step": self.step,
            "denoiser": self.denoiser.state_dict(),
            "conditioner": self.conditioner.state_dict(),
            "ema_denoiser": self.ema_denoiser.state_dict(),
            "ema_conditioner": self.ema_conditioner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "gen_state": self.gen.get_state(),
            "perm": self.perm,
            "pos": self.pos,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
            "loss_smooth": self.loss_smooth,
            "elapsed": self.elapsed,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("arch") != self.args.arch:
            raise SystemExit(f"checkpoint is for arch {sd.get('arch')!r}, not {self.args.arch!r}")
        self.denoiser.load_state_dict(sd["denoiser"])
        self.conditioner.load_state_dict(sd["conditioner"])
        self.ema_denoiser.load_state_dict(sd["ema_denoiser"])
        self.ema_conditioner.load_state_dict(sd["ema_conditioner"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.gen.set_state(sd["gen_state"])
        self.perm = sd["perm"]
        self.pos = int(sd["pos"])
        self.step = int(sd["step"])
        torch.set_rng_state(sd["torch_rng"])
        random.setstate(sd["python_rng"])
        np.random.set_state(sd["numpy_rng"])
        self.loss_smooth = sd.get("loss_smooth")
        self.elapsed = float(sd.get("elapsed", 0.0))

    def save_checkpoint(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.ckpt_path.with_name(CKPT_NAME + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, self.ckpt_path)

    # --------------------------------------------------------------- training
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.args.batch_size
        if self.pos + bs > len(self.perm):
            self.perm = torch.randperm(len(self.x_train), generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + bs]
        self.pos += bs
        return self.x_train[idx], self.y_train[idx]

    def train_step(self) -> float:
        args = self.args
        x0, y = self.next_batch()
        b = x0.shape[0]
        drop = torch.rand(b, generator=self.gen) < args.p_uncond
        y = torch.where(drop, torch.full_like(y, NULL_LABEL), y)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=self.gen)
        noise = torch.randn(x0.shape, generator=self.gen)
        a = self.alphas_cumprod[t].view(b, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # == DDPMScheduler.add_noise
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.step, args)
        self.denoiser.train()
        self.conditioner.train()
        eps = call_denoiser(self.denoiser, xt, t, self.conditioner(y), arch=args.arch)
        loss = F.mse_loss(eps.float(), noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, args.grad_clip)
        self.optimizer.step()
        self.step += 1
        decay = min(args.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, [p.detach() for p in self.params], 1.0 - decay)
        return float(loss.detach())

    # ---------------------------------------------------------------- outputs
    def sample_grid(self) -> tuple[Path, float | None]:
        args = self.args
        labels = torch.arange(10).repeat_interleave(args.samples_per_class)
        imgs = sample(
            self.ema_denoiser,
            self.ema_conditioner,
            make_ddim_scheduler(self.scheduler),
            labels,
            num_steps=args.sample_steps,
            guidance_scale=args.guidance,
            seed=1234,
        )
        # one row per digit
        rows = imgs.view(10, args.samples_per_class, *imgs.shape[1:]).reshape(-1, *imgs.shape[1:])
        path = save_png(rows, self.run_dir / "samples" / f"step_{self.step:07d}.png", nrow=args.samples_per_class, scale=3)
        save_png(rows, self.run_dir / "samples_latest.png", nrow=args.samples_per_class, scale=3)
        acc = None
        try:
            from bcc.tools.digits.classifier import classify

            acc = float((classify(imgs) == labels).float().mean())
        except (FileNotFoundError, ValueError):
            pass
        return path, acc

    def export(self, final: bool) -> Path:
        return save_digits_model(
            self.ema_denoiser,
            self.ema_conditioner,
            self.args.out,
            scheduler=self.scheduler,
            arch=self.args.arch,
            train_steps=self.step,
            final_loss=None if self.loss_smooth is None else round(float(self.loss_smooth), 6),
            extra={
                "complete": bool(final and self.step >= self.args.max_steps),
                "planned_steps": self.args.max_steps,
                "ema_decay": self.args.ema_decay,
                "batch_size": self.args.batch_size,
                "lr": self.args.lr,
                "p_uncond": self.args.p_uncond,
                "seed": self.args.seed,
                "train_seconds": round(self.elapsed, 1),
                "final_loss_note": "exponential moving average (0.99/step) of the training MSE on epsilon",
            },
            tmp_dir=self.run_dir,
        )


def log_line(msg: str) -> None:
    tqdm.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg)
    sys.stdout.flush()


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    trainer = Trainer(args)
    run_dir = args.run_dir
    have_ckpt = trainer.ckpt_path.is_file()

    if args.export:
        if not have_ckpt:
            raise SystemExit(f"no checkpoint at {trainer.ckpt_path}; train first")
        trainer.load_state_dict(torch.load(trainer.ckpt_path, map_location="cpu", weights_only=False))
        out = trainer.export(final=True)
        print(f"exported EMA weights of step {trainer.step} to {out}")
        return 0

    if have_ckpt and not (args.resume or args.fresh):
        raise SystemExit(f"{trainer.ckpt_path} exists: pass --resume to continue it or --fresh to start over")
    run_dir.mkdir(parents=True, exist_ok=True)
    csv_path = run_dir / "loss.csv"
    if args.resume and have_ckpt:
        trainer.load_state_dict(torch.load(trainer.ckpt_path, map_location="cpu", weights_only=False))
        log_line(f"resumed from {trainer.ckpt_path} at step {trainer.step}")
    else:
        if csv_path.exists():
            csv_path.unlink()
        log_line("starting a fresh run")
    (run_dir / "run_config.json").write_text(
        json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, indent=2) + "\n"
    )
    log_line(
        f"arch={args.arch} denoiser params={count_parameters(trainer.denoiser):,} "
        f"conditioner params={count_parameters(trainer.conditioner):,} batch={args.batch_size} "
        f"lr={args.lr} max_steps={args.max_steps} threads={torch.get_num_threads()}"
    )

    new_csv = not csv_path.exists()
    csv_file = open(csv_path, "a", newline="")
    writer = csv.writer(csv_file)
    if new_csv:
        writer.writerow(["step", "loss", "loss_smooth", "lr", "elapsed_s", "it_per_s", "sample_acc"])
        csv_file.flush()

    stop = {"flag": False}

    def _on_signal(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    def checkpoint(final: bool) -> None:
        t0 = time.time()
        trainer.save_checkpoint()
        path, acc = trainer.sample_grid()
        msg = f"step {trainer.step}: checkpoint saved, samples {path.name}"
        if acc is not None:
            msg += f", classifier accuracy of guided samples {acc:.3f}"
        if final or args.export_checkpoints:
            out = trainer.export(final=final)
            msg += f", exported EMA to {out}"
        log_line(msg + f" ({time.time() - t0:.1f}s)")
        writer.writerow([trainer.step, "", "", "", round(trainer.elapsed, 1), "", "" if acc is None else round(acc, 4)])
        csv_file.flush()

    interactive = sys.stderr.isatty()
    bar = tqdm(
        total=args.max_steps,
        initial=trainer.step,
        desc=f"digits-{args.arch}",
        dynamic_ncols=interactive,
        mininterval=0.5 if interactive else 30.0,
        ascii=not interactive,
    )
    window_loss, window_n, window_t = 0.0, 0, time.time()
    try:
        while trainer.step < args.max_steps and not stop["flag"]:
            t_step = time.time()
            loss = trainer.train_step()
            trainer.elapsed += time.time() - t_step
            if not math.isfinite(loss):
                raise SystemExit(f"non-finite loss at step {trainer.step}; resume from the last checkpoint with a lower --lr")
            trainer.loss_smooth = loss if trainer.loss_smooth is None else 0.99 * trainer.loss_smooth + 0.01 * loss
            window_loss += loss
            window_n += 1
            bar.update(1)
            if trainer.step % args.log_every == 0:
                now = time.time()
                its = window_n / max(now - window_t, 1e-9)
                writer.writerow(
                    [trainer.step, round(window_loss / window_n, 6), round(trainer.loss_smooth, 6),
                     f"{lr_at(trainer.step - 1, args):.3e}", round(trainer.elapsed, 1), round(its, 3), ""]
                )
                csv_file.flush()
                bar.set_postfix(loss=f"{trainer.loss_smooth:.4f}", its=f"{its:.2f}")
                window_loss, window_n, window_t = 0.0, 0, now
            if trainer.step % args.ckpt_every == 0 and trainer.step < args.max_steps:
                checkpoint(final=False)
                window_n, window_loss, window_t = 0, 0.0, time.time()
    finally:
        bar.close()
    done = trainer.step >= args.max_steps
    checkpoint(final=done and args.final_export)
    csv_file.close()
    if done:
        log_line(f"finished {trainer.step} steps in {trainer.elapsed / 60:.1f} min of training; weights in {args.out}")
    else:
        log_line(f"stopped at step {trainer.step}; continue with --resume")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
