"""bcc — the block caching compiler for diffusion models.

``bcc.compile(model, schedule)`` rewrites a denoiser so that each cached block either
recomputes or reuses its output from an earlier step, as a step-indexed branch on a
schedule tensor inside one compiled graph. ``bcc.compile(pipe, bcc.Plan(profile,
budget=0.6))`` does it for a whole diffusers pipeline, whose scheduler then says the
step of every denoiser call, at any step count.
"""
from bcc.api import compile, find_blocks
from bcc.analyze.regions import region, unet_branch
from bcc.lower.backend import _register as _register_backend
from bcc.plan.calibrate_pipeline import calibrate
from bcc.plan.budget import Plan
from bcc.plan.cost import CostModel
from bcc.plan.search import SearchResult, search_schedule
from bcc.config import BccConfig
from bcc.scale_shift.train import train_scale_shift
from bcc.errors import BccError, BccInternalError, ErrorCode
from bcc.lower.export import ExportedDenoiser, export, load_exported, save_exported
from bcc.plan.profile import ChangeProfile
from bcc.runtime.module import BccModule
from bcc.lower.stepper import CallCounter, StepRef, TrajectoryMarker
from bcc.scale_shift.params import ScaleShift
from bcc.plan.schedule import Schedule

__all__ = [
    "compile",
    "export",
    "save_exported",
    "load_exported",
    "ExportedDenoiser",
    "calibrate",
    "ChangeProfile",
    "find_blocks",
    "region",
    "unet_branch",
    "BccConfig",
    "BccError",
    "BccInternalError",
    "BccModule",
    "StepRef",
    "CallCounter",
    "ErrorCode",
    "Schedule",
    "Plan",
    "CostModel",
    "SearchResult",
    "search_schedule",
    "TrajectoryMarker",
    "ScaleShift",
    "train_scale_shift",
]
__version__ = "0.1.0"

_register_backend()  # backend="bcc" from a source checkout; installs use the entry point
