r"""Named methods and the builder that assembles a step from its parts.

A method is a preset of parts (direction, estimator, update rule, transforms, step program,
post-update programs); every part can be overridden, so presets compose (``kerzoo`` estimates on
``pezo-pool`` directions with DiZO's projection and Adam is one call). :func:`build` turns the
options of :class:`~zotune.optim.ZOOptimizer` into a :class:`~zotune.steps.StepCore`; the optimizer
itself only adapts it to ``torch.optim``.
"""
from __future__ import annotations

import difflib
import warnings

from . import rng
from .directions import make_direction
from .engines import ENGINES
from .estimators import CGE, FZOO, SPSA, KernelSPSA
from .estimators.cge import always_estimated
from .estimators.rank import RankEstimator
from .estimators.rge import RGE
from .steps import ConservativeStep, CoordinateStep, ElasticStep, EstimateStep, ProjectionStep, StepCore
from .steps.masks import MaskRedraw
from .steps.rank import RankStep
from .updates import UPDATES, ClipTensorNorm
from .updates.schedules import check_schedule

KERZOO_CODE = {"order": 3, "num_probes": 3, "schedule": "linear", "s0": 1.0, "shrink_steps": 4000,
               "r_sharing": "tensor", "normalization": "code"}
"""The kernel options of KerZOO's released code (research/kerzoo_dizo.md, section 2.4)."""

METHODS: dict[str, dict] = {
    "mezo": {"update": "sgd"},
    "zo-sgd": {"update": "sgd"},
    "zo-momentum": {"update": "momentum"},
    "zo-adam": {"update": "adam"},
    "zo-sign": {"update": "sign"},
    "zo-cons": {"update": "sgd", "program": "conservative"},
    "kerzoo": {"update": "sgd", "kernel": {}},
    "kerzoo-code": {"update": "agd", "kernel": KERZOO_CODE, "clip_norm": 4e5},
    "dizo": {"update": "sgd", "projection": {"search": "zo"}},
    "dizo-fo": {"update": "sgd", "projection": {"search": "fo"}},
    "pezo": {"update": "sgd", "direction": "pezo-pool"},
    "fzoo": {"update": "sgd", "direction": "rademacher", "fzoo": {"scale": "paper", "std_ddof": 1}},
    "fzoo-code": {"update": "sgd", "direction": "rademacher", "fzoo": {"scale": "code", "std_ddof": 0}},
    "elasticzo": {"update": "sgd", "program": "elastic", "bp_layers": 1},
    "ranksgd": {"update": "sgd", "program": "rank", "rank": {}},
    "cge": {"update": "sgd", "program": "coordinate", "cge": {}},
    "deepzero": {"update": "momentum", "program": "coordinate", "cge": {"sparsity": 0.9},
                 "coupled_decay": True, "needs_blocks": True},
    "rge": {"update": "sgd", "one_sided": True, "rge": {}},
}
"""Named methods (presets of estimator, direction, update rule, step program and projection).
MeZO and ZO-Bench's ZO-SGD are the same algorithm (Zhang et al., 2024). ``kerzoo``: KerZOO's
estimator as the paper states it (order-3 kernel, one r per probe). ``kerzoo-code``: as the
authors' code runs it (3 probes, r per tensor on a linearly shrinking interval, the code's kernel
scale, per-tensor clipping at 4e5, look-ahead acceleration). ``dizo``/``dizo-fo``: MeZO with
DiZO's layer-wise projection, searched by ZO or by backprop. ``pezo``: MeZO with PeZO's
pre-generated uniform pool, carried-over offset, adaptive scaling. ``fzoo``/``fzoo-code``: FZOO's
8 one-sided Rademacher probes normalised by the std of the perturbed losses, as the paper writes it
(1/eps in the step, sample std) and as its code runs it (no 1/eps, population std).
``elasticzo``: MeZO for the head and backprop (SGD, ``lr_bp``) for the last ``bp_layers``
parametrised layers (default 1) or the modules named in ``tail``, from the same two forwards
(Sugiura and Matsutani, 2025; ``steps/elastic.py``). Any method takes ``bp_layers``/``tail``:
its own estimator, direction and rule then drive the head.
``ranksgd``: ZO-RankSGD, from a ranking of m points x + eps xi (eps is the smoothing radius mu;
the ``rank`` options: m, k, legacy, mode, line_search, gamma, momentum, decay); see
:class:`zotune.ranking.RankSGD`. ``cge``: DeepZero's coordinate-wise
forward differences (d + 1 queries; ``sparsity`` for sparse CGE over random per-tensor masks,
BatchNorm parameters and the head's bias always estimated; ``steps/coordinate.py``).
``deepzero``: sparse CGE at 90% sparsity with SGD momentum 0.9 and coupled weight decay (Chen et
al., 2024); ``sparsity`` may be ZO-GraSP's layer-wise ratios (``zotune.sparsity``) and
``mask_redraw_steps`` redraws the masks periodically (``steps/masks.py``); given a model, it must
have a block table. ``rge``: DeepZero's RGE, forward differences along ``num_probes`` directions
against one base query (q + 1 queries), ``rge_mode`` ``gaussian`` (default), ``sphere`` or
``layer`` (per-tensor normalised, ZO-GraSP's; ``estimators/rge.py``)."""

