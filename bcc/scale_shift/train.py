"""Train scale-shift parameters by distillation from the uncached model (paper §3.3).

The model's weights stay frozen. The *student* is the model with caching and the
scale-shift correction; it unrolls whole trajectories from noise, driven by the
caller's ordinary sampling loop. At every step the *teacher* (the same model, caching
off) runs on the student's current latent, and the student is pulled towards it:

- ``loss="output"`` (default): mean squared error between the student's and the
  teacher's model outputs at this step, back-propagated through the rest of the
  network to every correction used at this step;
- ``loss="block"``: for every block reused at this step, the relative squared error
  between its corrected cached value and the value the teacher's block computed now
  (no back-propagation through the network);
- ``loss="trajectory"``: like ``"output"``, but the target at step ``s`` is the teacher's
  output on *its own* trajectory from the same noise and condition (recorded first), so
  the student is pulled back onto the uncached trajectory rather than towards what the
  teacher would do from wherever the student has drifted;
- ``loss="final"``: the mean squared error between the *final* sample of the student's
  whole trajectory and the teacher's from the same noise and condition, back-propagated
  through every step (the sampler must run with gradients on), so the corrections are
  trained for the metric a user sees: how close the cached image is to the uncached one.

With the per-step losses gradients do not flow across steps: latents and caches are
detached between calls, so memory is one forward pass; ``"final"`` keeps the whole
trajectory's graph (memory grows with the step count). Training needs only conditions
(labels, prompts).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from bcc.analyze.recording import BlockResiduals
from bcc.capture.timestep import timestep_finder
from bcc.errors import BccError, ErrorCode
from bcc.plan.profile import model_fingerprint
from bcc.plan.schedule import Schedule
from bcc._io import thaw
from bcc.analyze.hooks import CacheEntry, cache_entry, delegating_getattr, patch_forwards
from bcc.scale_shift.params import KINDS, CacheSlot, ScaleShift, check_distinct, sinusoidal_embedding

__all__ = ["train_scale_shift", "ScaleShiftTrainConfig", "EMBEDDING_MODULES"]

# Where diffusers denoisers compute their timestep embedding: UNet2DConditionModel,
# PixArt (adaLN-single), SD3/Flux (time + pooled text), DiT-style.
EMBEDDING_MODULES = ("time_embedding", "adaln_single.emb", "time_text_embed", "t_embedder")
LOSSES = ("output", "block", "trajectory", "final")
_MODES = ("residual", "output")


def _invalid(message: str) -> BccError:
    return BccError(ErrorCode.CONFIG_INVALID, message)


@dataclass(frozen=True)
class ScaleShiftTrainConfig:
    """How :func:`train_scale_shift` trains; frozen, validated on construction.

    Attributes:
        iterations: trajectories per process (under ``torchrun`` each rank runs its own
            seeds and gradients are averaged every step). More trajectories see more
            noise and conditions; each costs a teacher and a student pass per step.
        kind: ``"table"`` (a free correction per step; default: it trained better on the
            digits models, see ``results/scale_shift``) or ``"linear"`` (on the timestep
            embedding, the paper's form: fewer parameters, shared across steps).
        loss: ``"output"`` (model output vs the teacher on the student's latent),
            ``"block"`` (each corrected block value vs the teacher's; cheapest, no
            back-propagation through the network), ``"trajectory"`` (model output vs the
            teacher on its own trajectory; needs a sampler that is deterministic given
            condition and seed) or ``"final"`` (the final sample vs the teacher's from the
            same noise, back-propagated through the whole trajectory: best where it fits,
            at the memory of one trajectory's graph; needs a deterministic sampler that
            returns the sample with gradients on).
        lr: Adam's learning rate. 5e-3 suits 20-step trajectories; at 50 steps it made the
            digits DiT worse than naive caching and 1e-3 gained 1.6 dB
            (``results/scale_shift/lr_ddim50.md``): with small per-step errors, Adam's
            steps of about ``lr`` per entry drift the entries that get little signal.
        mode: ``"residual"`` or ``"output"``: the cache mode the corrections are for;
            compile with the same one.
        seed: iteration ``i`` samples with seed ``seed + i * world + rank``.
        checkpoint: a ``.safetensors`` path written every ``checkpoint_every`` iterations
            (rank 0); ``resume=True`` continues from it. Checkpoints cost a file write each.
        checkpoint_every: iterations between checkpoints.
        resume: continue from ``checkpoint`` if it exists (same schedule, model, mode, groups).
        progress: show a tqdm bar (rank 0).
        timestep_of: ``timestep_of(args, kwargs) -> float`` reads a call's timestep; only
            ``kind="linear"`` on a model without an embedding module needs it (for the
            sinusoidal embedding). ``None``: found by name (``timestep``, ``t``, ...) as
            everywhere in bcc (:func:`bcc.capture.timestep.find_timestep`).
        guidance_scale: with classifier-free guidance batched as ``[uncond; cond]`` (the
            diffusers convention), the output losses compare guided predictions
            ``u + w (c - u)``, which is what the sampler steps with, instead of the raw
            halves. ``None`` (default) compares raw outputs.
        groups: ``2`` trains a correction per guidance half (``[uncond; cond]``), which lets
            the guided loss correct ``c - u``, at twice the parameters; ``1`` (default)
            shares one across the batch.

    Example:
        >>> ScaleShiftTrainConfig(iterations=10).replace(lr=1e-3).lr
        0.001
        >>> ScaleShiftTrainConfig(loss="l1")
        Traceback (most recent call last):
        ...
        bcc.errors.BccError: [BCC001] loss must be one of ('output', 'block', 'trajectory', 'final'), got 'l1'. ...
    """

    iterations: int = 100
    kind: str = "table"
    loss: str = "output"
    lr: float = 5e-3
    mode: str = "residual"
    seed: int = 0
    checkpoint: str | os.PathLike | None = None
    checkpoint_every: int = 10
    resume: bool = False
    progress: bool = True
    timestep_of: Callable[[tuple, dict], float] | None = None
    guidance_scale: float | None = None
    groups: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise _invalid(f"kind must be one of {KINDS}, got {self.kind!r}. Use 'table' (a correction per step) "
                           "or 'linear' (on the timestep embedding).")
        if self.loss not in LOSSES:
            raise _invalid(f"loss must be one of {LOSSES}, got {self.loss!r}. Use 'output' (default) or 'final' "
                           "when the sampler runs with gradients.")
        if self.mode not in _MODES:
            raise _invalid(f"mode must be one of {_MODES}, got {self.mode!r}; use the mode you compile with.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise _invalid(f"lr must be a positive finite number, got {self.lr!r} (5e-3 suits 20 steps).")
        for name in ("iterations", "checkpoint_every", "groups"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _invalid(f"{name} must be an integer >= 1, got {v!r}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise _invalid(f"seed must be an integer, got {self.seed!r}.")
        if self.guidance_scale is not None and not (isinstance(self.guidance_scale, (int, float))
                                                    and math.isfinite(self.guidance_scale)):
            raise _invalid(f"guidance_scale must be a finite number or None, got {self.guidance_scale!r}.")
        if self.timestep_of is not None and not callable(self.timestep_of):
            raise _invalid("timestep_of must be a function timestep_of(args, kwargs) -> float, or None.")
        for name in ("resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise _invalid(f"{name} must be a bool, got {getattr(self, name)!r}.")

    def replace(self, **changes: Any) -> "ScaleShiftTrainConfig":
        """A copy with ``changes`` applied and validated (unknown names are refused)."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise _invalid(f"unknown training option(s) {unknown}; valid options are {names}.")
        return dataclasses.replace(self, **changes)


class _Student(torch.nn.Module):
    """The model wrapped for distillation: each call runs teacher, student and one update."""

    def __init__(self, model, schedule: Schedule, ss: ScaleShift | None, config: ScaleShiftTrainConfig):
        super().__init__()
        # Named like torch.compile's and bcc's wrappers, so code that unwraps them sees the model.
        self._orig_mod = model
        self.schedule = schedule
        self.ss = ss
        # Not "config": samplers read the model's own (model.config.in_channels) through this wrapper.
        self.train_config = config
        self.kind = config.kind if ss is None else ss.kind
        self.loss_kind, self.mode, self.lr = config.loss, config.mode, config.lr
        self.guidance_scale = config.guidance_scale
        self.groups = config.groups
        self.find_timestep = timestep_finder(model.forward)
        self.optimizer = None if ss is None else torch.optim.Adam(ss.parameters(), lr=self.lr)
        self.calls = 0
        self.targets: list = []  # loss="trajectory": the teacher's outputs on its own trajectory
        self.phase = "teacher"
        # Teacher and student ask the same rule, once per block and input signature.
        self.residuals = BlockResiduals(self.mode)
        self.caches: dict[str, CacheEntry] = {}
        self.teacher_vals: dict[str, CacheEntry] = {}
        self.reused: list[tuple[int, torch.Tensor, int, str, int]] = []
        self.losses: list[tuple[float, float]] = []
        self.emb_rows: dict[int, torch.Tensor] = {}
        self._emb_capture: torch.Tensor | None = None
        self.slots: list[CacheSlot] = []
        self._handles = []
        self._restore = patch_forwards(model, schedule.block_names, self._wrap, self.residuals)
        modules = dict(model.named_modules())
        self.emb_source = "sinusoidal"
        for cand in EMBEDDING_MODULES:
            if cand in modules:
                self.emb_source = cand
                self._handles.append(modules[cand].register_forward_hook(self._grab_embedding))
                break

    __getattr__ = delegating_getattr

    @property
    def step(self) -> int:
        return self.calls % self.schedule.num_steps

    def _grab_embedding(self, module, args, output):
        out = output[-1] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor) and self.phase == "teacher":
            # The batch shares one timestep; rows differ only if the embedding mixes in
            # per-sample conditions (SD3/Flux pooled text), then the batch mean is used.
            self._emb_capture = out.detach().float().reshape(out.shape[0], -1).mean(0)

    def _timestep(self, args: tuple, kwargs: dict) -> float:
        if self.train_config.timestep_of is not None:
            return float(self.train_config.timestep_of(args, kwargs))
        found = self.find_timestep(args, kwargs)
        if found is None:
            raise BccError(
                ErrorCode.CONFIG_INVALID,
                f"kind='linear' needs each step's timestep for its sinusoidal embedding ("
                f"{type(self._orig_mod).__name__} has none of the modules {EMBEDDING_MODULES}), but the model's "
                "call has no argument named timestep, timesteps or t. Pass timestep_of=lambda args, kwargs: ... "
                "to train_scale_shift, or use kind='table'.",
            )
        return found.as_float()

    def _wrap(self, name: str, index: int, forward):
        def wrapped(*args, **kwargs):
            if self.phase == "teacher":
                with torch.no_grad():
                    out, slots, inputs = self.residuals.call(name, forward, args, kwargs)
                self.teacher_vals[name] = cache_entry(out, inputs, slots)
                return out
            step = self.step
            if bool(self.schedule.mask[step, index]):
                # Not no_grad: a block downstream of a reused one carries the gradient on.
                out, slots, inputs = self.residuals.call(name, forward, args, kwargs)
                self.caches[name] = cache_entry(out, inputs, slots, detach=self.loss_kind != "final")
                return out
            inputs = self.residuals.inputs(name, args, kwargs)

            def adjust(slot: CacheSlot, cached: torch.Tensor) -> torch.Tensor:
                k = self.ss.index_of(slot)
                self.reused.append((k, cached, step, name, slot.output))
                return self.ss.adjust(k, cached, step)

            return self.caches[name].rebuild(inputs, adjust)

        return wrapped

    def _init_parameters(self, device) -> None:
        # At step 0 every block ran in the teacher pass, so every cached tensor is known.
        for name in self.schedule.block_names:
            slots = [s for s in self.teacher_vals[name].slots if s is not None]
            check_distinct(slots)
            self.slots.extend(slots)
        T = self.schedule.num_steps
        emb = None
        if self.kind == "linear":
            # Filled row by row during the first trajectory (the teacher sees every step first).
            dim = self._emb_capture.numel() if self._emb_capture is not None else 64
            emb = torch.zeros(T, dim)
        self.ss = ScaleShift(self.slots, T, kind=self.kind, embedding=emb, schedule=self.schedule,
                             model_fp=model_fingerprint(self._orig_mod), mode=self.mode, groups=self.groups).to(device)
        self.optimizer = torch.optim.Adam(self.ss.parameters(), lr=self.lr)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        step = self.step
        final = self.loss_kind == "final"
        target = None
        # The final loss needs no teacher per step, only to learn the cached tensors'
        # shapes (first call) and the timestep embedding rows (first trajectory).
        if not final or self.ss is None or (self.kind == "linear" and step not in self.emb_rows):
            self.phase = "teacher"
            self._emb_capture = None
            with torch.no_grad():
                target = self._orig_mod(*args, **kwargs)
        if self.loss_kind == "trajectory":
            target = self.targets[step]
        if self.ss is None:
            self._init_parameters(_device(self._orig_mod))
        if self.kind == "linear" and step not in self.emb_rows:
            row = self._emb_capture
            if row is None:
                row = sinusoidal_embedding(self._timestep(args, kwargs), self.ss.embedding.shape[1])
            # Unit L1 norm: Adam moves each weight by about lr per update, so gamma and beta
            # then move by at most lr too, as in the table form, whatever the embedding's scale.
            row = row / row.abs().sum().clamp_min(1e-12)
            self.emb_rows[step] = row
            self.ss.embedding[step] = row.to(self.ss.embedding)
        self.phase = "student"
        self.reused = []
        with torch.set_grad_enabled(self.loss_kind != "block"):
            out = self._orig_mod(*args, **kwargs)
        self.calls += 1
        if final:
            return out  # the graph stays: the loss comes after the last step
        if self.reused:
            self._update(out, target, step)
        return pytree.tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, out)

    def _update(self, out, target, step: int) -> None:
        with torch.enable_grad():
            pairs = [(self._guided(s), self._guided(t)) for s, t in zip(pytree.tree_leaves(out), pytree.tree_leaves(target))
                     if isinstance(s, torch.Tensor)]
            out_loss = sum(torch.mean((s.float() - t.float()) ** 2) for s, t in pairs) / len(pairs)
            terms = []
            for k, cached, s, name, j in self.reused:
                want = self.teacher_vals[name].values[j].float()
                got = self.ss.adjust(k, cached, s).float()
                terms.append(torch.mean((got - want) ** 2) / (torch.mean(want ** 2) + 1e-12))
            block_loss = sum(terms) / len(terms)
        loss = block_loss if self.loss_kind == "block" else out_loss
        if not torch.isfinite(loss):
            raise _Diverged(float(loss.detach()), step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _all_reduce_grads(self.ss)
        self.optimizer.step()
        self.losses.append((float(out_loss.detach()), float(block_loss.detach())))

    def update_final(self, got: Any, target: Any) -> float:
        """One step on the final loss: the whole trajectory's graph, back-propagated."""
        if not (isinstance(got, torch.Tensor) and got.requires_grad):
            raise BccError(
                ErrorCode.CONFIG_INVALID,
                "loss='final' back-propagates through the whole trajectory, so `sample` must return the final "
                "sample (a tensor) and run with gradients enabled; samplers usually run under torch.no_grad "
                "(diffusers pipelines do). With bcc.tools.digits.sample pass grad=True; otherwise use loss='output'.",
            )
        with torch.enable_grad():
            loss = torch.mean((got.float() - target.detach().float()) ** 2)
        if not torch.isfinite(loss):
            raise _Diverged(float(loss.detach()), self.schedule.num_steps - 1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _all_reduce_grads(self.ss)
        self.optimizer.step()
        self.caches = {}  # they hold this trajectory's graph
        self.losses.append((float(loss.detach()), float("nan")))
        return float(loss.detach())

    def _guided(self, o: torch.Tensor) -> torch.Tensor:
        # The sampler uses u + w (c - u), which scales errors in c - u by w: an error the
        # raw output loss rates small can dominate the image. Halves: [uncond; cond].
        w = self.guidance_scale
        if w is None or o.shape[0] % 2:
            return o
        u, c = o.float().chunk(2)
        return u + w * (c - u)

    def remove(self) -> None:
        self._restore()
        for h in self._handles:
            h.remove()


class _Recorder(torch.nn.Module):
    """The plain model, keeping each call's output: the teacher's own trajectory."""

    def __init__(self, model):
        super().__init__()
        self._orig_mod = model  # the name wrappers use, so samplers see the model's kind
        self.outputs: list = []

    __getattr__ = delegating_getattr

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            out = self._orig_mod(*args, **kwargs)
        self.outputs.append(out)
        return out


def _record(model, sample, condition, seed) -> list:
    recorder = _Recorder(model)
    sample(recorder, condition, seed)
    return recorder.outputs


class _Diverged(Exception):
    def __init__(self, value: float, step: int):
        super().__init__(value, step)
        self.value, self.step = value, step


def _all_reduce_grads(ss: ScaleShift) -> None:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    # Every rank follows the same schedule, so the same parameters have gradients.
    for p in ss.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def _device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_scale_shift(
    model: torch.nn.Module,
    schedule: Schedule,
    sample: Callable[[torch.nn.Module, Any, int], Any],
    conditions: Sequence[Any],
    config: ScaleShiftTrainConfig | None = None,
    **overrides: Any,
) -> ScaleShift:
    """Learn scale-shift corrections for ``schedule`` by distilling the uncached model.

    Args:
        model: the denoiser; its weights are frozen (``requires_grad`` is restored after).
        schedule: the cache schedule the corrections are for.
        sample: ``sample(model, condition, seed)`` runs one whole trajectory, calling
            ``model`` once per step (the same function :func:`bcc.calibrate` takes).
        conditions: labels or prompts; iteration ``i`` uses ``conditions[i % len]``.
        config: a :class:`ScaleShiftTrainConfig` (iterations, kind, loss, lr, mode,
            checkpoints, guidance, groups; its fields document their trade-offs).
        **overrides: fields of the config to change, e.g. ``iterations=150, loss="final"``.

    Returns:
        The trained :class:`ScaleShift`; ``.history`` has the mean losses per iteration.

    Example:
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.block = torch.nn.Linear(3, 3)
        ...     def forward(self, x, t):
        ...         return self.block(x) * 0.5
        >>> def sample(m, cond, seed):
        ...     x = torch.randn(2, 3, generator=torch.Generator().manual_seed(seed))
        ...     for t in range(4):
        ...         x = x - 0.1 * m(x, torch.tensor(float(t)))
        >>> ss = train_scale_shift(Net(), Schedule.every(2, 4, ["block"]), sample, [None],
        ...                        iterations=3, kind="table", progress=False)
        >>> len(ss.history), ss.tables()[0].shape
        (3, torch.Size([4, 2, 3]))
    """
    config = (config or ScaleShiftTrainConfig()).replace(**overrides)
    if bool(schedule.mask.all()):
        raise BccError(
            ErrorCode.NOTHING_TO_TRAIN,
            "the schedule recomputes every block at every step, so no cached value is ever reused and "
            "there is nothing to correct. Use a schedule that caches (e.g. Schedule.for_budget(profile, 0.5)).",
        )
    if not conditions:
        raise BccError(ErrorCode.CONFIG_INVALID, "conditions is empty; pass the labels or prompts to train on.")
    iterations, loss, lr, seed = config.iterations, config.loss, config.lr, config.seed
    checkpoint, groups, mode = config.checkpoint, config.groups, config.mode
    rank, world = _rank_world()
    ss, start = None, 0
    if config.resume and checkpoint is not None and Path(checkpoint).exists():
        ss = ScaleShift.load(checkpoint)
        ss.check_compatible(schedule, model, mode)
        if ss.groups != groups:
            raise BccError(
                ErrorCode.SCALE_SHIFT_MISMATCH,
                f"the checkpoint {checkpoint} has {ss.groups} batch group(s), this run asks for {groups}; "
                "resume with the same groups or start a new checkpoint.",
            )
        start = int(ss.header.get("iteration", 0))
        ss = ss.to(_device(model))
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    student = _Student(model, schedule, ss, config)
    if ss is not None and ss.kind == "linear":
        student.emb_rows = {s: ss.embedding[s] for s in range(ss.num_steps)}
    history: list[dict[str, float]] = thaw(ss.meta.get("history") if ss is not None else None) or []
    last_good = None
    bar = _progress(range(start, iterations), config.progress and rank == 0, "scale-shift")
    try:
        for it in bar:
            index = it * world + rank
            before = len(student.losses)
            student.calls = 0
            try:
                cond = conditions[index % len(conditions)]
                if loss == "trajectory":
                    student.targets = _record(model, sample, cond, seed + index)
                if loss == "final":
                    with torch.no_grad():
                        target = sample(model, cond, seed + index)
                    student.update_final(sample(student, cond, seed + index), target)
                else:
                    sample(student, cond, seed + index)
            except _Diverged as d:
                where = f"the last good parameters are in {last_good}" if last_good else "no checkpoint was written yet"
                raise BccError(
                    ErrorCode.TRAINING_DIVERGED,
                    f"the scale-shift loss became {d.value} at iteration {it}, step {d.step}; training stopped "
                    f"({where}). Lower the learning rate (lr={lr}) or use loss='block'.",
                ) from None
            if student.calls % schedule.num_steps:
                raise BccError(
                    ErrorCode.STEP_MISMATCH,
                    f"the sampler called the model {student.calls} times; the schedule has "
                    f"{schedule.num_steps} steps. Sample with the schedule's num_inference_steps and call "
                    "the model once per step (guidance halves in one batch).",
                )
            new = student.losses[before:]
            history.append({"iteration": it + 1,
                            "loss_output": sum(o for o, _ in new) / max(len(new), 1),
                            "loss_block": sum(b for _, b in new) / max(len(new), 1)})
            if loss in ("trajectory", "final"):  # the output loss, measured against the teacher's own trajectory
                history[-1]["loss_" + loss] = history[-1]["loss_output"]
            if loss == "final":  # no block is compared with the teacher's
                history[-1].pop("loss_block")
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{history[-1]['loss_' + loss]:.3g}")
            student.ss.annotate(**_meta(student, loss, lr, seed, history))
            if checkpoint is not None and rank == 0 and ((it + 1) % config.checkpoint_every == 0
                                                         or it + 1 == iterations):
                last_good = student.ss.save(checkpoint, iteration=it + 1)
    finally:
        student.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
    trained = student.ss.eval()
    trained.requires_grad_(False)
    trained.history = history
    return trained


def _meta(student: _Student, loss: str, lr: float, seed: int, history: list) -> dict[str, Any]:
    return {"loss": loss, "lr": lr, "seed": seed, "guidance_scale": student.guidance_scale, "embedding": student.emb_source if student.kind == "linear" else None,
            "iterations": len(history), "history": history}


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with diffusers; without it, train silently
        return it
    return tqdm(it, desc=desc, unit="traj")
