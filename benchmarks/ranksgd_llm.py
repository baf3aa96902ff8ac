"""ZO-RankSGD alignment of SmolLM2-135M from rankings of its own samples: reward vs rounds.

    python benchmarks/ranksgd_llm.py --seed 0 --control --log docs/ranksgd_llm_s0.jsonl
    python benchmarks/ranksgd_llm.py --from-log docs/ranksgd_llm_s0.jsonl docs/ranksgd_llm_s1.jsonl

Each round: m candidate LoRA points x + mu xi_i, each completes the round's training prompts (the
same decoding seed for all m), the reward ranks them and RankSGD is told the best k
(zotune.ranking.reward.RewardOracle). Every ``--eval-every`` rounds the reward of the current point
is measured on **held-out** prompts (never ranked) with fixed decoding seeds. ``--control`` also
runs the same optimizer told a seeded *random* ranking each round, interleaved round by round
with the ranked run and measured on the same held-out prompts and seeds: it moves as much but
learns nothing, so a rise that comes from drift would show in it too.

Rewards: ``sentiment`` (default) = P(positive) of naive Bayes fitted on SST-2 train, times the
distinct-bigram ratio, times min(1, words / --min-words) (zotune.ranking.sentiment: repetition and one-word
answers do not pay); ``brevity`` = -(characters); ``keyword`` = occurrences of ``--keywords``.

Every evaluation is appended to ``--log`` (JSON lines, flushed) with the held-out reward and its
factors, and the held-out samples at the first and the last evaluation; ``--from-log`` builds the
table and the plot (docs/ranksgd_llm.png) from logs alone.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DOCS = Path(__file__).resolve().parents[1] / "docs"
# Prompts of mixed valence (chores, delays, weather...): the model's plain answers are neither all
# positive nor all negative, so a sentiment reward has room to rise. EVAL is never ranked.
TRAIN = ["What do you think of traffic jams?", "Describe a rainy Monday morning.",
         "How do you feel about waiting in long queues?", "Tell me about doing homework.",
         "What do you think of winter in the city?", "Describe a delayed flight.",
         "How do you feel about cleaning the house?", "Tell me about a noisy neighbour.",
         "Describe a day at the beach.", "What do you think of public speaking?",
         "Tell me about your commute to work.", "Describe a hospital waiting room.",
         "How do you feel about exams?", "Describe an old abandoned factory.",
         "What do you think of cold showers?", "Tell me about losing your keys."]
EVAL = ["What do you think of airport security?", "Describe a grey November afternoon.",
        "How do you feel about getting up early?", "Tell me about a broken umbrella.",
        "Describe a crowded train at rush hour.", "What do you think of doing taxes?",
        "Tell me about a long meeting at work.", "Describe a forest after a storm."]


def brevity(text: str) -> float:
    return -float(len(text))


def keyword_rule(words):
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
    return lambda text: float(len(pattern.findall(text)))


class RandomRanker:
    """The control: a seeded random top-k, whatever the candidates are."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def __call__(self, n: int, k: int) -> list[int]:
        return self.rng.sample(range(n), k)


