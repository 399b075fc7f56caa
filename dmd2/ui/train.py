"""Train tab: launch `python -m training distill` from a preset, watch it, stop it, resume it.

The pure part is `TrainManager`: presets, the admin-token check, one subprocess per run in its
own process group (Stop sends SIGTERM to the group; the trainer then writes status "stopped"),
and `view()`, a run's state, progress, ETA and losses read from its folder. The tab polls
`view()` with a gr.Timer. The app never trains in its own process: it reads run folders through
`training.runs`, checks the knobs with the trainer's own `load_config` (re-exported by `training.runs`) before
launching, and starts the trainer as `python -m training distill --config ... --out ... --set ...`.

Endpoints for gradio_client: `/train_launch`, `/train_stop`, `/train_resume` (each needs the
admin token when DMD2_ADMIN_TOKEN is set), `/train_status` and `/train_runs`.
"""

# No `from __future__ import annotations`: gr.api reads the endpoints' type hints at run time.

import hmac
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from dmd2 import registry

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
RUNS_ENV = "DMD2_RUNS"
TOKEN_ENV = "DMD2_ADMIN_TOKEN"
DEFAULT_RUNS = Path("runs")
LOG_NAME = "train.log"            # the trainer's stdout and stderr, in its run folder
POLL_S = 2.0                      # the tab's refresh period
STOP_WAIT_S = 30.0                # close(): how long a stopped trainer gets before SIGKILL
# The form's knobs: config key, label, kind ("int", "float" or "bool").
KNOBS = (
    ("iterations", "Iterations (critic updates)", "int"),
    ("batch_size", "Batch size", "int"),
    ("ttur", "TTUR: critic updates per generator update", "int"),
    ("generator_lr", "Generator learning rate", "float"),
    ("critic_lr", "Critic (fake score) learning rate", "float"),
    ("gan_generator_weight", "GAN weight, generator", "float"),
    ("gan_critic_weight", "GAN weight, critic", "float"),
    ("backward_simulation", "Backward simulation (multi-step students)", "bool"),
)
LOSS_PREFIXES = ("generator/", "critic/")
NOT_LOSSES = ("grad_norm", "lr")
RUN_COLUMNS = ["Run", "State", "Step", "Of", "Updated (UTC)"]
FINAL_STATES = ("finished", "failed", "stopped")


MAX_WRONG_TOKENS = 5   # wrong admin tokens allowed per LOCKOUT_S window; then every attempt is refused
LOCKOUT_S = 60.0


class TrainError(ValueError):
    """A launch, stop or resume that cannot be done; the message says why and what to do."""


class NotAllowed(TrainError):
    """The admin token is missing or wrong, or training is disabled on a public app."""


def default_runs_root() -> Path:
    """Where runs go: $DMD2_RUNS, else runs/ (relative to the working directory)."""
    return Path(os.environ.get(RUNS_ENV) or DEFAULT_RUNS)


LOOPBACK_HOSTS = ("localhost", "::1")


def is_public(share: bool = False, host: Optional[str] = None) -> bool:
    """Whether others may reach the app: --share, a Hugging Face Space ($SPACE_ID), or a --host that is
    not a loopback address (0.0.0.0 serves every network the machine is on)."""
    if share or os.environ.get("SPACE_ID"):
        return True
    if host is None:
        return False
    host = host.strip().strip("[]").lower()
    return not (host in LOOPBACK_HOSTS or host.startswith("127."))


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def list_presets(configs: Path = CONFIGS, cuda: Optional[bool] = None) -> list[str]:
    """Preset names (configs/<name>.yaml); presets of GPU families (SDXL, SD1.5) only when CUDA is available."""
    import yaml

    cuda = cuda_available() if cuda is None else cuda
    names = []
    for path in sorted(Path(configs).glob("*.yaml")):
        try:
            family = (yaml.safe_load(path.read_text()) or {}).get("family", "pixel")
        except (yaml.YAMLError, AttributeError):
            continue                      # not a distillation preset (e.g. an accelerate config)
        if (family == "pixel" and "sdxl" not in path.stem) or cuda:
            names.append(path.stem)
    return names


