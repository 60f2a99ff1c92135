"""analyze: the one rule for which block input a block output is a residual of.

Residual caching stores ``out - x`` and returns ``x_now + cached`` on reuse, which is
only accurate when ``x`` is the *residual stream*: the input that reaches the output
along the block's identity path (``out = x + f(...)``). Shapes alone cannot say which
input that is: ``forward(a, b): return b + 2 * a.mean(-1, keepdim=True)`` has two inputs
shaped like its output, and a Flux single block whose text and image token counts
are equal returns two streams of one shape from one ``cat``.

The rule walks back from an output through the ops that keep a value on the identity
path, multiplying their coefficients:

- ``add``/``sub``/``rsub`` (each tensor operand shaped like the result; ``alpha`` and the
  sign are coefficients), ``neg``, ``mul``/``div`` by a Python number;
- identities: ``alias``, ``detach``, ``clone``, ``contiguous``, casts to the same dtype,
  eval-mode ``dropout``, a ``clamp`` to at least the dtype's finite range, and the
  reshapes that keep element order (``view``, ``reshape``, ``flatten``, ``unsqueeze``...);
- a ``slice``/``narrow``/``split`` piece of a ``cat`` that selects exactly one operand's
  range (Flux single blocks concatenate text and image, process them, split them).

An output's base is the input with the output's shape and dtype that is reached with
total coefficient exactly 1 (so ``2 * x`` and ``x + x`` have no identity path, and
neither does ``f(x) - x``). None: the output is cached whole. Several such inputs
(Cosmos adds a position embedding to the hidden states: ``x + e + f(x + e)``): the identity
path is their sum, the base the one the block uses first and the others ``also`` added,
so the cache is ``out - (x + e)``. Such an input reached only in part (a slice that is not
one ``cat`` operand): the rule cannot tell, and the output is cached whole with a
:class:`~bcc.errors.BccWarning`.

The rule reads a :class:`Dataflow`; :func:`fx_dataflow` builds one from an outlined
block subgraph (what :class:`~bcc.passes.GateBlocksPass` sees),
:func:`bcc.analyze.recording.record_call` from one eager call of a block (what the hook
reference, calibration and scale-shift training see), so all of them get the same answer.

A region (``"start..end"``, :mod:`bcc.analyze.regions`) is many module calls, and its
inputs are every value it reads from outside. Its output may only be a residual of a
value its ``start`` module reads (the stream entering the region: a DiT's hidden states
entering its first layer): the others, a time embedding or a text encoding, are held as
constants. The graph side reads that from the outlined region's nodes of ``start``, the
eager side from the ops recorded while ``start`` runs, so both offer the rule the same
candidates.
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Any, Collection, Hashable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from bcc.errors import BccWarning

__all__ = ["Value", "TensorMeta", "OpRecord", "Dataflow", "Residual", "decide_residuals", "fx_dataflow"]

# More walk steps than this and the rule gives up (cannot tell); real blocks need < 100.
_BUDGET = 20_000


@dataclass(frozen=True)
class Value:
    """A tensor operand of an :class:`OpRecord`, named by its key in the :class:`Dataflow`."""

    key: Hashable


@dataclass(frozen=True)
class TensorMeta:
    # A data-dependent size (a block that selects tokens by a mask) is kept as its symbol's
    # name: it equals only itself.
    shape: tuple[int | str, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class OpRecord:
    """One op of a block call: ``target`` (an ATen overload), its arguments with every
    tensor replaced by a :class:`Value`, and the keys of its outputs in order (``None``
    for an output that is not a tensor)."""

    target: Any
    args: tuple
    kwargs: dict
    outputs: tuple[Hashable | None, ...]


@dataclass(frozen=True)
class Dataflow:
    """What the rule reads of one block call.

    Attributes:
        inputs: keys of the block's tensor inputs, in the adapter's order (a key listed
            twice is one value passed twice; the first index stands for it).
        outputs: keys of the block's outputs (``None``: not a tensor).
        ops: the ops of the call in execution order.
        metas: shape and dtype of every key.
    """

    inputs: tuple[Hashable, ...]
    outputs: tuple[Hashable | None, ...]
    ops: tuple[OpRecord, ...]
    metas: dict[Hashable, TensorMeta]


@dataclass(frozen=True)
class Residual:
    """The rule's answer for one block output.

    Attributes:
        output: the output's index in :attr:`Dataflow.outputs`.
        base: index into :attr:`Dataflow.inputs` of the input it is a residual of, or
            ``None``: cache it whole.
        also: more inputs on the identity path, added to the base (indices, by first use).
        stream: the base's rank in the order the block first uses its inputs (the same
            number in the graph and in an eager call); ``None`` without a base.
        reason: why, in words.
        unclear: the rule could not tell (and warned).
    """

    output: int
    base: int | None
    stream: int | None
    reason: str
    unclear: bool = False
    also: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Sel:
    """The part ``[start, stop)`` of dim ``dim`` of a value that the walk is following."""

    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class _State:
    key: Hashable
    coef: float
    sel: _Sel | None = None
    partial: bool = False


def _name(target: Any) -> str:
    name = getattr(target, "_opname", None) or getattr(target, "__name__", "")
    # In-place variants (add_) follow the functional op's rule; eager records them.
    return name[:-1] if name.endswith("_") and not name.startswith("__") else name


_VIEWS = {"view", "reshape", "_unsafe_view", "view_copy", "_reshape_alias", "flatten", "unflatten", "squeeze",
          "unsqueeze"}
_IDENTITIES = {"alias", "detach", "clone", "contiguous", "lift_fresh_copy", "positive"}
_CASTS = {"_to_copy", "to", "type_as", "_to_dtype"}
_SPLITS = {"split", "split_with_sizes", "chunk", "unsafe_split", "unsafe_split_with_sizes", "unsafe_chunk",
           "tensor_split"}
_CATS = {"cat", "concat", "concatenate"}


def _number(a: Any) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _arg(op: OpRecord, i: int, name: str, default: Any = None) -> Any:
    return op.args[i] if len(op.args) > i else op.kwargs.get(name, default)


class _Walker:
    """Walks back from one output; ``reach`` ends up as ``{input index: [coefficient, partly]}``."""

    def __init__(self, flow: Dataflow, producers: dict, index: dict):
        self.flow, self.producers, self.index = flow, producers, index
        self.reach: dict[int, list] = {}

    def run(self, key: Hashable) -> bool:
        """False when the budget ran out."""
        stack = [_State(key, 1.0)]
        for _ in range(_BUDGET):
            if not stack:
                return True
            s = stack.pop()
            if s.key in self.index:
                r = self.reach.setdefault(self.index[s.key], [0.0, False])
                if s.sel is not None or s.partial:
                    r[1] = True
                else:
                    r[0] += s.coef
                continue
            found = self.producers.get(s.key)
            if found is not None:
                stack.extend(self.step(found[0], found[1], s))
        return not stack

    def shape(self, key: Hashable) -> tuple[int, ...] | None:
        m = self.flow.metas.get(key)
        return None if m is None else m.shape

    def follow(self, v: Any, s: _State, coef: float, *, keep_shape: bool = True) -> list[_State]:
        """Continue into operand ``v`` with ``coef``; a broadcast operand is not the stream."""
        if not isinstance(v, Value) or self.shape(v.key) is None:
            return []
        if keep_shape and self.shape(v.key) != self.shape(s.key):
            return []
        return [_State(v.key, coef, s.sel, s.partial)]

    def step(self, op: OpRecord, item: int, s: _State) -> list[_State]:
        name = _name(op.target)
        x = op.args[0] if op.args else None
        if name in _SPLITS:
            return self.piece(op, item, s)
        if name in ("select", "unbind"):  # drops a dim: the value is a part of x
            return self.follow(x, _State(s.key, s.coef, None, True), s.coef, keep_shape=False)
        if len(op.outputs) != 1:
            return []
        if name in ("add", "sub", "rsub"):
            alpha = _arg(op, 2, "alpha", 1)
            if not _number(alpha):
                return []
            a, b = op.args[0], op.args[1] if len(op.args) > 1 else op.kwargs.get("other")
            ca, cb = {"add": (1, alpha), "sub": (1, -alpha), "rsub": (-alpha, 1)}[name]
            return self.follow(a, s, s.coef * ca) + self.follow(b, s, s.coef * cb)
        if name in ("mul", "div"):
            a, b = op.args[0], op.args[1] if len(op.args) > 1 else op.kwargs.get("other")
            if op.kwargs.get("rounding_mode") is not None:
                return []
            if name == "mul" and _number(a) and isinstance(b, Value):
                a, b = b, a
            if not (isinstance(a, Value) and _number(b)) or (name == "div" and b == 0):
                return []
            return self.follow(a, s, s.coef * b if name == "mul" else s.coef / b)
        if name == "neg":
            return self.follow(x, s, -s.coef)
        if name in _IDENTITIES or (name in _CASTS and self.same_dtype(x, op)) or self.no_op(name, op):
            return self.follow(x, s, s.coef)
        if name in _VIEWS or (name == "expand" and self.shape(getattr(x, "key", None)) == self.shape(s.key)):
            # Element order is kept, but a selection on the result no longer maps to one dim.
            if s.sel is not None:
                s = _State(s.key, s.coef, None, True)
            return self.follow(x, s, s.coef, keep_shape=False)
        if name in ("slice", "narrow"):
            return self.slice(op, s)
        if name in _CATS:
            return self.cat(op, s)
        return []

    def same_dtype(self, x: Any, op: OpRecord) -> bool:
        out = self.flow.metas.get(op.outputs[0])
        src = self.flow.metas.get(getattr(x, "key", None))
        return out is not None and src is not None and out.dtype == src.dtype

    def no_op(self, name: str, op: OpRecord) -> bool:
        if name == "dropout":
            return not _arg(op, 2, "train", True) or _arg(op, 1, "p", 0.5) == 0
        if name in ("clamp", "clip"):
            meta = self.flow.metas.get(op.outputs[0])
            if meta is None or not meta.dtype.is_floating_point:
                return False
            big = torch.finfo(meta.dtype).max
            lo, hi = _arg(op, 1, "min"), _arg(op, 2, "max")
            # Flux clips float16 streams to +-65504: the identity for every finite value.
            return (lo is None or (_number(lo) and lo <= -big)) and (hi is None or (_number(hi) and hi >= big))
        return False

    def narrowed(self, x: Any, s: _State, dim: int, start: int, stop: int) -> list[_State]:
        """Continue into ``x`` knowing that the current value is ``x[dim, start:stop]``."""
        shape = self.shape(getattr(x, "key", None))
        if shape is None:
            return []
        if (start, stop) == (0, shape[dim]):
            return self.follow(x, s, s.coef, keep_shape=False)
        if s.sel is None:
            sel, partial = _Sel(dim, start, stop), s.partial
        elif s.sel.dim == dim:
            sel, partial = _Sel(dim, start + s.sel.start, start + s.sel.stop), s.partial
        else:
            sel, partial = None, True
        return [_State(x.key, s.coef, sel, partial)]

    def slice(self, op: OpRecord, s: _State) -> list[_State]:
        x = op.args[0]
        shape = self.shape(getattr(x, "key", None))
        if shape is None:
            return []
        dim = _arg(op, 1, "dim", 0) % max(len(shape), 1)
        size = shape[dim]
        if _name(op.target) == "narrow":
            start = _arg(op, 2, "start")
            start = start + size if start < 0 else start
            stop = start + _arg(op, 3, "length")
        else:
            if _arg(op, 4, "step", 1) != 1:
                return self.follow(x, _State(s.key, s.coef, None, True), s.coef, keep_shape=False)
            start, stop = _arg(op, 2, "start"), _arg(op, 3, "end")
            start = 0 if start is None else (start + size if start < 0 else start)
            stop = size if stop is None else (stop + size if stop < 0 else stop)
            start, stop = min(max(start, 0), size), min(max(stop, 0), size)
        return self.narrowed(x, s, dim, start, stop)

    def piece(self, op: OpRecord, item: int, s: _State) -> list[_State]:
        x = op.args[0]
        shape = self.shape(getattr(x, "key", None))
        sizes = [self.shape(k) for k in op.outputs]
        if shape is None or any(z is None or len(z) != len(shape) for z in sizes):
            return []
        dim = _arg(op, 2, "dim", 0) % max(len(shape), 1)
        start = sum(z[dim] for z in sizes[:item])
        return self.narrowed(x, s, dim, start, start + sizes[item][dim])

    def cat(self, op: OpRecord, s: _State) -> list[_State]:
        parts = [v for v in op.args[0] if isinstance(v, Value) and self.shape(v.key) is not None]
        out = self.shape(s.key)
        parts = [v for v in parts if len(self.shape(v.key)) == len(out)]  # legacy empty [0] operands
        dim = _arg(op, 1, "dim", 0) % max(len(out), 1)
        nonempty = [v for v in parts if self.shape(v.key)[dim] > 0]
        states, offset = [], 0
        for v in parts:
            n = self.shape(v.key)[dim]
            lo, hi = offset, offset + n
            offset = hi
            if n == 0:
                continue
            if s.sel is None or s.sel.dim != dim:
                # The value is several operands side by side: each is only part of it.
                states.append(_State(v.key, s.coef, s.sel, s.partial or len(nonempty) > 1))
            elif (s.sel.start, s.sel.stop) == (lo, hi):
                states.append(_State(v.key, s.coef, None, s.partial))
            elif lo <= s.sel.start and s.sel.stop <= hi:
                states.append(_State(v.key, s.coef, _Sel(dim, s.sel.start - lo, s.sel.stop - lo), s.partial))
            elif s.sel.start < hi and lo < s.sel.stop:
                states.append(_State(v.key, s.coef, None, True))
        return states


def _first_use_ranks(flow: Dataflow, index: dict) -> dict[int, int]:
    """Each input's rank in the order the block first computes with it.

    Identities and reshapes do not count as uses: eager skips the ones that change
    nothing (``.to`` to the same dtype, ``contiguous`` of a contiguous tensor) while the
    graph records them, and the ranks must be the same on both sides.
    """
    alias = dict(index)
    order: list[int] = []
    for op in flow.ops:
        operands = [v.key for v in pytree.tree_leaves((op.args, op.kwargs)) if isinstance(v, Value)]
        if not any(k is not None for k in op.outputs):
            continue  # asserts and metadata queries compute nothing
        name = _name(op.target)
        if name in _IDENTITIES | _CASTS | _VIEWS and operands:
            if operands[0] in alias:
                for k in op.outputs:
                    alias[k] = alias[operands[0]]
            continue
        for k in operands:
            i = alias.get(k)
            if i is not None and i not in order:
                order.append(i)
    order += [i for i in sorted(set(index.values())) if i not in order]
    return {i: r for r, i in enumerate(order)}


def decide_residuals(flow: Dataflow, *, block: str = "block", mode: str = "residual",
                     warn: bool = True) -> tuple[Residual, ...]:
    """For each output of ``flow``, the input it is a residual of (see the module doc).

    ``mode="output"`` caches every output whole. ``warn`` emits a
    :class:`~bcc.errors.BccWarning` for each output the rule cannot tell.

    Example:
        >>> class Block(torch.nn.Module):
        ...     def forward(self, a, b):
        ...         return b + 2 * a.mean(-1, keepdim=True), a * 2
        >>> x = torch.randn(2, 3)
        >>> from bcc.analyze.recording import record_call
        >>> out, flow = record_call(Block(), (x, x.clone()), {})
        >>> [(r.base, r.reason) for r in decide_residuals(flow)]
        [(1, 'identity path'), (None, 'no identity path')]
    """
    index: dict[Hashable, int] = {}
    for i, k in enumerate(flow.inputs):
        index.setdefault(k, i)
    producers = {k: (op, i) for op in flow.ops for i, k in enumerate(op.outputs) if k is not None}
    ranks = _first_use_ranks(flow, index)
    decisions = []
    for j, key in enumerate(flow.outputs):
        meta = flow.metas.get(key) if key is not None else None
        if meta is None:
            decisions.append(Residual(j, None, None, "not a tensor"))
            continue
        if mode == "output":
            decisions.append(Residual(j, None, None, "output mode"))
            continue
        walker = _Walker(flow, producers, index)
        if not walker.run(key):
            decisions.append(Residual(j, None, None, "its identity paths are too many to follow", True))
            continue
        # Only inputs shaped like the output could be its base; others reached (in part,
        # or through a reshape) do not make the answer unclear.
        fits = {i: r for i, r in walker.reach.items() if flow.metas.get(flow.inputs[i]) == meta}
        full = [i for i, (c, part) in fits.items() if c == 1 and not part]
        partly = sorted(i for i, (_, part) in fits.items() if part)
        if partly:
            reason = f"input(s) {partly} reach it only in part (a slice that is not one operand of a cat)"
            decisions.append(Residual(j, None, None, reason, True))
        elif len(full) > 1:
            first, *also = sorted(full, key=ranks.__getitem__)
            decisions.append(Residual(j, first, ranks[first], f"identity path of inputs {sorted(full)}",
                                      also=tuple(also)))
        elif full:
            decisions.append(Residual(j, full[0], ranks[full[0]], "identity path"))
        else:
            decisions.append(Residual(j, None, None, "no identity path"))
    if warn:
        for d in decisions:
            if d.unclear:
                warnings.warn(
                    f"bcc cannot tell which input output {d.output} of block {block!r} (shape "
                    f"{tuple(flow.metas[flow.outputs[d.output]].shape)}) is a residual of: {d.reason}. It is cached "
                    "whole instead, which is exact on recompute steps but reuses a staler value than a residual "
                    "would. If the block has one skip connection, write it as a plain `x + f(...)` of one argument; "
                    "pass mode='output' to cache every output whole without this warning.",
                    BccWarning, stacklevel=3)
    return tuple(decisions)


# -- adapters ----------------------------------------------------------------------------
def _size(d: Any) -> int | str:
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    return int(d) if is_concrete_int(d) else str(d)


def fx_dataflow(sub: fx.GraphModule, constants: Collection[int] = ()) -> Dataflow:
    """The :class:`Dataflow` of an outlined block subgraph: placeholders are the inputs
    (in call order), the output tuple the outputs; ``get_attr`` values are constants, and
    so are the placeholders at the positions ``constants`` (weights lifted to inputs for
    export: an eager call does not pass them either).

    Example:
        >>> from bcc.capture.graph import capture
        >>> gm = capture(torch.nn.Identity(), (torch.ones(2),)).gm
        >>> flow = fx_dataflow(gm)
        >>> len(flow.inputs), len(flow.outputs)
        (1, 1)
    """
    inputs, ops, metas = [], [], {}

    def meta(key: Hashable, val: Any) -> None:
        if isinstance(val, torch.Tensor):
            metas[key] = TensorMeta(tuple(_size(d) for d in val.shape), val.dtype)

    for node in sub.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder":
            # A constant keeps its position (bases index placeholders) under a key no op reads.
            inputs.append(node if len(inputs) not in constants else ("constant", len(inputs)))
            meta(node, val)
        elif node.op == "call_function":
            if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and isinstance(
                    node.args[0].meta.get("val"), (list, tuple)):
                continue  # an item of a multi-output op: recorded with that op
            if isinstance(val, (list, tuple)):
                getters = {u.args[1]: u for u in node.users if u.target is operator.getitem}
                outs = tuple(getters.get(i, (node, i)) for i in range(len(val)))
                for k, v in zip(outs, val):
                    meta(k, v)
            else:
                outs = (node if isinstance(val, torch.Tensor) else None,)
                meta(node, val)
            to_value = lambda n: Value(n)  # noqa: E731
            ops.append(OpRecord(node.target, fx.node.map_arg(node.args, to_value),
                                dict(fx.node.map_arg(node.kwargs, to_value)), outs))
    outputs = tuple(o if isinstance(o, fx.Node) and o in metas else None for o in sub.graph.output_node().args[0])
    return Dataflow(tuple(inputs), outputs, tuple(ops), metas)
