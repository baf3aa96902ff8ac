r"""Precision of the offload engine's blocks: on the wire, in the compute slot, in the tier.

Two options, independent of the model's own dtype (fp32 here):

* ``transfer_dtype`` (``bf16`` or ``fp16``): each block travels to the compute slot and computes
  in this dtype, while an **fp32 master** of the block stays in the tier. A block at point
  ``theta + sum_k a_k z_k`` is written into its slot as ``round(master + sum_k a_k z_k)`` (drawn
  and added in fp32, one rounding), exactly the in-memory engine's master-weight arithmetic
  (``InMemoryEngine._move_chunk_master``); updates are applied to the master, so updates far below
  one bf16 ulp accumulate instead of being rounded away (ZO2's AMP mode rounds them away:
  research/zo2_distzo2.md section 6).
* ``storage_dtype="bf16"``: the tier holds bf16 (half the bytes on disk and on the link). A block
  is loaded into an fp32 working master (exact upcast) and moved there; each update applied to it
  is followed, chunk by chunk and before the perturbation of the same sweep, by **stochastic
  rounding** of the master to bf16 numbers: per element, with ``u`` the 16 bits a bf16 cast drops,

  .. math:: \mathrm{SR}(x) = \lfloor x \rfloor_{\text{bf16}} \text{ with probability } 1 - u/2^{16},
            \text{ else the next bf16 away from zero},

  so :math:`E[\mathrm{SR}(x)] = x`: an update smaller than an ulp moves the stored value with the
  probability that makes it right on average (Gupta et al., 2015, "Deep learning with limited
  numerical precision"). The 16 random bits of each chunk come from a key
  ``mix(SR_TAG, the update's step and first direction key, tensor id, chunk)`` (``zotune.rng``),
  so a run is reproducible and a resumed run rounds exactly as the uninterrupted one. Because the
  master always holds bf16 numbers after an update, a write-back is an exact cast at any moment
  (also in the middle of an evaluation stopped by Ctrl-C), and the probes of a step are computed
  from exactly what the tier will hold.

Losses stay fp32: the blocks' inputs are cast to the block's dtype when it is called and its
output back to the caller's dtype (:class:`CastToBlockDtype`), so the embeddings, final norm,
head and loss run in the model's dtype.
"""
from __future__ import annotations

import copy

import torch

from .. import rng
from ..errors import ZotuneError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRANSFER_DTYPES = ("fp32", "bf16", "fp16")
STORAGE_DTYPES = ("fp32", "bf16")
SR_TAG = 0x5352_4F55  # "SROU": keys of the write-back's stochastic rounding


def parse_dtype(value, option: str, valid: tuple[str, ...]) -> torch.dtype | None:
    """``None`` (the model's dtype), a name in ``valid`` or a torch dtype, as a torch dtype."""
    if value is None:
        return None
    names = {v: k for k, v in DTYPES.items()}
    name = names.get(value, value) if isinstance(value, torch.dtype) else str(value)
    name = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)
    if name not in valid:
        raise ZotuneError(f"unknown {option} {value!r}; valid: {', '.join(valid)}")
    return DTYPES[name]


def stored_as(block, dtype: torch.dtype):
    """``block`` (a :class:`~zotune.engines.tiers.BlockParams`) as a tier stores it in ``dtype``:
    the same parameters and offsets, the tier's buffer dtype and size."""
    if dtype == block.dtype:
        return block
    out = copy.copy(block)
    out.dtype, out.nbytes = dtype, block.numel * dtype.itemsize
    return out


def sr_key(update) -> int:
    """The stochastic-rounding key an update leaves on the blocks it touches: its 1-based step
    and, for a ZO gradient, its first direction's key (which carries the run seed)."""
    terms = getattr(update.grad, "terms", ())
    return rng.mix(SR_TAG, int(update.step), *(int(k) for k, _ in terms[:1]))


def stochastic_round_bf16(x: torch.Tensor, key: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``x`` rounded to bf16 stochastically (module docstring), the random bits from ``key``.

    Cost: one 16-bit draw per element. Non-finite values are cast as they are."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic rounding to bf16 takes fp32, got {x.dtype}")
    noise = torch.randint(0, 1 << 16, x.shape, generator=rng.generator(key, x.device),
                          dtype=torch.int32, device=x.device)
    bits = (x.contiguous().view(torch.int32) + noise) & -65536  # drop the low 16 bits after the carry
    low = bits.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero
    low = torch.where(torch.isfinite(x), low, x.to(torch.bfloat16))
    return low if out is None else out.copy_(low)


def round_chunk(t, c: int, key: int) -> None:
    """Round chunk ``c`` of layout tensor ``t``'s fp32 master to bf16 numbers in place,
    stochastically, with the chunk's key ``mix(key, tensor id, chunk)`` (``key``: the update's
    :func:`sr_key`)."""
    s, e = t.chunks[c]
    m = t.master[s:e]
    m.copy_(stochastic_round_bf16(m, rng.mix(key, t.tensor_id, c)))


def _cast(value, dtype):
    if torch.is_tensor(value) and value.is_floating_point() and value.dtype != dtype:
        info = torch.finfo(dtype)  # a mask's -inf or fp32 minimum stays the most negative finite
        return value.clamp(info.min, info.max).to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


class CastToBlockDtype:
    """Forward hooks on a block: floating inputs are cast to the dtype of the block's parameters
    (which a slot or a low-precision tier decides, call by call), the hidden state it returns
    back to the dtype its input had. A no-op when the dtypes agree."""

    def __init__(self, block: torch.nn.Module) -> None:
        self.block, self.dtypes = block, []
        self.handles = [block.register_forward_pre_hook(self._pre, with_kwargs=True),
                        block.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs):
        dtype = next(module.parameters()).dtype
        first = args[0] if args else kwargs.get("hidden_states")
        self.dtypes.append(first.dtype if torch.is_tensor(first) else dtype)
        if self.dtypes[-1] == dtype:
            return None
        return _cast(args, dtype), {k: _cast(v, dtype) for k, v in kwargs.items()}

    def _post(self, module, args, output):
        back = self.dtypes.pop()
        if isinstance(output, tuple):
            return (output[0].to(back), *output[1:]) if output[0].dtype != back else None
        return output.to(back) if output.dtype != back else None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