PROGRAMS = {"estimate": EstimateStep, "conservative": ConservativeStep, "elastic": ElasticStep,
            "rank": RankStep, "coordinate": CoordinateStep}
RANK_ESTIMATOR_OPTIONS = ("m", "k", "legacy")
STATE_FREE = ("sgd", "sign")
LOW_PRECISION_PROBES = ("exclude", "keep")
PROBE_COVERAGE_THRESHOLD = 0.5
"""A low-precision tensor whose probes move fewer than this fraction of its elements is excluded
(``low_precision_probes="exclude"``): its ulp exceeds eps |z| almost everywhere, so its finite
differences measure nothing and its update would be a random walk (docs/design.md)."""

OFFLOAD_OPTIONS = ("offload_to", "offload_dir", "resident_blocks", "overlap", "fsync", "page_cache",
                   "transfer_dtype", "storage_dtype", "device", "sliced")
"""Options of ``engine="offload"`` (``engines/offload.py``), passed to the engine as given;
``sliced=True`` (with ``parallel``) slices every block among the ranks of a node (``engines/sliced.py``)."""
ENGINE_OPTIONS = {"offload": OFFLOAD_OPTIONS, "batched": ("points_per_forward",)}
"""The options each engine that takes its own options takes (by engine name)."""
OPTIONS = ("seed", "direction", "num_probes", "one_sided", "momentum", "betas", "adam_eps", "schedule",
           "warmup_steps", "total_steps", "defer_update", "estimator", "update", "kernel", "projection",
           "clip_norm", "transforms", "chunk_size", "master_weights", "threads", "engine", "rng_device",
           "low_precision_probes", "coupled_decay", "model", "bp_layers", "tail", "tail_grad", "lr_bp",
           "tail_update", "tail_momentum", "tail_weight_decay", "rank", "parallel", "sparsity",
           "rge_mode", "mask_redraw_steps", *OFFLOAD_OPTIONS, *ENGINE_OPTIONS["batched"])


def decays(name: str, param, named: bool) -> bool:
    """Whether weight decay applies: not to biases and norm weights (MeZO's rule, extended to
    Llama's ``norm`` and GPT-2's ``ln_*``); for unnamed tensors, not to 1-D tensors."""
    if not named:
        return param.ndim > 1
    lowered = name.lower()
    return not ("bias" in lowered or "norm" in lowered or ".ln_" in lowered or lowered.startswith("ln_"))


def check_options(options: dict) -> None:
    """Raise ValueError for an option :func:`build` does not take, naming the closest ones."""
    for key in options:
        if key not in OPTIONS:
            close = difflib.get_close_matches(key, OPTIONS, n=3)
            raise ValueError(f"unknown ZOOptimizer option {key!r}"
                             + (f"; did you mean: {', '.join(close)}?" if close else
                                f"; valid options: {', '.join(OPTIONS)}"))


def make_estimator(spec: dict, eps: float, num_probes: int | None, one_sided: bool, kernel: dict | None,
                   sparsity=None, always=None, rge_mode=None):
    """The method's estimator; kernel options (``kernel=``) turn any method into a kernel one."""
    if rge_mode is not None and "rge" not in spec:
        raise ValueError("rge_mode applies to method 'rge' only")
    if "rge" in spec and kernel is None and sparsity is None:
        return RGE(eps, num_probes or 1, rge_mode or spec["rge"].get("mode", "gaussian"))
    if "cge" in spec:
        options = dict(spec["cge"])
        if sparsity is not None:
            options["sparsity"] = sparsity
        return CGE(eps, always=always, **options)
    if sparsity is not None:
        raise ValueError("sparsity applies to the coordinate-wise methods (cge, deepzero) only")
    if "fzoo" in spec and kernel is None:
        return FZOO(eps, num_probes or 8, **spec["fzoo"])
    if kernel is None and "kernel" not in spec:
        return SPSA(eps, num_probes or 1, one_sided)
    if one_sided:
        raise ValueError("kernel-weighted estimators are two-sided; one_sided=True does not apply")
    options = {**spec.get("kernel", {}), **(kernel or {})}
    if num_probes is not None:
        options["num_probes"] = num_probes
    try:
        return KernelSPSA(eps, **options)
    except TypeError as err:
        raise ValueError(f"bad kernel options {sorted(options)}: {err}") from None


