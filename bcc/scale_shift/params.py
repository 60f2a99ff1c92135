"""Scale-shift: a learned, timestep-dependent, per-channel correction of reused values.

On a reuse step, block ``i`` returns ``(1 + gamma_i(t)) * cached + beta_i(t)`` instead of
``cached`` (the paper's §3.3), where ``cached`` is what bcc caches: the residual in
residual mode (the fresh block input is then added back, so only the stale part is
corrected), the whole output in output mode. ``gamma`` and ``beta`` are vectors over
the channel axis (dim 1 of a 4-D ``NCHW`` tensor, the last dim otherwise), broadcast
over space or tokens.

Two parametrisations, both initialised to the identity:

- ``"linear"`` (the paper's): ``[gamma; beta] = W e(t) + b`` on the model's timestep
  embedding ``e(t)`` (its ``time_embedding`` / ``adaln_single.emb`` module, or a
  sinusoidal embedding when it has none).
- ``"table"``: a free ``[gamma; beta]`` per step (cheaper to train, more parameters).

``groups=2`` gives each half of the batch its own correction: with classifier-free
guidance batched as ``[uncond; cond]`` the sampler steps with ``u + w (c - u)``, which
multiplies any error in ``c - u`` by ``w``, and one shared shift cannot reduce it.

A schedule fixes the timesteps, so at inference either form is just a table per cached
tensor, expanded to ``[T, 2, B, C]`` (a row per sample, B the batch), which enters the
compiled graph as an input and is applied inside the reuse branch. Parameters are tied to the schedule, model and mode they were
trained for; :meth:`ScaleShift.check_compatible` refuses any other. A correction belongs
to a :class:`~bcc.analyze.slots.CacheSlot` and is found by its block and residual
stream (or, cached whole, its per-sample shape), so a graph that orders or drops a
block's outputs differently from the module still gets the right one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from bcc._io import freeze, thaw
from bcc.errors import BccError, ErrorCode
from bcc.plan.profile import model_fingerprint
from bcc.plan.schedule import Schedule
from bcc.analyze.slots import (CacheSlot, batch_broadcast_shape, broadcast_shape, channel_dim,  # noqa: F401
                                    table_rows)

# channel_dim, table_rows and batch_broadcast_shape live in bcc.analyze.slots (the
# graph passes use them and must not import this module); they stay importable here.
__all__ = ["ScaleShift", "CacheSlot", "check_distinct", "schedule_fingerprint", "channel_dim",
           "sinusoidal_embedding", "batch_broadcast_shape", "table_rows"]

FORMAT = "bcc-scale-shift"
# 2: slots are CacheSlot records (with the residual stream); 1: shape-only slots, still read.
VERSION = 2
KINDS = ("linear", "table")


def schedule_fingerprint(schedule: Schedule) -> str:
    """A short hash of what scale-shift parameters are trained for: names, mask, timesteps.

    Example:
        >>> a = Schedule.every(2, 4, ["x"])
        >>> schedule_fingerprint(a) == schedule_fingerprint(Schedule.every(2, 4, ["x"]))
        True
        >>> schedule_fingerprint(a) == schedule_fingerprint(Schedule.every(3, 4, ["x"]))
        False
    """
    blob = json.dumps([list(schedule.block_names), schedule.mask.to(torch.int8).tolist(),
                       list(schedule.timesteps) if schedule.timesteps else None])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sinusoidal_embedding(t: float, dim: int = 64) -> torch.Tensor:
    """The usual sin/cos timestep features, used when a model exposes no embedding module."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = float(t) * freqs
    return torch.cat([torch.sin(args), torch.cos(args)]).float()


def check_distinct(slots: Sequence[CacheSlot]) -> None:
    """Refuse cached tensors that scale-shift cannot tell apart: two of one block with the
    same :attr:`CacheSlot.key` (residuals of one stream, or whole outputs of one shape),
    whose corrections the graph and the module could swap.

    Example:
        >>> a = CacheSlot("blk", 0, None, (2, 3))
        >>> check_distinct([a, CacheSlot("blk", 1, 0, (2, 3), stream=0)])
        >>> check_distinct([a, CacheSlot("blk", 1, None, (2, 3))])
        Traceback (most recent call last):
        ...
        bcc.errors.BccError: [BCC505] block 'blk' caches outputs 0 and 1 that scale-shift cannot tell apart ...
    """
    seen: dict[tuple, CacheSlot] = {}
    for s in slots:
        other = seen.setdefault(s.key, s)
        if other is not s:
            what = (f"both residuals of input stream {s.stream}" if s.stream is not None
                    else f"both cached whole with shape {tuple(s.shape)}")
            raise BccError(
                ErrorCode.SCALE_SHIFT_MISMATCH,
                f"block {s.block!r} caches outputs {other.output} and {s.output} that scale-shift cannot tell "
                f"apart ({what}): the graph and the module may order them differently. Leave this block out "
                "of the schedule, or cache without scale-shift.",
            )


