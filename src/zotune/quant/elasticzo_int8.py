"""ElasticZO-INT8 (Sugiura & Matsutani, 2025): integer-only ZO head + integer backprop tail.

One step on an int8 batch ``(x, e_x)`` (research note 3.3 and 3.5; integers only, see the test
``test_quant_trainer.py::test_step_is_integer_only``):

    for sign in (+1, -1):
        h = head(x; sat8(w + sign * eps_q * z))    # z: keyed Rademacher int8 signs, formed at use,
                                                  # never written into w (weights stay bit-identical)
        out = tail(h; w_T)                        # records what the integer backward needs
        L_sign = sum_b l_q(out_b, y_b)            # integer CE in Q(F) base-2 units
        G_T += integer backward of the tail       # "avg" (both passes), "plus", or an extra "clean" pass
    dL = L_+ - L_-                                # the quantised ZO gradient: one integer per step
    head:  w <- sat8(w - SR(dL * z * m, s))       # fixed_shift: m * 2**-s = lr ln2 / (2**(F+1) eps_q 2**(2 e_w) B)
           (dynamic: dL first narrowed to mu bits, m * 2**-s = lr 2**(-mu - e_w): a sign-SGD-like step)
    tail:  w <- sat8(w - SR(G_T * m, s))          # m * 2**-s = lr_bp 2**(e_G - e_w) / (B * passes)

SR is unbiased stochastic rounding with keyed noise, so updates far below one LSB survive in
expectation. Both updates are the float rules ``w - lr * g`` expressed in LSBs, so the FP32
ElasticZO learning rates carry over. Cost: two integer forwards, one or two tail backwards, one
draw of z per step (kept as int8 for the step: 1 byte per head weight, cheaper than MeZO's three
regenerations and no larger than the weights), one random integer per updated weight.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from ..errors import ZotuneError
from .fixed import QMAX, multiplier, quantize, saturate8, stochastic_shift
from .layers import IntSequential
from .loss import APPROXIMATIONS, IntCrossEntropy
from .noise import BP_ROUNDING, ZO_ROUNDING, rademacher_int8, rounding_generator

TAIL_GRADS = ("avg", "plus", "clean")
ZO_GRAD_QUANTS = ("fixed_shift", "dynamic")
MAX_SHIFT = 60
"""Largest rounding shift: beyond it an int64 update rounds to zero anyway (avoids shift overflow)."""


@dataclass
class Int8Config:
    """Options of ElasticZO-INT8 (defaults: research note 3.6, ``[D]`` choices documented there)."""

    lr: float = 1e-3            # ZO (head) learning rate, as for FP32 ElasticZO
    lr_bp: float = 1e-2         # backprop (tail) learning rate
    eps_q: int = 1              # perturbation amplitude in weight LSBs
    seed: int = 0
    bp_layers: int = 1          # last parametrised layers trained by integer backprop (as FP32 ElasticZO)
    tail_grad: str = "avg"
    weight_decay: float = 0.0
    frac_bits: int = 8          # F of the integer CE
    ce_approx: str = "lut"
    zo_grad_quant: str = "fixed_shift"
    dynamic_bits: int = 7       # mu of the dynamic ZO gradient quantisation
    headroom_bits: int = 1      # fixed weight exponents leave the weights room to grow 2**headroom
    error_rounding: str = "nearest"  # of back-propagated errors: nearest, or NITI's pseudo (biased low)

    def __post_init__(self):
        _choice("tail_grad", self.tail_grad, TAIL_GRADS)
        _choice("zo_grad_quant", self.zo_grad_quant, ZO_GRAD_QUANTS)
        _choice("ce_approx", self.ce_approx, APPROXIMATIONS)
        _choice("error_rounding", self.error_rounding, ("nearest", "pseudo"))
        if not isinstance(self.eps_q, int) or not 1 <= self.eps_q <= 64:
            raise ZotuneError(f"eps_q must be an integer number of weight LSBs in [1, 64], got {self.eps_q!r}")
        for name in ("lr", "lr_bp", "weight_decay"):
            if getattr(self, name) < 0:
                raise ZotuneError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 2 <= self.frac_bits <= 14:
            raise ZotuneError(f"frac_bits must be in [2, 14], got {self.frac_bits}")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ZotuneError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


UPDATE_CHUNK = 1 << 14
"""Elements per chunk of a weight update: bounds its int64 temporaries to 128 KiB each, so the
update never outweighs the forward's activations. Chunks draw from one generator in order."""


