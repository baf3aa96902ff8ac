"""Storage tiers of the offload engine: where a block's parameters live while it is not computing.

A tier holds each block as one flat buffer (all of the block's parameters, trainable or not, one
after the other in ``named_parameters`` order, one dtype). Two tiers:

* :class:`CpuTier`: one host buffer per block (pinned when CUDA is available, so uploads are
  asynchronous); the block's parameters are permanent views into it. On a CPU compute device the
  tier *is* the compute memory: the engine computes in the buffer, no copy is made.
* :class:`DiskTier`: one safetensors file per block (``block-00003.safetensors``, a single 1-D
  tensor ``flat`` whose data starts 64-byte aligned, the names, shapes and offsets in the
  metadata, readable by the ``safetensors`` library). Reads go into a caller's buffer with
  ``readinto`` (page cache, not this process's resident memory); write-back is atomic (write
  ``*.tmp``, ``fsync``, rename, ``fsync`` the directory), so a process killed at any moment leaves
  every block file whole: the old one or the new one. Between uses the parameters are views of a
  shared memory map of their file, so the model stays an ordinary module (evaluation,
  checkpoints), and costs no resident memory until someone reads it.

Loads take an element range (``start``, ``stop``): a distributed engine holding chunk-aligned
slices of a block (``ParamLayout.shards``) loads only its slice.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import torch

from ..errors import ZotuneError

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
ALIGN = 64


class OffloadError(ZotuneError):
    """The offload directory cannot be used (not writable, full, or not an offload tier)."""


class BlockParams:
    """The parameters of one block as one flat buffer: names, tensors, element offsets."""

    def __init__(self, index: int, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        if not named:
            raise ZotuneError(f"block {index} has no parameters to offload")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1:
            raise ZotuneError(f"block {index} mixes parameter dtypes {sorted(map(str, dtypes))}; "
                              "the offload engine stores a block as one flat buffer of one dtype")
        self.index = index
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.dtype = dtypes.pop()
        self.offsets, start = [], 0
        for p in self.params:
            self.offsets.append(start)
            start += p.numel()
        self.numel = start
        self.nbytes = start * self.params[0].element_size()

    def bind(self, flat: torch.Tensor) -> None:
        """Point every parameter at its slice of ``flat`` (``param.data`` views)."""
        for p, off in zip(self.params, self.offsets):
            p.data = flat[off:off + p.numel()].view(p.shape)

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """Copy the parameters' current values into ``out`` (flat)."""
        for p, off in zip(self.params, self.offsets):
            out[off:off + p.numel()].copy_(p.data.reshape(-1))
        return out


