"""The one trajectory stepper, shared by ``bcc.compile``, the backend and exports.

Every bcc lowering ends in a flat *program*: ``fn(schedule, step, *caches, *extra,
*tensors) -> (*outputs, *new caches)``. The program is pure; the trajectory (which
step a call is, and the caches carried between calls) lives here, in a
:class:`Stepper`.

**Where a call belongs** is a :class:`StepRef`: ``step`` of a ``num_steps``-step
trajectory, and ``stream``. By default a :class:`CallCounter` makes it (the k-th call
of a T-step trajectory is step ``k mod T``, stream 0), so the ordinary loop
``for t in scheduler.timesteps: model(x, t, ...)`` needs nothing else; a
:class:`TrajectoryMarker` (``with model.trajectory(steps=T, streams=2):``) counts one
explicit trajectory. Pipeline code that knows better gives the ref itself —
``BccModule.bcc_call_at(ref, ...)``, ``ExportedDenoiser.call_at(ref, ...)`` — or
installs a source of its own (``stepper.source = ...``, any object with the
:class:`StepSource` methods); ``bcc.compile(pipe, ...)`` takes it from the pipeline's
scheduler (:mod:`bcc.runtime.pipeline`).

The contract, for every source:

* ``step`` picks the schedule row; ``num_steps`` must equal the program's schedule's
  (``BCC101`` otherwise: never a silent misalignment).
* ``stream`` is the k-th call of one step (true classifier-free guidance calls the
  denoiser twice per step: stream 0 and stream 1). Each stream has caches of its own,
  created at its first call, and follows the same schedule row. Each stream may run a
  program of its own (another input signature: SD3's skip-layer guidance call), chosen
  at its first call of a trajectory and kept to its end.
* **The first call of a stream in a trajectory recomputes every block**, whatever its
  row says (its caches hold nothing of this trajectory). Row 0 of a schedule is
  all-True, so a trajectory that starts at step 0 runs as scheduled; one that starts
  later (img2img) or a stream that joins late is still right. So does its first call
  after a skipped step (the schedule was chosen for consecutive steps; see *lookahead*).
* A call at a step *earlier* than its stream's last, or of another step count, starts a
  new trajectory (all streams invalid), so an abandoned generation needs no clean-up;
  :meth:`Stepper.reset` (``model.bcc_reset()``) starts one explicitly, and pipeline code
  should call it at the start of every generation. The same step twice on one stream is
  ``BCC402``.
* A trajectory belongs to the thread that started it until every stream that ran has
  run the last step (or a reset): another thread's call meanwhile is ``BCC801`` and
  changes nothing.
* A call that fails leaves the trajectory unknown: the stepper resets.

A program's extra inputs (scale-shift tables) are ``[T, ...]`` tables, and it gets
only the step's row of each, ``table[step:step + 1]``, sliced here on the host: the
graph never indexes a device tensor with the CPU step (a device mismatch on a GPU, or
a copy and a sync). A program with ``window=True`` reads only row 0 of its schedule
too: the stepper hands it the one-row window ``schedule[step:step + 1]`` with step 0,
so the graph's input shapes do not depend on the number of steps and one compiled
graph serves every step count (``bcc.compile`` does this; exported programs keep the
``[T, K]`` input their artifact was made with).

A program with ``lookahead=True`` (``strategy="specialize"``) gets the two-row window
``[schedule[step], schedule[step + 1]]`` (an all-True second row at the last step: no
call after it reads a cache), and may leave a recomputed block's cache unwritten where
the next row recomputes that block too (a dead cache). That is exact only if the
stream's next call is the next step; and a schedule is chosen for consecutive steps
anyway. So, for every program, **a stream that skips a step recomputes every block**
at the call after the gap, as at its first call.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Protocol, Sequence, runtime_checkable

import torch

from bcc.errors import BccError, BccInternalError, ErrorCode

__all__ = ["StepRef", "StepSource", "CallCounter", "TrajectoryMarker", "Located", "CacheSpec", "Program",
           "StreamState", "StepperState", "Stepper"]


@dataclass(frozen=True, kw_only=True)
class StepRef:
    """Where one denoiser call belongs: ``step`` of a ``num_steps``-step trajectory, ``stream``.

    Keyword-only: three integers are too easy to swap.

    Example:
        >>> StepRef(step=3, num_steps=20, stream=1)
        StepRef(step=3, num_steps=20, stream=1)
        >>> StepRef(step=20, num_steps=20)
        Traceback (most recent call last):
        ...
        bcc.errors.BccError: [BCC402] StepRef(step=20, num_steps=20, stream=0) is outside its trajectory: ...
    """

    step: int
    num_steps: int
    stream: int = 0

    def __post_init__(self) -> None:
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.step, self.num_steps, self.stream))
        if not ints or self.num_steps < 1 or not 0 <= self.step < self.num_steps or self.stream < 0:
            raise BccError(ErrorCode.STEP_MISMATCH,
                           f"{self!r} is outside its trajectory: step must be an int in [0, num_steps), "
                           "num_steps >= 1 and stream >= 0 (the scheduler's step index, its number of steps, "
                           "and which call of that step this is).")


@runtime_checkable
class StepSource(Protocol):
    """Says where a plain call belongs. :class:`CallCounter` is the default.

    A source for a diffusers pipeline would read its scheduler's step index in
    ``next_ref`` and count the calls of that step as streams in ``ran``.
    """

    def next_ref(self, num_steps: int) -> StepRef:
        """The ref of the next plain call; no side effects (a refused call must not move it)."""

    def ran(self, ref: StepRef) -> None:
        """A call at ``ref`` ran (whoever chose the ref)."""

    def reset(self) -> None:
        """A new trajectory starts (after :meth:`Stepper.reset` or a failed call)."""


class CallCounter:
    """The default source: call ``k`` of a ``T``-step trajectory is step ``k mod T``, stream 0.

    It follows what ran on stream 0, so a call given an explicit ref moves it too.

    Example:
        >>> c = CallCounter()
        >>> c.ran(c.next_ref(3)); c.ran(c.next_ref(3)); c.next_ref(3)
        StepRef(step=2, num_steps=3, stream=0)
        >>> c.ran(c.next_ref(3)); c.next_ref(3).step
        0
    """

    def __init__(self) -> None:
        self.next_step = 0

    def next_ref(self, num_steps: int) -> StepRef:
        return StepRef(step=self.next_step if self.next_step < num_steps else 0, num_steps=num_steps)

    def ran(self, ref: StepRef) -> None:
        if ref.stream == 0:
            self.next_step = (ref.step + 1) % ref.num_steps

    def reset(self) -> None:
        self.next_step = 0


class TrajectoryMarker:
    """One explicit trajectory of ``num_steps`` steps with ``streams`` calls each: call
    ``i`` is step ``i // streams``, stream ``i % streams``. What
    ``with model.trajectory(steps=T, streams=k):`` installs; a call past the end is
    ``BCC401`` (the loop ran more steps than it said).

    Example:
        >>> m = TrajectoryMarker(2, streams=2)
        >>> refs = []
        >>> for _ in range(4):
        ...     refs.append(m.next_ref(2)); m.ran(refs[-1])
        >>> [(r.step, r.stream) for r in refs], m.calls, m.complete
        ([(0, 0), (0, 1), (1, 0), (1, 1)], 4, True)
        >>> m.next_ref(2)
        Traceback (most recent call last):
        ...
        bcc.errors.BccError: [BCC401] call 5 of a trajectory marked as 2 steps x 2 streams: ...
    """

    def __init__(self, num_steps: int, streams: int = 1):
        for name, value in (("steps", num_steps), ("streams", streams)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BccError(ErrorCode.CONFIG_INVALID,
                               f"trajectory({name}=...) must be an int >= 1, got {value!r}: the number of "
                               "scheduler steps (len(scheduler.timesteps)) and of model calls per step.")
        self.num_steps = num_steps
        self.streams = streams
        self.calls = 0

    @property
    def complete(self) -> bool:
        """Every step of every stream ran."""
        return self.calls == self.num_steps * self.streams

    def next_ref(self, num_steps: int) -> StepRef:
        if self.calls >= self.num_steps * self.streams:
            raise BccError(
                ErrorCode.STEP_OVERFLOW,
                f"call {self.calls + 1} of a trajectory marked as {self.num_steps} steps x {self.streams} "
                f"stream{'s' if self.streams > 1 else ''}: the loop calls the model more often than it said. Pass "
                "trajectory(steps=len(scheduler.timesteps), streams=<model calls per step>).")
        return StepRef(step=self.calls // self.streams, num_steps=self.num_steps, stream=self.calls % self.streams)

    def ran(self, ref: StepRef) -> None:
        self.calls = max(self.calls, ref.step * self.streams + ref.stream + 1)

    def reset(self) -> None:
        self.calls = 0


@dataclass(frozen=True)
class Located:
    """Where a pipeline says a denoiser call belongs: its ``ref``, and the ``generation``
    it is part of (any hashable; a new value starts a new trajectory)."""

    ref: StepRef
    generation: Hashable


@dataclass(frozen=True)
class CacheSpec:
    """One cache tensor of a program: allocated (zeros) at a stream's first call."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True, eq=False)
