#!/usr/bin/env bash
# The ablation table of README "Results" (DMD2 paper, Tables 3 and 4, at small scale): each variant
# is distilled from the embedded teacher for the same number of training steps (critic updates),
# then evaluated on 5,000 samples with the same evaluator.
#
#   bash benchmarks/ablation.sh [STEPS] [VARIANT ...]     # default 1000 steps, all variants
#
# Run folders go to runs/ablation-STEPS-NAME, results to results/ablation-STEPS-NAME.json.
# One variant uses one CPU thread; start two copies with different variants to use two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-1000}
shift || true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

declare -A variants=(
  # DMD without the regression loss and without TTUR: one critic update per generator update, no GAN
  [dmd-no-ttur]="--config configs/ablation/mnist-1step.yaml --set ttur=1 --set gan_generator_weight=0 --set gan_critic_weight=0"
  # + TTUR (5 critic updates per generator update), still no GAN
  [dmd-ttur]="--config configs/ablation/mnist-1step.yaml --set gan_generator_weight=0 --set gan_critic_weight=0"
  # + GAN: full DMD2 (the preset)
  [dmd2]="--config configs/ablation/mnist-1step.yaml"
  # GAN only: no distribution matching
  [gan-only]="--config configs/ablation/mnist-1step.yaml --set dm_weight=0"
  # 4-step student with and without backward simulation (without: inputs are noised real images)
  [4step]="--config configs/ablation/mnist-4step.yaml"
  [4step-no-backsim]="--config configs/ablation/mnist-4step.yaml --set backward_simulation=false"
)
order=(dmd-no-ttur dmd-ttur dmd2 gan-only 4step 4step-no-backsim)
[[ $# -gt 0 ]] && order=("$@")

for name in "${order[@]}"; do
  [[ -n "${variants[$name]:-}" ]] || { echo "unknown variant $name; known: ${!variants[*]}" >&2; exit 2; }
  out=runs/ablation-$steps-$name
  resume=()
  [[ -f $out/config.yaml ]] && resume=(--resume)
  # shellcheck disable=SC2086
  python -m training distill ${variants[$name]} --out "$out" "${resume[@]}" \
    --set iterations="$steps" --set eval_every=0 --set sample_every=500
  python -m dmd2 evaluate --model "$out/student" --num 5000 --json "results/ablation-$steps-$name.json"
done
