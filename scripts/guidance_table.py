"""Issue 19's table: the teacher (50 DDIM steps, CFG w), a guidance-conditioned student at w and fixed-w
students, at several w, each scored on 5,000 samples by `python -m dmd2 evaluate`.

    python scripts/guidance_table.py --guided assets/mnist/dmd2-1step-guided --fixed 2=runs/fixed-w2/student \
        [--fixed 1=mnist-dmd2-1step] [--w 1 1.5 2 3] [--seed 0] [--teacher-bf16] [--dry-run]

Runs every evaluation whose JSON (under --results) is missing, then prints a markdown table with each row's
command. The teacher's 5,000 samples at 50 steps with CFG take ~25 min per w on one thread under bf16
autocast (--teacher-bf16), twice that in fp32; a 1-step student takes seconds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def evaluation(model: str, w: float, seed: int, results: Path, tag: str, bf16: bool = False,
               steps: int | None = None, give_w: bool = True) -> tuple[list[str], Path]:
    """The evaluate command for `model` at w (`give_w` False: a student trained at w, which takes none)
    and the JSON it writes."""
    out = results / f"{tag}-w{w:g}{'-bf16' if bf16 else ''}{f'-seed{seed}' if seed else ''}.json"
    cmd = ["python", "-m", "dmd2", "evaluate", "--model", model, "--num", "5000"] + (["--guidance", f"{w:g}"] if give_w else [])
    cmd += (["--steps", str(steps)] if steps else []) + (["--seed", str(seed)] if seed else [])
    cmd += (["--bf16"] if bf16 else []) + ["--json", str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out)]
    return cmd, out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guided", required=True, help="the guidance-conditioned student (folder or registry name)")
    p.add_argument("--fixed", action="append", default=[], metavar="W=MODEL",
                   help="a student trained at one w (repeatable)")
    p.add_argument("--tag", default="guidance-guided", help="file-name prefix of the guided student's results")
    p.add_argument("--teacher", default="mnist-teacher")
    p.add_argument("--w", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    p.add_argument("--seed", type=int, default=0, help="sample set of evaluate")
    p.add_argument("--teacher-bf16", action="store_true", help="sample the teacher under bf16 autocast")
    p.add_argument("--results", type=Path, default=ROOT / "results")
    p.add_argument("--dry-run", action="store_true", help="print the commands of missing results only")
    a = p.parse_args(argv)
    fixed = {}
    for item in a.fixed:
        w, sep, model = item.partition("=")
        try:
            fixed[float(w)] = model
        except ValueError:
            sep = ""
        if not sep or not model:
            p.error(f"--fixed {item!r} must look like W=MODEL, e.g. 2=runs/fixed-w2/student")
    rows = []   # (w, what, command, json path)
    for w in a.w:
        rows.append((w, "teacher, 50 steps, CFG w", *evaluation(a.teacher, w, a.seed, a.results, "guidance-teacher",
                                                               a.teacher_bf16, steps=50)))
        rows.append((w, "guidance-conditioned 1-step student", *evaluation(a.guided, w, a.seed, a.results, a.tag)))
        if w in fixed:
            rows.append((w, f"1-step student trained at w={w:g}", *evaluation(fixed[w], w, a.seed, a.results,
                                                                             "guidance-fixed", give_w=False)))
    for i, (w, what, cmd, out) in enumerate(rows):
        if out.is_file():
            continue
        if "--bf16" in cmd:   # the teacher scored in fp32 at this w already: use it (the table says which)
            fp32_cmd, fp32_out = evaluation(a.teacher, w, a.seed, a.results, "guidance-teacher", False, steps=50)
            if fp32_out.is_file():
                rows[i] = (w, what, fp32_cmd, fp32_out)
                continue
        print("$", shlex.join(cmd), flush=True)
        if not a.dry_run:
            subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, check=True)
    if a.dry_run:
        return
    print("\n| w | model | sampled in | FID | alignment | diversity | command |\n|---|---|---|---|---|---|---|")
    for w, what, cmd, out in rows:
        r = json.loads(out.read_text())
        print(f"| {w:g} | {what} | {r.get('precision', 'fp32')} | {r['fid']:.2f} | {r['alignment']:.3f} | "
              f"{r['diversity_ratio']:.3f} | `{shlex.join(cmd)}` |")


if __name__ == "__main__":
    main()