class Program:
    """A flat bcc program and what the stepper feeds it besides the call's tensors.

    Attributes:
        fn: ``fn(schedule, step, *caches, *extra, *tensors) -> (*outputs, *new caches)``;
            without ``schedule`` when ``schedule_input`` is False.
        schedule: the ``[T, K]`` bool mask, columns in the program's block order (kept
            even when baked in: it says which rows recompute every block).
        caches: one :class:`CacheSpec` per cache input.
        extra: ``[T, ...]`` tables (scale-shift); ``fn`` gets each one's row for the step,
            ``extra[i][step:step + 1]``, between the caches and the tensors.
        schedule_input: the schedule is ``fn``'s first input (False: baked in).
        window: ``fn`` reads row 0 of its schedule only: it gets ``schedule[step:step + 1]``
            with step 0, so its input shapes are the same for every step count (no
            recompile for another T).
        lookahead: with ``window``, ``fn`` gets the next step's row too (a ``[2, K]``
            window) and may skip the caches that row does not read (the stepper
            recomputes every block after a skipped step, for every program).
    """

    fn: Callable[..., Sequence[torch.Tensor]]
    schedule: torch.Tensor
    caches: tuple[CacheSpec, ...]
    extra: tuple[torch.Tensor, ...] = ()
    schedule_input: bool = True
    window: bool = False
    lookahead: bool = False

    def __post_init__(self) -> None:
        if self.lookahead and not self.window:
            raise BccInternalError("a lookahead Program reads a window of the schedule: set window=True")

    @property
    def num_steps(self) -> int:
        return int(self.schedule.shape[0])


