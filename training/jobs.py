"""Training jobs: launch `python -m training distill` as a subprocess, stop it, reap it, watch it. No Gradio.

`Jobs` runs one trainer at a time (by default) under a runs folder, each in its own process group
(stop sends SIGTERM to the group; the trainer then records "stopped"), and `view()` tells a run's
state, progress and ETA from its folder (`training.runs`). Who may launch is the app's business
(`dmd2/ui/auth.py`), not this module's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from training.config import CONFIGS, ConfigError, list_presets, load_config, overrides_from, preset_family
from training.launch_limits import LaunchRefused, check_launch
from training.runs import DAMAGED, FINAL_STATES, Run, RunError, list_runs, safe_run_dir

ROOT = Path(__file__).resolve().parents[1]
RUNS_ENV = "DMD2_RUNS"
DEFAULT_RUNS = Path("runs")
STOP_WAIT_S = 30.0                # close(): how long a stopped trainer gets before SIGKILL


class JobError(ValueError):
    """A launch, stop or resume that cannot be done; the message says why and what to do."""


def default_runs_root() -> Path:
    """Where runs go: $DMD2_RUNS, else runs/ (relative to the working directory)."""
    return Path(os.environ.get(RUNS_ENV) or DEFAULT_RUNS)


def training_records(records: list[dict]) -> list[dict]:
    """The loss lines of metrics.jsonl (quick-evaluation lines have no images_per_s)."""
    return [r for r in records if "images_per_s" in r and "step" in r and "seconds" in r]


def eta_seconds(records: list[dict], step: int, total: int) -> float | None:
    """Seconds left at the pace of the current session of the run; None until it can be told.

    The trainer's clock (`seconds`) restarts at 0 on a resume, so the pace comes from the records
    since the last restart: two of them, or one record of a run that started at step 0.
    """
    train = training_records(records)
    if not train or total <= 0:
        return None
    if step >= total:
        return 0.0
    first = len(train) - 1
    while first > 0 and train[first - 1]["seconds"] <= train[first]["seconds"] \
            and train[first - 1]["step"] < train[first]["step"]:
        first -= 1
    a, b = train[first], train[-1]
    if b["step"] > a["step"]:
        pace = (b["seconds"] - a["seconds"]) / (b["step"] - a["step"])
    elif first == 0 and b["step"] > 0:
        pace = b["seconds"] / b["step"]
    else:
        return None
    return max(0.0, pace * (total - step))


def trainer_alive(pid) -> bool:
    """Whether `pid` is still a trainer this app could have started: a live process leading its own group."""
    try:
        pid = int(pid)
        if pid <= 0 or os.getpgid(pid) != pid:
            return False
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.parent.is_dir():            # Linux: also check it is `python -m training distill`
            args = cmdline.read_bytes().split(b"\0")
            return b"training" in args and b"distill" in args
        return True
    except (OSError, ValueError, TypeError):
        return False


@dataclass
class _Process:
    """A trainer this supervisor started."""

    popen: subprocess.Popen
    started: float
    total: int                        # the run's iterations, shown before the trainer writes its status
    stop_requested: bool = False
    waiter: threading.Thread | None = field(default=None, repr=False)

    def alive(self) -> bool:
        return self.popen.poll() is None


class Jobs:
    """Launches, stops and watches distillation runs under `runs_root`, `max_running` trainers at a time.

    `on_resume(student_folder)` is called before a resumed run rewrites its student (the app drops
    its cached model there)."""

    def __init__(self, runs_root, configs: Path = CONFIGS, python: str = sys.executable, max_running: int = 1,
                 cuda: bool | None = None, on_resume=None):
        self.runs_root = Path(runs_root).resolve()
        self.configs = Path(configs)
        self.python = python
        self.max_running = max_running
        self.cuda = cuda
        self.on_resume = on_resume
        self._procs: dict[str, _Process] = {}
        self._lock = threading.RLock()

    # --- presets and run folders ----------------------------------------------------------
    def presets(self) -> list[str]:
        return list_presets(self.configs, self.cuda)

    def preset_path(self, preset: str) -> Path:
        if preset not in self.presets():
            raise JobError(f"unknown preset {preset!r}; choose one of: {', '.join(self.presets()) or 'none'}")
        return self.configs / f"{preset}.yaml"

    def preset_values(self, preset: str, keys) -> dict:
        """The values of config `keys` as the preset sets them."""
        cfg = load_config(self.preset_path(preset))
        return {key: getattr(cfg, key) for key in keys}

    def run_dir(self, name) -> Path:
        """runs_root/name; JobError for a name that is empty or could leave the runs folder."""
        if name is not None and not isinstance(name, str):
            raise JobError(f"the run name must be text, got {type(name).__name__} {name!r}")
        name = (name or "").strip()
        if not name:
            raise JobError("enter a run name (letters, digits, '.', '_' or '-')")
        try:
            return safe_run_dir(self.runs_root, name)
        except RunError as e:
            raise JobError(str(e)) from None

    def check(self, preset: str, settings: dict | None = None, extra: str = ""):
        """The config a launch would train (the trainer's own validation); JobError saying what is wrong."""
        try:
            overrides = overrides_from(settings, extra)
        except ConfigError as e:
            raise JobError(str(e)) from None
        try:
            cfg = load_config(self.preset_path(preset), overrides)
        except (ConfigError, TypeError) as e:
            raise JobError(f"bad setting: {e}") from None
        try:
            check_launch(cfg, self.runs_root, self.families())
        except LaunchRefused as e:
            raise JobError(f"bad setting: {e}") from None
        teacher = Path(cfg.teacher) if Path(cfg.teacher).is_absolute() else ROOT / cfg.teacher
        if cfg.family == "pixel" and not (teacher / "config.json").is_file():
            raise JobError(f"bad setting: teacher folder {cfg.teacher!r} has no config.json")
        if cfg.generator_init is not None:
            init = Path(cfg.generator_init) if Path(cfg.generator_init).is_absolute() else ROOT / cfg.generator_init
            if not (init / "config.json").is_file():
                raise JobError(f"bad setting: generator_init {cfg.generator_init!r} is not a student folder yet "
                               "(a stage preset starts from the stage before it: `make rebuild-4step` runs them in "
                               "order, or set generator_init)")
        return cfg, overrides

    def families(self) -> set[str]:
        """The families of the presets this app offers (a launch may not switch to another)."""
        return {preset_family(self.configs / f"{preset}.yaml") for preset in self.presets()}

    def run_names(self) -> list[str]:
        """The runs under runs_root, most recently changed first."""
        return [run.name for run in list_runs(self.runs_root)]

    # --- launch, stop, resume -------------------------------------------------------------
    def launch(self, preset: str, name: str, settings: dict | None = None, extra: str = "") -> dict:
        """Start `python -m training distill` for a new run; returns its view."""
        path = self.run_dir(name)
        cfg, overrides = self.check(preset, settings, extra)
        with self._lock:
            run = Run(path)
            if run.config_path.is_file() or run.status_path.is_file():
                raise JobError(f"run {path.name!r} already exists: pick another name, or select it and "
                               "press Resume")
            self._check_capacity()
            cmd = [self.python, "-m", "training", "distill", "--config", str(self.preset_path(preset)),
                   "--out", str(path)]
            for item in overrides:
                cmd += ["--set", item]
            self._start(run, cmd, cfg.iterations)
        return self.view(path.name)

    def resume(self, name: str) -> dict:
        """Continue a run from its last checkpoint (`--resume`, the run's own config.yaml)."""
        run = Run(self.run_dir(name))
        if not run.config_path.is_file():
            raise JobError(f"run {run.name!r} has no config.yaml to resume from")
        with self._lock:
            if self._running(run):
                raise JobError(f"run {run.name!r} is already running")
            self._check_capacity()
            if self.on_resume is not None:
                self.on_resume(str(run.student))
            self._start(run, [self.python, "-m", "training", "distill", "--out", str(run.path), "--resume"],
                        run.iterations())
        return self.view(run.name)

    def stop(self, name: str, wait_s: float = STOP_WAIT_S) -> dict:
        """SIGTERM to the run's process group; the trainer saves status 'stopped' and exits.

        Waits up to `wait_s` for the process to end, so a launch right after a stop is not refused.
        """
        run = Run(self.run_dir(name))
        with self._lock:
            proc = self._procs.get(run.name)
            owned = proc is not None and proc.alive()
            if owned:
                proc.stop_requested = True
                group = proc.popen.pid                    # start_new_session: the trainer leads its group
            else:
                # A trainer started by an earlier app process: its status names its pid.
                status = run.status()
                if status.get("state") != "running" or not trainer_alive(status.get("pid")):
                    raise JobError(f"run {run.name!r} is not running")
                group = int(status["pid"])
            try:
                os.killpg(group, signal.SIGTERM)
            except ProcessLookupError:
                pass                                      # it ended meanwhile
        if owned:
            try:
                proc.popen.wait(wait_s)
                proc.waiter.join(wait_s)                  # its final status is written
            except subprocess.TimeoutExpired:
                pass                                      # still saving: the view says "stopping"
        else:
            deadline = time.monotonic() + wait_s
            while trainer_alive(group) and time.monotonic() < deadline:
                time.sleep(0.1)
        return self.view(run.name)

    def close(self, wait_s: float = STOP_WAIT_S) -> None:
        """Stop every trainer this supervisor started (SIGTERM, then SIGKILL after `wait_s`)."""
        with self._lock:
            procs = [p for p in self._procs.values() if p.alive()]
            for p in procs:
                p.stop_requested = True
                try:
                    os.killpg(p.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in procs:
            try:
                p.popen.wait(wait_s)
            except subprocess.TimeoutExpired:
                os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait()
            if p.waiter is not None:
                p.waiter.join()

    def _running(self, run: Run) -> bool:
        proc = self._procs.get(run.name)
        if proc is not None:
            return proc.alive()
        status = run.status()
        return status.get("state") == "running" and trainer_alive(status.get("pid"))

    def _check_capacity(self) -> None:
        busy = [n for n, p in self._procs.items() if p.alive() and not self._exiting(n, p)]
        if len(busy) >= self.max_running:
            raise JobError(f"run {busy[0]!r} is still running: stop it or wait until it ends "
                           f"(this app trains {self.max_running} run(s) at a time)")

    def _exiting(self, name: str, proc: _Process, wait_s: float = 10.0) -> bool:
        """Whether a live trainer has already written its final state and exits within `wait_s`."""
        status = Run(self.runs_root / name).status()
        if status.get("state") not in FINAL_STATES or status.get("updated", 0) < proc.started:
            return False
        try:
            proc.popen.wait(wait_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _start(self, run: Run, cmd: list[str], total: int) -> None:
        run.path.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(run.log_path, "ab") as log:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
            log.flush()
            popen = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        proc = _Process(popen, time.time(), total)
        proc.waiter = threading.Thread(target=self._reap, args=(run, proc), daemon=True, name=f"trainer-{run.name}")
        self._procs[run.name] = proc
        proc.waiter.start()

    def _reap(self, run: Run, proc: _Process) -> None:
        """Wait for a trainer; if it died without saying so in status.json, say it there."""
        code = proc.popen.wait()
        with self._lock:
            status = run.status()
            if status.get("state") not in (None, "running") and status.get("updated", 0) >= proc.started:
                return                                    # the trainer wrote its own final state
            if proc.stop_requested:
                run.set_status("stopped", error=status.get("error") or "stopped before the trainer started")
            else:
                why = run.log_tail() or "no output"
                run.set_status("failed", error=f"the trainer exited with code {code}: {why}", pid=None)

    # --- watching -------------------------------------------------------------------------
    def view(self, name: str, with_eta: bool = True) -> dict:
        """A run as the tab shows it: state, step, total, percent, ETA (if `with_eta`), error, pid, loss lines."""
        run = Run(self.run_dir(name))
        if not run.path.is_dir():
            raise JobError(f"no run called {run.name!r}")
        status, damage = run.status(), run.damage()
        with self._lock:
            proc = self._procs.get(run.name)
            owned_alive = proc is not None and proc.alive()
            fresh = proc is not None and status.get("updated", 0) >= proc.started
        state = status.get("state")
        if damage and not owned_alive:
            state = DAMAGED                               # listed as such; its student is not served
        elif owned_alive and proc.stop_requested:
            state = "stopping"
        elif owned_alive and not fresh:
            state = "starting"                            # status.json is still the previous session's
        elif proc is not None and not owned_alive and (state in (None, "running") or not fresh):
            state = "ending"                              # the reaper is about to write the final state
        elif state == "running" and proc is None and not trainer_alive(status.get("pid")):
            state = "interrupted"                         # its process is gone: resume it
        elif state is None:
            state = "unknown"
        step = int(status.get("step") or 0) if fresh or proc is None else 0
        total = int(status.get("total_steps") or 0) if fresh or proc is None else proc.total
        if not total:
            total = run.iterations()
        records = run.metrics() if with_eta else []
        eta = eta_seconds(records, step, total) if state in ("running", "starting") else None
        return dict(name=run.name, state=state, step=step, total=total,
                    percent=round(100.0 * step / total, 1) if total else 0.0,
                    eta_s=None if eta is None else round(eta, 1),
                    error=damage or status.get("error"), pid=status.get("pid") if state == "running" else None,
                    updated=status.get("updated"), records=len(training_records(records)),
                    student=state == "finished" and run.has_student())

    def runs_table(self) -> list[list]:
        """Every run as a row: name, state, step, total, last update (UTC)."""
        rows = []
        for name in self.run_names():
            try:
                v = self.view(name, with_eta=False)
            except JobError:
                continue
            updated = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v["updated"])) if v["updated"] else ""
            rows.append([v["name"], v["state"], v["step"], v["total"], updated])
        return rows