def make_rank(spec: dict, eps: float, rank: dict | None):
    """ZO-RankSGD's estimator and step program from the ``rank`` options (or None, None)."""
    if rank is None and "rank" not in spec:
        return None, None
    options = {**spec.get("rank", {}), **(rank or {})}
    own = {k: options.pop(k) for k in RANK_ESTIMATOR_OPTIONS if k in options}
    try:
        return RankEstimator(eps, **own), RankStep(**options)
    except TypeError as err:
        raise ValueError(f"bad rank options {sorted(own) + sorted(options)}: {err}; valid: "
                         "m, k, legacy, mode, line_search, gamma, momentum, momentum_tol, decay, adaptive") from None


def make_projection(spec: dict, projection):
    """The method's projection (DiZO), from an object, a dict of options or the preset."""
    if projection is False or (projection is None and "projection" not in spec):
        return None
    if projection is not None and not isinstance(projection, dict):
        return projection
    from .updates.projection import DiZO

    options = {**spec.get("projection", {}), **(projection or {})}
    try:
        return DiZO(**options)
    except TypeError as err:
        raise ValueError(f"bad projection options {sorted(options)}: {err}") from None


def make_rule(name: str, momentum: float = 0.9, betas=(0.9, 0.999), adam_eps: float = 1e-8):
    if name not in UPDATES:
        raise ValueError(f"unknown update rule {name!r}; valid: {', '.join(UPDATES)}")
    cls = UPDATES[name]
    if name == "momentum":
        return cls(momentum)
    if name == "adam":
        return cls(betas, adam_eps)
    return cls()


def exclude_unprobed(engine, eps: float) -> list[str]:
    """Set role ``frozen`` on low-precision tensors whose probes at ``eps`` move fewer than
    :data:`PROBE_COVERAGE_THRESHOLD` of their elements; return their names (with the reason
    recorded in the layout, so a resumed run excludes the same tensors)."""
    excluded, coverages = [], engine.probe_coverage(eps)
    zo = [spec for spec in engine.layout if spec.role == "zo"]
    if zo and all(coverages[spec.index] < PROBE_COVERAGE_THRESHOLD for spec in zo):
        raise ValueError(f"at eps={eps:g} the probes of every trainable {str(zo[0].dtype).replace('torch.', '')}"
                         f" tensor round away (they move at most {max(coverages[s.index] for s in zo):.0%} "
                         "of its elements); use a larger eps, float32 parameters, or "
                         "low_precision_probes='keep'")
    for spec, coverage in zip(engine.layout, coverages):
        if spec.role == "zo" and coverage < PROBE_COVERAGE_THRESHOLD:
            reason = (f"{str(spec.dtype).replace('torch.', '')} probes at eps={eps:g} move "
                      f"{coverage:.0%} of its elements (its ulp exceeds eps |z|)")
            engine.layout.set_role(spec.index, "frozen", reason)
            excluded.append(spec.name)
    return excluded


def _with_tail_roles(entries, model, bp_layers, tail) -> list:
    """``entries`` with role ``backprop`` on the tail's tensors (``models.split``)."""
    from .models.split import tail_names

    names = tail_names(model, [e[0] for e in entries], bp_layers=bp_layers,
                       tail=[tail] if isinstance(tail, str) else tail)
    return [(*e[:4], "backprop" if e[0] in names else (e[4] if len(e) > 4 else "zo")) for e in entries]


def _sliced(engine, parallel):
    """The sliced offload engine and the resolved mesh (the engine needs the process group)."""
    if engine != "offload":
        raise ValueError(f"sliced=True slices the blocks of engine='offload', not {engine!r}")
    if parallel is None:
        raise ValueError("sliced=True slices each block among the ranks of a parallel run: pass "
                         "parallel='ddp', 'pertp' or '2d' (--parallel)")
    from .distributed.topology import Topology, init
    from .engines.sliced import SlicedOffloadEngine

    return SlicedOffloadEngine, parallel if isinstance(parallel, Topology) else init(parallel)


