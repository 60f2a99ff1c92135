"""Graph passes of bcc, installed as ``bcc.passes``; run in the order listed."""
from .annotate_blocks import AnnotateBlocksPass
from .gate_blocks import CacheSlot, GateBlocksPass
from .outline_blocks import OutlineBlocksPass

__all__ = ["AnnotateBlocksPass", "OutlineBlocksPass", "GateBlocksPass", "CacheSlot", "DEFAULT_PASSES"]

# Names, in order; bcc.lower builds instances with the caller's selection and mode.
DEFAULT_PASSES = (AnnotateBlocksPass, OutlineBlocksPass, GateBlocksPass)
