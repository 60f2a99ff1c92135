"""Atomic JSON files with a format name and version."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bcc.errors import BccError, ErrorCode


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` so that a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_json(path: str | os.PathLike, fmt: str, version: int) -> dict[str, Any]:
    """Read a file written by :func:`write_json`, checking its format and version."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise BccError(ErrorCode.FILE_INVALID, f"{path} does not exist; check the path.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BccError(
            ErrorCode.FILE_INVALID,
            f"{path} is not a valid {fmt} file (truncated or corrupted: {e}). Recreate it.",
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise BccError(ErrorCode.FILE_INVALID, f"{path} is not a {fmt} file (format={payload.get('format') if isinstance(payload, dict) else None!r}).")
    if payload.get("version") != version:
        raise BccError(
            ErrorCode.FILE_VERSION,
            f"{path} has {fmt} format version {payload.get('version')!r}; this bcc reads version {version}. "
            "Recreate the file with this version of bcc.",
        )
    return payload
