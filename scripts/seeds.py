"""Issue 18's seed tables: train a preset for several seeds, score each student on several sample sets with every
measure of `python -m dmd2 evaluate`, and print the mean and spread over seeds beside reference models.

    python scripts/seeds.py --preset configs/mnist-1step.yaml --seeds 0 1 2 [--sample-sets 0 1] [--num 5000] \
        [--reference mnist-teacher=results/teacher-independent-seed0.json ...] [--parallel N] [--dry-run] [--table-only]

Each seed trains into `<runs>/<preset>-seed<S>` (`python -m training distill --config PRESET --set seed=S`; an
unfinished run resumes, a finished one is kept), then each sample set k is scored into
`<results>/<preset>-seed<S>-set<k>.json` (`python -m dmd2 evaluate --model <run>/student --seed <1000 k>`, sets
that share no image). A result that exists is not recomputed unless the seed trains now or the result is older than the student it names (a result
committed to the repository, or left by an earlier run of the same name, beside a student trained here);
`--table-only` leaves such a seed out of the table instead.
`--parallel N` trains N seeds at once first (each one's output in `<run>.log`), as a GPU or a many-core CPU
affords, then scores N sample sets at once (`<run>-set<k>.log`; `--score-parallel M` for another count: scoring
runs on the CPU, so 2 on a 2-core machine). The table gives, per measure, each seed's mean over the sample sets,
the mean and standard deviation over seeds and their range, and each reference row (e.g. the teacher, from its
own evaluate JSONs); the last lines say, per reference, on which measures every seed beats it. The selection
measure that picked the preset's settings is the classifier FID ("fid"); the others are the independent check.
A last row gives each seed's training wall time, summed over the stretches of a resumed run (from its
metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dmd2.families.base import ModelLoadError, read_json_object
from dmd2.sampling import sample_set_seed
from training.runs import Run

ROOT = Path(__file__).resolve().parent.parent

# (key, label, better): "lower", "higher", or "one" (closer to 1 is better: the diversity ratio, and density,
# which exceeds 1 when samples crowd the real data's dense regions; Naeem et al. 2020)
MEASURES = [
    ("fid", "FID (classifier; selection)", "lower"),
    ("alignment", "alignment", "higher"),
    ("diversity_ratio", "diversity ratio", "one"),
    ("classifier_kid", "KID (classifier)", "lower"),
    ("classifier_precision", "precision (classifier)", "higher"),
    ("classifier_recall", "recall (classifier)", "higher"),
    ("classifier_density", "density (classifier)", "one"),
    ("classifier_coverage", "coverage (classifier)", "higher"),
    ("autoencoder_fid", "FID (autoencoder)", "lower"),
    ("autoencoder_kid", "KID (autoencoder)", "lower"),
    ("autoencoder_precision", "precision (autoencoder)", "higher"),
    ("autoencoder_recall", "recall (autoencoder)", "higher"),
    ("autoencoder_density", "density (autoencoder)", "one"),
    ("autoencoder_coverage", "coverage (autoencoder)", "higher"),
]


def fmt(value: float, key: str) -> str:
    """A measure's value as the tables print it: FID and KID (as evaluate writes them, in the feature spaces'
    own units) with 2 decimals, the rest with 3."""
    return f"{value:.2f}" if key.endswith(("fid", "kid")) else f"{value:.3f}"


def beats(a: float, b: float, better: str) -> bool:
    """Is value a strictly better than b for a measure of this direction?"""
    if better == "lower":
        return a < b
    if better == "higher":
        return a > b
    return abs(a - 1) < abs(b - 1)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def train_command(preset: Path, seed: int, run: Path, overrides: list[str]) -> list[str] | None:
    """The command that trains (or resumes) seed `seed`'s run; None when it has finished."""
    status = run / "status.json"
    state = None
    if status.is_file():
        try:
            state = json.loads(status.read_text()).get("state")
        except (ValueError, AttributeError, OSError) as e:
            raise SystemExit(f"error: seed {seed}: {_rel(status)} cannot be read ({e}); repair it or move the run "
                             f"folder away to start that seed again") from None
    if state == "finished" and (run / "student").is_dir():
        return None
    cmd = [sys.executable, "-m", "training", "distill", "--out", _rel(run)]
    if state is None:
        cmd += ["--config", _rel(preset), "--set", f"seed={seed}"] + [x for o in overrides for x in ("--set", o)]
    else:
        cmd += ["--resume"]
    return cmd


