"""One error type for everything a user can cause, with stable codes.

Every message says what to do next. Internal invariant violations raise
:class:`BccInternalError` instead, which asks for a bug report.
"""
from __future__ import annotations

import enum

__all__ = ["BccError", "BccInternalError", "BccWarning", "ErrorCode"]


class ErrorCode(str, enum.Enum):
    """Stable codes; the README's error table lists them. Never renumber."""

    CONFIG_INVALID = "BCC001"
    SCHEDULE_SHAPE = "BCC101"
    SCHEDULE_DTYPE = "BCC102"
    SCHEDULE_FIRST_ROW = "BCC103"
    SCHEDULE_NAMES = "BCC104"
    SCHEDULE_MISMATCH = "BCC105"
    CAPTURE_FAILED = "BCC201"
    NO_BLOCKS = "BCC301"
    BLOCK_NOT_FOUND = "BCC302"
    BLOCK_NOT_REGION = "BCC303"
    BLOCK_MULTI_CALL = "BCC304"
    STEP_OVERFLOW = "BCC401"
    STEP_MISMATCH = "BCC402"
    SIGNATURE_CHANGED = "BCC403"
    STEP_UNTRACKED = "BCC404"
    PROFILE_MISMATCH = "BCC501"
    THRESHOLD_INVALID = "BCC502"
    BUDGET_UNREACHABLE = "BCC503"
    CALIBRATION_INVALID = "BCC504"
    SCALE_SHIFT_MISMATCH = "BCC505"
    NOTHING_TO_TRAIN = "BCC506"
    TRAINING_DIVERGED = "BCC507"
    FILE_INVALID = "BCC601"
    FILE_VERSION = "BCC602"
    BACKEND_OPTIONS = "BCC701"
    BACKEND_GRAPH = "BCC702"
    STATIC_SHAPE = "BCC703"
    ARTIFACT_MISMATCH = "BCC704"
    CUDA_GRAPHS_BRANCH = "BCC705"
    CONCURRENT_TRAJECTORY = "BCC801"


class BccError(Exception):
    """A failure the caller can fix; ``str(err)`` starts with ``[BCCnnn]``.

    Example:
        >>> try:
        ...     raise BccError(ErrorCode.NO_BLOCKS, "no block matched 'foo'. Pass blocks=[...].")
        ... except BccError as e:
        ...     (e.code.value, str(e)[:8])
        ('BCC301', '[BCC301]')
    """

    def __init__(self, code: ErrorCode, message: str):
        self.code = code
        self.message = message
        super().__init__(f"[{code.value}] {message}")


class BccWarning(UserWarning):
    """Something bcc handled conservatively that the caller may want to change (e.g. a
    block output whose residual base it cannot tell, cached whole instead). Filter it
    like any warning: ``warnings.simplefilter("error", BccWarning)`` makes it raise.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     warnings.warn("cached whole", BccWarning)
        >>> w[0].category.__name__
        'BccWarning'
    """


class BccInternalError(RuntimeError):
    """A broken invariant inside bcc, not the caller's fault."""

    def __init__(self, message: str):
        super().__init__(
            f"{message}\nThis is a bug in bcc; please report it with the model config "
            "and the bcc/torch versions."
        )
