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
trained for; :meth:`ScaleShift.check_compatible` refuses any other.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from bcc.errors import BccError, ErrorCode
from bcc.plan.profile import model_fingerprint
from bcc.plan.schedule import Schedule

__all__ = ["ScaleShift", "SlotSpec", "slot_spec", "schedule_fingerprint", "channel_dim", "sinusoidal_embedding",
           "batch_broadcast_shape", "table_rows"]

FORMAT = "bcc-scale-shift"
VERSION = 1
KINDS = ("linear", "table")


def channel_dim(rank: int) -> int:
    """The channel axis of a cached tensor: 1 for ``NCHW``, the last one otherwise."""
    return 1 if rank == 4 else max(rank - 1, 0)


def broadcast_shape(rank: int, channels: int) -> list[int]:
    """Shape that broadcasts a ``[C]`` vector over a tensor of ``rank`` along its channels."""
    shape = [1] * rank
    if rank:
        shape[channel_dim(rank)] = channels
    return shape


def table_rows(shape: Sequence[int]) -> int:
    """Rows of the per-sample table for a cached tensor of ``shape``: its batch, or 1
    when it has no batch axis apart from its channels (rank < 2)."""
    return int(shape[0]) if len(shape) >= 2 else 1


def batch_broadcast_shape(shape: Sequence[int]) -> list[int]:
    """Shape that broadcasts a ``[B, C]`` per-sample row over a tensor of ``shape``.

    Example:
        >>> batch_broadcast_shape((4, 8, 2, 2)), batch_broadcast_shape((4, 16, 8))
        ([4, 8, 1, 1], [4, 1, 8])
    """
    rank = len(shape)
    if rank < 2:
        return broadcast_shape(rank, _channels(shape))
    out = [1] * rank
    out[0] = int(shape[0])
    out[channel_dim(rank)] = _channels(shape)
    return out


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


@dataclass(frozen=True)
class SlotSpec:
    """One cached tensor that gets a correction: output ``output`` of ``block``."""

    block: str
    output: int
    channels: int
    rank: int
    #: shape without the batch dim; tells a block's outputs apart (Flux: text vs image tokens)
    shape: tuple[int, ...] = ()

    def matches(self, block: str, shape: Sequence[int]) -> bool:
        return self.block == block and (tuple(self.shape) == tuple(shape[1:]) if self.shape
                                        else self.rank == len(shape) and self.channels == _channels(shape))


def _channels(shape: Sequence[int]) -> int:
    return int(shape[channel_dim(len(shape))]) if len(shape) else 1


def slot_spec(block: str, output: int, shape: Sequence[int]) -> SlotSpec:
    return SlotSpec(block, output, _channels(shape), len(shape), tuple(int(d) for d in shape[1:]))


def check_distinct(block: str, shapes: Sequence[Sequence[int]]) -> None:
    """Refuse a block with two cached outputs of one shape: their corrections could swap."""
    rest = [tuple(s[1:]) for s in shapes]
    if len(set(rest)) != len(rest):
        raise BccError(
            ErrorCode.SCALE_SHIFT_MISMATCH,
            f"block {block!r} caches several outputs of the same shape {shapes[0]}; scale-shift cannot tell "
            "which correction belongs to which (the graph and the module may order them differently). "
            "Leave this block out of the schedule, or cache without scale-shift.",
        )


