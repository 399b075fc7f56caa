"""Compare tab: one class and one seed through every model, side by side, with NFE and wall time."""

from __future__ import annotations

import math
import random
from typing import Callable

import numpy as np

from dmd2 import registry
from dmd2.families.base import ModelLoadError
from dmd2.families.pixel import PixelFamily
from dmd2.prompts import check_prompt, example_prompts
from dmd2.sampling import handover_timesteps
from dmd2.ui.widgets import (DISPLAY_SCALE, GUIDED_W_LABEL, GUIDED_W_STEP, check_guided_w, conditioning,
                             display_name, format_w, guided_students, guided_w_control, make_grid, prompt_box,
                             public_message)

MAX_IMAGES = 16
MAX_SEED = 2**32 - 1
MAX_STEPS = 1000        # the schedule has 1000 training timesteps
UI_STEPS = (1, 100)     # the tab's teacher-steps slider: also the limit for its API
UI_GUIDANCE = (1.0, 8.0)

Progress = Callable[[float, str], None]


def _as_int(value, what: str, low: int, high: int) -> int:
    """An integer in [low, high] from an int or an integral float/str; ValueError naming the field `what`."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        f = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer, got {value!r}") from None
    if not math.isfinite(f) or not f.is_integer():
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if not low <= int(f) <= high:
        raise ValueError(f"{what} must be between {low} and {high}, got {int(f)}")
    return int(f)


def _as_float(value, what: str, low: float, high: float) -> float:
    """A finite number in [low, high] from a number or a numeric str; ValueError naming the field `what`."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{what} must be a number, got {value!r}")
    try:
        f = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not (math.isfinite(f) and low <= f <= high):
        limits = f">= {low:g}" if math.isinf(high) else f"between {low:g} and {high:g}"
        raise ValueError(f"{what} must be a finite number {limits}, got {f}")
    return f


def random_seed() -> int:
    """A fresh seed for the 'random' button."""
    return random.randint(0, MAX_SEED)


def compare(models: list[str], label, seed, num_images=4, steps=None, guidance=None,
            scale: int = 1, progress: Progress | None = None,
            guided_w=None, teacher_until=None) -> list[tuple[np.ndarray | None, str]]:
    """Sample `num_images` images of class `label` (class models) or of the prompt `label` (text
    models) from `seed` with each model.

    Returns one (grid, caption) per model, in the order of `models`, caption "name: NFE n, steps s, x ms"
    ("name: NFE n, steps s, w=2.0, x ms" for a guidance-conditioned student); `steps` and `guidance` apply to
    teachers (students use their own timesteps), `guided_w` to guidance-conditioned students only (None: each
    its own default; it must lie inside every one's range). `teacher_until` (a timestep, or None / "off"):
    every multi-step student that has it among its later timesteps samples teacher-then-student (its own
    teacher's DDIM trajectory down to it, on the `steps` grid at `guidance`, then its remaining steps;
    `LoadedModel.generate`), the others (and one whose teacher does not load) as usual, their caption saying why. Bad input raises
    ValueError naming the field; a model that fails to load or to sample gives (None, "name: could not
    load: ..." or "name: failed: ...") and the others still run. `compare_steps` gives the same results
    model by model.
    """
    return [(img, cap) for img, cap in _last(compare_steps(models, label, seed, num_images, steps, guidance,
                                                              scale=scale, progress=progress, guided_w=guided_w,
                                                              teacher_until=teacher_until))]


def _last(iterator):
    last = None
    for last in iterator:
        pass
    return last


