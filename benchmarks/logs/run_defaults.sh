#!/bin/bash
# One stream of benchmarks/defaults.py runs (issue 16 scope 4): one task per invocation, the log
# committed after each, so nothing measured is lost.
cd "$(dirname "$0")/../.."
export PYTHONPATH=src ZOTUNE_DATA=/work/shared/data OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=/work/main/.venv/bin/python
log=benchmarks/logs/defaults.jsonl
steps=${STEPS:-40}
lr=${LR:+--lr $LR}  # a diagnostic run away from the default lr
num_test=${NUM_TEST:-100}
for task in "$@"; do
  echo "$(date -u +%H:%M:%S) start $task" >&2
  nice -n 10 $PY benchmarks/defaults.py --tasks "$task" --steps "$steps" --num-test "$num_test" $lr --log "$log" \
    --out /tmp/defaults_table.md < /dev/null
  echo "$(date -u +%H:%M:%S) end $task rc=$?" >&2
  for i in 1 2 3 4 5 6 7 8 9 10; do
    git add "$log" && git commit -q -m "defaults benchmark: $task ($steps steps at the CLI defaults${LR:+, lr $LR}, $num_test test examples at most)" -- "$log" && break
    sleep 3
  done
done
