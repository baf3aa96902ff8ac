"""Checkpoints of an offloaded model stream block by block from its tier (checkpoint_stream.py,
``OffloadEngine.checkpoint_groups``): a save reads each block into one reusable buffer (not
through the parameters' memory maps, which would map the whole model into the process), a load
holds one tensor or one block at a time (``safetensors.torch.load_file`` holds the whole file);
the files round-trip bitwise.

Measured: the peak bytes of live tensor storages created (a torch dispatch mode that tracks them
with weak references) and the file-backed resident memory the process maps (``RssFile``).
"""
from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from test_offload import batch
from zotune import checkpoint, checkpoint_stream
from zotune.models import tiny_model
from zotune.objectives import CandidateScorer
from zotune.optim import ZOOptimizer


class NewStorages(TorchDispatchMode):
    """The peak bytes of tensor storages created while active and still alive (views are free)."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.peak = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                ptr = t.untyped_storage().data_ptr()
                self.live = [(r, p, n) for r, p, n in self.live if r() is not None]
                if ptr not in before and all(p != ptr for _, p, _ in self.live):
                    self.live.append((weakref.ref(t), ptr, t.untyped_storage().nbytes()))
                    self.peak = max(self.peak, sum(n for _, _, n in self.live))
        return out


def rss_file() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    return 0


def trained(tmp_path, name, **options):
    model, tok = tiny_model("llama", seed=3, num_hidden_layers=8, tie_word_embeddings=False,
                            hidden_size=64, intermediate_size=128)
    opt = ZOOptimizer(model, lr=1e-2, eps=1e-2, engine="offload", seed=5, **options)
    scorer = CandidateScorer(model, tok, max_length=64)
    for s in range(2):
        opt.step(lambda b=batch(s): scorer.classification_loss(b))
    return model, opt


@pytest.mark.parametrize("storage", [None, "bf16"])
def test_a_checkpoint_streams_from_the_disk_tier_one_block_at_a_time(tmp_path, storage):
    model, opt = trained(tmp_path, "a", offload_to="disk", offload_dir=tmp_path / "tier",
                         storage_dtype=storage, low_precision_probes="keep", fsync=False)
    state = opt.state_dict()  # catches every block up (what zotune train does before a save)
    params = {n: p for n, p in model.named_parameters()}
    model_bytes = sum(p.numel() * p.element_size() for p in params.values())
    block_bytes = max(b.numel for b in opt.engine._blocks) * opt.engine.streamer.storage_dtype.itemsize
    assert block_bytes < model_bytes / 8
    groups = opt.engine.checkpoint_groups(params)
    assert len(groups) == 8
    with NewStorages() as new:
        checkpoint_stream.save(tmp_path / "streamed.safetensors", params, groups)
    assert block_bytes <= new.peak <= 1.1 * block_bytes  # one block buffer
    mapped = rss_file()
    checkpoint_stream.save(tmp_path / "streamed.safetensors", params, groups)
    streamed = rss_file() - mapped
    # writing from the parameters themselves (memory maps of the block files) maps every block
    mapped = rss_file()
    save_file({n: p.detach() for n, p in params.items()}, str(tmp_path / "mapped.safetensors"))
    through_maps = rss_file() - mapped
    assert streamed < block_bytes and through_maps > model_bytes / 2
    checkpoint.save(tmp_path / "run", 2, params, {"step": 2}, state, groups=groups)
    # bitwise round trip: safetensors reads the streamed file, and a fresh offloaded model loads it
    path = tmp_path / "run" / "checkpoints" / "step-0000002"
    read = load_file(str(path / checkpoint.PARAMS))
    assert read.keys() == params.keys() and all(torch.equal(read[n], params[n].detach()) for n in params)
    fresh, _ = tiny_model("llama", seed=4, num_hidden_layers=8, tie_word_embeddings=False,
                          hidden_size=64, intermediate_size=128)
    opt2 = ZOOptimizer(fresh, engine="offload", offload_to="disk", offload_dir=tmp_path / "tier2",
                       storage_dtype=storage, low_precision_probes="keep", fsync=False)
    fresh_params = dict(fresh.named_parameters())
    with NewStorages() as loading:
        checkpoint.load(path, fresh_params, opt2.engine.checkpoint_groups(fresh_params))
    largest_tensor = max(p.numel() * p.element_size() for p in params.values())
    assert loading.peak <= block_bytes + 2 * largest_tensor  # a block and a tensor (read, copied) at a time
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
    assert new.peak < 1 << 16  # written straight from the host buffers (a few small tensors)
    fresh, _ = tiny_model("llama", seed=4, num_hidden_layers=8, tie_word_embeddings=False,
                          hidden_size=64, intermediate_size=128)
    ZOOptimizer(fresh, engine="offload", offload_to="cpu")
    loaded, _ = checkpoint.load(tmp_path / "run" / "checkpoints" / "step-0000002", dict(fresh.named_parameters()))
    assert loaded == {"step": 2}
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
