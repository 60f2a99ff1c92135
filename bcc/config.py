"""Frozen, validated configuration for :func:`bcc.compile`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from bcc.errors import BccError, ErrorCode

__all__ = ["BccConfig", "DEFAULT_INDUCTOR_OPTIONS"]

# Inductor's layout optimisation broke torch.cond subgraphs on CPU (a stride
# assertion surfacing as "Attempt to trace generator") and made the plain UNet
# ~20% slower on 2 CPU cores, so it is off unless the caller turns it back on.
# (force_pointwise_cat was here too, against a CPU cat moving a cond operand's strides;
# the operand correction in bcc.lower.inductor_fixes covers that case, and the pointwise
# cat cost 21% of a video DiT's time, so it is added only where the correction is missing.)
DEFAULT_INDUCTOR_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {"layout_optimization": False}
)

_MODES = ("residual", "output")
_STRATEGIES = ("branch", "specialize", "hybrid")


@dataclass(frozen=True)
class BccConfig:
    """How :func:`bcc.compile` rewrites and lowers a denoiser.

    Attributes:
        mode: ``"residual"`` caches ``block(x) - x`` and returns ``x_now + cached`` on reuse
            (the paper's C_i; exact for blocks with a skip connection). ``"output"`` caches
            the block's whole output. In residual mode a block output that is not shaped
            like any block input falls back to output caching.
        backend: ``"inductor"`` (default) compiles the rewritten graph with
            ``torch.compile(fullgraph=True)``; ``"eager"`` runs the rewritten graph as is,
            without autograd (debugging, measuring); any other string or a Dynamo backend callable is
            passed to ``torch.compile``.
        check: validate every call against the trajectory (timestep per step, step
            count). Reads the timestep on the host, so it costs a device sync per step on
            a GPU; use it while integrating, turn it off for speed.
        inductor_options: passed to ``torch.compile(options=...)`` when the backend is
            inductor.
        strategy: ``"branch"`` (default) compiles one graph in which every cached block
            is a ``torch.cond`` on ``schedule[step, i]``: one compile serves every step and
            every schedule. ``"specialize"`` compiles one branch-free graph per distinct
            schedule row (at its first use), picked on the host each step: no branches,
            fusion across block boundaries, capturable by CUDA graphs, but one compile per
            distinct row — per row and the caches the next row reads, since a cache
            nothing reads before the block recomputes is not written. ``"hybrid"``
            specialises only the uniform rows (a step that computes every block runs
            without gates, one that reuses every block passes its caches through uncopied)
            and runs the mixed rows through the branch graph: at most four compiles whatever
            the schedule (the all-True row writing every cache or, when the next row
            computes everything too, none; the all-False row; the branch graph); not for
            CUDA graphs (the branch graph has conds).
        version: format version of this config when saved beside an artifact.

    Example:
        >>> BccConfig(mode="output").mode
        'output'
        >>> BccConfig(mode="bogus")
        Traceback (most recent call last):
        ...
        bcc.errors.BccError: [BCC001] BccConfig.mode must be one of ('residual', 'output'), got 'bogus'. ...
    """

    mode: str = "residual"
    backend: str | Callable[..., Any] = "inductor"
    check: bool = False
    inductor_options: Mapping[str, Any] = field(default_factory=lambda: DEFAULT_INDUCTOR_OPTIONS)
    strategy: str = "branch"
    version: int = 1

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise BccError(
                ErrorCode.CONFIG_INVALID,
                f"BccConfig.mode must be one of {_MODES}, got {self.mode!r}. "
                "Use 'residual' for blocks with a skip connection (the default), 'output' to "
                "cache whole block outputs. (torch.compile's modes are not bcc modes: for CUDA graphs, "
                "what mode='reduce-overhead' means, pass strategy='specialize', "
                "inductor_options={'triton.cudagraphs': True}.)",
            )
        if not (isinstance(self.backend, str) or callable(self.backend)):
            raise BccError(
                ErrorCode.CONFIG_INVALID,
                f"BccConfig.backend must be a backend name or a callable, got {type(self.backend).__name__}. "
                "Use 'inductor' (default) or 'eager'.",
            )
        if self.strategy not in _STRATEGIES:
            raise BccError(
                ErrorCode.CONFIG_INVALID,
                f"BccConfig.strategy must be one of {_STRATEGIES}, got {self.strategy!r}. Use 'branch' for one "
                "graph serving every step (the default), 'specialize' for one branch-free graph per distinct "
                "schedule row (CUDA graphs; more compile time), 'hybrid' for branch-free graphs of the "
                "all-True and all-False rows beside the branch graph.",
            )
        if not isinstance(self.check, bool):
            raise BccError(ErrorCode.CONFIG_INVALID, f"BccConfig.check must be a bool, got {self.check!r}.")
        if not isinstance(self.inductor_options, Mapping):
            raise BccError(
                ErrorCode.CONFIG_INVALID,
                "BccConfig.inductor_options must be a mapping of inductor config names to values, "
                f"got {type(self.inductor_options).__name__}.",
            )

    def replace(self, **changes: Any) -> "BccConfig":
        """A copy with ``changes`` applied and validated.

        Example:
            >>> BccConfig().replace(backend="eager").backend
            'eager'
        """
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise BccError(
                ErrorCode.CONFIG_INVALID,
                f"unknown option(s) {sorted(unknown)}; valid options are "
                f"{[f.name for f in dataclasses.fields(self)]}.",
            )
        return dataclasses.replace(self, **changes)
