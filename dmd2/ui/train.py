"""Train tab: launch `python -m training distill` from a preset, watch it, stop it, resume it.

The tab is a form and a view over `training.jobs.Jobs` (launching, stopping, reaping and watching
the trainer subprocess) behind `dmd2.ui.auth.AdminGate` (admin token, lockout, public apps). It
polls the watched run's view with a gr.Timer and reads run folders only through `training.runs`.

Endpoints for gradio_client: `/train_launch`, `/train_stop`, `/train_resume` (each needs the
admin token when DMD2_ADMIN_TOKEN is set), `/train_status` and `/train_runs`.
"""

# No `from __future__ import annotations`: gr.api reads the endpoints' type hints at run time.

import functools
import math
import time
from typing import Optional

import numpy as np

from dmd2 import registry
from dmd2.ui.auth import TOKEN_ENV, AdminGate, NotAllowed, client_address
from dmd2.ui.widgets import public_message
from training.jobs import Jobs, JobError, training_records
from training.runs import Run

POLL_S = 2.0                      # the tab's refresh period
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


class TrainManager(Jobs):
    """The tab's jobs: `Jobs` under `runs_root` whose launch, stop and resume first pass the admin gate.

    `admin_token`: when set, launch / stop / resume need it. `public`: the app is reachable from the
    internet; then training is refused unless a token is set. `disabled`: why this app never trains (ZeroGPU
    cannot hold a GPU for a run), shown in the tab. Other arguments go to `Jobs`.
    """

    def __init__(self, runs_root, admin_token: Optional[str] = None, public: bool = False, clock=time.monotonic,
                 disabled: Optional[str] = None, **jobs_kwargs):
        super().__init__(runs_root, on_resume=registry.forget, **jobs_kwargs)
        self.gate = AdminGate(admin_token, public, clock, disabled=disabled)

    def knob_values(self, preset: str) -> dict:
        """The form's knobs as the preset sets them."""
        return self.preset_values(preset, [key for key, _, _ in KNOBS])

    # `client`: who asks (dmd2.ui.auth.client_address of its request), so wrong tokens lock out only it.
    def launch(self, preset: str, name: str, settings: Optional[dict] = None, extra: str = "",
               token: Optional[str] = None, client: Optional[str] = None) -> dict:
        self.gate.authorize(token, client)
        return super().launch(preset, name, settings, extra)

    def resume(self, name: str, token: Optional[str] = None, client: Optional[str] = None) -> dict:
        self.gate.authorize(token, client)
        return super().resume(name)

    def stop(self, name: str, token: Optional[str] = None, client: Optional[str] = None, **kwargs) -> dict:
        self.gate.authorize(token, client)
        return super().stop(name, **kwargs)


    def view(self, name: str, with_eta: bool = True) -> dict:
        """`Jobs.view`, plus for a finished run whether the app serves its student (`served`: it loads) and why
        not (`student_error`)."""
        v = super().view(name, with_eta)
        if v["state"] == "finished":
            student = str(Run(self.run_dir(name)).student)
            v["served"] = bool(v["student"]) and registry.loads(student)
            v["student_error"] = None if v["served"] else (
                registry.load_failure(student) or "its student folder is incomplete (dmd2.json and weights)")
        return v


def format_duration(seconds: float) -> str:
    """'45 s', '2 min 05 s', '1 h 03 min'."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def loss_frame(records: list[dict]):
    """Loss curves as a long table for gr.LinePlot: columns step, value, loss."""
    import pandas as pd

    rows = [(r["step"], float(v), k) for r in training_records(records) for k, v in r.items()
            if k.startswith(LOSS_PREFIXES) and not k.endswith(NOT_LOSSES)
            and isinstance(v, (int, float)) and math.isfinite(v)]
    return pd.DataFrame(rows, columns=["step", "value", "loss"])


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
        "finished": ("finished: its student is now in Compare (Also compare) and in the Arena" if v.get("served", True)
                     else f"finished, but its student is not served: {public_message(v.get('student_error') or '')}"),
        "damaged": "damaged: its run folder cannot be read (below); it is left out of Compare and the Arena",
        "stopped": "stopped: press Resume to continue from its last checkpoint",
        "interrupted": "interrupted (its process is gone): press Resume to continue from its last checkpoint",
        "ending": "ending",
    }.get(state, state)
    out = f"Run **{name}**: **{state}**" + (text[len(state):] if text.startswith(state) else f" ({text})")
    if v.get("error") and state in ("failed", "stopped", "interrupted", "damaged"):
        out += f"\n\n```\n{public_message(v['error'])}\n```"
    return out


def latest_sample(run: Run) -> Optional[np.ndarray]:
    """The run's latest sample grid as an array, or None while there is none."""
    from PIL import Image

    try:
        with Image.open(run.latest_sample) as im:
            return np.asarray(im.convert("L") if im.mode in ("L", "1", "I;16") else im.convert("RGB"))
    except (OSError, ValueError):
        return None


