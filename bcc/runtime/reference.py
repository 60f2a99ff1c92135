"""A plain reference implementation of block caching: eager Python, no graph work.

It is the oracle the tests compare :func:`bcc.compile` against. Each block module's
``forward`` is wrapped: at steps where the schedule says recompute, it runs and
stores what it caches; otherwise it rebuilds its output from the cache. The step is
the number of calls of the root model modulo the schedule's length, as in
:class:`bcc.BccModule`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from bcc.plan.schedule import Schedule

__all__ = ["HookReference", "residual_bases", "patch_forwards"]


def residual_bases(leaves: list, inputs: list, mode: str = "residual") -> list[int | None]:
    """For each output leaf, the index of the input it is a residual of, or None.

    The first not-yet-used tensor input of the same shape and dtype; None in output
    mode or when no input matches (the whole output is cached then).
    """
    used: set[int] = set()
    bases: list[int | None] = []
    for v in leaves:
        base = None
        if mode == "residual" and isinstance(v, torch.Tensor):
            for k, a in enumerate(inputs):
                if k not in used and isinstance(a, torch.Tensor) and a.shape == v.shape and a.dtype == v.dtype:
                    used.add(k)
                    base = k
                    break
        bases.append(base)
    return bases


def cache_entry(out: Any, inputs: list, mode: str, detach: bool = True) -> tuple:
    """What a recomputed block leaves in the cache: ``(spec, consts, bases, cached tensors)``.

    ``detach=False`` keeps the autograd history (training through whole trajectories)."""
    leaves, spec = pytree.tree_flatten(out)
    bases = residual_bases(leaves, inputs, mode)
    cache = [None if not isinstance(v, torch.Tensor) else (v - inputs[b] if b is not None else v.clone())
             for v, b in zip(leaves, bases)]
    if detach:
        cache = [None if v is None else v.detach() for v in cache]
    consts = [None if isinstance(v, torch.Tensor) else v for v in leaves]
    return spec, consts, bases, cache


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

    Residual mode caches ``out - x`` for every tensor output, where ``x`` is the
    first not-yet-used tensor argument (positional, then keyword) of the same shape
    and dtype; outputs without such an argument, and all outputs in output mode,
    cache the whole tensor.

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
        self.caches: dict[str, tuple] = {}
        self._restore = patch_forwards(model, schedule.block_names, self._wrap)
        self._hook = model.register_forward_pre_hook(self._count)

    @property
    def step(self) -> int:
        return (self.calls - 1) % self.schedule.num_steps

    def _count(self, module, args):
        self.calls += 1

    def _wrap(self, name: str, index: int, forward):
        def wrapped(*args, **kwargs):
            inputs = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            if bool(self.schedule.mask[self.step, index]):
                out = forward(*args, **kwargs)
                self.caches[name] = cache_entry(out, inputs, self.mode)
                return out
            spec, consts, bases, cache = self.caches[name]
            leaves = list(consts)
            for j, cached in enumerate(cache):
                if cached is not None:
                    if self.scale_shift is not None:
                        cached = self.scale_shift.adjust(self.scale_shift.slot_index(name, j), cached, self.step)
                    leaves[j] = inputs[bases[j]] + cached if bases[j] is not None else cached.clone()
            return pytree.tree_unflatten(leaves, spec)

        return wrapped

    def remove(self) -> None:
        """Restore the original forwards."""
        self._restore()
        self._hook.remove()
