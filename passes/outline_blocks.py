"""Outline each annotated block into a submodule ``bcc_block_<i>``."""
from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from bcc.errors import BccInternalError

from bcc.passes.annotate_blocks import BLOCKS, META

PREFIX = "bcc_block_"


class OutlineBlocksPass(PassBase):
    """Replace each block's nodes by one ``call_module`` that returns a tuple.

    The call node keeps ``meta["bcc_block"]``; parameters used only by the block move
    into the submodule.

    Example:
        >>> import torch
        >>> from bcc.capture.graph import capture
        >>> from bcc.passes import AnnotateBlocksPass
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a = torch.nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return self.a(x) + 1
        >>> gm = AnnotateBlocksPass(names=["a"])(capture(Net(), (torch.ones(1, 2),)).gm).graph_module
        >>> gm = OutlineBlocksPass()(gm).graph_module
        >>> [n.target for n in gm.graph.nodes if n.op == "call_module"]
        ['bcc_block_0']
    """

    def requires(self, gm: fx.GraphModule) -> None:
        if BLOCKS not in gm.meta:
            raise BccInternalError("OutlineBlocksPass needs AnnotateBlocksPass to run first")

    def call(self, gm: fx.GraphModule) -> PassResult:
        names = gm.meta[BLOCKS]
        partitions: list[dict] = [dict() for _ in names]
        index = {n: i for i, n in enumerate(names)}
        for node in gm.graph.nodes:
            name = node.meta.get(META)
            if name is not None and node.op != "call_module":
                partitions[index[name]][node] = None
        fuse_by_partitions(gm, partitions, prefix=PREFIX, always_return_tuple=True)
        for node in gm.graph.nodes:
            if node.op == "call_module" and str(node.target).startswith(PREFIX):
                node.meta[META] = names[int(str(node.target)[len(PREFIX):])]
        gm.recompile()
        return PassResult(gm, bool(names))

    def ensures(self, gm: fx.GraphModule) -> None:
        gm.graph.lint()