def compare_steps(models: list[str], label, seed, num_images=4, steps=None, guidance=None, scale: int = 1,
                  progress: Progress | None = None, max_steps: int = MAX_STEPS,
                  guidance_range: tuple[float, float] = (0.0, math.inf), guided_w=None, teacher_until=None):
    """`compare`, one model at a time: yields the list of (grid, caption) per model (in the order of `models`)
    after checking the input and loading the models, then after each model; a caption is None while that
    model has not run yet. Students run first and the teachers (many steps) last, so the students' grids
    come at once (a teacher-then-student hybrid runs its teacher's steps first). `steps` may be 1..`max_steps`, `guidance` within `guidance_range`, `guided_w` within the
    range every guidance-conditioned student among `models` shares; the last list is `compare`'s result.
    """
    if not models:
        raise ValueError("no models to compare: none is available (train or download one first)")
    text = conditioning(models) == "text"
    seed = _as_int(seed, "seed", 0, MAX_SEED)
    label = check_prompt(label) if text else _as_int(label, "class label", 0, 10**6)
    num_images = _as_int(num_images, "number of images", 1, MAX_IMAGES)
    steps = None if steps is None else _as_int(steps, "teacher steps", 1, max_steps)
    guidance = None if guidance is None else _as_float(guidance, "teacher guidance", *guidance_range)
    teacher_until = _as_handover(teacher_until)

    loaded: list[registry.LoadedModel | str] = []
    for name in models:
        try:
            loaded.append(registry.load(name))
        except Exception as e:  # a missing/corrupt model must not take the others down
            loaded.append(public_message(e if isinstance(e, ModelLoadError) else f"{type(e).__name__}: {e}"))
    for name, m in zip(models, loaded):
        if isinstance(m, str):
            continue
        if text:
            label = m.check_prompt(label)       # its text encoder's token limit
        elif label >= m.num_classes:
            raise ValueError(f"class label must be in 0..{m.num_classes - 1} for {display_name(name)}, got {label}")
    # Before anything samples: one w for every guided student, inside each one's range.
    guided_w = check_guided_w(guided_w, guided_students([n for n, m in zip(models, loaded) if not isinstance(m, str)]))

    def is_teacher(m) -> bool:
        return not isinstance(m, str) and m.spec.kind == "teacher"

    # Who continues the teacher's trajectory (decided now: a student whose teacher does not load samples as usual).
    handovers = {i: _handover_for(m, teacher_until) for i, m in enumerate(loaded) if not isinstance(m, str)
                 and not is_teacher(m)}

    # Progress counts network calls of the step loop: teacher steps, one unit per plain student, and a hybrid's
    # teacher steps down to t plus one.
    def cost(i, m):
        if isinstance(m, str):
            return 0
        if is_teacher(m):
            return steps or m.default_steps()
        hybrid, _ = handovers[i]
        if not hybrid:
            return 1
        teacher = m.handover_teacher()
        return 1 + len(handover_timesteps(teacher.family.schedule, teacher_until, steps or teacher.spec.steps))
    total = max(1, sum(cost(i, m) for i, m in enumerate(loaded)))
    done = 0
    labels = [label] * num_images
    results: list[tuple[np.ndarray | None, str | None]] = [
        (None, f"{display_name(name)}: could not load: {m}") if isinstance(m, str) else (None, None)
        for name, m in zip(models, loaded)]
    yield list(results)
    for i in sorted(range(len(models)), key=lambda i: is_teacher(loaded[i])):     # students first
        m, title = loaded[i], display_name(models[i])
        if isinstance(m, str):
            continue
        if progress is not None:
            progress(done / total, f"{title}: sampling")
        callback = None
        if progress is not None and is_teacher(m):
            def callback(step, n, _done=done, _title=title):
                progress((_done + step) / total, f"{_title}: step {step}/{n}")
        try:
            if is_teacher(m):
                out = m.generate(labels, seed, steps=steps, guidance=guidance, callback=callback)
            else:
                hybrid, note = handovers[i]
                out = m.generate(labels, seed, guidance=guided_w if m.guided else None,
                                 **(dict(teacher_until=teacher_until, teacher_steps=steps, teacher_guidance=guidance)
                                    if hybrid else {}))
        except Exception as e:      # one model failing to sample must not take the others down
            results[i] = (None, f"{title}: failed: {public_message(e)}")
        else:
            w = f"{format_w(out.extra['guidance'])}, " if not is_teacher(m) and m.guided else ""
            caption = f"{title}: NFE {out.nfe}, steps {out.extra['steps']}, {w}{out.seconds * 1000:.0f} ms"
            if "teacher_until" in out.extra:
                e = out.extra
                caption += (f" (teacher first: {_plural(e['teacher_evals'], 'step')} at w={e['teacher_guidance']:g} "
                            f"down to t={e['teacher_until']}, NFE {e['teacher_nfe']}; then "
                            f"{_plural(e['steps'], 'student step')})")
            elif not is_teacher(m) and teacher_until is not None:
                caption += f" ({note})"
            results[i] = (make_grid(out.images, scale=scale), caption)
        done += cost(i, m)
        yield list(results)
    if progress is not None:
        progress(1.0, "done")


