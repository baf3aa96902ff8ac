"""ZO-RankSGD alignment of SmolLM2-135M from rankings of its own samples: reward vs rounds.

    python benchmarks/ranksgd_llm.py --rounds 24 --out runs/ranksgd_llm.jsonl

Each round: m candidate LoRA points x + mu xi_i, each completes the round's prompts (the same
decoding seed for all m), a reward rule ranks them and RankSGD is told the best k
(zotune.ranking.align). Every ``--eval-every`` rounds the reward of the current point is measured
on fixed evaluation prompts and seeds (never used for ranking). ``--control`` also runs the same
number of rounds told a *random* ranking (seeded), interleaved round by round with the real run,
so a rise that comes from drift rather than from the rankings would show in it too.

Rewards (rules a test can check): ``brevity`` = -(characters of the completion), ``keyword`` =
occurrences of the words of ``--keywords`` (case-insensitive whole words).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

TRAIN = ["Describe a day at the beach.", "What do you think of rainy weather?",
         "Tell me about your favourite food.", "How do you spend a weekend?",
         "Describe the city you live in.", "What is a good way to relax?",
         "Tell me about a book you like.", "What makes a good friend?"]
EVAL = ["Describe a walk in the forest.", "What do you think of winter?",
        "Tell me about your favourite music.", "How do you start your morning?"]


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


def build(args, seed):
    import zotune
    from zotune.ranking.models import load_lm
    from zotune.ranking.text import Completer

    model, tok = load_lm(args.model, trainable="lora", lora_r=args.lora_r,
                         lora_targets=args.lora_targets.split(","), seed=seed)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = zotune.RankSGD(params, lr=args.lr, mu=args.mu, m=args.m, k=args.k, seed=seed)
    complete = Completer(model, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    return opt, complete, sum(p.numel() for _, p in params)


def main() -> int:
    from zotune.ranking.align import evaluate
    from zotune.ranking.reward import RewardOracle
    from zotune.rng import mix

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=24)
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--mu", type=float, default=0.05)
    p.add_argument("--lora-r", type=int, default=1)
    p.add_argument("--lora-targets", default="lm_head")
    p.add_argument("--reward", choices=("brevity", "keyword"), default="brevity")
    p.add_argument("--keywords", default="sun,sunny,happy,love,beautiful,wonderful")
    p.add_argument("--prompts-per-round", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--control", action="store_true", help="also run the random-ranking control")
    p.add_argument("--out", default="runs/ranksgd_llm.jsonl")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    reward = brevity if args.reward == "brevity" else keyword_rule(args.keywords.split(","))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = {"ranked": build(args, args.seed)}
    if args.control:
        runs["random"] = build(args, args.seed)
    d = runs["ranked"][2]
    eval_seeds = [mix(args.seed, 0xE7A1) % (1 << 31)]

    def round_prompts(r):
        n = args.prompts_per_round
        return [TRAIN[(r * n + j) % len(TRAIN)] for j in range(n)]

    oracles = {name: RewardOracle(reward, complete, round_prompts, k=args.k,
                                  seed=lambda r: mix(args.seed, r, 0xDEC0DE) % (1 << 31))
               for name, (_, complete, _) in runs.items()}
    control = RandomRanker(args.seed + 1)
    start = time.perf_counter()
    with open(out, "w") as log:
        def record(name, r, candidates):
            opt, complete, _ = runs[name]
            value, texts = evaluate(complete, reward, EVAL, eval_seeds)
            row = {"run": name, "round": r, "eval_reward": value, "candidates_reward": candidates,
                   "seconds": round(time.perf_counter() - start, 1), "sample": texts[0]}
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(json.dumps(row), flush=True)

        print(json.dumps({"model": args.model, "trainable": f"lora r={args.lora_r} on {args.lora_targets}",
                          "d": d, "m": args.m, "k": args.k, "lr": args.lr, "mu": args.mu,
                          "reward": args.reward, "threads": args.threads}), flush=True)
        for name in runs:
            record(name, 0, None)
        for r in range(1, args.rounds + 1):
            for name, (opt, complete, _) in runs.items():
                query = opt.ask()
                if name == "random":  # no need to render the candidates: the answer ignores them
                    ranking = control(len(query), query.k)
                else:
                    ranking = oracles[name](query)
                opt.tell(ranking=ranking)
                if r % args.eval_every == 0 or r == args.rounds:
                    rewards = oracles[name].last_rewards
                    record(name, r, sum(rewards) / len(rewards) if rewards else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
