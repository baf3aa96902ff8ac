r"""ElasticZO's step: ZO for the head, backprop for the tail, from the same forward passes.

Sugiura and Matsutani, *ElasticZO* (arXiv 2501.04287): the network is split into a head
:math:`\theta_H` (layout role ``zo``: perturbed, updated from the SPSA estimate) and a tail
:math:`\theta_T` (role ``backprop``: never perturbed, updated from its true gradient). One step,
with the estimator's probe points :math:`\theta_H + a_i z` (SPSA: :math:`\pm\epsilon z`):

.. math::
    \ell_i = L(\theta_H + a_i z, \theta_T), \qquad
    \hat g_H = \mathrm{combine}(\ell_1, \dots) \quad\text{(SPSA: } \tfrac{\ell_+ - \ell_-}{2\epsilon} z\text{)}

    G_T = \begin{cases}
        \frac12 (\nabla_T \ell_+ + \nabla_T \ell_-) & \texttt{avg} \text{ (default; } = \nabla_T L(\theta) + O(\epsilon^2)\text{)} \\
        \nabla_T \ell_+ & \texttt{plus}\ (O(\epsilon)) \\
        \nabla_T L(\theta_H, \theta_T) & \texttt{clean}\ (\text{exact; one more forward})
    \end{cases}

then :math:`\theta_H` takes the head rule's update of :math:`\hat g_H` (lr ``lr``) and
:math:`\theta_T` the tail rule's update of :math:`G_T` (lr ``lr_bp``, coupled weight decay as
``torch.optim.SGD``). Both losses use the pre-update :math:`\theta_T`.

The query is ``losses+grad`` with ``wrt`` = the tail tensors: only they have ``requires_grad``
during a gradient point, so autograd records nothing for the head (no graph, no stored head
activation: memory of inference plus the tail's activations, gradient and rule state). Cost per
step: the estimator's forwards (+1 for ``clean``) and one tail-only backward per gradient point
(2 for ``avg``, 1 otherwise); the tail update is held and applied in place by the head update's
first move (one pass over the tail, no random numbers), so the head sees exactly the estimator's
own sweeps, deferred or not (tested bitwise). With an empty tail the step is the estimator's step
exactly; with an empty head, the tail rule's plain first-order step. If the estimator declines a
step (FZOO without spread) the tail update is still applied; a non-finite loss skips both.
"""
from __future__ import annotations

import torch

from ..engines.base import Update
from ..feedback import Losses, Query, as_kind
from ..plan import DenseGrad, ProbePlan
from .estimate import EstimateStep

TAIL_GRADS = ("avg", "plus", "clean")


class ElasticStep(EstimateStep):
    """See the module docstring. Args: ``tail_rule`` (an update rule for the tail, e.g.
    ``updates.SGD()``), ``lr_bp`` (its learning rate; scheduled like the head's), ``weight_decay``
    (the tail's, coupled), ``tail_grad`` (``avg``, ``plus`` or ``clean``). State: the phase and
    the tail rule's buffers."""

    name = "elastic"

    def __init__(self, tail_rule, lr_bp: float, weight_decay: float = 0.0, tail_grad: str = "avg") -> None:
        super().__init__()
        if tail_grad not in TAIL_GRADS:
            raise ValueError(f"unknown tail_grad {tail_grad!r}; valid: {', '.join(TAIL_GRADS)}")
        if not lr_bp >= 0:
            raise ValueError(f"lr_bp must be >= 0, got {lr_bp!r}")
        self.tail_rule, self.lr_bp, self.weight_decay, self.tail_grad = tail_rule, float(lr_bp), float(weight_decay), tail_grad
        self.tail_buffers: dict[int, dict[str, torch.Tensor]] = {}
        self.last_tail_grad: DenseGrad | None = None

    @staticmethod
    def tail(core) -> tuple[int, ...]:
        return tuple(t.index for t in core.engine.layout.with_role("backprop"))

    def full_plan(self, core) -> ProbePlan:
        """The estimator's points, then (``clean``) the unperturbed point."""
        plan = self.plan(core)
        if self.tail_grad == "clean" and self.tail(core):
            return ProbePlan(plan.keys, plan.points + ((),))
        return plan

    def ask(self, core) -> Query | None:
        if self.phase != "probe":
            return None
        tail = self.tail(core)
        if not tail:  # nothing to differentiate: the estimator's own query
            return super().ask(core)
        plan, n = self.full_plan(core), self.plan(core).num_points
        grad_at = {"avg": tuple(range(n)), "plus": (0,), "clean": (n,)}[self.tail_grad]
        return Query(plan, kind="losses+grad", wrt=tail, grad_at=grad_at)

    def tell(self, core, feedback) -> None:
        tail = self.tail(core)
        if not tail:
            super().tell(core, feedback)
            return
        n = self.plan(core).num_points
        feedback = as_kind(feedback, "losses+grad", self.full_plan(core).num_points)
        grads = [g for g in feedback.grads if g is not None]
        losses = Losses(feedback.values[:n])
        finite = feedback.finite and all(g.tensors for g in grads)
        if finite:
            # Held first, so that the head's update (applied or held by the estimate step) finds
            # it pending and applies it in place, touching only the tail: the head's sweeps are
            # then exactly the estimator's own, deferred or not (bitwise MeZO's for an empty tail).
            core.engine.apply(self.tail_update(core, grads, tail), defer=True)
        super().tell(core, losses)

    def tail_update(self, core, grads: list[DenseGrad], tail: tuple[int, ...]) -> Update:
        """The tail rule's update of the mean of the gradient points' tail gradients."""
        if len(grads) == 1:
            mean = dict(grads[0].tensors)
        else:
            mean = {i: sum(g.tensors[i] for g in grads if i in g.tensors) / len(grads) for i in tail}
        self.last_tail_grad = DenseGrad(mean)
        layout = core.engine.layout
        for i in tail:
            if i not in self.tail_buffers:
                spec = layout[i]
                dtype = torch.float32 if spec.dtype in (torch.float16, torch.bfloat16) else spec.dtype
                self.tail_buffers[i] = {name: torch.zeros(spec.shape, dtype=dtype, device=core.engine.device)
                                        for name in self.tail_rule.state_names}
        groups = len(core.group_lrs())
        lr = self.lr_bp * core.lr_factor(self.step)
        return Update(self.last_tail_grad, self.tail_rule, [lr] * groups, [self.weight_decay] * groups,
                      step=core.updates + 1, state=lambda i: self.tail_buffers[i], coupled_decay=True)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "tail_grad": self.tail_grad,
                "tail_buffers": {int(i): {k: v.clone() for k, v in b.items()} for i, b in self.tail_buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("tail_grad", self.tail_grad) != self.tail_grad:
            raise ValueError(f"state dict has tail_grad={state['tail_grad']!r}, this optimizer "
                             f"{self.tail_grad!r}")
        for i, saved in state.get("tail_buffers", {}).items():
            mine = self.tail_buffers.setdefault(int(i), {})
            for k, v in saved.items():
                if k in mine and mine[k].shape == v.shape:
                    mine[k].copy_(v)
                else:
                    mine[k] = v.clone()
