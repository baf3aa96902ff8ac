"""Measured training memory, and ElasticZO's memory-budget helper.

:func:`peak_bytes` runs a function under ``torch.profiler`` with memory profiling and returns the
highest level of tensor memory it held above where it started: every allocation and free of the
CPU (or CUDA) allocator, summed in time order, so activations kept for backward, gradients,
optimizer buffers created on a first step and scratch buffers are all in it, measured rather than
counted from shapes. :func:`training_memory` adds the model's own tensors (parameters and
buffers), which exist before the step: that sum is the peak memory of training, the number the
ElasticZO paper compares (the input batch excluded, the same for every method).
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


def peak_bytes(fn: Callable[[], object]) -> int:
    """The peak tensor memory ``fn()`` allocates above the level at its start (bytes)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def training_memory(build: Callable[[nn.Module], object], model: nn.Module, batches, steps: int = 2) -> dict:
    """Peak memory of the first ``steps`` training steps of a fresh ``build(copy of model)``
    trainer (``trainer.step(images, labels)``), measured by :func:`peak_bytes`: the steps create
    the optimizer state, so it is counted. Returns ``{"model_bytes", "step_peak_bytes",
    "peak_bytes"}`` (the last is their sum). ``batches``: ``steps`` ``(images, labels)`` pairs."""
    batches = list(batches)[:steps]
    warm = build(copy.deepcopy(model))  # one-time allocations (kernel caches) out of the measure
    warm.step(*batches[0])
    model = copy.deepcopy(model)
    trainer = build(model)
    # a trainer that keeps its own parameters (ElasticZO-INT8's int8 copy) says how large they are
    base = trainer.state_bytes() if hasattr(trainer, "state_bytes") else model_bytes(model)
    step_peak = peak_bytes(lambda: [trainer.step(x, y) for x, y in batches])
    return {"model_bytes": base, "step_peak_bytes": step_peak, "peak_bytes": base + step_peak}


def choose_tail(model: nn.Module, budget_bytes: int, images: torch.Tensor, labels: torch.Tensor,
                loss_fn: Callable | None = None, **options) -> int:
    """The largest ``bp_layers`` whose ElasticZO training fits ``budget_bytes``, by measurement:
    for k = all layers, ..., 1, 0 a fresh copy of ``model`` takes two ElasticZO steps on
    ``(images, labels)`` under :func:`peak_bytes`; the first k whose model bytes plus step peak
    fit is returned (0 = plain ZO; a ZotuneError when not even that fits). A warm-up step first
    keeps one-time allocations (kernel caches) out of the measurements. ``options`` go to
    ``ZOOptimizer`` (``lr``, ``eps``, ``lr_bp``, ...). Cost: up to L + 1 pairs of steps."""
    import torch.nn.functional as F

    from .errors import ZotuneError
    from .models.split import parametrised_layers
    from .optim import ZOOptimizer

    loss_fn = loss_fn or F.cross_entropy
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    options = {"lr": 1e-3, "eps": 1e-3, **options}
    seen = []
    warm = copy.deepcopy(model)
    ZOOptimizer(warm, method="elasticzo", bp_layers=0, **options).step(lambda: loss_fn(warm(images), labels))
    for k in range(len(parametrised_layers(model, names)), -1, -1):
        copy_ = copy.deepcopy(model)
        opt = ZOOptimizer(copy_, method="elasticzo", bp_layers=k, **options)
        closure = lambda: loss_fn(copy_(images), labels)  # noqa: E731
        used = model_bytes(copy_) + peak_bytes(lambda: [opt.step(closure) for _ in range(2)])
        seen.append(f"{k}: {used}")
        if used <= budget_bytes:
            return k
    raise ZotuneError(f"no ElasticZO split fits {budget_bytes} bytes; measured (bp_layers: bytes) "
                      + ", ".join(seen))
