"""bcc — the block caching compiler for diffusion models.

``bcc.compile(model, schedule)`` rewrites a denoiser so that each cached block either
recomputes or reuses its output from an earlier step, as a step-indexed branch on a
schedule tensor inside one compiled graph.
"""
from .api import compile, find_blocks
from .calibrate import calibrate
from .config import BccConfig
from .errors import BccError, BccInternalError, ErrorCode
from .profile import ChangeProfile
from .runtime import BccModule
from .schedule import Schedule

__all__ = [
    "compile",
    "calibrate",
    "ChangeProfile",
    "find_blocks",
    "BccConfig",
    "BccError",
    "BccInternalError",
    "BccModule",
    "ErrorCode",
    "Schedule",
]
__version__ = "0.1.0"