def _as_handover(value) -> int | None:
    """The Compare tab's "teacher first, down to t" value: None for off ("off", "", None), else a timestep."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off")):
        return None
    return _as_int(value, "teacher first, down to t", 1, MAX_STEPS - 1)


def _handover_for(m: registry.LoadedModel, teacher_until: int | None) -> tuple[bool, str]:
    """(does student `m` sample teacher-then-student at `teacher_until`, and if not, why in a few words)."""
    if teacher_until is None:
        return False, ""
    later = list(m.timesteps[1:])
    if not later:
        return False, "1-step: sampled as usual"
    if teacher_until not in later:
        return False, f"t={teacher_until} is not one of its later timesteps ({', '.join(map(str, later))}): sampled as usual"
    try:
        m.handover_teacher()
    except Exception as e:      # no teacher named, one that does not load, another schedule: the student alone
        return False, f"no teacher to start from: {public_message(e)}; sampled as usual"
    return True, ""


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def handover_choices(models: list[str]) -> list[int]:
    """The timesteps the Compare tab offers to hand over at: every later timestep of a multi-step student among
    `models` that loads, highest first (empty: no student can take a teacher's state)."""
    found = set()
    for name in models:
        try:
            m = registry.load(name)
        except Exception:
            continue
        if m.spec.kind == "student":
            found.update(int(t) for t in m.timesteps[1:])
    return sorted(found, reverse=True)


HANDOVER_LABEL = "Teacher first, down to t"
HANDOVER_INFO = ("off: students sample as usual. t: each student with t among its later timesteps starts from its "
                 "teacher's DDIM state at t (same noise; the teacher steps and guidance above) and takes its remaining "
                 "steps, so you see what its own first steps decide")


def _handover_control(models: list[str], value=None) -> dict:
    """The handover dropdown's settings: "off" and the timesteps `handover_choices` finds; hidden without any;
    `value` stays if still offered."""
    offered = [str(t) for t in handover_choices(models)]
    value = str(value) if value is not None and str(value) in offered else "off"
    return dict(choices=["off", *offered], value=value, visible=bool(offered))


def _defaults(models: list[str]) -> dict:
    """Slider defaults from the first teacher that loads (the family's guidance, its steps, its classes)."""
    family = PixelFamily()
    d = dict(num_classes=family.num_classes, steps=50, guidance=family.default_guidance)
    for name in models:
        try:
            m = registry.load(name)
        except Exception:
            continue
        if m.spec.kind == "teacher":
            g = m.spec.guidance if m.spec.guidance is not None else m.family.default_guidance
            return dict(num_classes=m.num_classes, steps=m.spec.steps, guidance=g)
    return d


def build_compare_tab(models: list[str], wrap: Callable = lambda f: f, mode: str | None = None,
                      more_models: Callable[[], list[str]] | None = None) -> dict:
    """The Compare tab (inside an open gr.Blocks); `wrap` decorates the sampling function (spaces.GPU).

    `mode`: "class" (a class picker) or "text" (a prompt box); default: what the models take.
    `more_models()` lists models that may appear while the app runs (finished training runs):
    they are picked from a refreshable dropdown and drawn in a gallery under the fixed panels.
    """
    import gradio as gr

    mode = mode or conditioning(models)
    text = mode == "text"
    d = _defaults(models)
    with gr.Tab("Compare", id="compare") as tab:
        gr.Markdown(f"Same {'prompt' if text else 'class'}, same seed, same starting noise: the teacher's many "
                    "steps against the students' few. Captions give network evaluations (NFE; CFG costs 2 per "
                    "step), steps and measured time.")
        examples = example_prompts() if text else []
        with gr.Row():
            if text:
                label = prompt_box(examples)
            else:
                label = gr.Dropdown(choices=list(range(d["num_classes"])), value=0, label="Class",
                                    elem_id="compare-class")
            # No min/max on the seed box: our own check names the field ("seed must be ...").
            seed = gr.Number(value=0, label="Seed (integer >= 0)")
            dice = gr.Button("Random seed", scale=0)
            num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images",
                                   elem_id="compare-num-images")
        with gr.Row():
            steps = gr.Slider(*UI_STEPS, value=d["steps"], step=1, label="Teacher steps")
            guidance = gr.Slider(*UI_GUIDANCE, value=d["guidance"], step=0.25, label="Teacher guidance (CFG)")
            # One w for every guidance-conditioned student (fixed panels and finished runs alike), so they are
            # compared at the same w; limited to the range they all share. Teachers keep the CFG slider.
            guided_w = gr.Slider(step=GUIDED_W_STEP, label=GUIDED_W_LABEL, elem_id="compare-guided-w",
                                 **guided_w_control(guided_students(_offered(models, more_models))))
            # Teacher first: each multi-step student whose later timesteps hold t starts from its own teacher's
            # state at t (the teacher's trajectory from the same noise, on the steps above), not from its first step.
            teacher_until = gr.Dropdown(**_handover_control(_offered(models, more_models)), elem_id="compare-handover",
                                        label=HANDOVER_LABEL, info=HANDOVER_INFO)
        button = gr.Button("Generate", variant="primary")
        if text:
            gr.Examples([[p] for p in examples], inputs=[label], label="Example prompts")
        if not models and text:
            gr.Markdown("**No text-to-image model is available here.** SDXL and DMD2's students load from the "
                        "Hugging Face cache (filled on first use on a GPU machine with internet); local pipeline "
                        "or student folders work with `python app.py --family sdxl --model PATH`.")
        elif not models:
            gr.Markdown("**No models are available.** Train the teacher (see README) or pass a model "
                        "folder with `python app.py --model PATH`.")
        images, captions = [], []
        with gr.Row():
            for name in models:
                with gr.Column(min_width=160, elem_classes=["compare-panel"]):
                    images.append(gr.Image(label=display_name(name), type="numpy", format="png",
                                           interactive=False, buttons=["download", "fullscreen"]))
                    captions.append(gr.Markdown())

        def run(label, seed, num_images, steps, guidance, guided_w=None, teacher_until=None, progress=gr.Progress()):
            # Raw values (preprocess=False): our checks name the field of a bad one, where the components'
            # own checks answered a string in a slider with a bare "Error" and refused the class "3".
            warned = set()
            try:
                for results in compare_steps(models, label, seed, num_images, steps, guidance,
                                             scale=1 if text else DISPLAY_SCALE, max_steps=UI_STEPS[1],
                                             guidance_range=UI_GUIDANCE, guided_w=guided_w,
                                             teacher_until=teacher_until,
                                             progress=lambda f, desc: progress(f, desc=desc)):
                    failed = [cap for img, cap in results if img is None and cap is not None]
                    if failed and len(failed) == len(results):
                        raise gr.Error("no model could be loaded: " + "; ".join(failed))
                    for cap in failed:
                        if cap not in warned:
                            warned.add(cap)
                            gr.Warning(cap)
                    yield _panels(models, results)
            except ValueError as e:
                raise gr.Error(str(e)) from None

        outputs = [c for pair in zip(images, captions) for c in pair]
        # Streamed: each model's panel fills in when it is done, students first, the teacher last; the
        # last output (what gradio_client's predict returns) has every panel. The teacher's steps show
        # as progress on the teacher's panels only, so the students' images stay visible meanwhile.
        teachers = [img for name, img in zip(models, images) if _kind(name) == "teacher"]
        # guided_w and teacher_until come last: gradio_client fills a missing trailing input with the control's
        # value (a raw HTTP call must send them; null means each guided student's own default, and no handover).
        inputs = [label, seed, num_images, steps, guidance, guided_w, teacher_until]
        button.click(wrap(run), inputs, outputs, api_name="compare",
                     preprocess=False, show_progress_on=teachers or None)
        dice.click(random_seed, None, seed, api_visibility="private")
        extra = _build_more_models(models, more_models, button, inputs, tab, wrap,
                                   scale=1 if text else DISPLAY_SCALE) if more_models is not None else {}
    return dict(label=label, seed=seed, num_images=num_images, steps=steps, guidance=guidance, guided_w=guided_w,
                teacher_until=teacher_until, images=images, captions=captions, generate=button, mode=mode, **extra)


