"""analyze: the residual rule's eager adapter — record a block call's ATen ops, and
decide once per block and input signature for the tools that run blocks eagerly (the
hook reference, calibration, scale-shift training).

A region (``"start..end"``) is not one call: its ``start`` module's pre-hook starts the
recording and the call of its ``end`` module (whose output is the region's) decides; the
candidates for its residual base are the tensors ``start`` receives and reads (see
:mod:`bcc.analyze.residual`). On later calls the base is taken from ``start``'s
arguments of the same step.

The eager window (``start``'s pre-hook to ``end``'s return) and the graph's region (the
nodes between ``start`` and ``end``, plus what only they read) are the same code in the
models bcc targets. A region whose hull pulls in a computation that eager code runs
*before* ``start`` (say, a projection only the region reads, computed early by the
parent) would give the rule a value the recording sees as an input and the graph as an
inner node, and the two sides could decide differently (one a residual, the other the
whole output): each is a valid cache, but the hook reference would then no longer match
the graph exactly. No shipped or tested model has such a region.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from bcc.analyze.regions import split_region
from bcc.analyze.residual import Dataflow, OpRecord, Residual, TensorMeta, Value, decide_residuals
from bcc.analyze.slots import CacheSlot
from bcc.capture.signature import signature_of
from bcc.errors import BccError, ErrorCode

__all__ = ["record_call", "BlockResiduals"]


class _Recorder(TorchDispatchMode):
    """Logs every ATen op with its operands' and outputs' keys.

    A key is ``(id, writes)``: an op that returns one of its own operands (``add_``, an
    ``out=`` variant) wrote a new value into that tensor, so its output is a new key.
    (Writes through another view of the tensor are not seen; the rule then follows the
    value from before the write, which makes reuse less accurate, never wrong.) Every
    tensor seen is held until the recorder is dropped, so no id is reused meanwhile.
    """

    def __init__(self):
        super().__init__()
        self.ops: list[OpRecord] = []
        self.metas: dict[Hashable, TensorMeta] = {}
        self._writes: dict[int, int] = {}
        self._held: list[torch.Tensor] = []

    def key(self, t: torch.Tensor) -> Hashable:
        k = (id(t), self._writes.get(id(t), 0))
        if k not in self.metas:
            self._held.append(t)
            self.metas[k] = TensorMeta(tuple(t.shape), t.dtype)
        return k

    def _refs(self, tree: Any) -> Any:
        return pytree.tree_map(lambda a: Value(self.key(a)) if isinstance(a, torch.Tensor) else a, tree)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rargs, rkwargs = self._refs(tuple(args)), self._refs(dict(kwargs))
        out = func(*args, **kwargs)
        operands = {id(a) for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        outs = []
        for v in pytree.tree_leaves(out):
            if isinstance(v, torch.Tensor) and id(v) in operands:
                self._writes[id(v)] = self._writes.get(id(v), 0) + 1
            outs.append(self.key(v) if isinstance(v, torch.Tensor) else None)
        self.ops.append(OpRecord(func, rargs, rkwargs, tuple(outs)))
        return out


def record_call(forward: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Any, Dataflow]:
    """Run ``forward(*args, **kwargs)`` once, recording its ATen ops; returns its output
    and the :class:`Dataflow`, whose inputs are the call's tensor arguments in pytree
    order (positional, then keyword) and whose outputs are its output leaves.

    Example:
        >>> out, flow = record_call(lambda x: x + 1, (torch.zeros(2),), {})
        >>> len(flow.inputs), len(flow.ops), out.tolist()
        (1, 1, [1.0, 1.0])
    """
    rec = _Recorder()
    inputs = tuple(rec.key(a) for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor))
    with rec:
        out = forward(*args, **kwargs)
    outputs = tuple(rec.key(v) if isinstance(v, torch.Tensor) else None for v in pytree.tree_leaves(out))
    return out, Dataflow(inputs, outputs, tuple(rec.ops), rec.metas)


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]


def _key(name: str, args: tuple, kwargs: dict, inputs: list[torch.Tensor]) -> tuple:
    # One tensor passed as two arguments is one value to the rule, so which arguments
    # are the same tensor is part of what the answer depends on.
    first: dict[int, int] = {}
    aliasing = tuple(first.setdefault(id(a), i) for i, a in enumerate(inputs))
    return (name, signature_of(args, kwargs), aliasing)


@dataclass
class _Entry:
    """A region's ``start`` call in this forward: its tensor arguments, the answer's key,
    and, while undecided, the recording (``start_ops``: how many ops ``start`` itself ran)."""

    inputs: list[torch.Tensor]
    key: tuple
    recorder: _Recorder | None = None
    input_keys: tuple = ()
    start_ops: int | None = None
    active: bool = False


def _whole(n: int) -> tuple[Residual, ...]:
    return tuple(Residual(j, None, None, "output mode") for j in range(n))


class BlockResiduals:
    """The rule's answer for eager block calls, decided once per block and input signature.

    The first call of a block with a signature (shapes, dtypes, devices, non-tensor
    arguments) runs under :func:`record_call`; later ones run plainly and reuse the
    answer. A region needs :meth:`attach` (``patch_forwards(..., residuals=...)`` calls
    it) so that its ``start`` module's calls are seen.

    Example:
        >>> br = BlockResiduals()
        >>> x = torch.randn(2, 3)
        >>> out, slots, inputs = br.call("blk", lambda a, b: (b + 1, a * 2), (x, x + 1), {})
        >>> [(s.base, s.stream) for s in slots]  # b: argument 1, the first one the block uses
        [(1, 0), (None, None)]
    """

    def __init__(self, mode: str = "residual"):
        self.mode = mode
        self._slots: dict[tuple, tuple[CacheSlot | None, ...]] = {}
        self._entries: dict[str, _Entry] = {}

    # -- regions ------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module, names: Sequence[str]) -> Callable[[], None]:
        """Watch the ``start`` modules of the regions among ``names``; returns the undo."""
        modules = dict(model.named_modules())
        handles = []
        for name in names:
            ends = split_region(name)
            if ends is None:
                continue
            start = modules.get(ends[0])
            if start is None:
                raise BccError(ErrorCode.BLOCK_NOT_FOUND,
                               f"region {name!r}: the model has no module {ends[0]!r}; list its modules with "
                               "bcc.find_blocks or model.named_modules().")
            handles.append(start.register_forward_pre_hook(
                lambda m, a, kw, name=name: self._start(name, a, kw), with_kwargs=True))
            handles.append(start.register_forward_hook(lambda m, a, o, name=name: self._started(name)))
        if handles:
            # An exception between a region's start and end must not leave its recording on.
            handles.append(model.register_forward_hook(lambda m, a, o: self._drop(), always_call=True))

        def detach() -> None:
            for h in handles:
                h.remove()
            self._drop()

        return detach

    def _start(self, name: str, args: tuple, kwargs: dict) -> None:
        inputs = _tensors(args, kwargs)
        entry = _Entry(inputs, _key(name, args, kwargs, inputs))
        if entry.key not in self._slots and self.mode != "output":
            rec = _Recorder()
            entry.recorder, entry.input_keys = rec, tuple(rec.key(a) for a in inputs)
            rec.__enter__()
            entry.active = True
        self._entries[name] = entry

    def _started(self, name: str) -> None:
        entry = self._entries.get(name)
        if entry is not None and entry.recorder is not None and entry.start_ops is None:
            entry.start_ops = len(entry.recorder.ops)

    def _stop(self, entry: _Entry) -> None:
        if entry.active:
            entry.active = False
            entry.recorder.__exit__(None, None, None)

    def _drop(self) -> None:
        # After each forward: a region's start and end run within one. Innermost first:
        # recordings were entered in start order.
        for entry in reversed(list(self._entries.values())):
            self._stop(entry)
        self._entries.clear()

    def inputs(self, name: str, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The tensors a cached value of block ``name`` is a residual of (its bases index
        them): the call's tensor arguments, or for a region its ``start``'s of this step."""
        if split_region(name) is None:
            return _tensors(args, kwargs)
        entry = self._entries.get(name)
        if entry is None:
            raise BccError(ErrorCode.BLOCK_NOT_REGION,
                           f"region {name!r}: its end ran before its start in this forward, or its start was not "
                           "watched (patch_forwards(..., residuals=...) attaches it). Name the earlier module "
                           "first.")
        return entry.inputs

    def _decide_region(self, name: str, out: Any) -> tuple[Residual, ...]:
        entry = self._entries[name]
        rec = entry.recorder
        self._stop(entry)
        entry.recorder = None
        leaves = pytree.tree_leaves(out)
        if rec is None:  # output mode
            return _whole(len(leaves))
        start_ops = rec.ops[: entry.start_ops if entry.start_ops is not None else len(rec.ops)]
        read = {v.key for op in start_ops for v in pytree.tree_leaves((op.args, op.kwargs)) if isinstance(v, Value)}
        # What start receives but does not read is no candidate (the graph holds it as a constant).
        inputs = tuple(k if k in read else ("unread", i) for i, k in enumerate(entry.input_keys))
        outputs = tuple(rec.key(v) if isinstance(v, torch.Tensor) else None for v in leaves)
        flow = Dataflow(inputs, outputs, tuple(rec.ops), rec.metas)
        return decide_residuals(flow, block=name, mode=self.mode)

    # -- every block --------------------------------------------------------------------
    def call(self, name: str, forward: Callable[..., Any], args: tuple,
             kwargs: dict) -> tuple[Any, tuple[CacheSlot | None, ...], list[torch.Tensor]]:
        """``(output, one CacheSlot per output leaf (None: not a tensor), inputs)``; a slot's
        ``base`` indexes ``inputs`` (:meth:`inputs`)."""
        region = split_region(name) is not None
        inputs = self.inputs(name, args, kwargs)
        key = self._entries[name].key if region else _key(name, args, kwargs, inputs)
        slots = self._slots.get(key)
        if slots is not None:
            return forward(*args, **kwargs), slots, inputs
        if region:
            out = forward(*args, **kwargs)
            decisions = self._decide_region(name, out)
        elif self.mode == "output":  # nothing to decide: every output is cached whole
            out = forward(*args, **kwargs)
            decisions = _whole(len(pytree.tree_leaves(out)))
        else:
            out, flow = record_call(forward, args, kwargs)
            decisions = decide_residuals(flow, block=name)
        slots = tuple(
            None if not isinstance(v, torch.Tensor) else
            CacheSlot(name, j, d.base, tuple(v.shape), v.dtype, v.device, d.stream, d.also)
            for j, (v, d) in enumerate(zip(pytree.tree_leaves(out), decisions)))
        self._slots[key] = slots
        return out, slots, inputs
