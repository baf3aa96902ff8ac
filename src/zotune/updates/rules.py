r"""Update rules: how a ZO gradient :math:`\hat g = \sum_k c_k z_k` changes the parameters.

Each rule is per-tensor maths in the torch.optim functional style, applied chunk by chunk by an
engine while the chunk's directions are in cache:

* ``fused`` rules (SGD) are applied to a ZO gradient inside the sweep as
  :math:`\theta \mathrel{-}= \eta \sum_k c_k z_k`, with no gradient buffer;
* every rule has ``apply_chunk(x, g, state, lr, step)``: the materialised gradient chunk ``g``
  (regenerated from keys, or read from a sparse or dense gradient) and its state slices, applied
  as :math:`\theta \mathrel{-}= \eta\, f(g, \text{state})` in place. Every rule is additive in
  :math:`\theta`, so an engine may apply it before or after adding the next perturbation.
* ``transforms``: gradient transforms a rule implies (ZO-SGD-Sign is SGD after
  :class:`~zotune.updates.transforms.ScalarSign`); they are chained before the rule with the
  user's own (``updates/transforms.py``).

Weight decay is applied by the engine, only on tensors that are not biases or norm weights (as
MeZO): decoupled, :math:`\theta \leftarrow (1 - \eta\lambda)\theta` before the rule (MeZO, AdamW), or
coupled, :math:`g \leftarrow g + \lambda\theta` (``torch.optim.SGD``'s and ``Adam``'s L2), which
differs from decoupled decay only for stateful rules.
"""
from __future__ import annotations

from .transforms import ScalarSign


class SGD:
    r"""ZO-SGD (MeZO): :math:`\theta \leftarrow \theta - \eta \hat g`. No state; fused into the sweep."""

    name = "sgd"
    fused = True
    state_names: tuple[str, ...] = ()
    transforms: tuple = ()

    def apply_chunk(self, x, g, state, lr, step):  # dense and sparse gradients
        x.add_(g.to(x.dtype), alpha=-lr)


class Sign(SGD):
    r"""ZO-SGD-Sign as ZO-Bench defines it: :math:`\theta \leftarrow \theta - \eta\,\mathrm{sign}(c)\, z`.

    The sign is of the scalar projected gradient, not elementwise: a normalised ZO-SGD
    (Zhang et al., 2024, ZO-Bench). Fused; no state.
    """

    name = "sign"
    transforms = (ScalarSign(),)


class Momentum:
    r"""ZO-SGD with heavy-ball momentum (ZO-Bench's ZO-SGD-MMT, torch.optim.SGD semantics).

    .. math:: b \leftarrow \mu b + \hat g, \qquad \theta \leftarrow \theta - \eta b

    Memory: one fp32 buffer the size of the trainable parameters.
    """

    name = "momentum"
    fused = False
    transforms: tuple = ()
    state_names = ("momentum_buffer",)

    def __init__(self, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

    def apply_chunk(self, x, g, state, lr, step):
        buf = state["momentum_buffer"]
        buf.mul_(self.momentum).add_(g)
        x.add_(buf.to(x.dtype), alpha=-lr)


class Adam:
    r"""ZO-Adam (ZO-Bench; MeZO-Adam): Adam on the ZO gradient, torch.optim.Adam semantics.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1)\hat g,\quad v \leftarrow \beta_2 v + (1-\beta_2)\hat g^2,\quad
        \theta \leftarrow \theta - \eta \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \delta}

    Memory: two fp32 buffers the size of the trainable parameters.
    """

    name = "adam"
    fused = False
    transforms: tuple = ()
    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"adam eps must be > 0, got {eps}")
        self.betas, self.eps = (b1, b2), eps

    def apply_chunk(self, x, g, state, lr, step):
        b1, b2 = self.betas
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v / (1 - b2 ** step)).sqrt_().add_(self.eps)
        x.addcdiv_(m.to(x.dtype), denom.to(x.dtype), value=-lr / (1 - b1 ** step))


class LinearCoupling:
    r"""The accelerated (look-ahead) ZO-SGD that KerZOO's released code runs (Nesterov's linear
    coupling, "similar triangles"), with :math:`\tau_k = 6/(k+6)` for the k-th update (0-based).

    The code keeps the iterate x and a full copy c and evaluates gradients at the look-ahead point
    :math:`y_k = \tau_k c_k + (1-\tau_k) x_k`:

    .. math:: c_{k+1} = c_k - \eta \hat g(y_k), \qquad x_{k+1} = \tau_k c_{k+1} + (1-\tau_k) x_k.

    Here the state is the difference :math:`e = c - x` (one fp32 copy of the trainable
    parameters, the variant's documented extra memory), so that
    :math:`y_k = x_k + \tau_k e_k` is a shift the optimizer applies before probing
    (``shift_chunk``, one sweep without random numbers), and from :math:`y_k` the update is

    .. math:: x_{k+1} = y_k - \eta \tau_k \hat g, \qquad e_{k+1} = (1-\tau_k)(e_k - \eta \hat g),

    algebraically identical to the code's recursion (tested). Between steps the parameters hold
    x, as in the code. Reference: research/kerzoo_dizo.md, section 2.4.
    """

    name = "agd"
    fused = False
    transforms: tuple = ()
    lookahead = True
    state_names = ("lookahead_diff",)

    def __init__(self, warm: float = 6.0) -> None:
        if not warm > 0:
            raise ValueError(f"warm must be > 0, got {warm}")
        self.warm = warm

    def tau(self, step: int) -> float:
        """tau_k for the update numbered ``step`` (1-based, as engines pass it)."""
        return self.warm / (step - 1 + self.warm)

    def shift_chunk(self, x, state, step, sign: float = 1.0):
        """x <- x + sign * tau_k * e: to the look-ahead point (sign 1) or back (sign -1)."""
        x.add_(state["lookahead_diff"].to(x.dtype), alpha=sign * self.tau(step))

    def apply_chunk(self, x, g, state, lr, step):
        tau, e = self.tau(step), state["lookahead_diff"]
        x.add_(g.to(x.dtype), alpha=-lr * tau)
        e.add_(g, alpha=-lr).mul_(1.0 - tau)


class Shift:
    """Adapter that makes a look-ahead rule's ``shift_chunk`` an engine update (no gradient)."""

    name = "shift"
    fused = False
    transforms: tuple = ()
    state_names: tuple[str, ...] = ()

    def __init__(self, rule, sign: float = 1.0) -> None:
        self.rule, self.sign = rule, sign
        self.state_names = rule.state_names

    def apply_chunk(self, x, g, state, lr, step):
        self.rule.shift_chunk(x, state, step, self.sign)
