#!/usr/bin/env bash
# Rebuild the embedded 4-step student (assets/mnist/dmd2-4step) from the repository, end to end:
# four distillation stages chained by generator_init, stages 2-4 each exported as a checkpoint mean.
#
#   bash scripts/rebuild_4step.sh [OUT]        (or `make rebuild-4step`; OUT defaults to runs/rebuild-4step)
#
#   OUT/stage1          configs/mnist-4step.yaml, from assets/mnist/dmd2-1step    (2,600 iterations)
#   OUT/stage2          configs/mnist-4step-stage2.yaml, from OUT/stage1/student   (1,500)
#   OUT/stage2-export   mean of stage 2's start and all its kept checkpoints      (steps 0 250 ... 1500)
#   OUT/stage3          configs/mnist-4step-stage3.yaml, from OUT/stage2-export    (1,500, stopped after 500)
#   OUT/stage3-export   mean of stage 3's start and its checkpoints up to 500      (steps 0 125 250 375 500)
#   OUT/stage4          configs/mnist-4step-stage4.yaml, from OUT/stage3-export    (1,500, stopped after 500)
#   OUT/stage4-export   the same rule: the 4-step student (copy it to assets/mnist/dmd2-4step to serve it)
#
# About 100 minutes on one CPU thread. Re-running it skips every step whose output exists and resumes an
# unfinished run from its last checkpoint (--resume, with the run's own config.yaml).
# Environment:
#   REBUILD_SET="k=v k=v"   extra --set overrides for every stage, split at spaces (tests: "iterations=6 ...")
#   REBUILD_STOP_AFTER=N    where stages 3 and 4 stop (default 500); a multiple of their checkpoint_every
#   PYTHON=...              the interpreter (default .venv/bin/python, else python3)
#   OMP_NUM_THREADS=N       threads; by default 1 (stages 1-3) and 2 (stage 4), as the recorded runs had
set -euo pipefail

out=${1:-runs/rebuild-4step}
if [ $# -ge 1 ] && [[ $out != /* ]]; then out="$PWD/$out"; fi    # a given folder is relative to the caller
cd "$(dirname "$0")/.."                                            # the presets' paths are repository-relative
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || command -v "$py" >/dev/null || py=python3
stop=${REBUILD_STOP_AFTER:-500}
read -r -a extra <<< "${REBUILD_SET:-}"
sets=()
for kv in ${extra[@]+"${extra[@]}"}; do sets+=(--set "$kv"); done

# threads N CMD...: print the command, then run it with OMP_NUM_THREADS=N.
show() { printf '+ OMP_NUM_THREADS=%s' "$1"; shift; printf ' %q' "$@"; printf '\n'; }
threads() { show "$@"; OMP_NUM_THREADS=$1 "${@:2}"; }
skip() { echo "skip: $1 exists"; }

# The state of a run folder: "finished", "done-to-N" (a complete checkpoint of step N >= $2 exists), or "".
run_state() {
    "$py" - "$1" "${2:-0}" <<'EOF'
import json, sys
from pathlib import Path
run, stop = Path(sys.argv[1]), int(sys.argv[2])
try:
    state = json.loads((run / "status.json").read_text()).get("state")
except (OSError, ValueError):
    state = None
steps = [int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*") if (p / "state.pt").is_file()]
if state == "finished" and (run / "student").is_dir():
    print("finished")
elif stop and any(n >= stop for n in steps):
    print(f"done-to-{max(steps)}")
EOF
}

# Export steps: 0 (the run's start) and every complete kept checkpoint up to $2 (0: all).
export_steps() {
    "$py" - "$1" "${2:-0}" <<'EOF'
import sys
from pathlib import Path
run, stop = Path(sys.argv[1]), int(sys.argv[2])
steps = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*") if (p / "state.pt").is_file())
print(" ".join(map(str, [0] + [n for n in steps if not stop or n <= stop])))
EOF
}

# distill CONFIG RUN INIT THREADS [STOP]: python -m training distill, resumed if RUN holds a run; with STOP,
# the trainer's own distill(stop_after=STOP) behind the same CLI (the CLI has no option to stop early, and a
# shorter `iterations` would change the LR schedule).
distill() {
    local config=$1 dir=$2 init=$3 nthreads=$4 stop=${5:-}
    local args=(--config "$config" --out "$dir" --set "generator_init=$init" ${sets[@]+"${sets[@]}"})
    if [ -f "$dir/config.yaml" ]; then args=(--out "$dir" --resume); fi  # continue with the config it started with
    if [ -z "$stop" ]; then
        threads "$nthreads" "$py" -m training distill "${args[@]}"
    else
        show "$nthreads" "$py" -m training distill "${args[@]}"
        echo "  (run as distill(stop_after=$stop) behind the same CLI: it leaves the loop after step $stop)"
        OMP_NUM_THREADS=$nthreads "$py" -c '
import functools, sys
import training.distill as d
from dmd2.cli import run_cli
from training.runs import RunError
d.distill = functools.partial(d.distill, stop_after=int(sys.argv[1]))
run_cli(lambda: d.main(sys.argv[2:]), extra_errors=(RunError,))' "$stop" "${args[@]}"
        case "$(run_state "$dir" "$stop")" in
            finished|done-to-*) ;;
            *) echo "error: $dir did not reach step $stop (is it a multiple of checkpoint_every?)" >&2; exit 1 ;;
        esac
    fi
}