@dataclass(frozen=True)
class StreamState:
    """One stream: the step it last ran in this trajectory (None: not yet) and its caches' bytes."""

    stream: int
    last_step: int | None
    cache_bytes: int


@dataclass(frozen=True)
class StepperState:
    """A snapshot of a :class:`Stepper` (public inspection; tests read this, not internals).

    Attributes:
        next_ref: where the next plain call belongs (None before a program is bound).
        in_trajectory: a trajectory is under way (its thread owns the stepper).
        streams: every stream holding caches, by stream index.
        cache_bytes: the bytes of all caches held.
    """

    next_ref: StepRef | None
    in_trajectory: bool
    streams: tuple[StreamState, ...]
    cache_bytes: int


@dataclass(frozen=True)
class _Feed:
    """What the stepper hands a program at each step, derived once per program."""

    program: Program
    heads: tuple[tuple[torch.Tensor, ...], ...]  # per step: (schedule argument,) or ()
    fresh: tuple[tuple[torch.Tensor, ...], ...]  # the same for a stream's first call: all True
    steps: tuple[torch.Tensor, ...]  # per step: the 0-d CPU step tensor
    extras: tuple[tuple[torch.Tensor, ...], ...]  # per step: each extra table's row
    full_rows: tuple[bool, ...]  # row s recomputes every block