def _rounded_update(v: torch.Tensor, m: int, s: int, gen: torch.Generator) -> torch.Tensor:
    """``SR(v * m, s)`` (int64 arithmetic, chunked) as int32; shift capped at ``MAX_SHIFT``."""
    flat = v.reshape(-1)
    out = torch.zeros(flat.shape, dtype=torch.int32, device=v.device)
    if m == 0:
        return out.view(v.shape)
    if s > MAX_SHIFT:
        m, s = m >> (s - MAX_SHIFT), MAX_SHIFT
    for lo in range(0, flat.numel(), UPDATE_CHUNK):
        chunk = flat[lo:lo + UPDATE_CHUNK].to(torch.int64) * m
        out[lo:lo + UPDATE_CHUNK] = stochastic_shift(chunk, s, gen).clamp_(-(1 << 16), 1 << 16)
    return out.view(v.shape)


def _sign_update(z: torch.Tensor, c: int, s: int, gen: torch.Generator) -> torch.Tensor:
    """``SR(z * c, s)`` for Rademacher ``z`` (int8 +-1) and an integer ``c >= 0``: ``z * (q + [u < r])``
    with ``q, r = divmod(c, 2**s)`` and ``u`` uniform on ``[0, 2**s)`` (int32; for ``s > 31`` the
    threshold keeps r's top 31 bits, a bias below 2**-31 LSB). Unbiased like ``stochastic_shift``
    (E = z c / 2**s) but needs no int64 temporaries: one random int32 per weight."""
    q, r = divmod(c, 1 << s) if s > 0 else (c << -s, 0)
    bits = min(s, 31)
    q = min(q, 1 << 8)  # the weight saturates at +-127 anyway
    out = z.to(torch.int16) * q
    if r:
        u = torch.empty(z.shape, dtype=torch.int32, device=z.device).random_(0, 1 << bits, generator=gen)
        out += z * (u < (r >> (s - bits)))
    return out


