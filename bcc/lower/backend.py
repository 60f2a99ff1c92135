"""lower: the ``bcc`` backend for ``torch.compile``.

``torch.compile(model, backend="bcc", options={"schedule": schedule}, dynamic=False)``
gives the same model as :func:`bcc.compile`, through Dynamo's door. Dynamo hands the
backend a torch-level graph whose nodes carry ``nn_module_stack``; the backend
re-exports it to ATen with :func:`bcc.capture.graph.capture` (the module paths survive, so
the blocks get the same names as in ``bcc.compile``), runs the same pass list
(:func:`bcc.passes.run_passes`) and compiles the result with inductor. It returns a
:class:`BackendGraph`, which holds the trajectory in a
:class:`bcc.lower.stepper.Stepper`, as ``BccModule`` does.

The backend is found by name without importing bcc (the ``torch_dynamo_backends``
entry point in ``pyproject.toml``); importing bcc registers it too when bcc is not
installed as a distribution (a source checkout on ``sys.path``).

What it refuses: options without a schedule (``BCC701``); a graph that does not hold
all of the schedule's blocks, i.e. a regional compile of blocks or a graph break
(``BCC702``: each region would need its own step counter, and repeated blocks share
one compiled graph); symbolic shapes (``BCC703``: caches are static, pass
``dynamic=False``).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from bcc.analyze.blocks import ATTENTION, find_block_regions, module_calls
from bcc.capture.graph import capture
from bcc.capture.signature import Signature
from bcc.config import BccConfig
from bcc.errors import BccError, ErrorCode
from bcc.lower.inductor_fixes import inductor
from bcc.passes import PassConfig, run_passes
from bcc.passes.annotate_blocks import BLOCKS
from bcc.passes.gate_blocks import SLOTS
from bcc.plan.schedule import Schedule
from bcc.lower.stepper import CacheSpec, Program, Stepper

__all__ = ["bcc_backend", "BackendGraph"]

NAME = "bcc"
_ENTRY_POINT = "bcc.lower.backend:bcc_backend"
_CONFIG_OPTIONS = ("mode", "backend", "inductor_options")


class BackendGraph:
    """What backend ``"bcc"`` hands Dynamo: the gated, compiled graph and its trajectory.

    Dynamo calls it with the graph's inputs; each call is one step.

    Attributes:
        stepper: the trajectory (:class:`bcc.lower.stepper.Stepper`): ``state()``,
            ``reset()``, ``source``.
        graph: the rewritten graph (before inductor), for inspection.
        signature: the :class:`bcc.capture.signature.Signature` of Dynamo's example
            inputs, which this graph's caches are shaped for (Dynamo's guards hand a
            call of another signature to another graph, with a stepper of its own).
        block_names: the gated blocks, in graph order.
    """

    def __init__(self, stepper: Stepper, graph: fx.GraphModule, positions: Sequence[int], signature: Signature):
        self.stepper = stepper
        self.graph = graph
        self.signature = signature
        self.block_names: tuple[str, ...] = tuple(graph.meta[BLOCKS])
        self._positions = tuple(positions)

    def __call__(self, *args: Any) -> list[torch.Tensor]:
        return self.stepper([args[i] for i in self._positions])


def bcc_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: dict | None = None,
                mode: str | None = None) -> BackendGraph:
    """Dynamo backend: gate the graph's blocks on a schedule, compile with inductor.

    Args:
        gm: the graph Dynamo captured (the whole denoiser, ``fullgraph=True`` advised).
        example_inputs: its real example inputs.
        options: ``torch.compile(options=...)``: ``"schedule"`` (a :class:`Schedule`, the
            path of a saved one, or a function from the found block names to one), ``"blocks"``
            (selector for a schedule function), ``"mode"`` (``"residual"``/``"output"``),
            ``"backend"`` (``"inductor"`` or ``"eager"``), ``"inductor_options"``.
        mode: ``torch.compile(mode=...)``; its inductor settings are applied.

    Returns:
        A :class:`BackendGraph` with ``gm``'s signature that advances one step per call.

    Example:
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.block = torch.nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return x + self.block(x)
        >>> net = Net()
        >>> fast = torch.compile(net, backend="bcc", dynamic=False, options={
        ...     "schedule": Schedule.every(2, 2, ["block"]), "mode": "output", "backend": "eager"})
        >>> x = torch.ones(1, 2)
        >>> torch.equal(fast(x), net(x)), torch.allclose(fast(5 * x), 5 * x + net.block(x))  # step 1 reuses block(x)
        (True, True)
    """
    schedule_src, blocks, cfg = _parse_options(options)
    _refuse_symbolic(gm, example_inputs)
    captured = capture(gm, tuple(example_inputs), {})
    if isinstance(schedule_src, Schedule):
        schedule = schedule_src
    else:
        try:
            names = [b.name for b in find_block_regions(captured.gm, blocks or ATTENTION)]
        except BccError as e:
            if e.code != ErrorCode.NO_BLOCKS:
                raise
            # Dynamo hands a backend one graph per fragment: a fragment without blocks is
            # almost always a graph break, which the bare "no module matches" hides.
            raise BccError(ErrorCode.NO_BLOCKS, f"{str(e).split('] ', 1)[-1]} If the model has such blocks, "
                           "Dynamo split it (a graph break) and handed backend 'bcc' a piece without them; "
                           "compile with fullgraph=True to see where it breaks.") from e
        schedule = schedule_src(tuple(names))
        if not isinstance(schedule, Schedule):
            raise BccError(ErrorCode.BACKEND_OPTIONS,
                           f"options['schedule'] returned {type(schedule).__name__}, not a bcc.Schedule.")
    _require_blocks(captured.gm, schedule.block_names)
    rewritten = run_passes(captured.gm, PassConfig(names=tuple(schedule.block_names), mode=cfg.mode))
    mask = schedule.reorder(rewritten.meta[BLOCKS]).mask
    specs = tuple(CacheSpec(s.shape, s.dtype, s.device) for s in rewritten.meta[SLOTS])
    fn: Callable[..., Any] = rewritten
    if cfg.backend == "inductor":
        patches = dict(cfg.inductor_options)
        if mode not in (None, "default"):
            patches = {**torch._inductor.list_mode_options(mode), **patches}
        if patches.get("triton.cudagraphs"):
            raise BccError(
                ErrorCode.CUDA_GRAPHS_BRANCH,
                f"CUDA graphs were asked for (torch.compile mode={mode!r} or inductor option triton.cudagraphs), "
                "but backend 'bcc' compiles every cached block as a torch.cond, which CUDA graphs cannot "
                "capture: inductor would skip them silently. Use bcc.compile(model, schedule, "
                "strategy='specialize', inductor_options={'triton.cudagraphs': True}) instead, or drop the mode.")
        caches = [torch.zeros(c.shape, dtype=c.dtype, device=c.device) for c in specs]
        extra = _static([mask, torch.zeros((), dtype=torch.int64), *caches], example_inputs)
        example = [*extra, *(example_inputs[i] for i in captured.tensor_positions)]
        fn = inductor(rewritten, example, patches)
    stepper = Stepper(Program(fn, mask, specs))
    return BackendGraph(stepper, rewritten, captured.tensor_positions, captured.signature)


def _parse_options(options: Any) -> tuple[Any, Any, BccConfig]:
    if not isinstance(options, dict) or "schedule" not in options:
        raise BccError(ErrorCode.BACKEND_OPTIONS,
                       f"backend 'bcc' needs options={{'schedule': schedule}}, got options={options!r}. Pass "
                       "torch.compile(model, backend='bcc', dynamic=False, options={'schedule': bcc.Schedule(...)}); "
                       "list the model's blocks with bcc.find_blocks(model, example_inputs).")
    rest = dict(options)
    schedule = rest.pop("schedule")
    blocks = rest.pop("blocks", None)
    if isinstance(schedule, (str, os.PathLike)):
        schedule = Schedule.load(schedule)  # lets a script use the backend without importing bcc
    if not isinstance(schedule, Schedule) and not callable(schedule):
        raise BccError(ErrorCode.BACKEND_OPTIONS,
                       f"options['schedule'] must be a bcc.Schedule or a function of the block names, got "
                       f"{type(schedule).__name__}. Load one with bcc.Schedule.load(path) or build one with "
                       "bcc.Schedule.every(n, steps, names).")
    if isinstance(schedule, Schedule) and blocks is not None:
        raise BccError(ErrorCode.BACKEND_OPTIONS,
                       "options['blocks'] is only used with a schedule function; a Schedule already names its blocks.")
    unknown = sorted(set(rest) - set(_CONFIG_OPTIONS))
    if unknown:
        raise BccError(ErrorCode.BACKEND_OPTIONS,
                       f"unknown option(s) {unknown} for backend 'bcc'; valid: "
                       f"{['schedule', 'blocks', *_CONFIG_OPTIONS]} (check=True needs bcc.compile).")
    cfg = BccConfig().replace(**rest)
    if cfg.backend not in ("inductor", "eager"):
        raise BccError(ErrorCode.BACKEND_OPTIONS,
                       f"options['backend'] must be 'inductor' or 'eager' for backend 'bcc', got {cfg.backend!r}.")
    return schedule, blocks, cfg


def _static(tensors: list[torch.Tensor], example_inputs: Sequence[Any]) -> list[Any]:
    """``tensors`` as static-shaped fakes of the fake mode Dynamo traced ``example_inputs`` in.

    The schedule, step and caches are not Dynamo's inputs; handed over real, inductor would
    fakify them with symbolic sizes, and a whole-output cache (output mode) would then
    meet the block's static output in the cond's two branches ("cond's output stride is
    not a simple accumulative multiplication of sizes").
    """
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        return tensors
    return [fake_mode.from_tensor(t, static_shapes=True) for t in tensors]


def _refuse_symbolic(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    symbolic = [n.name for n, x in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs)
                if not isinstance(x, torch.Tensor) or _has_symbols(n.meta.get("example_value"))]
    if symbolic:
        raise BccError(ErrorCode.STATIC_SHAPE,
                       f"Dynamo handed backend 'bcc' a graph with symbolic shapes (inputs {symbolic[:4]}): bcc's "
                       "caches are static in batch size and resolution. Pass dynamic=False to torch.compile; each "
                       "new shape then compiles its own graph with its own caches.")


def _has_symbols(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and any(not isinstance(d, int) for d in value.shape)


def _require_blocks(gm: fx.GraphModule, names: Sequence[str]) -> None:
    present = set(module_calls(gm))
    missing = [n for n in names if n not in present]
    if not missing:
        return
    if len(missing) < len(names):
        why = ("a graph break split the model (find it with torch.compile(..., fullgraph=True)), or only part "
               "of the model was compiled")
    else:
        why = ("torch.compile was applied to a part of the model (regional compile, e.g. block.compile(), is "
               "not supported: repeated blocks share one compiled graph and every region would need its own "
               "step), or the schedule was made for another model")
    sample = ", ".join(sorted(p for p in present if p.count(".") <= 1)[:6]) or "(none)"
    raise BccError(ErrorCode.BACKEND_GRAPH,
                   f"the graph Dynamo handed to backend 'bcc' lacks the schedule's block(s) {missing[:4]}"
                   f"{' ...' if len(missing) > 4 else ''} (its modules include {sample}): {why}. Compile the whole "
                   "denoiser in one graph: torch.compile(model, backend='bcc', fullgraph=True, dynamic=False, "
                   "options={'schedule': s}) with s built from bcc.find_blocks(model, example_inputs).")


def _register() -> None:
    """Register ``backend="bcc"`` unless torch will load it through the entry point.

    Registering both ways would make torch's lazy entry-point load fail with
    "duplicate name", so the eager registration is only for source checkouts.
    """
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry

    if NAME in registry._COMPILER_FNS:
        return
    if any(ep.name == NAME and ep.value == _ENTRY_POINT for ep in entry_points(group="torch_dynamo_backends")):
        return
    registry.register_backend(bcc_backend, name=NAME)
