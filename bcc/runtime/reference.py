"""A plain reference implementation of block caching: eager Python, no graph work.

It is the oracle the tests compare :func:`bcc.compile` against. Each block module's
``forward`` is wrapped: at steps where the schedule says recompute, it runs and
stores what it caches; otherwise it rebuilds its output from the cache. The step is
the number of calls of the root model modulo the schedule's length, as in
:class:`bcc.BccModule`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from bcc.analyze.residual import BlockResiduals
from bcc.plan.schedule import Schedule
from bcc.scale_shift.layout import CacheSlot

__all__ = ["HookReference", "CacheEntry", "cache_entry", "patch_forwards"]


@dataclass(frozen=True)
class CacheEntry:
    """What a recomputed block call leaves in the cache.

    Attributes:
        spec: the pytree spec of the block's output.
        consts: the output's non-tensor leaves (``None`` at tensor positions).
        slots: a :class:`CacheSlot` per output leaf (``None`` for non-tensors).
        values: per leaf, the cached tensor: ``out - inputs[slot.base]`` or the output.
    """

    spec: pytree.TreeSpec
    consts: list
    slots: tuple[CacheSlot | None, ...]
    values: list[torch.Tensor | None]

    def rebuild(self, inputs: list[torch.Tensor],
                adjust: Callable[[CacheSlot, torch.Tensor], torch.Tensor] | None = None) -> Any:
        """The block's output on a reuse step, from this call's tensor ``inputs``;
        ``adjust(slot, cached)`` corrects each cached value first (scale-shift)."""
        leaves = list(self.consts)
        for j, (slot, cached) in enumerate(zip(self.slots, self.values)):
            if cached is None:
                continue
            value = adjust(slot, cached) if adjust is not None else cached
            if slot.base is not None:
                leaves[j] = inputs[slot.base] + value
            else:
                # The cache is reused at later steps too: never hand it out itself.
                leaves[j] = value if adjust is not None else value.clone()
        return pytree.tree_unflatten(leaves, self.spec)


def cache_entry(out: Any, inputs: list[torch.Tensor], slots: Sequence[CacheSlot | None],
                detach: bool = True) -> CacheEntry:
    """The :class:`CacheEntry` of a recomputed call with output ``out``; ``slots`` come from
    :meth:`bcc.analyze.residual.BlockResiduals.call` (their bases index ``inputs``).

    ``detach=False`` keeps the autograd history (training through whole trajectories).

    Example:
        >>> x = torch.tensor([1.0, 2.0])
        >>> slot = CacheSlot("blk", 0, 0, (2,))
        >>> e = cache_entry(x * 3, [x], [slot])
        >>> e.values[0].tolist(), e.rebuild([torch.zeros(2)]).tolist()
        ([2.0, 4.0], [2.0, 4.0])
    """
    leaves, spec = pytree.tree_flatten(out)
    values = []
    for v, slot in zip(leaves, slots):
        if not isinstance(v, torch.Tensor) or slot is None:
            values.append(None)
            continue
        c = v - inputs[slot.base] if slot.base is not None else v.clone()
        values.append(c.detach() if detach else c)
    consts = [None if isinstance(v, torch.Tensor) else v for v in leaves]
    return CacheEntry(spec, consts, tuple(slots), values)


def patch_forwards(model: torch.nn.Module, names: Sequence[str], wrap: Callable) -> Callable[[], None]:
    """Set each named module's ``forward`` to ``wrap(name, index, forward)``; returns the undo.

    An instance attribute shadows the class's ``forward``, so undoing deletes it again
    (or puts back an instance attribute that was there before).
    """
    modules = dict(model.named_modules())
    originals = {}
    for i, name in enumerate(names):
        originals[name] = modules[name].__dict__.get("forward")
        modules[name].forward = wrap(name, i, modules[name].forward)

    def restore() -> None:
        for name, original in originals.items():
            if original is None:
                del modules[name].forward
            else:
                modules[name].forward = original

    return restore


class HookReference:
    """Apply ``schedule`` to ``model`` in place by wrapping block forwards.

    Residual mode caches ``out - x`` for every tensor output, where ``x`` is the tensor
    argument on the block's identity path (:mod:`bcc.analyze.residual`, the rule the
    graph rewrite uses, decided at a block's first call per input signature); outputs
    without one, and all outputs in output mode, cache the whole tensor.

    Example:
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.block = torch.nn.Identity()
        ...     def forward(self, x):
        ...         return self.block(x * 2)
        >>> net = Net()
        >>> ref = HookReference(net, Schedule.every(2, 2, ["block"]))
        >>> [net(torch.tensor([1.0])).item(), net(torch.tensor([5.0])).item()]
        [2.0, 10.0]
        >>> ref.remove()
    """

    def __init__(self, model: torch.nn.Module, schedule: Schedule, mode: str = "residual", scale_shift=None):
        self.model = model
        self.schedule = schedule
        self.mode = mode
        # A bcc.ScaleShift: reused values become (1 + gamma[step]) * cached + beta[step].
        self.scale_shift = scale_shift
        self.calls = 0
        self.caches: dict[str, CacheEntry] = {}
        self.residuals = BlockResiduals(mode)
        self._restore = patch_forwards(model, schedule.block_names, self._wrap)
        self._hook = model.register_forward_pre_hook(self._count)

    @property
    def step(self) -> int:
        return (self.calls - 1) % self.schedule.num_steps

    def _count(self, module, args):
        self.calls += 1

    def _wrap(self, name: str, index: int, forward):
        def wrapped(*args, **kwargs):
            if bool(self.schedule.mask[self.step, index]):
                out, slots, inputs = self.residuals.call(name, forward, args, kwargs)
                self.caches[name] = cache_entry(out, inputs, slots)
                return out
            inputs = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            ss = self.scale_shift
            adjust = None if ss is None else (lambda slot, cached: ss.adjust(ss.index_of(slot), cached, self.step))
            return self.caches[name].rebuild(inputs, adjust)

        return wrapped

    def remove(self) -> None:
        """Restore the original forwards."""
        self._restore()
        self._hook.remove()
