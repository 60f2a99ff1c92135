"""capture: torch.export a denoiser into a flat ATen GraphModule.

The exported module's forward flattens its inputs with a pytree spec and checks
guards; rewriting its signature trips those checks ("kwarg keyword mismatch"), so
we rebuild a plain GraphModule whose placeholders are the tensor leaves of the
call and whose output is the flat tuple of output leaves. The specs are kept to
rebuild the caller's structure around it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from bcc.capture.signature import Signature, signature_of
from bcc.errors import BccError, BccInternalError, ErrorCode

__all__ = ["Captured", "capture", "flatten_call"]


@dataclass(frozen=True)
class Captured:
    """A flat graph plus what is needed to call it like the original model.

    Attributes:
        gm: placeholders are the call's tensor leaves in pytree order; returns a tuple
            of output leaves.
        in_spec / out_spec: pytree specs of ``(args, kwargs)`` and of the output.
        tensor_positions: indices of the tensor leaves among all input leaves.
        signature: :func:`bcc.capture.signature.signature_of` the example call (shapes,
            dtypes, devices, non-tensor values); a call with another signature needs
            another capture.
    """

    gm: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    tensor_positions: tuple[int, ...]
    signature: Signature


def flatten_call(args: tuple, kwargs: dict) -> tuple[list[Any], pytree.TreeSpec]:
    """The leaves of ``(args, kwargs)`` in the order of a captured graph's inputs, and their spec.

    Example:
        >>> leaves, _ = flatten_call((torch.ones(1), 2), {"flag": True})
        >>> [type(x).__name__ for x in leaves]
        ['Tensor', 'int', 'bool']
    """
    return pytree.tree_flatten((tuple(args), dict(kwargs)))


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> Captured:
    """Export ``model(*args, **kwargs)`` and return the flat graph.

    Example:
        >>> class M(torch.nn.Module):
        ...     def forward(self, x, *, scale=2.0):
        ...         return x * scale
        >>> c = capture(M(), (torch.ones(2),), {"scale": 3.0})
        >>> c.gm(torch.ones(2))
        (tensor([3., 3.]),)
    """
    kwargs = dict(kwargs or {})
    try:
        with torch.no_grad():
            ep = torch.export.export(model, tuple(args), kwargs, strict=False)
    except Exception as e:  # export raises many types; all mean "could not capture"
        raise BccError(
            ErrorCode.CAPTURE_FAILED,
            f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. bcc needs a model torch.export can trace "
            "(non-strict); run torch.export.export(model, args, kwargs, strict=False) to see the "
            "full error, or cache a submodule that exports.",
        ) from e
    unlifted = ep.module()
    # ep.module() builds a fresh module on every call, so its graph is ours to edit.
    graph = unlifted.graph
    graph._codegen = fx.graph.CodeGen()

    leaves, in_spec = flatten_call(args, kwargs)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(leaves):
        raise BccInternalError(f"export produced {len(placeholders)} inputs for {len(leaves)} leaves")
    for node in list(graph.nodes):
        # The runtime guard module re-checks export's input assumptions; bcc checks the
        # call signature itself before every call, so the guard is dropped.
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    tensor_positions = []
    for i, (node, leaf) in enumerate(zip(placeholders, leaves)):
        if isinstance(leaf, torch.Tensor):
            tensor_positions.append(i)
        elif node.users:
            raise BccInternalError(f"non-tensor input {node.name} is still used after export")
        else:
            graph.erase_node(node)
    out_node = graph.output_node()
    outs = out_node.args[0]
    out_node.args = (tuple(outs) if isinstance(outs, (list, tuple)) else (outs,),)
    gm = fx.GraphModule(unlifted, graph, class_name=f"Captured{type(model).__name__}")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    out_spec = unlifted._out_spec
    return Captured(gm, in_spec, out_spec, tuple(tensor_positions), signature_of(args, kwargs))
