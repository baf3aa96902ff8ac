"""The offload engine's slot ring (engines/slots.py): its schedule, and the CUDA executor's event
bookkeeping run on CPU tensors with fake streams and events (the real CUDA run skips here).

The fake ``torch.cuda`` logs every operation with the stream it was issued on, every event
recorded and waited for, and every host synchronisation; the tests then check the dependencies
the GPU would enforce: fill(k) waits for the drain of the block that used its slot before,
compute(k) for fill(k), drain(k) for compute(k), a slot is never refilled before its drain, and
the host synchronises once per pass, after the loop.
"""
from __future__ import annotations

import contextlib
import types

import pytest
import torch

from test_offload import batch, same, train
from zotune.engines import slots
from zotune.engines.slots import Ring
from zotune.models import tiny_model
from zotune.objectives import CandidateScorer
from zotune.optim import ZOOptimizer


class Recorder:
    """Ops for :class:`Ring` that record what is issued and the event each waits on."""

    def __init__(self, fail_at=None):
        self.log, self.fail_at = [], fail_at

    def _op(self, kind, k, s, after):
        self.log.append((kind, k, s, after))
        return (kind, k)

    def load(self, k, s, after):
        return self._op("load", k, s, after)

    def compute(self, k, s, after):
        if k == self.fail_at:
            self.log.append(("compute", k, s, after))
            raise KeyboardInterrupt
        return self._op("compute", k, s, after)

    def store(self, k, s, after):
        return self._op("store", k, s, after)

    def rescue(self, k, s):
        return self._op("rescue", k, s, None)

    def wait(self, event):
        self.log.append(("wait", event))


@pytest.mark.parametrize("slots_n,blocks", [(3, 7), (2, 5), (1, 4), (3, 2), (3, 1)])
def test_ring_schedule(slots_n, blocks):
    rec = Recorder()
    Ring(slots_n).run(blocks, rec)
    ops = [e for e in rec.log if e[0] != "wait"]
    assert [e[1] for e in ops if e[0] == "compute"] == list(range(blocks))
    first_wait = next(i for i, e in enumerate(rec.log) if e[0] == "wait")
    assert all(e[0] != "wait" for e in rec.log[:first_wait]) and len(ops) == first_wait  # waits last
    for k in range(blocks):
        load = next(e for e in ops if e[:2] == ("load", k))
        assert load[2] == k % slots_n
        assert load[3] == (("store", k - slots_n) if k >= slots_n else None)  # its slot has drained
        assert next(e for e in ops if e[:2] == ("compute", k))[3] == ("load", k)
        assert next(e for e in ops if e[:2] == ("store", k))[3] == ("compute", k)
        if slots_n >= 2 and k + 1 < blocks:  # prefetch: the next load goes out before this compute
            assert ops.index(next(e for e in ops if e[:2] == ("load", k + 1))) < \
                ops.index(next(e for e in ops if e[:2] == ("compute", k)))


