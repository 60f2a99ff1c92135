"""The peers bcc is compared with, run inside an ordinary sampling loop.

Adapters, written against the peers' public APIs, for DeepCache (UNets) and diffusers'
cache hooks for DiTs: First Block Cache (``fbc``), ``taylorseer``, ``magcache`` and
Pyramid Attention Broadcast (``pab``). :func:`enable` yields a denoiser that runs one
:class:`PeerSetting` wherever the plain model runs, counts what the peer computed, and
restores the model on exit (:mod:`bcc.tools.bench.peers_compile` measures one under ``torch.compile``).
"""
from __future__ import annotations

import ast
import contextlib
import inspect
import io
import re
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from bcc.config import DEFAULT_INDUCTOR_OPTIONS
from bcc.tools.digits.model import denoiser_arch
from bcc.analyze.hooks import delegating_getattr

__all__ = ["PEERS", "PeerSetting", "PeerStats", "CallUnits", "PeerDenoiser", "peer_settings", "enable", "timestep_schedule",
           "magcache_ratios"]

PEERS = ("deepcache", "fbc", "taylorseer", "magcache", "pab")
# The plain model's and bcc's inductor settings, so a compiled peer differs only in its method.
INDUCTOR_OPTIONS = DEFAULT_INDUCTOR_OPTIONS
# The attention modules of DiT blocks (PixArt: attn1/attn2, Flux: attn). diffusers' TaylorSeer
# default pattern must end in "attn" and so matches no PixArt module: name them explicitly.
_DIT_ATTENTION = r"(transformer_blocks|single_transformer_blocks|blocks)\.\d+\.attn\d*"
_PATCHED = ("forward", "_diffusers_hook", "_cache_config")  # instance attributes peers add
_MIXED: dict[type, type] = {}  # model class -> the same class with diffusers' CacheMixin


@dataclass(frozen=True)
class PeerSetting:
    """One peer at one operating point.

    ``params`` are the peer's own knobs, frozen read-only (a setting can key a table):
    ``DeepCacheSDHelper.set_params`` keywords, or the fields of the diffusers ``*Config``
    (MagCache: ``mag_ratios`` may be given, else :func:`enable` calibrates).

    Example:
        >>> s = PeerSetting("deepcache", "DeepCache N=3 b=0", {"cache_interval": 3, "cache_branch_id": 0})
        >>> s.family, s.params["cache_interval"]
        ('unet', 3)
    """

    peer: str
    label: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.peer not in PEERS:
            raise ValueError(f"peer must be one of {PEERS}, got {self.peer!r}")
        object.__setattr__(self, "params", types.MappingProxyType(dict(self.params)))

    def __hash__(self) -> int:
        return hash((self.peer, self.label, tuple(sorted((k, repr(v)) for k, v in self.params.items()))))

    def __reduce__(self):  # a mappingproxy does not pickle (nor deepcopy): rebuild from a dict
        return PeerSetting, (self.peer, self.label, dict(self.params))

    @property
    def family(self) -> str:
        """``"unet"`` for DeepCache, ``"dit"`` for the diffusers hooks."""
        return "unet" if self.peer == "deepcache" else "dit"