def build(entries, *, eps: float, method: str, group_lrs, group_weight_decays, seed: int = 0,
          direction=None, num_probes=None, one_sided: bool = False, momentum: float = 0.9,
          betas=(0.9, 0.999), adam_eps: float = 1e-8, schedule: str = "constant", warmup_steps: int = 0,
          total_steps=None, defer_update: bool = False, estimator=None, update=None, kernel=None,
          projection=None, clip_norm=None, transforms=(), chunk_size: int = rng.DEFAULT_CHUNK_SIZE,
          master_weights="auto", threads=None, engine="in-memory", rng_device=None,
          low_precision_probes: str = "exclude", coupled_decay: bool = False, model=None,
          bp_layers=None, tail=None, tail_grad: str = "avg", lr_bp: float = 1e-2, tail_update: str = "sgd",
          tail_momentum: float = 0.9, tail_weight_decay: float = 0.0, rank=None,
          parallel=None, sparsity=None, rge_mode=None, mask_redraw_steps=None, **engine_options) -> StepCore:
    """Assemble a step core from ``(name, tensor, group, decays)`` entries and the options of
    :class:`~zotune.optim.ZOOptimizer` (which documents them). With ``model``, its block table
    decides weight decay (norms and biases exempt) and DiZO's attention targets.

    ElasticZO options (any two-point method): ``bp_layers`` (the last k parametrised layers of
    ``model``) or ``tail`` (module names) get the layout role ``backprop``; ``tail_grad``
    (``avg``/``plus``/``clean``), ``lr_bp``, ``tail_update`` (a rule name), ``tail_momentum``
    and ``tail_weight_decay`` (coupled, as ``torch.optim.SGD``) configure their update."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if low_precision_probes not in LOW_PRECISION_PROBES:
        raise ValueError(f"unknown low_precision_probes {low_precision_probes!r}; valid: "
                         f"{', '.join(LOW_PRECISION_PROBES)}")
    check_schedule(schedule, warmup_steps, total_steps)
    spec = METHODS[method]
    direction = make_direction(direction or spec.get("direction", "gaussian"))
    one_sided = bool(one_sided or spec.get("one_sided", False))
    coupled_decay = bool(coupled_decay or spec.get("coupled_decay", False))
    rank_estimator, program = make_rank(spec, eps, rank)
    if estimator is None:
        always = always_estimated(model) if "cge" in spec and model is not None else None
        estimator = rank_estimator or make_estimator(spec, eps, num_probes, one_sided, kernel,
                                                     sparsity, always, rge_mode)
    rule = (make_rule(update or spec["update"], momentum, betas, adam_eps)
            if update is None or isinstance(update, str) else update)
    if bp_layers is None and tail is None:
        bp_layers = spec.get("bp_layers")
    elastic = spec.get("program") == "elastic" or bp_layers is not None or tail is not None
    if elastic:
        if parallel is not None:  # its tail gradients would need an all-reduce, not scalars
            raise ValueError(f"{method} with a backprop tail (ElasticZO) does not run under "
                             f"parallel={getattr(parallel, 'mode', parallel)!r} yet; drop parallel or bp_layers/tail")
        if spec.get("program", "estimate") not in ("estimate", "elastic"):
            raise ValueError(f"{method} runs the {spec['program']!r} step, which has no backprop tail; "
                             "bp_layers/tail apply to methods with the plain estimate step")
        entries = _with_tail_roles(entries, model, bp_layers, tail)
        program = ElasticStep(make_rule(tail_update, tail_momentum, betas, adam_eps), lr_bp,
                              tail_weight_decay, tail_grad)
    else:
        program = program or PROGRAMS[spec.get("program", "estimate")]()
    if isinstance(program, CoordinateStep) and parallel is not None and \
            getattr(parallel, "mode", parallel) != "pertp":  # coordinate shards: distributed/coordinates.py
        raise ValueError(f"{method} (coordinate-wise) shards its coordinates among point-parallel "
                         f"ranks: use parallel='pertp', not {getattr(parallel, 'mode', parallel)!r}")
    if isinstance(program, ConservativeStep) and getattr(rule, "name", None) not in STATE_FREE:
        raise ValueError(f"zo-cons compares theta -+ lr g before applying one of them, which needs a "
                         f"state-free update rule ({', '.join(STATE_FREE)}); got {rule.name!r}")
    clip_norm = spec.get("clip_norm") if clip_norm is None else clip_norm
    transforms = list(transforms) + ([ClipTensorNorm(clip_norm)] if clip_norm is not None else [])
    # Look-ahead and conservative steps need each update applied before the next evaluation.
    defer_update = bool(defer_update) and not (getattr(rule, "lookahead", False)
                                               or isinstance(program, ConservativeStep))
    engine_cls = ENGINES.get(engine) if isinstance(engine, str) else engine
    if engine_cls is None:
        raise ValueError(f"unknown engine {engine!r}; valid engines: {', '.join(ENGINES)}")
    table = None
    if model is not None:
        from .models import block_table

        table = block_table(model, strict=False)
    if table is None and model is not None and spec.get("needs_blocks"):
        raise ValueError(f"method {method!r} needs a model with a block table (an nn.Sequential or a "
                         f"supported architecture), got {type(model).__name__}; use method 'cge' "
                         "with sparsity=... for another model")
    if table is not None:
        entries = [(e[0], e[1], e[2], not table.no_weight_decay(e[0]), *e[4:]) for e in entries]
    engine_options = {k: v for k, v in engine_options.items() if v is not None}
    sliced = engine_options.pop("sliced", False)
    if sliced:  # DistZO2's sliced offload (engines/sliced.py)
        engine_cls, parallel = _sliced(engine, parallel)
    if isinstance(engine, str):
        foreign = sorted(k for k in engine_options if k not in ENGINE_OPTIONS.get(engine, ()))
        if foreign:
            owner = next((name for name, keys in ENGINE_OPTIONS.items() if foreign[0] in keys), None)
            if owner is None:
                known = sorted({k for keys in ENGINE_OPTIONS.values() for k in keys})
                raise ValueError(f"unknown engine option {foreign[0]!r}; valid: {', '.join(known)}")
            raise ValueError(f"{', '.join(foreign)} apply to engine={owner!r} only, not {engine!r}")
    if sliced:
        engine_options["topology"] = parallel  # the engine needs the process group
    if getattr(engine_cls, "needs_model", False):
        engine_options["model"] = model
    elif engine_options:
        raise ValueError(f"{', '.join(sorted(engine_options))} apply to engine='offload' only, "
                         f"not {engine!r}")
    if parallel is not None:  # point parallelism needs master copies (engines/distributed.py)
        from .engines.distributed import engine_options as parallel_engine_options
        master_weights = parallel_engine_options(parallel, master_weights)
    eng = engine_cls(entries, direction, chunk_size=chunk_size, master_weights=master_weights,
                     threads=threads, rng_device=rng_device, **engine_options)
    if parallel is not None:  # the plan's points and the batch divided among ranks
        from .engines.distributed import wrap
        eng = wrap(eng, parallel, seed=seed)
    eng.layout.blocks = table
    excluded = exclude_unprobed(eng, eps) if low_precision_probes == "exclude" else []
    if excluded:
        warnings.warn(f"{len(excluded)} low-precision tensor(s) are not trained, their probes round "
                      f"away (e.g. {excluded[0]}: {eng.layout.spec(excluded[0]).reason}); pass "
                      "low_precision_probes='keep' to train them anyway", stacklevel=3)
    if hasattr(estimator, "bind"):
        estimator.bind([t.tensor_id for t in eng.layout])
    if hasattr(estimator, "attach"):  # estimators that read the directions' norms (rge modes)
        estimator.attach(eng)
    proj = make_projection(spec, projection)
    posts = []
    if proj is not None:
        proj.bind(eng)
        posts.append(ProjectionStep(proj))
    if mask_redraw_steps is not None:  # DeepZero's periodically redrawn gradient masks
        if not hasattr(estimator, "redraw"):
            raise ValueError(f"mask_redraw_steps applies to the coordinate-wise methods (cge, deepzero), "
                             f"not {method!r}")
        redraw = MaskRedraw(mask_redraw_steps)
        redraw.start(estimator, eng.layout, seed)
        posts.append(redraw)
    core = StepCore(eng, direction, estimator, rule, transforms=transforms, program=program, posts=posts,
                    seed=seed, group_lrs=group_lrs, group_weight_decays=group_weight_decays,
                    schedule=(schedule, warmup_steps, total_steps), defer_update=defer_update,
                    coupled_decay=coupled_decay)
    core.method, core.clip_norm, core.excluded, core.projection = method, clip_norm, excluded, proj
    if hasattr(program, "check"):
        program.check(core)
    return core