def build_train_tab(manager: TrainManager) -> dict:
    """The Train tab (inside an open gr.Blocks)."""
    import gradio as gr

    presets = manager.presets()
    values = manager.knob_values(presets[0]) if presets else {}
    with gr.Tab("Train", id="train") as tab:
        gr.Markdown("Distil the teacher into a few-step student with DMD2. A run trains in its own process "
                    "(`python -m training distill`); its folder under `runs/` keeps the config, metrics, "
                    "checkpoints and sample grids. When it finishes, its student joins Compare and the Arena.")
        refusal = manager.gate.refusal()
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
        token = gr.Textbox(type="password", label=f"Admin token ({TOKEN_ENV})", visible=manager.gate.token_required,
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
            @functools.wraps(fn)             # keeps fn's signature: Gradio finds its gr.Request parameter there
            def wrapped(*args, **kwargs):
                try:
                    return fn(*args, **kwargs)
                except (JobError, NotAllowed) as e:
                    raise gr.Error(str(e)) from None
            return wrapped

        def fill(preset):
            try:
                v = manager.knob_values(preset)
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
            except JobError:
                return progress_html(None), "", None, None, manager.runs_table(), None
            run = Run(manager.runs_root / v["name"])
            mark = (v["name"], v["records"], run.latest_sample.stat().st_mtime if run.latest_sample.is_file() else None)
            if mark == seen:
                frame, image = gr.skip(), gr.skip()
            else:
                frame, image = loss_frame(run.metrics()), latest_sample(run)
            return progress_html(v), status_markdown(v), frame, image, manager.runs_table(), mark

        def after(v):
            names = manager.run_names()
            return [gr.Dropdown(choices=names, value=v["name"]), progress_html(v), status_markdown(v),
                    manager.runs_table(), None]

        # The request first: Gradio passes a gr.Request only to parameters before *rest.
        def do_launch(request: gr.Request, preset, run_name, *rest):
            *knob_values, extra_text, token_text = rest
            return after(manager.launch(preset, run_name, settings_of(knob_values), extra_text, token_text,
                                        client=client_address(request)))

        def do_stop(watched, token_text, request: gr.Request):
            if not watched:
                raise JobError("select a run to stop")
            return after(manager.stop(watched, token_text, client=client_address(request)))

        def do_resume(watched, token_text, request: gr.Request):
            if not watched:
                raise JobError("select a run to resume")
            return after(manager.resume(watched, token_text, client=client_address(request)))

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

        # gr.api passes the gr.Request (not an API parameter) to the parameter annotated with it.
        def train_launch(preset: str, name: str, settings: Optional[dict] = None, extra: str = "",
                         token: str = "", request: gr.Request = None) -> dict:
            """Launch a run: a preset name, a run name, config values ({"iterations": 100, ...}), the admin token."""
            return errors(manager.launch)(preset, name, settings, extra, token, client=client_address(request))

        def train_stop(name: str, token: str = "", request: gr.Request = None) -> dict:
            """Stop a running run (SIGTERM to its process group)."""
            return errors(manager.stop)(name, token, client=client_address(request))

        def train_resume(name: str, token: str = "", request: gr.Request = None) -> dict:
            """Resume a run from its last checkpoint."""
            return errors(manager.resume)(name, token, client=client_address(request))

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
