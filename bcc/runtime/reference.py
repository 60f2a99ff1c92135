"""A plain reference implementation of block caching: eager Python, no graph work.

It is the oracle the tests compare :func:`bcc.compile` against. Each block module's
``forward`` is wrapped: at steps where the schedule says recompute, it runs and
stores what it caches; otherwise it rebuilds its output from the cache. The step is
the number of calls of the root model modulo the schedule's length, as in
:class:`bcc.BccModule`.
"""
from __future__ import annotations

import torch

from bcc.analyze.hooks import CacheEntry, cache_entry, patch_forwards
from bcc.analyze.recording import BlockResiduals
from bcc.plan.schedule import Schedule

__all__ = ["HookReference"]


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
        self._restore = patch_forwards(model, schedule.block_names, self._wrap, self.residuals)
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
            inputs = self.residuals.inputs(name, args, kwargs)
            ss = self.scale_shift
            adjust = None if ss is None else (lambda slot, cached: ss.adjust(ss.index_of(slot), cached, self.step))
            return self.caches[name].rebuild(inputs, adjust)

        return wrapped

    def remove(self) -> None:
        """Restore the original forwards."""
        self._restore()
        self._hook.remove()
