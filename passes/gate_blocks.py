"""Turn each outlined block into a step-indexed branch on a schedule tensor.

For block ``i`` the graph computes::

    row  = index_select(schedule, 0, step.reshape(1))   # not schedule[step]: that guards on data
    outs, new_cache = cond(row[0, i], recompute, reuse, (cache..., block_inputs...))

``recompute`` runs the block and returns its outputs plus what to cache (the
residual ``out - x``, where ``x`` is the input on the block's identity path as
:mod:`bcc.analyze.residual` decides); ``reuse`` rebuilds the outputs from the cache.
A cache held whole is not a branch output: the main graph takes it from the cond's
output (see :func:`_held_in_branch`). Caches are threaded
functionally: they enter as placeholders and leave as the graph's last outputs, in
``gm.meta["bcc_cache_slots"]`` order, so the branches mutate nothing and the graph
stays exportable.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from bcc.analyze.blocks import in_module
from bcc.analyze.regions import split_region
from bcc.analyze.residual import decide_residuals, fx_dataflow
from bcc.errors import BccError, BccInternalError, ErrorCode
from bcc.analyze.slots import CacheSlot, batch_broadcast_shape

from bcc.passes.annotate_blocks import BLOCKS, META
from bcc.passes.lift_weights import WEIGHTS
from bcc.passes.outline_blocks import PREFIX, storage_key

__all__ = ["CacheSlot", "GateBlocksPass", "SLOTS"]

SLOTS = "bcc_cache_slots"
aten = torch.ops.aten


def _val(node: fx.Node):
    return node.meta.get("val")


@dataclass
class _Plan:
    """One block being gated: its call, its subgraph, a slot per output and their inputs."""

    node: fx.Node
    sub: fx.GraphModule
    slots: list[CacheSlot]
    caches: list[fx.Node]
    tables: list[fx.Node]

    @property
    def paths(self) -> list[tuple[int, ...] | None]:
        """Per slot, the block inputs on its identity path (base first), or None: cached whole."""
        return [None if s.base is None else (s.base, *s.also) for s in self.slots]


def _slots(name: str, node: fx.Node, sub: fx.GraphModule, mode: str, weights: set[fx.Node]) -> list[CacheSlot]:
    """A slot per block output, its residual base decided by :mod:`bcc.analyze.residual`
    (the rule the hook reference, calibration and training use too)."""
    outs = list(sub.graph.output_node().args[0])
    # Weights the block reads from outside its region (a get_attr in the parent graph, or
    # lifted to a graph input for export) reach it as operands, but they are not block
    # inputs to the rule: an eager call of the block does not pass them.
    constants = {k for k, a in enumerate(node.args) if a.op == "get_attr" or a in weights}
    ends = split_region(name)
    if ends is not None:
        # A region's output can only be a residual of what its start reads (the rule's
        # module doc): every other input is a constant to the rule, as in the eager recording.
        places = [n for n in sub.graph.nodes if n.op == "placeholder"]
        constants |= {k for k, ph in enumerate(places) if not any(in_module(u, ends[0]) for u in ph.users)}
    slots = []
    for d, out in zip(decide_residuals(fx_dataflow(sub, constants), block=name, mode=mode), outs):
        v = _val(out)
        symbolic = isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) or (
            isinstance(v, torch.Tensor) and not all(isinstance(x, int) for x in v.shape))
        if symbolic:
            raise BccError(
                ErrorCode.STATIC_SHAPE,
                f"block {name!r} hands the code after it a value whose size is computed from tensor values "
                f"(output {d.output}: {out.format_node()[:160]}); bcc caches block outputs in buffers of one static "
                "shape per input signature. Make the token count static (pad the tokens instead of selecting "
                "them by a mask).")
        if not isinstance(v, torch.Tensor):
            raise BccInternalError(f"block {name!r} output {d.output} has no tensor metadata: {out.format_node()}")
        slots.append(CacheSlot(name, d.output, d.base, tuple(int(x) for x in v.shape), v.dtype, v.device, d.stream,
                               d.also))
    return slots


def _contiguous(g: fx.Graph, node: fx.Node, like: fx.Node | None = None) -> fx.Node:
    """Make ``node`` contiguous with canonical strides.

    ``contiguous()`` keeps arbitrary strides on size-1 dims, which torch.cond still
    compares between branches (a 1x1 latent at the bottom of a UNet trips it), so
    tensors with a size-1 dim are cloned to the canonical layout instead.
    """
    val = _val(like if like is not None else node)
    if isinstance(val, torch.Tensor) and any(isinstance(d, int) and d == 1 for d in val.shape):
        return g.call_function(aten.clone.default, (node,), {"memory_format": torch.contiguous_format})
    return g.call_function(aten.contiguous.default, (node,))


def _aliases(val, inputs: list) -> bool:
    key = storage_key(val)
    return key is not None and any(storage_key(v) == key for v in inputs)


class _Holder(torch.nn.Module):
    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block


def _adjust(g: fx.Graph, cache: fx.Node, row: fx.Node, val: torch.Tensor) -> fx.Node:
    """``(1 + gamma) * cache + beta`` with ``row = [[gamma], [beta]]`` of shape ``[1, 2, B, C]``
    (a row per sample, so guidance halves can have corrections of their own)."""
    shape = batch_broadcast_shape(tuple(val.shape))
    pair = g.call_function(aten.select.int, (row, 0, 0))
    gamma = g.call_function(aten.reshape.default, (g.call_function(aten.select.int, (pair, 0, 0)), shape))
    beta = g.call_function(aten.reshape.default, (g.call_function(aten.select.int, (pair, 0, 1)), shape))
    scaled = g.call_function(aten.mul.Tensor, (cache, g.call_function(aten.add.Tensor, (gamma, 1))))
    return g.call_function(aten.add.Tensor, (scaled, beta))


def _held_in_branch(path: tuple[int, ...] | None) -> bool:
    """Whether a slot's new cache is a branch output; a cache held whole is made in the main graph.

    A branch that returned its output and a copy of it as the cache could return one buffer
    twice under inductor (2.13, CPU: it dropped the copy), and the main graph, which takes
    a cond's outputs for separate buffers, reused the output's buffer once its last reader
    ran: the cache held a later value (tiny PixArt, batch 1: proj_out's input, with and
    without scale-shift; tests/test_fuzz.py::test_whole_cache_*). In the main graph the
    cache is the cond's output itself, a graph output inductor keeps alive (a copy where the
    caller receives that tensor too), or, with scale-shift (where a reused output is the
    corrected cache, not the cache), ``where(bit, output, old cache)``.
    """
    return path is not None


def _branch(sub: fx.GraphModule, n_in: int, paths: list[tuple[int, ...] | None], recompute: bool,
            scale_shift: bool = False) -> fx.GraphModule:
    g = fx.Graph()
    sub_outs = list(sub.graph.output_node().args[0])
    caches = [g.placeholder(f"cache_{j}") for j in range(len(paths))]
    rows = [g.placeholder(f"ss_{j}") for j in range(len(paths))] if scale_shift else []
    xs = [g.placeholder(f"x_{k}") for k in range(n_in)]

    def identity(path: tuple[int, ...]) -> fx.Node:  # the base plus the other inputs on the path
        node = xs[path[0]]
        for k in path[1:]:
            node = g.call_function(aten.add.Tensor, (node, xs[k]))
        return node

    outs: list[fx.Node] = []
    new: list[fx.Node] = []
    if recompute:
        res = g.call_module("block", tuple(xs))
        inputs = [_val(n) for n in sub.graph.nodes if n.op == "placeholder"]
        for j, path in enumerate(paths):
            got = g.call_function(operator.getitem, (res, j))
            # A block may return (a view of) one of its inputs; contiguous() of that is the
            # operand itself, which a branch may not return.
            out = (g.call_function(aten.clone.default, (got,), {"memory_format": torch.contiguous_format})
                   if _aliases(_val(sub_outs[j]), inputs) else _contiguous(g, got, like=sub_outs[j]))
            outs.append(out)
            if _held_in_branch(path):
                new.append(g.call_function(aten.sub.Tensor, (out, identity(path))))
    else:
        for j, path in enumerate(paths):
            # Both branches must agree on strides, and an input (the residual base) may be
            # a transposed view, so every output is made contiguous; caches always are.
            # A branch may not return one of its operands (inductor: "cond_false might be
            # aliasing the input"), hence the clone of the untouched cache.
            reused = _adjust(g, caches[j], rows[j], _val(sub_outs[j])) if scale_shift else caches[j]
            if path is not None:
                outs.append(_contiguous(g, g.call_function(aten.add.Tensor, (identity(path), reused)),
                                        like=sub_outs[j]))
            else:
                outs.append(_contiguous(g, reused, like=sub_outs[j]) if scale_shift
                            else g.call_function(aten.clone.default, (reused,)))
            if _held_in_branch(path):
                new.append(g.call_function(aten.clone.default, (caches[j],)))
    g.output(tuple(outs + new))
    root = _Holder(sub) if recompute else torch.nn.Module()
    return fx.GraphModule(root, g, class_name="Recompute" if recompute else "Reuse")


class GateBlocksPass(PassBase):
    """Gate every outlined block on ``schedule[step, i]``.

    Adds placeholders ``bcc_schedule`` (bool ``[T, K]``), ``bcc_step`` (0-d int64) and
    one ``bcc_cache_*`` per cached tensor at the front, and appends the new caches to
    the outputs. Writes ``gm.meta["bcc_cache_slots"]`` (a :class:`CacheSlot` each).

    With ``scale_shift=True`` it also adds one ``bcc_ss_*`` input per cache slot: this
    step's ``[1, 2, B, C]`` row of ``gamma, beta`` per sample, which the runtime slices from
    the ``[T, 2, B, C]`` table on the host (the graph never indexes a device table with the
    CPU step); the reuse branch then returns ``(1 + gamma) * cache + beta`` where it
    returned ``cache``.

    Example:
        >>> import torch
        >>> from bcc.capture.graph import capture
        >>> from bcc.passes import AnnotateBlocksPass, OutlineBlocksPass
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a = torch.nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return self.a(x) * 2
        >>> gm = capture(Net(), (torch.ones(1, 2),)).gm
        >>> for p in (AnnotateBlocksPass(names=["a"]), OutlineBlocksPass(), GateBlocksPass()):
        ...     gm = p(gm).graph_module
        >>> [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        ['bcc_schedule', 'bcc_step', 'bcc_cache_0_0', 'x']
        >>> sum(n.target is torch.ops.higher_order.cond for n in gm.graph.nodes)
        1
    """

    def __init__(self, mode: str = "residual", scale_shift: bool = False):
        super().__init__()
        self.mode = mode
        self.scale_shift = scale_shift

    def requires(self, gm: fx.GraphModule) -> None:
        if BLOCKS not in gm.meta:
            raise BccInternalError("GateBlocksPass needs AnnotateBlocksPass and OutlineBlocksPass first")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        names = gm.meta[BLOCKS]
        calls = {n.meta[META]: n for n in graph.nodes if n.op == "call_module" and str(n.target).startswith(PREFIX)}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        # LiftWeightsPass appends one placeholder per weight, last.
        lifted = len(gm.meta.get(WEIGHTS, ()))
        weights = set(placeholders[len(placeholders) - lifted:]) if lifted else set()
        first = placeholders[0]
        returned = [_val(a) for a in graph.output_node().args[0] if isinstance(a, fx.Node)]
        with graph.inserting_before(first):
            schedule = graph.placeholder("bcc_schedule")
            step = graph.placeholder("bcc_step")
        plans: list[_Plan] = []
        for i, name in enumerate(names):
            node = calls[name]
            sub = gm.get_submodule(str(node.target))
            slots = _slots(name, node, sub, self.mode, weights)
            with graph.inserting_before(first):
                caches = [graph.placeholder(f"bcc_cache_{i}_{j}") for j in range(len(slots))]
            plans.append(_Plan(node, sub, slots, caches, []))
        if self.scale_shift:
            for i, plan in enumerate(plans):
                with graph.inserting_before(first):
                    plan.tables = [graph.placeholder(f"bcc_ss_{i}_{j}") for j in range(len(plan.slots))]
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last):
            step1 = graph.call_function(aten.reshape.default, (step, [1]))
        with graph.inserting_after(step1):
            row = graph.call_function(aten.index_select.default, (schedule, 0, step1))
        with graph.inserting_after(row):
            row = graph.call_function(aten.select.int, (row, 0, 0))
        new_caches: list[fx.Node] = []
        for i, plan in enumerate(plans):
            node = plan.node
            n_in = len(node.args)
            true_gm = _branch(plan.sub, n_in, plan.paths, recompute=True, scale_shift=self.scale_shift)
            false_gm = _branch(plan.sub, n_in, plan.paths, recompute=False, scale_shift=self.scale_shift)
            true_name, false_name = f"bcc_recompute_{i}", f"bcc_reuse_{i}"
            gm.add_submodule(true_name, true_gm)
            gm.add_submodule(false_name, false_gm)
            with graph.inserting_before(node):
                # Inductor asserts that a cond operand keeps the strides it was traced
                # with; an operand that is a transposed view can come out of inductor's
                # own lowering with other strides, so operands enter contiguous.
                operands = tuple(a if a.op == "get_attr" else _contiguous(graph, a) for a in node.args)
                pred = graph.call_function(aten.select.int, (row, 0, i))
                # The inputs are already this step's [1, 2, B, C] rows: indexing a device
                # table with the CPU step would be a device mismatch (or a copy) on a GPU.
                ss_rows = tuple(plan.tables)
                t_attr = graph.get_attr(true_name)
                f_attr = graph.get_attr(false_name)
                cond = graph.call_function(
                    torch.ops.higher_order.cond,
                    (pred, t_attr, f_attr, tuple(plan.caches) + ss_rows + operands),
                )
                n_out = len(plan.slots)
                held = [_held_in_branch(p) for p in plan.paths]
                getters = [graph.call_function(operator.getitem, (cond, j)) for j in range(n_out + sum(held))]
            cond.meta[META] = node.meta[META]
            for user in list(node.users):
                if user.target is not operator.getitem:
                    raise BccInternalError(f"outlined block {node.name} has a non-getitem user")
                user.replace_all_uses_with(getters[user.args[1]])
                graph.erase_node(user)
            graph.erase_node(node)
            gm.delete_submodule(str(node.target))
            new: list[fx.Node] = []
            k = n_out
            with graph.inserting_after(getters[-1]):
                for j, in_branch in enumerate(held):
                    if in_branch:
                        new.append(getters[k])
                        k += 1
                    elif self.scale_shift:
                        new.append(graph.call_function(aten.where.self, (pred, getters[j], plan.caches[j])))
                    elif _aliases(_val(plan.sub.graph.output_node().args[0][j]), returned):
                        # The caller gets this tensor too, and may change it in place.
                        new.append(graph.call_function(aten.clone.default, (getters[j],),
                                                       {"memory_format": torch.contiguous_format}))
                    else:
                        new.append(getters[j])
            new_caches.extend(new)
        out_node = graph.output_node()
        out_node.args = (tuple(out_node.args[0]) + tuple(new_caches),)
        gm.meta[SLOTS] = [slot for plan in plans for slot in plan.slots]
        graph.lint()
        gm.recompile()
        return PassResult(gm, bool(names))
