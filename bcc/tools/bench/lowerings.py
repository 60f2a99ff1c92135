"""The bcc lowerings the speed benchmark can time beside the default branch graph.

One table, read by the benchmark (which variants to time), its report (columns, plot
markers) and the peer comparison (which of bcc's results count as "bcc compiled"), so
the three cannot disagree about what was measured.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Lowering", "EXTRA_LOWERINGS", "COMPILED_KEYS"]


@dataclass(frozen=True)
class Lowering:
    """A ``bcc.compile`` strategy as the speed results name it.

    Attributes:
        strategy: the ``strategy=`` value (and the key in each schedule's results).
        prefix: the timed variant's name prefix (``"spec"`` -> ``"spec[every-2]"``).
        label: how the report and the plot name it.
        fill: its markers' fill style in the plots (the branch graph's are full).
    """

    strategy: str
    prefix: str
    label: str
    fill: str


# Besides "compiled" (the branch graph, bcc's default), in report order.
EXTRA_LOWERINGS = (Lowering("specialize", "spec", "specialize", "none"), Lowering("hybrid", "hyb", "hybrid", "left"))
# Every result key that is bcc compiled, whichever strategy.
COMPILED_KEYS = ("compiled", *(lw.strategy for lw in EXTRA_LOWERINGS))
