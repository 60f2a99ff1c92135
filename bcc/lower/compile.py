"""lower: run the pass list on a captured graph and compile the result (``bcc.compile``'s lowering)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from bcc.capture.graph import Captured
from bcc.config import BccConfig
from bcc.errors import BccError, ErrorCode
from bcc.lower.inductor_fixes import inductor, inductor_settings
from bcc.passes import CacheSlot, PassConfig, run_passes, specialize
from bcc.passes.annotate_blocks import BLOCKS
from bcc.passes.gate_blocks import SLOTS

__all__ = ["Lowered", "RowDispatch", "lower", "compile_graph"]


@dataclass(frozen=True)
class Lowered:
    """A rewritten graph ready to run: ``fn(schedule, step, *caches, *scale_shift, *tensor_leaves)``.

    ``scale_shift`` is empty unless the graph was rewritten with scale-shift tables.
    ``fn`` returns the model's output leaves followed by the new caches. ``lookahead``:
    ``fn`` reads the next step's row as row 1 of its schedule window and skips dead
    caches (:class:`bcc.lower.stepper.Program`'s ``lookahead``).
    """

    gm: fx.GraphModule
    fn: Callable[..., Any]
    block_names: tuple[str, ...]
    slots: tuple[CacheSlot, ...]
    lookahead: bool = False


def compile_graph(gm: fx.GraphModule, config: BccConfig) -> Callable[..., Any]:
    """``gm`` compiled by ``config.backend`` (``"eager"``: ``gm`` itself, run without autograd)."""
    if config.backend == "eager":
        return _without_autograd(gm)
    options = dict(config.inductor_options)
    if config.backend == "inductor":
        return torch.compile(gm, backend=_Inductor(options), fullgraph=True, dynamic=False)
    # A custom backend (e.g. a test's compile counter wrapping inductor) gets no
    # options from torch.compile, so the inductor settings are patched around
    # each call, which is when compilation happens.
    compiled = torch.compile(gm, backend=config.backend, fullgraph=True, dynamic=False)

    def fn(*args: Any) -> Any:
        with inductor_settings(options):
            return compiled(*args)
    return fn


def _without_autograd(gm: fx.GraphModule) -> Callable[..., Any]:
    # An eager torch.cond that sees an operand needing a gradient (one computed from a
    # parameter outside the blocks, like Z-Image's pad tokens) traces its branches with
    # fake tensors, and the branches read the real weights: a raw torch AssertionError.
    # The eager program never gave gradients for the weights inside its branches anyway.
    def fn(*args: Any) -> Any:
        with torch.no_grad():
            return gm(*args)
    return fn


class _Inductor:
    """A Dynamo backend: :func:`inductor` with ``options``."""

    def __init__(self, options: dict):
        self.options = options

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        return inductor(gm, example_inputs, self.options)


class RowDispatch:
    """``strategy="specialize"``: one graph per distinct schedule row, built and compiled
    at the row's first use, chosen on the host from ``schedule[step]``. ``"hybrid"``: the
    uniform rows specialised (all True: no gate costs anything; all False: every cache is
    passed through uncopied), the mixed rows through the one branch graph: four compiles at
    most, whatever the schedule (the all-True row writing every cache or, before another
    all-True row, none; the all-False row; the branch graph).

    The schedule and the step are CPU tensors (see :mod:`bcc.lower.stepper`), so
    reading the row costs no device sync. A new schedule's unseen rows compile on first use.

    With ``lookahead`` the schedule is the stepper's two-row window (this step, the next)
    and a graph is kept per (row, caches the next row reads): a block recomputed now and
    at the next step writes no cache (``SpecializeRowPass``'s dead caches), so the all-True
    row followed by another is the plain model's graph. Not under CUDA graphs, whose
    static cache buffers are copied whole after every call.

    **CUDA graphs** (``inductor_options={"triton.cudagraphs": True}``, what
    ``mode="reduce-overhead"`` turns on): a CUDA-graphed call returns tensors in the graph
    pool, and the next call of any compiled graph starts a new generation that overwrites
    them (torch issue #152887), so caches fed back as the next step's inputs would be
    gone. Here the caches then live in static buffers, one set per stream, marked as
    static addresses so every row's graph reads them in place (no copy in, no per-row
    copy); after each call the new caches are copied into them (one device-to-device copy
    of the cache bytes per step, no sync) and the model's outputs are cloned out of the
    pool, so a caller may keep them past the next call. Memory: the static sets (they
    are the caches the stepper holds, so nothing extra) plus one set of cache outputs in
    the graph pool, shared by the rows' graphs since one generation lives at a time.

    Example:
        >>> from bcc.capture.graph import capture
        >>> from bcc.passes import PassConfig, run_passes
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> gm = run_passes(capture(net, (torch.ones(1, 2),)).gm, PassConfig(names=("0",), mode="output"))
        >>> rows = RowDispatch(gm, BccConfig(backend="eager", strategy="specialize"))
        >>> schedule = torch.tensor([[True], [False]])
        >>> out, cache = rows(schedule, torch.tensor(1), torch.full((1, 2), 3.0), torch.ones(1, 2))
        >>> out, sorted(rows.variants)
        (tensor([[3., 3.]]), [((False,), None)])
        >>> ahead = RowDispatch(gm, BccConfig(backend="eager", strategy="specialize"), lookahead=True)
        >>> old = torch.full((1, 2), 3.0)
        >>> _, kept = ahead(torch.tensor([[True], [True]]), torch.tensor(0), old, torch.ones(1, 2))
        >>> kept is old  # recomputed now and next: the cache is dead, nothing written
        True
        >>> _, kept = ahead(torch.tensor([[True]]), torch.tensor(0), old, torch.ones(1, 2))
        >>> kept is old  # the last step: no later call reads a cache
        True
        >>> both = RowDispatch(gm, BccConfig(backend="eager", strategy="hybrid"))
        >>> _ = both(torch.tensor([[True], [False]]), torch.tensor(1), old, torch.ones(1, 2))
        >>> sorted(both.variants), both.graphs  # a uniform row: specialised
        ([((False,), None)], 1)
    """

    _MAX_STATIC_SETS = 8  # cache sets kept (streams x recent trajectories); an evicted one is copied in again

    def __init__(self, gm: fx.GraphModule, config: BccConfig, lookahead: bool = False):
        self.gm = gm
        self.config = config
        # Per (row, whether each block's new cache is written; None: all are): its compiled graph.
        self.variants: dict[tuple[tuple[bool, ...], tuple[bool, ...] | None], Callable[..., Any]] = {}
        self.cudagraphs = RowDispatch.uses_cudagraphs(config)
        self.lookahead = lookahead and not self.cudagraphs
        self._n_caches = len(gm.meta[SLOTS])
        self._branch: Callable[..., Any] | None = None  # strategy="hybrid": the mixed rows' graph
        # By the data pointers of the tensors handed back to the stepper: its detach()
        # makes new tensor objects, so the static-address mark must stay on these.
        self._static: dict[tuple[int, ...], list[torch.Tensor]] = {}

    @property
    def graphs(self) -> int:
        """Graphs compiled so far: the specialised rows' and, under ``"hybrid"``, the branch graph."""
        return len(self.variants) + (self._branch is not None)

    @staticmethod
    def uses_cudagraphs(config: BccConfig) -> bool:
        """Whether ``config`` compiles with CUDA graphs (inductor's ``triton.cudagraphs``,
        from ``inductor_options`` or inductor's global config).

        Example:
            >>> RowDispatch.uses_cudagraphs(BccConfig(inductor_options={"triton.cudagraphs": True}))
            True
            >>> RowDispatch.uses_cudagraphs(BccConfig(backend="eager", inductor_options={"triton.cudagraphs": True}))
            False
        """
        if config.backend == "eager":
            return False
        flag = config.inductor_options.get("triton.cudagraphs")
        if flag is None:
            flag = (config.inductor_options.get("triton") or {}).get("cudagraphs")
        if flag is None:
            import torch._inductor.config as inductor_config

            flag = inductor_config.triton.cudagraphs
        return bool(flag)

    @staticmethod
    def check_strategy(config: BccConfig) -> None:
        """Refuse (``BCC705``) CUDA graphs with ``strategy="branch"``: inductor cannot capture
        a ``torch.cond`` and would run without CUDA graphs, silently.

        Example:
            >>> RowDispatch.check_strategy(BccConfig(inductor_options={"triton.cudagraphs": True}))
            Traceback (most recent call last):
            ...
            bcc.errors.BccError: [BCC705] CUDA graphs were asked for ...
        """
        if config.strategy != "specialize" and RowDispatch.uses_cudagraphs(config):  # hybrid has a branch graph
            raise BccError(
                ErrorCode.CUDA_GRAPHS_BRANCH,
                "CUDA graphs were asked for (inductor option triton.cudagraphs, which mode='reduce-overhead' "
                f"sets), but strategy={config.strategy!r} compiles cached blocks as torch.cond (the 'hybrid' "
                "strategy for every row that mixes reuse and recompute), which CUDA graphs cannot capture: inductor would "
                "skip them silently. Pass strategy='specialize' (one branch-free graph per distinct schedule "
                "row, CUDA-graphed) or drop the option.")

    def __call__(self, schedule: torch.Tensor, step: torch.Tensor, *rest: Any) -> Any:
        row = tuple(schedule[int(step)].tolist())
        hybrid = self.config.strategy == "hybrid"
        if hybrid and any(row) and not all(row):
            if self._branch is None:  # compiled at the first mixed row
                self._branch = compile_graph(self.gm, self.config)
            return self._branch(schedule, step, *rest)
        # A recomputed block's cache is needed only if the next step reuses the block
        # (None: without lookahead every new cache is written; no next row: none is read).
        write = None
        if self.lookahead:
            nxt = int(step) + 1
            write = tuple(not b for b in schedule[nxt].tolist()) if nxt < len(schedule) else (False,) * len(row)
            if hybrid and (any(write) or not any(row)):
                write = None  # all written: at most two variants of a uniform row, not one per next row
        fn = self.variants.get((row, write))
        if fn is None:
            graph = specialize(self.gm, row, pass_through=not self.cudagraphs, write=write)
            fn = self.variants[(row, write)] = compile_graph(graph, self.config)
        if not self.cudagraphs:
            return fn(schedule, step, *rest)
        n = self._n_caches
        caches = self._static_caches(rest[:n])
        outs = fn(schedule, step, *caches, *rest[n:])
        k = len(outs) - n
        for held, new in zip(caches, outs[k:]):
            held.copy_(new)
        return [o.clone() for o in outs[:k]] + caches

    def _static_caches(self, given: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The static set ``given`` is (the stepper hands back what the last call returned),
        or a new one holding ``given``'s values (a stream's first call)."""
        held = self._static.pop(tuple(c.data_ptr() for c in given), None)
        if held is None:
            held = [torch.empty_like(c, memory_format=torch.contiguous_format) for c in given]
            for h, c in zip(held, given):
                h.copy_(c)
                torch._dynamo.mark_static_address(h, guard=False)  # an address change re-records, never recompiles
            if len(self._static) >= self._MAX_STATIC_SETS:
                self._static.pop(next(iter(self._static)))
        self._static[tuple(h.data_ptr() for h in held)] = held  # most recently used last
        return held


def lower(captured: Captured, names: Sequence[str], config: BccConfig, scale_shift: bool = False,
          lookahead: bool = False) -> Lowered:
    """Gate ``names`` in ``captured`` (:func:`bcc.passes.run_passes`) and compile for ``config``.

    ``lookahead``: the caller's stepper can hand the next step's row (a window program);
    ``strategy="specialize"`` then skips dead caches (``Lowered.lookahead`` says whether).
    """
    RowDispatch.check_strategy(config)
    gm = run_passes(captured.gm, PassConfig(names=tuple(names), mode=config.mode, scale_shift=scale_shift))
    if config.strategy in ("specialize", "hybrid"):
        rows = RowDispatch(gm, config, lookahead=lookahead)
        return Lowered(gm, rows, tuple(gm.meta[BLOCKS]), tuple(gm.meta[SLOTS]), rows.lookahead)
    return Lowered(gm, compile_graph(gm, config), tuple(gm.meta[BLOCKS]), tuple(gm.meta[SLOTS]))
