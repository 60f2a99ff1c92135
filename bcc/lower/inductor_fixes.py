"""lower: a scoped correction of inductor's ``torch.cond`` lowering, active while bcc compiles.

Inductor lowers both branch subgraphs of a ``cond`` for the strides its operands were
traced with (``meta["val"]``) and asserts them at the branch's entry, but
``ir.Conditional.create`` only realizes the operands: an operand whose producer has a
flexible layout (the clone of ``conv(x).flatten(2).transpose(1, 2)``, the patch tokens
of every video DiT and of SVD's UNet) may come out in its producer's order and fail the
assertion (``expected ... stride 1==16``). No inductor setting avoids it. While active,
:func:`cond_operand_strides` requires each tensor operand's traced strides first,
exactly as ``Conditional.create`` already does for the branch outputs; values are
unchanged, at most a copy is added where inductor had picked another layout.

The patch is installed only around bcc's own inductor compiles, never globally, and is
a no-op on a torch whose inductor has another shape (then the assertion can come back
and is reported as a BccError by the caller).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.fx as fx

__all__ = ["cond_operand_strides", "inductor", "inductor_settings"]

_lock = threading.Lock()
_depth = 0
_original = None


def _patched_create(cls, predicate, true_fn, false_fn, operands, *args, **kwargs):
    from torch._inductor import ir
    from torch._inductor.virtualized import V

    node = getattr(V.graph, "current_node", None)
    traced = node.args[-1] if node is not None and node.args else ()
    fixed = []
    for x, op in zip(operands, traced if isinstance(traced, (list, tuple)) else ()):
        val = op.meta.get("val") if isinstance(op, fx.Node) else None
        if isinstance(val, torch.Tensor) and val.layout == torch.strided and isinstance(x, ir.IRNode):
            x = ir.ExternKernel.require_exact_strides(x, val.stride())
        fixed.append(x)
    fixed.extend(operands[len(fixed):])
    return _original(cls, predicate, true_fn, false_fn, fixed, *args, **kwargs)


def _supported() -> bool:
    try:
        from torch._inductor import ir
    except ImportError:  # a torch without inductor
        return False
    create = getattr(getattr(ir, "Conditional", None), "create", None)
    return (create is not None and hasattr(create, "__func__")
            and hasattr(ir.ExternKernel, "require_exact_strides"))


@contextlib.contextmanager
def cond_operand_strides() -> Iterator[bool]:
    """Within this context inductor gives ``cond`` operands their traced strides.

    Yields whether the correction is installed (False on an inductor it does not know).
    Reentrant; the original lowering is back when the outermost context exits.

    Example:
        >>> with cond_operand_strides() as active:
        ...     active
        True
    """
    global _depth, _original
    if not _supported():
        yield False
        return
    from torch._inductor import ir

    with _lock:
        if _depth == 0:
            _original = ir.Conditional.create.__func__
            ir.Conditional.create = classmethod(_patched_create)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                ir.Conditional.create = classmethod(_original)
                _original = None


@contextlib.contextmanager
def inductor_settings(options: Mapping[str, Any]) -> Iterator[dict]:
    """Every bcc inductor compile runs inside this: the ``cond`` operand correction
    installed, inductor's config patched, and the settings to pass on yielded.

    The settings are ``options``, plus ``force_pointwise_cat=True`` only where the
    correction could not be installed: without it a CPU ``cat`` written straight into
    its output buffer can move a cond operand off its traced strides (a cached UNet
    downsampler whose input is also a skip), and a pointwise cat avoids that at a
    price (21% of a HunyuanVideo-like DiT's time on 2 CPU cores, measured side by side).

    Example:
        >>> with inductor_settings({"layout_optimization": False}) as opts:
        ...     opts
        {'layout_optimization': False}
    """
    import torch._inductor.config as inductor_config

    with cond_operand_strides() as active:
        opts = dict(options) if active else {"force_pointwise_cat": True, **options}
        with inductor_config.patch(opts):
            yield opts


def inductor(gm: fx.GraphModule, example_inputs: list, options: dict) -> Callable[..., Any]:
    """``compile_fx`` with inductor settings ``options``, under :func:`inductor_settings`
    (compile time only: the compiled code runs without it). The one way bcc calls inductor.

    Example:
        >>> gm = fx.symbolic_trace(torch.nn.ReLU())
        >>> fn = inductor(gm, [torch.ones(2)], {})
        >>> fn(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """
    from torch._inductor.compile_fx import compile_fx

    with inductor_settings(options):  # it patches inductor's config: no config_patches here
        return compile_fx(gm, example_inputs)