class CpuTier:
    """Blocks in host memory: one flat buffer each, the parameters views into it."""

    kind = "cpu"

    def __init__(self, blocks: list[BlockParams], *, pin: bool = False) -> None:
        self.blocks = blocks
        self.buffers = {}
        for b in blocks:
            flat = torch.empty(b.numel, dtype=b.dtype, pin_memory=pin)
            b.bind(b.gather(flat))
            self.buffers[b.index] = flat
        self.bytes_read = self.bytes_written = 0

    def view(self, j: int) -> torch.Tensor:
        """The block's flat buffer itself (the parameters are views into it)."""
        return self.buffers[j]

    def load(self, j: int, out: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        src = self.buffers[j][start:stop]
        self.bytes_read += src.numel() * src.element_size()
        return out[:src.numel()].copy_(src, non_blocking=out.device.type == "cuda")

    def store(self, j: int, src: torch.Tensor, meta: dict | None = None) -> None:
        dst = self.buffers[j]
        self.bytes_written += dst.numel() * dst.element_size()
        dst.copy_(src[:dst.numel()])

    def close(self) -> None:
        pass


class DiskTier:
    """Blocks in safetensors files under ``directory``, written back atomically.

    Args:
        directory: created if missing; must be writable and have room for every block plus the
            largest one (the temporary file of a write-back).
        blocks: the blocks, their parameters holding the initial values.
        fsync: ``fsync`` each written file and the directory (durability across a power cut;
            a killed process leaves whole files either way).
        page_cache: leave the files' pages in the page cache (``False``: evict each file's pages
            after it is written and read, ``posix_fadvise(DONTNEED)``: the tier then does not
            crowd out other memory, and every read comes from the disk, as on a machine whose
            memory cannot hold the model).
    """

    kind = "disk"

    def __init__(self, directory, blocks: list[BlockParams], *, fsync: bool = True,
                 page_cache: bool = True) -> None:
        self.dir = Path(directory).expanduser()
        self.blocks = {b.index: b for b in blocks}
        self.fsync, self.page_cache = fsync, page_cache
        self.bytes_read = self.bytes_written = 0
        self._check_directory(blocks)
        for stale in self.dir.glob("block-*.tmp"):  # a write-back cut short by a kill
            stale.unlink()
        self._offset = {}
        for b in blocks:
            self._write(b.index, [p.data.reshape(-1).to(b.dtype) for p in b.params], {"state": "initial"})
            b.bind(self.view(b.index))

    # ------------------------------------------------------------------ files
    def path(self, j: int) -> Path:
        return self.dir / f"block-{j:05d}.safetensors"

    def _check_directory(self, blocks) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".zotune-write-test"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as err:
            raise OffloadError(f"offload directory {str(self.dir)!r} is not writable: "
                               f"{err.strerror or err}") from None
        need = sum(b.nbytes for b in blocks) + max(b.nbytes for b in blocks)
        have = sum(self.path(b.index).stat().st_size for b in blocks if self.path(b.index).exists())
        free = shutil.disk_usage(self.dir).free + have
        if free < need:
            raise OffloadError(f"offload directory {str(self.dir)!r} has {free / 2**30:.2f} GiB free, "
                               f"the blocks need {need / 2**30:.2f} GiB (all blocks and one temporary "
                               "copy); choose another --offload-dir")

    def _header(self, j: int, meta: dict) -> bytes:
        b = self.blocks[j]
        metadata = {"block": str(j), "names": json.dumps(b.names),
                    "shapes": json.dumps([list(p.shape) for p in b.params]),
                    "offsets": json.dumps(b.offsets), **{k: str(v) for k, v in meta.items()}}
        head = {"flat": {"dtype": _ST_DTYPES[b.dtype], "shape": [b.numel],
                         "data_offsets": [0, b.nbytes]}, "__metadata__": metadata}
        text = json.dumps(head, separators=(",", ":")).encode()
        pad = (-(8 + len(text))) % ALIGN  # safetensors allows trailing spaces in the header
        return struct.pack("<Q", len(text) + pad) + text + b" " * pad

    def _write(self, j: int, parts: list[torch.Tensor], meta: dict) -> None:
        final, tmp = self.path(j), self.path(j).with_suffix(".tmp")
        header = self._header(j, meta)
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                for part in parts:
                    f.write(memoryview(part.detach().contiguous().view(torch.uint8).numpy()))
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
                if not self.page_cache:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            os.replace(tmp, final)
            if self.fsync:
                fd = os.open(self.dir, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno == errno.ENOSPC:
                raise OffloadError(f"offload directory {str(self.dir)!r} is full (writing block {j}); "
                                   "free space or choose another --offload-dir") from None
            raise OffloadError(f"cannot write block {j} to {str(final)!r}: {err.strerror or err}") from None
        self._offset[j] = len(header)
        self.bytes_written += self.blocks[j].nbytes

    # ------------------------------------------------------------------ tier interface
    def view(self, j: int) -> torch.Tensor:
        """A flat tensor backed by a shared memory map of block ``j``'s file (no resident cost
        until read; writes go to the file)."""
        b = self.blocks[j]
        size = self._offset[j] + b.nbytes
        raw = torch.from_file(str(self.path(j)), shared=True, size=size, dtype=torch.uint8)
        return raw[self._offset[j]:].view(b.dtype)

    def load(self, j: int, out: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Read elements ``start:stop`` of block ``j`` into ``out`` (a CPU tensor)."""
        b = self.blocks[j]
        stop = b.numel if stop is None else stop
        dst = out[:stop - start]
        item = dst.element_size()
        with open(self.path(j), "rb", buffering=0) as f:
            f.seek(self._offset[j] + start * item)
            view = memoryview(dst.view(torch.uint8).numpy())
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise OffloadError(f"block file {str(self.path(j))!r} is truncated")
                got += n
            if not self.page_cache:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self.bytes_read += got
        return dst

    def store(self, j: int, src: torch.Tensor, meta: dict | None = None) -> None:
        """Write block ``j`` back from the flat ``src``, atomically."""
        self._write(j, [src[:self.blocks[j].numel]], meta or {})

    def close(self) -> None:
        pass
