"""capture: torch.export a denoiser into a flat ATen GraphModule.

The exported module's forward flattens its inputs with a pytree spec and checks
guards; rewriting its signature trips those checks ("kwarg keyword mismatch"), so
we rebuild a plain GraphModule whose placeholders are the tensor leaves of the
call and whose output is the flat tuple of output leaves. The specs are kept to
rebuild the caller's structure around it.
"""
from __future__ import annotations

import collections
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from bcc.capture.explain import capture_site, is_value_dependent
from bcc.capture.normalize import normalize
from bcc.capture.signature import Signature, signature_of
from bcc.errors import BccError, BccInternalError, ErrorCode

__all__ = ["Captured", "LATENT", "capture", "flatten_call"]

#: ``gm.meta`` key: the names of the placeholders of the denoiser's latent input (its first
#: parameter: ``sample`` / ``hidden_states`` in every diffusers denoiser; Z-Image passes a
#: list of latents, one per sample), or absent.
LATENT = "bcc_latent_input"


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
        with torch.no_grad(), _PythonStateKept(model):
            ep = torch.export.export(model, tuple(args), kwargs, strict=False)
    except Exception as e:  # export raises many types; all mean "could not capture"
        raise _capture_error(model, e) from e
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
    latent = [placeholders[k].name for k in _latent_leaves(model, args, kwargs, leaves)]
    gm = fx.GraphModule(unlifted, graph, class_name=f"Captured{type(model).__name__}")
    kept = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    if latent and all(name in kept for name in latent):
        gm.meta[LATENT] = tuple(latent)
    gm.graph.eliminate_dead_code()
    normalize(gm)
    gm.recompile()
    out_spec = unlifted._out_spec
    return Captured(gm, in_spec, out_spec, tuple(tensor_positions), signature_of(args, kwargs))


class _PythonStateKept:
    """Puts back the model's Python state as it was before the trace.

    Non-strict export runs the model's Python for real, on fake tensors: a lazily filled
    cache (Z-Image's ``rope_embedder.freqs_cis``, a plain object's attribute set at its
    first call) would keep fake tensors, which break every later capture and make the
    user's own model compute wrong values, silently. So the attributes of every module,
    of the plain objects they hold, and the containers among them (a module's parameter,
    buffer and child dicts too) are put back: the same objects, the same contents.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.kept: list[tuple[Any, dict]] = []  # (object, its __dict__ as it was)
        self.contents: list[tuple[Any, Any]] = []  # (container, a copy of its contents)

    def __enter__(self) -> "_PythonStateKept":
        seen: set[int] = set()
        for module in self.model.modules():
            self._keep(module, seen)
            for value in vars(module).values():
                if _plain_object(value):
                    self._keep(value, seen)
        return self

    def _keep(self, obj: Any, seen: set[int]) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        attrs = vars(obj)
        self.kept.append((obj, dict(attrs)))
        for value in attrs.values():
            if type(value) in _CONTAINERS and id(value) not in seen:
                seen.add(id(value))
                self.contents.append((value, value.copy()))

    def __exit__(self, *exc: Any) -> None:
        for container, contents in self.contents:
            container.clear()
            if isinstance(container, list):
                container.extend(contents)
            else:
                container.update(contents)
        for obj, attrs in self.kept:
            now = vars(obj)
            for key in [k for k in now if k not in attrs]:
                del now[key]
            now.update(attrs)


# Containers whose contents are put back in place (their identity is what the model holds).
_CONTAINERS = (list, dict, set, collections.OrderedDict)


def _plain_object(value: Any) -> bool:
    # An instance of a user class (a rotary-embedding helper, a processor): not a module,
    # tensor, class, function or builtin value.
    return (isinstance(getattr(value, "__dict__", None), dict) and not isinstance(value, (torch.nn.Module, torch.Tensor))
            and not inspect.isclass(value) and not inspect.isroutine(value) and not inspect.ismodule(value))


def _capture_error(model: torch.nn.Module, e: BaseException) -> BccError:
    first = next((line for line in str(e).splitlines() if line.strip()), "")[:200]
    site = capture_site(model, e)
    at = f" in {site.describe()}" if site is not None else ""
    if is_value_dependent(e):
        # In the model's own forward the code runs around every block: no choice of blocks avoids it.
        around = site is not None and site.module == "<root>"
        return BccError(
            ErrorCode.CAPTURE_FAILED,
            f"torch.export could not capture {type(model).__name__}: its forward depends on tensor "
            f"*values*{at} ({type(e).__name__}: {first}). bcc needs one static graph per input "
            "shape, and no capture torch has (torch.export strict or not, Dynamo with "
            "fullgraph=True) traces shapes or control flow decided by tensor values. Make that "
            "code shape-static (e.g. a dense form of a routing, or lengths fixed by the input "
            "shapes)" + (": it is in the model's own forward, outside its blocks, so choosing other blocks "
                         "does not avoid it." if around else ", or select blocks inside it and cache those."),
        )
    return BccError(
        ErrorCode.CAPTURE_FAILED,
        f"torch.export could not capture {type(model).__name__}{at}: {type(e).__name__}: {first}. "
        "bcc needs a model torch.export can trace (non-strict); run "
        "torch.export.export(model, args, kwargs, strict=False) to see the full error, or cache a "
        "submodule that exports.",
    )


def _latent_leaves(model: torch.nn.Module, args: tuple, kwargs: dict, leaves: list) -> list[int]:
    """Indices among ``leaves`` of the forward's first parameter: one tensor, or a list or
    tuple of tensors (one latent per sample); empty when it is neither.

    Dynamo's graphs (the backend path) take lifted parameters first, named ``L_self_...``;
    those are skipped.
    """
    try:
        sig = inspect.signature(model.forward)
        params, bound = list(sig.parameters.values()), sig.bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return []
    for p in params:
        if p.name.lower().startswith("l_self_") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = bound.get(p.name)
        parts = list(value) if isinstance(value, (list, tuple)) else [value]
        if not parts or not all(isinstance(v, torch.Tensor) for v in parts):
            return []
        found = [next((k for k, leaf in enumerate(leaves) if leaf is v), None) for v in parts]
        return [] if None in found else found
    return []
