"""analyze: eager block hooks — what a recomputed block call leaves in the cache, and
how block forwards are wrapped.

The hook reference (:mod:`bcc.runtime.reference`), calibration and scale-shift
training all run blocks eagerly; they share these two helpers, and the residual
decisions of :mod:`bcc.analyze.residual`, so eager caching means one thing everywhere.
:func:`delegating_getattr` lets a wrapper (a compiled model, a training student, a peer's
adapter) stand in for the model it wraps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from bcc.analyze.regions import exit_module
from bcc.analyze.slots import CacheSlot
from bcc.errors import BccError, ErrorCode

__all__ = ["CacheEntry", "cache_entry", "patch_forwards", "delegating_getattr"]


@dataclass(frozen=True)
class CacheEntry:
    """What a recomputed block call leaves in the cache.

    Attributes:
        spec: the pytree spec of the block's output.
        consts: the output's non-tensor leaves (``None`` at tensor positions).
        slots: a :class:`CacheSlot` per output leaf (``None`` for non-tensors).
        values: per leaf, the cached tensor: ``out - slot.identity(inputs)`` or the output.
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
                leaves[j] = slot.identity(inputs) + value
            else:
                # The cache is reused at later steps too: never hand it out itself.
                leaves[j] = value if adjust is not None else value.clone()
        return pytree.tree_unflatten(leaves, self.spec)


def cache_entry(out: Any, inputs: list[torch.Tensor], slots: Sequence[CacheSlot | None],
                detach: bool = True) -> CacheEntry:
    """The :class:`CacheEntry` of a recomputed call with output ``out``; ``slots`` come from
    :meth:`bcc.analyze.recording.BlockResiduals.call` (their bases index ``inputs``).

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
        c = v - slot.identity(inputs) if slot.base is not None else v.clone()
        values.append(c.detach() if detach else c)
    consts = [None if isinstance(v, torch.Tensor) else v for v in leaves]
    return CacheEntry(spec, consts, tuple(slots), values)


def patch_forwards(model: torch.nn.Module, names: Sequence[str], wrap: Callable,
                   residuals: Any = None) -> Callable[[], None]:
    """Set each named block's ``forward`` to ``wrap(name, index, forward)``; returns the undo.

    A region's forward is its end module's (:func:`bcc.analyze.regions.exit_module`):
    replacing that output on a reuse step is skipping the region, since nothing else in it
    is read after it (the modules between still run eagerly, on values nobody reads).
    ``residuals`` (a :class:`bcc.analyze.recording.BlockResiduals`) is attached to the
    regions' start modules, where their residual bases enter.
    An instance attribute shadows the class's ``forward``, so undoing deletes it again
    (or puts back an instance attribute that was there before).
    """
    modules = dict(model.named_modules())
    originals = {}
    for i, name in enumerate(names):
        path = exit_module(name)
        if path not in modules:
            raise BccError(ErrorCode.BLOCK_NOT_FOUND,
                           f"block {name!r}: the model has no module {path!r}; list its blocks with bcc.find_blocks.")
        originals[path] = modules[path].__dict__.get("forward")
        modules[path].forward = wrap(name, i, modules[path].forward)
    detach = residuals.attach(model, names) if residuals is not None else (lambda: None)

    def restore() -> None:
        detach()
        for path, original in originals.items():
            if original is None:
                del modules[path].forward
            else:
                modules[path].forward = original

    return restore


def delegating_getattr(self: torch.nn.Module, name: str) -> Any:
    """``__getattr__`` for wrappers that keep the model as ``_orig_mod``: attributes they
    do not define (``config``, ``dtype``, ...) come from the model, so they can stand in
    for it (``pipe.unet = wrapper``)."""
    try:
        return torch.nn.Module.__getattr__(self, name)
    except AttributeError:
        return getattr(self._modules["_orig_mod"], name)
