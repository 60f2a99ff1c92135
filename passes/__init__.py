"""Graph passes of bcc, installed as ``bcc.passes``; run in the order listed."""
from .annotate_blocks import AnnotateBlocksPass
from .gate_blocks import CacheSlot, GateBlocksPass
from .outline_blocks import OutlineBlocksPass
from .specialize_row import SpecializeRowPass

__all__ = ["AnnotateBlocksPass", "OutlineBlocksPass", "GateBlocksPass", "CacheSlot", "SpecializeRowPass",
           "DEFAULT_PASSES"]

# Names, in order; bcc.lower builds instances with the caller's selection and mode.
# SpecializeRowPass is not among them: it runs per schedule row, after them, only for
# BccConfig(strategy="specialize").
DEFAULT_PASSES = (AnnotateBlocksPass, OutlineBlocksPass, GateBlocksPass)
