"""ZO-RankSGD benchmarks: optimisation from rankings against optimisation from values.

Synthetic (``--part synthetic``): f(x) = ||x||^2 (3,000 queries) and Rosenbrock from 0 (10,000),
d = 100, mu = 0.01, f against oracle queries (points evaluated) for (m, k) in {(10,1), (10,5),
(10,10), (20,20)}, plain, with the ranking line search (l = 5, gamma = 0.5) and with its adaptive
grid, against value-based ZO-SGD with 10 queries a step (two-sided SPSA with 5 probes, and the
note's one-sided form with 9 probes and the centre). Each configuration runs 3 seeds; the table
gives the median final f and, for ZO-RankSGD (10,10) with line search, the queries it needs to
reach each baseline's final f.

RL (``--part rl``): Swimmer-v5 and HalfCheetah-v5 (``--envs``), 3 seeds, return against training
episodes for ZO-RankSGD (m=16, k=8), value-based ZO on returns (FZOO) and CMA-ES, 2000 episodes
each (``--episodes``), run one after another on one thread (``zotune rank rl``'s code). Every
finished run is appended to ``--log`` (docs/ranksgd_rl_results.jsonl: settings, summary and
evaluation curve, one JSON line a run; a run already there is skipped), and the tables and plots
are built from that log alone (``--from-log`` rebuilds them without running anything).

    python benchmarks/ranksgd.py --part synthetic
    python benchmarks/ranksgd.py --part rl --envs Swimmer-v5 HalfCheetah-v5
    python benchmarks/ranksgd.py --part rl --from-log
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import zotune  # noqa: E402
from zotune.ranking import ByValue  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
MK = [(10, 1), (10, 5), (10, 10), (20, 20)]
SEEDS = (0, 1, 2)


# ----------------------------------------------------------------- synthetic

def quadratic(x):
    return float((x * x).sum())


def rosenbrock(x):
    return float((100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum())


FUNCTIONS = {"quadratic": (quadratic, lambda g: torch.randn(100, generator=g, dtype=torch.float64)),
             "rosenbrock": (rosenbrock, lambda g: torch.zeros(100, dtype=torch.float64))}
# step sizes: the note's (A.8) for the quadratic (ZO-SGD two-sided: 0.02 is the best of {0.005,
# 0.01, 0.02, 0.05}, 0.05 diverges). Rosenbrock from x = 0 (f = 99) over 20,000 queries, chosen at
# seed 0 for (10, 10): plain from {3e-3, 1e-2}, line search from {0.05, 0.2}, ZO-SGD from {1e-5,
# 3e-5, 1e-4, 3e-4, 1e-3} (1e-3 diverges).
LR = {"quadratic": {"plain": 0.05, "line-search": 0.5, "adaptive": 0.5, "zo-sgd": 0.02},
      "rosenbrock": {"plain": 0.01, "line-search": 0.05, "adaptive": 0.05, "zo-sgd": 3e-4}}
BUDGET = {"quadratic": 3000, "rosenbrock": 10000}
MODES = ("plain", "line-search", "adaptive")


def run_rank(name, m, k, mode, seed, budget):
    fn, init = FUNCTIONS[name]
    x = init(torch.Generator().manual_seed(seed))
    kw = dict(mode="line-search", line_search=5, adaptive=mode == "adaptive") if mode != "plain" else {}
    opt = zotune.RankSGD([x], lr=LR[name][mode], mu=0.01, m=m, k=k, seed=seed, **kw)
    oracle = ByValue(lambda: fn(x))
    curve = [(0, fn(x))]
    while oracle.evaluations < budget:
        opt.step(oracle)
        curve.append((oracle.evaluations, fn(x)))
    return curve


def run_zo_sgd(name, m, seed, budget, one_sided=False):
    """ZO-SGD with m queries a step: two-sided SPSA with m/2 probes, or one-sided with m - 1
    probes and the centre (the note's A.8 baseline, whose mu |z|^2 term leaves a noise floor)."""
    fn, init = FUNCTIONS[name]
    x = init(torch.Generator().manual_seed(seed)).requires_grad_()
    probes = m - 1 if one_sided else m // 2
    opt = zotune.ZOOptimizer([x], lr=LR[name]["zo-sgd"], eps=0.01, method="zo-sgd", num_probes=probes,
                             one_sided=one_sided, seed=seed)
    view = x.detach()
    curve, queries = [(0, fn(view))], 0
    while queries < budget:
        opt.step(lambda: fn(view))
        queries += m
        curve.append((queries, fn(view)))
    return curve


def at(curve, queries):
    """f after the last step that used at most ``queries`` queries."""
    return [f for q, f in curve if q <= queries][-1]


def first_reaching(curve, target):
    return next((q for q, f in curve if f <= target), None)


def synthetic() -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| function | method | (m, k) | queries | median final f (3 seeds) |", "|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    verdicts = []
    for ax, name in zip(axes, FUNCTIONS):
        budget = BUDGET[name]
        baselines = {}
        for label, one_sided in (("ZO-SGD two-sided, 5 probes", False), ("ZO-SGD one-sided, 9 probes + centre", True)):
            curves = {seed: run_zo_sgd(name, 10, seed, budget, one_sided) for seed in SEEDS}
            final = statistics.median(at(c, budget) for c in curves.values())
            baselines[label] = final
            ax.plot(*zip(*curves[0]), "k-" if not one_sided else "k:", lw=2, label=label)
            lines.append(f"| {name} | {label} (values) | - | {budget} | {final:.4g} |")
        for mode in MODES:
            for m, k in MK:
                curves = {seed: run_rank(name, m, k, mode, seed, budget) for seed in SEEDS}
                final = statistics.median(at(c, budget) for c in curves.values())
                lines.append(f"| {name} | ZO-RankSGD {mode} | ({m}, {k}) | {budget} | {final:.4g} |")
                style = {"plain": "--", "line-search": "-", "adaptive": "-."}[mode]
                ax.plot(*zip(*curves[0]), style, label=f"rank {mode} ({m},{k})", alpha=0.8)
                if name == "quadratic" and (m, k) == (10, 10) and mode != "plain":
                    long = {seed: run_rank(name, m, k, mode, seed, 4 * budget) for seed in SEEDS}
                    for label, target in baselines.items():
                        need = [first_reaching(c, target) for c in long.values()]
                        verdicts.append((mode, label, target, need, budget))
        ax.set_yscale("log")
        ax.set_xlabel("oracle queries (points evaluated)")
        ax.set_ylabel("f")
        ax.set_title(f"{name}, d=100, mu=0.01 (seed 0)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(DOCS / "ranksgd_synthetic.png", dpi=110)
    lines.append("")
    lines.append("Queries ZO-RankSGD (10, 10) needs to reach a value-based baseline's median final f on "
                 "the quadratic (3000 queries), per seed, within 12,000:")
    lines.append("")
    for mode, label, target, need, budget in verdicts:
        ratio = ", ".join(f"{n / budget:.2f}x" if n is not None else "not reached" for n in need)
        lines.append(f"- {mode} vs {label} (f = {target:.3g}): {need} -> {ratio}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ RL

RL_METHODS = {"ranksgd": dict(method="ranksgd", m=16, k=8, lr=0.05, mu=0.05),
              "value": dict(method="value", m=16, lr=0.05, mu=0.05),
              "cma": dict(method="cma", m=16, sigma0=0.1)}
RL_LOG = DOCS / "ranksgd_rl_results.jsonl"
THRESHOLD = {"Swimmer-v5": 300, "HalfCheetah-v5": 1000}  # Swimmer's: the Done criterion
COLOURS = {"ranksgd": "C0", "value": "C1", "cma": "C2"}


def read_log(path: Path) -> list[dict]:
    """The finished runs of ``path`` (one JSON object per line), later lines replacing earlier ones."""
    if not path.exists():
        return []
    runs = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            runs[(row["env"], row["method"], row["seed"], row["episodes"])] = row
    return list(runs.values())


def rl_run(env: str, method: str, seed: int, episodes: int, eval_every: int, runs: Path, log: Path) -> None:
    """One run (``zotune rank rl``'s code), appended to ``log`` as one line when it has finished:
    the settings, the summary and the evaluation curve."""
    from zotune.ranking.rl import RLConfig, train

    if any((r["env"], r["method"], r["seed"], r["episodes"]) == (env, method, seed, episodes) for r in read_log(log)):
        print(f"{env} {method} seed {seed}: in {log.name} already", file=sys.stderr)
        return
    out = runs / env / f"{method}-s{seed}-e{episodes}"
    t = time.perf_counter()
    summary = train(RLConfig(env=env, episodes=episodes, seed=seed, eval_every=eval_every, output_dir=str(out),
                             **RL_METHODS[method]))
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    row = {"env": env, "method": method, "seed": seed, "episodes": episodes, "summary": summary,
           "curve": [{k: r[k] for k in ("episodes", "return", "seconds")} for r in curve], "loadavg": load}
    with open(log, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{env} {method} seed {seed}: {time.perf_counter() - t:.0f} s, final {summary['final_return']:.1f}",
          file=sys.stderr, flush=True)


def return_at(curve: list[dict], episodes: int) -> float:
    """The last evaluation at or before ``episodes`` training episodes."""
    return [r["return"] for r in curve if r["episodes"] <= episodes][-1]


def rl_report(log: Path, plot: bool = True) -> str:
    """Tables (per run, and medians over seeds per method) and one plot per environment, from the
    runs in ``log`` alone."""
    rows = read_log(log)
    lines = []
    for env in dict.fromkeys(r["env"] for r in rows):
        runs = sorted((r for r in rows if r["env"] == env), key=lambda r: (list(RL_METHODS).index(r["method"]),
                                                                         r["seed"]))
        # the shortest run sets the budget: longer runs are cut there (their first episodes are the
        # same training: evaluations do not touch the training seeds or the normaliser)
        episodes = min(r["episodes"] for r in runs)
        runs = [dict(r, curve=[p for p in r["curve"] if p["episodes"] <= episodes]) for r in runs]
        for r in runs:  # the last evaluation at or before the budget, for every run alike
            r["final"] = r["curve"][-1]["return"]
        marks = [episodes // 4, episodes // 2, 3 * episodes // 4, episodes]
        target = THRESHOLD.get(env, 300)
        lines += [f"**{env}**, {episodes} training episodes a run", "",
                  f"| method | seed | return at {' / '.join(map(str, marks))} episodes | final | best | "
                  f"first >= {target} | seconds (episodes run) |", "|---|---|---|---|---|---|---|"]
        for r in runs:
            s, c = r["summary"], r["curve"]
            first = next((p["episodes"] for p in c if p["return"] >= target), None)
            lines.append(f"| {r['method']} | {r['seed']} | {' / '.join(f'{return_at(c, e):.0f}' for e in marks)} | "
                         f"{r['final']:.0f} | {max(p['return'] for p in c):.0f} | "
                         f"{first if first is not None else '-'} | {s['seconds']:.0f} ({r['episodes']}) |")
        lines += ["", f"Medians over seeds ({env}):", "",
                  f"| method | seeds | median return at {' / '.join(map(str, marks))} | median final | "
                  f"seeds reaching {target} |", "|---|---|---|---|---|"]
        for method in RL_METHODS:
            mine = [r for r in runs if r["method"] == method]
            if not mine:
                continue
            med = [statistics.median(return_at(r["curve"], e) for r in mine) for e in marks]
            final = statistics.median(r["final"] for r in mine)
            reached = sum(any(p["return"] >= target for p in r["curve"]) for r in mine)
            lines.append(f"| {method} | {len(mine)} | {' / '.join(f'{v:.0f}' for v in med)} | {final:.0f} | "
                         f"{reached} of {len(mine)} |")
        lines.append("")
        if plot:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(7, 4.5))
            for r in runs:
                ax.plot([p["episodes"] for p in r["curve"]], [p["return"] for p in r["curve"]],
                        color=COLOURS[r["method"]], label=r["method"] if r["seed"] == min(x["seed"] for x in runs
                                                                                        if x["method"] == r["method"])
                        else None, alpha=0.75)
            ax.set_xlabel("training episodes")
            ax.set_ylabel("return (3 evaluation episodes)")
            seeds = ", ".join(f"{m} {sum(r['method'] == m for r in runs)}" for m in RL_METHODS
                              if any(r["method"] == m for r in runs))
            ax.set_title(f"{env}: linear policies, m=16; seeds: {seeds}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(DOCS / f"ranksgd_rl_{env.split('-')[0].lower()}_logged.png", dpi=110)
            plt.close(fig)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("synthetic", "rl"), required=True)
    ap.add_argument("--envs", nargs="+", default=["Swimmer-v5"])
    ap.add_argument("--methods", nargs="+", default=list(RL_METHODS), choices=list(RL_METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--runs", default="runs/bench-ranksgd", help="RL run directories")
    ap.add_argument("--log", default=str(RL_LOG), help="finished RL runs, one JSON line each (appended)")
    ap.add_argument("--from-log", action="store_true", help="RL: only the tables and plots, from --log")
    ap.add_argument("--episodes", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t = time.perf_counter()
    if args.part == "synthetic":
        text = synthetic()
    else:
        if not args.from_log:
            for env in args.envs:  # seed-major, so an interrupted benchmark has every method at a seed
                for seed in args.seeds:
                    for method in args.methods:
                        rl_run(env, method, seed, args.episodes, args.eval_every, Path(args.runs), Path(args.log))
        text = rl_report(Path(args.log))
    print(text)
    with open("/proc/loadavg") as f:
        print(f"\n{time.perf_counter() - t:.0f} s; load average {f.read().split()[:3]}")


if __name__ == "__main__":
    main()
