"""Checkpoints of an offloaded model stream block by block from its tier (checkpoint_stream.py,
``OffloadEngine.checkpoint_groups``): the save holds one block-sized buffer beyond what is
resident, where safetensors' own writer holds the whole file; the files round-trip bitwise.

Memory is measured two ways during a save: tracemalloc (Python-side copies: what safetensors'
``save_file`` builds) and a torch dispatch mode that counts the bytes of every new tensor storage.
"""
from __future__ import annotations

import tracemalloc

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from test_offload import batch
from zotune import checkpoint
from zotune.models import tiny_model
from zotune.objectives import CandidateScorer
from zotune.optim import ZOOptimizer


class NewStorages(TorchDispatchMode):
    """Bytes of the tensor storages created while active (views of existing ones are free)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen, self.total, self.largest = set(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                ptr = t.untyped_storage().data_ptr()
                if ptr not in before and ptr not in self.seen:
                    self.seen.add(ptr)
                    self.total += t.untyped_storage().nbytes()
                    self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def trained(tmp_path, name, **options):
    model, tok = tiny_model("llama", seed=3, num_hidden_layers=8, tie_word_embeddings=False)
    opt = ZOOptimizer(model, lr=1e-2, eps=1e-2, engine="offload", seed=5, **options)
    scorer = CandidateScorer(model, tok, max_length=64)
    for s in range(2):
        opt.step(lambda b=batch(s): scorer.classification_loss(b))
    return model, opt


@pytest.mark.parametrize("storage", [None, "bf16"])
def test_a_checkpoint_streams_from_the_disk_tier_one_block_at_a_time(tmp_path, storage):
    model, opt = trained(tmp_path, "a", offload_to="disk", offload_dir=tmp_path / "tier",
                         storage_dtype=storage, low_precision_probes="keep")
    state = opt.state_dict()  # catches every block up (what zotune train does before a save)
    params = {n: p for n, p in model.named_parameters()}
    model_bytes = sum(p.numel() * p.element_size() for p in params.values())
    block_bytes = max(b.numel for b in opt.engine._blocks) * opt.engine.streamer.storage_dtype.itemsize
    assert block_bytes < model_bytes / 8
    groups = opt.engine.checkpoint_groups(params)
    assert len(groups) == 8
    tracemalloc.start()
    with NewStorages() as new:
        checkpoint.save(tmp_path / "run", 2, params, {"step": 2}, state, groups=groups)
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert new.total <= 1.1 * block_bytes and new.largest >= block_bytes  # one block buffer
    assert python_peak < model_bytes / 4
    # the measurement sees a whole-file writer: safetensors' own, on the same tensors
    tracemalloc.start()
    save_file({n: p.detach().contiguous() for n, p in params.items()}, str(tmp_path / "whole.safetensors"))
    _, whole_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert whole_peak > model_bytes / 2
    # bitwise round trip: safetensors reads the streamed file, and a fresh offloaded model loads it
    path = tmp_path / "run" / "checkpoints" / "step-0000002"
    read = load_file(str(path / checkpoint.PARAMS))
    assert read.keys() == params.keys() and all(torch.equal(read[n], params[n].detach()) for n in params)
    fresh, _ = tiny_model("llama", seed=4, num_hidden_layers=8, tie_word_embeddings=False)
    opt2 = ZOOptimizer(fresh, engine="offload", offload_to="disk", offload_dir=tmp_path / "tier2",
                       storage_dtype=storage, low_precision_probes="keep")
    fresh_params = dict(fresh.named_parameters())
    with NewStorages() as loading:
        checkpoint.load(path, fresh_params, opt2.engine.checkpoint_groups(fresh_params))
    largest_tensor = max(p.numel() * p.element_size() for p in params.values())
    assert loading.largest <= max(block_bytes, largest_tensor)  # a tensor or a block at a time
    assert all(torch.equal(fresh_params[n].detach(), params[n].detach()) for n in params)
    for j in range(8):  # the block files themselves hold the loaded values
        assert torch.equal(opt2.engine.tier.view(j), opt.engine.tier.view(j))


def test_host_memory_tier_checkpoint_round_trips_in_place(tmp_path):
    model, opt = trained(tmp_path, "a", offload_to="cpu")
    state = opt.state_dict()
    params = dict(model.named_parameters())
    with NewStorages() as new:
        checkpoint.save(tmp_path / "run", 2, params, {"step": 2}, state,
                        groups=opt.engine.checkpoint_groups(params))
    assert new.total == 0  # written straight from the host buffers
    fresh, _ = tiny_model("llama", seed=4, num_hidden_layers=8, tie_word_embeddings=False)
    ZOOptimizer(fresh, engine="offload", offload_to="cpu")
    loaded, _ = checkpoint.load(tmp_path / "run" / "checkpoints" / "step-0000002", dict(fresh.named_parameters()))
    assert loaded == {"step": 2}
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
