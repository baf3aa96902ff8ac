"""How large is MeZO's finite-difference bias on a real model, next to its sampling spread?

KerZOO (Mi et al., 2025) cancels the O(eps^2) term of the two-point estimate,
    g(eps) = (L(theta + eps u) - L(theta - eps u)) / (2 eps) = <grad L, u> + (eps^2 / 6) D^3L[u, u, u] + O(eps^4),
at the price of a larger variance (6.25x per probe for the order-3 kernel). Whether that trade
pays depends on the size of the eps^2 term at the eps one trains with. This script measures it:
for K Gaussian directions u_k (seeded generators, one per direction) it evaluates g_k at several
eps on one SST-2 batch of SmolLM2-135M, fits the eps^2 coefficient c_k from the largest two eps
(g_k(eps) - g_k(eps_min) = c_k (eps^2 - eps_min^2)), and prints the bias at the training eps,
|c_k| eps^2, as a fraction of the spread of g_k over directions (the standard deviation the
estimator's noise has per probe).

    python benchmarks/finite_difference_bias.py --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_speed import write_section  # noqa: E402

from zotune import rng  # noqa: E402
from zotune.models import load_model  # noqa: E402
from zotune.objectives import CandidateScorer  # noqa: E402
from zotune.tasks import get_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def perturb(params, seed: int, scale: float) -> None:
    """theta += scale * u, u ~ N(0, I) regenerated tensor by tensor from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=scale)


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=os.environ.get("ZOTUNE_DATA"))
    ap.add_argument("--directions", type=int, default=6)
    ap.add_argument("--eps", type=float, nargs="*", default=[1e-3, 1e-2, 3e-2])
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    eps = sorted(args.eps)
    model, tok = load_model(args.model)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    scorer = CandidateScorer(model, tok)
    batch = get_task("sst2").load(args.data_dir, seed=0).train[:16]
    g = {}
    for k in range(args.directions):
        seed = rng.mix(0x46444249, k) & 0x7FFFFFFF
        for e in eps:
            perturb(params, seed, e)
            plus = float(scorer.classification_loss(batch))
            perturb(params, seed, -2 * e)
            minus = float(scorer.classification_loss(batch))
            perturb(params, seed, e)
            g[k, e] = (plus - minus) / (2 * e)
            print(json.dumps({"direction": k, "eps": e, "g": g[k, e]}), flush=True)
    e0 = eps[0]
    spread = statistics.stdev(g[k, e0] for k in range(args.directions))
    fits = {}  # the eps^2 coefficient fitted from each larger eps: g(e) - g(e0) = c (e^2 - e0^2)
    for e in eps[1:]:
        c = statistics.mean(abs(g[k, e] - g[k, e0]) / (e**2 - e0**2) for k in range(args.directions))
        fits[e] = {"mean_abs_c": c, "bias_at_eps": c * e0**2, "bias_over_spread": c * e0**2 / spread}
    summary = {"spread_of_g": spread, "fits": {str(e): f for e, f in fits.items()}}
    print(json.dumps(summary), flush=True)
    rows = ["| direction | " + " | ".join(f"g at eps {e:g}" for e in eps) + " |",
            "|---|" + "---|" * len(eps)]
    rows += [f"| {k} | " + " | ".join(f"{g[k, e]:.5f}" for e in eps) + " |" for k in range(args.directions)]
    rows += ["", f"| eps^2 coefficient fitted from eps | mean abs c | O(eps^2) bias at eps {e0:g} | "
                 "bias / spread |", "|---|---|---|---|"]
    rows += [f"| {e:g} | {f['mean_abs_c']:.3g} | {f['bias_at_eps']:.3g} | **{f['bias_over_spread']:.2g}** |"
             for e, f in fits.items()]
    text = (f"## MeZO's finite-difference bias on SmolLM2 (`benchmarks/finite_difference_bias.py`)\n\n"
            f"Command: `python benchmarks/finite_difference_bias.py {' '.join(sys.argv[1:])}`\n\n"
            f"{args.model}, full parameters, one SST-2 training batch of 16, MeZO's classification loss, "
            f"fp32; g = (L(theta + eps u) - L(theta - eps u)) / (2 eps) along {args.directions} Gaussian "
            f"directions. Spread of g over directions at eps {e0:g} (the per-probe noise of the "
            f"estimate): {spread:.4g}.\n\n" + "\n".join(rows) + "\n")
    write_section(Path(args.out), text, "finite_difference_bias")


if __name__ == "__main__":
    main()