def _feed(program: Program, old: _Feed | None) -> _Feed:
    if not isinstance(program.schedule, torch.Tensor) or program.schedule.dim() != 2:
        raise BccInternalError("a Program's schedule must be a [T, K] mask")
    mask, T = program.schedule, program.num_steps
    full = tuple(mask.all(dim=1).tolist())
    # Rows sliced once per program, on the tables' own device (no host read, no sync
    # per call). Clones, not views: every step's inputs then have one layout and
    # offset, which is all a graph compiled for the first of them assumes.
    extras = tuple(tuple(x.narrow(0, s, 1).clone() for x in program.extra) for s in range(T))
    if program.window:
        zero = torch.zeros((), dtype=torch.int64)
        ones = torch.ones_like(mask[:1])
        if program.lookahead:
            # After the last step nothing reads a cache: its "next row" recomputes everything.
            nxt = [mask[s + 1:s + 2] if s + 1 < T else ones for s in range(T)]
            heads = tuple((torch.cat([mask[s:s + 1], nxt[s]]),) for s in range(T))
            fresh = tuple((torch.cat([ones, nxt[s]]),) for s in range(T))
        else:
            heads = tuple((mask[s:s + 1].clone(),) for s in range(T))
            fresh = ((ones,),) * T
        return _Feed(program, heads, fresh, (zero,) * T, extras, full)
    steps = old.steps if old is not None and not old.program.window and len(old.steps) == T else \
        tuple(torch.tensor(s, dtype=torch.int64) for s in range(T))
    head, fresh = ((mask,), (torch.ones_like(mask),)) if program.schedule_input else ((), ())
    return _Feed(program, (head,) * T, (fresh,) * T, steps, extras, full)


@dataclass
class _Stream:
    feed: _Feed
    caches: list[torch.Tensor]
    last: int | None = None  # the step last run in this trajectory; None: recompute at the next call


