"""analyze: find the cacheable blocks of a captured graph.

Blocks are found from the module-path metadata that torch.export and Dynamo put on
every node (``node.meta["nn_module_stack"]``), not from a list of known classes:
an unknown model whose blocks are recognisable still works.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import networkx as nx
import torch  # noqa: F401 - the docstring examples run in this module's namespace
import torch.fx as fx

from bcc.analyze.regions import find_region, is_region
from bcc.capture.graph import LATENT
from bcc.errors import BccError, ErrorCode

__all__ = ["Block", "BlockSelector", "find_block_regions", "module_calls", "in_module", "ATTENTION"]

ATTENTION = "attention"
REGION = "region"  # the class_name of a multi-module region's Block

# ATen ops that mark a module as attention. Softmax covers implementations that do
# not call SDPA (e.g. diffusers' AttnProcessor).
_ATTENTION_OPS = {
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "softmax",
    "_softmax",
}
_CONV_OPS = {"conv2d", "conv1d", "conv3d", "convolution", "_convolution"}

BlockSelector = str | type | Sequence[str | type] | Callable[[str, str], bool]


@dataclass(frozen=True)
class Block:
    """One cacheable region of the graph: the nodes of one call of one module, or of a
    multi-module region (:mod:`bcc.analyze.regions`).

    Attributes:
        name: the module path, e.g. ``"down_blocks.1.attentions.0"``.
        class_name: qualified class name of the module.
        nodes: the region's nodes in graph order, including parameters used only here.
        members: for a multi-module region (``"start..end"``), the outermost modules wholly
            inside it; empty for a module.
    """

    name: str
    class_name: str
    nodes: tuple[fx.Node, ...]
    members: tuple[str, ...] = ()


@dataclass
class _ModuleCall:
    path: str
    class_name: str
    keys: set
    nodes: list
    has_attention: bool = False
    has_spatial_conv: bool = False
    reads_latent: bool = True


def _op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _stack(node: fx.Node) -> list[tuple[str, str, str]]:
    """(key, path, class_name) from outermost to innermost, root excluded."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, (path, cls) in stack.items():
        if path in ("", "L['self']"):
            continue
        cls_name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        out.append((key, _clean_path(path), cls_name))
    return out


def in_module(node: fx.Node, path: str) -> bool:
    """Whether ``node`` was computed by module ``path`` (or one inside it)."""
    return any(p == path for _key, p, _cls in _stack(node))


def _clean_path(path: str) -> str:
    # Dynamo writes "L['self'].down_blocks[0].attentions[0]", or with inlined modules
    # "L['self'].__dict__['_modules']['down_blocks'].0"; export writes
    # "down_blocks.0.attentions.0". All become the latter.
    if path.startswith("L['self']"):
        path = path[len("L['self']"):].replace(".__dict__['_modules']", "._modules")
    path = path.replace("[", ".").replace("]", "").replace("'", "")
    return path.replace("._modules.", ".").lstrip(".")


def module_calls(gm: fx.GraphModule) -> dict[str, _ModuleCall]:
    """Every module path seen on the graph's nodes, with its nodes and traits."""
    calls: dict[str, _ModuleCall] = {}
    latent = _latent_dependent(gm)
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        op = _op_name(node)
        is_attn = op in _ATTENTION_OPS
        is_spatial_conv = False
        if op in _CONV_OPS and len(node.args) > 1:
            weight = node.args[1].meta.get("val") if isinstance(node.args[1], fx.Node) else None
            # A depthwise kernel (one input channel per output: Sana's Mix-FFN) mixes
            # neighbouring tokens inside a transformer block's feed-forward; a ResNet's
            # dense 3x3 kernels are what keeps a UNet level from being one block.
            is_spatial_conv = (weight is not None and any(int(k) > 1 for k in weight.shape[2:])
                               and int(weight.shape[1]) > 1)
        for key, path, cls in _stack(node):
            call = calls.get(path)
            if call is None:
                call = calls[path] = _ModuleCall(path, cls, set(), [], reads_latent=latent is None)
            call.reads_latent |= latent is not None and node in latent
            call.keys.add(key)
            call.nodes.append(node)
            call.has_attention |= is_attn
            call.has_spatial_conv |= is_spatial_conv
    return calls


def _latent_dependent(gm: fx.GraphModule) -> set[fx.Node] | None:
    """Nodes computed from the latent input (capture names it in ``gm.meta``), or None if unknown."""
    names = set(gm.meta.get(LATENT) or ())
    starts = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name in names]
    if not starts:
        return None
    seen: set[fx.Node] = set()
    todo = starts
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(node.users)
    return seen


def _matcher(selector: BlockSelector, calls: dict[str, _ModuleCall]) -> Callable[[str, str], bool]:
    if callable(selector) and not isinstance(selector, type):
        return selector
    if selector == ATTENTION:
        # The paper caches the spatial transformers: modules that mix tokens by
        # attention and hold no dense spatial convolution (a ResNet's 3x3 convs). The
        # outermost such module is the block: Transformer2DModel in a UNet, the
        # per-layer transformer block in a DiT. It must read the latent: conditioning
        # modules that attend (a caption pooler, a prompt's token refiner) see only
        # the timestep and the text.
        return lambda path, cls: (calls[path].has_attention and not calls[path].has_spatial_conv
                                  and calls[path].reads_latent)
    items = [selector] if isinstance(selector, (str, type)) else list(selector)
    globs = [s for s in items if isinstance(s, str)]
    classes = [s for s in items if isinstance(s, type)]
    class_names = {f"{c.__module__}.{c.__qualname__}" for c in classes}
    short = {c.__name__ for c in classes}

    def match(path: str, cls: str) -> bool:
        if cls in class_names or cls.rsplit(".", 1)[-1] in short:
            return True
        return any(fnmatch.fnmatchcase(path, g) or cls.rsplit(".", 1)[-1] == g for g in globs)

    return match