def overrides_from(settings: Optional[dict] = None, extra: str = "") -> list[str]:
    """`--set` values: `key=value` for each setting (None skipped), then the `extra` lines as typed.

    Values are written so the trainer's YAML parsing reads them back as given: booleans as
    true/false, strings quoted, whole floats for integer knobs as integers (a browser number box
    sends 4.0 for 4). Blank lines and lines starting with # in `extra` are ignored.
    """
    kinds = {key: kind for key, _, kind in KNOBS}
    out = []
    for key, value in (settings or {}).items():
        if value is None:
            continue
        if kinds.get(key) == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = json.dumps(value)
        out.append(f"{key}={text}")
    for line in (extra or "").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            if "=" not in line:
                raise TrainError(f"other config values: {line!r} must look like key=value")
            out.append(line)
    return out


def format_duration(seconds: float) -> str:
    """'45 s', '2 min 05 s', '1 h 03 min'."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def training_records(records: list[dict]) -> list[dict]:
    """The loss lines of metrics.jsonl (quick-evaluation lines have no images_per_s)."""
    return [r for r in records if "images_per_s" in r and "step" in r and "seconds" in r]


def eta_seconds(records: list[dict], step: int, total: int) -> Optional[float]:
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


def loss_frame(records: list[dict]):
    """Loss curves as a long table for gr.LinePlot: columns step, value, loss."""
    import pandas as pd

    rows = [(r["step"], float(v), k) for r in training_records(records) for k, v in r.items()
            if k.startswith(LOSS_PREFIXES) and not k.endswith(NOT_LOSSES)
            and isinstance(v, (int, float)) and math.isfinite(v)]
    return pd.DataFrame(rows, columns=["step", "value", "loss"])


def _tail(path: Path, lines: int = 6, chars: int = 1500) -> str:
    """The end of a log file: its last 'error: ...' line if any, else its last lines."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [l for l in text.splitlines() if l.strip()]
    errors = [l for l in kept if l.startswith("error: ")]
    return (errors[-1] if errors else "\n".join(kept[-lines:]))[-chars:]


def _trainer_alive(pid) -> bool:
    """Whether `pid` is still a trainer this app could have started: a live process leading its own group."""
    try:
        pid = int(pid)
        if pid <= 0 or os.getpgid(pid) != pid:
            return False
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.parent.is_dir():            # Linux: also check it is `python -m training`
            args = cmdline.read_bytes().split(b"\0")
            return b"training" in args and b"distill" in args
        return True
    except (OSError, ValueError, TypeError):
        return False


def _config_steps(path: Path) -> int:
    """`iterations` of a run's config.yaml (0 if unreadable; `steps` in a config written before the rename)."""
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text()) or {}
        return int(cfg.get("iterations") or cfg.get("steps") or 0)
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return 0


@dataclass
class _Process:
    """A trainer this app started."""

    popen: subprocess.Popen
    started: float
    total: int                        # the run's steps, shown before the trainer writes its status
    stop_requested: bool = False
    waiter: Optional[threading.Thread] = field(default=None, repr=False)

    def alive(self) -> bool:
        return self.popen.poll() is None


