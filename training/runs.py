"""Run folders: the only code that knows their layout and states.

    runs/NAME/config.yaml       the config in force (config.before-step-N.yaml: one a resume replaced)
             metrics.jsonl      one JSON object per logged step or quick evaluation
             status.json        {"state": running | finished | stopped | failed, "step", "total_steps", "error", "pid", ...}
             train.log          the trainer's stdout and stderr when the app started it
             checkpoints/step-N/state.pt   (checkpoint_format: sharded: + dcp/, every rank's DCP shards)
             samples/latest.png (and samples/step-N.png)
             student/           a finished run's student: dmd2.json + a diffusers UNet (config.json) or a LoRA file

The trainer writes runs through `Run`; `dmd2 push`, export, the job supervisor (`training.jobs`) and the
app read them through it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
import yaml

from dmd2.families.base import ModelLoadError
from dmd2.families.lora import student_lora_file

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STATES = ("running", "finished", "stopped", "failed")   # what status.json may say; no file: not started yet
DAMAGED = "damaged"                                     # a status.json that cannot be read (Run.damage says why)
STATUS_FIELDS = {"step": (int,), "total_steps": (int,), "updated": (float, int), "started": (float, int),
                 "pid": (int,), "error": (str,)}       # their types when present (None is allowed)
FINAL_STATES = ("finished", "stopped", "failed")
SHARDS = "dcp"                                          # a sharded checkpoint's DCP folder, beside its state.pt


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
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")     # one per process: ranks may write at once
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
    def log_path(self) -> Path:
        return self.path / "train.log"

    @property
    def latest_sample(self) -> Path:
        return self.samples / "latest.png"

    def sample_path(self, step: int) -> Path:
        """The sample grid saved at iteration `step`."""
        return self.samples / f"step-{step:08d}.png"

    def keep_config_before(self, step: int) -> Path:
        """Move config.yaml aside as config.before-step-N.yaml (a resume that changes values writes a new one)."""
        kept = self.path / f"config.before-step-{step}.yaml"
        self.config_path.rename(kept)
        return kept

    def config_in_force(self, step: int) -> Path:
        """The config a checkpoint of iteration `step` was trained with: the earliest config.before-step-N.yaml
        with N >= step, else config.yaml."""
        earlier = sorted((int(p.stem.rsplit("-", 1)[-1]), p) for p in self.path.glob("config.before-step-*.yaml")
                         if p.stem.rsplit("-", 1)[-1].isdigit())
        return next((p for n, p in earlier if step <= n), self.config_path)

    @property
    def student(self) -> Path:
        return self.path / "student"

    @property
    def name(self) -> str:
        return self.path.name

    def exists(self) -> bool:
        """Whether this folder holds a run (a config, a status or a log: a run the app started may have only its log)."""
        return any(p.exists() for p in (self.config_path, self.status_path, self.log_path))   # a damaged one too

    def changed(self) -> float:
        """When the run's config, status or log last changed (0 if none exists)."""
        return max((p.stat().st_mtime for p in (self.config_path, self.status_path, self.log_path) if p.exists()),
                   default=0.0)

    def iterations(self) -> int:
        """The run's total iterations from its config.yaml (0 if unreadable; `steps` in configs from before the rename)."""
        try:
            cfg = yaml.safe_load(self.config_path.read_text()) or {}
            return int(cfg.get("iterations") or cfg.get("steps") or 0)
        except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError, TypeError, ValueError):
            return 0

    def has_student(self) -> bool:
        """Whether student/ holds a complete student: dmd2.json and its weights (a diffusers UNet's config.json
        and weights, or the LoRA file dmd2.json names)."""
        try:
            meta = json.loads((self.student / "dmd2.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        if not isinstance(meta, dict):
            return False
        if (self.student / "config.json").is_file():
            return any(self.student.glob("diffusion_pytorch_model.*"))
        try:
            return student_lora_file(self.student).is_file()      # the registry's own rule for a LoRA folder
        except ModelLoadError:
            return False

    def is_finished(self) -> bool:
        """Finished, with its student exported: what Compare, the Arena and `dmd2 push` take."""
        return self.state() == "finished" and self.has_student()

    def log_tail(self, lines: int = 6, chars: int = 1500) -> str:
        """The end of train.log: its last 'error: ...' line if any, else its last lines ('' if none)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        kept = [line for line in text.splitlines() if line.strip()]
        errors = [line for line in kept if line.startswith("error: ")]
        return (errors[-1] if errors else "\n".join(kept[-lines:]))[-chars:]

    def create(self) -> "Run":
        for d in (self.path, self.checkpoints, self.samples):
            d.mkdir(parents=True, exist_ok=True)
        return self

    # status and metrics
    def set_status(self, state: str, **fields) -> None:
        """Write status.json (atomically): `state` is one of STATES; extra fields (step, error, pid...) are merged."""
        if state not in STATES:
            raise ValueError(f"run state {state!r} is not one of {', '.join(STATES)}")
        status = self.status()                             # a damaged status is replaced, not merged
        status.update(fields, state=state, updated=time.time())
        if self.status_path.is_dir():
            raise RunError(f"cannot write {self.status_path}: it is a folder; remove it")
        _atomic_write(self.status_path, json.dumps(status, indent=2) + "\n")

    def _read_status(self) -> tuple[dict, str | None]:
        """(status, None) when status.json is missing or sound; ({}, why) when it is damaged."""
        if not self.status_path.exists():
            return {}, None
        try:
            status = json.loads(self.status_path.read_text())
        except IsADirectoryError:
            return {}, "status.json is a folder, not a file"
        except UnicodeDecodeError:
            return {}, "status.json is not UTF-8 text"
        except json.JSONDecodeError as e:
            return {}, f"status.json is not valid JSON ({e.msg}, line {e.lineno})"
        except OSError as e:
            return {}, f"status.json cannot be read ({type(e).__name__}: {e.strerror or e})"
        if not isinstance(status, dict):
            return {}, f"status.json holds a JSON {type(status).__name__}, not an object"
        if status.get("state") not in STATES:
            return {}, f"status.json's state {status.get('state')!r} is not one of {', '.join(STATES)}"
        for key, kinds in STATUS_FIELDS.items():
            value = status.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
                return {}, f"status.json's {key!r} is {value!r}, not a {kinds[0].__name__}"
        return status, None

    def status(self) -> dict:
        """status.json as a dict; {} when it is missing or damaged (`damage()` says why). Never raises."""
        return self._read_status()[0]

    def damage(self) -> str | None:
        """Why status.json cannot be trusted (not a file, not UTF-8, not JSON, not an object, a field of the
        wrong type), or None when it is missing or sound."""
        return self._read_status()[1]

    def state(self) -> str | None:
        """The state status.json records, "damaged" when it cannot be read, None before the trainer wrote it."""
        status, why = self._read_status()
        return DAMAGED if why else status.get("state")

    def log_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict]:
        """All metrics records (a partly written last line, or a line that is not an object, is skipped)."""
        if not self.metrics_path.is_file():
            return []
        out = []
        try:
            text = self.metrics_path.read_text(errors="replace")
        except OSError:
            return []
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step", 0), int) and all(
                    isinstance(record.get(k, 0), (int, float)) for k in ("seconds", "images_per_s")):
                out.append(record)                         # lines that are not a record are skipped
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
        found = [p for p in self.checkpoints.glob("step-*")
                 if p.name[5:].isdigit() and (p / "state.pt").is_file()]      # a stray step-foo/ is not one
        return sorted(found, key=lambda p: int(p.name[5:]))

    def checkpoint_steps(self) -> dict[int, Path]:
        """Iteration -> folder of each complete checkpoint, oldest first."""
        return {int(p.name[5:]): p for p in self.checkpoint_dirs()}

    def save_checkpoint(self, step: int, state: dict, keep: int = 2, shards: dict | None = None, main: bool = True,
                        barrier=None) -> Path:
        """Write to a temporary folder, then rename: a kill mid-save never damages the last checkpoint.

        shards (checkpoint_format: sharded): every rank calls this with its own shards, which it writes into
        dcp/ (torch.distributed.checkpoint; no gather), `main` marks the one process that writes state.pt
        (the rest of the state), renames and prunes; `barrier` waits for all ranks. Without shards only the
        main process calls it, with the full state.
        """
        final = self.checkpoints / f"step-{step:08d}"
        tmp = self.checkpoints / f".tmp-step-{step:08d}"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if shards is not None:
            if barrier:
                barrier()  # the folder exists (and holds nothing stale) before any rank writes into it
            from training.sharding import write_shards

            write_shards(shards, tmp / SHARDS)
            if barrier:
                barrier()
        if not main:
            return final
        torch.save(state, tmp / "state.pt")  # last: a checkpoint is complete once its state.pt exists
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.checkpoint_dirs()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def read_shards(path: Path, template: dict) -> None:
        """Fill `template` (this rank's tensors) from the sharded checkpoint `path`'s dcp/ folder."""
        from training.sharding import read_shards

        if not (path / SHARDS / ".metadata").is_file():
            raise RunError(f"checkpoint {path} is sharded but {path / SHARDS} holds no complete DCP checkpoint")
        read_shards(template, path / SHARDS)

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
    """The runs under runs_root (folders holding a config, a status or a log), most recently changed first."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    runs = [Run(p) for p in root.iterdir() if p.is_dir() and Run(p).exists()]
    return sorted(runs, key=lambda r: (r.changed(), r.name), reverse=True)


def finished_students(runs_root: str | Path) -> list[str]:
    """Student folders of the finished runs under runs_root (full UNet or LoRA), sorted by run name.

    Read per call, so a run that finishes while the app is up shows up on the next request."""
    return sorted(str(r.student) for r in list_runs(runs_root) if r.is_finished())
