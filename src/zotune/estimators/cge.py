r"""CGE: DeepZero's coordinate-wise gradient estimate, dense or over a sparse active set.

Chen et al., *DeepZero* (ICLR 2024), eq. (2) and section 4: with one shared step :math:`\mu`,

.. math::
    \hat g = \sum_{i \in \mathcal S} \frac{\ell(\theta + \mu e_i) - \ell(\theta)}{\mu}\, e_i

over every coordinate (:math:`\mathcal S` = all, dense CGE, d + 1 queries) or an active set
(sparse CGE, :math:`|\mathcal S| + 1` queries; the rest of the gradient is zero, which is exactly
"pruning the gradient" since the differences are decoupled). Deterministic given the batch; error
:math:`O(\mu)` per coordinate. The loss differences are taken in fp64 (a mean cross-entropy near
2.3 in fp32 would lose the difference, research note B.10), and each is divided by the step the
parameter really took, :math:`\mathrm{fl}(\theta_i + \mu) - \theta_i` (equal to :math:`\mu` in exact
arithmetic; in fp32 it removes the rounding of the move from the estimate).

The active set (DeepZero's protocol, research note B.4): per maskable tensor a random subset of
exactly ``round((1 - p) n)`` of its ``n`` coordinates at that tensor's sparsity ``p``, redrawn by
:meth:`CGE.redraw`; tensors that are not maskable (BatchNorm parameters, the head's bias, and, with
no model, every tensor of fewer than 2 dimensions) are always estimated in full.
The result is a :class:`~zotune.plan.SparseGrad` with an entry (possibly empty) for every tensor
estimated, so coupled weight decay and momentum still move dormant weights, as the paper's dense
``.grad`` that is zero off the mask does.
"""
from __future__ import annotations

import math

import torch

from .. import rng
from ..plan import SparseGrad

MASK_TAG = 0x434745  # keys the mask draws apart from everything else


def always_estimated(model: torch.nn.Module) -> set[str]:
    """Names of ``model``'s parameters that sparse CGE estimates in full (DeepZero's code): all
    but the weights and biases of convolutions and linear layers, plus the bias of the last
    linear layer (the head)."""
    from ..layout import canonical_name

    maskable, head = set(), None
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
            for p_name, _ in mod.named_parameters(recurse=False):
                maskable.add(f"{mod_name}.{p_name}" if mod_name else p_name)
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                head = f"{mod_name}.bias" if mod_name else "bias"
    maskable.discard(head)
    return {canonical_name(n) for n, _ in model.named_parameters() if n not in maskable}


class CGE:
    """Coordinate-wise forward differences; see the module docstring.

    Args:
        eps: the shared step :math:`\\mu` (> 0; DeepZero: 5e-3).
        sparsity: fraction of each maskable tensor's coordinates left out, in [0, 1): one float
            for all, or ``{tensor name: sparsity}`` in [0, 1] (DeepZero's layer-wise ratios,
            ``sparsity/grasp.py``; unnamed maskable tensors get 0).
        always: names of tensors always estimated in full (set by the builder from the model:
            BatchNorm parameters and the head's bias).
    """

    feedback = "losses"
    num_probes = 0  # no random directions

    def __init__(self, eps: float = 5e-3, sparsity: float | dict = 0.0, always=None) -> None:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if isinstance(sparsity, dict):  # layer-wise ratios: a layer may be left out entirely
            for name, p in sparsity.items():
                if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
                    raise ValueError(f"layer-wise sparsity must be in [0, 1], got {p!r} for {name}")
        elif not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        self.eps, self.sparsity = float(eps), sparsity
        self.always = None if always is None else set(always)
        self.mask_seed: int | None = None
        self._active: dict[int, torch.Tensor] | None = None

    # ------------------------------------------------------------ the active set
    def tensor_sparsity(self, spec) -> float:
        """The sparsity of layout tensor ``spec`` (0 for tensors always estimated)."""
        if self.always is not None:
            if spec.name in self.always:
                return 0.0
        elif len(spec.shape) < 2:
            return 0.0
        if isinstance(self.sparsity, dict):
            return float(self.sparsity.get(spec.name, 0.0))
        return float(self.sparsity)

    def redraw(self, layout, seed: int) -> None:
        """Draw a new active set from ``seed`` (the same seed gives the same masks)."""
        self.mask_seed, self._active = int(seed), None
        self.active(layout)

    def active(self, layout) -> dict[int, torch.Tensor]:
        """``{layout index: sorted flat coordinates estimated}`` for every ``zo`` tensor."""
        if self._active is None:
            seed = 0 if self.mask_seed is None else self.mask_seed
            active = {}
            for spec in layout:
                if spec.role != "zo":
                    continue
                n, p = math.prod(spec.shape), self.tensor_sparsity(spec)
                if p == 0.0:
                    active[spec.index] = torch.arange(n)
                    continue
                keep = int(round((1.0 - p) * n))
                # keyed by the tensor's name, not its position (research note B.10)
                gen = torch.Generator().manual_seed(rng.mix(seed, MASK_TAG, spec.tensor_id) & (2**63 - 1))
                active[spec.index] = torch.randperm(n, generator=gen)[:keep].sort().values
            self._active = active
        return self._active

    def coordinates(self, layout) -> list[tuple[int, int]]:
        """The coordinates queried, in order: ``(layout index, flat position)``."""
        return [(t, int(i)) for t, idx in self.active(layout).items() for i in idx.tolist()]

    def forward_passes(self, layout) -> int:
        return len(self.coordinates(layout)) + 1

    # ------------------------------------------------------------ the estimate
    def combine(self, layout, base: float, losses, steps, dtype=torch.float32) -> SparseGrad:
        r"""``SparseGrad`` of :math:`(\ell_k - \ell_0) / h_k` at the coordinates, in fp64 until
        the values are cast to each tensor's ``dtype`` (a dict by index, or one dtype)."""
        entries, pos = {}, 0
        for t, idx in self.active(layout).items():
            n = len(idx)
            diffs = torch.tensor([losses[pos + k] - base for k in range(n)], dtype=torch.float64)
            h = torch.tensor(steps[pos:pos + n], dtype=torch.float64)
            d = dtype.get(t, torch.float32) if isinstance(dtype, dict) else dtype
            entries[t] = (idx.clone(), (diffs / h).to(d))
            pos += n
        return SparseGrad(entries)

    def state_dict(self) -> dict:
        sp = dict(self.sparsity) if isinstance(self.sparsity, dict) else self.sparsity
        return {"estimator": "cge", "eps": self.eps, "sparsity": sp, "mask_seed": self.mask_seed}

    def load_state_dict(self, state: dict) -> None:
        for k in ("estimator", "eps", "sparsity"):
            if k in state and state[k] != self.state_dict()[k]:
                raise ValueError(f"state dict was made with another estimator: {k}={state[k]!r} "
                                 f"(here {self.state_dict()[k]!r})")
        if state.get("mask_seed") != self.mask_seed:
            self.mask_seed, self._active = state.get("mask_seed"), None
