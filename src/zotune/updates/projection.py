r"""DiZO: divergence-driven layer-wise projection of ZO updates.

DiZO (Tan et al., "Harmony in Divergence: Towards Fast, Accurate, and Memory-efficient
Zeroth-order LLM Fine-tuning", arXiv 2502.03304, NeurIPS 2025) observes that first-order
fine-tuning moves each layer by a different distance from the pre-trained weights, while MeZO's
isotropic noise moves them all alike and lets the distances grow without bound. Every
``interval`` steps it rescales the distance of each projected layer l from its anchor
:math:`\theta_0^l` (research/kerzoo_dizo.md, section 3):

.. math::
    \theta^l \leftarrow \theta_0^l + \frac{\gamma^l}{\|\Delta^l\|}\Delta^l, \qquad
    \Delta^l = \theta^l - \theta_0^l, \qquad
    \frac{\gamma^l}{\|\Delta^l\|} \in [1 - \tau, 1 + \tau],

with the norms :math:`\gamma` searched to minimise the training loss. ZO search (``search="zo"``,
the default): :math:`\gamma = \|\Delta\|` to start, then ``iterations`` SPSA steps on the vector
:math:`\gamma` with per-layer perturbations :math:`\epsilon_\gamma u^l`,
:math:`u^l \sim N(0, 1)` clipped to :math:`\pm\tau\|\Delta^l\|/\epsilon_\gamma`,
:math:`h = (L^+ - L^-)/(2\epsilon_\gamma)` and
:math:`\gamma^l \leftarrow \mathrm{clip}(\gamma^l - \eta_\gamma \|\Delta^l\| h u^l)` into the range.
First-order search (``search="fo"``): Adam on :math:`\gamma` with an L1 penalty and no range,
through :math:`\partial L / \partial \gamma^l = \langle \nabla_{\theta^l} L, \Delta^l \rangle /
\|\Delta^l\|` (one backward pass to the projected tensors only; no model copy, so none of the
memory growth the authors warn about).

Cost: 2 x ``iterations`` forward passes per ZO search (+2J/interval = +0.4 per step at the
defaults, +20% over MeZO); ``iterations`` forward+backward passes per FO search. Memory: fp32
anchors of the projected tensors only (attention k and v: about 1/6 of a transformer block's
weights), plus, during a search, a transient fp32 copy of their displacement (and for FO the
activations and the gradient of the projected tensors).
"""
from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch


SEARCHES = ("zo", "fo")
FO_INITS = ("norm", "zero")


