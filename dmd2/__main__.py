"""Command line: `python -m dmd2 sample | evaluate | grid | push ...`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from dmd2.cli import UsageError, run_cli
from dmd2.images import save_grid
from dmd2.sampling import generate_many

# what `evaluate --per-step` reports for each step's x0 estimate: quality, and variety in both feature spaces
PER_STEP_KEYS = ("fid", "alignment", "diversity_ratio", "classifier_precision", "classifier_recall",
                 "autoencoder_fid", "autoencoder_precision", "autoencoder_recall")
GUIDANCE_HELP = ("a teacher's CFG scale (default: the model's), or a guidance-conditioned student's w, inside the "
                 "guidance_range of its dmd2.json (default: its guidance_default); a plain student's was fixed in training "
                 "(sample ignores it, evaluate refuses it so no result claims a w it was not sampled at)")


def _non_negative(name):
    def parse(s):
        v = int(s)
        if v < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {v}")
        return v
    return parse


def _scale(name):
    """A CFG scale: a finite number >= 0."""
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        if not (math.isfinite(v) and v >= 0):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number >= 0, got {s}")
        return v
    return parse


def _positive(name):
    def parse(s):
        v = int(s)
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {v}")
        return v
    return parse


def _check_writable(path: str) -> Path:
    """Fail before any sampling if the output file cannot be created."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"output path {out} is a directory")
    if not out.parent.is_dir():
        raise UsageError(f"output folder {out.parent} does not exist")
    existed = out.exists()
    try:
        with open(out, "ab"):
            pass
    except OSError as e:
        raise UsageError(f"cannot write output file {out}: {e.strerror}") from None
    if not existed:
        out.unlink()
    return out


HANDOVER_HELP = ("multi-step students: the student's own teacher samples first, along its DDIM grid from the starting "
                 "noise down to this timestep (one of the student's later ones, e.g. 749), then the student finishes "
                 "from there; NFE counts both")


def _handover(a, model) -> dict:
    """generate()'s teacher_until / teacher_steps / teacher_guidance from --teacher-until / --teacher-steps /
    --teacher-guidance, checked before sampling."""
    if a.teacher_until is None:
        if a.teacher_steps is not None:
            raise UsageError("--teacher-steps: only with --teacher-until (the teacher's grid on its way down to it)")
        if a.teacher_guidance is not None:
            raise UsageError("--teacher-guidance: only with --teacher-until (the teacher's CFG scale on its way down)")
        return {}
    try:
        model.check_handover(a.teacher_until)
        model.handover_teacher()
    except ValueError as e:
        raise UsageError(f"--teacher-until: {str(e).removeprefix('teacher_until: ')}") from None
    return {"teacher_until": a.teacher_until, "teacher_steps": a.teacher_steps, "teacher_guidance": a.teacher_guidance}


def _add_handover(parser) -> None:
    parser.add_argument("--teacher-until", type=_non_negative("--teacher-until"), default=None, metavar="T",
                        help=HANDOVER_HELP)
    parser.add_argument("--teacher-steps", type=_positive("--teacher-steps"), default=None, metavar="N",
                        help="with --teacher-until: the teacher's DDIM grid (default: its usual steps, 50 for MNIST)")
    parser.add_argument("--teacher-guidance", type=_scale("--teacher-guidance"), default=None, metavar="W",
                        help="with --teacher-until: the teacher's CFG scale (default: its own, 1 for MNIST)")


RENOISE_HELP = ("multi-step students: how to move between steps, 'fresh' (re-noise the step's x0 estimate with fresh "
                "noise: DMD2's sampler), 'ddim' (DDIM's deterministic move, keeping the noise the state implies) or a "
                "number in [0, 1], the fraction of fresh noise in between (1 = fresh, 0 = ddim); default: the "
                "student's own, from its dmd2.json (fresh unless it was trained otherwise)")


