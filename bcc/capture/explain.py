"""capture: say which line of a model stopped torch.export, and why bcc cannot go around it.

A raw export traceback ends deep in torch; what a user needs is the model's own line,
the module that runs it, and whether another capture could work. Value-dependent
shapes and control flow (MoE routing by ``bincount().cpu().numpy()``, lengths read with
``.tolist()``) cannot be traced by any capture torch has (export strict or not, Dynamo
with ``fullgraph=True``), so they get their own message.
"""
from __future__ import annotations

import linecache
from dataclasses import dataclass

import torch

__all__ = ["CaptureSite", "capture_site", "is_value_dependent"]

# Fragments of the messages torch raises when a trace needs a tensor's value.
_VALUE_DEPENDENT = (
    "GuardOnDataDependentSymNode",
    "DataDependentOutputException",
    "DynamicOutputShapeException",
    "non-nested SymInt",
    ".numpy() is not supported for tensor subclasses",
    "data-dependent expression",
    "data dependent",
)
_OURS = ("/torch/", "/bcc/", "/passes/", "/_pytest/", "/pluggy/", "<frozen", "/contextlib.py")


@dataclass(frozen=True)
class CaptureSite:
    """The innermost frame of the model's own code in a capture failure.

    Attributes:
        file: the source file, shortened to the part after ``site-packages/``.
        line: the line number.
        function: the function's name.
        source: the line's text (empty when the file cannot be read).
        module: the module path of the ``self`` of that frame (``"<root>"`` for the model
            itself), or None when the frame is not a method of one of the model's modules.
        module_class: that module's class name, or None.
    """

    file: str
    line: int
    function: str
    source: str
    module: str | None
    module_class: str | None

    def describe(self) -> str:
        where = f"{self.module_class} ({self.module!r}), " if self.module is not None else ""
        code = f": `{self.source}`" if self.source else ""
        return f"{where}{self.file}:{self.line} in {self.function}{code}"


def _chain(err: BaseException) -> list[BaseException]:
    out, e = [], err
    while e is not None and len(out) < 8 and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def is_value_dependent(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is torch failing on a tensor's value.

    Example:
        >>> is_value_dependent(RuntimeError(".numpy() is not supported for tensor subclasses."))
        True
    """
    text = " ".join(f"{type(e).__name__}: {e}" for e in _chain(err))
    return any(k in text for k in _VALUE_DEPENDENT)


def capture_site(model: torch.nn.Module, err: BaseException) -> CaptureSite | None:
    """The model's innermost own frame in ``err``'s traceback, or None if there is none.

    Example:
        >>> class M(torch.nn.Module):
        ...     def forward(self, x):
        ...         raise ValueError("no")
        >>> m = M()
        >>> try:
        ...     m(torch.ones(1))
        ... except ValueError as e:
        ...     capture_site(m, e).function
        'forward'
    """
    names = {id(m): n for n, m in model.named_modules()}
    for exc in _chain(err):
        found = None
        tb = exc.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            path = frame.f_code.co_filename
            if not any(p in path for p in _OURS):
                owner = frame.f_locals.get("self")
                name = names.get(id(owner)) if isinstance(owner, torch.nn.Module) else None
                found = CaptureSite(
                    file=path.split("site-packages/")[-1], line=tb.tb_lineno, function=frame.f_code.co_name,
                    source=linecache.getline(path, tb.tb_lineno).strip(),
                    module=(name or "<root>") if name is not None else None,
                    module_class=type(owner).__name__ if name is not None else None,
                )
            tb = tb.tb_next
        if found is not None:
            return found
    return None