class TrainManager:
    """Launches, stops and watches distillation runs under `runs_root`, one trainer at a time.

    `admin_token`: when set, launch / stop / resume need it (constant-time compare). `public`:
    the app is reachable from the internet; then training is refused unless a token is set.
    """

    def __init__(self, runs_root, configs: Path = CONFIGS, admin_token: Optional[str] = None,
                 public: bool = False, python: str = sys.executable, max_running: int = 1,
                 cuda: Optional[bool] = None, clock=time.monotonic):
        self.runs_root = Path(runs_root).resolve()
        self.configs = Path(configs)
        self.admin_token = admin_token or None            # an empty token would be no protection
        self.public = public
        self.python = python
        self.max_running = max_running
        self.cuda = cuda
        self._procs: dict[str, _Process] = {}
        self._lock = threading.RLock()
        self._clock = clock
        self._failures: list[float] = []                  # times of recent wrong tokens (lockout)

    # --- who may train ----------------------------------------------------------------------
    @property
    def token_required(self) -> bool:
        return self.admin_token is not None

    def refusal(self) -> Optional[str]:
        """Why training is disabled on this app, or None."""
        if self.public and self.admin_token is None:
            return (f"Training is disabled: this app is public (--share, a Hugging Face Space or a network "
                    f"--host such as 0.0.0.0) and no "
                    f"admin token is configured. Set {TOKEN_ENV} on the server to enable it.")
        return None

    def authorize(self, token: Optional[str]) -> None:
        """NotAllowed unless this caller may launch, stop or resume runs."""
        refusal = self.refusal()
        if refusal:
            raise NotAllowed(refusal)
        if self.admin_token is None:
            return
        if not token:
            raise NotAllowed("This app needs the admin token to launch, stop or resume runs: "
                             "enter it in the Admin token box.")
        with self._lock:
            now = self._clock()
            self._failures = [f for f in self._failures if now - f < LOCKOUT_S]
            if len(self._failures) >= MAX_WRONG_TOKENS:
                wait = LOCKOUT_S - (now - self._failures[0])
                raise NotAllowed(f"Too many wrong admin tokens ({MAX_WRONG_TOKENS} in {LOCKOUT_S:.0f} s): "
                                 f"try again in {wait:.0f} s.")
            if not hmac.compare_digest(str(token).encode(), self.admin_token.encode()):
                self._failures.append(now)
                raise NotAllowed("Wrong admin token.")

    # --- presets and run folders ----------------------------------------------------------
    def presets(self) -> list[str]:
        return list_presets(self.configs, self.cuda)

    def preset_path(self, preset: str) -> Path:
        if preset not in self.presets():
            raise TrainError(f"unknown preset {preset!r}; choose one of: {', '.join(self.presets()) or 'none'}")
        return self.configs / f"{preset}.yaml"

    def preset_values(self, preset: str) -> dict:
        """The form's knobs as the preset sets them."""
        from training.runs import load_config

        cfg = load_config(self.preset_path(preset))
        return {key: getattr(cfg, key) for key, _, _ in KNOBS}

    def run_dir(self, name) -> Path:
        """runs_root/name; TrainError for a name that is empty or could leave the runs folder."""
        from training.runs import RunError, safe_run_dir

        name = (name or "").strip() if isinstance(name, str) else name
        if not name:
            raise TrainError("enter a run name (letters, digits, '.', '_' or '-')")
        try:
            return safe_run_dir(self.runs_root, name)
        except RunError as e:
            raise TrainError(str(e)) from None

    def check(self, preset: str, settings: Optional[dict] = None, extra: str = ""):
        """The config a launch would train (the trainer's own validation); TrainError saying what is wrong."""
        from training.runs import ConfigError, load_config

        overrides = overrides_from(settings, extra)
        try:
            cfg = load_config(self.preset_path(preset), overrides)
        except (ConfigError, TypeError) as e:
            raise TrainError(f"bad setting: {e}") from None
        teacher = Path(cfg.teacher) if Path(cfg.teacher).is_absolute() else ROOT / cfg.teacher
        if cfg.family == "pixel" and not (teacher / "config.json").is_file():
            raise TrainError(f"bad setting: teacher folder {cfg.teacher!r} has no config.json")
        return cfg, overrides

    def run_names(self) -> list[str]:
        """Run folders (config, status or log present), newest first."""
        if not self.runs_root.is_dir():
            return []
        marks = ("status.json", "config.yaml", LOG_NAME)

        def changed(p: Path) -> float:
            return max((p / m).stat().st_mtime for m in marks if (p / m).exists())
        runs = [p for p in self.runs_root.iterdir() if p.is_dir() and any((p / m).exists() for m in marks)]
        return [p.name for p in sorted(runs, key=changed, reverse=True)]

    # --- launch, stop, resume -------------------------------------------------------------
    def launch(self, preset: str, name: str, settings: Optional[dict] = None, extra: str = "",
               token: Optional[str] = None) -> dict:
        """Start `python -m training distill` for a new run; returns its view."""
        self.authorize(token)
        path = self.run_dir(name)
        cfg, overrides = self.check(preset, settings, extra)
        with self._lock:
            if (path / "config.yaml").is_file() or (path / "status.json").is_file():
                raise TrainError(f"run {path.name!r} already exists: pick another name, or select it and "
                                 "press Resume")
            self._check_capacity()
            cmd = [self.python, "-m", "training", "distill", "--config", str(self.preset_path(preset)),
                   "--out", str(path)]
            for item in overrides:
                cmd += ["--set", item]
            self._start(path, cmd, cfg.iterations)
        return self.view(path.name)

    def resume(self, name: str, token: Optional[str] = None) -> dict:
        """Continue a run from its last checkpoint (`--resume`, the run's own config.yaml)."""
        from training.runs import Run

        self.authorize(token)
        path = self.run_dir(name)
        run = Run(path)
        if not run.config_path.is_file():
            raise TrainError(f"run {path.name!r} has no config.yaml to resume from")
        total = _config_steps(run.config_path)
        with self._lock:
            if self._running(path.name):
                raise TrainError(f"run {path.name!r} is already running")
            self._check_capacity()
            registry.forget(str(run.student))             # the resumed run rewrites its student
            self._start(path, [self.python, "-m", "training", "distill", "--out", str(path), "--resume"], total)
        return self.view(path.name)

    def stop(self, name: str, token: Optional[str] = None, wait_s: float = STOP_WAIT_S) -> dict:
        """SIGTERM to the run's process group; the trainer saves status 'stopped' and exits.

        Waits up to `wait_s` for the process to end, so a launch right after a stop is not refused.
        """
        from training.runs import Run

        self.authorize(token)
        path = self.run_dir(name)
        with self._lock:
            proc = self._procs.get(path.name)
            owned = proc is not None and proc.alive()
            if owned:
                proc.stop_requested = True
                group = proc.popen.pid                    # start_new_session: the trainer leads its group
            else:
                # A trainer started by an earlier app process: its status names its pid.
                status = Run(path).status()
                if status.get("state") != "running" or not _trainer_alive(status.get("pid")):
                    raise TrainError(f"run {path.name!r} is not running")
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
            while _trainer_alive(group) and time.monotonic() < deadline:
                time.sleep(0.1)
        return self.view(path.name)

    def close(self, wait_s: float = STOP_WAIT_S) -> None:
        """Stop every trainer this manager started (SIGTERM, then SIGKILL after `wait_s`)."""
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

    def _running(self, name: str) -> bool:
        proc = self._procs.get(name)
        if proc is not None:
            return proc.alive()
        from training.runs import Run

        status = Run(self.runs_root / name).status()
        return status.get("state") == "running" and _trainer_alive(status.get("pid"))

    def _check_capacity(self) -> None:
        busy = [n for n, p in self._procs.items() if p.alive()]
        if len(busy) >= self.max_running:
            raise TrainError(f"run {busy[0]!r} is still running: stop it or wait until it ends "
                             f"(this app trains {self.max_running} run(s) at a time)")

    def _start(self, path: Path, cmd: list[str], total: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(path / LOG_NAME, "ab") as log:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
            log.flush()
            popen = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        proc = _Process(popen, time.time(), total)
        proc.waiter = threading.Thread(target=self._reap, args=(path.name, proc), daemon=True,
                                       name=f"trainer-{path.name}")
        self._procs[path.name] = proc
        proc.waiter.start()

    def _reap(self, name: str, proc: _Process) -> None:
        """Wait for a trainer; if it died without saying so in status.json, say it there."""
        code = proc.popen.wait()
        from training.runs import Run

        with self._lock:
            run = Run(self.runs_root / name)
            status = run.status()
            if status.get("state") not in (None, "running") and status.get("updated", 0) >= proc.started:
                return                                    # the trainer wrote its own final state
            if proc.stop_requested:
                run.set_status("stopped", error=status.get("error") or "stopped before the trainer started")
            else:
                why = _tail(run.path / LOG_NAME) or "no output"
                run.set_status("failed", error=f"the trainer exited with code {code}: {why}", pid=None)

    # --- watching -------------------------------------------------------------------------
    def view(self, name: str, with_eta: bool = True) -> dict:
        """A run as the tab shows it: state, step, total, percent, ETA (if `with_eta`), error, pid, loss lines."""
        from training.runs import Run

        path = self.run_dir(name)
        if not path.is_dir():
            raise TrainError(f"no run called {path.name!r}")
        run = Run(path)
        status = run.status()
        with self._lock:
            proc = self._procs.get(path.name)
            owned_alive = proc is not None and proc.alive()
            fresh = proc is not None and status.get("updated", 0) >= proc.started
        state = status.get("state")
        if owned_alive and proc.stop_requested:
            state = "stopping"
        elif owned_alive and not fresh:
            state = "starting"                            # status.json is still the previous session's
        elif proc is not None and not owned_alive and (state in (None, "running") or not fresh):
            state = "ending"                              # the reaper is about to write the final state
        elif state == "running" and proc is None and not _trainer_alive(status.get("pid")):
            state = "interrupted"                         # its process is gone: resume it
        elif state is None:
            state = "unknown"
        step = int(status.get("step") or 0) if fresh or proc is None else 0
        total = int(status.get("total_steps") or 0) if fresh or proc is None else proc.total
        if not total and run.config_path.is_file():
            total = _config_steps(run.config_path)
        records = run.metrics() if with_eta else []
        eta = eta_seconds(records, step, total) if state in ("running", "starting") else None
        return dict(name=path.name, state=state, step=step, total=total,
                    percent=round(100.0 * step / total, 1) if total else 0.0,
                    eta_s=None if eta is None else round(eta, 1),
                    error=status.get("error"), pid=status.get("pid") if state == "running" else None,
                    updated=status.get("updated"), records=len(training_records(records)),
                    student=state == "finished" and (run.student / "config.json").is_file())

    def runs_table(self) -> list[list]:
        rows = []
        for name in self.run_names():
            try:
                v = self.view(name, with_eta=False)
            except TrainError:
                continue
            updated = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v["updated"])) if v["updated"] else ""
            rows.append([v["name"], v["state"], v["step"], v["total"], updated])
        return rows


