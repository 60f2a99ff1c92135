"""lower: run the passes on a captured graph and compile the result."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_manager import PassManager

from bcc.analyze.blocks import BlockSelector
from bcc.capture.graph import Captured
from bcc.config import BccConfig
from bcc.errors import BccError
from bcc.passes import AnnotateBlocksPass, CacheSlot, GateBlocksPass, OutlineBlocksPass, SpecializeRowPass
from bcc.passes.specialize_row import specialized
from bcc.passes.annotate_blocks import BLOCKS
from bcc.passes.gate_blocks import SLOTS

__all__ = ["Lowered", "RowDispatch", "rewrite", "lower"]


@dataclass
class Lowered:
    """A rewritten graph ready to run: ``fn(schedule, step, *caches, *scale_shift, *tensor_leaves)``.

    ``scale_shift`` is empty unless the graph was rewritten with scale-shift tables.

    ``fn`` returns the model's output leaves followed by the new caches.
    """

    gm: fx.GraphModule
    fn: Callable[..., Any]
    block_names: tuple[str, ...]
    slots: tuple[CacheSlot, ...]


def rewrite(
    captured: Captured,
    *,
    names: Sequence[str] | None = None,
    selector: BlockSelector = "attention",
    mode: str = "residual",
    scale_shift: bool = False,
) -> fx.GraphModule:
    """Annotate, outline and gate the blocks of a captured graph (no compilation).

    ``scale_shift=True`` adds one ``[T, 2, B, C]`` table input per cache slot after the caches.
    """
    passes = [
        AnnotateBlocksPass(selector=selector, names=None if names is None else list(names)),
        OutlineBlocksPass(),
        GateBlocksPass(mode=mode, scale_shift=scale_shift),
    ]
    # PassManager wraps a pass's exception with the pass name; unwrap BccError so
    # the caller sees the actionable message first, with the context chained.
    try:
        result = PassManager(passes, steps=1)(captured.gm)
    except Exception as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, BccError):
            raise cause from e
        raise
    return result.graph_module


def _compile(gm: fx.GraphModule, config: BccConfig) -> Callable[..., Any]:
    if config.backend == "eager":
        return gm
    options = dict(config.inductor_options)
    if config.backend == "inductor":
        return torch.compile(gm, backend="inductor", fullgraph=True, dynamic=False, options=options)
    # A custom backend (e.g. a test's compile counter wrapping inductor) gets no
    # options from torch.compile, so the inductor settings are patched around
    # each call, which is when compilation happens.
    compiled = torch.compile(gm, backend=config.backend, fullgraph=True, dynamic=False)

    def fn(*args: Any) -> Any:
        with torch._inductor.config.patch(options):
            return compiled(*args)
    return fn


class RowDispatch:
    """``strategy="specialize"``: one graph per distinct schedule row, built and compiled
    at the row's first use, chosen on the host from ``schedule[step]``.

    The schedule and the step are CPU tensors (see :mod:`bcc.runtime`), so reading the
    row costs no device sync. A new schedule's unseen rows compile on first use.
    """

    def __init__(self, gm: fx.GraphModule, config: BccConfig):
        self.gm = gm
        self.config = config
        self.variants: dict[tuple[bool, ...], Callable[..., Any]] = {}

    def __call__(self, schedule: torch.Tensor, step: torch.Tensor, *rest: Any) -> Any:
        row = tuple(schedule[int(step)].tolist())
        fn = self.variants.get(row)
        if fn is None:
            gm = SpecializeRowPass(row)(specialized(self.gm)).graph_module
            fn = self.variants[row] = _compile(gm, self.config)
        return fn(schedule, step, *rest)


def lower(captured: Captured, names: Sequence[str], config: BccConfig, scale_shift: bool = False) -> Lowered:
    gm = rewrite(captured, names=names, mode=config.mode, scale_shift=scale_shift)
    fn = RowDispatch(gm, config) if config.strategy == "specialize" else _compile(gm, config)
    return Lowered(gm, fn, tuple(gm.meta[BLOCKS]), tuple(gm.meta[SLOTS]))
