"""bcc — the block caching compiler for diffusion models.

``bcc.compile(model, schedule)`` rewrites a denoiser so that each cached block either
recomputes or reuses its output from an earlier step, as a step-indexed branch on a
schedule tensor inside one compiled graph.
"""
from .api import compile, find_blocks
from .backend import _register as _register_backend
from .calibrate import calibrate
from .config import BccConfig
from .distill import train_scale_shift
from .errors import BccError, BccInternalError, ErrorCode
# After .backend: binds the name bcc.export to the function, not the submodule.
from .export import ExportedDenoiser, export, load_exported, save_exported
from .profile import ChangeProfile
from .runtime import BccModule
from .scale_shift import ScaleShift
from .schedule import Schedule

__all__ = [
    "compile",
    "export",
    "save_exported",
    "load_exported",
    "ExportedDenoiser",
    "calibrate",
    "ChangeProfile",
    "find_blocks",
    "BccConfig",
    "BccError",
    "BccInternalError",
    "BccModule",
    "ErrorCode",
    "Schedule",
    "ScaleShift",
    "train_scale_shift",
]
__version__ = "0.1.0"

_register_backend()  # backend="bcc" from a source checkout; installs use the entry point
