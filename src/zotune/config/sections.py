"""The settings of a run: one dataclass per component of the recipe.

    TrainConfig
      model:  ModelConfig    the model and which of its parameters train
      data:   DataConfig     task, data protocol, batches, evaluation sets
      method: MethodConfig   the ZO method and its parts, with three option families:
                kernel: KernelOptions   KerZOO's kernel-weighted estimator
                dizo:   DiZOOptions     DiZO's layer-wise projection
                pezo:   PeZOOptions     options of the direction (PeZO's pool and bank, pooled)
      engine: EngineConfig   how a step sweeps the parameters
      run:    RunConfig      length, seed, output directory, logging and evaluation cadence

Every field is declared with :func:`setting`: its default, a help text (the flag's), whether it
may change when a run is resumed (``FIXED``, ``FREE`` or a check), and its flat name where that is
not the usual one. Flat names are the keys and flags of the former flat TrainConfig (``lr``,
``kernel_order``, ``--dizo-interval``); :mod:`zotune.config.keys` derives them from these fields.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import os
from dataclasses import dataclass, field
from typing import ClassVar

from ..errors import ZotuneError

DTYPES = ("float32", "bfloat16", "float16")
OBJECTIVES = ("auto", "classification", "answer_lm", "accuracy", "f1")
TRAINABLE = ("full", "lora", "prefix", "pattern")
ESTIMATORS = ("spsa", "kernel")
PROJECTIONS = ("none", "dizo", "dizo-fo")
# Per-scheme defaults: MeZO's eps (research/mezo_zobench.md, section 3.1) and lr; full and pattern
# lr measured on the default model, SmolLM2-135M: in 40 steps 3e-5 lowers the test loss beyond its
# sampling error on SST-2, COPA, RTE, MultiRC, SQuAD and WiC, not yet on CB, WSC and BoolQ (no lr
# tried does; docs/benchmarks.md, "Do the CLI's defaults learn?"); MeZO's 1e-6 is OPT-13B's, for 20k
# steps. The stable lr of ZO-SGD falls about as 1/d with the
# number d of trained parameters, so a larger model wants about 3e-5 * 135M / d (OPT-13B: 3e-7,
# inside MeZO's 1e-7..1e-6). LoRA (r 8 on q and v): 3e-3 from the sweep on SST-2's dev split
# (1e-4, MeZO's, moved the loss by 0.7% in 200 forward passes; 1e-2 diverged).
DEFAULT_LR = {"full": 3e-5, "lora": 3e-3, "prefix": 1e-2, "pattern": 3e-5}
DEFAULT_EPS = {"full": 1e-3, "lora": 1e-2, "prefix": 1e-1, "pattern": 1e-3}
# FZOO's step is normalised (it moves lr / eps along the unit-variance direction whatever the
# loss's scale), so its lr is a step length, not MeZO's: the code form's lr by scheme, chosen by
# the sweep in docs/benchmarks.md (methods benchmark); the paper's form carries 1/eps, so its lr is
# this times eps.
FZOO_STEP = {"full": 3e-3, "lora": 3e-2, "prefix": 3e-2, "pattern": 3e-3}


def default_lr(method: str, scheme: str, eps: float, *, kernel: dict | None = None,
               estimator: str | None = None) -> float:
    r"""The lr a run of ``method`` on the ``scheme`` parameters gets when none is given.

    * FZOO's normalised estimator: FZOO's step length (times eps in the paper's form, whose step
      carries 1/eps).
    * A kernel-weighted estimator (KerZOO's: the preset's, or ``kernel`` options on any method):
      MeZO's lr times :math:`E[g] / E[g^2]` of the kernel's first-order gain g
      (``KernelSPSA.gain_moments``; MeZO's g = 1). In the descent lemma
      :math:`E[L'] \le L - \eta E[g] \|\nabla L\|^2 + \tfrac{\beta}{2} \eta^2 E[g^2] C`
      (C: MeZO's second-moment term), the best and the largest stable lr scale as
      E[g] / E[g^2], so this keeps MeZO's margin: 1/6.25 for the order-3 kernel. On SST-2 LoRA
      KerZOO diverged on both seeds at MeZO's lr and ended above its start at 1/2.5 of it (the
      same RMS step); at this default it is stable, though flat over 144 forward passes
      (docs/benchmarks.md, methods benchmark).
    * Every other estimator: MeZO's lr by scheme.

    ``kernel``: options that turn the estimator into KerZOO's (``{}``: its defaults), None for
    the preset's own; ``estimator="spsa"`` is plain SPSA whatever the preset. Which estimator the
    run gets is :func:`zotune.methods.make_estimator`'s answer, the one the run builds."""
    from ..estimators import FZOO, KernelSPSA
    from ..methods import METHODS, make_estimator

    lr = DEFAULT_LR.get(scheme, DEFAULT_LR["full"])
    if estimator == "spsa":
        return lr
    if estimator == "kernel" and kernel is None:
        kernel = {}
    try:
        built = make_estimator(METHODS.get(method, {}), eps, None, False, kernel)
    except ValueError:
        return lr  # bad options: the run reports them when it builds the estimator
    if isinstance(built, FZOO):
        step = FZOO_STEP.get(scheme, FZOO_STEP["full"])
        return step if built.scale == "code" else step * eps
    if isinstance(built, KernelSPSA):
        mean, second = built.gain_moments()
        return float(f"{lr * mean / second:.3g}")  # 4.8e-06, not 4.7999...e-06
    return lr


FIXED = "fixed"
"""The setting changes what the run computes: a resumed run must keep it."""
FREE = "free"
"""The setting changes where or how often things are written, not the trajectory."""


def setting(default, help: str, *, resume=FIXED, flat: str | None = None, choices=None,
            checked: bool = True, default_text: str | None = None, added: bool = False):
    """A config field: ``default``; ``help`` (the flag's help text, without the default: the flag's
    help adds it); ``resume``: ``FIXED`` (may not change on resume; the default, so that a new
    field is safe until declared otherwise), ``FREE``, or ``check(saved, new) -> reason or None``
    for a field that may change only in some runs; ``flat``: its flat name, when not the family
    prefix + the field name; ``choices``: the valid values, a tuple or a function returning them
    from their registry (listed in the help; checked by ``TrainConfig.validate`` unless
    ``checked=False``, for values the component they configure checks itself); ``default_text``:
    how the help shows the default, when not the default value itself (a None default);
    ``added``: True for a setting added after zotune 0.1 (config.json holds it only where it is
    not at its default: ``TrainConfig.saved``)."""
    metadata = {"help": help, "resume": resume, "choices": choices, "checked": checked,
                "default_text": default_text, "added": added}
    if flat is not None:
        metadata["flat"] = flat
    return field(default=default, metadata=metadata)


# The registries the choices come from, read when they are needed (the help, validate), so that
# importing the config does not import the library.
def _methods() -> tuple:
    from ..image_trainers import TRAINERS  # the image tasks' methods (backprop, ...) too
    from ..optim import METHODS
    return tuple(METHODS) + tuple(m for m in TRAINERS if m not in METHODS)


def _tail_grads() -> tuple:
    from ..steps.elastic import TAIL_GRADS
    return TAIL_GRADS


def _directions() -> tuple:
    from ..directions import DIRECTIONS
    return tuple(sorted(DIRECTIONS))


def _updates() -> tuple:
    from ..updates import UPDATES
    return tuple(UPDATES)


def _schedules() -> tuple:
    from ..updates import SCHEDULES
    return tuple(SCHEDULES)


def _tasks() -> tuple:
    from ..tasks import list_tasks
    from ..tasks.images import IMAGE_TASKS
    return tuple(list_tasks()) + tuple(IMAGE_TASKS)


def _rge_modes() -> tuple:
    from ..estimators.rge import MODES
    return MODES


def _ratio_methods() -> tuple:
    from ..sparsity.grasp import RATIO_METHODS
    return RATIO_METHODS


def _kernel_orders() -> tuple:
    from ..estimators.kernel import KERNELS
    return tuple(sorted(KERNELS))


def _kernel_schedules() -> tuple:
    from ..estimators.kernel import SCHEDULES
    return tuple(SCHEDULES)


def _kernel_r_sharing() -> tuple:
    from ..estimators.kernel import KernelSPSA
    return tuple(KernelSPSA.R_SHARING)


def _kernel_normalizations() -> tuple:
    from ..estimators.kernel import KernelSPSA
    return tuple(KernelSPSA.NORMALIZATIONS)


def _pezo_scalings() -> tuple:
    from ..directions.pezo import SCALINGS
    return tuple(SCALINGS)


def _default_by_scheme(table: dict) -> str:
    return "by --trainable: " + ", ".join(f"{scheme} {value:g}" for scheme, value in table.items())


def component(cls):
    """``dataclass``, whose constructor reports an unknown keyword like an unknown YAML key."""
    cls = dataclass(cls)
    init, names = cls.__init__, {f.name for f in dataclasses.fields(cls)}

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            from .keys import unknown_message
            raise ZotuneError(unknown_message(cls, unknown[0], f"the arguments of {cls.__name__}",
                                              flat_ok=False))
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def _set_options(family) -> dict:
    """The options of a family that are set (not None), by field name."""
    return {k: v for k, v in dataclasses.asdict(family).items() if v is not None}


def _steps_on_resume(saved, new) -> str | None:
    """``steps`` may change on resume (``--steps 2000 --resume``) only with a constant schedule:
    for ``linear`` and ``cosine`` it is the decay horizon, so every later learning rate depends
    on it."""
    schedule = saved.method.schedule if saved.method.schedule != "constant" else new.method.schedule
    if schedule == "constant":
        return None
    return (f"with the {schedule!r} schedule steps is the horizon the learning rate decays over, so "
            f"changing it changes every learning rate after step {saved.method.warmup_steps} and "
            f"the resumed run would not continue the saved one; resume with --steps "
            f"{saved.run.steps} or start a new run")


# ------------------------------------------------------------------------------------ sections
@component
class ModelConfig:
    """The model, where it runs, and which of its parameters train."""

    flat_prefix: ClassVar[str] = ""
    name: str = setting("smollm2-135m", "embedded model name, local model directory or Hugging "
                        "Face id", flat="model")
    dtype: str = setting("float32", "parameter dtype (bfloat16 and float16 keep a float32 master "
                         "copy)", choices=DTYPES)
    device: str = setting("auto", "auto (GPU if available), cpu, cuda or cuda:N", resume=FREE)
    trainable: str = setting("full", "which parameters to train", choices=TRAINABLE)
    pattern: str | None = setting(None, "regex of parameter names (--trainable pattern)",
                                  default_text="unset")
    lora_r: int = setting(8, "LoRA rank (--trainable lora)")
    lora_alpha: int = setting(16, "LoRA alpha (--trainable lora)")
    prefix_tokens: int = setting(5, "prefix length in tokens (--trainable prefix)")
    max_length: int = setting(2048, "longest sequence in tokens (longer prompts are truncated)")
    cnn_width: int | None = setting(None, "image tasks, --model cnn: channels of every conv stage "
                                    "(Fashion-MNIST, depth 2: 8, 19, 36 give 786, 3,734, 12,574 "
                                    "parameters)", default_text="18", added=True)
    cnn_depth: int | None = setting(None, "image tasks, --model cnn: conv stages", default_text="2",
                                    added=True)


@component
class DataConfig:
    """The task, MeZO's data protocol, the batches and the evaluation sets."""

    flat_prefix: ClassVar[str] = ""
    # get_task checks the name (case-insensitively), and only when there is no task_file.
    task: str = setting("sst2", "built-in task (see `zotune list`)", choices=_tasks, checked=False)
    task_file: str | None = setting(None, "custom task spec (YAML/JSON; docs/tasks.md) instead of "
                                    "--task", default_text="unset")
    data_dir: str | None = setting(None, "GLUE/SuperGLUE files in their official layout",
                                   resume=FREE, default_text="$ZOTUNE_DATA")
    skip_bad_rows: bool = setting(False, "skip (and count in summary.json) rows of the data files "
                                  "that cannot be used, instead of stopping at the first one",
                                  added=True)
    num_train: int = setting(1000, "training examples (MeZO's protocol)")
    num_dev: int | None = setting(None, "dev examples", default_text="the task's own")
    num_test: int = setting(1000, "test examples", resume=FREE)
    data_seed: int = setting(0, "seed of MeZO's data sampling")
    batch_size: int = setting(16, "examples per step")
    objective: str = setting("auto", "training loss; auto = the task's own", choices=OBJECTIVES)
    eval_dev: int | None = setting(None, "evaluate on only the first N dev examples during training",
                                   resume=FREE, default_text="all of them")
    eval_batch_size: int = setting(32, "examples per evaluation forward pass", resume=FREE)
    epochs: int | None = setting(None, "image tasks: train this many epochs (sets the steps)",
                                 default_text="--steps", added=True)
    augment: bool = setting(False, "image tasks: random crop and flip (CIFAR-10)", added=True)


@component
class KernelOptions:
    """KerZOO's kernel-weighted estimator; any option set turns the method's estimator into it."""

    flat_prefix: ClassVar[str] = "kernel_"
    # The estimator checks these (with its own messages).
    order: int | None = setting(None, "KerZOO kernel order", choices=_kernel_orders, checked=False,
                                default_text="the method's or KerZOO's")
    schedule: str | None = setting(None, "KerZOO: schedule of r's interval",
                                   choices=_kernel_schedules, checked=False,
                                   default_text="the method's or KerZOO's")
    r_sharing: str | None = setting(None, "KerZOO: one r per probe (paper) or per tensor (code)",
                                    choices=_kernel_r_sharing, checked=False,
                                    default_text="the method's or KerZOO's")
    normalization: str | None = setting(None, "KerZOO: the paper's or the authors' code's",
                                        choices=_kernel_normalizations, checked=False,
                                        default_text="the method's or KerZOO's")
    s0: float | None = setting(None, "KerZOO: initial half-width of r's interval",
                               default_text="the method's or KerZOO's")
    shrink_steps: int | None = setting(None, "KerZOO: steps of the linear shrink",
                                       default_text="the method's or KerZOO's")


@component
class DiZOOptions:
    """DiZO's layer-wise projection; any option set turns it on (ZO search unless --projection)."""

    flat_prefix: ClassVar[str] = "dizo_"
    interval: int | None = setting(None, "DiZO: steps between projections",
                                   default_text="the method's or DiZO's")
    iterations: int | None = setting(None, "DiZO: search iterations", default_text="the method's or DiZO's")
    eps: float | None = setting(None, "DiZO: perturbation of the per-layer norms",
                                default_text="the method's or DiZO's")
    step_size: float | None = setting(None, "DiZO: search step size", default_text="the method's or DiZO's")
    clip: float | None = setting(None, "DiZO: ratio range 1 +- clip", default_text="the method's or DiZO's")
    pattern: str | None = setting(None, "DiZO: regex of projected tensors",
                                  default_text="the model's block table")


@component
class PeZOOptions:
    """Options of the direction: PeZO's pool and bank, and the pool size of ``pooled``."""

    flat_prefix: ClassVar[str] = "pezo_"
    pool_size: int | None = setting(None, "numbers in the pool of pooled/pezo-pool directions",
                                    flat="pool_size", default_text="the direction's")
    bits: int | None = setting(None, "PeZO: bits of the uniform numbers, 1-16 (0: float)",
                               default_text="the direction's")
    # The direction checks it: the bank takes only static and none.
    scaling: str | None = setting(None, "PeZO: scaling of the numbers (the bank: static or none)",
                                  choices=_pezo_scalings, checked=False,
                                  default_text="the direction's")
    pow2: bool | None = setting(None, "PeZO: round the scale to a power of two",
                                default_text="the direction's")
    decorrelate_copies: bool | None = setting(None, "PeZO pool: shift each copy of the pool per "
                                              "probe (not in the paper)",
                                              default_text="the direction's")
    lanes: int | None = setting(None, "PeZO bank: generators", default_text="the direction's")
    reuse: int | None = setting(None, "PeZO bank: numbers reused per cycle",
                                default_text="the direction's")


@component
class MethodConfig:
    """The ZO method: a preset (``name``) and every part that overrides it (None keeps the
    preset's): estimator, direction, update rule, projection, and their option families."""

    flat_prefix: ClassVar[str] = ""
    name: str = setting("mezo", "ZO method (a preset of the parts below)", flat="method",
                        choices=_methods)
    lr: float | None = setting(None, "learning rate", default_text=_default_by_scheme(DEFAULT_LR)
                               + "; fzoo-code: " + ", ".join(f"{k} {v:g}" for k, v in FZOO_STEP.items())
                               + "; fzoo: that times eps; a kernel estimator (kerzoo): "
                               "MeZO's times E[g]/E[g^2] of its gain (1/6.25 for order 3)")
    eps: float | None = setting(None, "perturbation scale",
                                default_text=_default_by_scheme(DEFAULT_EPS))
    num_probes: int | None = setting(None, "directions per step (n-SPSA)",
                                     default_text="the method's")
    one_sided: bool = setting(False, "forward differences against the unperturbed loss")
    weight_decay: float = setting(0.0, "decoupled weight decay (not on biases and norms)")
    schedule: str = setting("constant", "learning-rate schedule", choices=_schedules)
    warmup_steps: int = setting(0, "steps of linear learning-rate warm-up")
    estimator: str | None = setting(None, "override the method's estimator (kernel: KerZOO)",
                                    choices=ESTIMATORS, default_text="the method's")
    update: str | None = setting(None, "override the method's update rule", choices=_updates,
                                 default_text="the method's")
    projection: str | None = setting(None, "override the method's projection",
                                     choices=PROJECTIONS, default_text="the method's")
    clip_norm: float | None = setting(None, "per-tensor norm clip of the ZO gradient",
                                      default_text="no clipping")
    direction: str | None = setting(None, "random direction distribution", choices=_directions,
                                    default_text="the method's")
    bp_layers: int | None = setting(None, "ElasticZO: train the last N parametrised layers by backprop",
                                    default_text="the method's (elasticzo: 1)", added=True)
    lr_bp: float | None = setting(None, "ElasticZO: learning rate of the backprop tail (backprop: unused)",
                                  default_text="1e-2", added=True)
    tail_grad: str = setting("avg", "ElasticZO: the passes the tail gradient comes from",
                             choices=_tail_grads, added=True)
    momentum: float = setting(0.0, "image tasks: momentum of the first-order (backprop, tail) SGD",
                              added=True)
    sparsity: float | None = setting(None, "cge/deepzero: fraction of each conv/linear tensor's "
                                     "coordinates not estimated, in [0, 1)",
                                     default_text="the method's (deepzero: 0.9)", added=True)
    rge_mode: str | None = setting(None, "rge: directions Gaussian, on the unit sphere, or normalised "
                                   "per tensor (ZO-GraSP's)", choices=_rge_modes,
                                   default_text="gaussian", added=True)
    layer_ratios: str | None = setting(None, "cge/deepzero, image tasks: the layer-wise sparsity of "
                                       "the gradient masks, from ZO-GraSP, first-order GraSP or "
                                       "uniform at --sparsity", choices=_ratio_methods,
                                       default_text="deepzero: zo-grasp, cge: uniform", added=True)
    mask_redraw_epochs: int | None = setting(None, "cge/deepzero, image tasks: redraw the random "
                                             "gradient masks every N epochs",
                                             default_text="deepzero: 5, cge: never", added=True)
    warmup_epochs: int | None = setting(None, "image tasks: epochs of linear learning-rate warm-up "
                                        "(then --schedule)", default_text="deepzero: 3, else "
                                        "--warmup-steps", added=True)
    kernel: KernelOptions = field(default_factory=KernelOptions)
    dizo: DiZOOptions = field(default_factory=DiZOOptions)
    pezo: PeZOOptions = field(default_factory=PeZOOptions)

    def optimizer_options(self) -> dict:
        """The ZOOptimizer arguments that compose the method from its parts."""
        kernel, dizo = _set_options(self.kernel), _set_options(self.dizo)
        options: dict = {"update": self.update, "clip_norm": self.clip_norm,
                         "direction": self.make_direction()}
        if self.bp_layers is not None or self.name == "elasticzo":  # ElasticZO's backprop tail
            options.update(tail_grad=self.tail_grad, lr_bp=1e-2 if self.lr_bp is None else self.lr_bp)
            if self.bp_layers is not None:
                options["bp_layers"] = self.bp_layers
        if self.sparsity is not None:
            options["sparsity"] = self.sparsity
        if self.rge_mode is not None:
            options["rge_mode"] = self.rge_mode
        if self.estimator == "kernel" or kernel:
            if self.estimator == "spsa":
                raise ZotuneError("--estimator spsa conflicts with --kernel-* options")
            options["kernel"] = kernel
        elif self.estimator == "spsa":
            from ..estimators import SPSA
            options["estimator"] = SPSA(self.eps, self.num_probes or 1, self.one_sided)
        if self.projection == "none":
            options["projection"] = False
        elif self.projection is not None or dizo:
            if self.projection is not None:
                dizo["search"] = "fo" if self.projection == "dizo-fo" else "zo"
            options["projection"] = dizo
        return options

    def direction_name(self) -> str:
        """The direction in use: ``direction`` if set, else the method's own (MeZO's Gaussian
        for most methods, PeZO's pool for ``pezo``)."""
        from ..optim import METHODS

        return self.direction or METHODS.get(self.name, {}).get("direction", "gaussian")

    def make_direction(self):
        """The direction with its options (``pool_size``, ``pezo_*``; 0 bits = float uniform)."""
        from ..directions import DIRECTIONS
        from .keys import flag_of

        name = self.direction_name()
        options = _set_options(self.pezo)
        if options.get("bits") == 0:
            options["bits"] = None
        cls = DIRECTIONS[name]
        accepted = set(inspect.signature(cls).parameters)
        wrong = sorted(set(options) - accepted)
        if wrong:
            ours = {f.name for f in dataclasses.fields(PeZOOptions)}
            valid = sorted(accepted & ours)
            flag = lambda option: flag_of(("method", "pezo", option))  # noqa: E731
            raise ZotuneError(f"{', '.join(map(flag, wrong))} not for the {name!r} direction; "
                              f"it takes: {', '.join(map(flag, valid)) or 'no options'}")
        try:
            return cls(**options)
        except ValueError as err:
            raise ZotuneError(f"direction {name!r}: {err}") from None


@component
class EngineConfig:
    """How a step sweeps the parameters (the place for chunk size and threads)."""

    flat_prefix: ClassVar[str] = ""
    # Deferred and immediate updates give bitwise equal parameters (tests/test_conformance.py),
    # so a resumed run may switch.
    defer_update: bool = setting(True, "fuse each update into the next perturbation "
                                 "(2 parameter sweeps per step)", resume=FREE)
    # Engines give bitwise equal runs (tests/test_offload.py), so a resumed run may switch.
    name: str = setting("in-memory", "where parameters live: in-memory, or offload (stream blocks "
                        "from host memory or disk, for models larger than the device), or batched "
                        "(in memory, all probe points in one forward: for GPUs, slower on CPU)", flat="engine",
                        resume=FREE, choices=lambda: tuple(e for e in _engines() if e != "reference"),
                        added=True)
    offload_to: str = setting("cpu", "offload tier (--engine offload): cpu memory or disk "
                              "(--offload-dir)", resume=FREE, choices=("cpu", "disk"), added=True)
    offload_dir: str | None = setting(None, "directory of the disk tier (--offload-to disk)",
                                      resume=FREE, default_text="none", added=True)
    resident_blocks: int = setting(0, "blocks kept resident, never offloaded (--engine offload)",
                                   resume=FREE, added=True)
    # These change the numbers (bf16 compute, stochastic rounding): a resumed run keeps them.
    transfer_dtype: str = setting("fp32", "dtype the offloaded blocks travel and compute in "
                                  "(--engine offload): fp32, or bf16/fp16 with the fp32 master "
                                  "kept in the tier", choices=("fp32", "bf16", "fp16"), added=True)
    storage_dtype: str = setting("fp32", "dtype of the offload tier (--engine offload): fp32, or "
                                 "bf16 (half the bytes; each update stochastically rounded)",
                                 choices=("fp32", "bf16"), added=True)
    # Sliced and unsliced give bitwise equal runs (tests/test_sliced_offload.py).
    offload_sliced: bool = setting(False, "with --parallel: each rank of a node stores and loads "
                                   "only its slice of every block, an all-gather assembles it "
                                   "(one copy of the model per node)", resume=FREE, added=True)
    # Distributed (docs/distributed.md): every mode and world size reads the same checkpoints.
    parallel: str = setting("none", "distribute the step over the ranks of torchrun: ddp (each rank "
                            "its share of the batch), pertp (each rank its share of the probe "
                            "points), 2d (both, --pertp ranks per point group)", resume=FREE,
                            choices=("none", "ddp", "pertp", "2d"), added=True)
    pertp: int = setting(2, "point-parallel ranks per group with --parallel 2d", resume=FREE,
                         added=True)
    dist_timeout: float = setting(1800.0, "seconds a rank waits for the others before stopping "
                                  "with an error (must exceed rank 0's longest evaluation)",
                                  resume=FREE, added=True)
    query_batch: str = setting("auto", "cge/deepzero on image tasks: coordinate queries of one block "
                               "evaluated together, an integer P or auto (P measured per block on "
                               "the first step); 1 is plain feature reuse (all bitwise equal under "
                               "--query-exact, so a resumed run may change it)", resume=FREE, added=True)
    query_exact: bool = setting(True, "batched coordinate queries bitwise equal to one at a time; "
                                "--no-query-exact also updates the next convolution of a stage "
                                "incrementally (equal within fp32 round-off, faster)", added=True)

    def engine_options(self) -> dict:
        """The ZOOptimizer arguments of this section beyond ``defer_update``."""
        if self.name == "batched":
            return {"engine": "batched"}
        if self.name != "offload":
            return {}
        return {"engine": "offload", "offload_to": self.offload_to, "offload_dir": self.offload_dir,
                "resident_blocks": self.resident_blocks,  # fp32: the model's own dtype
                "transfer_dtype": None if self.transfer_dtype == "fp32" else self.transfer_dtype,
                "storage_dtype": None if self.storage_dtype == "fp32" else self.storage_dtype,
                **({"sliced": True} if self.offload_sliced else {})}


def _engines():
    from ..engines import ENGINES

    return ENGINES


@component
class RunConfig:
    """How long the run is, its seed, where it writes, and how often it logs and evaluates."""

    flat_prefix: ClassVar[str] = ""
    steps: int = setting(1000, "total number of training steps (with --resume too: the total, "
                         "not the steps to add)", resume=_steps_on_resume)
    seed: int = setting(0, "run seed (directions and batch order)")
    output_dir: str = setting("runs/zotune", "run directory", resume=FREE)
    log_every: int = setting(10, "log interval (steps)", resume=FREE)
    eval_every: int = setting(100, "dev evaluation interval (steps)", resume=FREE)
    max_time: float | None = setting(None, "stop (with a checkpoint) after this many seconds",
                                     resume=FREE, default_text="no limit")
    keep_checkpoints: int = setting(2, "step checkpoints kept, newest first (--resume falls back to "
                                    "an older one when the newest is unreadable)", resume=FREE,
                                    added=True)


@component
class TrainConfig:
    """Every setting of a run, one section per component. Build it nested
    (``TrainConfig(method=MethodConfig(lr=1e-5))``), from flat names
    (``TrainConfig.from_flat(lr=1e-5, kernel_order=3)``), or from a mapping of either
    (``TrainConfig.from_dict``: YAML files, saved config.json files of any version)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_dict(cls, mapping, *, source: str = "the settings") -> "TrainConfig":
        """A config from nested sections (``{method: {lr: 1e-5, kernel: {order: 3}}}``), flat
        names (``{lr: 1e-5, kernel_order: 3}``) or both; ``source`` names it in errors."""
        from .keys import apply

        return apply(cls(), mapping, source)

    @classmethod
    def from_flat(cls, **settings) -> "TrainConfig":
        """A config from the former flat TrainConfig's keyword arguments:
        ``TrainConfig.from_flat(task="rte", lr=1e-5, kernel_order=3)``."""
        return cls.from_dict(settings, source="the arguments of TrainConfig.from_flat")

    def updated(self, mapping, *, source: str = "the settings") -> "TrainConfig":
        """A copy with the settings of ``mapping`` (nested or flat, as ``from_dict``) replaced."""
        from .keys import apply

        return apply(copy.deepcopy(self), mapping, source)

    def to_dict(self) -> dict:
        """The nested settings (the layout of a nested YAML file)."""
        return dataclasses.asdict(self)

    def flat(self) -> dict:
        """The settings by flat name: ``{"model": ..., "lr": ..., "kernel_order": ...}``."""
        from .keys import LEAVES

        return {leaf.flat: leaf.get(self) for leaf in LEAVES}

    def saved(self) -> dict:
        """What a run's config.json holds: every setting by flat name, as zotune 0.1 wrote it, and
        a setting added since (``setting(added=True)``) only where it is not at its default, so
        that the file of a run that does not use it still reads in older versions."""
        from .keys import LEAVES

        return {leaf.flat: leaf.get(self) for leaf in LEAVES
                if not leaf.added or leaf.get(self) != leaf.default}

    def with_absolute_paths(self) -> "TrainConfig":
        """A copy whose paths are absolute: ``data_dir``, ``task_file``, ``output_dir``, and the
        model when it names a local directory (not an embedded model), so that a run's config.json
        means the same from any working directory (``zotune eval --checkpoint``, ``--resume``)."""
        from ..models.loading import EMBEDDED

        cfg = copy.deepcopy(self)
        d, m = cfg.data, cfg.model
        d.data_dir = _absolute(d.data_dir) if d.data_dir else d.data_dir
        d.task_file = _absolute(d.task_file) if d.task_file else d.task_file
        cfg.run.output_dir = _absolute(cfg.run.output_dir)
        if cfg.engine.offload_dir:
            cfg.engine.offload_dir = _absolute(cfg.engine.offload_dir)
        if m.name.lower() not in EMBEDDED and os.path.isdir(os.path.expanduser(m.name)):
            m.name = _absolute(m.name)
        return cfg

    def resolved(self) -> "TrainConfig":
        """A copy with absolute paths (``with_absolute_paths``) and lr and eps filled in from the
        trainable scheme, validated."""
        cfg = self.with_absolute_paths()
        scheme = cfg.model.trainable
        if cfg.method.eps is None:
            cfg.method.eps = DEFAULT_EPS.get(scheme, 1e-3)
        if cfg.method.lr is None:
            cfg.method.lr = default_lr(cfg.method.name, scheme, cfg.method.eps,
                                       kernel=_set_options(cfg.method.kernel) or None,
                                       estimator=cfg.method.estimator)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ZotuneError naming the first bad value and the valid choices."""
        from .keys import LEAVES

        model, data, method, run = self.model, self.data, self.method, self.run
        for leaf in LEAVES:  # the settings with a fixed set of values, from their registries
            value = leaf.get(self)
            if leaf.checked and value is not None and value not in leaf.choices:
                raise ZotuneError(f"unknown {leaf.flat} {value!r}; valid: "
                                  f"{', '.join(map(str, leaf.choices))}")
        e = self.engine
        if e.name == "offload" and e.offload_to == "disk" and not e.offload_dir:
            raise ZotuneError("--offload-to disk needs --offload-dir DIR")
        if e.offload_sliced and (e.name != "offload" or e.parallel == "none"):
            raise ZotuneError("--offload-sliced slices the blocks of --engine offload among the ranks "
                              f"of --parallel ddp|pertp|2d; got --engine {e.name} --parallel {e.parallel}")
        if not (isinstance(e.resident_blocks, int) and e.resident_blocks >= 0):
            raise ZotuneError(f"resident_blocks must be an integer >= 0, got {e.resident_blocks!r}")
        if method.num_probes is not None and not _positive_int(method.num_probes):
            raise ZotuneError(f"num_probes must be an integer >= 1, got {method.num_probes!r}")
        for name, value in (("steps", run.steps), ("batch_size", data.batch_size),
                            ("eval_every", run.eval_every), ("log_every", run.log_every),
                            ("eval_batch_size", data.eval_batch_size), ("num_train", data.num_train),
                            ("num_test", data.num_test), ("max_length", model.max_length)):
            if not _positive_int(value):
                raise ZotuneError(f"{name} must be an integer >= 1, got {value!r}")
        if method.lr is not None and not method.lr >= 0:
            raise ZotuneError(f"lr must be >= 0, got {method.lr}")
        if method.eps is not None and not method.eps > 0:
            raise ZotuneError(f"eps must be > 0, got {method.eps}")
        if method.weight_decay < 0:
            raise ZotuneError(f"weight_decay must be >= 0, got {method.weight_decay}")
        if not _positive_int(run.keep_checkpoints):
            raise ZotuneError(f"keep_checkpoints must be an integer >= 1, got {run.keep_checkpoints!r}")
        if run.max_time is not None and run.max_time <= 0:
            raise ZotuneError(f"max_time must be > 0 seconds, got {run.max_time}")
        if method.schedule != "constant" and method.warmup_steps >= run.steps:
            raise ZotuneError(f"warmup_steps ({method.warmup_steps}) must be < steps ({run.steps})")


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