def _offered(models: list[str], more_models: Callable[[], list[str]] | None) -> list[str]:
    """Every model the tab may sample now: its panels' and the finished runs `more_models()` lists."""
    return list(dict.fromkeys(list(models) + (list(more_models()) if more_models is not None else [])))


def _kind(name: str) -> str | None:
    """"teacher" or "student" for a model name or folder, None if it cannot be told."""
    try:
        return registry.spec_for(name).kind
    except Exception:
        return None


def _panels(models: list[str], results) -> list:
    """The Compare panels' outputs (image, caption per model) for `compare_steps` results."""
    out = []
    for name, (img, cap) in zip(models, results):
        if img is not None and img.shape[-1] == 1:
            img = img[..., 0]          # grayscale: PIL takes H x W, not H x W x 1
        out += [img, cap if cap is not None else f"{display_name(name)}: sampling..."]
    return out


def _build_more_models(models: list[str], more_models: Callable[[], list[str]], button, inputs: list,
                       tab, wrap: Callable, scale: int = DISPLAY_SCALE) -> dict:
    """The dropdown of models that appeared since start (read per request) and their gallery."""
    import gradio as gr

    def current() -> dict[str, str]:
        """Display name -> model, for the models not already shown in a panel."""
        fixed = set(models)
        return {display_name(m): m for m in more_models() if m not in fixed}

    with gr.Row():
        picked = gr.Dropdown(choices=list(current()), value=[], multiselect=True, elem_id="compare-more",
                             allow_custom_value=True,     # the list grows while the app runs; run_more checks
                             label="Also compare: finished training runs (the Train tab)")
        refresh = gr.Button("Refresh list", scale=0, elem_id="compare-more-refresh")
    gallery = gr.Gallery(label="Training runs", columns=4, fit_columns=False, height=360, object_fit="contain",
                         preview=False, format="png", interactive=False, elem_id="compare-more-gallery")

    def choices(w, until=None):
        """The runs to pick, the w slider for the guided students among all the tab may sample now (a w the new
        limits still admit stays), and the handover timesteps they offer (a pick still offered stays)."""
        control = guided_w_control(guided_students(_offered(models, more_models)))
        if control["visible"] and w is not None:
            try:
                if control["minimum"] <= float(w) <= control["maximum"]:
                    control["value"] = float(w)
            except (TypeError, ValueError):
                pass
        return (gr.Dropdown(choices=list(current())), gr.Slider(**control),
                gr.Dropdown(**_handover_control(_offered(models, more_models), until)))

    def run_more(picked, label, seed, num_images, steps, guidance, guided_w=None, teacher_until=None):
        if picked is None or picked == []:
            return []
        if isinstance(picked, str):
            picked = [picked]
        if not isinstance(picked, list) or not all(isinstance(p, str) for p in picked):
            raise gr.Error(f"models to also compare must be a list of names, got {picked!r}")
        known = current()
        unknown = [p for p in picked if p not in known]
        if unknown:
            raise gr.Error(f"unknown model {unknown[0]!r}: it is not a finished run (any more); "
                           "press Refresh list")
        try:
            results = _last(compare_steps([known[p] for p in picked], label, seed, num_images, steps, guidance,
                                          scale=scale, max_steps=UI_STEPS[1], guidance_range=UI_GUIDANCE,
                                          guided_w=guided_w, teacher_until=teacher_until))
        except ValueError as e:
            raise gr.Error(str(e)) from None
        for img, cap in results:
            if img is None:
                gr.Warning(cap)
        return [(img[..., 0] if img.shape[-1] == 1 else img, cap) for img, cap in results if img is not None]

    def names() -> list[str]:
        """Models that can be added to the comparison now (finished training runs)."""
        return list(current())

    button.click(wrap(run_more), [picked, *inputs], gallery, api_name="compare_more", preprocess=False)
    guided_w, until = inputs[-2:]
    gr.on([refresh.click, tab.select], choices, [guided_w, until], [picked, guided_w, until], api_visibility="private")
    gr.api(names, api_name="compare_more_models")
    return dict(more=picked, more_gallery=gallery, more_refresh=refresh)
