"""Why a method gains or loses per forward pass: gradient-norm estimates and step sizes from the
per-step losses that ``benchmarks/methods.py`` logs (``step_losses``, plan order).

For MeZO (points +eps z, -eps z): the projected gradient g = (l+ - l-) / (2 eps) has E[g^2] =
||grad L||^2, and its step -lr g z has expected progress along the unit gradient lr ||grad L|| and
norm lr |g| sqrt(d). For FZOO (centre, then N points +eps u_i): sigma / eps estimates ||grad L||
(research/fzoo.md, section 2), the step's progress along the unit gradient is about lr_code (=
lr / eps in the paper's form), its norm lr_code sqrt(d / N) times sqrt(N sum c_i^2). Per forward
pass: divide by the step's forward passes (2; N + 1).

    python benchmarks/methods_diagnostics.py benchmarks/logs/methods.jsonl
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path


def per_step(rec_steps, method, eps, n):
    """Per step: (estimate of ||grad L||, first-order progress along the unit gradient in units of
    lr (MeZO) or lr_code (FZOO), relative step norm /sqrt(d) in the same units)."""
    out = []
    for losses in rec_steps:
        if any(not math.isfinite(v) for v in losses):
            continue
        if method.startswith("fzoo"):
            l0, ls = losses[0], losses[1:]
            mean = sum(ls) / len(ls)
            ddof = 1 if method == "fzoo" else 0
            sigma = math.sqrt(sum((v - mean) ** 2 for v in ls) / (len(ls) - ddof))
            if sigma == 0:
                continue
            c = [(v - l0) / (len(ls) * sigma) for v in ls]
            out.append((sigma / eps, 1.0, math.sqrt(sum(x * x for x in c))))
        elif len(losses) == 2:
            g = (losses[0] - losses[1]) / (2 * eps)
            out.append((abs(g), None, abs(g)))
    return out


def main():
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/logs/methods.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    runs: dict = {}
    for r in records:
        if "timing" in r or "step_losses" not in r:
            continue
        runs.setdefault((r["method"], r["seed"], r["lr"]), []).append(r)
    print("| method | seed | lr | steps | grad-norm estimate, first / last quarter | "
          "progress along unit gradient per forward pass, first / last quarter | step norm / sqrt(d) per step, median |")
    print("|---|---|---|---|---|---|---|")
    for (method, seed, lr), recs in sorted(runs.items()):
        recs.sort(key=lambda r: r["forward_passes"])
        steps = [s for r in recs for s in r["step_losses"]]
        eps, n = recs[0]["eps"], recs[0].get("num_probes") or 1
        rows = per_step(steps, method, eps, n)
        if not rows:
            continue
        q = max(1, len(rows) // 4)
        first, last = rows[:q], rows[-q:]
        if method.startswith("fzoo"):
            lr_code = lr / eps if method == "fzoo" else lr
            fwd = n + 1
            prog = f"{lr_code / fwd:.2e} / {lr_code / fwd:.2e}"
            norm = statistics.median(lr_code * r[2] for r in rows)
        elif method == "mezo":
            # progress lr ||grad L|| per step with ||grad L|| ~ rms of g over the quarter
            def rms(rs):
                return math.sqrt(statistics.mean(r[0] ** 2 for r in rs))
            prog = f"{lr * rms(first) / 2:.2e} / {lr * rms(last) / 2:.2e}"
            norm = statistics.median(lr * r[2] for r in rows)
        else:
            continue
        g_first = math.sqrt(statistics.mean(r[0] ** 2 for r in first))
        g_last = math.sqrt(statistics.mean(r[0] ** 2 for r in last))
        print(f"| {method} | {seed} | {lr:g} | {len(rows)} | {g_first:.1f} / {g_last:.1f} | {prog} | {norm:.2e} |")


if __name__ == "__main__":
    main()
