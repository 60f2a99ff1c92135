"""Atomic JSON files with a format name and version, and read-only JSON-like values."""
from __future__ import annotations

import json
import os
import tempfile
import types
from collections.abc import Mapping
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


def freeze(value: Any) -> Any:
    """A read-only deep copy of JSON-like data: dicts become read-only mappings, lists tuples.

    Frozen records (``Schedule.meta``, ``ChangeProfile.extra``) hold provenance given
    by the caller; copying it frozen means neither the caller's dict nor a reader can
    change a record after it was validated.

    Example:
        >>> m = freeze({"a": [1, {"b": 2}]})
        >>> m["a"]
        (1, mappingproxy({'b': 2}))
        >>> m["x"] = 1
        Traceback (most recent call last):
        ...
        TypeError: 'mappingproxy' object does not support item assignment
    """
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The plain, JSON-serialisable copy of :func:`freeze`'s output (mappings to dicts, tuples to lists).

    Example:
        >>> thaw(freeze({"a": [1, {"b": 2}]}))
        {'a': [1, {'b': 2}]}
    """
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value
