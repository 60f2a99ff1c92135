"""lower: a denoiser with its cache schedule as one ``torch.export`` program.

:func:`export` captures the model, rewrites its blocks into schedule-gated
``torch.cond`` branches (:func:`bcc.passes.run_passes`, the pass list
:func:`bcc.compile` runs, with weights lifted to inputs) and exports the rewritten graph. The program is functional: it takes
``(bcc_schedule, bcc_step, *caches, *model tensor leaves)`` (with scale-shift also
``bcc_ss_step`` after the caches) and returns
``(*model output leaves, *new caches)``, so the trajectory state lives outside it and
the artifact needs no Python to run (``torch.export.save`` or an AOTInductor package).
:class:`ExportedDenoiser` holds that state in a :class:`bcc.lower.stepper.Stepper`
(the one ``bcc.compile`` uses) and is called like the original model.

Everything in an exported program is static: batch size, resolution, dtype and device
are those of the example inputs (the caches have those shapes). A call with other
shapes is refused (``BCC703``); export again for another shape.

The step that gates the blocks is a CPU tensor (the predicates are host reads, free of
any device sync); the baked scale-shift tables are indexed by ``bcc_ss_step``, the same
step as a one-element tensor on the tables' device, which :class:`ExportedDenoiser`
prepares once per step at load time, so no device table is ever indexed by a CPU tensor.
"""
from __future__ import annotations

import hashlib
import inspect
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from bcc._io import write_json
from bcc.analyze.blocks import module_calls
from bcc.capture.graph import capture, flatten_call
from bcc.capture.signature import Signature, TensorLeaf, diff, signature_of, split_example_inputs
from bcc.config import DEFAULT_INDUCTOR_OPTIONS
from bcc.errors import BccError, BccInternalError, ErrorCode
from bcc.lower.inductor_fixes import inductor_settings
from bcc.passes import PassConfig, run_passes
from bcc.passes.annotate_blocks import BLOCKS
from bcc.passes.gate_blocks import SLOTS
from bcc.passes.lift_weights import WEIGHTS, fetch_attr
from bcc.plan.schedule import Schedule
from bcc.lower.stepper import CacheSpec, Program, StepRef, Stepper
from bcc.scale_shift.params import ScaleShift

__all__ = ["ExportMeta", "ExportedDenoiser", "export", "save_exported", "load_exported", "meta_path"]

FORMAT = "bcc-export"
# 3: slots record their device, scale-shift programs take bcc_ss_step; 2: the signature
# is a Signature's JSON; 1: nested lists. 1 and 2 are still read (their caches go on the
# device of the recorded inputs, their tables were indexed by the CPU step).
VERSION = 3
_READS = (1, 2, 3)
SS_STEP = "bcc_ss_step"
_META_KEY = "bcc_export"
_SCHEDULE_VERSION = 1  # Schedule.to_dict's format version this reader understands


@dataclass(frozen=True)
class ExportMeta:
    """What a runner needs beside the program; saved as JSON next to the ``.pt2``.

    Attributes:
        block_names: cached blocks in graph order (the schedule's columns).
        schedule: ``Schedule.to_dict()`` of the export-time schedule, columns in
            graph order (the baked one, or the initial one of a schedule input).
        schedule_input: the schedule is the program's first input (swappable).
        slots: ``{"block", "output", "base", "also", "shape", "dtype", "device"}`` per cache
            tensor (``device`` since format 3).
        state_inputs: names of the program's inputs before the model's tensors.
        num_outputs: the model's output leaves (the caches follow them).
        signature: the :class:`bcc.capture.signature.Signature` of the example call
            (shapes/dtypes/devices and constants; JSON via ``Signature.to_json``).
        out_spec: ``treespec_dumps`` of the model's output, or None (then a tuple).
        mode: ``"residual"`` or ``"output"`` caching.
        scale_shift: scale-shift tables for ``schedule`` are baked into the program.
        kind: ``"program"`` (``torch.export.save``) or ``"aoti"`` (AOTInductor package).
        sha256: digest of the saved artifact, pairing this file with it.
    """

    block_names: tuple[str, ...]
    schedule: dict
    schedule_input: bool
    slots: tuple[dict, ...]
    state_inputs: tuple[str, ...]
    num_outputs: int
    signature: Signature
    out_spec: str | None
    mode: str
    scale_shift: bool = False
    kind: str = ""
    sha256: str = ""
    torch_version: str = torch.__version__

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **asdict(self), "signature": self.signature.to_json()}

    @classmethod
    def from_dict(cls, d: dict, where: str = "metadata") -> "ExportMeta":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise BccError(ErrorCode.ARTIFACT_MISMATCH,
                           f"{where} is not bcc export metadata (format={d.get('format') if isinstance(d, dict) else None!r}); "
                           "load a .pt2 written by bcc.save_exported or 'bcc export'.")
        if d.get("version") not in _READS or (d.get("schedule") or {}).get("version") != _SCHEDULE_VERSION:
            raise BccError(ErrorCode.ARTIFACT_MISMATCH,
                           f"{where} was written by another bcc export format (export version {d.get('version')!r}, "
                           f"schedule version {(d.get('schedule') or {}).get('version')!r}; this bcc reads export "
                           f"versions {list(_READS)} and schedule version {_SCHEDULE_VERSION}). Export the model "
                           "again with this version of bcc.")
        fields = {k: v for k, v in d.items() if k not in ("format", "version")}
        try:
            fields["block_names"] = tuple(fields["block_names"])
            fields["slots"] = tuple(fields["slots"])
            fields["state_inputs"] = tuple(fields["state_inputs"])
            fields["signature"] = Signature.from_json(fields["signature"])
            return cls(**fields)
        except (KeyError, TypeError) as e:
            raise BccError(ErrorCode.ARTIFACT_MISMATCH, f"{where} is incomplete ({e}); export the model again.") from None