class Stepper:
    """The trajectory state around :class:`Program` s: step source, per-stream caches, owner.

    The step reaches the program as a preallocated 0-d CPU tensor (a Python int would
    make Dynamo specialise, and recompile, on its value), so choosing the schedule row
    costs no device sync and no recompile.

    Args:
        program: what plain calls run (the default program); may be bound later (:meth:`bind`).
        source: where plain calls belong; a :class:`CallCounter` by default.

    Example:
        >>> double = lambda schedule, step, cache, x: (x * 2, cache + 1)  # a program with one cache
        >>> program = Program(double, torch.ones(2, 1, dtype=torch.bool), (CacheSpec((1,), torch.float32, torch.device("cpu")),))
        >>> stepper = Stepper(program)
        >>> stepper([torch.ones(1)]), stepper.state().next_ref.step
        ([tensor([2.])], 1)
        >>> _ = stepper.run(StepRef(step=0, num_steps=2, stream=1), [torch.ones(1)])  # a second stream
        >>> [(s.stream, s.last_step) for s in stepper.state().streams]
        [(0, 0), (1, 0)]
    """

    _MAX_FEEDS = 32  # programs remembered (one per input signature and step count)

    def __init__(self, program: Program | None = None, source: StepSource | None = None):
        # Re-entrant: BccModule holds it around a whole call (capture included) and
        # calls run() inside.
        self.lock = threading.RLock()
        self._source: StepSource = CallCounter() if source is None else _checked_source(source)
        self._default: _Feed | None = None
        self._feeds: dict[int, _Feed] = {}  # by id(program); the feed holds the program, so ids stay unique
        self._streams: dict[int, _Stream] = {}
        self._num_steps: int | None = None  # the step count of the trajectory under way
        self._owner: int | None = None
        if program is not None:
            self.bind(program)

    # -- configuration -------------------------------------------------------------
    @property
    def source(self) -> StepSource:
        """Where plain calls belong; assign another :class:`StepSource` to drive the steps."""
        return self._source

    @source.setter
    def source(self, source: StepSource) -> None:
        with self.lock:
            self._source = _checked_source(source)

    @property
    def program(self) -> Program | None:
        """The program plain calls run (None until bound)."""
        return None if self._default is None else self._default.program

    def bind(self, program: Program) -> None:
        """Run ``program`` for calls that name none, from the next call on; every stream's
        caches start empty (a new trajectory). Used between trajectories: another input
        signature, another schedule."""
        with self.lock:
            self._default = self._feed_of(program)
            self._streams = {}
            self._num_steps = None
            self._owner = None

    def reset(self) -> None:
        """Start a new trajectory at the next call: every stream recomputes, any thread may call."""
        with self.lock:
            for stream in self._streams.values():
                stream.last = None
            self._num_steps = None
            self._owner = None
            self._source.reset()

    # -- queries -------------------------------------------------------------------
    def next_ref(self, num_steps: int | None = None) -> StepRef:
        """Where the next plain call belongs (the source's answer for ``num_steps``, by
        default the bound program's)."""
        if num_steps is None:
            num_steps = self._require().program.num_steps
        return self._source.next_ref(num_steps)

    def in_trajectory(self) -> bool:
        """Whether a trajectory is under way: some stream ran, and not every one that did
        has run the last step."""
        ran = [s.last for s in self._streams.values() if s.last is not None]
        return bool(ran) and any(last != self._num_steps - 1 for last in ran)

    def has_run(self, stream: int) -> bool:
        """Whether ``stream`` has run in the trajectory under way (its next call reuses)."""
        held = self._streams.get(stream)
        return held is not None and held.last is not None and self.in_trajectory()

    def starts_trajectory(self, ref: StepRef, program: Program | None = None) -> bool:
        """Whether a call at ``ref`` starts a new trajectory (nothing under way, another
        step count, or its stream ran a later step). The same step twice on a stream is
        ``BCC402``; with ``program``, a ref of another step count than its schedule's is ``BCC101``."""
        self._check_ref(ref, program)
        if not self.in_trajectory() or ref.num_steps != self._num_steps:
            return True
        stream = self._streams.get(ref.stream)
        if stream is None or stream.last is None:
            return False
        if ref.step == stream.last:
            raise BccError(ErrorCode.STEP_MISMATCH,
                           f"stream {ref.stream} already ran step {ref.step} of this trajectory. A second call "
                           f"in one step is another stream (StepRef(step={ref.step}, num_steps={ref.num_steps}, "
                           f"stream={ref.stream + 1})); a new generation starts with bcc_reset().")
        return ref.step < stream.last

    def check_owner(self) -> None:
        """Refuse (``BCC801``, touching nothing) a call from a thread other than the one
        whose trajectory is under way."""
        me = threading.get_ident()
        if self._owner is not None and self._owner != me and self.in_trajectory():
            where = ", ".join(f"stream {s.stream} at step {s.last_step}" for s in self.state().streams
                              if s.last_step is not None)
            raise BccError(
                ErrorCode.CONCURRENT_TRAJECTORY,
                f"another thread is in the middle of a trajectory on this model ({where}, of "
                f"{self._num_steps} steps): its next step and caches are not this call's. Use "
                "one compiled model per thread (bcc.compile(model, schedule) again; they share the weights) or "
                "serialise whole generations; bcc_reset() (ExportedDenoiser.reset()) hands an abandoned "
                "trajectory over.")

    def state(self) -> StepperState:
        """A snapshot of the trajectory: next ref, streams, cache bytes."""
        with self.lock:
            streams = tuple(StreamState(i, s.last, sum(c.numel() * c.element_size() for c in s.caches))
                            for i, s in sorted(self._streams.items()))
            steps = self._num_steps or (None if self._default is None else self._default.program.num_steps)
            try:
                upcoming = None if steps is None else self._source.next_ref(steps)
            except BccError:  # a source whose trajectory is complete (TrajectoryMarker) has no next call
                upcoming = None
            return StepperState(upcoming, self.in_trajectory(), streams, sum(s.cache_bytes for s in streams))

    def caches(self, stream: int = 0) -> tuple[torch.Tensor, ...]:
        """The caches ``stream`` holds now (empty before its first call), for inspection."""
        held = self._streams.get(stream)
        return () if held is None else tuple(held.caches)

    # -- running -------------------------------------------------------------------
    def __call__(self, tensors: Sequence[torch.Tensor], ref: StepRef | None = None) -> list[torch.Tensor]:
        """Run the call at ``ref`` (default: the source's next) on the program's tensor inputs."""
        return self.run(ref, tensors)

    def run(self, ref: StepRef | None, tensors: Sequence[torch.Tensor],
            program: Program | None = None) -> list[torch.Tensor]:
        """Run one call of ``program`` (default: the bound one); returns its outputs without
        the caches. A stream keeps the program of its first call to the trajectory's end."""
        with self.lock:
            self.check_owner()
            try:
                feed = self._require() if program is None else self._feed_of(program)
                program = feed.program
                ref = self._source.next_ref(program.num_steps) if ref is None else ref
                if self.starts_trajectory(ref, program):
                    for s in self._streams.values():
                        s.last = None
                    self._num_steps = ref.num_steps
                self._owner = threading.get_ident()
                stream = self._streams.get(ref.stream)
                if stream is None or (stream.last is None and stream.feed is not feed):
                    # A new stream, or one starting this trajectory on another program: the
                    # caches are overwritten before they are read, so same-shaped ones stay.
                    same = stream is not None and stream.feed.program.caches == program.caches
                    caches = stream.caches if same else [torch.zeros(c.shape, dtype=c.dtype, device=c.device)
                                                         for c in program.caches]
                    stream = self._streams[ref.stream] = _Stream(feed, caches)
                elif stream.feed is not feed:
                    raise BccInternalError(f"stream {ref.stream} changed program in the middle of a trajectory")
                # The schedule was chosen for consecutive steps, and a lookahead program
                # leaves the caches the next step does not read unwritten: after a gap
                # nothing cached is sure, so nothing is read.
                gap = stream.last is not None and ref.step != stream.last + 1
                fresh = (stream.last is None or gap) and not feed.full_rows[ref.step]
                if fresh and not program.schedule_input:
                    raise BccError(
                        ErrorCode.STEP_MISMATCH,
                        f"stream {ref.stream} starts at step {ref.step}, whose row of the baked-in schedule "
                        "reuses blocks, but the stream has nothing cached yet. Start every stream at a step "
                        "that recomputes all blocks (step 0), or export with schedule_input=True.")
                # Its caches hold nothing of this trajectory at a first call (or nothing
                # sure after a gap): recompute every block.
                head = feed.fresh[ref.step] if fresh else feed.heads[ref.step]
                outs = program.fn(*head, feed.steps[ref.step], *stream.caches, *feed.extras[ref.step], *tensors)
                n = len(outs) - len(stream.caches)
                # Caches are state, not part of the autograd graph of the next step.
                stream.caches = [c.detach() for c in outs[n:]]
                stream.last = ref.step
                self._source.ran(ref)
                return list(outs[:n])
            except BaseException:
                self.reset()  # a failed call leaves the trajectory unknown: start clean
                raise

    # -- helpers -------------------------------------------------------------------
    def _require(self) -> _Feed:
        if self._default is None:
            raise BccInternalError("the stepper has no program yet")
        return self._default

    def _feed_of(self, program: Program) -> _Feed:
        feed = self._feeds.get(id(program))
        if feed is not None and feed.program is program:
            return feed
        feed = _feed(program, self._default)
        if len(self._feeds) >= self._MAX_FEEDS:  # forget programs no stream is on
            live = {id(s.feed.program) for s in self._streams.values()}
            live |= set() if self._default is None else {id(self._default.program)}
            self._feeds = {k: v for k, v in self._feeds.items() if k in live}
        self._feeds[id(program)] = feed
        return feed

    def _check_ref(self, ref: StepRef, program: Program | None = None) -> None:
        if not isinstance(ref, StepRef):
            raise BccError(ErrorCode.STEP_MISMATCH,
                           f"a step reference must be a bcc.StepRef, got {type(ref).__name__}; build one with "
                           "bcc.StepRef(step=i, num_steps=T, stream=k).")
        steps = None if program is None else program.num_steps
        if steps is not None and ref.num_steps != steps:
            raise BccError(
                ErrorCode.SCHEDULE_SHAPE,
                f"the call belongs to a {ref.num_steps}-step trajectory ({ref!r}) but the schedule has {steps} "
                f"steps. Build the schedule for the pipeline's num_inference_steps, use a bcc.Plan (it serves "
                f"any step count), or run {steps} steps.")


def _checked_source(source: Any) -> StepSource:
    if not isinstance(source, StepSource):
        raise BccError(ErrorCode.CONFIG_INVALID,
                       f"a step source needs next_ref(num_steps), ran(ref) and reset(); {type(source).__name__} "
                       "lacks some. Use bcc.CallCounter() or an object with those methods.")
    return source
