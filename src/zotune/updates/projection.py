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
First-order search (``search="fo"``): Adam on :math:`\gamma` with an L1 penalty, through
:math:`\partial L / \partial \gamma^l = \langle \nabla_{\theta^l} L, \Delta^l \rangle / \|\Delta^l\|`
(one backward pass to the projected tensors only; no model copy, so no memory growth).

Cost: 2 x ``iterations`` forward passes per ZO search (+0.4 per step at the defaults, +20% over
MeZO), ``iterations`` forward+backward passes per FO search. Memory: fp32 anchors of the
projected tensors only (attention k and v: about 1/6 of a transformer block's weights), plus a
transient fp32 copy of their displacement during a search.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .. import rng

SEARCHES = ("zo", "fo")
FO_INITS = ("norm", "zero")


@dataclass(frozen=True)
class Target:
    """One projected layer: a tensor, or the slice ``start:stop`` of it along ``dim`` (GPT-2 keeps
    q, k and v side by side in one ``c_attn`` weight)."""

    name: str
    dim: int | None = None
    start: int = 0
    stop: int | None = None

    def view(self, flat: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """This target's elements inside a flat view of its tensor."""
        full = flat.view(shape)
        if self.dim is None:
            return full
        return full.narrow(self.dim, self.start, self.stop - self.start)


def default_targets(names: Sequence[str], shapes: Mapping[str, torch.Size]) -> list[Target]:
    """DiZO's projected layers, made explicit for every architecture: all LoRA tensors under LoRA;
    otherwise the attention key and value weights of every block (``k_proj``/``v_proj`` in Llama,
    Qwen2, Mistral and OPT; the k and v column blocks of GPT-2's fused ``c_attn``)."""
    lora = [Target(n) for n in names if "lora_A" in n or "lora_B" in n]
    if lora:
        return lora
    targets = []
    for n in names:
        if n.endswith(("k_proj.weight", "v_proj.weight")):
            targets.append(Target(n))
        elif n.endswith("attn.c_attn.weight"):
            d = shapes[n][1] // 3  # Conv1D weight: (in, 3 * out) = [q | k | v]
            targets += [Target(n, 1, d, 2 * d), Target(n, 1, 2 * d, 3 * d)]
    if not targets:
        raise ValueError("DiZO found no attention key/value weights or LoRA tensors among the trainable "
                         "parameters; pass a pattern of tensors to project (projection={'pattern': ...} "
                         "or --dizo-pattern)")
    return targets


def targets_from_pattern(names: Sequence[str], pattern: str) -> list[Target]:
    """The tensors whose names match the regular expression ``pattern``."""
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
    """DiZO's layer-wise projection, run by ``ZOOptimizer`` after every ``interval``-th update.

    Args:
        interval: steps between projections, kappa (50).
        iterations: search iterations per projection, J (10).
        eps: perturbation of the norms, epsilon_gamma (0.1).
        step_size: ZO search step, relative to each layer's norm, eta_gamma (2.0).
        clip: the ratio gamma / ||Delta|| stays in [1 - clip, 1 + clip] (0.2).
        search: ``zo`` (default) or ``fo`` (backprop to gamma only).
        fo_lr, fo_l1: the FO search's Adam learning rate (0.1) and L1 weight (1e-3).
        fo_init: ``norm`` (gamma starts each search at ||Delta||, ratio 1) or ``zero`` (the authors'
            code: gamma starts at 0 once and persists across searches).
        pattern: regex of the tensors to project (default: ``default_targets``).
    """

    def __init__(self, interval: int = 50, iterations: int = 10, eps: float = 0.1, step_size: float = 2.0,
                 clip: float = 0.2, search: str = "zo", fo_lr: float = 0.1, fo_l1: float = 1e-3,
                 fo_init: str = "norm", pattern: str | None = None) -> None:
        for name, value in (("interval", interval), ("iterations", iterations)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"DiZO {name} must be an integer >= 1, got {value!r}")
        for name, value in (("eps", eps), ("step_size", step_size), ("fo_lr", fo_lr)):
            if not value > 0:
                raise ValueError(f"DiZO {name} must be > 0, got {value!r}")
        if not 0 <= clip < 1:
            raise ValueError(f"DiZO clip must be in [0, 1), got {clip!r}")
        if not fo_l1 >= 0:
            raise ValueError(f"DiZO fo_l1 must be >= 0, got {fo_l1!r}")
        if search not in SEARCHES:
            raise ValueError(f"unknown DiZO search {search!r}; valid: {', '.join(SEARCHES)}")
        if fo_init not in FO_INITS:
            raise ValueError(f"unknown DiZO fo_init {fo_init!r}; valid: {', '.join(FO_INITS)}")
        self.interval, self.iterations, self.eps, self.step_size = interval, iterations, eps, step_size
        self.clip, self.search, self.fo_lr, self.fo_l1, self.fo_init = clip, search, fo_lr, fo_l1, fo_init
        self.pattern = pattern
        self.targets: list[Target] = []
        self.anchors: list[torch.Tensor] = []
        self.gamma: torch.Tensor | None = None  # FO search's persistent norms (fo_init="zero")
        self.adam_state: dict | None = None
        self.last_ratios: list[float] = []
        self._index: list[int] = []

    # ----------------------------------------------------------------- setup
    def bind(self, engine) -> None:
        """Choose the projected targets among the engine's tensors and anchor them (fp32 copies
        of their current values: theta_0)."""
        names = [t.name for t in engine.tensors]
        shapes = {t.name: t.param.shape for t in engine.tensors}
        self.targets = (targets_from_pattern(names, self.pattern) if self.pattern
                        else default_targets(names, shapes))
        where = {t.name: i for i, t in enumerate(engine.tensors)}
        self._index = [where[t.name] for t in self.targets]
        # fp32 anchors (fp64 for fp64 parameters): at least as precise as the base they anchor
        views = [self._view(engine, i).detach() for i in range(len(self.targets))]
        self.anchors = [v.to(torch.promote_types(v.dtype, torch.float32)).clone() for v in views]

    def due(self, step: int) -> bool:
        """Whether a projection follows the update of (0-based) ``step``."""
        return (step + 1) % self.interval == 0

    def memory_bytes(self) -> int:
        """Bytes held between searches (the anchors)."""
        return sum(a.numel() * a.element_size() for a in self.anchors)

    def _view(self, engine, i: int) -> torch.Tensor:
        ti = self._index[i]
        return self.targets[i].view(engine.base(ti), engine.tensors[ti].param.shape)

    def _displacements(self, engine) -> tuple[list[torch.Tensor], torch.Tensor]:
        delta = [self._view(engine, i).to(a.dtype) - a for i, a in enumerate(self.anchors)]
        norms = torch.tensor([float(d.norm()) for d in delta], dtype=torch.float64)
        return delta, norms

    def _write(self, engine, delta, ratios) -> None:
        """theta_l = anchor_l + ratio_l Delta_l for every target, then sync master copies."""
        for i, (a, d) in enumerate(zip(self.anchors, delta)):
            view = self._view(engine, i)
            view.copy_(torch.add(a, d, alpha=float(ratios[i])))
        for ti in sorted(set(self._index)):
            engine.sync(ti)

    # ---------------------------------------------------------------- search
    @torch.no_grad()
    def project(self, engine, evaluate: Callable[[int], float], key: int) -> None:
        """The ZO search, then the projection. ``evaluate(j)`` is the loss of search batch j at the
        current parameters; ``key`` seeds the norm perturbations."""
        delta, n = self._displacements(engine)
        moving = n > 0
        gamma = n.clone()
        safe = torch.where(moving, n, torch.ones_like(n))
        bound = self.clip * n / self.eps
        for j in range(self.iterations):
            u = torch.randn(len(n), generator=rng.generator(rng.mix(key, j)), dtype=torch.float64)
            u = torch.maximum(torch.minimum(u, bound), -bound)
            self._write(engine, delta, torch.where(moving, (gamma + self.eps * u) / safe, 1.0))
            plus = evaluate(j)
            self._write(engine, delta, torch.where(moving, (gamma - self.eps * u) / safe, 1.0))
            minus = evaluate(j)
            if math.isfinite(plus) and math.isfinite(minus):
                h = (plus - minus) / (2 * self.eps)
                gamma = gamma - self.step_size * n * h * u
                gamma = torch.maximum(torch.minimum(gamma, (1 + self.clip) * n), (1 - self.clip) * n)
        ratios = torch.where(moving, gamma / safe, 1.0)
        self._write(engine, delta, ratios)
        self.last_ratios = ratios.tolist()

    def project_fo(self, engine, loss_with_grad: Callable[[int], torch.Tensor], key: int) -> None:
        """The first-order search, then the projection. ``loss_with_grad(j)`` computes the
        differentiable loss of search batch j with the model as it is; only the projected
        tensors' gradients are taken (``torch.autograd.grad``: no ``.grad`` buffers)."""
        with torch.no_grad():
            delta, n = self._displacements(engine)
        n32 = n.float()
        if self.fo_init == "norm" or self.gamma is None:
            self.gamma = (n32.clone() if self.fo_init == "norm" else torch.zeros_like(n32))
            self.adam_state = None
        gamma = self.gamma.clone().requires_grad_(True)
        adam = torch.optim.Adam([gamma], lr=self.fo_lr)
        if self.adam_state is not None:
            adam.load_state_dict(self.adam_state)
        params = [engine.tensors[ti].param for ti in self._index]
        unique = list({id(p): p for p in params}.values())
        for j in range(self.iterations):
            with torch.no_grad():
                self._write(engine, delta, (gamma / (n32 + 1e-8)).tolist())
            loss = loss_with_grad(j)
            if not torch.isfinite(loss):
                continue
            grads = dict(zip(map(id, unique), torch.autograd.grad(loss, unique, allow_unused=True)))
            with torch.no_grad():
                dgamma = torch.zeros_like(gamma)
                for i, (target, p) in enumerate(zip(self.targets, params)):
                    g = grads[id(p)]
                    if g is not None:
                        gi = target.view(g.reshape(-1), p.shape)
                        dgamma[i] = float((gi.to(delta[i].dtype) * delta[i]).sum()) / (n32[i] + 1e-8)
                gamma.grad = dgamma + self.fo_l1 * gamma.sign()
            adam.step()
            del loss, grads
        with torch.no_grad():
            self._write(engine, delta, (gamma / (n32 + 1e-8)).tolist())
        self.gamma, self.adam_state = gamma.detach().clone(), adam.state_dict()
        self.last_ratios = (gamma.detach() / (n32 + 1e-8)).tolist()

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {"targets": [(t.name, t.dim, t.start, t.stop) for t in self.targets],
                "anchors": [a.clone() for a in self.anchors], "gamma": self.gamma,
                "adam_state": self.adam_state, "last_ratios": list(self.last_ratios)}

    def load_state_dict(self, state: dict) -> None:
        saved = [Target(*t) for t in state["targets"]]
        if saved != self.targets:
            raise ValueError("DiZO state dict projects other tensors than this optimizer "
                             f"({len(saved)} targets saved, {len(self.targets)} here)")
        for mine, theirs in zip(self.anchors, state["anchors"]):
            mine.copy_(theirs)
        self.gamma, self.adam_state = state["gamma"], state["adam_state"]
        self.last_ratios = list(state["last_ratios"])