def stale_result(out: Path, run: Path) -> bool:
    """Does `out` score another student of this name: is it older than the newest file of the run's student here
    (a result committed to the repository, or left by an earlier run, beside a student trained since)? A table of
    it would put those numbers beside this run's wall time."""
    student = run / "student"
    if not out.is_file() or not student.is_dir():
        return False
    newest = max((f.stat().st_mtime for f in student.rglob("*") if f.is_file()), default=student.stat().st_mtime)
    return out.stat().st_mtime < newest


def evaluate_command(model: str, sample_set: int, num: int, out: Path) -> list[str]:
    """Score sample set k: `evaluate --seed <1000 k>` (sets that share no image; dmd2.sampling.sample_set_seed)."""
    return [sys.executable, "-m", "dmd2", "evaluate", "--model", model, "--num", str(num),
            "--seed", str(sample_set_seed(sample_set)), "--json", _rel(out)]


def load_result(path: Path) -> dict:
    try:
        return read_json_object(path)
    except ModelLoadError as e:
        raise SystemExit(f"error: result {e}") from None


def mean_over(results: list[dict]) -> dict[str, float]:
    """Each measure's mean over the given results (the sample sets of one seed, or a reference's files); a
    measure evaluate could not compute (null, e.g. precision on very few samples) is left out."""
    out = {}
    for key, _, _ in MEASURES:
        values = [r[key] for r in results if r.get(key) is not None]
        if values:
            out[key] = statistics.fmean(values)
    return out


def training_minutes(run: Path) -> float | None:
    """Wall time of a run's training in minutes, from its log: the trainer's clock restarts at 0 on a resume, so
    each stretch's last reading is added (work done after a stretch's last checkpoint and redone is not counted)."""
    clock = [r["seconds"] for r in Run(run).metrics() if "seconds" in r]
    if not clock:
        return None
    total = sum(a for a, b in zip(clock, clock[1:]) if b < a)
    return (total + clock[-1]) / 60


def table(name: str, per_seed: dict[int, dict[str, float]], references: dict[str, dict[str, float]],
          minutes: dict[int, float] | None = None, overlapping: list[int] | None = None) -> str:
    """The markdown table: a row per measure, a column per seed, mean +- sd (range), and the references; then
    each seed's training wall time where known; then which seeds' sample sets overlap (`overlapping`)."""
    seeds = sorted(per_seed)
    head = ["measure", *[f"seed {s}" for s in seeds], f"{name}: mean +- sd (min-max)", *references]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, _ in MEASURES:
        values = [per_seed[s][key] for s in seeds if key in per_seed[s]]
        if not values:
            continue
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        mean, lo, hi = (fmt(v, key) for v in (statistics.fmean(values), min(values), max(values)))
        summary = f"{mean} +- {fmt(spread, key)} ({lo}-{hi})"
        refs = [fmt(r[key], key) if key in r else "-" for r in references.values()]
        lines.append("| " + " | ".join([label, *[fmt(per_seed[s][key], key) for s in seeds if key in per_seed[s]],
                                        summary, *refs]) + " |")
    known = [minutes[s] for s in seeds if minutes and minutes.get(s) is not None]
    if len(known) == len(seeds):
        spread = statistics.stdev(known) if len(known) > 1 else 0.0
        summary = f"{statistics.fmean(known):.1f} +- {spread:.1f} ({min(known):.1f}-{max(known):.1f})"
        lines.append("| " + " | ".join(["training wall time, min", *[f"{m:.1f}" for m in known], summary,
                                        *["-"] * len(references)]) + " |")
    for ref, values in references.items():
        wins = [label for key, label, better in MEASURES
                if key in values and all(key in per_seed[s] and beats(per_seed[s][key], values[key], better)
                                         for s in seeds)]
        losses = [label for key, label, better in MEASURES if key in values and label not in wins]
        lines.append(f"\nEvery seed beats {ref} on {len(wins)} of {len(wins) + len(losses)} measures"
                     + (f"; not on: {', '.join(losses)}." if losses else " (all)."))
    if overlapping:
        lines.append(f"\nSeeds {', '.join(map(str, overlapping))}: a sample set after the first was scored at "
                     "--seed k (before 2026-12-07), so it shares all batches but one with set 0; their values are, "
                     "in effect, one sample set each.")
    return "\n".join(lines)


