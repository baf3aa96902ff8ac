"""How much of a bf16/fp16 model a ZO probe actually moves, tensor by tensor.

With an fp32 master copy, the model is evaluated at ``round(master + eps z)``: where the ulp of a
weight exceeds ``2 eps |z|`` the probe rounds back to the weight and measures nothing, while the
update still moves the master along z (a random walk). This script loads the embedded SmolLM2-135M
in the given dtype, measures each trainable tensor's probe coverage (the fraction of elements a
probe changes, ``InMemoryEngine.probe_coverage``) at several eps, and reports what the default
``low_precision_probes="exclude"`` freezes: which tensors and what fraction of the parameters.

    python benchmarks/low_precision_probes.py                 # bf16, eps 1e-4 .. 1e-2
    python benchmarks/low_precision_probes.py --dtype float16
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import torch

import zotune
from zotune.methods import PROBE_COVERAGE_THRESHOLD
from zotune.models import load_model


def kind_of(name: str) -> str:
    """A short label grouping tensors of one kind (norm gains, attention and MLP matrices)."""
    if "norm" in name:
        return "norm gains"
    match = re.search(r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|lm_head)", name)
    return match.group(1) if match else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    args = parser.parse_args()
    model, _ = load_model(args.model, dtype=getattr(torch, args.dtype))
    model = zotune.models.select_trainable(model, "full")
    tensors = [(n, p, 0, True) for n, p in model.named_parameters() if p.requires_grad]
    engine = zotune.engines.InMemoryEngine(tensors, zotune.Gaussian())
    total = engine.layout.numel
    for eps in args.eps:
        coverage = engine.probe_coverage(eps)
        by_kind = defaultdict(list)
        for spec, c in zip(engine.layout, coverage):
            by_kind[kind_of(spec.name)].append((c, spec.numel))
        excluded = [(spec.name, spec.numel) for spec, c in zip(engine.layout, coverage)
                    if c < PROBE_COVERAGE_THRESHOLD]
        print(json.dumps({
            "dtype": args.dtype, "eps": eps,
            "coverage_by_kind": {k: round(sum(c * n for c, n in v) / sum(n for _, n in v), 4)
                                 for k, v in sorted(by_kind.items())},
            "excluded_tensors": len(excluded), "of_tensors": len(engine.layout),
            "excluded_params": sum(n for _, n in excluded), "excluded_fraction": sum(n for _, n in excluded) / total,
            "excluded_kinds": sorted({kind_of(n) for n, _ in excluded}),
        }))


if __name__ == "__main__":
    main()