def peer_settings(family: str) -> list[PeerSetting]:
    """The sweep of each peer for ``family`` (``"unet"`` or ``"dit"``), mild to aggressive.

    Every peer's settings are listed from the one expected to skip least to the one
    expected to skip most, so each peer draws one speed-vs-fidelity curve.

    Example:
        >>> [s.label for s in peer_settings("unet")][:2]
        ['DeepCache N=2 b=3', 'DeepCache N=3 b=3']
        >>> sorted({s.peer for s in peer_settings("dit")})
        ['fbc', 'magcache', 'pab', 'taylorseer']
    """
    if family == "unet":
        # Branch 3 caches below the second resolution level (keeps more), branch 0 keeps
        # only the outermost layers (DeepCache's default for SD1.5, skips the most).
        return [PeerSetting("deepcache", f"DeepCache N={n} b={b}", {"cache_interval": n, "cache_branch_id": b})
                for b in (3, 0) for n in (2, 3, 4, 5)]
    if family != "dit":
        raise ValueError(f"family must be 'unet' or 'dit', got {family!r}")
    out = [PeerSetting("fbc", f"FBC t={t:.2f}", {"threshold": t}) for t in (0.05, 0.08, 0.1, 0.2, 0.4)]
    out += [PeerSetting("taylorseer", f"TaylorSeer N={n}",
                        {"cache_interval": n, "disable_cache_before_step": 3, "max_order": 1,
                         "taylor_factors_dtype": "float32", "cache_identifiers": (_DIT_ATTENTION,)})
            for n in (2, 3, 5)]
    out += [PeerSetting("magcache", f"MagCache t={t:.2f}", {"threshold": t, "max_skip_steps": 3, "retention_ratio": 0.2})
            for t in (0.01, 0.03, 0.06, 0.12, 0.24)]
    pab = [(2, 3, (100, 800)), (3, 5, (100, 800)), (4, 8, (50, 950))]
    out += [PeerSetting("pab", f"PAB s={s} c={c} t={lo}-{hi}",
                        {"spatial_attention_block_skip_range": s, "cross_attention_block_skip_range": c,
                         "spatial_attention_timestep_skip_range": (lo, hi),
                         "cross_attention_timestep_skip_range": (lo, hi)}) for s, c, (lo, hi) in pab]
    return out