def export(
    model: torch.nn.Module,
    schedule: Schedule,
    example_inputs: tuple[tuple, dict] | tuple,
    *,
    schedule_input: bool = True,
    mode: str = "residual",
    scale_shift: ScaleShift | None = None,
) -> torch.export.ExportedProgram:
    """Export ``model`` with its blocks gated on ``schedule`` as one ``ExportedProgram``.

    Args:
        model: the denoiser.
        schedule: a :class:`Schedule` naming the model's blocks.
        example_inputs: ``(args, kwargs)`` of one step; every shape is fixed by them.
        schedule_input: True (default) keeps the schedule a program input, so one
            artifact serves any schedule over the same blocks and step count
            (:meth:`ExportedDenoiser.set_schedule`); False bakes it in as a constant.
        mode: ``"residual"`` or ``"output"`` caching, as in :class:`bcc.BccConfig`.
        scale_shift: trained :class:`bcc.ScaleShift` parameters for ``schedule``; their
            ``[T, 2, B, C]`` tables are baked into the program as constants, so the
            artifact's schedule can then not be swapped (``BCC505``).

    Returns:
        A program over ``(bcc_schedule?, bcc_step, *caches, bcc_ss_step?, *tensors)``
        (scale-shift tables are constants; ``bcc_ss_step`` is the step on their device)
        returning ``(*outputs, *new caches)``; run it with :class:`ExportedDenoiser`
        or save it with :func:`save_exported`.

    Example:
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.block = torch.nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return x + self.block(x)
        >>> ep = export(Net(), Schedule.every(2, 3, ["block"]), (torch.ones(1, 2),))
        >>> sum(n.target is torch.ops.higher_order.cond for n in ep.graph.nodes)
        1
        >>> [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        ['bcc_schedule', 'bcc_step', 'bcc_cache_0_0', 'x']
    """
    if not isinstance(schedule, Schedule):
        raise BccError(ErrorCode.SCHEDULE_DTYPE,
                       f"schedule must be a bcc.Schedule, got {type(schedule).__name__}. Build one with "
                       "bcc.Schedule.every(n, steps, bcc.find_blocks(model, example_inputs)).")
    args, kwargs = split_example_inputs(example_inputs)
    captured = capture(model, args, kwargs)
    missing = sorted(set(schedule.block_names) - set(module_calls(captured.gm)))
    if missing:
        raise BccError(ErrorCode.BLOCK_NOT_FOUND,
                       f"the schedule names block(s) {missing[:4]} that {type(model).__name__} does not contain: it "
                       "was made for another model. List this model's blocks with bcc.find_blocks(model, "
                       "example_inputs) and build the schedule from them.")
    if scale_shift is not None:
        scale_shift.check_compatible(schedule, model, mode)
    gm = run_passes(captured.gm, PassConfig(names=tuple(schedule.block_names), mode=mode,
                                            scale_shift=scale_shift is not None, target="export"))
    weights = list(gm.meta[WEIGHTS])
    names = tuple(gm.meta[BLOCKS])
    ordered = schedule.reorder(names)
    slots = tuple(gm.meta[SLOTS])
    leaves, _ = flatten_call(args, kwargs)
    tensors = [leaves[i] for i in captured.tensor_positions]
    tables = [] if scale_shift is None else scale_shift.tables_for(slots)
    state = _state_inputs(gm, len(tensors) + len(weights))
    state = [n for n in state if not n.startswith("bcc_ss_")]  # baked in, not inputs
    caches = [torch.zeros(s.shape, dtype=s.dtype, device=s.device) for s in slots]
    step = torch.zeros((), dtype=torch.int64)
    ss_step = [torch.zeros(1, dtype=torch.int64, device=tables[0].device)] if tables else []
    state += [SS_STEP] if tables else []
    root = _Program(gm, weights, None if schedule_input else ordered.mask, tables)
    inputs = ((ordered.mask,) if schedule_input else ()) + (step, *caches, *ss_step, *tensors)
    with torch.no_grad():
        ep = torch.export.export(root, inputs, strict=False)
    try:
        out_spec = pytree.treespec_dumps(captured.out_spec)
    except Exception:  # output classes without a serialisable pytree name come back as tuples
        out_spec = None
    meta = ExportMeta(
        block_names=names, schedule=ordered.to_dict(), schedule_input=schedule_input,
        slots=tuple({"block": s.block, "output": s.output, "base": s.base, "also": list(s.also),
                     "shape": list(s.shape), "dtype": str(s.dtype).removeprefix("torch."), "device": str(s.device)}
                    for s in slots),
        state_inputs=tuple(state if schedule_input else state[1:]),
        num_outputs=len(gm.graph.output_node().args[0]) - len(slots),
        signature=captured.signature, out_spec=out_spec, mode=mode,
        scale_shift=scale_shift is not None,
    )
    ep.graph_module.meta[_META_KEY] = meta
    return ep