def find_block_regions(gm: fx.GraphModule, selector: BlockSelector = ATTENTION,
                       regions: Sequence[str] = ()) -> list[Block]:
    """The regions of ``gm`` that ``selector`` picks, in execution order.

    ``selector`` is ``"attention"`` (the default set), a module-path glob such as
    ``"down_blocks.*.resnets.*"``, a class (or class name), a list of those, or a
    predicate ``(path, class_name) -> bool``. Nested matches resolve to the
    outermost module. Every region is checked to be convex (no path leaves it and
    comes back), so it can be computed or skipped as a unit.

    Names ``"start..end"`` in the selector list (or in ``regions``) are multi-module
    regions (:mod:`bcc.analyze.regions`); a matched module inside one is part of it.

    Example:
        >>> from bcc.capture.graph import capture
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return self.b(self.a(x))
        >>> [b.name for b in find_block_regions(capture(Net(), (torch.ones(1, 4),)).gm, "*")]
        ['a', 'b']
    """
    calls = module_calls(gm)
    selector, regions = _split_regions(selector, regions)
    spans = [find_region(gm, name, calls) for name in regions]
    inside = {n: s.name for s in spans for n in s.nodes}
    if len(inside) < sum(len(s.nodes) for s in spans):
        raise BccError(ErrorCode.BLOCK_NOT_REGION,
                       f"regions {[s.name for s in spans]} overlap; a node can be cached by one block only.")
    match = _matcher(selector, calls) if selector is not None else (lambda path, cls: False)
    chosen: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        for _key, path, cls in _stack(node):
            if match(path, cls):
                chosen.setdefault(path, []).append(node)
                break
    for path in [p for p, nodes in chosen.items() if any(n in inside for n in nodes)]:
        if not all(n in inside for n in chosen[path]):
            raise BccError(ErrorCode.BLOCK_NOT_REGION,
                           f"block {path!r} lies partly inside region {inside[next(n for n in chosen[path] if n in inside)]!r}; "
                           "select blocks wholly inside or outside the regions.")
        del chosen[path]  # wholly inside a region: the region caches it
    if not chosen and not spans:
        raise BccError(
            ErrorCode.NO_BLOCKS,
            f"no module of {type(gm).__name__.removeprefix('Captured') or 'the model'} matches "
            f"blocks={_describe(selector)}. Module paths in the graph include "
            f"{_sample_paths(calls)}; pass blocks= as globs over those paths or as classes.",
        )
    for path in chosen:
        if len(calls[path].keys) > 1:
            raise BccError(
                ErrorCode.BLOCK_MULTI_CALL,
                f"block {path!r} is called {len(calls[path].keys)} times in one forward; a cached "
                "value per step needs one call per step. Select its caller or another module.",
            )
    graph = _as_digraph(gm)
    blocks = []
    for path, nodes in chosen.items():
        region = _with_private_params(nodes)
        _check_convex(graph, path, region)
        blocks.append(Block(path, calls[path].class_name, tuple(n for n in gm.graph.nodes if n in region)))
    blocks += [Block(s.name, REGION, tuple(n for n in gm.graph.nodes if n in s.nodes), s.members) for s in spans]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(blocks, key=lambda b: min(order[n] for n in b.nodes if n.op != "get_attr"))


def _split_regions(selector: BlockSelector, regions: Sequence[str]) -> tuple[BlockSelector | None, list[str]]:
    """The selector without its region names, and all region names (selector's and ``regions``)."""
    regions = list(regions)
    if isinstance(selector, str) and is_region(selector):
        return None, regions + [selector]
    if isinstance(selector, (list, tuple)):
        regions += [s for s in selector if isinstance(s, str) and is_region(s)]
        rest = [s for s in selector if not (isinstance(s, str) and is_region(s))]
        return (rest or None), regions
    return selector, regions


def _with_private_params(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    region = set(nodes)
    for node in list(region):
        for inp in node.all_input_nodes:
            if inp.op == "get_attr" and all(u in region for u in inp.users):
                region.add(inp)
    return region


def _as_digraph(gm: fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node)
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
    return g


def _check_convex(graph: nx.DiGraph, path: str, region: set[fx.Node]) -> None:
    # Convex: no node outside the region is both reachable from it and reaches into
    # it. Such a node would have to run between two halves of the block.
    leaving = {u for n in region for u in graph.successors(n) if u not in region}
    seen: set[fx.Node] = set()
    frontier = list(leaving)
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        for succ in graph.successors(node):
            if succ in region:
                raise BccError(
                    ErrorCode.BLOCK_NOT_REGION,
                    f"block {path!r} is not a single-entry/single-exit region: its value flows out "
                    f"through {node.format_node()} and back into the block. It cannot be skipped as "
                    "a unit; select a module that contains both parts, or its submodules.",
                )
            frontier.append(succ)


def _describe(selector: BlockSelector) -> str:
    if isinstance(selector, type):
        return selector.__name__
    if isinstance(selector, (list, tuple)):
        return "[" + ", ".join(_describe(s) for s in selector) + "]"
    return repr(selector)


def _sample_paths(calls: dict[str, _ModuleCall], n: int = 6) -> str:
    tops = sorted({p for p in calls if p.count(".") <= 2})[:n]
    return ", ".join(repr(p) for p in tops) or "(none: the graph has no module metadata)"