# export RUN OUT STOP EXPECTED: the checkpoint mean; EXPECTED are the card's steps, checked for the real recipe.
export_run() {
    local dir=$1 dest=$2 stop=$3 expected=$4 steps
    steps=$(export_steps "$dir" "$stop")
    if [ -z "${REBUILD_SET:-}" ] && [ "${REBUILD_STOP_AFTER:-500}" = 500 ] && [ "$steps" != "$expected" ]; then
        echo "error: $dir has checkpoints for steps '$steps', the recipe exports '$expected'" >&2
        exit 1
    fi
    # shellcheck disable=SC2086  # $steps is a list of numbers
    threads "${OMP_NUM_THREADS:-1}" "$py" -m training export --run "$dir" --step $steps --out "$dest"
}

t1=${OMP_NUM_THREADS:-1} t4=${OMP_NUM_THREADS:-2}
mkdir -p "$out"

# Stage 1: from the 1-step student. Not needed once export 2 exists (its step 0 is this student).
if [ -n "$(run_state "$out/stage1")" ]; then skip "$out/stage1/student"
elif [ -d "$out/stage2-export" ]; then skip "$out/stage2-export"
else distill configs/mnist-4step.yaml "$out/stage1" assets/mnist/dmd2-1step "$t1"
fi

if [ -d "$out/stage2-export" ]; then skip "$out/stage2-export"
else
    if [ -n "$(run_state "$out/stage2")" ]; then skip "$out/stage2/student"
    else distill configs/mnist-4step-stage2.yaml "$out/stage2" "$out/stage1/student" "$t1"
    fi
    export_run "$out/stage2" "$out/stage2-export" 0 "0 250 500 750 1000 1250 1500"
fi

for stage in 3 4; do
    prev="$out/stage$((stage - 1))-export" dir="$out/stage$stage"
    if [ "$stage" = 4 ]; then nthreads=$t4; else nthreads=$t1; fi
    if [ -d "$dir-export" ]; then skip "$dir-export"; continue; fi
    if [ -n "$(run_state "$dir" "$stop")" ]; then skip "$dir (step $stop)"
    else distill "configs/mnist-4step-stage$stage.yaml" "$dir" "$prev" "$nthreads" "$stop"
    fi
    export_run "$dir" "$dir-export" "$stop" "0 125 250 375 500"
done

echo "the 4-step student: $out/stage4-export (to serve it: cp $out/stage4-export/{config.json,diffusion_pytorch_model.safetensors,dmd2.json,scheduler_config.json} assets/mnist/dmd2-4step/)"
