"""Where an interrupted quality run continues: each finished phase of one configuration, kept on disk."""
from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["Resume", "SS_FILES"]

# What depends on the scale-shift training parameters, per row that trains one: its
# parameters file, its images, its speedup and its median keys (the rest of a configuration
# does not, and survives a change of them).
SS_FILES = {
    "cached_ss": ("scale_shift", "scale_shift.safetensors", ("bcc_ss", "plain_ss_run", "bcc_ss_run")),
    "planned_ss": ("planned_scale_shift", "planned_scale_shift.safetensors",
                   ("bcc_plan_ss", "plain_plan_ss_run", "bcc_plan_ss_run")),
}


class Resume:
    """What an interrupted run of one configuration already did (``--resume DIR``).

    A 50-step configuration takes hours on two cores, longer than one working session,
    so every finished phase (schedules, scale-shift, timings, each row's images per
    seed) is kept under ``DIR/<config>/`` and skipped on the next run with the same
    parameters. Other parameters start the configuration over.
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
            for row, (key, params_file, medians) in SS_FILES.items():
                for f in [self.dir / params_file, *self.dir.glob(f"{row}_seed*.pt")]:
                    f.unlink(missing_ok=True)
                old.pop(key, None)
                timing.get("speedup", {}).pop(row, None)
                for k in medians:
                    timing.get("median_seconds", {}).pop(k, None)
            timing.pop("overhead", None)
            timing.pop("overhead_planned", None)
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
