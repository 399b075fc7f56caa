"""Run folders: config.yaml, metrics.jsonl, status.json, checkpoints/, samples/, student/.

The app's Train tab reads runs only through this module (and starts them as a subprocess); it checks
a launch's settings with `load_config`, re-exported here, so it validates exactly as the trainer does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from training.config import ConfigError, load_config  # noqa: F401 (re-exported for the app)

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RunError(RuntimeError):
    """A run folder is missing, unreadable, or its checkpoint is corrupt."""


def safe_run_dir(runs_root: str | Path, name: str) -> Path:
    """runs_root/name, refusing names that could escape runs_root."""
    if not RUN_NAME.match(name or "") or name in (".", ".."):
        raise RunError(f"bad run name {name!r}: use letters, digits, '.', '_' or '-' (max 64), no slashes")
    root = Path(runs_root).resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise RunError(f"run name {name!r} escapes the runs folder {root}")
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Run:
    """One run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # layout
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def student(self) -> Path:
        return self.path / "student"

    def create(self) -> "Run":
        for d in (self.path, self.checkpoints, self.samples):
            d.mkdir(parents=True, exist_ok=True)
        return self

    # status and metrics
    def set_status(self, state: str, **fields) -> None:
        """state: running / finished / failed / stopped; extra fields (step, error, pid...) are merged."""
        status = self.status()
        status.update(fields, state=state, updated=time.time())
        _atomic_write(self.status_path, json.dumps(status, indent=2) + "\n")

    def status(self) -> dict:
        try:
            return json.loads(self.status_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def log_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict]:
        """All metrics records (a partly written last line is skipped)."""
        if not self.metrics_path.is_file():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records past `after_step` (used on resume, so the log matches the restored state)."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= after_step]
        _atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    # checkpoints
    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoints, oldest first (a checkpoint is complete once its state.pt exists)."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.glob("step-*") if (p / "state.pt").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def save_checkpoint(self, step: int, state: dict, keep: int = 2) -> Path:
        """Write to a temporary folder, then rename: a kill mid-save never damages the last checkpoint."""
        final = self.checkpoints / f"step-{step:08d}"
        tmp = self.checkpoints / f".tmp-step-{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(state, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.checkpoint_dirs()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path | None = None) -> dict:
        """The latest (or given) checkpoint's state; a clear RunError if none or corrupt."""
        if path is None:
            dirs = self.checkpoint_dirs()
            if not dirs:
                raise RunError(f"no checkpoint to resume from in {self.checkpoints}")
            path = dirs[-1]
        try:
            return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for truncated or foreign files
            raise RunError(f"checkpoint {path / 'state.pt'} is corrupt or unreadable: {type(e).__name__}: {e}") from None


def list_runs(runs_root: str | Path) -> list[Run]:
    """Run folders under runs_root (those with a config.yaml), newest first."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    runs = [Run(p) for p in root.iterdir() if (p / "config.yaml").is_file()]
    return sorted(runs, key=lambda r: r.config_path.stat().st_mtime, reverse=True)