def _state_inputs(gm: fx.GraphModule, n_rest: int) -> list[str]:
    """Names of the placeholders before the last ``n_rest``: schedule, step, caches, scale-shift.

    Read from the graph rather than assumed, so passes that add state inputs after
    the caches need no change here.
    """
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    state = names[: len(names) - n_rest]
    if state[:2] != ["bcc_schedule", "bcc_step"]:
        raise BccInternalError(f"rewritten graph does not start with the schedule and step: {state[:3]}")
    return state


class _Program(torch.nn.Module):
    """The exported root: weights enter the rewritten graph as operands.

    torch.export lifts module weights only at the top level; a weight read inside a
    ``cond`` branch would be exported as a fake constant, so every weight is a graph
    input, passed from this module's attributes (export lifts those as parameters).
    The baked scale-shift tables reach the graph as this step's rows, picked with the
    ``bcc_ss_step`` input, which lives on their device (the graph's own step is a CPU tensor).
    """

    def __init__(self, gm: fx.GraphModule, weights: list[str], schedule: torch.Tensor | None,
                 tables: Sequence[torch.Tensor] = ()):
        super().__init__()
        self.rewritten = gm
        self._weights = weights
        # Plain tensor attributes, not buffers: export records them as constants.
        self._schedule = schedule
        self._tables = list(tables)
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"][: -len(weights) or None]
        # Tables go where the graph expects them: after the caches, counted among forward's inputs.
        first = next((i for i, n in enumerate(names) if n.startswith("bcc_ss_")), len(names))
        self._n_before_tables = first - (schedule is not None)
        names = [n for n in names if not n.startswith("bcc_ss_")]
        if self._tables:
            names.insert(first, SS_STEP)

        # export names the program's inputs after forward's parameters: give them the graph's names.
        def forward(*inputs: torch.Tensor):
            return self._call(*inputs)

        forward.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names[schedule is not None:]])
        self.forward = forward

    def _call(self, *inputs: torch.Tensor):
        head = () if self._schedule is None else (self._schedule,)
        weights = [fetch_attr(self.rewritten, w) for w in self._weights]
        k = self._n_before_tables
        if not self._tables:
            return self.rewritten(*head, *inputs, *weights)
        rows = [t.index_select(0, inputs[k]) for t in self._tables]
        return self.rewritten(*head, *inputs[:k], *rows, *inputs[k + 1:], *weights)