def test_ring_rescues_the_block_that_raised_and_waits_for_everything_in_flight():
    rec = Recorder(fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        Ring(3).run(6, rec)
    issued = [e[:2] for e in rec.log if e[0] != "wait"]
    assert ("rescue", 2) in issued and ("load", 4) not in issued  # nothing new after the stop
    waited = {e[1] for e in rec.log if e[0] == "wait"}
    assert {("store", 0), ("store", 1), ("rescue", 2), ("load", 3)} <= waited
    with pytest.raises(ValueError):
        Ring(0)


class FakeCuda:
    """Enough of ``torch.cuda`` for engines/slots.py, logging instead of running on a GPU."""

    def __init__(self):
        self.log, self.compute = [], None
        fake = self

        class Stream:
            count = 0

            def __init__(self, device=None, name=None):
                if name is None:
                    Stream.count += 1
                self.name = name or f"side{Stream.count}"
                self.last = None

            def wait_event(self, event):
                fake.log.append(("wait_event", self.name, event.tag))

            def synchronize(self):
                fake.log.append(("host_sync", self.name))

        class Event:
            def record(self, stream):
                self.tag = (stream.name, stream.last)
                fake.log.append(("record", self.tag))

            def synchronize(self):
                fake.log.append(("host_sync", self.tag))

        self.Stream, self.Event = Stream, Event
        self.compute = Stream(name="compute")
        self.current = self.compute

    def current_stream(self, device=None):
        return self.current

    @contextlib.contextmanager
    def stream(self, s):
        prev, self.current = self.current, s
        try:
            yield
        finally:
            self.current = prev

    def op(self, what):
        self.current.last = what
        self.log.append(("op", self.current.name, what))


def cuda_mode(monkeypatch, engine, fake):
    """The engine's streamer switched to the CUDA executor with fake streams (CPU tensors)."""
    st = engine.streamer
    st.cuda, st.inplace, st.tier_is_master, st.threads = True, False, False, False
    st.ring = Ring(3)
    proxy = types.SimpleNamespace(**{k: getattr(torch, k) for k in ("empty", "Tensor")}, cuda=fake)
    monkeypatch.setattr(slots, "torch", proxy)
    fill, drain, bind = st.fill, st.drain, st.bind
    monkeypatch.setattr(st, "fill", lambda slot, j: (fake.op(("fill", j)), fill(slot, j))[1])
    monkeypatch.setattr(st, "drain", lambda slot, j, u: (fake.op(("drain", j)), drain(slot, j, u))[1])
    monkeypatch.setattr(st, "bind", lambda slot, u: (fake.op(("compute", u.block)), bind(slot, u))[1])


def test_cuda_executor_orders_copies_with_events_and_syncs_once_per_pass(monkeypatch):
    ref = train("in-memory", steps=3, model=tiny_model("opt", seed=3, num_hidden_layers=5))
    model, tok = tiny_model("opt", seed=3, num_hidden_layers=5)
    fake = FakeCuda()
    opt = ZOOptimizer(model, lr=1e-2, eps=1e-2, engine="offload", offload_to="cpu", seed=5,
                      defer_update=True)
    cuda_mode(monkeypatch, opt.engine, fake)
    scorer = CandidateScorer(model, tok, max_length=64)
    opt.search_closures = None
    losses = [opt.step(lambda b=batch(s): scorer.classification_loss(b)) for s in range(3)]
    opt.flush()
    got = (losses, {n: p.detach().clone() for n, p in model.named_parameters()})
    assert same(ref[:2], got)  # the slots carried the blocks there and back
    log = fake.log
    passes, current = [], []
    for entry in log:
        current.append(entry)
        if entry[0] == "host_sync":
            passes.append(current)
            current = []
    assert len(passes) == 4 and not current  # 3 steps + the flush: one host wait each, at the end
    for p in passes:
        ops = [e for e in p if e[0] == "op"]
        assert [e[2] for e in ops if e[2][0] == "compute"] == [("compute", j) for j in range(5)]
        streams = {e[2]: e[1] for e in ops}
        assert {streams[("fill", j)] for j in range(5)} == {"side1"}  # the copy stream
        assert {streams[("drain", j)] for j in range(5)} == {"side2"}  # the drain stream
        assert {streams[("compute", j)] for j in range(5)} == {"compute"}
        waits = [(e[1], e[2][1]) for e in p if e[0] == "wait_event"]
        for j in range(5):
            assert ("compute", ("fill", j)) in waits  # compute j waits for its fill
            assert ("side2", ("compute", j)) in waits  # drain j waits for compute j
            if j >= 3:  # fill j reuses the slot of block j - 3: after its drain
                assert ("side1", ("drain", j - 3)) in waits
                at = lambda e: p.index(e)  # noqa: E731
                fill_at = at(("op", "side1", ("fill", j)))
                assert at(("wait_event", "side1", ("side2", ("drain", j - 3)))) < fill_at
        assert p[-1][0] == "host_sync" and sum(e[0] == "host_sync" for e in p) == 1


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: runs the offload engine's CUDA slot pipeline "
                           "(engines/slots.py _Cuda: pinned host tier, copy and drain streams)")
@pytest.mark.parametrize("transfer", [None, "bf16"])
def test_offload_to_cpu_on_cuda_equals_in_memory_on_cuda(transfer):
    def run(engine, **options):
        model, tok = tiny_model("llama", seed=3)
        if engine == "in-memory":
            model.cuda()
        scorer = CandidateScorer(model, tok, max_length=64)
        scorer.runner.device = torch.device("cuda")
        opt = ZOOptimizer(model, lr=1e-2, eps=1e-2, engine=engine, seed=5, **options)
        losses = [opt.step(lambda b=batch(s): scorer.classification_loss(b)) for s in range(4)]
        opt.flush()
        return losses, {n: p.detach().cpu().clone() for n, p in model.named_parameters()}

    ref = run("in-memory")
    got = run("offload", offload_to="cpu", device="cuda", transfer_dtype=transfer,
              low_precision_probes="keep")
    if transfer is None:
        assert same(ref, got)
    else:
        assert all(abs(a - b) < 5e-2 for a, b in zip(ref[0], got[0]))
