"""Where an interrupted quality run continues: each finished phase of one configuration, kept on disk."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Resume", "SS_ROWS", "ScaleShiftRow"]


@dataclass(frozen=True)
class ScaleShiftRow:
    """What a row with trained scale-shift keeps, all of which depends on the training
    parameters (the rest of a configuration does not, and survives a change of them).

    Attributes:
        record: the state (and result) key of its training record.
        params_file: its parameters, in the configuration's folder.
        median: its median trajectory time's key.
        uncorrected: the timing key of the same schedule without scale-shift.
        plain_median, base_median: the keys of the plain and uncorrected models' medians
            when the row is timed again on its own (a resumed run with new parameters).
        overhead: the timing key of its time relative to the uncorrected schedule.
    """

    record: str
    params_file: str
    median: str
    uncorrected: str
    plain_median: str
    base_median: str
    overhead: str


SS_ROWS = {
    "cached_ss": ScaleShiftRow("scale_shift", "scale_shift.safetensors", "bcc_ss", "bcc", "plain_ss_run",
                               "bcc_ss_run", "overhead"),
    "planned_ss": ScaleShiftRow("planned_scale_shift", "planned_scale_shift.safetensors", "bcc_plan_ss", "bcc_plan",
                                "plain_plan_ss_run", "bcc_plan_ss_run", "overhead_planned"),
}


class Resume:
    """What an interrupted run of one configuration already did (``--resume DIR``).

    A 50-step configuration takes hours on two cores, longer than one working session,
    so every finished phase (schedules, scale-shift, timings, each row's images per
    seed) is kept under ``DIR/<config>/`` and skipped on the next run with the same
    parameters. Other parameters start the configuration over.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> Resume(root, "unet_ddim50", {"n": 10}).put("timing", {"speedup": {"planned": 1.4}})
        >>> Resume(root, "unet_ddim50", {"n": 10}).get("timing")
        {'speedup': {'planned': 1.4}}
        >>> Resume(root, "unet_ddim50", {"n": 20}).get("timing") is None  # another experiment
        True
    """

    def __init__(self, root: str | Path | None, key: str, params: dict, ss_params: dict | None = None):
        self.dir = None if root is None else Path(root) / key
        self.state: dict = {}
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        state = self.dir / "state.json"
        old = json.loads(state.read_text()) if state.exists() else {}
        if isinstance(old.get("params", {}).get("ss"), list):  # written before scale-shift had its own key
            it, kind, loss, groups, guided = old["params"].pop("ss")
            old["ss_params"] = {"iterations": it, "kind": kind, "loss": loss, "groups": groups, "guided": guided,
                                "lr": 5e-3}
        if old.get("params") != params:
            for f in self.dir.iterdir():
                f.unlink()
            old = {"params": params}
        elif old.get("ss_params") != ss_params:
            # Only the scale-shift row depends on these: the schedules, the other rows'
            # images and their timings stay.
            timing = old.get("timing") or {}
            for row, kept in SS_ROWS.items():
                for f in [self.dir / kept.params_file, *self.dir.glob(f"{row}_seed*.pt")]:
                    f.unlink(missing_ok=True)
                old.pop(kept.record, None)
                timing.get("speedup", {}).pop(row, None)
                for k in (kept.median, kept.plain_median, kept.base_median):
                    timing.get("median_seconds", {}).pop(k, None)
                timing.pop(kept.overhead, None)
        old["ss_params"] = ss_params
        self.state = old
        self._write()

    def _write(self) -> None:
        if self.dir is not None:
            tmp = self.dir / ".state.json.tmp"
            tmp.write_text(json.dumps(self.state, indent=1, default=str))
            tmp.replace(self.dir / "state.json")

    def get(self, name: str):
        return self.state.get(name)

    def put(self, name: str, value) -> None:
        self.state[name] = value
        self._write()

    def file(self, name: str) -> Path | None:
        """``DIR/<config>/name`` if an earlier run wrote it, else None."""
        return self.dir / name if self.dir is not None and (self.dir / name).exists() else None

    def keep(self, name: str) -> Path | None:
        return None if self.dir is None else self.dir / name

    def images(self, name: str, make) -> torch.Tensor:
        if (f := self.file(name)) is not None:
            return torch.load(f)
        imgs = make()
        if self.dir is not None:
            torch.save(imgs, self.dir / f".{name}.tmp")
            (self.dir / f".{name}.tmp").replace(self.dir / name)
        return imgs
