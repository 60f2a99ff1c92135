"""capture: rewrite the few exported constructs the later stages cannot take, without changing values.

Both entry paths (``torch.export`` of a model, the re-export of a Dynamo graph) run
:func:`normalize` on the captured graph.
"""
from __future__ import annotations

import sys

import torch
import torch.fx as fx

__all__ = ["normalize"]

aten = torch.ops.aten


def _attr(gm: fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name, None)


def fold_scalar_constants(gm: fx.GraphModule) -> int:
    """``lift_fresh_copy(<0-d tensor constant>)`` becomes ``full([], value)``.

    Dynamo turns ``mask[..., 0] = True`` into such a constant. Outlined into a block it
    would be a real tensor inside a ``cond`` branch, which the branch's functionalization
    refuses ("Attempting to use FunctionalTensor on its own"); a ``full`` is computed
    inside the branch instead. Returns how many were folded.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.target is not aten.lift_fresh_copy.default or node.args[0].op != "get_attr":
            continue
        src = node.args[0]
        value = _attr(gm, str(src.target))
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            continue
        with gm.graph.inserting_before(node):
            full = gm.graph.call_function(aten.full.default, ([], value.item()),
                                          {"dtype": value.dtype, "device": value.device})
        full.meta.update(node.meta)
        node.replace_all_uses_with(full)
        gm.graph.erase_node(node)
        if not src.users:
            gm.graph.erase_node(src)
        count += 1
    return count


def spell_out_dynamic_slices(gm: fx.GraphModule) -> int:
    """A slice with a data-dependent bound gets its default bound written out.

    ``x[:, : h * w]`` with ``h, w`` read from a tensor (HiDream's ``unpatchify``) exports
    as ``slice(x, 1, None, u0)``; inductor lowers it to a dynamic slice whose code
    generation compares the ``None`` start ("The argument 'None' is not comparable").
    ``0`` and ``sys.maxsize`` are what ``None`` means. Returns how many were rewritten.
    """
    count = 0
    for node in gm.graph.nodes:
        if node.target is not aten.slice.Tensor:
            continue
        args = list(node.args) + [0, None, None, 1][len(node.args) - 1:]
        dim, start, end, step = args[1:5]
        if not any(isinstance(a, fx.Node) for a in (start, end)) or (start is not None and end is not None):
            continue
        node.args = (args[0], dim, 0 if start is None else start, sys.maxsize if end is None else end, step)
        count += 1
    return count


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Apply every rewrite above to ``gm`` in place and return it.

    Example:
        >>> class M(torch.nn.Module):
        ...     def forward(self, x, n):
        ...         return x[:, : n.item()]
        >>> from bcc.capture.graph import capture
        >>> gm = capture(M(), (torch.ones(2, 4), torch.tensor(3))).gm
        >>> [n.args[2] for n in gm.graph.nodes if n.target is torch.ops.aten.slice.Tensor]
        [0]
    """
    if fold_scalar_constants(gm) + spell_out_dynamic_slices(gm):
        gm.graph.lint()
        gm.recompile()
    return gm
