"""Graph passes of bcc, installed as ``bcc.passes``; run in the order listed."""
from bcc.passes.annotate_blocks import AnnotateBlocksPass
from bcc.passes.gate_blocks import CacheSlot, GateBlocksPass
from bcc.passes.outline_blocks import OutlineBlocksPass
from bcc.passes.specialize_row import SpecializeRowPass

__all__ = ["AnnotateBlocksPass", "OutlineBlocksPass", "GateBlocksPass", "CacheSlot", "SpecializeRowPass",
           "DEFAULT_PASSES"]

# Names, in order; bcc.lower builds instances with the caller's selection and mode.
# SpecializeRowPass is not among them: it runs per schedule row, after them, only for
# BccConfig(strategy="specialize").
DEFAULT_PASSES = (AnnotateBlocksPass, OutlineBlocksPass, GateBlocksPass)