# -- running ----------------------------------------------------------------------------
class ExportedDenoiser:
    """Runs an exported bcc program step by step, called like the original model.

    Holds the trajectory in a :class:`bcc.lower.stepper.Stepper` (as
    :func:`bcc.compile` does): by default the next call after the last step starts a new
    trajectory; :meth:`call_at` takes the step from pipeline code instead. Build it with
    :func:`load_exported` or :meth:`from_program`.

    Example:
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.block = torch.nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return x + self.block(x)
        >>> run = ExportedDenoiser.from_program(export(Net(), Schedule.every(2, 3, ["block"]), (torch.ones(1, 2),)))
        >>> [tuple(run(torch.ones(1, 2)).shape) for _ in range(3)], run.step
        ([(1, 2), (1, 2), (1, 2)], 0)
    """

    def __init__(self, program: Callable[..., Any], meta: ExportMeta):
        self.meta = meta
        self._schedule = Schedule.from_dict(meta.schedule)
        # Caches live where the model ran at export time (format 3 records it per slot;
        # older metadata only through the recorded inputs).
        default = _inputs_device(meta.signature)
        caches = tuple(CacheSpec(tuple(s["shape"]), getattr(torch, s["dtype"]), torch.device(s.get("device", default)))
                       for s in meta.slots)
        # bcc_ss_step's rows: the step on the tables' device, made once here, so a call
        # costs no host-to-device copy.
        extra = ((torch.arange(self._schedule.num_steps, device=caches[0].device),)
                 if SS_STEP in meta.state_inputs and caches else ())
        self._stepper = Stepper(Program(program, self._schedule.mask, caches, extra,
                                        schedule_input=meta.schedule_input))
        self._out_spec = None if meta.out_spec is None else pytree.treespec_loads(meta.out_spec)

    @classmethod
    def from_program(cls, ep: torch.export.ExportedProgram) -> "ExportedDenoiser":
        """Run a program from :func:`export` in this process (no file)."""
        return cls(ep.module(), exported_meta(ep))

    @property
    def step(self) -> int:
        """The step the next plain call will run."""
        return self._stepper.next_ref().step

    @property
    def stepper(self) -> Stepper:
        """The trajectory state: ``state()``, ``source``, and ``program.fn`` (the loaded program)."""
        return self._stepper

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    def reset(self) -> None:
        """Start a new trajectory at the next call (pipeline code: at every generation's start)."""
        self._stepper.reset()

    def set_schedule(self, schedule: Schedule) -> None:
        """Use another schedule over the same blocks and step count; nothing is recompiled."""
        if self.meta.scale_shift:
            raise BccError(ErrorCode.SCALE_SHIFT_MISMATCH,
                           "this artifact has scale-shift corrections baked in for its own schedule; another "
                           "schedule needs its own corrections: train them and export again.")
        if not self.meta.schedule_input:
            raise BccError(ErrorCode.ARTIFACT_MISMATCH,
                           "this artifact has its schedule baked in; export with schedule_input=True "
                           "(or 'bcc export --schedule-input') to swap schedules without re-exporting.")
        if schedule.num_steps != self._schedule.num_steps:
            raise BccError(ErrorCode.SCHEDULE_SHAPE,
                           f"the new schedule has {schedule.num_steps} steps, the artifact {self._schedule.num_steps}; "
                           "export again for another step count.")
        ordered = schedule.reorder(self.meta.block_names)
        with self._stepper.lock:
            self._stepper.bind(replace(self._stepper.program, schedule=ordered.mask))
            self._stepper.reset()
        self._schedule = ordered

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(None, args, kwargs)

    def call_at(self, ref: StepRef, *args: Any, **kwargs: Any) -> Any:
        """Call the program as the call ``ref`` of the trajectory (see ``BccModule.bcc_call_at``)."""
        return self._call(ref, args, kwargs)

    def _call(self, ref: StepRef | None, args: tuple, kwargs: dict) -> Any:
        got = signature_of(args, kwargs)
        if got != self.meta.signature:
            raise BccError(ErrorCode.STATIC_SHAPE,
                           f"the call does not match the exported inputs ({diff(self.meta.signature, got)}). "
                           "An exported bcc program is static in batch size, resolution, dtype, device and "
                           "non-tensor arguments; export again with example inputs of the new shape.")
        leaves, _ = flatten_call(args, kwargs)
        outs = self._stepper.run(ref, [x for x in leaves if isinstance(x, torch.Tensor)])
        return tuple(outs) if self._out_spec is None else pytree.tree_unflatten(outs, self._out_spec)