@dataclass(frozen=True)
class Target:
    """One projected layer: a whole tensor (``dim=None``), or the slice ``start:stop`` of it along
    ``dim`` (GPT-2 keeps q, k and v side by side in the columns of one ``c_attn`` weight)."""

    name: str
    dim: int | None = None
    start: int = 0
    stop: int | None = None

    def __post_init__(self) -> None:
        if self.dim is not None and not (self.stop is not None and 0 <= self.start < self.stop):
            raise ValueError(f"DiZO target {self.name!r}: a slice needs 0 <= start < stop, "
                             f"got start={self.start!r}, stop={self.stop!r}")

    def view(self, flat: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """This target's elements inside a flat view of its tensor (a view: writes go through)."""
        full = flat.view(shape)
        if self.dim is None:
            return full
        return full.narrow(self.dim, self.start, self.stop - self.start)


def default_targets(names: Sequence[str], shapes: Mapping[str, torch.Size], table=None) -> list[Target]:
    """DiZO's projected layers, made explicit for every architecture: all LoRA tensors (names with
    ``lora_A``/``lora_B``) if there are any; otherwise the attention key and value weights of every
    block, from the model's block ``table`` when given (``zotune.models.block_table``), else by
    name (``k_proj``/``v_proj`` in Llama, Qwen2, Mistral and OPT; the k and v column blocks of
    GPT-2's fused ``c_attn``, a Conv1D weight of shape (d, 3d) = [q | k | v]).

    Raises ValueError when nothing matches, rather than silently projecting nothing (which turns
    DiZO into MeZO at 20% extra cost, as the authors' OPT-only detection does)."""
    lora = [Target(n) for n in names if "lora_A" in n or "lora_B" in n]
    if lora:
        return lora
    if table is not None:  # the model's block table knows where its keys and values are
        targets = [Target(*t) for t in table.kv_targets(names, shapes)]
        if targets:
            return targets
    targets = []
    for n in names:
        if n.endswith(("k_proj.weight", "v_proj.weight")):
            targets.append(Target(n))
        elif n.endswith("attn.c_attn.weight"):
            shape = shapes[n]
            if len(shape) != 2 or shape[1] % 3:
                raise ValueError(f"{n!r} has shape {tuple(shape)}; a fused GPT-2 c_attn weight is "
                                 "(d, 3d). Pass a DiZO pattern instead")
            d = shape[1] // 3
            targets += [Target(n, 1, d, 2 * d), Target(n, 1, 2 * d, 3 * d)]
    if not targets:
        raise ValueError("DiZO found no attention key/value weights or LoRA tensors among the trainable "
                         "parameters; pass a pattern of tensors to project (projection={'pattern': ...} "
                         "or --dizo-pattern)")
    return targets


def targets_from_pattern(names: Sequence[str], pattern: str) -> list[Target]:
    """The whole tensors whose names match the regular expression ``pattern`` (``re.search``)."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"bad DiZO pattern {pattern!r}: {err}") from None
    targets = [Target(n) for n in names if regex.search(n)]
    if not targets:
        raise ValueError(f"DiZO pattern {pattern!r} matches no trainable tensor; trainable: "
                         + ", ".join(list(names)[:6]) + (", ..." if len(names) > 6 else ""))
    return targets


class DiZO:
    """DiZO's layer-wise projection, run by the optimizer after every ``interval``-th update.

    Protocol: :meth:`bind` once (anchors theta_0), then after the update of 0-based step ``t``, if
    :meth:`due` (t), run the search with the parameters unperturbed (flush a deferred update
    first): as an ask/tell object (:meth:`start_search`; the optimizer's ``ProjectionStep`` does
    this) or with a callable, :meth:`project` (ZO) / :meth:`project_fo` (FO). Parameters are read
    and written through ``engine.base`` + ``engine.sync``, so fp32 master copies are what is
    projected; names and shapes come from ``engine.layout``.

    Args:
        interval: steps between projections, kappa (50).
        iterations: search iterations per projection, J (10).
        eps: perturbation of the norms, epsilon_gamma (0.1).
        step_size: ZO search step, relative to each layer's norm, eta_gamma (2.0).
        clip: the ZO search keeps gamma / ||Delta|| in [1 - clip, 1 + clip] (0.2); 0 disables it.
        search: ``zo`` (default) or ``fo`` (backprop to gamma only).
        fo_lr, fo_l1: the FO search's Adam learning rate (0.1) and L1 weight on gamma (1e-3).
        fo_init: ``norm`` (default: gamma starts every FO search at ||Delta||, ratio 1, fresh Adam)
            or ``zero`` (the authors' code: gamma starts at 0 once and persists, with its Adam
            state, across searches; the first search therefore starts from theta = theta_0).
        pattern: regex of the tensors to project (default: :func:`default_targets`).

    Attributes:
        targets, anchors: the projected layers and their fp32 theta_0 (fp64 for fp64 tensors).
        last_ratios: gamma / ||Delta|| chosen by the last search, per target (for logging).
        forward_passes, backward_passes, searches: counters (2J forwards per ZO search; J forwards
            and J backwards per FO search).
    """

    def __init__(self, interval: int = 50, iterations: int = 10, eps: float = 0.1, step_size: float = 2.0,
                 clip: float = 0.2, search: str = "zo", fo_lr: float = 0.1, fo_l1: float = 1e-3,
                 fo_init: str = "norm", pattern: str | None = None) -> None:
        for name, value in (("interval", interval), ("iterations", iterations)):
            if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
                raise ValueError(f"DiZO {name} must be an integer >= 1, got {value!r}")
        for name, value in (("eps", eps), ("step_size", step_size), ("fo_lr", fo_lr)):
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"DiZO {name} must be a finite number > 0, got {value!r}")
        if not (isinstance(clip, (int, float)) and 0 <= clip < 1):
            raise ValueError(f"DiZO clip must be in [0, 1), got {clip!r}")
        if not (isinstance(fo_l1, (int, float)) and 0 <= fo_l1 < math.inf):
            raise ValueError(f"DiZO fo_l1 must be a finite number >= 0, got {fo_l1!r}")
        if search not in SEARCHES:
            raise ValueError(f"unknown DiZO search {search!r}; valid: {', '.join(SEARCHES)}")
        if fo_init not in FO_INITS:
            raise ValueError(f"unknown DiZO fo_init {fo_init!r}; valid: {', '.join(FO_INITS)}")
        if pattern is not None and not isinstance(pattern, str):
            raise ValueError(f"DiZO pattern must be a regex string or None, got {pattern!r}")
        self.interval, self.iterations, self.eps, self.step_size = interval, iterations, eps, step_size
        self.clip, self.search, self.fo_lr, self.fo_l1, self.fo_init = clip, search, fo_lr, fo_l1, fo_init
        self.pattern = pattern
        self.targets: list[Target] = []
        self.anchors: list[torch.Tensor] = []
        self.gamma: torch.Tensor | None = None  # FO search's persistent norms (fo_init="zero")
        self.adam_state: dict | None = None
        self.last_ratios: list[float] = []
        self.forward_passes = self.backward_passes = self.searches = 0
        self._index: list[int] = []
        self.engine = None

    # ----------------------------------------------------------------- setup
    def bind(self, engine) -> None:
        """Choose the projected targets among the engine's tensors and anchor them: fp32 copies of
        their current unperturbed values (theta_0). Only the targets are copied, never the model."""
        layout = engine.layout
        names = [t.name for t in layout if t.role == "zo"]
        shapes = {t.name: torch.Size(t.shape) for t in layout}
        self.targets = (targets_from_pattern(names, self.pattern) if self.pattern
                        else default_targets(names, shapes, layout.blocks))
        where = {t.name: t.index for t in layout}
        self.engine = engine
        self._index = [where[t.name] for t in self.targets]
        views = [self._view(engine, i).detach() for i in range(len(self.targets))]
        self.anchors = [v.to(torch.promote_types(v.dtype, torch.float32), copy=True) for v in views]

    def due(self, step: int) -> bool:
        """Whether a projection follows the update of (0-based) ``step``: steps interval-1, 2 interval-1, ..."""
        return (step + 1) % self.interval == 0

    def memory_bytes(self) -> int:
        """Bytes held between searches (the anchors)."""
        return sum(a.numel() * a.element_size() for a in self.anchors)

    # ------------------------------------------------------------ projection
    def displacements(self, engine) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(Delta_l, ||Delta_l||)``: exact fp32 displacements from the anchors (a transient copy of
        the projected targets) and their Frobenius norms (float64)."""
        delta = [self._view(engine, i).to(a.dtype) - a for i, a in enumerate(self.anchors)]
        norms = torch.tensor([float(d.norm()) for d in delta], dtype=torch.float64)
        return delta, norms

    def rescale(self, engine, ratios: Sequence[float], delta: Sequence[torch.Tensor] | None = None) -> None:
        """Set ``theta_l = anchor_l + ratios[l] * Delta_l`` for every target (the projection for
        given gamma_l / ||Delta_l||), through ``engine.base`` and ``engine.sync``."""
        if delta is None:
            delta, _ = self.displacements(engine)
        ratios = [float(r) for r in ratios]
        if len(ratios) != len(self.targets):
            raise ValueError(f"DiZO needs one ratio per target ({len(self.targets)}), got {len(ratios)}")
        for i, (a, d) in enumerate(zip(self.anchors, delta)):
            self._view(engine, i).copy_(torch.add(a, d, alpha=ratios[i]))
        for ti in sorted(set(self._index)):
            engine.sync(ti)

    def _view(self, engine, i: int) -> torch.Tensor:
        ti = self._index[i]
        return self.targets[i].view(engine.base(ti), engine.layout[ti].shape)

    # ---------------------------------------------------------------- search
    def start_search(self, engine, key: int):
        """The ask/tell search of this projection (``updates/dizo_search.py``), started now: the
        parameters must be unperturbed. ``key`` seeds the ZO search's norm perturbations."""
        from .dizo_search import FOSearch, ZOSearch

        return (FOSearch if self.search == "fo" else ZOSearch)(self, engine, key)

    def resume_search(self, engine, state: dict):
        """A search restored from its ``state_dict`` (a checkpoint taken in the middle of it)."""
        from .dizo_search import FOSearch, ZOSearch

        return (FOSearch if state["kind"] == "fo" else ZOSearch).from_state(self, engine, state)

    @torch.no_grad()
    def project(self, engine, evaluate: Callable[[int], float], key: int) -> None:
        """The ZO search, then the projection. ``evaluate(j)`` returns the loss (float) of search
        batch j at the current parameters; ``key`` seeds the norm perturbations (iteration j draws
        from ``rng.mix(key, j)``). An iteration with a non-finite loss does not move gamma."""
        from ..feedback import Losses

        search = self.start_search(engine, key)
        try:
            while (query := search.ask()) is not None:
                search.tell(Losses((float(evaluate(query.batch[1])),)))
        except BaseException:
            search.abort()
            raise

    def project_fo(self, engine, loss_with_grad: Callable[[int], torch.Tensor], key: int) -> None:
        """The first-order search, then the projection.

        ``loss_with_grad(j)`` computes the differentiable scalar loss of search batch j with the
        model as it is (it closes over the model; no model argument is needed here, because the
        projected tensors are the engine's own Parameters). Each iteration writes
        theta_l = anchor_l + (gamma_l / ||Delta_l||) Delta_l into the live Parameters (the
        authors divide by ||Delta_l|| + 1e-8; here a layer with Delta = 0 keeps ratio 1 instead),
        takes ``torch.autograd.grad`` of the loss with respect to the projected Parameters only (no
        ``.grad`` buffers, no model copy; ``requires_grad`` is switched off on the other trainable
        tensors for the search, which also spares their activations, and restored afterwards),
        contracts it with Delta_l to dL/dgamma_l and takes an Adam step on
        loss + fo_l1 sum|gamma|. ``key`` is unused (the search is deterministic given the batches).
        """
        from ..feedback import gradient_of

        search = self.start_search(engine, key)
        try:
            while (query := search.ask()) is not None:
                search.tell(gradient_of(lambda: loss_with_grad(query.batch[1]), engine, query.wrt))
        except BaseException:
            search.abort()
            raise

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Everything an exact resume needs: targets (checked on load), anchors, the FO search's
        persistent gamma and Adam state, the last ratios and the counters (copies)."""
        return {"targets": [(t.name, t.dim, t.start, t.stop) for t in self.targets],
                "anchors": [a.clone() for a in self.anchors],
                "gamma": None if self.gamma is None else self.gamma.clone(),
                "adam_state": copy.deepcopy(self.adam_state), "last_ratios": list(self.last_ratios),
                "counters": [self.forward_passes, self.backward_passes, self.searches]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` into a bound DiZO projecting the same targets."""
        saved = [Target(*t) for t in state["targets"]]
        if saved != self.targets:
            raise ValueError("DiZO state dict projects other tensors than this optimizer "
                             f"({len(saved)} targets saved, {len(self.targets)} here)")
        for mine, theirs in zip(self.anchors, state["anchors"]):
            mine.copy_(theirs)
        gamma = state.get("gamma")
        self.gamma = None if gamma is None else gamma.detach().clone()
        self.adam_state = copy.deepcopy(state.get("adam_state"))
        self.last_ratios = list(state.get("last_ratios", []))
        self.forward_passes, self.backward_passes, self.searches = state.get("counters", (0, 0, 0))
