"""Graph passes of bcc, installed as ``bcc.passes``: the one ordered list every lowering runs.

:data:`DEFAULT_PASSES` is the pipeline, in order; :func:`run_passes` builds it for a
:class:`PassConfig` and runs it with torch's ``PassManager``. ``bcc.compile`` (the
runtime), ``torch.compile(backend="bcc")`` and ``bcc.export`` all call
:func:`run_passes` and nothing else, so a fix made here (like the per-cond predicate
of :class:`OwnPredicatesPass`) holds for all three. A pass that only one lowering
needs is still in the list, switched by the config (``LiftWeightsPass`` for
``target="export"``), never added by the caller. :func:`specialize` is the one
per-row step after the list (``strategy="specialize"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase
from torch.fx.passes.infra.pass_manager import PassManager

from bcc.analyze.blocks import ATTENTION, BlockSelector
from bcc.errors import BccError, BccInternalError, ErrorCode
from bcc.passes.annotate_blocks import AnnotateBlocksPass
from bcc.passes.gate_blocks import CacheSlot, GateBlocksPass
from bcc.passes.lift_weights import LiftWeightsPass
from bcc.passes.outline_blocks import OutlineBlocksPass
from bcc.passes.own_predicates import OwnPredicatesPass
from bcc.passes.specialize_row import SpecializeRowPass, specialized

__all__ = ["AnnotateBlocksPass", "OutlineBlocksPass", "GateBlocksPass", "CacheSlot", "SpecializeRowPass",
           "LiftWeightsPass", "OwnPredicatesPass", "PassConfig", "PassEntry", "DEFAULT_PASSES", "PASSES_RUN",
           "run_passes", "specialize"]

#: ``gm.meta`` key of :func:`run_passes`'s result: the names of the passes that ran, in order.
PASSES_RUN = "bcc_passes"

_TARGETS = ("compile", "export")
_MODES = ("residual", "output")


@dataclass(frozen=True)
class PassConfig:
    """What the pipeline needs to know; every entry point builds one.

    Attributes:
        names: exactly these blocks (a schedule's ``block_names``); a name the graph
            lacks is ``BCC302``. ``None``: the blocks ``selector`` finds.
        selector: block selector used when ``names`` is None (see :func:`bcc.find_blocks`).
        mode: ``"residual"`` or ``"output"`` caching (:class:`bcc.BccConfig`).
        scale_shift: add a ``[T, 2, B, C]`` scale-shift table input per cache slot.
        target: ``"compile"`` (the runtime and the backend) or ``"export"`` (weights
            become graph inputs: :class:`LiftWeightsPass`).

    Example:
        >>> PassConfig(names=("a",), target="export").mode
        'residual'
        >>> PassConfig(target="aoti")
        Traceback (most recent call last):
        ...
        bcc.errors.BccError: [BCC001] PassConfig.target must be one of ('compile', 'export'), got 'aoti'. ...
    """

    names: tuple[str, ...] | None = None
    selector: BlockSelector = ATTENTION
    mode: str = "residual"
    scale_shift: bool = False
    target: str = "compile"

    def __post_init__(self) -> None:
        if self.target not in _TARGETS:
            raise BccError(ErrorCode.CONFIG_INVALID,
                           f"PassConfig.target must be one of {_TARGETS}, got {self.target!r}. Use 'compile' for "
                           "bcc.compile and the torch.compile backend, 'export' for bcc.export.")
        if self.mode not in _MODES:
            raise BccError(ErrorCode.CONFIG_INVALID,
                           f"PassConfig.mode must be one of {_MODES}, got {self.mode!r} (see bcc.BccConfig.mode).")
        if self.names is not None and not (isinstance(self.names, tuple)
                                           and all(isinstance(n, str) for n in self.names)):
            raise BccError(ErrorCode.CONFIG_INVALID,
                           f"PassConfig.names must be a tuple of block names or None, got {self.names!r}; pass "
                           "tuple(schedule.block_names).")


@dataclass(frozen=True)
class PassEntry:
    """One step of :data:`DEFAULT_PASSES`: its name and how to build it for a config.

    ``build`` returns ``None`` where the config switches the pass off.
    """

    name: str
    build: Callable[[PassConfig], PassBase | None]


def _lift_weights(config: PassConfig) -> PassBase | None:
    # First: later passes then thread the weights into the branches like any operand.
    return LiftWeightsPass() if config.target == "export" else None


def _annotate_blocks(config: PassConfig) -> PassBase:
    return AnnotateBlocksPass(selector=config.selector, names=None if config.names is None else list(config.names))


def _outline_blocks(config: PassConfig) -> PassBase:
    return OutlineBlocksPass()


def _gate_blocks(config: PassConfig) -> PassBase:
    return GateBlocksPass(mode=config.mode, scale_shift=config.scale_shift)


def _own_predicates(config: PassConfig) -> PassBase:
    return OwnPredicatesPass()


#: The pipeline, in the order it runs. Read at every :func:`run_passes` call.
DEFAULT_PASSES: tuple[PassEntry, ...] = (
    PassEntry("lift_weights", _lift_weights),
    PassEntry("annotate_blocks", _annotate_blocks),
    PassEntry("outline_blocks", _outline_blocks),
    PassEntry("gate_blocks", _gate_blocks),
    PassEntry("own_predicates", _own_predicates),
)


def _run(passes: Sequence[PassBase], gm: fx.GraphModule) -> fx.GraphModule:
    # PassManager wraps a pass's exception with the pass name; unwrap bcc's own errors so
    # the caller sees the actionable message (or the bug report) first, with the context
    # chained. The one place bcc runs a PassManager.
    try:
        return PassManager(list(passes), steps=1)(gm).graph_module
    except Exception as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, (BccError, BccInternalError)):
            raise cause from e
        raise


def run_passes(gm: fx.GraphModule, config: PassConfig) -> fx.GraphModule:
    """Run :data:`DEFAULT_PASSES` for ``config`` on a captured graph (edited in place).

    Args:
        gm: a flat graph from :func:`bcc.capture.graph.capture`.
        config: what to gate and for which lowering.

    Returns:
        The gated graph: inputs ``(bcc_schedule, bcc_step, *caches, *tables, *tensors,
        *weights)`` (tables with ``scale_shift``, weights with ``target="export"``),
        outputs ``(*model outputs, *new caches)``. ``meta`` holds ``"bcc_blocks"``,
        ``"bcc_cache_slots"``, ``"bcc_weights"`` (export) and :data:`PASSES_RUN`.

    Example:
        >>> import torch
        >>> from bcc.capture.graph import capture
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a = torch.nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return self.a(x) * 2
        >>> gm = run_passes(capture(Net(), (torch.ones(1, 2),)).gm, PassConfig(names=("a",)))
        >>> gm.meta[PASSES_RUN]
        ('annotate_blocks', 'outline_blocks', 'gate_blocks', 'own_predicates')
        >>> [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        ['bcc_schedule', 'bcc_step', 'bcc_cache_0_0', 'x']
    """
    built = [(entry.name, entry.build(config)) for entry in DEFAULT_PASSES]
    built = [(name, p) for name, p in built if p is not None]
    out = _run([p for _, p in built], gm)
    out.meta[PASSES_RUN] = tuple(name for name, _ in built)
    return out


def specialize(gm: fx.GraphModule, row: Sequence[bool], pass_through: bool = True,
               write: Sequence[bool] | None = None) -> fx.GraphModule:
    """The branch-free graph of one schedule row: :class:`SpecializeRowPass` on a copy of
    :func:`run_passes`'s result (which stays as it is; weights are shared). ``write``:
    which recomputed blocks' new caches are needed (None: all; see the pass's *Dead caches*).

    Example:
        >>> import torch
        >>> from bcc.capture.graph import capture
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a = torch.nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return self.a(x)
        >>> gm = run_passes(capture(Net(), (torch.ones(1, 2),)).gm, PassConfig(names=("a",)))
        >>> sum(n.target is torch.ops.higher_order.cond for n in specialize(gm, [False]).graph.nodes)
        0
    """
    return _run([SpecializeRowPass(row, pass_through, write)], specialized(gm))