class ScaleShift(torch.nn.Module):
    """Per-block, per-channel, timestep-dependent scale and shift of reused values.

    Build it with :func:`bcc.train_scale_shift` (or :meth:`identity`), pass it to
    :func:`bcc.compile` as ``scale_shift=``, store it with :meth:`save`.

    Example:
        >>> s = Schedule.every(2, 4, ["blk"])
        >>> ss = ScaleShift.identity(s, [SlotSpec("blk", 0, channels=3, rank=4)], kind="table")
        >>> ss.tables()[0].shape
        torch.Size([4, 2, 3])
        >>> x = torch.randn(1, 3, 2, 2)
        >>> torch.equal(ss.adjust(0, x, step=1), x)
        True
        >>> ScaleShift.identity(s, [SlotSpec("blk", 0, channels=3, rank=4)], groups=2).tables()[0].shape
        torch.Size([4, 2, 2, 3])
    """

    def __init__(
        self,
        slots: Sequence[SlotSpec],
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
        self.num_steps = int(num_steps)
        self.kind = kind
        self.schedule_fp = schedule_fp
        self.model_fp = model_fp
        self.mode = mode
        self.meta: dict[str, Any] = dict(meta or {})
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

    @classmethod
    def identity(cls, schedule: Schedule, slots: Sequence[SlotSpec], *, kind: str = "table",
                 embedding: torch.Tensor | None = None, model: torch.nn.Module | None = None,
                 mode: str = "residual", groups: int = 1) -> "ScaleShift":
        """Identity parameters for ``schedule`` (reproduces naive caching exactly)."""
        return cls(slots, schedule.num_steps, kind=kind, embedding=embedding, schedule=schedule,
                   model_fp=None if model is None else model_fingerprint(model), mode=mode, groups=groups)

    @classmethod
    def for_graph(cls, schedule: Schedule, graph_slots: Sequence[Any], *, model: torch.nn.Module | None = None,
                  mode: str = "residual") -> "ScaleShift":
        """Identity ``"table"`` parameters for the cache slots of a rewritten graph.

        Example:
            >>> from bcc.passes import CacheSlot
            >>> slot = CacheSlot("blk", 0, None, (2, 8, 4, 4), torch.float32, torch.device("cpu"))
            >>> ScaleShift.for_graph(Schedule.every(2, 3, ["blk"]), [slot]).slots[0].channels
            8
        """
        specs = [slot_spec(g.block, g.output, g.shape) for g in graph_slots]
        return cls.identity(schedule, specs, kind="table", model=model, mode=mode)

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

    def slot_index(self, block: str, output: int) -> int:
        for k, s in enumerate(self.slots):
            if s.block == block and s.output == output:
                return k
        raise KeyError((block, output))

    def tables_for(self, graph_slots: Sequence[Any]) -> list[torch.Tensor]:
        """Detached ``[T, 2, B, C]`` tables in the order of a rewritten graph's cache slots.

        Graph slots are matched to this module's slots per block, in order, by shape
        (a block's graph outputs and its Python outputs list the same tensors).
        """
        taken: set[int] = set()
        out = []
        for block in dict.fromkeys(g.block for g in graph_slots):
            check_distinct(block, [g.shape for g in graph_slots if g.block == block])
        with torch.no_grad():
            for g in graph_slots:
                match = next((k for k, s in enumerate(self.slots) if k not in taken and s.matches(g.block, g.shape)), None)
                if match is None:
                    raise BccError(
                        ErrorCode.SCALE_SHIFT_MISMATCH,
                        f"the scale-shift parameters have no slot for output {g.output} of block {g.block!r} "
                        f"(shape {tuple(g.shape)}); they were trained for other blocks or another cache mode. "
                        "Train scale-shift for this schedule with bcc.train_scale_shift.",
                    )
                taken.add(match)
                out.append(self.batch_table(match, g.shape).detach().to(dtype=g.dtype, device=g.device).contiguous())
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
            "mode": self.mode, "slots": [asdict(s) for s in self.slots], "meta": self.meta, "groups": self.groups,
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
        if head.get("version") != VERSION:
            raise BccError(
                ErrorCode.FILE_VERSION,
                f"{path} has {FORMAT} version {head.get('version')!r}; this bcc reads {VERSION}. Train it again.",
            )
        slots = [SlotSpec(**{**s, "shape": tuple(s.get("shape", ()))}) for s in head["slots"]]
        emb = tensors.get("embedding")
        ss = cls(slots, head["num_steps"], kind=head["kind"], embedding=emb if head["kind"] == "linear" else None,
                 schedule_fp=head["schedule_fingerprint"], model_fp=head["model_fingerprint"],
                 mode=head["mode"], meta=head.get("meta"), groups=int(head.get("groups", 1)),
                 schedule=Schedule.from_dict(head["schedule"]) if head.get("schedule") else None)
        ss.load_state_dict(tensors)
        ss.header = head
        return ss

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, slots={len(self.slots)}, steps={self.num_steps}, groups={self.groups}, "
                f"params={self.num_parameters()}")
