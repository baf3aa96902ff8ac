"""The integer cross-entropy value and its integer gradient (research note 3.5.3 and 3.5.5).

ZO needs the loss *value* of each perturbed pass (NITI only needed the gradient). With int8 logits
``a_j`` of exponent ``e`` and label ``y``, everything is computed in base 2 on integers:

    v_j  = a_j * K * 2**(e + F - 15)           base-2 logits in Q(F); K = round(log2(e) * 2**15)
    d_j  = v_j - max_j v_j <= 0
    p_j  = 2**(d_j / 2**F)  in Q(P)             exp2 of the fraction from a 2**F-entry table (or
                                                Mitchell's 1 - t/2), the integer part a right shift
    S    = sum_j p_j                            in [2**P, C * 2**P]
    l_q  = log2(S / 2**P) + (max_j v_j - v_y)   in Q(F): log2 from the leading-bit position plus a
                                                (2**F + 1)-entry table of log2(1 + r) (or Mitchell's r)

``l_q * 2**-F * ln 2`` is the cross entropy in nats; the constants ``ln 2`` and ``2**-F`` are folded
into the learning-rate multipliers of the trainer. With the tables the per-sample error is below
about 2.5 units of 2**-F bits (rounding of v, of the tables and of the table index); Mitchell's
approximations are cheaper but err by up to about 0.09 bits.

The tail's output error ``softmax - onehot`` reuses ``p_j`` and ``S``: ``p_j * 2**G // S`` minus
``2**G`` at the label, then narrowed to int8 with exponent -7 (``loss_and_error``).
"""
from __future__ import annotations

import math

import torch

from .fixed import pseudo_stochastic_shift, round_shift, saturate8

LOG2E_Q15 = 47274
"""log2(e) = 1.442695... in Q15."""
PROB_BITS = 16
"""Fraction bits of the internal probabilities p_j (finer than F, so summing C of them loses little)."""
ERROR_BITS = 11
"""Fraction bits of softmax - onehot before it is narrowed to int8 (NITI's scale)."""
APPROXIMATIONS = ("lut", "mitchell")


class IntCrossEntropy:
    """Per-sample integer cross entropy in Q(F) base-2 units, and the int8 output error.

    ``frac_bits`` = F (note default 8); ``approx`` = ``"lut"`` (default) or ``"mitchell"``.
    Tables are built once from Python floats at construction; the per-step work is integer only:
    O(B * C) shifts, adds, two gathers and one integer division per element for the error.
    """

    def __init__(self, frac_bits: int = 8, approx: str = "lut", device: torch.device | str = "cpu"):
        if approx not in APPROXIMATIONS:
            raise ValueError(f"integer cross-entropy approx must be one of {APPROXIMATIONS}, got {approx!r}")
        if not 2 <= frac_bits <= 14:
            raise ValueError(f"frac_bits must be in [2, 14], got {frac_bits}")
        self.frac_bits = frac_bits
        self.approx = approx
        n = 1 << frac_bits
        if approx == "lut":
            exp_table = [round(2.0 ** (PROB_BITS - f / n)) for f in range(n)]
            log_table = [round(n * math.log2(1.0 + i / n)) for i in range(n + 1)]
        else:
            exp_table = [(1 << PROB_BITS) - (f << (PROB_BITS - frac_bits - 1)) for f in range(n)]
            log_table = list(range(n + 1))
        self.exp_table = torch.tensor(exp_table, dtype=torch.int64, device=device)
        self._pow2 = torch.tensor([1 << i for i in range(62)], dtype=torch.int64, device=device)
        self._leads: dict = {}
        self.log_table = torch.tensor(log_table, dtype=torch.int64, device=device)

    def _base2_logits(self, logits: torch.Tensor, e: int) -> torch.Tensor:
        v = logits.to(torch.int64) * LOG2E_Q15
        return round_shift(v, 15 - e - self.frac_bits)

    def _exp2(self, logits: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(v, max_j v_j, p)``: base-2 logits, their row maxima, and ``2**(v - max)`` in Q(P)."""
        v = self._base2_logits(logits, e)
        vmax = v.amax(dim=1, keepdim=True)
        t = vmax - v
        whole = (t >> self.frac_bits).clamp_(max=PROB_BITS + 1)
        frac = t & ((1 << self.frac_bits) - 1)
        return v, vmax, self.exp_table[frac] >> whole

    def _log2(self, s: torch.Tensor, classes: int) -> torch.Tensor:
        """``log2(s / 2**P)`` in Q(F) for ``s`` in [2**P, classes * 2**P].

        The leading-bit position ``top = floor(log2 s)`` comes from a table of bit lengths of
        ``s >> P`` (in [1, classes]); the fraction from ``log_table`` at the rounded top F bits
        below the leading one."""
        f = self.frac_bits
        lead = self._lead_table(classes, s.device)[s >> PROB_BITS]
        top = lead + PROB_BITS
        rest = s - self._pow2[top]
        index = ((rest << f) + self._pow2[top - 1]) >> top
        return (lead << f) + self.log_table[index]

    def _lead_table(self, classes: int, device) -> torch.Tensor:
        table = self._leads.get((classes, device))
        if table is None:
            table = torch.tensor([max(v.bit_length() - 1, 0) for v in range(classes + 1)], dtype=torch.int64,
                                 device=device)
            self._leads[(classes, device)] = table
        return table

    def __call__(self, logits: torch.Tensor, e: int, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample loss ``l_q`` (int64 ``[B]``, >= 0) of int8 ``logits [B, C]`` with exponent ``e``."""
        return self.loss_and_error(logits, e, labels, error=False)[0]

    def loss_and_error(self, logits: torch.Tensor, e: int, labels: torch.Tensor, error: bool = True,
                       rounding: str = "nearest"):
        """``(l_q [B], (err int8 [B, C], e_err) or None)``.

        ``err ~= (softmax - onehot) * 2**-e_err`` is the gradient of the per-sample natural CE with
        respect to the real logits: ``p_j * 2**G // S - 2**G [j == y]`` narrowed to int8 by a
        shift of ``G - 7`` bits (``rounding``: nearest, or NITI's pseudo-stochastic), so ``e_err = -7``.
        """
        v, vmax, p = self._exp2(logits, e)
        s = p.sum(dim=1)
        rows = torch.arange(logits.shape[0], device=logits.device)
        lab = labels.to(torch.int64)
        loss = self._log2(s, logits.shape[1]) + (vmax.squeeze(1) - v[rows, lab])
        if not error:
            return loss, None
        prob = torch.div(p << ERROR_BITS, s.unsqueeze(1), rounding_mode="floor")
        prob[rows, lab] -= 1 << ERROR_BITS
        shift = ERROR_BITS - 7
        narrowed = round_shift(prob, shift) if rounding == "nearest" else pseudo_stochastic_shift(prob, shift)
        return loss, (saturate8(narrowed), shift - ERROR_BITS)