def timestep_schedule(num_steps: int, values: Sequence[float] | None = None) -> types.SimpleNamespace:
    """A scheduler stand-in (:func:`enable` reads only ``timesteps``) matching ``bcc.tools.zoo.step_inputs``.

    Example:
        >>> timestep_schedule(4).timesteps.tolist()
        [999, 749, 499, 249]
    """
    zoo = [int(999 - s * (1000 // max(num_steps, 1))) % 1000 for s in range(num_steps)]
    return types.SimpleNamespace(timesteps=torch.tensor(list(zoo if values is None else values)))


@dataclass(frozen=True)
class PeerStats:
    """What a peer executed since the counters were last reset.

    A *unit* is a module the peer may skip (DeepCache: the resnets, attentions, samplers
    of the down/up blocks and the mid block; FBC/MagCache: the transformer blocks;
    TaylorSeer/PAB: the hooked attention modules). FLOPs are what ``FlopCounterMode``
    counts (matmuls, convolutions, attention via the math SDPA kernel; elementwise ops
    are free), measured on the first call of each input shape, where every peer computes
    everything. ``flops_executed`` = full FLOPs minus those of the skipped unit forwards.
    """

    calls: int
    unit_forwards_full: int
    unit_forwards_executed: int
    flops_full: float
    flops_executed: float

    @property
    def executed_fraction(self) -> float:
        """Executed FLOPs / FLOPs of the same calls without the peer (1.0 before any call)."""
        return self.flops_executed / self.flops_full if self.flops_full else 1.0


@dataclass(frozen=True)
class CallUnits:
    """One denoiser call under a peer: its step and how often each unit ran in it."""

    step: int
    ran: tuple[int, ...]


class _Tally:
    """Counts unit forwards. Python ints in eager mode (no overhead); 0-d tensors when
    compiled, because dynamo would guard on an int and recompile on every call, while
    an in-place add on a tensor is just one more op in the graph."""

    def __init__(self, n: int, device: torch.device | None):
        self.tensors = device is not None
        self.counts: list = [torch.zeros((), dtype=torch.int64, device=device) for _ in range(n)] if self.tensors else [0] * n
        self.probe: Any = None  # the FlopCounterMode while measuring unit FLOPs
        self.flops = [0.0] * n

    def hit(self, i: int) -> None:
        if self.tensors:
            self.counts[i].add_(1)
        else:
            self.counts[i] += 1

    def values(self) -> list[int]:
        return [int(c) for c in self.counts]

    def zero(self) -> None:  # in place: compiled code holds these very tensors
        self.counts[:] = [c.zero_() for c in self.counts] if self.tensors else [0] * len(self.counts)


def _counted(tally: _Tally, i: int, inner: Callable, fast: Callable) -> Callable:
    def forward(*args, **kwargs):
        tally.hit(i)
        if tally.probe is None:
            return fast(*args, **kwargs)  # `inner`, or `inner` compiled (regional compile)
        before = tally.probe.get_total_flops()
        out = inner(*args, **kwargs)
        tally.flops[i] += tally.probe.get_total_flops() - before
        return out
    return forward


class PeerDenoiser(torch.nn.Module):
    """The model with a peer enabled; call it exactly like the model. Made by :func:`enable`.

    Each call finds its step in ``scheduler.timesteps`` (``timestep`` keyword, or the 2nd
    positional argument as for UNets). A call at step 0, or not after the previous step,
    starts a new trajectory: the peer's state is reset first, so nothing leaks between
    trajectories. Other attributes (``config``, ``dtype``...) come from the model.
    """

    def __init__(self, model, peer: "_Peer", scheduler, *, compile: bool | str | dict = False, count: bool = True):
        super().__init__()
        self._orig_mod = model
        self.__dict__.update(_peer=peer, _scheduler=scheduler, _count=count, _ts=None, _ts_index={},
                             _last_step=None, _fresh=True, _probes={}, _sig=None, _done=[0, 0, 0, 0.0, 0.0], _calls=0,
                             _start=0, _n=0, _on_call=None, _trace=[])
        self.digits_arch = denoiser_arch(model)  # how bcc.tools.digits calls it
        opts = _compile_options(compile)
        whole = bool(opts) and not opts.pop("regional", False)
        self.__dict__["_target"] = torch.compile(model, **opts) if whole else model

    __getattr__ = delegating_getattr

    def new_trajectory(self) -> None:
        """Reset the peer before the next call (automatic at step 0 or on going back a step)."""
        self._fresh = True

    def _step_of(self, args, kwargs) -> tuple[int, float]:
        t = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
        if t is None:
            raise TypeError("a peer needs the timestep of each call (keyword 'timestep' or 2nd positional argument)")
        value = float(t.reshape(-1)[0]) if torch.is_tensor(t) else float(t)
        ts = self._scheduler.timesteps
        if ts is not self._ts:  # set_timesteps() made a new tensor
            values = torch.as_tensor(ts).reshape(-1).tolist()
            self._ts, self._n, self._ts_index = ts, len(values), {float(v): i for i, v in reversed(list(enumerate(values)))}
        if value not in self._ts_index:
            raise ValueError(f"timestep {value} is not in scheduler.timesteps; pass the scheduler the loop uses")
        return self._ts_index[value], value

    def forward(self, *args, **kwargs):
        (step, t), n = self._step_of(args, kwargs), self._n
        if self._fresh or step == 0 or (self._last_step is not None and step <= self._last_step):
            self._peer.reset(num_steps=n)
            self._fresh = False
        self._last_step = step
        self._peer.current_timestep = t
        if self._count:
            self._account(args, kwargs, step, n)
        tally = self._peer.tally if self._count else None
        before = tally.values() if tally is not None and not tally.tensors else None
        self._calls += 1
        with self._peer.context(step, n, t):
            out = self._target(*args, **kwargs)
        if before is not None:
            self._trace.append(CallUnits(step, tuple(a - b for a, b in zip(tally.values(), before))))
        if self._on_call is not None:
            self._on_call()
        return out

    # -- accounting ------------------------------------------------------------------
    def _account(self, args, kwargs, step, n) -> None:
        sig = tuple(tuple(a.shape) for a in torch.utils._pytree.tree_leaves((args, kwargs)) if torch.is_tensor(a))
        if sig == self._sig:
            return
        self._fold()
        self._sig = sig
        if sig not in self._probes:
            self._probes[sig] = self._probe(args, kwargs, step, n)
            self._peer.reset(num_steps=n)  # the probe is discarded: back to a fresh trajectory
        self._peer.tally.zero()

    def _probe(self, args, kwargs, step, n) -> tuple[float, list[float], list[int]]:
        """One eager call under FlopCounterMode at a trajectory's first step, where every peer computes
        everything: full and per-unit FLOPs. The math SDPA kernel shows attention to the counter."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        tally = self._peer.tally
        tally.zero()
        tally.flops = [0.0] * len(tally.flops)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            tally.probe = fc
            try:
                with self._peer.context(step, n, self._peer.current_timestep):
                    self._orig_mod(*args, **kwargs)
            finally:
                tally.probe = None
        runs = tally.values()
        per_run = [f / r if r else 0.0 for f, r in zip(tally.flops, runs)]
        return float(fc.get_total_flops()), per_run, runs

    def _fold(self) -> None:
        """Add the calls since the last shape change to the totals and zero the counters."""
        if self._sig is None:
            return
        full, unit_flops, per_call = self._probes[self._sig]
        calls = self._calls - self._done[0]
        done = self._peer.tally.values()
        expected = [calls * p for p in per_call]
        skipped = sum(f * (e - d) for f, e, d in zip(unit_flops, expected, done))
        self._done = [self._calls, self._done[1] + sum(expected), self._done[2] + sum(done),
                      self._done[3] + calls * full, self._done[4] + calls * full - skipped]
        self._peer.tally.zero()

    def stats(self) -> PeerStats:
        """Calls, unit forwards and FLOPs, full vs executed, since the last :meth:`reset_stats`."""
        if not self._count:
            raise RuntimeError("made without counting: pass enable(..., count=True)")
        self._fold()
        return PeerStats(self._done[0] - self._start, *self._done[1:])

    def executed_fraction(self) -> float:
        """Executed FLOPs / full FLOPs (see :class:`PeerStats`)."""
        return self.stats().executed_fraction

    def unit_trace(self) -> tuple[tuple[str, ...], tuple[CallUnits, ...]]:
        """The peer's units by module name and, per call since the last :meth:`reset_stats`,
        how often each ran (eager counting only): what it decided, step by step."""
        if not self._count or self._peer.tally.tensors:
            raise RuntimeError("the trace is kept by eager counting: pass enable(..., count=True), no compile")
        return self._peer.unit_names, tuple(self._trace)

    def reset_stats(self) -> None:
        """Start counting afresh (e.g. after a warm-up run)."""
        self._trace.clear()
        self._fold()
        self._start, self._done = self._calls, [self._calls, 0, 0, 0.0, 0.0]


def _compile_options(compile: bool | str | dict) -> dict:
    if compile is True or compile == "regional":
        return {"options": dict(INDUCTOR_OPTIONS), "regional": compile == "regional"}
    return dict(compile or {})


# -- the peers ---------------------------------------------------------------------
class _Peer:
    """Installs one peer on a model. ``units()`` lists the modules it may skip (the
    counters go *under* the peer's wrapper, so they only fire when it really runs one)."""

    tally: _Tally
    unit_names: tuple[str, ...] = ()  # the units' module names, in tally order
    current_timestep: float = 0.0  # of the call in progress (PAB's callback reads it)

    def __init__(self, model, setting: PeerSetting, scheduler):
        self.model, self.setting, self.scheduler = model, setting, scheduler

    def context(self, step: int, n: int, t: float):
        return contextlib.nullcontext()


class _DeepCache(_Peer):
    def units(self) -> list[torch.nn.Module]:
        unet, out = self.model, []
        for block in (*unet.down_blocks, *unet.up_blocks):
            for name in ("resnets", "attentions", "downsamplers", "upsamplers"):
                out += list(getattr(block, name, None) or [])
        return out + [unet.mid_block]

    def install(self, calibrate=None) -> None:
        from DeepCache import DeepCacheSDHelper  # pip install DeepCache==0.1.1; it only
        # touches pipe.unet and pipe.scheduler.timesteps, so a namespace is pipe enough.
        self.helper = DeepCacheSDHelper(types.SimpleNamespace(unet=self.model, scheduler=self.scheduler))
        self.helper.set_params(**dict(self.setting.params))
        self.helper.enable()

    def reset(self, num_steps: int) -> None:
        # Not helper.reset_states(): it also drops the wrapped forwards, which breaks them
        # while enabled. Clear in place: compiled code holds this very dict.
        self.helper.cached_output.clear()
        self.helper.start_timestep = None

    def uninstall(self) -> None:
        self.helper.disable()


class _DiffusersHook(_Peer):
    """diffusers' cache hooks through ``enable_cache``/``cache_context``/``disable_cache``.

    PixArt (like SD3, Sana, DiT) lacks ``CacheMixin`` in diffusers 0.42, although its
    blocks are ones the hooks know; such a model gets a subclass that adds the mixin
    for the duration of :func:`enable` (its ``__class__`` is put back on exit)."""

    def config(self, calibrate_mode: bool = False):
        from diffusers import hooks

        p = dict(self.setting.params)
        if self.setting.peer == "fbc":
            return hooks.FirstBlockCacheConfig(**p)
        if self.setting.peer == "taylorseer":  # settings hold a dtype name and tuples of patterns
            p.update({k: getattr(torch, v) if isinstance(v, str) else list(v) for k, v in p.items()
                      if k in ("taylor_factors_dtype", "cache_identifiers", "skip_predict_identifiers") and v is not None})
            return hooks.TaylorSeerCacheConfig(**p)
        if self.setting.peer == "pab":
            return hooks.PyramidAttentionBroadcastConfig(**p, current_timestep_callback=lambda: self.current_timestep)
        if calibrate_mode:
            return hooks.MagCacheConfig(calibrate=True, num_inference_steps=1)
        p.update(mag_ratios=list(self.ratios), num_inference_steps=len(self.ratios))
        return hooks.MagCacheConfig(**p)

    def units(self) -> list[torch.nn.Module]:
        # Which modules the hook wraps: enable once, look, disable (public API only).
        self._enable(self.config(calibrate_mode=self.setting.peer == "magcache"))
        found = [m for name, m in self.model.named_modules()
                 if name and getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks]
        self.model.disable_cache()
        return found

    def _enable(self, cfg) -> None:
        from diffusers.models.cache_utils import CacheMixin

        if not isinstance(self.model, CacheMixin):  # one class per model class: compiled code keeps matching
            cls = type(self.model)
            self.model.__class__ = _MIXED.setdefault(cls, type(cls.__name__, (cls, CacheMixin), {"__module__": cls.__module__}))
        if self.model.is_cache_enabled:
            raise ValueError("the model already has a diffusers cache enabled; disable it first")
        self.cfg = cfg
        self.model.enable_cache(cfg)

    def install(self, calibrate=None) -> None:
        if self.setting.peer == "magcache":
            ratios = self.setting.params.get("mag_ratios", calibrate)
            if ratios is None:
                raise ValueError("MagCache needs per-step magnitude ratios: pass calibrate=<run(denoiser) "
                                 "that samples one trajectory> or a list of ratios (see magcache_ratios)")
            self.ratios = tuple(ratios) if not callable(ratios) else magcache_ratios(self.model, self.scheduler, ratios)
        self._enable(self.config())

    def reset(self, num_steps: int) -> None:
        from diffusers.hooks import HookRegistry

        if self.setting.peer == "magcache" and num_steps:
            # MagCache counts steps itself and needs the trajectory length to place its
            # ratios (and, calibrating, to know when the trajectory ends).
            from diffusers.hooks.mag_cache import nearest_interp

            self.cfg.num_inference_steps = num_steps
            if not self.cfg.calibrate:
                self.cfg.mag_ratios = nearest_interp(torch.tensor(self.ratios), num_steps)
        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks(recurse=True)

    def context(self, step: int, n: int, t: float):
        # One context for the whole (CFG-batched) call, as the diffusers pipelines do.
        return self.model.cache_context("denoise", step_index=step, num_inference_steps=n, timestep=t)

    def uninstall(self) -> None:
        self.model.disable_cache()


def magcache_ratios(model, scheduler, run: Callable[[torch.nn.Module], Any]) -> tuple[float, ...]:
    """Per-step magnitude ratios of ``model`` on ``scheduler``'s steps: MagCache's own
    calibration mode over one trajectory of ``run(denoiser)``, parsed from what it prints.
    Pass them as ``enable(..., calibrate=ratios)`` to reuse them across settings.

    Example:
        >>> from bcc.tools import zoo
        >>> model, args, kwargs = zoo.build("pixart", latent=4)
        >>> sched = timestep_schedule(3)
        >>> def run(den):
        ...     return [den(args[0], **{**kwargs, "timestep": t.expand(2)}) for t in sched.timesteps]
        >>> r = magcache_ratios(model, sched, run)
        >>> len(r), r[0]
        (3, 1.0)
    """
    peer = _DiffusersHook(model, PeerSetting("magcache", "MagCache calibration", {}), scheduler)
    snapshot, buf = _snapshot(model), io.StringIO()
    try:
        peer._enable(peer.config(calibrate_mode=True))
        with contextlib.redirect_stdout(buf):  # the hook prints its result after the last step
            run(PeerDenoiser(model, peer, scheduler, count=False))
        peer.uninstall()
    finally:
        _restore(snapshot)
    found = re.findall(r"Calibration Complete[^\n]*\n(\[[^\]]*\])", buf.getvalue())
    if not found:
        raise RuntimeError("MagCache calibration printed no ratios: did run() sample one whole trajectory?")
    return tuple(float(r) for r in ast.literal_eval(found[-1]))


def _snapshot(model) -> list[tuple[torch.nn.Module, dict]]:
    return [(m, {"__class__": type(m), **{a: m.__dict__[a] for a in _PATCHED if a in m.__dict__}})
            for m in model.modules()]


def _restore(snapshot) -> None:
    # The peers restore forwards by assigning the saved bound method and leave empty
    # hook registries behind; put every instance attribute back as it was instead.
    for m, saved in snapshot:
        for a in _PATCHED:
            m.__dict__.pop(a, None)
        m.__dict__.update(saved)
        m.__class__ = m.__dict__.pop("__class__")


@contextlib.contextmanager
def enable(model: torch.nn.Module, setting: PeerSetting, scheduler: Any, *,
           calibrate: Callable[[torch.nn.Module], Any] | Sequence[float] | None = None,
           compile: bool | str | dict = False, count: bool | None = None) -> Iterator[PeerDenoiser]:
    """Run ``setting``'s peer on ``model``; yields a :class:`PeerDenoiser`.

    Args:
        model: a ``UNet2DConditionModel`` (DeepCache) or a diffusers transformer whose
            blocks diffusers' hooks know (PixArt, Flux, ...).
        setting: the peer and its parameters.
        scheduler: anything with ``timesteps`` holding the timesteps the loop will pass
            (read at each call, so ``set_timesteps`` may run later, as in ``sample``).
        calibrate: MagCache without ``mag_ratios``: ``run(denoiser)`` sampling one trajectory
            (calibrated inside) or the ratios from :func:`magcache_ratios`.
        compile: ``True`` compiles the model (inductor, ``layout_optimization=False``) after
            the peer wrapped it, so dynamo traces the peer's code too; ``"regional"`` compiles
            only each skippable module's own forward (the peer's decisions stay eager); a dict
            gives ``torch.compile`` keywords (plus ``"regional": True`` for the latter).
        count: count unit forwards and FLOPs (:meth:`PeerDenoiser.stats`). Default: yes, but not
            under whole-model compile, where in-graph counters change dynamo's graph split.

    On exit the peer is disabled and every attribute it added removed: the model is as before.

    Example:
        >>> from bcc.tools.digits import load_digits_model, default_model_dir, sample, make_scheduler
        >>> model, cond, train = load_digits_model(default_model_dir("dit"))
        >>> sched = make_scheduler("ddim", train)
        >>> with enable(model, PeerSetting("fbc", "FBC", {"threshold": 0.2}), sched) as den:
        ...     x = sample(den, cond, sched, [3, 7], num_steps=6)
        >>> x.shape, den.stats().calls
        (torch.Size([2, 1, 16, 16]), 6)
    """
    snapshot, installed = _snapshot(model), False
    peer = (_DeepCache if setting.peer == "deepcache" else _DiffusersHook)(model, setting, scheduler)
    try:
        opts = _compile_options(compile)
        regional = opts.pop("regional", False)
        whole = bool(opts) and not regional  # dynamo traces the counters only then
        count = not whole if count is None else count
        units = peer.units() if count or regional else []
        if regional and "isolate_recompiles" in inspect.signature(torch.compile).parameters:
            # Units share code objects (every ResnetBlock2D.forward): one recompile budget each.
            opts.setdefault("isolate_recompiles", True)
        peer.tally = _Tally(len(units), next(model.parameters()).device if whole else None)
        named = {id(m): name for name, m in model.named_modules()}
        peer.unit_names = tuple(named.get(id(m), "?") for m in units)
        for i, m in enumerate(units):  # under the peer's wrappers, which capture m.forward
            fast = torch.compile(m.forward, **opts) if regional else m.forward
            m.forward = _counted(peer.tally, i, m.forward, fast)
        peer.install(calibrate)
        installed = True
        yield PeerDenoiser(model, peer, scheduler, compile=compile, count=count)
    finally:
        try:
            if installed:
                peer.uninstall()
        finally:
            _restore(snapshot)
