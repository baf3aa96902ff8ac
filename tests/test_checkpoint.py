"""Checkpoints load the optimizer state with ``weights_only=True``: every state dict ZOOptimizer
writes (all methods, mid-step and deferred) loads and resumes bitwise, and a file holding any other
pickled object is refused instead of being unpickled."""
import pytest
import torch

import zotune
from zotune import checkpoint
from zotune.checkpoint import CheckpointError

from helpers import mlp

UNPICKLED = []


def _record(value):
    UNPICKLED.append(value)
    return value


class Payload:
    """An object whose unpickling runs code (``_record``): what weights_only must not allow."""

    def __reduce__(self):
        return (_record, ("executed",))


def problem(dtype=torch.float32):
    model = mlp(seed=0, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 16, generator=g).to(dtype), torch.randint(0, 4, (16,), generator=g)
    return model, lambda: torch.nn.functional.cross_entropy(model(x).float(), y)


CASES = {name: {"method": name} for name in zotune.METHODS}
CASES.update({
    # per-tensor coefficients ({tensor id: float}) in the deferred update of the saved state
    "kerzoo-per-tensor-deferred": {"method": "kerzoo", "kernel": {"r_sharing": "tensor"},
                                   "defer_update": True},
    "mezo-bf16-master": {"method": "mezo", "dtype": torch.bfloat16, "defer_update": True},
    "zo-adam-deferred": {"method": "zo-adam", "defer_update": True},
})


def make(name):
    options = dict(CASES[name])
    model, loss = problem(options.pop("dtype", torch.float32))
    if "dizo" in options["method"]:  # project often, so the saved state holds anchors and FO Adam
        options["projection"] = {"pattern": r"^0\.weight$", "interval": 2, "iterations": 2}
    opt = zotune.ZOOptimizer(model.named_parameters(), lr=1e-2, eps=1e-3, seed=3, **options)
    return model, loss, opt


def _has_dict_coefficient(state) -> bool:
    core = state["zo"]["core"]
    pending = core["pending"]
    terms = list(core["engine"]["current"]) + (list(pending["terms"]) if pending else [])
    return any(isinstance(c, dict) for _, c in terms)


@pytest.mark.parametrize("name", CASES)
def test_every_optimizer_state_loads_with_weights_only_and_resumes(name, tmp_path):
    model, loss, opt = make(name)
    for _ in range(4):
        opt.step(loss)
    params = dict(model.named_parameters())
    saved = checkpoint.save(tmp_path, 4, params, {"step": 4}, opt.state_dict())  # not flushed
    if name == "kerzoo-per-tensor-deferred":
        assert _has_dict_coefficient(opt.state_dict())
    if name == "dizo-fo":
        assert opt.state_dict()["zo"]["core"]["posts"][0]["projection"]["adam_state"] is not None
    torch.load(saved / "optimizer.pt", weights_only=True)  # what checkpoint.load does
    for _ in range(3):
        opt.step(loss)
    opt.flush()

    model2, loss2, opt2 = make(name)
    state, opt_state = checkpoint.load(saved, dict(model2.named_parameters()))
    assert state == {"step": 4}
    opt2.load_state_dict(opt_state)
    for _ in range(3):
        opt2.step(loss2)
    opt2.flush()
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n


def test_a_pickled_object_in_optimizer_state_is_refused(tmp_path):
    model, loss, opt = make("mezo")
    opt.step(loss)
    params = dict(model.named_parameters())
    state = opt.state_dict()
    state["zo"]["extra"] = Payload()
    saved = checkpoint.save(tmp_path, 1, params, {"step": 1}, state)
    UNPICKLED.clear()
    with pytest.raises(CheckpointError, match=r"refusing to load optimizer state .*_record") as err:
        checkpoint.load(saved, params)
    assert "\n" not in str(err.value) and "weights_only=False" not in str(err.value)
    assert UNPICKLED == []  # the payload's code never ran


def test_a_corrupt_optimizer_state_is_one_clear_line(tmp_path):
    model, loss, opt = make("mezo")
    opt.step(loss)
    params = dict(model.named_parameters())
    saved = checkpoint.save(tmp_path, 1, params, {"step": 1}, opt.state_dict())
    (saved / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read optimizer state") as err:
        checkpoint.load(saved, params)
    assert "\n" not in str(err.value)
