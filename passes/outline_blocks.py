"""Outline each annotated block into a submodule ``bcc_block_<i>``."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from bcc.errors import BccInternalError

from bcc.passes.annotate_blocks import BLOCKS, META

PREFIX = "bcc_block_"


def storage_key(t) -> int | None:
    """An id of ``t``'s storage (fake values too), or None for a non-tensor or a tensor without one."""
    try:
        return t.untyped_storage()._cdata if isinstance(t, torch.Tensor) else None
    except (RuntimeError, NotImplementedError):  # e.g. sparse
        return None


def _same_tensor(node: fx.Node, src: fx.Node) -> bool:
    """``node`` returned ``src`` itself (``x.float()`` of fp32, ``contiguous()`` of a contiguous
    tensor, ``alias``): a non-mutating op whose value shares storage, shape, strides, offset
    and dtype with its input."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    if node.target._schema.is_mutable:
        return False
    v, s = node.meta.get("val"), src.meta.get("val")
    key = storage_key(v)
    if key is None or key != storage_key(s):
        return False
    # Provably equal only: a size computed from tensor values (a token selection by a
    # mask) has no value to compare, and asking would raise on it.
    same = lambda a, b: len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))  # noqa: E731
    return (v.dtype == s.dtype and same(v.shape, s.shape) and same(v.stride(), s.stride())
            and statically_known_true(v.storage_offset() == s.storage_offset()))


def reroute_pass_throughs(gm: fx.GraphModule) -> int:
    """Point readers outside a block at the block input a node of the block merely passes through.

    torch.export records a no-op ``temb.float()`` as a node whose value *is* ``temb``, and
    rebinds the tensor to that node, so every later reader (another block too) reads it
    from inside the block. Outlined, it would become a block output that is the block's
    own input: the recompute branch would return an operand (inductor refuses an alias),
    and with whole-output caching a reused block would hand a stale conditioning tensor
    to the next block. Readers get the identical tensor, so nothing else changes.
    Returns how many nodes were rerouted.
    """
    count = 0
    for node in list(gm.graph.nodes):
        block = node.meta.get(META)
        if block is None:
            continue
        src = node
        while (src.args and isinstance(src.args[0], fx.Node) and src.meta.get(META) == block
               and _same_tensor(src, src.args[0])):
            src = src.args[0]
        if src is node or src.meta.get(META) == block:
            continue
        outside = [u for u in node.users if u.meta.get(META) != block]
        for user in outside:
            user.replace_input_with(node, src)
        count += bool(outside)
    return count


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
        reroute_pass_throughs(gm)
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
