"""analyze: the cached tensors of a block — the one cache-slot record and pure shape helpers.

The rewrite (``bcc.passes``), the runtime, the hook reference and scale-shift all
describe a cached tensor with :class:`CacheSlot`; this module imports nothing of
theirs (only torch), so every one of them can import it without a cycle, and the
graph passes never import training code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["CacheSlot", "channel_dim", "broadcast_shape", "table_rows", "batch_broadcast_shape", "channels_of"]


def channel_dim(rank: int) -> int:
    """The channel axis of a cached tensor: 1 for ``NCHW``, the last one otherwise.

    Example:
        >>> channel_dim(4), channel_dim(3), channel_dim(0)
        (1, 2, 0)
    """
    return 1 if rank == 4 else max(rank - 1, 0)


def channels_of(shape: Sequence[int]) -> int:
    """The size of the channel axis of a tensor of ``shape`` (1 for a scalar)."""
    return int(shape[channel_dim(len(shape))]) if len(shape) else 1


def broadcast_shape(rank: int, channels: int) -> list[int]:
    """Shape that broadcasts a ``[C]`` vector over a tensor of ``rank`` along its channels.

    Example:
        >>> broadcast_shape(4, 8)
        [1, 8, 1, 1]
    """
    shape = [1] * rank
    if rank:
        shape[channel_dim(rank)] = channels
    return shape


def table_rows(shape: Sequence[int]) -> int:
    """Rows of the per-sample table for a cached tensor of ``shape``: its batch, or 1
    when it has no batch axis apart from its channels (rank < 2).

    Example:
        >>> table_rows((4, 8, 2, 2)), table_rows((8,))
        (4, 1)
    """
    return int(shape[0]) if len(shape) >= 2 else 1


def batch_broadcast_shape(shape: Sequence[int]) -> list[int]:
    """Shape that broadcasts a ``[B, C]`` per-sample row over a tensor of ``shape``.

    Example:
        >>> batch_broadcast_shape((4, 8, 2, 2)), batch_broadcast_shape((4, 16, 8))
        ([4, 8, 1, 1], [4, 1, 8])
    """
    rank = len(shape)
    if rank < 2:
        return broadcast_shape(rank, channels_of(shape))
    out = [1] * rank
    out[0] = int(shape[0])
    out[channel_dim(rank)] = channels_of(shape)
    return out


@dataclass(frozen=True)
class CacheSlot:
    """One cached tensor: output ``output`` of block ``block``.

    The rewrite writes one per graph cache (``gm.meta["bcc_cache_slots"]``), the hook
    reference and training one per tensor output of a block call, and scale-shift keeps
    one per correction. Scale-shift pairs slots of the graph with its own by
    :attr:`key`, not by ``output``: the graph lists a block's outputs in the order they
    are computed and leaves out unused ones (Flux's last single block returns the text
    stream too, which nothing reads), so its ``output`` numbers are not the module's.

    Attributes:
        block: the block's module path.
        output: index among the block's outputs, in the lister's order (the graph's
            outputs for the rewrite, the module's output leaves for hooks).
        base: index of the block input the residual is taken against (among the graph's
            block inputs, or the call's tensor arguments), or ``None``: cached whole.
        shape, dtype, device: of the cached tensor. A batch dim of ``-1`` means "any"
            (slots read from files written before batch sizes were recorded).
        stream: the base input's rank in the order the block first uses its inputs:
            the same number in the graph and in an eager call, so it names the residual
            stream (Flux: 0 text, 1 image in a single block) where ``base`` cannot.
        also: more block inputs on the identity path (indices as ``base``'s), added to it:
            the cache is ``out - (inputs[base] + inputs[also...])`` (Cosmos's ``x + e``).

    Example:
        >>> s = CacheSlot("blk", 0, None, (2, 8, 4, 4), torch.float32, torch.device("cpu"))
        >>> s.channels, s.sample_shape, s.key
        (8, (8, 4, 4), ('blk', 'whole', (8, 4, 4)))
    """

    block: str
    output: int
    base: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    stream: int | None = None
    also: tuple[int, ...] = ()

    def identity(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """What the block's identity path carries, from its ``inputs``: ``inputs[base]``
        plus the ``also`` inputs; None for a tensor cached whole.

        Example:
            >>> CacheSlot("blk", 0, 1, (2,), also=(0,)).identity([torch.ones(2), torch.full((2,), 2.0)]).tolist()
            [3.0, 3.0]
        """
        if self.base is None:
            return None
        out = inputs[self.base]
        for k in self.also:
            out = out + inputs[k]
        return out

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def channels(self) -> int:
        return channels_of(self.shape)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape without the batch dim (the whole shape below rank 2)."""
        return tuple(self.shape[1:]) if self.rank >= 2 else tuple(self.shape)

    @property
    def key(self) -> tuple:
        """What identifies the slot across the graph, hooks and files: the block and its
        residual stream, or the per-sample shape of a tensor cached whole."""
        if self.stream is not None:
            return (self.block, "stream", self.stream)
        return (self.block, "whole", self.sample_shape)

    def fits(self, other: "CacheSlot", *, by_shape: bool = False) -> bool:
        """Same block, stream and per-sample shape (``-1`` matches any size); with
        ``by_shape`` the stream is not compared (parameters from version-1 files)."""
        a, b = self.sample_shape, other.sample_shape
        if self.block != other.block or len(a) != len(b) or any(x != y and -1 not in (x, y) for x, y in zip(a, b)):
            return False
        return by_shape or self.stream == other.stream

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.block, "output": self.output, "base": self.base, "shape": list(self.shape),
                "dtype": str(self.dtype).removeprefix("torch."), "stream": self.stream, "also": list(self.also)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CacheSlot":
        """Read :meth:`to_dict`, or a version-1 scale-shift slot (``channels``, ``rank`` and
        the shape without the batch dim; no stream, so it pairs by shape)."""
        if "channels" in d:
            return cls._from_v1(d)
        return cls(d["block"], int(d["output"]), d.get("base"), tuple(int(x) for x in d["shape"]),
                   getattr(torch, d.get("dtype", "float32")), torch.device("cpu"), d.get("stream"),
                   tuple(int(k) for k in d.get("also") or ()))

    @classmethod
    def _from_v1(cls, d: dict[str, Any]) -> "CacheSlot":
        rank, channels, rest = int(d["rank"]), int(d["channels"]), tuple(int(x) for x in d.get("shape") or ())
        if rank < 2:
            shape = (channels,) * rank
        elif rest:
            shape = (-1, *rest)
        else:  # the oldest files kept only rank and channels
            full = [-1] * rank
            full[channel_dim(rank)] = channels
            shape = tuple(full)
        return cls(d["block"], int(d["output"]), None, shape)
