"""Give every ``cond`` a predicate tensor of its own, not a view into the schedule row."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["OwnPredicatesPass", "OWN_PREDICATE"]

OWN_PREDICATE = "bcc_own_predicate"


class OwnPredicatesPass(PassBase):
    """Make each ``cond``'s predicate ``eq(row[i], True)``: a new buffer per block.

    GateBlocksPass reads block ``i``'s bit as ``select(row, 0, i)``, a view of the
    schedule row. Inductor's C++ wrapper (``cpp_wrapper=True``, and so AOTInductor;
    torch 2.13) names a predicate's host copy after its buffer, so every view of one
    row reads one value: every block followed block 0's bit, silently. ``eq`` makes a
    buffer per predicate (inductor drops a ``clone`` as a no-op). It runs for every
    lowering, so no wrapper is wrong.

    Example:
        >>> from bcc.capture.graph import capture
        >>> from bcc.passes import AnnotateBlocksPass, GateBlocksPass, OutlineBlocksPass
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a = torch.nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return self.a(x) * 2
        >>> gm = capture(Net(), (torch.ones(1, 2),)).gm
        >>> for p in (AnnotateBlocksPass(names=["a"]), OutlineBlocksPass(), GateBlocksPass(), OwnPredicatesPass()):
        ...     gm = p(gm).graph_module
        >>> [str(n.args[0].target) for n in gm.graph.nodes if n.target is torch.ops.higher_order.cond]
        ['aten.eq.Scalar']
    """

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        modified = False
        for node in list(graph.nodes):
            if node.target is not torch.ops.higher_order.cond:
                continue
            pred = node.args[0]
            if isinstance(pred, fx.Node) and pred.meta.get(OWN_PREDICATE):
                continue  # already its own (a second run changes nothing)
            with graph.inserting_before(node):
                own = graph.call_function(torch.ops.aten.eq.Scalar, (pred, True))
            own.meta.update(pred.meta if isinstance(pred, fx.Node) else {})
            own.meta[OWN_PREDICATE] = True
            node.update_arg(0, own)
            modified = True
        gm.recompile()
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        gm.graph.lint()