def run_in_parallel(jobs: dict[str, tuple[list[str], Path]], parallel: int, what: str) -> None:
    """Run the commands `parallel` at a time (one GPU or many cores hold several of these small runs at once),
    each one's output appended to its log file. A failure is named after all have ended, so the jobs that did
    finish are kept, and the failures are listed in the jobs' order, whichever ended first. `jobs` maps a name
    ("seed 1") to (command, log)."""
    pending, active, failed = list(jobs.items()), {}, {}
    while pending or active:
        while pending and len(active) < parallel:
            job, (cmd, log) = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"$ {shlex.join(['python', *cmd[1:]])}  > {_rel(log)}", flush=True)
            with open(log, "a") as out:
                active[job] = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        ended = [job for job, proc in active.items() if proc.poll() is not None]
        if not ended:
            time.sleep(1)
        for job in ended:
            code = active.pop(job).returncode
            if code != 0:
                failed[job] = f"{job} (exit {code}; see {_rel(jobs[job][1])})"
    if failed:
        raise SystemExit(f"error: {what} failed for " + ", ".join(failed[job] for job in jobs if job in failed))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", type=Path, required=True, help="a distillation preset, e.g. configs/mnist-1step.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--sample-sets", type=int, nargs="+", default=[0, 1], help="evaluate --seed of each sample set")
    p.add_argument("--num", type=int, default=5000, help="samples per evaluation")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every seed's run (e.g. iterations=1000)")
    p.add_argument("--reference", action="append", default=[], metavar="NAME=JSON[,JSON...]",
                   help="a reference row from evaluate JSONs (means over the files), e.g. the teacher's")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "seeds")
    p.add_argument("--results", type=Path, default=ROOT / "results" / "seeds")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="train N seeds at once (on a GPU or a many-core CPU), then score them")
    p.add_argument("--score-parallel", type=int, default=None, metavar="M",
                   help="with --parallel: score M sample sets at once (default N; scoring is CPU-bound: the cores)")
    p.add_argument("--dry-run", action="store_true", help="print the commands still to run, run none")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing; table the results already there (a seed whose results are older than its "
                        "student here is left out)")
    a = p.parse_args(argv)
    if not a.preset.is_file():
        p.error(f"--preset {a.preset}: no such file")
    if a.num < 2:
        p.error(f"--num must be at least 2, got {a.num}")
    if a.parallel < 1:
        p.error(f"--parallel must be at least 1, got {a.parallel}")
    if a.score_parallel is not None and (a.score_parallel < 1 or a.parallel == 1):
        p.error(f"--score-parallel must be at least 1 and comes with --parallel N > 1, got {a.score_parallel}")
    if len(set(a.seeds)) != len(a.seeds):
        p.error(f"--seeds repeats a seed: {a.seeds}")
    references = {}
    for item in a.reference:
        ref_name, sep, files = item.partition("=")
        if not sep or not ref_name or not files:
            p.error(f"--reference {item!r} must look like NAME=JSON[,JSON...]")
        references[ref_name] = mean_over([load_result(Path(f)) for f in files.split(",")])
    name = a.preset.stem
    runs = {seed: a.runs / f"{name}-seed{seed}" for seed in a.seeds}
    outs = {seed: {k: a.results / f"{name}-seed{seed}-set{k}.json" for k in a.sample_sets} for seed in a.seeds}
    stale = {seed: [k for k, out in outs[seed].items() if stale_result(out, runs[seed])] for seed in a.seeds}
    for seed, sets in stale.items():
        for k in sets:
            print(f"{_rel(outs[seed][k])} is older than {_rel(runs[seed] / 'student')}: "
                  + ("seed left out of the table (score it again without --table-only)" if a.table_only
                     else "scoring it again"), flush=True)

    def to_score(seed: int, trains_now: bool) -> list[int]:
        """Sample sets to (re)compute: all of them after a training (the old results scored another student),
        else the missing and the stale ones; none with --table-only."""
        if a.table_only:
            return []
        return [k for k, out in outs[seed].items() if trains_now or not out.is_file() or k in stale[seed]]

    if a.parallel > 1:  # train every seed, `parallel` at a time, then score every sample set the same way
        trains = {seed: cmd for seed, run in runs.items() if (cmd := train_command(a.preset, seed, run, a.overrides))}
        scores = {(seed, k): evaluate_command(_rel(runs[seed] / "student"), k, a.num, outs[seed][k])
                  for seed in a.seeds for k in to_score(seed, seed in trains)}
        if a.dry_run:
            for cmd in [*trains.values(), *scores.values()]:
                print("$ " + shlex.join(["python", *cmd[1:]]), flush=True)
        elif not a.table_only:
            run_in_parallel({f"seed {seed}": (cmd, runs[seed].parent / f"{runs[seed].name}.log")
                             for seed, cmd in trains.items()}, a.parallel, "training")
            a.results.mkdir(parents=True, exist_ok=True)
            run_in_parallel({f"seed {seed} sample set {k}": (cmd, runs[seed].parent / f"{runs[seed].name}-set{k}.log")
                             for (seed, k), cmd in scores.items()}, a.score_parallel or a.parallel, "scoring")
    per_seed, minutes, overlapping = {}, {}, []
    for seed in a.seeds:
        run = runs[seed]
        steps = []
        if a.parallel == 1 and not a.table_only:  # one command at a time, each seed trained then scored
            if (train := train_command(a.preset, seed, run, a.overrides)) is not None:
                steps.append(train)
            steps += [evaluate_command(_rel(run / "student"), k, a.num, outs[seed][k])
                      for k in to_score(seed, train is not None)]
        for cmd in steps:
            print("$ " + shlex.join(["python", *cmd[1:]]), flush=True)
            if a.dry_run:
                continue
            a.results.mkdir(parents=True, exist_ok=True)
            done = subprocess.run(cmd, cwd=ROOT)
            if done.returncode != 0:
                raise SystemExit(f"error: seed {seed}: `{shlex.join(cmd[1:])}` exited with {done.returncode}")
        if stale[seed] and (a.dry_run or a.table_only):
            continue  # its results score another student: not tabled beside this run's wall time
        present = {k: load_result(out) for k, out in outs[seed].items() if out.is_file()}
        if present:
            per_seed[seed] = mean_over(list(present.values()))
            if len(present) > 1 and any(r.get("seed", sample_set_seed(k)) != sample_set_seed(k)
                                        for k, r in present.items()):
                overlapping.append(seed)
            minutes[seed] = training_minutes(run) if run.is_dir() else None
    if not per_seed:
        print("no results yet" + (" (dry run)" if a.dry_run else ""))
        return
    text = table(name, per_seed, references, minutes, overlapping)
    print()
    print(text)
    if not a.dry_run:  # beside the JSONs it tables (a dry run's table would be of what is there, not of this run)
        a.results.mkdir(parents=True, exist_ok=True)
        (a.results / f"{name}-table.md").write_text(text + "\n")
        print(f"\n(written to {_rel(a.results / f'{name}-table.md')})")


if __name__ == "__main__":
    main()