class ElasticZOInt8:
    """The ImageTrainer of ElasticZO-INT8 on an ``IntSequential`` converted from a float model."""

    def __init__(self, model: nn.Module | IntSequential, config: Int8Config | None = None):
        self.config = config or Int8Config()
        self.float_model = None if isinstance(model, IntSequential) else model
        self.model = model if isinstance(model, IntSequential) else IntSequential.from_float(model, self.config.headroom_bits)
        self.tail_start = self.model.tail_start(self.config.bp_layers)
        tail_layers = self.model.layers[self.tail_start:]
        bad = [layer for layer in tail_layers if layer.kind not in ("param", "relu", "flatten") or
               type(layer).__name__ == "IntConv2d"]
        if bad:
            raise ZotuneError(f"bp_layers={self.config.bp_layers} puts {type(bad[0]).__name__[3:]} layer "
                              f"{bad[0].name!r} in the integer backprop tail, which supports Linear, ReLU and "
                              f"Flatten only; use at most {self._max_bp_layers()} bp layers")
        names = [n for layer in self.model.param_layers for n in layer.params()]
        tail_names = [n for layer in tail_layers if layer.kind == "param" for n in layer.params()]
        self.head_names = [n for n in names if n not in tail_names]
        self.tail_names = tail_names
        self.ce = IntCrossEntropy(self.config.frac_bits, self.config.ce_approx)
        self.step_count = 0
        self._z_cache: dict | None = None

    def _max_bp_layers(self) -> int:
        count = 0
        for layer in reversed(self.model.layers):
            if type(layer).__name__ in ("IntConv2d", "IntMaxPool2d", "IntFused"):
                break
            count += layer.kind == "param"
        return count

    # ---- the perturbation, formed at use -------------------------------------------------------
    def _z(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The step's Rademacher signs of tensor ``name``, drawn once per step and kept (int8, one
        byte per head weight) until the update; outside a step, drawn afresh."""
        cache = self._z_cache
        z = None if cache is None else cache.get(name)
        if z is None:
            z = rademacher_int8(self.config.seed, self.step_count, name, like.numel(), like.device).view_as(like)
            if cache is not None:
                cache[name] = z
        return z

    def _perturb(self, sign: int):
        amp = sign * self.config.eps_q
        head = set(self.head_names)

        def perturb(name: str, q: torch.Tensor) -> torch.Tensor:
            if name not in head:
                return q
            z = self._z(name, q)
            if amp in (1, -1):  # int8 add; only +-127 +- 1 wraps (to -128): put back the saturated value
                out = q + z if amp == 1 else q - z
                return torch.where(out == -128, q, out)
            return q.to(torch.int16).add_(z, alpha=amp).clamp_(-QMAX, QMAX).to(torch.int8)
        return perturb

    # ---- one step ------------------------------------------------------------------------------
    def _pass(self, x, e_x, labels, perturb, grads: dict | None) -> int:
        """One forward (head perturbed by ``perturb``) -> summed integer loss; tail grads if asked."""
        h, e_h = self.model.forward(x, e_x, perturb, 0, self.tail_start)
        tape = [] if grads is not None and self.tail_names else None
        out, e_out = self.model.forward(h, e_h, None, self.tail_start, None, tape)
        rounding = self.config.error_rounding
        loss, err = self.ce.loss_and_error(out, e_out, labels, error=tape is not None, rounding=rounding)
        if tape is not None:
            self.model.backward(tape, err[0], err[1], grads, rounding)
        return int(loss.sum())

    def step_quantized(self, x: torch.Tensor, e_x: int, labels: torch.Tensor) -> tuple[int, int]:
        """One training step on an int8 batch; returns the integer losses ``(L_+, L_-)`` (Q(F) bits, summed)."""
        c = self.config
        grads: dict = {}
        mode = c.tail_grad
        self._z_cache = {}
        try:
            return self._step(x, e_x, labels, grads, mode)
        finally:
            self._z_cache = None

    def _step(self, x, e_x, labels, grads, mode):
        loss_plus = self._pass(x, e_x, labels, self._perturb(+1), grads if mode in ("avg", "plus") else None)
        loss_minus = self._pass(x, e_x, labels, self._perturb(-1), grads if mode == "avg" else None)
        if mode == "clean" and self.tail_names:
            self._pass(x, e_x, labels, None, grads)
        batch = x.shape[0]
        self._update_head(loss_plus - loss_minus, batch)
        self._update_tail(grads, batch * (2 if mode == "avg" else 1))
        self.step_count += 1
        return loss_plus, loss_minus

    def _update_head(self, delta_loss: int, batch: int) -> None:
        c = self.config
        params, exps = self.model.params(), self.model.exponents()
        if c.zo_grad_quant == "dynamic":
            g = round_shift_int(delta_loss, max(0, abs(delta_loss).bit_length() - c.dynamic_bits))
        for name in self.head_names:
            w, e_w = params[name], exps[name]
            if c.zo_grad_quant == "fixed_shift":
                scale = c.lr * math.log(2) / (2 ** (c.frac_bits + 1) * c.eps_q * 2.0 ** (2 * e_w) * batch)
                v = delta_loss
            else:
                scale = c.lr * 2.0 ** (-c.dynamic_bits - e_w)
                v = g
            m, s = multiplier(scale)
            gen = rounding_generator(c.seed, self.step_count, ZO_ROUNDING, name, w.device)
            z = self._z(name, w)
            step = _sign_update(z if v >= 0 else -z, abs(v) * m, s, gen)
            self._apply(name, w, step, e_w, c.lr, gen)

    def _update_tail(self, grads: dict, denominator: int) -> None:
        c = self.config
        params, exps = self.model.params(), self.model.exponents()
        for name in self.tail_names:
            if name not in grads:
                continue
            w, e_w = params[name], exps[name]
            g, e_g = grads[name]
            m, s = multiplier(c.lr_bp * 2.0 ** (e_g - e_w) / denominator)
            gen = rounding_generator(c.seed, self.step_count, BP_ROUNDING, name, w.device)
            self._apply(name, w, _rounded_update(g, m, s, gen), e_w, c.lr_bp, gen)

    def _apply(self, name: str, w: torch.Tensor, step: torch.Tensor, e_w: int, lr: float, gen) -> None:
        """``w <- sat8(w - step - SR(lr * wd * w))``, weight decay in the same integer form."""
        new = w.to(step.dtype) - step
        if self.config.weight_decay:
            m, s = multiplier(lr * self.config.weight_decay)
            new = new - _rounded_update(w, m, s, gen)
        self.model.set_param(name, saturate8(new))

    # ---- the ImageTrainer protocol -------------------------------------------------------------
    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Quantise the float batch (the only float work), take one integer step; returns the mean
        of the two passes' batch-mean cross entropies in nats."""
        x, e_x = quantize(images)
        loss_plus, loss_minus = self.step_quantized(x, e_x, labels)
        return (loss_plus + loss_minus) / 2 * 2.0 ** (-self.config.frac_bits) * math.log(2) / images.shape[0]

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.logits(images)

    def state_bytes(self) -> int:
        """Bytes of the training state between steps: the int8 parameters (no optimizer state;
        z, gradients and rounding noise live only inside a step)."""
        return sum(t.numel() * t.element_size() for t in self.model.params().values())

    @torch.no_grad()
    def sync_float_model(self) -> None:
        """Write the dequantised integer weights into the float model this trainer was built from
        (so its checkpoints and exports hold the trained weights). Not part of training."""
        if self.float_model is None:
            return
        params = dict(self.float_model.named_parameters())
        for name, value in self.model.to_float_state().items():
            params[name].copy_(value)

    def state_dict(self) -> dict:
        self.sync_float_model()
        return {"method": "elasticzo-int8", "step": self.step_count, "config": asdict(self.config),
                "params": {k: v.clone() for k, v in self.model.params().items()},
                "exponents": dict(self.model.exponents())}

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != "elasticzo-int8":
            raise ZotuneError(f"not an elasticzo-int8 state (method {state.get('method')!r})")
        mine = self.model.exponents()
        if set(state["params"]) != set(mine) or any(state["exponents"][k] != mine[k] for k in mine):
            raise ZotuneError("elasticzo-int8 state does not match this model (parameter names or exponents differ)")
        self.config = Int8Config(**state["config"])
        for name, value in state["params"].items():
            self.model.set_param(name, value.clone())
        self.step_count = int(state["step"])


def round_shift_int(v: int, s: int) -> int:
    """``round_shift`` on a Python int (ties towards +inf), for the dynamic ZO-gradient narrowing."""
    return (v + (1 << (s - 1))) >> s if s > 0 else v


def build_elasticzo_int8(model: nn.Module, options: dict) -> ElasticZOInt8:
    """Builder for the image-training loop: ``options`` holds lr, lr_bp, eps, seed, bp_layers,
    tail_grad, momentum, weight_decay (and optionally any ``Int8Config`` field).

    ``eps`` is the FP32 smoothing and is not used: INT8 perturbs by ``eps_q`` weight LSBs (default 1).
    Integer momentum is not implemented: a non-zero ``momentum`` is an error.
    """
    if options.get("momentum"):
        raise ZotuneError(f"elasticzo-int8 has no momentum (integer SGD only); got momentum={options['momentum']}")
    known = {f.name for f in fields(Int8Config)}
    kwargs = {k: v for k, v in options.items() if k in known and v is not None}
    return ElasticZOInt8(model, Int8Config(**kwargs))
