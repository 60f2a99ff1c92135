"""Mark every node of every selected block with ``node.meta["bcc_block"]``."""
from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from bcc.analyze.blocks import ATTENTION, BlockSelector, find_block_regions
from bcc.analyze.regions import span_names
from bcc.errors import BccError, ErrorCode

META = "bcc_block"
BLOCKS = "bcc_blocks"


class AnnotateBlocksPass(PassBase):
    """Find the blocks chosen by ``selector`` and tag their nodes.

    Writes ``gm.meta["bcc_blocks"]``: the block names in execution order. With
    ``names`` given, exactly those module paths are selected, and a name that is not
    in the graph is an error.

    Example:
        >>> import torch
        >>> from bcc.capture.graph import capture
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a = torch.nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return self.a(x) + 1
        >>> gm = capture(Net(), (torch.ones(1, 2),)).gm
        >>> AnnotateBlocksPass(names=["a"])(gm).graph_module.meta["bcc_blocks"]
        ['a']
    """

    def __init__(self, selector: BlockSelector = ATTENTION, names: list[str] | None = None):
        super().__init__()
        self.selector = selector
        self.names = None if names is None else list(names)

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.names is not None:
            regions, paths = span_names(self.names)
            wanted = set(paths)
            try:
                blocks = find_block_regions(gm, lambda path, cls: path in wanted, regions=regions)
            except BccError as e:
                if e.code is not ErrorCode.NO_BLOCKS:
                    raise
                blocks = []  # none of the names is here: reported below with the names
            missing = set(self.names) - {b.name for b in blocks}
            if missing:
                raise BccError(
                    ErrorCode.BLOCK_NOT_FOUND,
                    f"the schedule names block(s) {sorted(missing)} that this model's graph does not "
                    "contain (or that sit inside another selected block). List the model's blocks "
                    "with bcc.find_blocks(model, example_inputs) and rebuild the schedule.",
                )
        else:
            blocks = find_block_regions(gm, self.selector)
        modified = False
        for node in gm.graph.nodes:
            node.meta.pop(META, None)
        for block in blocks:
            for node in block.nodes:
                node.meta[META] = block.name
                modified = True
        gm.meta[BLOCKS] = [b.name for b in blocks]
        return PassResult(gm, modified)
