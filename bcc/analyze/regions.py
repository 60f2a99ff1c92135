"""analyze: regions — a cached unit that spans several modules.

A *region* is named ``"<start>..<end>"`` by two module paths: it is every node that
depends on ``start`` and that ``end`` depends on, ``start``'s and ``end``'s own nodes
included (the graph's convex hull of the two), so it is convex by construction. Its
values may leave it only through ``end``'s outputs: then skipping the region is
skipping everything from ``start`` to ``end``, and an eager run can cache it by
replacing ``end``'s output (what the hook reference, calibration and scale-shift
training do), while the nodes in between compute values nobody reads.

DeepCache's skipped "deep branch" is such a region (see :func:`unet_branch`), and so
is a run of consecutive DiT layers (``"transformer_blocks.2..transformer_blocks.5"``).
A region's output is cached as a residual of the stream entering it where the rule
of :mod:`bcc.analyze.residual` finds one among the values ``start`` reads (a run of
DiT layers: the hidden states entering the first), else whole (DeepCache's branch,
whose end mixes in a skip connection by concatenation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from bcc.errors import BccError, ErrorCode

__all__ = ["SEP", "region", "split_region", "is_region", "exit_module", "unet_branch",
           "RegionSpan", "find_region", "span_names"]

SEP = ".."


def region(start: str, end: str) -> str:
    """The block name of the region from module ``start`` to module ``end`` (both included).

    Example:
        >>> region("transformer_blocks.2", "transformer_blocks.5")
        'transformer_blocks.2..transformer_blocks.5'
    """
    for path in (start, end):
        if not isinstance(path, str) or not path or SEP in path:
            raise BccError(ErrorCode.CONFIG_INVALID,
                           f"a region's ends are module paths such as 'down_blocks.1', got {path!r}.")
    return f"{start}{SEP}{end}"


def split_region(name: str) -> tuple[str, str] | None:
    """``(start, end)`` of a region name, None for a module path.

    Example:
        >>> split_region("down_blocks.1..up_blocks.1"), split_region("down_blocks.1")
        (('down_blocks.1', 'up_blocks.1'), None)
    """
    if SEP not in name:
        return None
    start, _, end = name.partition(SEP)
    if not start or not end or SEP in end:
        raise BccError(ErrorCode.CONFIG_INVALID,
                       f"{name!r} is not a region name: write 'start..end' with two module paths.")
    return start, end


def is_region(name: str) -> bool:
    """Whether block ``name`` is a region (``"start..end"``) rather than one module."""
    return isinstance(name, str) and SEP in name


def exit_module(name: str) -> str:
    """The module whose forward an eager run wraps for block ``name``: the module itself,
    or a region's ``end`` (whose output is the region's output)."""
    ends = split_region(name)
    return name if ends is None else ends[1]


@dataclass(frozen=True)
class RegionSpan:
    """A region found in a graph.

    Attributes:
        name: ``"start..end"``.
        nodes: its nodes (parameters used only there included).
        members: the outermost modules wholly inside it, in execution order (what its
            FLOPs are the sum of).
    """

    name: str
    nodes: frozenset
    members: tuple[str, ...]


def find_region(gm: fx.GraphModule, name: str, calls: dict[str, Any]) -> RegionSpan:
    """The :class:`RegionSpan` of region ``name`` in ``gm``; ``calls`` from
    :func:`bcc.analyze.blocks.module_calls`. Errors say which end is missing, or where a
    value leaves the region other than through ``end``."""
    start, end = split_region(name)
    for path in (start, end):
        if path not in calls:
            near = sorted(p for p in calls if p.count(".") <= path.count(".") + 1)[:8]
            raise BccError(
                ErrorCode.BLOCK_NOT_FOUND,
                f"region {name!r}: the graph has no module {path!r}. Module paths in it include "
                f"{', '.join(map(repr, near))}.",
            )
        if len(calls[path].keys) > 1:
            raise BccError(ErrorCode.BLOCK_MULTI_CALL,
                           f"region {name!r}: module {path!r} is called {len(calls[path].keys)} times in one "
                           "forward; a region's ends must run once per step.")
    first, last = set(calls[start].nodes), set(calls[end].nodes)
    after = _closure(first, lambda n: n.users)
    if not last & after:
        raise BccError(
            ErrorCode.BLOCK_NOT_REGION,
            f"region {name!r}: {end!r} does not depend on {start!r}, so nothing runs from one to the other. "
            "Name the earlier module first.",
        )
    before = _closure(last, lambda n: n.all_input_nodes)
    nodes = (after & before) | first | last
    # What only the region reads comes along (a resnet's time-embedding projection, a
    # layer's parameters): it is skipped with the region instead of running every step.
    # Nothing outside reads it, so the region stays convex and single-exit. What
    # ``start`` reads stays out: that is the computation before the region.
    feeds_start = _closure(first, lambda n: n.all_input_nodes)
    todo = list(nodes)
    while todo:
        for inp in todo.pop().all_input_nodes:
            if (inp not in nodes and (inp.op == "get_attr" or inp not in feeds_start) and inp.op != "placeholder"
                    and all(u in nodes for u in inp.users)):
                nodes.add(inp)
                todo.append(inp)
    # Checks with no result (export's _assert_tensor_metadata) on a region's values are
    # skipped with it.
    nodes |= {u for n in list(nodes) for u in n.users
              if u not in nodes and not u.users and u.op == "call_function" and all(i in nodes for i in u.all_input_nodes)}
    for node in gm.graph.nodes:
        if node in nodes and node not in last and any(u not in nodes for u in node.users):
            reader = next(u for u in node.users if u not in nodes)
            raise BccError(
                ErrorCode.BLOCK_NOT_REGION,
                f"region {name!r}: a value computed inside it ({node.format_node()}) is read after it by "
                f"{reader.format_node()}, so skipping the region would leave that reader stale. End the "
                "region later (at a module that consumes it) or start it later.",
            )
    members = [p for p, c in calls.items() if c.nodes and all(n in nodes for n in c.nodes)]
    outer = [p for p in members if not any(p != q and p.startswith(q + ".") for q in members)]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    outer.sort(key=lambda p: order[calls[p].nodes[0]])
    return RegionSpan(name, frozenset(nodes), tuple(outer))


def _closure(seeds: set, step) -> set:
    seen: set = set()
    todo = list(seeds)
    while todo:
        node = todo.pop()
        for nxt in step(node):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def unet_branch(unet: torch.nn.Module, branch: int = 0) -> str:
    """DeepCache's skipped branch of a diffusers ``UNet2DConditionModel`` as a region name.

    DeepCache (Ma et al., 2024) recomputes, on its cached steps, the UNet down to layer
    ``branch % 3`` of down block ``branch // 3`` and the mirrored layer of the up path, and
    reuses the feature entering that layer; everything between is the region. So
    ``bcc.Schedule.every(N, steps, [unet_branch(unet, b)])`` is DeepCache's uniform
    ``cache_interval=N, cache_branch_id=b``.

    Example:
        >>> from diffusers import UNet2DConditionModel
        >>> unet = UNet2DConditionModel(block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
        ...                             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        ...                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        ...                             layers_per_block=1, sample_size=8, attention_head_dim=2)
        >>> unet_branch(unet, 0)
        'down_blocks.0..up_blocks.1.resnets.0'
    """
    downs, ups = getattr(unet, "down_blocks", None), getattr(unet, "up_blocks", None)
    if downs is None or ups is None or getattr(unet, "mid_block", None) is None:
        raise BccError(ErrorCode.CONFIG_INVALID,
                       f"unet_branch needs a UNet with down_blocks, mid_block and up_blocks; "
                       f"{type(unet).__name__} has not. Name the region's ends yourself: bcc.region(start, end).")
    block, layer = divmod(int(branch), 3)
    if not 0 <= block < len(downs) or layer >= len(downs[block].resnets):
        raise BccError(ErrorCode.CONFIG_INVALID,
                       f"branch {branch} is not in this UNet: it has {len(downs)} down blocks of "
                       f"{[len(d.resnets) for d in downs]} layers (branch = 3 * block + layer).")
    # The region starts at layer `layer` of down block `block`: the whole block when it is
    # its first layer (DeepCache then skips the block's wrapped forward too).
    start = f"down_blocks.{block}" if layer == 0 else f"down_blocks.{block}.resnets.{layer}"
    up_index = len(ups) - 1 - block
    up = ups[up_index]
    n = len(up.resnets)
    # Up-path layers are numbered from the output: layer `layer` is resnets[n - 1 - layer], and
    # DeepCache recomputes it, so the region ends at the layer before it (its attention, if any).
    last = n - 2 - layer
    if last < 0:
        raise BccError(ErrorCode.CONFIG_INVALID,
                       f"branch {branch} leaves nothing to skip on the up path of this UNet.")
    attentions = getattr(up, "attentions", None)
    end = (f"up_blocks.{up_index}.attentions.{last}" if attentions is not None and len(attentions) > last
           else f"up_blocks.{up_index}.resnets.{last}")
    return region(start, end)


def span_names(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(regions, module paths)`` among block ``names``."""
    return [n for n in names if is_region(n)], [n for n in names if not is_region(n)]
