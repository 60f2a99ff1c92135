"""capture: the input signature of a denoiser call, and what changed between two.

A captured graph, its caches and an exported program are tied to the shapes, dtypes
and devices of the call they were made for, and to its non-tensor arguments (which
``torch.export`` bakes in). :func:`signature_of` records exactly that as a
:class:`Signature`; :func:`diff` says in words which argument changed and how. The
runtime, the export runner and the backend all use these two, so a change is
detected and reported the same way everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.utils._pytree as pytree

from bcc.errors import BccError, ErrorCode

__all__ = ["Signature", "TensorLeaf", "ConstantLeaf", "signature_of", "diff", "split_example_inputs"]


@dataclass(frozen=True)
class TensorLeaf:
    """A tensor argument: what a graph compiled for it assumes.

    Attributes:
        name: where it is in the call (``"args[0]"``, ``"encoder_hidden_states"``,
            ``"added_cond_kwargs['resolution']"``); for messages, not compared (the
            call's structure is).
        shape / dtype / device: ``dtype`` without the ``torch.`` prefix, ``device`` as
            ``str(tensor.device)`` (``"cpu"``, ``"cuda:0"``).
    """

    name: str = field(compare=False)
    shape: tuple[int, ...]
    dtype: str
    device: str


@dataclass(frozen=True)
class ConstantLeaf:
    """A non-tensor argument, baked into the captured graph: ``value`` is its ``repr``."""

    name: str = field(compare=False)
    value: str


Leaf = Union[TensorLeaf, ConstantLeaf]


@dataclass(frozen=True)
class Signature:
    """What must stay fixed for a captured graph and its caches to apply to a call.

    Hashable, so it keys the runtime's captures. ``structure`` is the pytree spec of
    ``(args, kwargs)`` as text (which arguments were passed, nested how).

    Example:
        >>> a = signature_of((torch.ones(2, 3),), {"scale": 2.0})
        >>> a == signature_of((torch.zeros(2, 3),), {"scale": 2.0})
        True
        >>> a.leaves[0]
        TensorLeaf(name='args[0]', shape=(2, 3), dtype='float32', device='cpu')
    """

    structure: str
    leaves: tuple[Leaf, ...]

    def to_json(self) -> dict:
        """A JSON-ready dict (export metadata); :meth:`from_json` reads it back."""
        return {"structure": self.structure,
                "leaves": [{"name": x.name, "shape": list(x.shape), "dtype": x.dtype, "device": x.device}
                           if isinstance(x, TensorLeaf) else {"name": x.name, "value": x.value}
                           for x in self.leaves]}

    @classmethod
    def from_json(cls, data: Any) -> "Signature":
        """Read :meth:`to_json`'s form, or the nested lists bcc wrote before (export format 1).

        Example:
            >>> s = signature_of((torch.ones(2),), {"flag": True})
            >>> Signature.from_json(s.to_json()) == s
            True
        """
        try:
            if isinstance(data, dict):
                leaves = tuple(TensorLeaf(x["name"], tuple(int(d) for d in x["shape"]), x["dtype"], x["device"])
                               if "shape" in x else ConstantLeaf(x["name"], x["value"]) for x in data["leaves"])
                return cls(data["structure"], leaves)
            # Format 1: [spec, [["T", shape, "torch.float32", device_type, index] | ["C", repr], ...]].
            structure, old = data
            leaves = tuple(
                TensorLeaf(f"leaf {i}", tuple(int(d) for d in x[1]), str(x[2]).removeprefix("torch."),
                           x[3] if x[4] is None else f"{x[3]}:{x[4]}")
                if x[0] == "T" else ConstantLeaf(f"leaf {i}", x[1]) for i, x in enumerate(old))
            return cls(structure, leaves)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise BccError(ErrorCode.ARTIFACT_MISMATCH,
                           f"the recorded input signature is unreadable ({type(e).__name__}: {e}); export the "
                           "model again with this version of bcc.") from None


def _name(path: tuple) -> str:
    # The path of a leaf of (args, kwargs): (0, i, ...) is a positional argument,
    # (1, name, ...) a keyword one.
    try:
        head, first, rest = path[0], path[1], path[2:]
        base = f"args[{first.idx}]" if head.idx == 0 else str(first.key)
        return base + pytree.keystr(rest)
    except (AttributeError, IndexError):
        return pytree.keystr(path)


def signature_of(args: tuple, kwargs: dict) -> Signature:
    """The :class:`Signature` of the call ``model(*args, **kwargs)``.

    Args:
        args / kwargs: the call's arguments (nested containers are walked as pytrees).

    Returns:
        Its structure, and for each leaf either shape/dtype/device or the value's repr.

    Example:
        >>> s = signature_of((torch.ones(1, 4),), {"t": 3, "return_dict": False})
        >>> [type(x).__name__ for x in s.leaves], s.leaves[2].value
        (['TensorLeaf', 'ConstantLeaf', 'ConstantLeaf'], 'False')
    """
    flat, spec = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
    leaves: list[Leaf] = []
    for path, leaf in flat:
        if isinstance(leaf, torch.Tensor):
            leaves.append(TensorLeaf(_name(path), tuple(int(d) for d in leaf.shape),
                                     str(leaf.dtype).removeprefix("torch."), str(leaf.device)))
        else:
            leaves.append(ConstantLeaf(_name(path), repr(leaf)))
    return Signature(str(spec), tuple(leaves))


def diff(old: Signature, new: Signature) -> str:
    """What changed from ``old`` to ``new``, in words: which argument, and its shape,
    dtype, device or value (every change, ``"; "``-separated).

    Example:
        >>> a = signature_of((torch.ones(2, 4),), {"flag": True})
        >>> diff(a, signature_of((torch.ones(1, 4).double(),), {"flag": True}))
        'args[0] shape (2, 4) -> (1, 4); args[0] dtype float32 -> float64'
        >>> diff(a, signature_of((torch.ones(2, 4),), {}))
        "the call's argument structure changed: flag no longer passed"
    """
    if old == new:
        return "nothing changed"
    if old.structure != new.structure:
        before, after = [x.name for x in old.leaves], [x.name for x in new.leaves]
        parts = []
        gone = [n for n in before if n not in after]
        added = [n for n in after if n not in before]
        if gone:
            parts.append(f"{', '.join(gone)} no longer passed")
        if added:
            parts.append(f"{', '.join(added)} newly passed")
        return "the call's argument structure changed" + (": " + "; ".join(parts) if parts else "")
    changes = []
    for a, b in zip(old.leaves, new.leaves):
        if a == b:
            continue
        if isinstance(a, TensorLeaf) and isinstance(b, TensorLeaf):
            for label in ("shape", "dtype", "device"):
                va, vb = getattr(a, label), getattr(b, label)
                if va != vb:
                    changes.append(f"{b.name} {label} {va} -> {vb}")
        elif isinstance(a, ConstantLeaf) and isinstance(b, ConstantLeaf):
            changes.append(f"{b.name} {a.value} -> {b.value}")
        else:
            changes.append(f"{b.name} {_kind(a)} -> {_kind(b)}")
    return "; ".join(changes)


def _kind(leaf: Leaf) -> str:
    return f"a {leaf.dtype} tensor {leaf.shape}" if isinstance(leaf, TensorLeaf) else leaf.value


def split_example_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """The ``(args, kwargs)`` of a call from what users pass as ``example_inputs``: one
    tensor, a tuple of positional arguments, or an ``(args, kwargs)`` pair — the one
    reading every entry point (``bcc.compile``, ``bcc.find_blocks``, ``bcc.export``) shares.

    Example:
        >>> import torch
        >>> split_example_inputs(torch.ones(1))
        ((tensor([1.]),), {})
        >>> split_example_inputs(((torch.ones(1),), {"t": 3}))
        ((tensor([1.]),), {'t': 3})
    """
    if (
        isinstance(example_inputs, tuple)
        and len(example_inputs) == 2
        and isinstance(example_inputs[0], tuple)
        and isinstance(example_inputs[1], dict)
    ):
        return example_inputs
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}