# --- the tab ------------------------------------------------------------------------------

def progress_html(v: Optional[dict]) -> str:
    if not v:
        return "<div id='train-progress-text'>No run selected.</div>"
    eta = f", ETA {format_duration(v['eta_s'])}" if v.get("eta_s") is not None else ""
    text = f"{v['percent']:g}% (step {v['step']} of {v['total']}){eta}, {v['state']}"
    return (f"<progress value='{v['step']}' max='{max(v['total'], 1)}' style='width:100%'></progress>"
            f"<div id='train-progress-text'>{text}</div>")


def status_markdown(v: Optional[dict]) -> str:
    if not v:
        return ""
    name, state = v["name"], v["state"]
    text = {
        "starting": "starting (loading the teacher and the data)",
        "running": f"running (pid {v['pid']})" if v.get("pid") else "running",
        "finished": "finished: its student is now in Compare (Also compare) and in the Arena",
        "stopped": "stopped: press Resume to continue from its last checkpoint",
        "interrupted": "interrupted (its process is gone): press Resume to continue from its last checkpoint",
        "ending": "ending",
    }.get(state, state)
    out = f"Run **{name}**: **{state}**" + (text[len(state):] if text.startswith(state) else f" ({text})")
    if v.get("error") and state in ("failed", "stopped", "interrupted"):
        out += f"\n\n```\n{v['error']}\n```"
    return out


