"""Zero-shot and after-training accuracy on every task of the suite, with one fixed small budget.

For each task, `zotune train` (the library's own recipe) on SmolLM2-135M with MeZO's prompt and
data protocol: zero-shot test metric, then ``--steps`` ZO steps (full parameters, batch 16), then
the test metric of the best-dev parameters. Test and dev are capped (``--num-test``,
``--eval-dev``) to keep the CPU budget small; the cap is printed in the table. One JSON line per
task; the table goes to docs/benchmarks.md.

    python benchmarks/suite.py --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_speed import write_section  # noqa: E402

from zotune.config import DataConfig, MethodConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from zotune.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "squad"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("ZOTUNE_DATA"))
    p.add_argument("--tasks", nargs="*", default=TASKS)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--direction", default="pooled")
    p.add_argument("--num-test", type=int, default=100)
    p.add_argument("--num-test-squad", type=int, default=40)
    p.add_argument("--eval-dev", type=int, default=50)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--from-log", help="rebuild the table from the JSON lines of an earlier run")
    args = p.parse_args()
    rows = []
    if args.from_log:
        rows = [json.loads(line) for line in Path(args.from_log).read_text().splitlines()
                if line.startswith('{"task"')]
        return write_table(rows, args)
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            cfg = TrainConfig(
                model=ModelConfig(max_length=args.max_length),
                data=DataConfig(task=task, data_dir=args.data_dir, eval_dev=args.eval_dev,
                                num_test=args.num_test_squad if task == "squad" else args.num_test),
                method=MethodConfig(lr=args.lr, direction=args.direction),
                run=RunConfig(steps=args.steps, eval_every=args.steps, output_dir=f"{tmp}/{task}",
                              log_every=10))
            s = train(cfg, progress=False)
            row = {"task": task, "metric": s["metric"], "zero_shot": s["zero_shot"]["test"],
                   "trained": s["test"], "steps": s["steps"], "test_examples": s["test_examples"],
                   "train_examples": s["train_examples"], "wall_time_s": s["wall_time_s"]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_table(rows, args)


def write_table(rows, args):
    lines = ["| task | metric | test examples | zero-shot | after training | change | wall time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {r['test_examples']} | {r['zero_shot']:.1f} | "
                     f"{r['trained']:.1f} | {r['trained'] - r['zero_shot']:+.1f} | {r['wall_time_s']:.0f} |")
    argv = sys.argv[1:]
    if args.from_log:  # the command that produced the numbers, not the rebuild
        i = argv.index("--from-log")
        argv = argv[:i] + argv[i + 2:]
    cmd = "python benchmarks/suite.py " + " ".join(argv)
    done = {r["task"] for r in rows}
    missing = [t for t in args.tasks if t not in done]
    text = (f"## Task suite, small budget (`benchmarks/suite.py`)\n\nCommand: `{cmd.strip()}`\n\n"
            f"SmolLM2-135M, full parameters, `zotune train --method mezo --direction {args.direction} "
            f"--lr {args.lr} --steps {args.steps}` per task (batch 16, eps 1e-3), MeZO's data protocol; "
            f"test capped at {args.num_test} examples ({args.num_test_squad} for SQuAD), dev at "
            f"{args.eval_dev}, sequences at {args.max_length} tokens. A budget this small moves "
            "little; it shows that the tasks run end to end and where zero-shot stands.\n\n"
            + "\n".join(lines) + "\n"
            + (f"\nNot finished in the run recorded here: {', '.join(missing)}.\n" if missing else ""))
    write_section(Path(args.out), text, "suite")


if __name__ == "__main__":
    main()
