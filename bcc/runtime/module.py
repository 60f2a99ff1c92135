"""The drop-in module returned by :func:`bcc.compile`: step tracking and cache state.

The step index lives on the host as a Python int, so choosing the schedule row costs
no device sync: the compiled graph receives ``schedule`` and a preallocated 0-d CPU
step tensor and indexes the row itself. A trajectory is ``T`` consecutive calls; the
next call after the last step starts a new trajectory, so the ordinary loop
``for t in scheduler.timesteps: model(x, t, ...)`` needs no reset across pipeline calls.
"""
from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from bcc.analyze.blocks import ATTENTION, BlockSelector
from bcc.capture.graph import Captured, capture, flatten_call, signature_of
from bcc.config import BccConfig
from bcc.errors import BccError, ErrorCode
from bcc.lower.compile import Lowered, RowDispatch, lower
from bcc.passes import AnnotateBlocksPass
from bcc.plan.profile import model_fingerprint
from bcc.passes.annotate_blocks import BLOCKS
from bcc.scale_shift.params import ScaleShift, channel_dim, table_rows
from bcc.plan.schedule import Schedule

__all__ = ["BccModule"]

_TIMESTEP_NAMES = ("timestep", "timesteps", "t")
# torch.export is not thread-safe (two captures at once failed with "Trying to pop empty
# mode stack"), so a capture and the first, compiling call of its graph are serialised
# across all instances.
_CAPTURE_LOCK = threading.RLock()


@dataclass
class _Entry:
    """Everything tied to one input signature (batch, resolution, dtype, device)."""

    captured: Captured
    lowered: Lowered
    schedule: torch.Tensor  # columns in the graph's block order
    caches: list[torch.Tensor] = field(default_factory=list)
    # Scale-shift tables, one per cache slot (empty without scale-shift); graph inputs
    # after the caches, so they are data, not constants baked into the compiled code.
    scale_shift: list[torch.Tensor] = field(default_factory=list)


def delegating_getattr(self: torch.nn.Module, name: str) -> Any:
    """``__getattr__`` for wrappers that keep the model as ``_orig_mod``: attributes they
    do not define (``config``, ``dtype``, ...) come from the model, so they can stand in
    for it (``pipe.unet = wrapper``)."""
    try:
        return torch.nn.Module.__getattr__(self, name)
    except AttributeError:
        return getattr(self._modules["_orig_mod"], name)