def latest_sample(runs_root: Path, name: str) -> Optional[np.ndarray]:
    from PIL import Image

    path = Path(runs_root) / name / "samples" / "latest.png"
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L") if im.mode in ("L", "1", "I;16") else im.convert("RGB"))
    except (OSError, ValueError):
        return None


def build_train_tab(manager: TrainManager) -> dict:
    """The Train tab (inside an open gr.Blocks)."""
    import gradio as gr

    presets = manager.presets()
    values = manager.preset_values(presets[0]) if presets else {}
    with gr.Tab("Train", id="train") as tab:
        gr.Markdown("Distil the teacher into a few-step student with DMD2. A run trains in its own process "
                    "(`python -m training distill`); its folder under `runs/` keeps the config, metrics, "
                    "checkpoints and sample grids. When it finishes, its student joins Compare and the Arena.")
        refusal = manager.refusal()
        if refusal:
            gr.Markdown(f"**{refusal}**", elem_id="train-refusal")
        with gr.Row():
            preset = gr.Dropdown(choices=presets, value=presets[0] if presets else None, label="Preset",
                                 elem_id="train-preset")
            name = gr.Textbox(label="Run name", placeholder="e.g. mnist-1step-lr1e-4", elem_id="train-name")
        knobs = []
        with gr.Row():
            for key, label, kind in KNOBS:
                elem_id = f"train-{key.replace('_', '-')}"
                if kind == "bool":
                    knobs.append(gr.Checkbox(value=values.get(key, False), label=label, elem_id=elem_id))
                else:
                    knobs.append(gr.Number(value=values.get(key), label=label, elem_id=elem_id,
                                           precision=0 if kind == "int" else None, min_width=140))
        with gr.Accordion("Other config values", open=False):
            extra = gr.Textbox(lines=3, label="One key=value per line (any key of the config, e.g. "
                               "sample_every=50 or eval_every=0)", elem_id="train-extra")
        token = gr.Textbox(type="password", label=f"Admin token ({TOKEN_ENV})", visible=manager.token_required,
                           elem_id="train-token")
        with gr.Row():
            launch = gr.Button("Launch", variant="primary", interactive=refusal is None, elem_id="train-launch")
            stop = gr.Button("Stop", variant="stop", interactive=refusal is None, elem_id="train-stop")
            resume = gr.Button("Resume", interactive=refusal is None, elem_id="train-resume")
        with gr.Row():
            names = manager.run_names()
            watch = gr.Dropdown(choices=names, value=names[0] if names else None, label="Run to watch",
                                elem_id="train-run", allow_custom_value=True)   # runs appear later; view() checks
            refresh = gr.Button("Refresh list", scale=0, elem_id="train-refresh")
        progress = gr.HTML(progress_html(None), elem_id="train-progress")
        status = gr.Markdown(elem_id="train-status")
        with gr.Row():
            plot = gr.LinePlot(x="step", y="value", color="loss", label="Losses", elem_id="train-plot")
            sample = gr.Image(label="Latest samples", type="numpy", format="png", interactive=False,
                              elem_id="train-sample")
        table = gr.Dataframe(headers=RUN_COLUMNS, value=manager.runs_table() or None, interactive=False,
                             label="Runs", elem_id="train-runs")
        seen = gr.State(None)             # what this page shows already, so an unchanged plot is not resent
        timer = gr.Timer(POLL_S)

        def errors(fn):
            def wrapped(*args):
                try:
                    return fn(*args)
                except TrainError as e:
                    raise gr.Error(str(e)) from None
            return wrapped

        def fill(preset):
            try:
                v = manager.preset_values(preset)
            except Exception as e:          # a preset that does not load: say so, keep the form
                raise gr.Error(f"preset {preset!r} does not load: {e}") from None
            return [v[key] for key, _, _ in KNOBS]

        def settings_of(knob_values) -> dict:
            return {key: value for (key, _, _), value in zip(KNOBS, knob_values)}

        def poll(watched, seen):
            if not watched:
                return progress_html(None), "", gr.skip(), gr.skip(), manager.runs_table(), seen
            try:
                v = manager.view(watched)
            except TrainError:
                return progress_html(None), "", None, None, manager.runs_table(), None
            sample_path = manager.runs_root / v["name"] / "samples" / "latest.png"
            mark = (v["name"], v["records"], sample_path.stat().st_mtime if sample_path.is_file() else None)
            from training.runs import Run

            if mark == seen:
                frame, image = gr.skip(), gr.skip()
            else:
                frame = loss_frame(Run(manager.runs_root / v["name"]).metrics())
                image = latest_sample(manager.runs_root, v["name"])
            return progress_html(v), status_markdown(v), frame, image, manager.runs_table(), mark

        def after(v):
            names = manager.run_names()
            return [gr.Dropdown(choices=names, value=v["name"]), progress_html(v), status_markdown(v),
                    manager.runs_table(), None]

        def do_launch(preset, run_name, *rest):
            *knob_values, extra_text, token_text = rest
            return after(manager.launch(preset, run_name, settings_of(knob_values), extra_text, token_text))

        def do_stop(watched, token_text):
            if not watched:
                raise TrainError("select a run to stop")
            return after(manager.stop(watched, token_text))

        def do_resume(watched, token_text):
            if not watched:
                raise TrainError("select a run to resume")
            return after(manager.resume(watched, token_text))

        def names_list():
            names = manager.run_names()
            return gr.Dropdown(choices=names), manager.runs_table()

        changed = [watch, progress, status, table, seen]
        preset.change(errors(fill), preset, knobs, api_visibility="private")
        launch.click(errors(do_launch), [preset, name, *knobs, extra, token], changed, api_visibility="private")
        stop.click(errors(do_stop), [watch, token], changed, api_visibility="private")
        resume.click(errors(do_resume), [watch, token], changed, api_visibility="private")
        gr.on([refresh.click, tab.select], names_list, None, [watch, table], api_visibility="private")
        gr.on([timer.tick, watch.change], poll, [watch, seen], [progress, status, plot, sample, table, seen],
              api_visibility="private", show_progress="hidden", concurrency_limit=None, queue=False)

        def train_launch(preset: str, name: str, settings: Optional[dict] = None, extra: str = "",
                         token: str = "") -> dict:
            """Launch a run: a preset name, a run name, config values ({"iterations": 100, ...}), the admin token."""
            return errors(manager.launch)(preset, name, settings, extra, token)

        def train_stop(name: str, token: str = "") -> dict:
            """Stop a running run (SIGTERM to its process group)."""
            return errors(manager.stop)(name, token)

        def train_resume(name: str, token: str = "") -> dict:
            """Resume a run from its last checkpoint."""
            return errors(manager.resume)(name, token)

        def train_status(name: str) -> dict:
            """A run's state, step, total, percent, ETA (s) and error."""
            return errors(manager.view)(name)

        def train_runs() -> list:
            """Every run: name, state, step, total, last update (UTC)."""
            return manager.runs_table()

        for fn in (train_launch, train_stop, train_resume, train_status, train_runs):
            gr.api(fn, api_name=fn.__name__)
    return dict(preset=preset, name=name, knobs=knobs, extra=extra, token=token, launch=launch, stop=stop,
                resume=resume, watch=watch, progress=progress, status=status, plot=plot, sample=sample,
                table=table, timer=timer)
