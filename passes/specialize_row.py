"""Specialise a gated graph to one schedule row: every ``cond`` becomes its taken branch.

The gated graph decides per block at run time (one graph for all steps). For a fixed
row of the schedule the decisions are known, so the branch can be inlined: no
``cond``, no predicate read, and inductor may fuse across block boundaries. One such
graph per distinct row is the alternative DESIGN.md §3 names for CUDA graphs
(``mode="reduce-overhead"`` cannot capture a data-dependent branch); the runtime picks
the graph for the step's row on the host. The inputs stay those of the gated graph
(schedule and step included, unused) so both forms are called the same way. The graph
stays functional (caches in, new caches out); under CUDA graphs the runtime keeps the
caches in static buffers and copies the new ones into them after each call
(``bcc.lower.compile.RowDispatch``), since a CUDA graph's outputs are overwritten by the
next call.

It is not in :data:`bcc.passes.DEFAULT_PASSES`: it runs per row, on a copy of their
result, through :func:`bcc.passes.specialize`.

**Dead caches.** A recomputed block's new cache is read only if the block is reused
before it recomputes again. When the caller knows the next step's row (``write``: the
blocks whose cache that row reads), a recomputed block the next row recomputes too
returns its cache input unchanged instead of a new cache: no residual, no copy. The
all-True row followed by another is then the plain model's graph. It is the stepper's
to guarantee that such a stale cache is never read (:mod:`bcc.lower.stepper`, lookahead).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from bcc.errors import BccInternalError
from bcc.passes.annotate_blocks import BLOCKS, META
from bcc.passes.gate_blocks import SLOTS

__all__ = ["SpecializeRowPass", "specialized"]


def _block_index(gm: fx.GraphModule, cond: fx.Node) -> int:
    # GateBlocksPass records the block's name on its cond, and the block's index is its
    # position in gm.meta[BLOCKS] (the schedule column it reads).
    name = cond.meta.get(META)
    names = list(gm.meta[BLOCKS])
    if name not in names:
        raise BccInternalError(f"cond {cond.name} names no gated block ({name!r})")
    return names.index(name)


def _cache_outputs(gm: fx.GraphModule, n_outputs: int) -> dict[int, list[tuple[int, int]]]:
    """Per block index, ``(graph output position, slot index in the block)`` of its new caches:
    GateBlocksPass appends them last, in ``gm.meta[SLOTS]`` order."""
    names = list(gm.meta[BLOCKS])
    first = n_outputs - len(gm.meta[SLOTS])
    per_block: dict[int, list[tuple[int, int]]] = {}
    for k, slot in enumerate(gm.meta[SLOTS]):
        mine = per_block.setdefault(names.index(slot.block), [])
        mine.append((first + k, len(mine)))
    return per_block


class SpecializeRowPass(PassBase):
    """Replace each block's ``cond`` by a call of the branch ``row`` selects.

    Example:
        >>> import torch
        >>> from bcc.capture.graph import capture
        >>> from bcc.passes import AnnotateBlocksPass, GateBlocksPass, OutlineBlocksPass
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a = torch.nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return self.a(x) * 2
        >>> gm = capture(Net(), (torch.ones(1, 2),)).gm
        >>> for p in (AnnotateBlocksPass(names=["a"]), OutlineBlocksPass(), GateBlocksPass(mode="output")):
        ...     gm = p(gm).graph_module
        >>> reuse = SpecializeRowPass([False])(specialized(gm)).graph_module
        >>> sum(n.target is torch.ops.higher_order.cond for n in reuse.graph.nodes)
        0
        >>> cache = torch.full((1, 2), 3.0)
        >>> reuse(torch.ones(1, 1, dtype=torch.bool), torch.tensor(0), cache, torch.ones(1, 2))[0]
        tensor([[6., 6.]])
    """

    def __init__(self, row: Sequence[bool], pass_through: bool = True, write: Sequence[bool] | None = None):
        super().__init__()
        self.row = tuple(bool(b) for b in row)
        # False keeps the reuse branch's cache copies: under CUDA graphs an output that is a
        # static input buffer is not something bcc has verified inductor records.
        self.pass_through = pass_through
        # Per block, whether a recomputed block's new cache is needed (None: all are).
        self.write = None if write is None else tuple(bool(b) for b in write)
        if self.write is not None and len(self.write) != len(self.row):
            raise BccInternalError(f"write has {len(self.write)} entries, the row {len(self.row)}")
        if self.write is not None and not pass_through:
            raise BccInternalError("dead caches are left unwritten only where cache inputs may pass through")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        conds = [n for n in graph.nodes if n.target is torch.ops.higher_order.cond]
        out_node = graph.output_node()
        outs = list(out_node.args[0])
        slots = _cache_outputs(gm, len(outs))
        for cond in conds:
            i = _block_index(gm, cond)
            if i >= len(self.row):
                raise BccInternalError(f"row has {len(self.row)} entries, the graph gates block {i}")
            branch = cond.args[1 if self.row[i] else 2]
            operands = tuple(cond.args[3])
            with graph.inserting_before(cond):
                call = graph.call_module(str(branch.target), operands)
            call.meta = dict(cond.meta)
            cond.replace_all_uses_with(call)
            graph.erase_node(cond)
            dead = self.row[i] and self.write is not None and not self.write[i]
            if (not self.row[i] and self.pass_through) or dead:
                # A reused block's caches leave unchanged: without a cond there is no aliasing
                # rule to satisfy, so the graph returns the cache inputs themselves (a cond's
                # first operands, one per slot) instead of copies, which dead-code elimination
                # then drops. A dead cache (recomputed now and at the next step) leaves
                # the same way: nothing reads it before it is overwritten.
                for k, j in slots[i]:
                    outs[k] = operands[j]
        out_node.args = (tuple(outs),)
        graph.eliminate_dead_code()
        # Placeholders are kept even when unused: the call signature is the gated graph's.
        gm.delete_all_unused_submodules()
        graph.lint()
        gm.recompile()
        return PassResult(gm, bool(conds))


def specialized(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm``'s graph over the same module tree (weights are shared, not copied),
    for :class:`SpecializeRowPass` to edit."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    copy = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copy.meta.update(gm.meta)
    return copy