class ScaleShift(torch.nn.Module):
    """Per-block, per-channel, timestep-dependent scale and shift of reused values.

    Build it with :func:`bcc.train_scale_shift` (or :meth:`identity`), pass it to
    :func:`bcc.compile` as ``scale_shift=``, store it with :meth:`save`.

    Example:
        >>> s = Schedule.every(2, 4, ["blk"])
        >>> slot = CacheSlot("blk", 0, None, (1, 3, 2, 2))
        >>> ss = ScaleShift.identity(s, [slot], kind="table")
        >>> ss.tables()[0].shape
        torch.Size([4, 2, 3])
        >>> x = torch.randn(1, 3, 2, 2)
        >>> torch.equal(ss.adjust(0, x, step=1), x)
        True
        >>> ScaleShift.identity(s, [slot], groups=2).tables()[0].shape
        torch.Size([4, 2, 2, 3])
    """

    def __init__(
        self,
        slots: Sequence[CacheSlot],
        num_steps: int,
        *,
        kind: str = "linear",
        embedding: torch.Tensor | None = None,
        schedule_fp: str = "",
        model_fp: str | None = None,
        mode: str = "residual",
        meta: dict[str, Any] | None = None,
        schedule: Schedule | None = None,
        groups: int = 1,
    ):
        super().__init__()
        #: the schedule the parameters belong to (saved in the same file)
        self.schedule = schedule
        if schedule is not None:
            schedule_fp = schedule_fingerprint(schedule)
        if kind not in KINDS:
            raise BccError(ErrorCode.CONFIG_INVALID, f"scale-shift kind must be one of {KINDS}, got {kind!r}.")
        if kind == "linear" and embedding is None:
            raise BccError(ErrorCode.CONFIG_INVALID, "a 'linear' scale-shift needs the [T, E] timestep embedding table.")
        if int(groups) != groups or groups < 1:
            raise BccError(ErrorCode.CONFIG_INVALID,
                           f"scale-shift groups must be a positive integer (2 = one correction per guidance "
                           f"half), got {groups!r}.")
        #: batch groups with their own correction (1: shared; 2: [uncond; cond] halves)
        self.groups = int(groups)
        g = [self.groups] if self.groups > 1 else []
        self.slots = tuple(slots)
        # Version-1 files know no residual streams: their slots pair by shape alone.
        self.by_shape = False
        self.num_steps = int(num_steps)
        self.kind = kind
        self.schedule_fp = schedule_fp
        self.model_fp = model_fp
        self.mode = mode
        self._meta = freeze(dict(meta or {}))
        if kind == "linear":
            emb = embedding.detach().float()
            self.register_buffer("embedding", emb)
            self.weight = torch.nn.ParameterList(
                torch.nn.Parameter(torch.zeros(2 * self.groups * s.channels, emb.shape[1])) for s in self.slots)
            self.bias = torch.nn.ParameterList(
                torch.nn.Parameter(torch.zeros(2 * self.groups * s.channels)) for s in self.slots)
        else:
            self.register_buffer("embedding", torch.zeros(self.num_steps, 0))
            self.table = torch.nn.ParameterList(
                torch.nn.Parameter(torch.zeros(self.num_steps, 2, *g, s.channels)) for s in self.slots)


    @property
    def meta(self) -> Mapping[str, Any]:
        """Training provenance (loss, lr, history, ...), read-only: change it with :meth:`annotate`."""
        return self._meta

    def annotate(self, **entries: Any) -> None:
        """Record training provenance; the parameters are training state anyway, so this one
        method is where their description changes (readers never mutate :attr:`meta`).

        Example:
            >>> ss = ScaleShift.identity(Schedule.every(2, 2, ["blk"]), [CacheSlot("blk", 0, None, (1, 4))])
            >>> ss.annotate(loss="output"); ss.meta["loss"]
            'output'
        """
        self._meta = freeze({**thaw(self._meta), **entries})
    @classmethod
    def identity(cls, schedule: Schedule, slots: Sequence[CacheSlot], *, kind: str = "table",
                 embedding: torch.Tensor | None = None, model: torch.nn.Module | None = None,
                 mode: str = "residual", groups: int = 1) -> "ScaleShift":
        """Identity parameters for ``schedule`` (reproduces naive caching exactly)."""
        return cls(slots, schedule.num_steps, kind=kind, embedding=embedding, schedule=schedule,
                   model_fp=None if model is None else model_fingerprint(model), mode=mode, groups=groups)

    @classmethod
    def for_graph(cls, schedule: Schedule, graph_slots: Sequence[CacheSlot], *,
                  model: torch.nn.Module | None = None, mode: str = "residual") -> "ScaleShift":
        """Identity ``"table"`` parameters for the cache slots of a rewritten graph.

        Example:
            >>> from bcc.passes import CacheSlot
            >>> slot = CacheSlot("blk", 0, None, (2, 8, 4, 4), torch.float32, torch.device("cpu"))
            >>> ScaleShift.for_graph(Schedule.every(2, 3, ["blk"]), [slot]).slots[0].channels
            8
        """
        return cls.identity(schedule, graph_slots, kind="table", model=model, mode=mode)

    # -- values ----------------------------------------------------------------------
    def slot_table(self, k: int) -> torch.Tensor:
        """``[T, 2, C]`` (``[T, 2, G, C]`` with ``groups`` G > 1): row ``s`` holds ``gamma``
        and ``beta`` of slot ``k`` at step ``s``."""
        if self.kind == "table":
            return self.table[k]
        g = [self.groups] if self.groups > 1 else []
        return (self.embedding @ self.weight[k].t() + self.bias[k]).view(self.num_steps, 2, *g, -1)

    def tables(self) -> list[torch.Tensor]:
        return [self.slot_table(k) for k in range(len(self.slots))]

    def batch_table(self, k: int, shape: Sequence[int]) -> torch.Tensor:
        """``[T, 2, B, C]`` for a cached tensor of ``shape``: each sample's row of ``gamma, beta``."""
        rows = table_rows(shape)
        t = self.slot_table(k)
        if self.groups == 1:
            return t.unsqueeze(2).expand(t.shape[0], 2, rows, t.shape[-1])
        if len(shape) < 2 or rows % self.groups:
            raise BccError(
                ErrorCode.SCALE_SHIFT_MISMATCH,
                f"the scale-shift parameters have {self.groups} batch groups (one per guidance half), but "
                f"the cached tensor of block {self.slots[k].block!r} has shape {tuple(shape)}, whose batch "
                f"does not split into {self.groups}. Batch both guidance halves together, or train with groups=1.",
            )
        return t.repeat_interleave(rows // self.groups, dim=2)

    def adjust(self, k: int, cached: torch.Tensor, step: int) -> torch.Tensor:
        """``(1 + gamma) * cached + beta`` for slot ``k`` at ``step`` (differentiable)."""
        if self.groups == 1:
            row = self.slot_table(k)[step]
            shape = broadcast_shape(cached.dim(), row.shape[-1])
        else:
            row = self.batch_table(k, cached.shape)[step]
            shape = batch_broadcast_shape(cached.shape)
        gamma, beta = row[0].reshape(shape).to(cached.dtype), row[1].reshape(shape).to(cached.dtype)
        return cached * (1 + gamma) + beta

    def index_of(self, slot: CacheSlot) -> int:
        """The index of the parameters' slot for ``slot`` (a rewritten graph's or a hooked
        call's): same block and residual stream, or for a tensor cached whole the same
        per-sample shape (see :attr:`CacheSlot.key`), never the output's position.

        Example:
            >>> ss = ScaleShift.identity(Schedule.every(2, 3, ["blk"]),
            ...                          [CacheSlot("blk", 0, None, (2, 4)), CacheSlot("blk", 1, 0, (2, 4), stream=1)])
            >>> ss.index_of(CacheSlot("blk", 0, 1, (5, 4), stream=1))  # graph order, another batch
            1
        """
        found = [k for k, s in enumerate(self.slots) if s.fits(slot, by_shape=self.by_shape)]
        if len(found) == 1:
            return found[0]
        if found:
            check_distinct([self.slots[k] for k in found])  # raises: they share a key
        what = (f"a residual of input stream {slot.stream}" if slot.stream is not None else "cached whole")
        raise BccError(
            ErrorCode.SCALE_SHIFT_MISMATCH,
            f"the scale-shift parameters have no slot for output {slot.output} of block {slot.block!r} ({what}, "
            f"shape {tuple(slot.shape)}); they were trained for other blocks, another cache mode or another "
            "residual rule. Train scale-shift for this schedule with bcc.train_scale_shift.",
        )

    def tables_for(self, graph_slots: Sequence[CacheSlot]) -> list[torch.Tensor]:
        """Detached ``[T, 2, B, C]`` tables in the order of a rewritten graph's cache slots,
        each paired with this module's slot by :meth:`index_of`."""
        for block in dict.fromkeys(g.block for g in graph_slots):
            check_distinct([g for g in graph_slots if g.block == block])
        out = []
        with torch.no_grad():
            for g in graph_slots:
                k = self.index_of(g)
                out.append(self.batch_table(k, g.shape).detach().to(dtype=g.dtype, device=g.device).contiguous())
        return out

    # -- compatibility -----------------------------------------------------------------
    def check_compatible(self, schedule: Schedule, model: torch.nn.Module | None = None, mode: str | None = None) -> None:
        """Raise ``BCC505`` unless these parameters were trained for this schedule/model/mode."""
        if schedule.num_steps != self.num_steps:
            raise BccError(
                ErrorCode.SCALE_SHIFT_MISMATCH,
                f"the scale-shift parameters were trained for {self.num_steps} steps, the schedule has "
                f"{schedule.num_steps}. Train them for this schedule with bcc.train_scale_shift.",
            )
        if self.schedule_fp and schedule_fingerprint(schedule) != self.schedule_fp:
            raise BccError(
                ErrorCode.SCALE_SHIFT_MISMATCH,
                "the scale-shift parameters were trained for another schedule (fingerprint "
                f"{self.schedule_fp}, this one {schedule_fingerprint(schedule)}): the corrections are "
                "specific to which steps reuse which blocks. Train them for this schedule.",
            )
        if model is not None and self.model_fp and model_fingerprint(model) != self.model_fp:
            raise BccError(
                ErrorCode.SCALE_SHIFT_MISMATCH,
                f"the scale-shift parameters were trained on another model (fingerprint {self.model_fp}, "
                f"this one {model_fingerprint(model)}). Train them on this model.",
            )
        if mode is not None and mode != self.mode:
            raise BccError(
                ErrorCode.SCALE_SHIFT_MISMATCH,
                f"the scale-shift parameters correct {self.mode}-mode caches, the model is compiled in "
                f"{mode} mode. Compile with mode={self.mode!r} or train them for {mode!r}.",
            )

    # -- files -------------------------------------------------------------------------
    def _header(self, extra: dict[str, Any] | None = None) -> dict[str, str]:
        head = {
            "format": FORMAT, "version": VERSION, "kind": self.kind, "num_steps": self.num_steps,
            "schedule_fingerprint": self.schedule_fp, "model_fingerprint": self.model_fp,
            "mode": self.mode, "slots": [s.to_dict() for s in self.slots], "meta": thaw(self._meta), "groups": self.groups,
            "schedule": None if self.schedule is None else self.schedule.to_dict(),
        }
        head.update(extra or {})
        return {"bcc": json.dumps(head)}

    def save(self, path: str | os.PathLike, **extra: Any) -> Path:
        """Write parameters and provenance to one ``.safetensors`` file (atomically)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=self._header(extra))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScaleShift":
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise BccError(ErrorCode.FILE_INVALID, f"{path} does not exist; check the path.")
        try:
            with safe_open(str(path), framework="pt") as f:
                head = json.loads((f.metadata() or {}).get("bcc", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise BccError(
                ErrorCode.FILE_INVALID,
                f"{path} is not a readable scale-shift file ({type(e).__name__}: {e}); it may be "
                "truncated. Train and save it again.",
            ) from None
        if head.get("format") != FORMAT:
            raise BccError(ErrorCode.FILE_INVALID, f"{path} is not a {FORMAT} file.")
        if head.get("version") not in (1, VERSION):
            raise BccError(
                ErrorCode.FILE_VERSION,
                f"{path} has {FORMAT} version {head.get('version')!r}; this bcc reads 1 and {VERSION}. "
                "Train it again.",
            )
        slots = [CacheSlot.from_dict(s) for s in head["slots"]]
        emb = tensors.get("embedding")
        ss = cls(slots, head["num_steps"], kind=head["kind"], embedding=emb if head["kind"] == "linear" else None,
                 schedule_fp=head["schedule_fingerprint"], model_fp=head["model_fingerprint"],
                 mode=head["mode"], meta=head.get("meta"), groups=int(head.get("groups", 1)),
                 schedule=Schedule.from_dict(head["schedule"]) if head.get("schedule") else None)
        ss.load_state_dict(tensors)
        ss.by_shape = head.get("version") == 1
        ss.header = head
        return ss

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, slots={len(self.slots)}, steps={self.num_steps}, groups={self.groups}, "
                f"params={self.num_parameters()}")
