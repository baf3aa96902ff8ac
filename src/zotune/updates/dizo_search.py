r"""DiZO's two searches for the per-layer norms gamma, as ask/tell objects.

Both start from the displacements :math:`\Delta^l = \theta^l - \theta_0^l` of the projected
tensors (a transient fp32 copy, saved with the search if a checkpoint falls inside it) and end by
writing :math:`\theta^l = \theta_0^l + (\gamma^l / \|\Delta^l\|) \Delta^l`. See
``updates/projection.py`` for the maths and the paper.

* ``ZOSearch``: per iteration j, two queries for the loss at
  :math:`\gamma \pm \epsilon_\gamma u_j` (u drawn from ``rng.mix(key, j)``), then an SPSA step
  on gamma clipped into the trust region.
* ``FOSearch``: per iteration, one ``grad`` query for the gradient of the loss with respect to the
  projected tensors, contracted with Delta into dL/dgamma, then an Adam step on
  loss + l1 |gamma|. An empty ``DenseGrad`` answers a non-finite loss: the iteration is skipped.
"""
from __future__ import annotations

import copy
import math

import torch

from .. import rng
from ..feedback import CURRENT, Query, as_kind


class _Search:
    kind = ""

    def __init__(self, dizo, engine, key: int, *, fresh: bool = True) -> None:
        self.dizo, self.engine, self.key = dizo, engine, int(key)
        self.j, self.done = 0, False
        if fresh:
            with torch.no_grad():
                self.delta, self.n = dizo.displacements(engine)

    @property
    def moving(self) -> torch.Tensor:  # a layer with Delta = 0 keeps ratio 1 (nothing to scale)
        return self.n > 0

    def ratio(self, gamma: torch.Tensor) -> torch.Tensor:
        safe = torch.where(self.moving, self.n, torch.ones_like(self.n)).to(gamma.dtype)
        return torch.where(self.moving, gamma.detach() / safe, torch.ones_like(safe))

    def write(self, ratios) -> None:
        with torch.no_grad():
            self.dizo.rescale(self.engine, ratios, self.delta)

    def abort(self) -> None:
        """Back to where the search started (an exception interrupted it)."""
        self.write([1.0] * len(self.n))

    def finish(self, gamma: torch.Tensor) -> None:
        ratios = self.ratio(gamma)
        self.write(ratios)
        self.dizo.last_ratios = ratios.tolist()
        self.dizo.searches += 1
        self.done = True

    def state_dict(self) -> dict:
        return {"kind": self.kind, "key": self.key, "j": self.j, "done": self.done,
                "delta": [d.clone() for d in self.delta], "n": self.n.clone()}

    @classmethod
    def from_state(cls, dizo, engine, state: dict):
        search = cls(dizo, engine, state["key"], fresh=False)
        search.j, search.done = state["j"], state["done"]
        search.delta, search.n = [d.clone() for d in state["delta"]], state["n"].clone()
        search.load_extra(state)
        return search


class ZOSearch(_Search):
    """The ZO search (DiZO's default): 2 loss queries per iteration."""

    kind = "zo"

    def __init__(self, dizo, engine, key: int, *, fresh: bool = True) -> None:
        super().__init__(dizo, engine, key, fresh=fresh)
        self.sub, self.plus = 0, math.nan
        if fresh:
            self.gamma = self.n.clone()

    def _u(self) -> torch.Tensor:
        u = torch.randn(len(self.n), generator=rng.generator(rng.mix(self.key, self.j)), dtype=torch.float64)
        bound = self.dizo.clip * self.n / self.dizo.eps
        return torch.maximum(torch.minimum(u, bound), -bound)

    def ask(self) -> Query | None:
        if self.done:
            return None
        if self.j == self.dizo.iterations:
            self.finish(self.gamma)
            return None
        sign = 1.0 if self.sub == 0 else -1.0
        self.write(self.ratio(self.gamma + sign * self.dizo.eps * self._u()))
        return Query(CURRENT, batch=("search", self.j))

    def tell(self, feedback) -> None:
        loss = as_kind(feedback, "losses", 1).values[0]
        if self.sub == 0:
            self.plus, self.sub = loss, 1
            return
        self.dizo.forward_passes += 2
        if math.isfinite(self.plus) and math.isfinite(loss):
            d = self.dizo
            h = (self.plus - loss) / (2 * d.eps)
            lo, hi = (1 - d.clip) * self.n, (1 + d.clip) * self.n
            self.gamma = torch.maximum(torch.minimum(self.gamma - d.step_size * self.n * h * self._u(), hi), lo)
        self.j, self.sub, self.plus = self.j + 1, 0, math.nan

    def state_dict(self) -> dict:
        return {**super().state_dict(), "sub": self.sub, "plus": self.plus, "gamma": self.gamma.clone()}

    def load_extra(self, state: dict) -> None:
        self.sub, self.plus, self.gamma = state["sub"], state["plus"], state["gamma"].clone()


class FOSearch(_Search):
    """The first-order search (``search="fo"``): 1 gradient query per iteration."""

    kind = "fo"

    def __init__(self, dizo, engine, key: int, *, fresh: bool = True) -> None:
        super().__init__(dizo, engine, key, fresh=fresh)
        if fresh:
            if dizo.fo_init == "norm" or dizo.gamma is None:
                dizo.gamma = self.n.float() if dizo.fo_init == "norm" else torch.zeros(len(self.n))
                dizo.adam_state = None
            self._start(dizo.gamma, dizo.adam_state)

    def _start(self, gamma: torch.Tensor, adam_state) -> None:
        self.gamma = gamma.detach().clone().requires_grad_(True)
        self.adam = torch.optim.Adam([self.gamma], lr=self.dizo.fo_lr)
        if adam_state is not None:
            self.adam.load_state_dict(copy.deepcopy(adam_state))

    @property
    def wrt(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.dizo._index)))

    def ask(self) -> Query | None:
        if self.done:
            return None
        if self.j == self.dizo.iterations:
            self.finish(self.gamma)
            self.dizo.gamma = self.gamma.detach().clone()
            self.dizo.adam_state = copy.deepcopy(self.adam.state_dict())
            return None
        self.write(self.ratio(self.gamma).tolist())
        return Query(CURRENT, kind="grad", batch=("search", self.j), wrt=self.wrt)

    def tell(self, feedback) -> None:
        grads = as_kind(feedback, "grad", 1).tensors or {}
        self.dizo.forward_passes += 1
        self.j += 1
        if not grads:  # the loss was not finite
            return
        self.dizo.backward_passes += 1
        safe = torch.where(self.moving, self.n, torch.ones_like(self.n)).float()
        with torch.no_grad():
            dgamma = torch.zeros_like(self.gamma)
            for i, target in enumerate(self.dizo.targets):
                ti = self.dizo._index[i]
                g = grads.get(ti)
                if g is not None:
                    gi = target.view(g.reshape(-1), torch.Size(self.engine.layout[ti].shape))
                    dgamma[i] = float((gi.to(self.delta[i].dtype) * self.delta[i]).sum()) / float(safe[i])
            self.gamma.grad = dgamma + self.dizo.fo_l1 * self.gamma.detach().sign()
        self.adam.step()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "gamma": self.gamma.detach().clone(),
                "adam": copy.deepcopy(self.adam.state_dict())}

    def load_extra(self, state: dict) -> None:
        self._start(state["gamma"], state["adam"])
