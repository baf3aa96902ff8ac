r"""DeepZero's training protocol for the image recipe (research note B.4): what ``zotune train
--method deepzero`` adds to the plain sparse CGE step.

    ratios = ZO-GraSP(model at initialisation, sparsity s)     once; saved as layer_ratios.json
    for each step t:
        if t is a multiple of K epochs: per conv/linear weight l a random mask keeping
                                          (1 - ratio_l) d_l coordinates       (steps/masks.py)
        sparse CGE over the masks + every BatchNorm parameter + the head's bias
        SGD, momentum 0.9, coupled weight decay 5e-4, lr 0.1: 3 epochs of linear warm-up from 0,
        then cosine to 0 (per step)

:func:`protocol_options` fills in the paper's defaults (``DEEPZERO``) where the run's settings
are at their defaults and turns epochs into steps; :func:`layer_ratios` computes the ratios of a
new run, or reads those of the run being resumed (never recomputed from trained weights).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ZotuneError
from .grasp import RATIO_METHODS, check_sparsity, load_ratios, ratios_for, save_ratios, weighted_sparsity

RATIOS_FILE = "layer_ratios.json"
DEEPZERO = {"lr": 0.1, "eps": 5e-3, "sparsity": 0.9, "weight_decay": 5e-4, "schedule": "cosine",
            "warmup_epochs": 3, "mask_redraw_epochs": 5, "layer_ratios": "zo-grasp"}
"""The DeepZero code's defaults (research note B.7); batch 256 and 50 epochs are ``--batch-size``
and ``--epochs``."""
COORDINATE_METHODS = ("cge", "deepzero")


def with_deepzero_defaults(cfg):
    """``cfg`` with :data:`DEEPZERO`'s values where ``--method deepzero`` leaves a setting at its
    default (None; weight decay 0 and the constant schedule count as unset)."""
    m = cfg.method
    if m.name != "deepzero":
        return cfg
    unset = {"weight_decay": 0.0, "schedule": "constant"}
    given = {k: v for k, v in DEEPZERO.items()
             if getattr(m, k) == unset.get(k) or (k not in unset and getattr(m, k) is None)}
    return cfg.updated(given, source="deepzero's defaults") if given else cfg


def check(cfg) -> None:
    """One-line errors for settings that do not fit the method, before anything is computed."""
    m = cfg.method
    coordinate = m.name in COORDINATE_METHODS
    for key in ("layer_ratios", "mask_redraw_epochs"):
        if getattr(m, key) is not None and not coordinate:
            raise ZotuneError(f"--{key.replace('_', '-')} applies to the coordinate-wise methods "
                              f"({', '.join(COORDINATE_METHODS)}), not {m.name!r}")
    if m.sparsity is not None:
        check_sparsity(m.sparsity)
    if m.layer_ratios is not None and m.layer_ratios not in RATIO_METHODS:
        raise ZotuneError(f"unknown layer_ratios {m.layer_ratios!r}; valid: {', '.join(RATIO_METHODS)}")
    if m.layer_ratios not in (None, "uniform") and m.sparsity is None:
        raise ZotuneError(f"--layer-ratios {m.layer_ratios} needs --sparsity (the overall target)")
    for key, least in (("mask_redraw_epochs", 1), ("warmup_epochs", 0)):
        value = getattr(m, key)
        if value is not None and not (isinstance(value, int) and value >= least):
            raise ZotuneError(f"{key} must be an integer >= {least}, got {value!r}")


def layer_ratios(cfg, model, data, out: Path, resume: bool):
    """The ``sparsity`` option of a coordinate-wise run: None (dense), the float (uniform masks),
    or ``{weight name: ratio}`` from ZO-GraSP / GraSP, saved in ``out/layer_ratios.json`` and
    read back from there on resume. Returns ``(sparsity, record or None)``."""
    m = cfg.method
    if m.name not in COORDINATE_METHODS or m.sparsity is None:
        return m.sparsity, None
    source = m.layer_ratios or "uniform"
    path = Path(out) / RATIOS_FILE
    if resume:
        if not path.exists():
            if source == "uniform":
                return m.sparsity, None
            raise ZotuneError(f"{out} has no {RATIOS_FILE}: the layer-wise ratios of this run are "
                              "lost (they are computed at initialisation only); start a new run")
        record = load_ratios(path, model)
        return (m.sparsity if source == "uniform" else record["ratios"]), record
    from ..tasks.images import normalise
    from .grasp import NUM_PROBES, EPS, PER_CLASS, class_balanced

    if source == "uniform":
        ratios = ratios_for("uniform", model, data.train_images, data.train_labels, m.sparsity)
    else:
        x, y = class_balanced(data.train_images, data.train_labels, PER_CLASS, cfg.run.seed, data.num_classes)
        ratios = ratios_for(source, model, normalise(x, cfg.data.task), y, m.sparsity, seed=cfg.run.seed,
                            num_classes=data.num_classes, per_class=PER_CLASS)
    record = {"method": source, "sparsity": m.sparsity, "seed": cfg.run.seed,
              "num_probes": NUM_PROBES if source == "zo-grasp" else None,
              "eps": EPS if source == "zo-grasp" else None, "per_class": PER_CLASS,
              "overall": weighted_sparsity(ratios, model)}
    from ..distributed import run as ranks

    if ranks.current().is_writer:  # under --parallel every rank computes the same ratios; one file
        save_ratios(path, ratios, record)
    record["ratios"] = ratios
    return (m.sparsity if source == "uniform" else ratios), record


def schedule_options(cfg, steps: int, steps_per_epoch: int) -> dict:
    """The optimizer's ``schedule``/``warmup_steps``/``total_steps`` and ``mask_redraw_steps``
    from the epoch settings. A warm-up from the defaults that would not leave a step of the
    schedule is shortened to ``steps - 1`` (short test runs)."""
    m = cfg.method
    warmup = m.warmup_steps if m.warmup_epochs is None else m.warmup_epochs * steps_per_epoch
    if m.schedule != "constant" and warmup >= steps:
        if m.name == "deepzero" and m.warmup_epochs == DEEPZERO["warmup_epochs"]:
            warmup = steps - 1
        else:
            raise ZotuneError(f"the warm-up ({warmup} steps) must be shorter than the run ({steps} steps)")
    options = {"schedule": m.schedule, "warmup_steps": warmup, "total_steps": steps}
    if m.name in COORDINATE_METHODS and m.sparsity is not None and m.mask_redraw_epochs is not None:
        options["mask_redraw_steps"] = m.mask_redraw_epochs * steps_per_epoch
    return options


def run_options(cfg, model, data, out: Path, resume: bool, steps: int, steps_per_epoch: int):
    """``(options, ratios record or None)``: the trainer options that depend on the run (the
    ``sparsity`` of :func:`layer_ratios` and :func:`schedule_options`), for the recipe and for
    ``zotune eval`` (which passes ``resume=True`` to read the run's ratios)."""
    sparsity, record = layer_ratios(cfg, model, data, out, resume)
    return {"sparsity": sparsity, **schedule_options(cfg, steps, steps_per_epoch)}, record
