"""lower: run the pass list on a captured graph and compile the result (``bcc.compile``'s lowering)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from bcc.capture.graph import Captured
from bcc.config import BccConfig
from bcc.lower.inductor_fixes import cond_operand_strides
from bcc.passes import CacheSlot, PassConfig, run_passes, specialize
from bcc.passes.annotate_blocks import BLOCKS
from bcc.passes.gate_blocks import SLOTS

__all__ = ["Lowered", "RowDispatch", "lower", "compile_graph"]


@dataclass(frozen=True)
class Lowered:
    """A rewritten graph ready to run: ``fn(schedule, step, *caches, *scale_shift, *tensor_leaves)``.

    ``scale_shift`` is empty unless the graph was rewritten with scale-shift tables.
    ``fn`` returns the model's output leaves followed by the new caches.
    """

    gm: fx.GraphModule
    fn: Callable[..., Any]
    block_names: tuple[str, ...]
    slots: tuple[CacheSlot, ...]


def compile_graph(gm: fx.GraphModule, config: BccConfig) -> Callable[..., Any]:
    """``gm`` compiled by ``config.backend`` (``"eager"``: ``gm`` itself)."""
    if config.backend == "eager":
        return gm
    options = dict(config.inductor_options)
    if config.backend == "inductor":
        return torch.compile(gm, backend=_InductorWithCondStrides(options), fullgraph=True, dynamic=False)
    # A custom backend (e.g. a test's compile counter wrapping inductor) gets no
    # options from torch.compile, so the inductor settings are patched around
    # each call, which is when compilation happens.
    compiled = torch.compile(gm, backend=config.backend, fullgraph=True, dynamic=False)

    def fn(*args: Any) -> Any:
        with torch._inductor.config.patch(options), cond_operand_strides():
            return compiled(*args)
    return fn


class _InductorWithCondStrides:
    """Inductor with ``options``, compiling under :func:`cond_operand_strides` (compile
    time only: the compiled code runs without it)."""

    def __init__(self, options: dict):
        self.options = options

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx

        with cond_operand_strides():
            return compile_fx(gm, example_inputs, config_patches=self.options)


class RowDispatch:
    """``strategy="specialize"``: one graph per distinct schedule row, built and compiled
    at the row's first use, chosen on the host from ``schedule[step]``.

    The schedule and the step are CPU tensors (see :mod:`bcc.runtime.stepper`), so
    reading the row costs no device sync. A new schedule's unseen rows compile on first use.
    """

    def __init__(self, gm: fx.GraphModule, config: BccConfig):
        self.gm = gm
        self.config = config
        self.variants: dict[tuple[bool, ...], Callable[..., Any]] = {}

    def __call__(self, schedule: torch.Tensor, step: torch.Tensor, *rest: Any) -> Any:
        row = tuple(schedule[int(step)].tolist())
        fn = self.variants.get(row)
        if fn is None:
            fn = self.variants[row] = compile_graph(specialize(self.gm, row), self.config)
        return fn(schedule, step, *rest)


def lower(captured: Captured, names: Sequence[str], config: BccConfig, scale_shift: bool = False) -> Lowered:
    """Gate ``names`` in ``captured`` (:func:`bcc.passes.run_passes`) and compile for ``config``."""
    gm = run_passes(captured.gm, PassConfig(names=tuple(names), mode=config.mode, scale_shift=scale_shift))
    fn = RowDispatch(gm, config) if config.strategy == "specialize" else compile_graph(gm, config)
    return Lowered(gm, fn, tuple(gm.meta[BLOCKS]), tuple(gm.meta[SLOTS]))
