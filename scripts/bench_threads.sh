#!/usr/bin/env bash
# How torch's CPU threads fare on a quiet and on a busy machine (docs/PERFORMANCE.md, "Threads"):
# a 200-step training run (median tokens/s of its log lines) and a 200-token sample, with carlos's own
# choice of OpenMP's wait policy against the fixed ones. "busy": another process runs 2 torch threads of
# small matrix products on the cores meanwhile, as a second tiny training run would.
#   bash scripts/bench_threads.sh WORKDIR [ROUNDS]     (WORKDIR: prepared and trained, e.g. by make demo)
set -euo pipefail
workdir=$1 rounds=${2:-1}
unset OMP_WAIT_POLICY OMP_NUM_THREADS
busy='import torch
torch.set_num_threads(2)
a, w = torch.randn(32, 128, 64), torch.randn(64, 64)
while True:
    a = torch.tanh(a @ w) * 0.5 + 0.1'
one() {
  local label=$1; shift
  local t0 t1 t2 tps
  t0=$(date +%s.%N)
  env "$@" carlos train --workdir "$workdir" --run threads-bench --overwrite true --max_steps 200 \
    --eval_interval 1000 --ckpt_interval 1000 --sample_tokens 0 > "$workdir/threads-bench.log" 2>&1
  t1=$(date +%s.%N)
  env "$@" carlos sample --workdir "$workdir" --run threads-bench --max_new_tokens 200 > /dev/null 2>&1
  t2=$(date +%s.%N)
  tps=$(grep -o "[0-9,]* tokens/s" "$workdir/threads-bench.log" | tr -d , | awk 'NR>2{print $1}' | sort -n |
    awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
  printf '%s %-14s train tokens/s %6s  train wall %5.1f s  sample 200 tokens %4.1f s\n' \
    "$mode" "$label" "$tps" "$(echo "$t1-$t0" | bc)" "$(echo "$t2-$t1" | bc)"
}
for round in $(seq "$rounds"); do
  for mode in quiet busy; do
    spinner=
    if [ $mode = busy ]; then python -c "$busy" & spinner=$!; sleep 1; fi
    one carlos-chooses CARLOS_BENCH_ROUND="$round"
    one ACTIVE OMP_WAIT_POLICY=ACTIVE
    one PASSIVE OMP_WAIT_POLICY=PASSIVE
    one 1-thread OMP_NUM_THREADS=1
    if [ -n "$spinner" ]; then kill "$spinner"; fi
  done
done
