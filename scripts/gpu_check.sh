#!/usr/bin/env bash
# The design card's command on one CUDA GPU, in at most 10 minutes (docs/PERFORMANCE.md, "On a GPU"):
#   bash scripts/gpu_check.sh CORPUS [OUT]      e.g. bash scripts/gpu_check.sh ../shared/data/tinyshakespeare.txt
# Prepares CORPUS, then trains `python scripts/train.py model=baseline trainer.precision=P` for a fixed number
# of steps at 32-true and at bf16-mixed, and evaluates each on the test split. It prints one line per run:
# the median tokens/s of its log lines (the first ones, with CUDA's start-up, left out) and its test bpb, and
# writes the logs under OUT (default ./gpu_check). carlos has no torch.compile switch: the script says so.
set -euo pipefail
corpus=$1 out=${2:-gpu_check} steps=${STEPS:-1500}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; print(torch.cuda.get_device_name())"
mkdir -p "$out"
python scripts/prepare.py --input "$corpus" --workdir "$out/w" --overwrite true > "$out/prepare.log"
for precision in 32-true bf16-mixed; do
  run="p-$precision"
  timeout 240 python scripts/train.py model=baseline trainer.precision=$precision workdir="$out/w" run="$run" \
    overwrite=true trainer.max_steps="$steps" eval_interval=500 ckpt_interval=100000 > "$out/$run.log" 2>&1 || true
  tps=$(grep -o "[0-9,]* tokens/s" "$out/$run.log" | tr -d , | awk 'NR>3{print $1}' | sort -n |
    awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
  bpb=$(python scripts/eval.py --workdir "$out/w" --run "$run" --split test --compressors false --json true |
    tail -n 1 | python -c "import json, sys; print(round(json.load(sys.stdin)['bpb'], 4))")
  echo "model=baseline trainer.precision=$precision: ${tps:-?} tokens/s, test bpb $bpb ($steps steps; $out/$run.log)"
done
echo "torch.compile: not measured (carlos has no switch for it yet)"
