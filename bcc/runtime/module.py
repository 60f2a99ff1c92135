"""The drop-in module returned by :func:`bcc.compile`: captures per input signature, one trajectory.

A :class:`BccModule` captures and compiles the model at the first call of each input
signature; the trajectory (which step a call is, the caches carried between calls)
is a :class:`bcc.lower.stepper.Stepper`, whose contract is that module's docstring.
The step lives on the host, so choosing the schedule row costs no device sync.

Where a call belongs comes from, in order: a trajectory marker
(``with model.trajectory(steps=T, streams=k):``); the pipeline it was compiled with
(``bcc.compile(pipe, ...)`` sets ``bcc_locator``, which reads the scheduler: see
:mod:`bcc.runtime.pipeline`); else call counting (the k-th call is step ``k mod T``,
so the ordinary loop ``for t in scheduler.timesteps: model(x, t, ...)`` needs no reset
across pipeline calls). Pipeline code that knows the step (and the stream: the k-th
call of a step) can also call :meth:`BccModule.bcc_call_at`.

The model follows a fixed :class:`bcc.Schedule` (one step count) or a :class:`bcc.Plan`,
whose schedule for each step count is derived at that count's first call and kept.
Programs get the schedule as a one-row window (``Program.window``), so a new step count
or a new stream compiles nothing; a new input signature (batch, resolution, a stream's
other arguments) is a capture of its own. Parameters replaced and Python state the
capture froze (:mod:`bcc.capture.frozen`: FreeU, attention processors, LoRA scales)
are checked at every trajectory start and recaptured when they changed.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator

import torch
import torch.utils._pytree as pytree

from bcc.analyze.blocks import ATTENTION, BlockSelector, find_block_regions, module_calls
from bcc.analyze.hooks import delegating_getattr
from bcc.capture.frozen import FrozenState, frozen_state
from bcc.capture.graph import Captured, capture, flatten_call
from bcc.capture.signature import Signature, diff, signature_of
from bcc.capture.timestep import TimestepWatch, timestep_finder
from bcc.config import BccConfig
from bcc.errors import BccError, ErrorCode
from bcc.lower.compile import Lowered, RowDispatch, lower
from bcc.passes import CacheSlot
from bcc.plan.budget import Plan
from bcc.plan.profile import model_fingerprint
from bcc.plan.schedule import Schedule
from bcc.lower.stepper import CacheSpec, Program, StepRef, Stepper, TrajectoryMarker
from bcc.scale_shift.params import ScaleShift, channel_dim, table_rows

__all__ = ["BccModule"]

# torch.export is not thread-safe (two captures at once failed with "Trying to pop empty
# mode stack"), so a capture and the first, compiling call of its graph are serialised
# across all instances.
_CAPTURE_LOCK = threading.RLock()


@dataclass
class _Entry:
    """Everything tied to one input signature (batch, resolution, dtype, device, arguments)."""

    captured: Captured
    lowered: Lowered
    programs: dict[int, Program] = field(default_factory=dict)  # per step count, all on lowered.fn


@dataclass
class _Follow:
    """What the module follows. A plain record, not module attributes: a ScaleShift is an
    nn.Module, and as an attribute nn.Module would register it as a submodule, whose
    parameters are not the model's (``state_dict()`` must keep looking like the model's)."""

    source: "Schedule | Plan | Callable[[tuple[str, ...]], Schedule]"
    fixed: Schedule | None  # the one schedule (a factory's after the first capture); None for a plan
    schedules: dict[int, Schedule]  # per step count: the fixed one, or the plan's, derived once
    scale_shift: "ScaleShift | _IdentityTables | None"


class BccModule(torch.nn.Module):
    """A denoiser whose blocks follow a :class:`Schedule` or :class:`Plan`; call it like the original.

    Attribute lookups it does not define (``config``, ``dtype``, ``device``,
    ``enable_freeu``, ...) go to the original model, so it can replace ``pipe.unet`` or
    ``pipe.transformer``. Build it with :func:`bcc.compile`.

    Driving the steps (see :mod:`bcc.lower.stepper` for the whole contract): a plain
    call is the next step of a :class:`bcc.CallCounter`; ``with model.trajectory(steps=T,
    streams=k):`` marks one trajectory (needed by a Plan in a hand-written loop);
    ``bcc_call_at(StepRef(step=i, num_steps=T, stream=k), *args, **kwargs)`` runs the call
    where pipeline code says it belongs; ``bcc_reset()`` starts a new trajectory.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        schedule: "Schedule | Plan | Callable[[tuple[str, ...]], Schedule]",
        config: BccConfig,
        blocks: BlockSelector | None = None,
        scale_shift: ScaleShift | None = None,
    ):
        super().__init__()
        self._orig_mod = model
        self._bcc_config = config
        self._bcc_blocks = blocks
        fixed = schedule if isinstance(schedule, Schedule) else None
        self._bcc_follow = _Follow(schedule, fixed, {} if fixed is None else {fixed.num_steps: fixed}, scale_shift)
        self._bcc_entries: dict[Signature, _Entry] = {}
        self._bcc_streams: dict[int, _Entry] = {}  # the entry each stream runs in this trajectory
        self._bcc_current: _Entry | None = None  # the entry of the latest call
        self._bcc_last_schedule: Schedule | None = fixed
        self._bcc_stepper = Stepper()
        self._bcc_watch = TimestepWatch()
        self._bcc_frozen: FrozenState | None = None  # frozen_state(model) at the last capture
        self._bcc_locator: Any = None
        self._bcc_generation: Hashable = None
        self._bcc_find_timestep = timestep_finder(model.forward)

    __getattr__ = delegating_getattr

    # -- public state ----------------------------------------------------------------
    @property
    def bcc_schedule(self) -> Schedule | None:
        """The fixed schedule, or for a plan the schedule of the latest trajectory (None
        before the first call if a schedule factory or a plan was given)."""
        return self._bcc_follow.fixed or self._bcc_last_schedule

    @property
    def bcc_plan(self) -> Plan | None:
        """The :class:`bcc.Plan` this model follows (None for a fixed schedule)."""
        source = self._bcc_follow.source
        return source if isinstance(source, Plan) else None

    @property
    def bcc_config(self) -> BccConfig:
        return self._bcc_config

    def bcc_schedule_for(self, num_steps: int) -> Schedule:
        """The schedule a ``num_steps``-step generation follows (a plan's is derived once and
        kept); ``BCC101`` for a fixed schedule of another step count.

        Example:
            >>> import bcc, torch
            >>> profile = bcc.ChangeProfile(torch.tensor([[0.0], [0.1], [0.1], [0.1]]), ["0"])
            >>> m = bcc.compile(torch.nn.Sequential(torch.nn.Linear(2, 2)), bcc.Plan(profile, budget=0.5),
            ...                 backend="eager")
            >>> m.bcc_schedule_for(7).num_steps, m.bcc_schedule_for(7) is m.bcc_schedule_for(7)
            (7, True)
        """
        follow = self._bcc_follow
        schedule = follow.schedules.get(num_steps)
        if schedule is not None:
            return schedule
        if isinstance(follow.source, Plan):
            schedule = follow.schedules[num_steps] = follow.source.schedule_for(num_steps)
            return schedule
        steps = None if follow.fixed is None else follow.fixed.num_steps
        raise BccError(
            ErrorCode.SCHEDULE_SHAPE,
            f"this model follows a fixed {steps}-step Schedule, but the call belongs to a {num_steps}-step "
            f"generation: a Schedule has one row per step, so its rows would be misaligned. Use a "
            f"bcc.Plan(profile, budget=...) (it serves any step count: bcc.compile(pipe_or_model, plan)), or "
            f"build the schedule for the pipeline's num_inference_steps ({num_steps} scheduler steps).")

    @property
    def bcc_step(self) -> int:
        """The step the next plain call will run."""
        steps = self._plain_steps(required=False)
        return 0 if steps is None else self._bcc_stepper.next_ref(steps).step

    @property
    def bcc_blocks(self) -> tuple[str, ...] | None:
        schedule = self.bcc_schedule
        if schedule is None and self.bcc_plan is not None:
            return self.bcc_plan.block_names
        return None if schedule is None else schedule.block_names

    @property
    def bcc_stepper(self) -> Stepper:
        """The trajectory state (:class:`bcc.lower.stepper.Stepper`): ``state()`` to
        inspect it, ``source`` to choose where plain calls belong."""
        return self._bcc_stepper

    @property
    def bcc_locator(self) -> Any:
        """Where pipeline calls belong: an object with ``locate(args, kwargs) ->
        bcc.lower.stepper.Located`` and ``end()`` (set by ``bcc.compile(pipe, ...)``); None
        for a model in a hand-written loop."""
        return self._bcc_locator

    @bcc_locator.setter
    def bcc_locator(self, locator: Any) -> None:
        if locator is not None and not (callable(getattr(locator, "locate", None))
                                        and callable(getattr(locator, "end", None))):
            raise BccError(ErrorCode.CONFIG_INVALID,
                           f"a locator needs locate(args, kwargs) and end(); {type(locator).__name__} lacks them.")
        with self._bcc_stepper.lock:
            self._bcc_locator = locator
            self._bcc_generation = None
            self._bcc_stepper.reset()

    def bcc_reset(self) -> None:
        """Start a new trajectory at the next call (pipeline code: at every generation's start);
        ``check=True`` also forgets the last generation's timesteps."""
        self._bcc_stepper.reset()
        self._bcc_watch.reset()

    @contextlib.contextmanager
    def trajectory(self, steps: int, streams: int = 1) -> Iterator[TrajectoryMarker]:
        """Mark one trajectory of ``steps`` steps with ``streams`` model calls each (call
        ``i`` is step ``i // streams``, stream ``i % streams``), for a hand-written loop.

        It starts a new trajectory on entry and on exit (an interrupted loop leaves
        nothing behind), lets a :class:`bcc.Plan` know the step count, and a call past the
        end is ``BCC401``. With ``check=True``, a block that ends normally after fewer
        calls than it said is ``BCC402``.

        Example:
            >>> import bcc, torch
            >>> profile = bcc.ChangeProfile(torch.tensor([[0.0], [0.1], [0.1], [0.1]]), ["0"])
            >>> m = bcc.compile(torch.nn.Sequential(torch.nn.Linear(2, 2)), bcc.Plan(profile, budget=0.5),
            ...                 backend="eager")
            >>> with m.trajectory(steps=3, streams=2):
            ...     for step in range(3):
            ...         cond, uncond = m(torch.ones(1, 2)), m(torch.zeros(1, 2))  # true CFG: two calls per step
            >>> m.bcc_stats()["streams"], m.bcc_schedule.num_steps
            (2, 3)
        """
        marker = TrajectoryMarker(steps, streams)
        stepper = self._bcc_stepper
        with stepper.lock:
            previous = stepper.source
            stepper.reset()
            stepper.source = marker
        try:
            yield marker
        finally:
            with stepper.lock:
                stepper.source = previous
                stepper.reset()
        if self._bcc_config.check and not marker.complete:
            raise BccError(
                ErrorCode.STEP_MISMATCH,
                f"the trajectory marked as {steps} steps x {streams} stream{'s' if streams > 1 else ''} ended after "
                f"{marker.calls} call{'s' if marker.calls != 1 else ''}: fewer steps than it said. Pass "
                "steps=len(scheduler.timesteps) and streams=<model calls per step>; a loop stopped on purpose is "
                "fine (the next trajectory starts clean) but fails this check.")

    def bcc_graph(self) -> torch.fx.GraphModule | None:
        """The rewritten graph of the most recent input signature (for inspection)."""
        return None if self._bcc_current is None else self._bcc_current.lowered.gm

    def bcc_slots(self) -> tuple[CacheSlot, ...]:
        """The cache slots of the most recent input signature's graph (empty before the first call).

        Example:
            >>> import bcc, torch
            >>> m = bcc.compile(torch.nn.Sequential(torch.nn.Linear(2, 2)), bcc.Schedule.every(2, 2, ["0"]),
            ...                 backend="eager")
            >>> _ = m(torch.ones(1, 2))
            >>> [(s.block, s.shape) for s in m.bcc_slots()]
            [('0', (1, 2))]
        """
        return () if self._bcc_current is None else self._bcc_current.lowered.slots

    def bcc_stats(self) -> dict[str, int]:
        """What the compiled model holds: ``signatures`` (input signatures captured),
        ``graphs`` (compiled so far: one per signature, or one per distinct schedule row
        with ``strategy="specialize"``; with ``"hybrid"`` up to four), ``streams`` (streams holding caches),
        ``cache_bytes`` (their cached block outputs, kept between steps) and
        ``step_counts`` (schedules derived or held, one per step count).

        Example:
            >>> import bcc, torch
            >>> class Net(torch.nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.block = torch.nn.Linear(2, 2)
            ...     def forward(self, x, t):
            ...         return self.block(x) * t
            >>> m = bcc.compile(Net(), lambda names: bcc.Schedule.every(2, 3, names), blocks="block", backend="eager")
            >>> m.bcc_stats()["graphs"]
            0
            >>> _ = m(torch.ones(1, 2), torch.tensor(0))
            >>> s = m.bcc_stats(); (s["signatures"], s["graphs"], s["streams"], s["cache_bytes"])
            (1, 1, 1, 8)
        """
        graphs = sum(e.lowered.fn.graphs if isinstance(e.lowered.fn, RowDispatch) else 1
                     for e in self._bcc_entries.values())
        state = self._bcc_stepper.state()
        return {"signatures": len(self._bcc_entries), "graphs": graphs, "streams": len(state.streams),
                "cache_bytes": state.cache_bytes, "step_counts": len(self._bcc_follow.schedules)}

    def bcc_recompile(self, schedule: Schedule) -> "BccModule":
        """A new model of the same original and config for ``schedule``, whose blocks may be
        others (other modules, regions); it compiles at its first call. ``set_schedule``
        only swaps schedules over the blocks compiled.

        Example:
            >>> import bcc, torch
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
            >>> m = bcc.compile(net, bcc.Schedule.every(2, 3, ["0"]), backend="eager")
            >>> other = m.bcc_recompile(bcc.Schedule.every(2, 3, [bcc.region("0", "1")]))
            >>> other.bcc_schedule.block_names
            ('0..1',)
        """
        return BccModule(self._orig_mod, schedule, self._bcc_config)

    def set_schedule(self, schedule: Schedule, scale_shift: ScaleShift | None = None) -> None:
        """Swap the schedule without recompiling (same blocks and step count).

        The schedule is a graph input, so the compiled code is reused as is. A model
        compiled with scale-shift takes the new schedule's parameters as ``scale_shift``
        (their tables are inputs too); without them it caches naively (identity tables).
        The next call starts a new trajectory. A model following a :class:`bcc.Plan` is
        compiled again for another plan.
        """
        follow = self._bcc_follow
        if isinstance(follow.source, Plan):
            raise BccError(ErrorCode.CONFIG_INVALID,
                           "this model follows a bcc.Plan (a schedule per step count); compile it again with "
                           "bcc.compile(model, other_plan_or_schedule) instead of set_schedule.")
        if scale_shift is not None:
            if follow.scale_shift is None:
                raise BccError(
                    ErrorCode.CONFIG_INVALID,
                    "this model was compiled without scale-shift, so its graph has no place for the "
                    "parameters; compile it again with bcc.compile(..., scale_shift=...).",
                )
            scale_shift.check_compatible(schedule, self._orig_mod, self._bcc_config.mode)
        current = follow.fixed
        if current is not None and schedule.num_steps != current.num_steps:
            raise BccError(
                ErrorCode.SCHEDULE_SHAPE,
                f"new schedule has {schedule.num_steps} steps, the compiled model {current.num_steps}; "
                "compile again with bcc.compile for another step count, or follow a bcc.Plan.",
            )
        if current is not None:
            schedule.reorder(current.block_names)  # validates the names
        with self._bcc_stepper.lock:
            follow.source = follow.fixed = self._bcc_last_schedule = schedule
            follow.schedules = {schedule.num_steps: schedule}
            if follow.scale_shift is not None:
                follow.scale_shift = scale_shift or _IdentityTables(schedule.num_steps)
            for entry in self._bcc_entries.values():
                entry.programs = {}  # rebuilt from the new schedule at the next call; the graphs stay
            self._bcc_streams = {}
            self._bcc_stepper.reset()
            self._bcc_watch.reset()

    # -- the call ----------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        locator = self._bcc_locator
        if locator is not None and not isinstance(self._bcc_stepper.source, TrajectoryMarker):
            located = locator.locate(args, kwargs)
            return self._call(located.ref, args, kwargs, located.generation)
        return self._call(None, args, kwargs)

    def bcc_call_at(self, ref: StepRef, *args: Any, **kwargs: Any) -> Any:
        """Call the model as the call ``ref`` of the trajectory (pipeline code knows the step).

        ``ref.num_steps`` must be the schedule's (``BCC101``; a plan serves any); each
        ``ref.stream`` has caches of its own and recomputes every block at its first call
        of a trajectory.

        Example:
            >>> import bcc, torch
            >>> m = bcc.compile(torch.nn.Sequential(torch.nn.Linear(2, 2)), bcc.Schedule.every(2, 2, ["0"]),
            ...                 backend="eager")
            >>> x = torch.ones(1, 2)
            >>> for step in range(2):
            ...     for stream in range(2):  # true classifier-free guidance: two calls per step
            ...         _ = m.bcc_call_at(bcc.StepRef(step=step, num_steps=2, stream=stream), x)
            >>> m.bcc_stats()["streams"], m.bcc_step
            (2, 0)
        """
        return self._call(ref, args, kwargs)

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        # diffusers' pipelines call this on every component at the end of a generation
        # (maybe_free_model_hooks): the generation is over, so a later denoiser call
        # without a new set_timesteps is refused instead of landing in it.
        if self._bcc_locator is not None:
            self._bcc_locator.end()
            with self._bcc_stepper.lock:
                self._bcc_stepper.reset()
        inner = getattr(self._orig_mod, "_reset_stateful_cache", None)
        if callable(inner):
            inner(recurse)

    def _call(self, ref: StepRef | None, args: tuple, kwargs: dict, generation: Hashable = None) -> Any:
        args, kwargs = self._normalise_timestep(args, kwargs)
        signature = signature_of(args, kwargs)
        stepper = self._bcc_stepper
        with stepper.lock:
            # A trajectory belongs to the thread that started it: another thread's call
            # would take the owner's next schedule row and overwrite its caches. The
            # refusal leaves the owner's trajectory untouched (no reset).
            stepper.check_owner()
            with contextlib.ExitStack() as capturing:
                try:
                    return self._run(ref, args, kwargs, signature, capturing, generation)
                except BaseException:
                    stepper.reset()  # a failed call leaves the trajectory unknown: start clean
                    self._bcc_generation = None
                    raise

    def _plain_steps(self, required: bool = True) -> int | None:
        """The step count of a plain call's trajectory: the marker's, else the fixed schedule's."""
        steps = getattr(self._bcc_stepper.source, "num_steps", None)
        if isinstance(steps, int):
            return steps
        if self._bcc_follow.fixed is not None:
            return self._bcc_follow.fixed.num_steps
        if required:
            raise BccError(
                ErrorCode.STEP_UNTRACKED,
                "this model follows a bcc.Plan, which serves any step count, so a plain call cannot tell how many "
                "steps its trajectory has. Compile the whole pipeline (bcc.compile(pipe, plan): the scheduler "
                "says), mark a hand-written loop with `with model.trajectory(steps=len(scheduler.timesteps)):`, "
                "or call model.bcc_call_at(bcc.StepRef(step=i, num_steps=T), ...).")
        return None

    def _run(self, ref: StepRef | None, args: tuple, kwargs: dict, signature: Signature,
             capturing: contextlib.ExitStack, generation: Hashable) -> Any:
        stepper = self._bcc_stepper
        follow = self._bcc_follow
        if follow.fixed is None and not isinstance(follow.source, Plan):
            # A schedule factory: the first call finds the blocks (and so the step count).
            self._bcc_entries[signature] = self._build(args, kwargs, capturing)
        counted = ref is None
        if ref is None:
            ref = stepper.next_ref(self._plain_steps())
        schedule = self.bcc_schedule_for(ref.num_steps)
        if generation is not None and generation != self._bcc_generation:
            stepper.reset()  # the pipeline started another generation: a new trajectory
            self._bcc_generation = generation
        if stepper.starts_trajectory(ref):
            self._bcc_streams = {}
            if self._bcc_entries and self._stale():
                # A replaced parameter, buffer or submodule, or changed Python state the
                # capture froze (FreeU, a processor, a LoRA scale), is invisible to the
                # captured graphs: capture again (in-place weight updates are seen).
                self._bcc_entries.clear()
                self._bcc_current = None
        entry = self._bcc_streams.get(ref.stream)
        if entry is None:
            entry = self._bcc_entries.get(signature)
            if entry is None:
                entry = self._bcc_entries[signature] = self._build(args, kwargs, capturing)
            self._bcc_streams[ref.stream] = entry
        elif entry.captured.signature != signature:
            raise BccError(
                ErrorCode.SIGNATURE_CHANGED,
                f"the inputs of stream {ref.stream} changed in the middle of a trajectory (step {ref.step} of "
                f"{ref.num_steps}): {diff(entry.captured.signature, signature)}. Cached block values are tied to "
                "batch size, resolution, dtype and device; keep them fixed for all steps of one generation "
                "(another call per step is another stream, with inputs of its own). The next call starts a new "
                "trajectory.",
            )
        self._bcc_current = entry
        self._bcc_last_schedule = schedule
        program = entry.programs.get(ref.num_steps)
        if program is None:
            program = entry.programs[ref.num_steps] = self._program(entry.lowered, schedule)
        if self._bcc_config.check:
            found = self._bcc_find_timestep(args, kwargs)
            if found is not None:
                t = found.as_float()
                if counted:  # the step is a count: check it against what the timesteps say
                    self._bcc_watch.check(ref.step, ref.num_steps, ref.stream, t, schedule.timesteps, signature)
                elif schedule.timesteps is not None and t != schedule.timesteps[ref.step]:
                    self._bcc_watch.check(ref.step, ref.num_steps, ref.stream, t, schedule.timesteps, signature)
        leaves, _ = flatten_call(args, kwargs)
        outs = stepper.run(ref, [leaves[i] for i in entry.captured.tensor_positions], program)
        return pytree.tree_unflatten(outs, entry.captured.out_spec)

    def _build(self, args: tuple, kwargs: dict, capturing: contextlib.ExitStack) -> _Entry:
        capturing.enter_context(_CAPTURE_LOCK)  # held through this call, which compiles the graph
        follow = self._bcc_follow
        self._check_provenance()
        captured = capture(self._orig_mod, args, kwargs)
        if follow.fixed is None and not isinstance(follow.source, Plan):
            names = [b.name for b in find_block_regions(captured.gm, self._bcc_blocks or ATTENTION)]
            schedule = follow.source(tuple(names))
            if not isinstance(schedule, Schedule):
                raise BccError(ErrorCode.SCHEDULE_DTYPE,
                               f"the schedule function returned {type(schedule).__name__}, not a bcc.Schedule; "
                               "return bcc.Schedule.every(n, steps, names) or another Schedule of the names.")
            follow.fixed = self._bcc_last_schedule = schedule
            follow.schedules = {schedule.num_steps: schedule}
        else:
            names = self._present_blocks(captured)
        if follow.scale_shift is not None:
            follow.scale_shift.check_compatible(follow.fixed, self._orig_mod, self._bcc_config.mode)
        # The stepper hands this module's programs a window of the schedule, so the next
        # step's row can come with it (specialised rows then skip dead caches).
        lowered = lower(captured, names, self._bcc_config, scale_shift=follow.scale_shift is not None,
                        lookahead=True)
        self._bcc_frozen = frozen_state(self._orig_mod)
        return _Entry(captured, lowered)

    def _present_blocks(self, captured: Captured) -> list[str]:
        """The scheduled blocks this capture runs. The first capture must run all of them
        (else ``BCC302``: the schedule is another model's); a later one may skip some
        (SD3's skip-layer guidance call does not run the layers it skips)."""
        follow = self._bcc_follow
        wanted = list(follow.fixed.block_names if follow.fixed is not None else follow.source.block_names)
        if not self._bcc_entries:
            return wanted
        present = module_calls(captured.gm)
        names = [n for n in wanted if n in present]
        return names or wanted  # none at all: let the pass say which are missing

    def _program(self, lowered: Lowered, schedule: Schedule) -> Program:
        ss = self._bcc_follow.scale_shift
        tables = ss.tables_for(lowered.slots) if ss is not None else []
        index = [schedule.block_names.index(n) for n in lowered.block_names]
        return Program(lowered.fn, schedule.mask[:, index],
                       tuple(CacheSpec(s.shape, s.dtype, s.device) for s in lowered.slots), tuple(tables),
                       window=True, lookahead=lowered.lookahead)

    def _stale(self) -> bool:
        """Whether a parameter, buffer or submodule was replaced, or frozen Python state
        changed, since the last capture."""
        return self._bcc_frozen is None or not self._bcc_frozen.matches(self._orig_mod)

    def _check_provenance(self) -> None:
        # A schedule planned from a change profile records the profiled model; applying
        # it to another model would silently follow someone else's change curves.
        follow = self._bcc_follow
        if isinstance(follow.source, Plan):
            expected = follow.source.profiles[0].fingerprint
        else:
            expected = follow.fixed.meta.get("profile_fingerprint") if follow.fixed is not None else None
        if expected and expected != model_fingerprint(self._orig_mod):
            raise BccError(
                ErrorCode.PROFILE_MISMATCH,
                f"the schedule was planned from a change profile of another model (fingerprint {expected}, "
                f"this model {model_fingerprint(self._orig_mod)}). Calibrate this model with bcc.calibrate "
                "and plan its own schedule.",
            )

    # -- timesteps ---------------------------------------------------------------------
    def _normalise_timestep(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # A Python-number timestep would be baked into the export as a constant and
        # force a new capture every step; as a 0-d tensor it is an input.
        found = self._bcc_find_timestep(args, kwargs)
        if found is None or not isinstance(found.value, (int, float)) or isinstance(found.value, bool):
            return args, kwargs
        return found.replace_in(args, kwargs, torch.tensor(found.value))


class _IdentityTables:
    """Zero tables for every cache slot: naive caching through a scale-shift graph.

    Used after ``set_schedule`` without parameters, so a new schedule never runs with
    corrections trained for another one.
    """

    mode = None

    def __init__(self, num_steps: int):
        self.num_steps = num_steps

    def check_compatible(self, *args: Any) -> None:
        return None

    def tables_for(self, graph_slots) -> list[torch.Tensor]:
        return [torch.zeros(self.num_steps, 2, table_rows(s.shape), s.shape[channel_dim(len(s.shape))] if s.shape else 1,
                            dtype=s.dtype, device=s.device) for s in graph_slots]