class BccModule(torch.nn.Module):
    """A denoiser whose blocks follow a :class:`Schedule`; call it like the original.

    Attribute lookups it does not define (``config``, ``dtype``, ``device``, ...) go to
    the original model, so it can replace ``pipe.unet`` or ``pipe.transformer``.
    Build it with :func:`bcc.compile`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        schedule: Schedule | Callable[[tuple[str, ...]], Schedule],
        config: BccConfig,
        blocks: BlockSelector | None = None,
        scale_shift: ScaleShift | None = None,
    ):
        super().__init__()
        self._orig_mod = model
        # Not a submodule: its parameters are not the model's, and state_dict()
        # should keep looking like the original model's.
        self.__dict__["_bcc_ss"] = scale_shift
        self._bcc_config = config
        self._bcc_blocks = blocks
        self._bcc_schedule_src = schedule
        self._bcc_schedule: Schedule | None = schedule if isinstance(schedule, Schedule) else None
        self._bcc_entries: dict[tuple, _Entry] = {}
        self._bcc_current: _Entry | None = None
        self._bcc_step = 0
        self._bcc_timesteps: list[float] = []  # check mode: the first trajectory's timesteps
        self._bcc_lock = threading.Lock()
        try:
            self._bcc_signature = inspect.signature(model.forward)
        except (TypeError, ValueError):
            self._bcc_signature = None
        self._bcc_steps: list[torch.Tensor] = []
        if self._bcc_schedule is not None:
            self._make_steps(self._bcc_schedule.num_steps)

    __getattr__ = delegating_getattr

    # -- public state ----------------------------------------------------------------
    @property
    def bcc_schedule(self) -> Schedule | None:
        """The schedule in use (None until the first call if a schedule factory was given)."""
        return self._bcc_schedule

    @property
    def bcc_step(self) -> int:
        """The step the next call will run."""
        return self._bcc_step

    @property
    def bcc_blocks(self) -> tuple[str, ...] | None:
        return None if self._bcc_schedule is None else self._bcc_schedule.block_names

    def bcc_reset(self) -> None:
        """Start the next call at step 0. Only needed after abandoning a trajectory by hand."""
        self._bcc_step = 0

    def bcc_graph(self) -> torch.fx.GraphModule | None:
        """The rewritten graph of the most recent input signature (for inspection)."""
        return None if self._bcc_current is None else self._bcc_current.lowered.gm

    def bcc_stats(self) -> dict[str, int]:
        """What the compiled model holds: ``signatures`` (input signatures captured),
        ``graphs`` (compiled so far: one per signature, or one per distinct schedule row
        with ``strategy="specialize"``) and ``cache_bytes`` (the cached block outputs,
        kept between steps).

        Example:
            >>> import bcc, torch
            >>> class Net(torch.nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.block = torch.nn.Linear(2, 2)
            ...     def forward(self, x, t):
            ...         return self.block(x) * t
            >>> m = bcc.compile(Net(), lambda names: bcc.Schedule.every(2, 3, names), blocks="block", backend="eager")
            >>> m.bcc_stats()["graphs"]
            0
            >>> _ = m(torch.ones(1, 2), torch.tensor(0))
            >>> s = m.bcc_stats(); (s["signatures"], s["graphs"], s["cache_bytes"])
            (1, 1, 8)
        """
        graphs = sum(len(e.lowered.fn.variants) if isinstance(e.lowered.fn, RowDispatch) else 1
                     for e in self._bcc_entries.values())
        cache_bytes = sum(c.numel() * c.element_size() for e in self._bcc_entries.values() for c in e.caches)
        return {"signatures": len(self._bcc_entries), "graphs": graphs, "cache_bytes": cache_bytes}

    def set_schedule(self, schedule: Schedule, scale_shift: ScaleShift | None = None) -> None:
        """Swap the schedule without recompiling (same blocks and step count).

        The schedule is a graph input, so the compiled code is reused as is. A model
        compiled with scale-shift takes the new schedule's parameters as ``scale_shift``
        (their tables are inputs too); without them it caches naively (identity tables).
        """
        if scale_shift is not None:
            if self._bcc_ss is None:
                raise BccError(
                    ErrorCode.CONFIG_INVALID,
                    "this model was compiled without scale-shift, so its graph has no place for the "
                    "parameters; compile it again with bcc.compile(..., scale_shift=...).",
                )
            scale_shift.check_compatible(schedule, self._orig_mod, self._bcc_config.mode)
        current = self._bcc_schedule
        if current is not None and schedule.num_steps != current.num_steps:
            raise BccError(
                ErrorCode.SCHEDULE_SHAPE,
                f"new schedule has {schedule.num_steps} steps, the compiled model {current.num_steps}; "
                "compile again with bcc.compile for another step count.",
            )
        if current is not None:
            schedule.reorder(current.block_names)  # validates the names
        self._bcc_schedule = schedule
        self._make_steps(schedule.num_steps)
        if self._bcc_ss is not None:
            self.__dict__["_bcc_ss"] = scale_shift or _IdentityTables(schedule.num_steps)
        for entry in self._bcc_entries.values():
            entry.schedule = schedule.reorder(entry.lowered.block_names).mask
            if self._bcc_ss is not None:
                entry.scale_shift = self._bcc_ss.tables_for(entry.lowered.slots)
        self._bcc_step = 0
        self._bcc_timesteps = []

    # -- the call ----------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._normalise_timestep(args, kwargs)
        leaves, spec = flatten_call(args, kwargs)
        signature = signature_of(leaves, spec)
        with self._bcc_lock:
            # A trajectory belongs to the thread that started it: another thread's call
            # would take the owner's next schedule row and overwrite its caches. The
            # refusal leaves the owner's trajectory untouched (no reset).
            me = threading.get_ident()
            if self._bcc_step == 0:
                self._bcc_owner = me
            elif me != self._bcc_owner:
                raise BccError(
                    ErrorCode.CONCURRENT_TRAJECTORY,
                    f"another thread is at step {self._bcc_step} of {self._bcc_schedule.num_steps} of a "
                    "trajectory on this compiled model. Use one bcc.compile(model, schedule) per thread "
                    "(they share the weights) or serialise whole generations; model.bcc_reset() hands "
                    "an abandoned trajectory over.",
                )
            try:
                # One parameter walk per trajectory start, shared with _run.
                stale = self._bcc_step == 0 and self._stale()
                capturing = stale or signature not in self._bcc_entries
                with _CAPTURE_LOCK if capturing else contextlib.nullcontext():
                    return self._run(args, kwargs, leaves, spec, signature, stale)
            except BaseException:
                # A failed call leaves the trajectory in an unknown state: start clean.
                self._bcc_step = 0
                raise

    def _run(self, args, kwargs, leaves, spec, signature, stale: bool) -> Any:
        if stale:
            # A replaced parameter, buffer or submodule is invisible to the captured
            # graphs, which hold the old objects: capture again (in-place updates are seen).
            self._bcc_entries.clear()
            self._bcc_current = None
        entry = self._bcc_current
        if entry is None or entry.captured.signature != signature:
            if self._bcc_step != 0:
                raise BccError(
                    ErrorCode.SIGNATURE_CHANGED,
                    f"the inputs changed in the middle of a trajectory (step {self._bcc_step} of "
                    f"{self._bcc_schedule.num_steps}): {_diff(entry.captured.signature, signature)}. "
                    "Cached block values are tied to batch size, resolution, dtype and device; keep "
                    "them fixed for all steps of one generation. The next call starts a new trajectory.",
                )
            entry = self._bcc_entries.get(signature)
            if entry is None:
                entry = self._build(args, kwargs, signature)
                self._bcc_entries[signature] = entry
                self._bcc_tensors = self._model_tensors()
            self._bcc_current = entry
        step = self._bcc_step
        if self._bcc_config.check:
            step = self._check_timestep(args, kwargs, step)
        tensors = [leaves[i] for i in entry.captured.tensor_positions]
        outs = entry.lowered.fn(entry.schedule, self._bcc_steps[step], *entry.caches, *entry.scale_shift, *tensors)
        n_user = len(outs) - len(entry.caches)
        # Caches are state, not part of the autograd graph of the next step.
        entry.caches = [c.detach() for c in outs[n_user:]]
        self._bcc_step = (step + 1) % self._bcc_schedule.num_steps
        return pytree.tree_unflatten(list(outs[:n_user]), entry.captured.out_spec)

    def _build(self, args, kwargs, signature) -> _Entry:
        self._check_provenance()
        captured = capture(self._orig_mod, args, kwargs)
        if self._bcc_schedule is None:
            annotated = AnnotateBlocksPass(selector=self._bcc_blocks or ATTENTION)(captured.gm)
            names = annotated.graph_module.meta[BLOCKS]
            self._bcc_schedule = self._bcc_schedule_src(tuple(names))
            self._make_steps(self._bcc_schedule.num_steps)
        ss = self._bcc_ss
        if ss is not None:
            ss.check_compatible(self._bcc_schedule, self._orig_mod, self._bcc_config.mode)
        lowered = lower(captured, self._bcc_schedule.block_names, self._bcc_config, scale_shift=ss is not None)
        mask = self._bcc_schedule.reorder(lowered.block_names).mask
        caches = [torch.zeros(s.shape, dtype=s.dtype, device=s.device) for s in lowered.slots]
        tables = ss.tables_for(lowered.slots) if ss is not None else []
        return _Entry(captured, lowered, mask, caches, tables)

    def _model_tensors(self) -> tuple[torch.Tensor, ...]:
        # Held (not just their ids) so that no new tensor can reuse an old one's id.
        return (*self._orig_mod.parameters(), *self._orig_mod.buffers())

    def _stale(self) -> bool:
        """Whether a parameter, buffer or submodule was replaced since the last capture."""
        return bool(self._bcc_entries) and _ids(self._model_tensors()) != _ids(self._bcc_tensors)

    def _check_provenance(self) -> None:
        # A schedule planned from a change profile records the profiled model; applying
        # it to another model would silently follow someone else's change curves.
        expected = self._bcc_schedule.meta.get("profile_fingerprint") if self._bcc_schedule else None
        if expected and expected != model_fingerprint(self._orig_mod):
            raise BccError(
                ErrorCode.PROFILE_MISMATCH,
                f"the schedule was planned from a change profile of another model (fingerprint {expected}, "
                f"this model {model_fingerprint(self._orig_mod)}). Calibrate this model with bcc.calibrate "
                "and plan its own schedule.",
            )

    def _make_steps(self, num_steps: int) -> None:
        # One preallocated CPU scalar per step: passing a Python int would make Dynamo
        # specialise (and recompile) on its value.
        self._bcc_steps = [torch.tensor(s, dtype=torch.int64) for s in range(num_steps)]

    # -- timesteps ---------------------------------------------------------------------
    def _timestep_arg(self, args, kwargs) -> tuple[str | int, Any] | None:
        for name in _TIMESTEP_NAMES:
            if name in kwargs:
                return name, kwargs[name]
        if self._bcc_signature is not None:
            params = [p for p in self._bcc_signature.parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            for i, p in enumerate(params[: len(args)]):
                if p.name in _TIMESTEP_NAMES:
                    return i, args[i]
        return None

    def _normalise_timestep(self, args, kwargs):
        # A Python-number timestep would be baked into the export as a constant and
        # force a new capture every step; as a 0-d tensor it is an input.
        found = self._timestep_arg(args, kwargs)
        if found is None or not isinstance(found[1], (int, float)) or isinstance(found[1], bool):
            return args, kwargs
        key, value = found
        tensor = torch.tensor(value)
        if isinstance(key, int):
            args = args[:key] + (tensor,) + args[key + 1:]
        else:
            kwargs = {**kwargs, key: tensor}
        return args, kwargs

    def _check_timestep(self, args, kwargs, step: int) -> int:
        found = self._timestep_arg(args, kwargs)
        if found is None:
            return step
        value = found[1]
        t = float(value.flatten()[0].item()) if isinstance(value, torch.Tensor) else float(value)
        expected = list(self._bcc_schedule.timesteps or self._bcc_timesteps)
        T = self._bcc_schedule.num_steps
        if step < len(expected):
            if t == expected[step]:
                return step
            if step != 0 and t == expected[0]:
                raise BccError(
                    ErrorCode.STEP_MISMATCH,
                    f"at step {step} of {T} the model got the first step's timestep {t:g} again: either "
                    "the previous generation was abandoned (call model.bcc_reset() before starting "
                    "a new one) or the pipeline calls the model more than once per step (a schedule "
                    "step is one model call; batch the guidance halves into one call).",
                )
            if step == 0 and len(expected) == T:
                raise BccError(
                    ErrorCode.STEP_OVERFLOW,
                    f"call {T + 1} of a {T}-step trajectory: the model was called more times than "
                    f"the schedule has steps (timestep {t:g}, a new trajectory would start at "
                    f"{expected[0]:g}). Build the schedule for the pipeline's num_inference_steps.",
                )
            raise BccError(
                ErrorCode.STEP_MISMATCH,
                f"at step {step} the model got timestep {t:g} but the schedule's trajectory has "
                f"{expected[step]:g}. The pipeline's steps do not match the schedule: use the same "
                "scheduler and num_inference_steps the schedule was made for, and call the model "
                "once per step.",
            )
        self._bcc_timesteps.append(t)
        return step


class _IdentityTables:
    """Zero tables for every cache slot: naive caching through a scale-shift graph.

    Used after ``set_schedule`` without parameters, so a new schedule never runs with
    corrections trained for another one.
    """

    mode = None

    def __init__(self, num_steps: int):
        self.num_steps = num_steps

    def check_compatible(self, *args: Any) -> None:
        return None

    def tables_for(self, graph_slots) -> list[torch.Tensor]:
        return [torch.zeros(self.num_steps, 2, table_rows(s.shape), s.shape[channel_dim(len(s.shape))] if s.shape else 1,
                            dtype=s.dtype, device=s.device) for s in graph_slots]


def _ids(tensors: tuple[torch.Tensor, ...]) -> list[int]:
    return [id(t) for t in tensors]


def _diff(old: tuple, new: tuple) -> str:
    if old[0] != new[0]:
        return "the call's argument structure changed"
    for i, (a, b) in enumerate(zip(old[1], new[1])):
        if a != b:
            what = {1: "shape", 2: "dtype", 3: "device"}
            if a[0] == "T" and b[0] == "T":
                for k, label in what.items():
                    if a[k] != b[k]:
                        return f"input leaf {i} {label} {a[k]} -> {b[k]}"
            return f"input leaf {i} changed from {a[1:]} to {b[1:]}"
    return "unknown change"