def build(args, seed, like=None):
    """(optimizer, completer, d); ``like``: a (model, tokenizer) to copy instead of loading again."""
    import copy

    import zotune
    from zotune.ranking.models import load_lm, steering_vector
    from zotune.ranking.text import Completer

    if like is None and (args.pattern or args.steer is not None):  # plain weights chosen by name, or none
        model, tok = load_lm(args.model, trainable="full", seed=seed)
        for name, p in model.named_parameters():
            p.requires_grad_(args.pattern is not None and re.search(args.pattern, name) is not None)
    elif like is None:
        model, tok = load_lm(args.model, trainable="lora", lora_r=args.lora_r,
                             lora_targets=args.lora_targets.split(","), seed=seed)
    else:
        model, tok = copy.deepcopy(like[0]), like[1]
    if args.freeze_a:  # LoRA-FA (Zhang et al., 2023): A stays at its random init, only B moves
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if args.steer is not None:  # only the steering coordinates move
        for _, p in params:
            p.requires_grad_(False)
        params = [("steer", steering_vector(model, args.steer, args.steer_dim))]
    opt = zotune.RankSGD(params, lr=args.lr, mu=args.mu, m=args.m, k=args.k, seed=seed, momentum=args.momentum,
                         mode=args.mode, line_search=args.line_search)
    complete = Completer(model, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    return opt, complete, sum(p.numel() for _, p in params)


def make_reward(args):
    if args.reward == "sentiment":
        from zotune.ranking.sentiment import NaiveBayesSentiment, PositiveReward

        return PositiveReward(NaiveBayesSentiment.from_sst2(), min_words=args.min_words)
    if args.reward == "brevity":
        return brevity
    return keyword_rule(args.keywords.split(","))


def held_out(complete, reward, seeds, prompts=EVAL):
    """Mean reward (and its factors, for the sentiment reward) over ``prompts`` (the held-out
    ones by default) x seeds; the first seed's texts."""
    from zotune.ranking.reward import score_texts

    values, parts, first = [], [], None
    for seed in seeds:
        texts = complete(list(prompts), seed)
        first = first or texts
        values += score_texts(reward, texts)
        if hasattr(reward, "parts"):
            parts += [reward.parts(t) for t in texts]
    row = {"reward": statistics.fmean(values)}
    for key in ("sentiment", "distinct", "length"):
        if parts:
            row[key] = statistics.fmean(p[key] for p in parts)
    return row, first


def run(args) -> None:
    from zotune.ranking.reward import RewardOracle
    from zotune.rng import mix

    reward = make_reward(args)
    runs = {"ranked": build(args, args.seed)}
    if args.control:  # the same start: a copy of the ranked run's model before any step
        complete = runs["ranked"][1]
        runs["random"] = build(args, args.seed, like=(complete.model, complete.tokenizer))
    eval_seeds = [mix(args.seed, 0xE7A1, j) % (1 << 31) for j in range(args.eval_seeds)]

    train = TRAIN[:args.train_prompts]

    def round_prompts(r):
        n = args.prompts_per_round
        return [train[(r * n + j) % len(train)] for j in range(n)]

    oracle = RewardOracle(reward, runs["ranked"][1], round_prompts, k=args.k,
                          seed=lambda r: mix(args.seed, r, 0xDEC0DE) % (1 << 31))
    control = RandomRanker(args.seed + 1)
    start = time.perf_counter()
    out = Path(args.log)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as log:
        def write(row):
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(json.dumps(row)[:400], flush=True)

        def record(name, r, candidates, samples=False):
            _, complete, _ = runs[name]
            row, texts = held_out(complete, reward, eval_seeds)
            if args.train_prompts <= 8:  # a small fixed training set: its reward at the current point too
                row["train_reward"] = held_out(complete, reward, eval_seeds, train)[0]["reward"]
            with open("/proc/loadavg") as f:
                load = f.read().split()[0]
            write({"kind": "eval", "seed": args.seed, "run": name, "round": r, **row, "candidates": candidates,
                   "seconds": round(time.perf_counter() - start, 1), "load": load})
            if samples:
                write({"kind": "samples", "seed": args.seed, "run": name, "round": r,
                       "samples": [[p, t] for p, t in zip(EVAL, texts)]})

        write({"kind": "config", "seed": args.seed, "d": runs["ranked"][2],
               **{k: v for k, v in vars(args).items() if k not in ("from_log", "log")}})
        for name in runs:
            record(name, 0, None, samples=True)
        for r in range(1, args.rounds + 1):
            for name, (opt, _, _) in runs.items():
                query = opt.ask()
                if name == "random":  # no need to render the candidates: the answer ignores them
                    ranking = control(len(query), query.k)
                else:
                    ranking = oracle(query)
                opt.tell(ranking=ranking)
                if r % args.eval_every == 0 or r == args.rounds:
                    rewards = oracle.last_rewards if name == "ranked" else []
                    record(name, r, statistics.fmean(rewards) if rewards else None, samples=r == args.rounds)


def report(paths) -> str:
    """Held-out reward against rounds, per seed, ranked and random, and the mean over seeds;
    one plot."""
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r["kind"] == "eval"]
    seeds = sorted({r["seed"] for r in evals})
    runs = [n for n in ("ranked", "random") if any(r["run"] == n for r in evals)]
    rounds = sorted({r["round"] for r in evals})
    table = {(r["seed"], r["run"], r["round"]): r for r in evals}
    cols = [(s, n) for s in seeds for n in runs]
    lines = []
    keys = [("reward", "held-out reward")] + ([("train_reward", "reward on the ranked prompts")]
                                              if any("train_reward" in r for r in evals) else [])
    for key, title in keys:
        lines += ([""] if lines else []) + [f"{title}:", "",
                  "| round | " + " | ".join(f"{n}, seed {s}" for s, n in cols) + " | "
                  + " | ".join(f"mean {n}" for n in runs) + " |",
                  "|---" * (1 + len(cols) + len(runs)) + "|"]
        for rd in rounds:
            cells = [f"{table[(s, n, rd)][key]:.3f}" if key in table.get((s, n, rd), {}) else "-" for s, n in cols]
            means = []
            for n in runs:
                v = [table[(s, n, rd)][key] for s in seeds if key in table.get((s, n, rd), {})]
                means.append(f"{statistics.fmean(v):.3f}" if len(v) == len(seeds) else "-")
            lines.append(f"| {rd} | " + " | ".join(cells) + " | " + " | ".join(means) + " |")
    if any("sentiment" in r for r in evals):
        lines += ["", "Factors of the held-out reward at the first and last evaluation (sentiment / "
                  "distinct-2 / length):", ""]
        for s, n in cols:
            mine = sorted((r for r in evals if r["seed"] == s and r["run"] == n), key=lambda r: r["round"])
            if mine:
                a, b = mine[0], mine[-1]
                lines.append(f"- {n}, seed {s}: round {a['round']}: {a['sentiment']:.3f} / {a['distinct']:.3f} / "
                             f"{a['length']:.3f}; round {b['round']}: {b['sentiment']:.3f} / {b['distinct']:.3f} / "
                             f"{b['length']:.3f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (s, n), colour in zip(cols, [f"C{i}" for i in range(len(cols))]):
        pts = sorted((r["round"], r["reward"]) for r in evals if r["seed"] == s and r["run"] == n)
        ax.plot(*zip(*pts), "-o" if n == "ranked" else "--x", label=f"{n}, seed {s}",
                color="C0" if n == "ranked" else "C7", alpha=0.5 + 0.5 * (s == seeds[0]))
    ax.set_xlabel("round")
    ax.set_ylabel("held-out reward")
    ax.set_title("SmolLM2-135M, ZO-RankSGD from ranked completions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "ranksgd_llm.png", dpi=110)
    plt.close(fig)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.25)
    p.add_argument("--mu", type=float, default=0.5)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--mode", choices=("plain", "line-search", "human"), default="plain",
                   help="RankSGD's step program: line-search adds a best-of round (the current point and "
                        "--line-search step sizes) after each gradient round, so a move is kept only if ranked best")
    p.add_argument("--line-search", type=int, help="step sizes per search round (RankSGD's default)")
    p.add_argument("--lora-r", type=int, default=1)
    p.add_argument("--lora-targets", default="layers.29.mlp.down_proj")
    p.add_argument("--steer", type=int, metavar="LAYER",
                   help="train a steering vector added after this decoder layer instead of LoRA")
    p.add_argument("--steer-dim", type=int, default=16, help="coordinates of the steering vector's subspace")
    p.add_argument("--pattern", help="train these weights (a regex on parameter names) instead of LoRA")
    p.add_argument("--freeze-a", action=argparse.BooleanOptionalAction, default=True, help="LoRA-FA: only the B factors move")
    p.add_argument("--reward", choices=("sentiment", "brevity", "keyword"), default="sentiment")
    p.add_argument("--min-words", type=int, default=6, help="sentiment reward: the length ramp's end")
    p.add_argument("--keywords", default="sun,sunny,happy,love,beautiful,wonderful")
    p.add_argument("--prompts-per-round", type=int, default=2)
    p.add_argument("--train-prompts", type=int, default=len(TRAIN),
                   help="rank on the first N training prompts only (N <= 8: their reward is logged too)")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--eval-seeds", type=int, default=1, help="decoding seeds per held-out evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--control", action="store_true", help="also run the random-ranking control")
    p.add_argument("--log", default="runs/ranksgd_llm.jsonl", help="evaluations, appended (JSON lines)")
    p.add_argument("--from-log", nargs="+", help="only build the table and the plot from these logs")
    args = p.parse_args()
    if args.from_log:
        print(report(args.from_log))
        return 0
    torch.set_num_threads(args.threads)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
