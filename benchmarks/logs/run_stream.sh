#!/bin/bash
# One stream of benchmark runs (issue 16): each line of the plan file is one run of
# benchmarks/methods.py ("LOG SEED METHOD BUDGET EVAL_EVERY SPLIT [extra args]"); the log is
# committed after each run, so nothing measured is lost.
cd "$(dirname "$0")/../.."
export PYTHONPATH=src ZOTUNE_DATA=/work/shared/data OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=/work/main/.venv/bin/python
while read -r log seed method budget every split extra; do
  [ -z "$log" ] || [ "${log#\#}" != "$log" ] && continue
  echo "$(date -u +%H:%M:%S) start $log $seed $method $budget $extra" >&2
  nice -n 10 $PY benchmarks/methods.py --tasks sst2 --trainable full --seeds "$seed" --methods "$method" \
    --budget "$budget" --eval-every "$every" --eval-split "$split" --test-size 128 --log "$log" --no-summary $extra < /dev/null
  echo "$(date -u +%H:%M:%S) end $log $seed $method rc=$?" >&2
  for i in 1 2 3 4 5 6 7 8 9 10; do
    git add "$log" && git commit -q -m "methods benchmark: $method seed $seed ($budget forward passes) $extra" -- "$log" && break
    sleep 3
  done
done < "$1"
