"""Turn every tensor attribute the graph reads into a graph input, for ``torch.export``."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["LiftWeightsPass", "WEIGHTS", "fetch_attr"]

WEIGHTS = "bcc_weights"


def fetch_attr(gm: torch.nn.Module, target: str) -> object:
    """The attribute a ``get_attr`` node named ``target`` reads (``"blocks.0.proj.weight"``)."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


class LiftWeightsPass(PassBase):
    """Replace each tensor ``get_attr`` by a trailing placeholder ``bcc_w<i>``.

    ``torch.export`` lifts module weights only at the top level of a program: a weight
    read inside a ``cond`` branch would be exported as a fake constant. Run first, this
    pass makes every weight an operand that later passes thread into the branches like
    any other input, and records the attribute targets, in input order, in
    ``gm.meta["bcc_weights"]`` so the caller can pass them. Only ``bcc.export`` needs it;
    :class:`bcc.passes.PassConfig` switches it on for ``target="export"``.

    Example:
        >>> from bcc.capture.graph import capture
        >>> gm = capture(torch.nn.Linear(2, 2), (torch.ones(1, 2),)).gm
        >>> gm = LiftWeightsPass()(gm).graph_module
        >>> [n.name for n in gm.graph.nodes if n.op == "placeholder"][1:], gm.meta["bcc_weights"]
        (['bcc_w0', 'bcc_w1'], ['weight', 'bias'])
    """

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        targets: list[str] = []
        for node in [n for n in graph.nodes if n.op == "get_attr"]:
            if not isinstance(fetch_attr(gm, str(node.target)), torch.Tensor):
                continue  # submodules (cond branches) stay attributes
            with graph.inserting_after(last):
                ph = graph.placeholder(f"bcc_w{len(targets)}")
            ph.meta.update(node.meta)
            node.replace_all_uses_with(ph)
            graph.erase_node(node)
            targets.append(str(node.target))
            last = ph
        gm.meta[WEIGHTS] = targets
        gm.recompile()
        return PassResult(gm, bool(targets))

    def ensures(self, gm: fx.GraphModule) -> None:
        gm.graph.lint()