def _inputs_device(signature: Signature) -> str:
    """The device most of the recorded tensor inputs are on (a CPU timestep beside a
    CUDA latent does not move the caches); ``"cpu"`` without tensors."""
    devices = Counter(x.device for x in signature.leaves if isinstance(x, TensorLeaf))
    return devices.most_common(1)[0][0] if devices else "cpu"


def exported_meta(ep: torch.export.ExportedProgram) -> ExportMeta:
    meta = ep.graph_module.meta.get(_META_KEY)
    if meta is None:
        raise BccError(ErrorCode.ARTIFACT_MISMATCH,
                       "this ExportedProgram was not made by bcc.export (it has no bcc metadata); "
                       "export the model with bcc.export(model, schedule, example_inputs).")
    return meta


# -- files ------------------------------------------------------------------------------
def meta_path(path: str | Path) -> Path:
    """The metadata file beside an artifact: ``unet.pt2`` -> ``unet.bcc.json``."""
    return Path(path).with_suffix(".bcc.json")


def save_exported(ep: torch.export.ExportedProgram, path: str | Path, *, aoti: bool = False,
                  inductor_configs: dict | None = None) -> Path:
    """Write ``ep`` to ``path`` (``.pt2``) and its metadata to :func:`meta_path`.

    Args:
        ep: a program from :func:`export`.
        path: the artifact to write.
        aoti: compile an AOTInductor package (C++; minutes on large models) instead
            of saving the program with ``torch.export.save``.
        inductor_configs: inductor settings for ``aoti`` (bcc's defaults otherwise).

    Example:
        >>> import tempfile
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.block = torch.nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return x + self.block(x)
        >>> ep = export(Net(), Schedule.every(2, 3, ["block"]), (torch.ones(1, 2),))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = save_exported(ep, f"{d}/net.pt2")
        ...     run = load_exported(path)
        ...     sorted(p.name for p in path.parent.iterdir()), run.meta.block_names
        (['net.bcc.json', 'net.pt2'], ('block',))
    """
    meta = exported_meta(ep)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if aoti:
        from torch._inductor import aoti_compile_and_package

        with inductor_settings({**DEFAULT_INDUCTOR_OPTIONS, **(inductor_configs or {})}) as configs:
            aoti_compile_and_package(ep, package_path=str(path), inductor_configs=configs)
    else:
        torch.export.save(ep, path)
    kind = "aoti" if aoti else "program"
    write_json(meta_path(path), {**meta.to_dict(), "kind": kind, "sha256": _sha256(path)})
    return path


def load_exported(path: str | Path) -> ExportedDenoiser:
    """Load an artifact written by :func:`save_exported` (or ``bcc export``) and its metadata.

    The metadata's digest must match the artifact, so a ``.pt2`` rebuilt for another
    schedule or model is refused (``BCC704``) rather than run with the wrong state.
    """
    import json

    path = Path(path)
    mpath = meta_path(path)
    if not path.is_file():
        raise BccError(ErrorCode.FILE_INVALID, f"{path} does not exist; check the path.")
    try:
        payload = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise BccError(ErrorCode.ARTIFACT_MISMATCH,
                       f"{mpath} is missing: bcc needs the metadata written beside {path.name} by "
                       "bcc.save_exported or 'bcc export'; copy it along with the artifact.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BccError(ErrorCode.ARTIFACT_MISMATCH, f"{mpath} is not valid JSON ({e}); export again.") from None
    meta = ExportMeta.from_dict(payload, str(mpath))
    if meta.sha256 != _sha256(path):
        raise BccError(ErrorCode.ARTIFACT_MISMATCH,
                       f"{path.name} is not the artifact {mpath.name} describes (digest differs): it was rebuilt "
                       "for another model or schedule. Keep each .pt2 with its own .bcc.json, or export again.")
    if meta.kind == "aoti":
        from torch._inductor import aoti_load_package

        program = aoti_load_package(str(path))
    elif meta.kind == "program":
        program = torch.export.load(path).module()
    else:
        raise BccError(ErrorCode.ARTIFACT_MISMATCH, f"{mpath} names an unknown artifact kind {meta.kind!r}; export again.")
    return ExportedDenoiser(program, meta)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