def _renoise_value(text: str):
    """--renoise's value: fresh, ddim or a fraction of fresh noise in [0, 1] (canonical: 0 -> ddim, 1 -> fresh)."""
    from dmd2.sampling import check_renoise

    try:
        return check_renoise(text if text in ("fresh", "ddim") else float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be fresh, ddim or a number in [0, 1], got {text!r}") from None


def _add_renoise(parser) -> None:
    parser.add_argument("--renoise", type=_renoise_value, default=None, metavar="{fresh,ddim,F}", help=RENOISE_HELP)


def _student_steps(a, model) -> int:
    """How many steps the student itself takes: all of its own, or those left after --teacher-until."""
    return len(model.timesteps) - (0 if a.teacher_until is None else model.check_handover(a.teacher_until))


def _renoise(a, model) -> dict:
    """generate()'s renoise from --renoise, refused where there is no move between steps to choose (a teacher, a
    1-step student, or one left a single step by --teacher-until) or where it is not built (text students)."""
    if a.renoise is None:
        return {}
    if model.spec.kind == "teacher" or len(model.timesteps) < 2:
        raise UsageError(f"--renoise: only for multi-step students; {a.model} "
                         + ("is a teacher" if model.spec.kind == "teacher" else "takes one step"))
    if model.conditioning == "text":
        raise UsageError(f"--renoise: built for pixel students only; {a.model} is a text-to-image student")
    if _student_steps(a, model) < 2:
        raise UsageError(f"--renoise with --teacher-until {a.teacher_until}: the student then takes one step, there "
                         f"is no move between steps to choose")
    return {"renoise": a.renoise}


SAMPLE_OPTIONS = ("steps", "guidance", "bf16", "label", "teacher_until", "teacher_steps", "teacher_guidance",
                  "renoise")


def sample_options(a) -> dict:
    """The options of `sample` that change what is drawn, beside model and seed, as given (an empty dict: the
    model's defaults, the images `evaluate --seed` scores); recorded in the npz as JSON under `options`."""
    return {k: getattr(a, k) for k in SAMPLE_OPTIONS if getattr(a, k) not in (None, False)}


def cmd_sample(a) -> None:
    from dmd2 import registry

    out = _check_writable(a.out)
    model = registry.load(a.model)
    images, labels, _, _ = generate_many(model, a.num, a.seed, a.steps, a.guidance, labels=_labels(a, model),
                                         autocast=a.bf16, **_handover(a, model), **_renoise(a, model))
    options = sample_options(a)
    if options.get("renoise") == getattr(model, "renoise", None):
        del options["renoise"]   # the student's own move: these are its default samples
    part = out.with_name(out.name + ".part")      # a killed run leaves no truncated file at `out`
    with open(part, "wb") as f:
        np.savez(f, images=images, labels=labels, model=np.array(a.model), seed=np.array(a.seed),
                 options=np.array(json.dumps(options, sort_keys=True)))
    os.replace(part, out)
    print(f"wrote {len(images)} images from {a.model} to {out}")


def _labels(a, model):
    if a.label is None:
        return None
    if not 0 <= a.label < model.num_classes:
        raise UsageError(f"--label must be in 0..{model.num_classes - 1}, got {a.label}")
    return np.full(a.num, a.label, dtype=np.int64)


def _print_result(result: dict) -> None:
    for k, v in result.items():
        if k == "per_step":
            print("  per step (x0 estimate after each step):")
            for row in v:
                print(f"    step {row['step']} (t={row['t']:>3}): " + "  ".join(  # None: too few samples
                    f"{k} {'-' if row[k] is None else format(row[k], '.4f')}" for k in PER_STEP_KEYS))
            continue
        if k.endswith(("_kid", "_kid_std")) and isinstance(v, float):  # KID's scale varies: 4 significant digits
            print(f"{k:>16}: {v:.4g}")
            continue
        print(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")


def _guidance_used(a, model):
    """The guidance to record: a guided student's w (checked against its range before any sampling), else --guidance."""
    if getattr(model, "guided", False):
        from dmd2.guidance import check_guidance

        return check_guidance(model.guidance_default if a.guidance is None else a.guidance, model.guidance_range,
                              f"student {a.model!r}")
    if a.guidance is not None and model.spec.kind == "student":
        raise UsageError(f"--guidance: {a.model} is a plain student, whose guidance was fixed when it was trained "
                         f"(only teachers and guidance-conditioned students take one)")
    return a.guidance


def _handover_record(model, handover: dict) -> dict:
    """What a JSON records of a teacher-then-student sample: the handover timestep and the teacher's grid."""
    if not handover:
        return {}
    teacher = model.handover_teacher()
    return {"teacher_until": handover["teacher_until"], "teacher_grid": handover["teacher_steps"] or teacher.spec.steps,
            "teacher": teacher.spec.name, "teacher_guidance": teacher.teacher_guidance(handover.get("teacher_guidance"))}


def cmd_evaluate(a) -> None:
    from dmd2 import registry

    out = _check_writable(a.json) if a.json else None
    spec = registry.spec_for(a.model)
    if spec.conditioning == "text":
        for flag, given in (("--per-step", a.per_step), ("--optdigits", a.optdigits), ("--renoise", a.renoise)):
            if given:
                raise UsageError(f"{flag}: only for class-conditional models; {a.model} is a text-to-image model")
        return _evaluate_text(a, out)
    text_only = [f for f, v in (("--prompts", a.prompts), ("--ref-images", a.ref_images),
                                ("--inception-weights", a.inception_weights), ("--clip-weights", a.clip_weights)) if v]
    if text_only:
        raise UsageError(f"{', '.join(text_only)}: only for text-to-image models; {a.model} is class-conditional")
    from dmd2.metrics.independent import default_autoencoder, evaluate_independent
    from dmd2.metrics.mnist import evaluate_images

    default_autoencoder()  # a missing feature network fails here, before any sampling
    if a.optdigits:
        from dmd2.metrics.optdigits import default_optdigits_net, evaluate_optdigits, instrument_id

        default_optdigits_net()
    num = 5000 if a.num is None else a.num
    if num < 2:
        raise UsageError(f"--num must be at least 2 to estimate FID, got {num}")
    model = registry.load(a.model)
    if a.per_step and (model.spec.kind == "teacher" or len(model.timesteps) < 2):
        raise UsageError(f"--per-step scores each step of a multi-step student; {a.model} "
                         + ("is a teacher" if model.spec.kind == "teacher" else "takes one step"))
    guidance = _guidance_used(a, model)
    if a.teacher_until is not None and a.per_step:
        raise UsageError("--per-step: not with --teacher-until (the teacher's part has no student steps to score)")
    handover = _handover(a, model)
    renoise = _renoise(a, model)
    step_images = [] if a.per_step else None
    images, labels, sec_per_image, nfe = generate_many(model, num, a.seed, a.steps, guidance, autocast=a.bf16,
                                                       step_images=step_images, **handover, **renoise)
    result = {"model": a.model, "num": num, "seed": a.seed, "nfe": nfe, "ms_per_image": 1000 * sec_per_image,
              "precision": "bf16" if a.bf16 else "fp32", **_handover_record(model, handover)}
    if model.spec.kind == "student":   # the move between steps scored: as given, or the student's own if not DMD2's
        used = renoise.get("renoise", model.renoise)
        if _student_steps(a, model) > 1 and (renoise or used != "fresh"):
            result["renoise"] = used
    result.update(evaluate_images(images, labels))
    result.update(evaluate_independent(images))  # second feature space; KID, precision/recall, density/coverage
    if a.optdigits:
        result.update(evaluate_optdigits(images, labels))  # third space: a network that has seen no MNIST digit
        result["optdigits_instrument"] = instrument_id()   # which network and mapping scored it
    if a.per_step:  # the x0 estimate after each step (the last one is the sample scored above)
        result["per_step"] = []
        last = len(step_images)
        for i, (t, x0_images) in enumerate(zip(model.timesteps, step_images), 1):
            # the last step is the sample; each step also in the second feature space, so where a multi-step
            # student loses its variety (recall) can be read step by step
            scores = result if i == last else {**evaluate_images(x0_images, labels), **evaluate_independent(x0_images)}
            result["per_step"].append({"step": i, "t": int(t), **{k: scores[k] for k in PER_STEP_KEYS}})
    if a.steps is not None:
        result["steps"] = a.steps
    if guidance is not None:  # the teacher's CFG scale as given, or the w a guided student sampled at
        result["guidance"] = guidance
    _print_result(result)
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")


def _evaluate_text(a, out) -> None:
    """FID and patch FID against --ref-images, CLIP score, NFE and ms/image of a text-to-image model."""
    import torch

    from dmd2 import registry
    from dmd2.metrics.text_to_image import TextToImageMetrics, evaluate_text_model, reference_stats
    from dmd2.prompts import read_prompts

    if a.prompts is None:
        raise UsageError(f"{a.model} is a text-to-image model: give it --prompts FILE (.txt, one per line, or .parquet)")
    if a.no_clip and not a.ref_images:
        raise UsageError("nothing to compute: --no-clip without --ref-images (FID needs reference images)")
    prompts = read_prompts(a.prompts)
    num = len(prompts) if a.num is None else a.num
    if num > len(prompts):
        raise UsageError(f"--num {num}, but {a.prompts} holds only {len(prompts)} prompts")
    if num < (2 if a.ref_images else 1):
        raise UsageError(f"--num must be at least {2 if a.ref_images else 1}, got {num}")
    prompts = prompts[:num]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The metric networks and the reference statistics first: a missing file fails before any sampling.
    inception, reference, clip = None, None, None
    if a.ref_images:
        from dmd2.metrics.inception import load_fid_inception

        inception = load_fid_inception(a.inception_weights, device=device)
        reference = reference_stats(a.ref_images, inception, device=device)
    if not a.no_clip:
        from dmd2.metrics.clip_score import load_clip_scorer

        clip = load_clip_scorer(a.clip_weights, device=device)
    model = registry.load(a.model)
    guidance = _guidance_used(a, model)
    handover = _handover(a, model)
    metrics = TextToImageMetrics(inception, clip, device=device)
    result = {"model": a.model, "prompts": str(a.prompts), "num": num, "seed": a.seed,
              "precision": "bf16" if a.bf16 else "fp32", **_handover_record(model, handover)}
    result.update(evaluate_text_model(model, prompts, metrics, reference, a.seed, a.steps, a.guidance,
                                      a.batch_size, a.bf16, handover=handover))
    if reference is not None:
        result.update(ref_images=str(a.ref_images), ref_num=reference["n"], fid_network="pt_inception-2015-12-05")
    if clip is not None:
        from dmd2.metrics.clip_score import CLIP_MODEL, CLIP_PRETRAINED

        result["clip_model"] = f"{CLIP_MODEL}/{CLIP_PRETRAINED}"
    if a.steps is not None:
        result["steps"] = a.steps
    if guidance is not None:
        result["guidance"] = guidance
    _print_result(result)
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")


def cmd_push(a) -> None:
    from dmd2.push import push_run

    url = push_run(a.run, a.repo, private=a.private)
    print(f"pushed {Path(a.run) / 'student'} to {url}")


def cmd_grid(a) -> None:
    from dmd2 import registry

    out = _check_writable(a.out)
    model = registry.load(a.model)
    images, _, _, nfe = generate_many(model, a.rows * model.num_classes, a.seed, a.steps, a.guidance,
                                      **_handover(a, model), **_renoise(a, model))
    save_grid(images, out, cols=model.num_classes)
    print(f"wrote a {a.rows} x {model.num_classes} grid from {a.model} (NFE {nfe}) to {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dmd2", description="Sample and evaluate DMD2 teachers and students.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="write N samples to an .npz (images uint8 NxHxWxC, labels int64)")
    s.add_argument("--model", default="mnist-teacher")
    s.add_argument("--num", type=_non_negative("--num"), default=64)
    s.add_argument("--seed", type=_non_negative("--seed"), default=0)
    s.add_argument("--out", required=True)
    s.add_argument("--steps", type=_positive("--steps"), default=None, help="teacher DDIM steps (default 50)")
    s.add_argument("--guidance", type=float, default=None, help=GUIDANCE_HELP)
    s.add_argument("--bf16", action="store_true", help="sample under bf16 autocast (default fp32)")
    s.add_argument("--label", type=int, default=None, help="one class for every sample (default: cycle 0..9)")
    _add_handover(s)
    _add_renoise(s)
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("evaluate", help="class models: FID, class alignment, diversity; text models: FID, patch FID, "
                                        "CLIP score; both: NFE and ms/image")
    e.add_argument("--model", default="mnist-teacher")
    e.add_argument("--num", type=_non_negative("--num"), default=None,
                   help="samples (class models: default 5000; text models: default one per prompt)")
    e.add_argument("--seed", type=_non_negative("--seed"), default=0,
                   help="batch b samples with seed + b, so seeds closer than num / 250 share images: independent "
                        "sample sets are 1000 apart (0, 1000, ...)")
    e.add_argument("--steps", type=_positive("--steps"), default=None)
    e.add_argument("--guidance", type=float, default=None, help=GUIDANCE_HELP + " (recorded in --json)")
    e.add_argument("--bf16", action="store_true", help="sample under bf16 autocast (default fp32)")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    _add_handover(e)
    _add_renoise(e)
    e.add_argument("--per-step", action="store_true",
                   help="multi-step class students: also score the x0 estimate after each step")
    e.add_argument("--optdigits", action="store_true",
                   help="class models: also score in a third space, a network trained on UCI optdigits, no MNIST "
                        "(optdigits_* keys; dmd2/metrics/optdigits.py)")
    t = e.add_argument_group("text-to-image models (SDXL, SD1.5)")
    t.add_argument("--prompts", default=None, help="prompt file: .txt (one per line) or .parquet (prompt/caption column)")
    t.add_argument("--ref-images", default=None, help="folder of reference images for FID and patch FID")
    t.add_argument("--inception-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: torch hub's checkpoints folder)")
    t.add_argument("--clip-weights", default=None, help="open_clip ViT-g-14 laion2b_s12b_b42k weight file "
                   "(default: the Hugging Face cache)")
    t.add_argument("--no-clip", action="store_true", help="skip the CLIP score (FID only)")
    t.add_argument("--batch-size", type=_positive("--batch-size"), default=8, help="prompts per sampling batch")
    e.set_defaults(fn=cmd_evaluate)
    g = sub.add_parser("grid", help="a PNG grid: one column per class, --rows samples each")
    g.add_argument("--model", default="mnist-teacher")
    g.add_argument("--rows", type=_positive("--rows"), default=10)
    g.add_argument("--seed", type=_non_negative("--seed"), default=0)
    g.add_argument("--steps", type=_positive("--steps"), default=None)
    g.add_argument("--guidance", type=float, default=None, help=GUIDANCE_HELP)
    g.add_argument("--out", required=True)
    _add_handover(g)
    _add_renoise(g)
    g.set_defaults(fn=cmd_grid)
    u = sub.add_parser("push", help="upload a finished run's student (weights, dmd2.json, model card) to the Hub")
    u.add_argument("--run", required=True, help="run folder, e.g. runs/sdxl-4step")
    u.add_argument("--repo", required=True, help="Hub model repo, e.g. your-name/dmd2-sdxl-4step")
    u.add_argument("--private", action="store_true", help="create the repo private")
    u.set_defaults(fn=cmd_push)
    return p


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    run_cli(lambda: a.fn(a))


if __name__ == "__main__":
    main(sys.argv[1:])
