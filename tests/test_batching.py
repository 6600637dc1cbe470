"""Batching model calls across requests (cdm.sampling.batching): a request's bytes alone and batched,
isolation of users' compartments, leaving mid-way, and the fixed-size chunks it relies on."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from cdm.app import api
from cdm.sampling.batching import Batcher, BatchedJoint, chunked, model_key, sampler_thread
from cdm.models.denoisers import unet_denoiser
from cdm.models.grouped import Group
from cdm.sampling.mixture import Routes
from cdm.models.nets import build_unet
from cdm.models.presets import unet_config
from cdm.sampling.pipeline import CDMPipeline
from cdm.sampling.settings import SamplingSettings

from .conftest import make_store


class Recording(Batcher):
    """A batcher that notes which models each thread's calls went to."""

    def __init__(self, chunk: int, group_chunk: int = 8):
        super().__init__(chunk, group_chunk)
        self.seen: dict[str, set[int]] = {}

        self.groups: dict[str, set[int]] = {}  # the groups each thread's grouped calls went to
        self.wide = 0  # grouped calls made

    def run(self, calls):
        self.seen.setdefault(threading.current_thread().name, set()).update(id(model_key(d)) for d, *_ in calls)
        self.groups.setdefault(threading.current_thread().name, set()).update(id(c[4][0]) for c in calls if len(c) > 4)
        return super().run(calls)

    def _grouped(self, *args):
        self.wide += 1
        return super()._grouped(*args)


def alone_then_together(b: Batcher, jobs: list) -> tuple[list, list]:
    """Each (pipeline, n, label, settings) sampled alone through `b`, then all at once on
    threads named req-i: (alone, together)."""

    def one(job):
        pipe, n, label, settings = job
        with b.session():
            return pipe(n, label, settings, batcher=b)

    alone = [one(job) for job in jobs]
    assert b.shared == 0
    got: dict[int, object] = {}
    threads = [threading.Thread(target=lambda i=i: got.update({i: one(jobs[i])}), name=f"req-{i}")
               for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert b.shared > 0  # requests did share rounds of model calls
    return alone, [got[i] for i in range(len(jobs))]


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits):
    s = make_store(tmp_path_factory.mktemp("batching") / "s", digits[:120], "iid:4")
    api.train(s, paragon=True)
    return s


def test_a_row_does_not_depend_on_its_company_within_a_chunk():
    den = unet_denoiser(build_unet(unet_config("small", 16, 1, 10), 0).eval())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 1, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (20,), generator=gen)
    c = torch.randint(0, 11, (20,), generator=gen)
    with torch.inference_mode():
        alone = chunked(den, x[:3], t[:3], c[:3], 8)
        order = torch.cat([torch.arange(5, 9), torch.arange(3), torch.arange(10, 20)])
        crowd = chunked(den, x[order], t[order], c[order], 8)
        assert torch.equal(crowd[4:7], alone)  # rows 0-2 at positions 4-6 among others
        assert torch.equal(chunked(den, x, t, c, 8)[:3], alone)  # and at positions 0-2 of a full chunk


def test_requests_give_the_same_bytes_alone_and_batched(store):
    full = CDMPipeline.from_store(store, router="ito")
    left = CDMPipeline.from_store(store, ["digits-0", "digits-1"], router="ito")
    right = CDMPipeline.from_store(store, ["digits-2", "digits-3"], router="classifier")
    paragon = CDMPipeline.from_store(store, paragon=True)
    jobs = [(full, 4, "3", SamplingSettings(steps=8, seed=1)),
            (left, 3, None, SamplingSettings(steps=6, seed=2, commit=0.0)),
            (right, 2, "5", SamplingSettings(steps=8, seed=3, guidance=1.0, sampler="ddim")),
            (paragon, 5, "1", SamplingSettings(steps=8, seed=4)),
            (full, 3, "7", SamplingSettings(steps=5, seed=5, prune=2.0)),
            (full, 2, None, SamplingSettings(steps=8, seed=6, subset=2))]
    b = Recording(chunk=8)
    alone, got = alone_then_together(b, jobs)
    for i, (a, g) in enumerate(zip(alone, got)):
        assert np.array_equal(a.images, g.images), i
        assert a.compartments == g.compartments == jobs[i][0].names
        if a.attribution is not None:
            assert np.array_equal(a.attribution, g.attribution) and np.array_equal(a.final, g.final)
        # each request's rows went only to the models of its own composition
        assert b.seen[f"req-{i}"] <= {id(model_key(d)) for d in jobs[i][0].denoisers}
    # and the plain (unbatched) path samples the same images here
    assert np.array_equal(jobs[0][0](*jobs[0][1:]).images, alone[0].images)
    b.close()


def test_grouped_requests_give_the_same_bytes_alone_and_batched(store):
    """Wide calls of a fixed shape (cdm serve --grouped): a request's bytes do not depend on
    its company, and its rows only ever go to its own composition's group."""
    full = CDMPipeline.from_store(store, router="ito", grouped=True)
    left = CDMPipeline.from_store(store, ["digits-0", "digits-1"], router="ito", grouped=True)
    plain = CDMPipeline.from_store(store, ["digits-2", "digits-3"], router="ito")  # separate calls beside them
    assert full.group is CDMPipeline.from_store(store, router="uniform", grouped=True).group  # shared, not rebuilt
    jobs = [(full, 4, "3", SamplingSettings(steps=8, seed=1, commit=0.0)),
            (full, 3, None, SamplingSettings(steps=6, seed=2)),
            (left, 5, "5", SamplingSettings(steps=8, seed=3, subset=1)),
            (plain, 2, "1", SamplingSettings(steps=8, seed=4)),
            (full, 2, "7", SamplingSettings(steps=5, seed=5, prune=2.0))]
    b = Recording(chunk=8, group_chunk=3)
    alone, got = alone_then_together(b, jobs)
    assert b.wide > 0
    for i, (a, g) in enumerate(zip(alone, got)):
        assert np.array_equal(a.images, g.images), i
        assert np.array_equal(a.attribution, g.attribution) and np.array_equal(a.final, g.final)
        assert b.seen[f"req-{i}"] <= {id(model_key(d)) for d in jobs[i][0].denoisers}
        assert b.groups[f"req-{i}"] == (set() if jobs[i][0].group is None else {id(jobs[i][0].group)})
    # within float rounding of the plain grouped path (a different shape of call)
    diff = np.abs(jobs[0][0](*jobs[0][1:]).images.astype(int) - alone[0].images.astype(int))
    assert diff.max() <= 2 and (diff == 0).mean() > 0.99
    b.close()


def test_rows_beyond_a_slot_wait_for_the_next_round():
    """A wide call has one slot per model of group_chunk rows, given to the models with the
    most rows waiting; the rest go in later rounds, and each row's result is what a wide call
    of that shape gives it, whichever slot and round it falls in."""
    unets = [build_unet(unet_config("tiny", 8, 1, 10), seed).eval() for seed in range(3)]
    group = Group(unets)
    gen = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, 1000, (6,), generator=gen), torch.arange(6)
    dens = [unet_denoiser(u) for u in unets]
    b = Batcher(chunk=4, group_chunk=2)
    with b.session():  # model 0: 5 rows, all 3 slots of round 1; model 2: 1 row, round 2; model 1: idle
        got = b.run([(dens[0], x[:5], t[:5], c[:5], (group, 0)), (dens[2], x[5:], t[5:], c[5:], (group, 2))])
    assert (b.rounds, b.calls) == (2, 2)
    with torch.inference_mode():  # the same rows, each in some wide call of 3 slots x 2 rows
        alone = group(torch.stack([x[[4, 4]], x[[0, 1]], x[[5, 5]]]), torch.stack([t[[4, 4]], t[[0, 1]], t[[5, 5]]]),
                      torch.stack([c[[4, 4]], c[[0, 1]], c[[5, 5]]]), [0, 1, 2])
        last = group(torch.stack([x[[2, 3]], x[[2, 3]], x[[2, 3]]]), torch.stack([t[[2, 3]]] * 3),
                     torch.stack([c[[2, 3]]] * 3))
    assert torch.equal(got[0][4], alone[0, 0]) and torch.equal(got[1][0], alone[2, 0])
    assert torch.equal(got[0][2:4], last[0])
    b.close()


def test_an_older_requests_rows_go_first():
    """b enters its session after a but hands over its rows first: a's rows still fill the
    wide call first, and b's wait (2 slots of 2 rows; 4 + 2 rows for one model)."""
    unets = [build_unet(unet_config("tiny", 8, 1, 10), seed).eval() for seed in range(2)]
    group, den = Group(unets), unet_denoiser(unets[0])
    x, t, c = torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    seen: list[set[str]] = []

    class Logging(Batcher):
        def _grouped(self, group, calls, done, owners):
            super()._grouped(group, calls, done, owners)
            names = {th.ident: th.name for th in threading.enumerate()}
            seen.append({names[o] for o in owners})

    b = Logging(chunk=4, group_chunk=2)
    a_in = threading.Event()

    def older():
        with b.session():
            a_in.set()
            while not b._waiting:  # until b has handed over its rows
                time.sleep(0.01)
            b.run([(den, x, t, c, (group, 0))])

    def younger():
        a_in.wait()
        with b.session():
            b.run([(den, x[:2], t[:2], c[:2], (group, 0))])

    threads = [threading.Thread(target=older, name="a"), threading.Thread(target=younger, name="b")]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    b.close()
    assert seen == [{"a"}, {"b"}]


def test_the_batchers_thread_keeps_its_thread_count():
    """torch applies the count last set on any thread at a thread's first parallel op; the
    batcher's compute thread must keep its own when samplers then set theirs to one."""
    den = unet_denoiser(build_unet(unet_config("tiny", 8, 1, 10), 0).eval())
    seen = []

    def counting(x, t, c):
        seen.append(torch.get_num_threads())
        return den(x, t, c)

    before = torch.get_num_threads()
    b = Batcher(chunk=4, threads=2)
    th = threading.Thread(target=sampler_thread)
    th.start()
    th.join()
    try:
        with b.session():
            b.run([(counting, torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long),
                    torch.zeros(2, dtype=torch.long))])
    finally:
        torch.set_num_threads(before)
        b.close()
    assert seen == [2]


def test_a_request_that_stops_does_not_stall_or_change_the_others(store):
    pipe = CDMPipeline.from_store(store, router="ito")
    b = Batcher(chunk=8)
    settings = SamplingSettings(steps=10, seed=7)
    with b.session():
        alone = pipe(3, "2", settings, batcher=b)

    def stop_at_3(step, total):
        if step == 3:
            raise TimeoutError("deadline")

    out, errors = {}, []

    def run(i):
        try:
            with b.session():
                out[i] = pipe(3, "2", settings, callback=stop_at_3 if i == 0 else None, batcher=b)
        except TimeoutError as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads) and len(errors) == 1 and sorted(out) == [1, 2]
    assert all(np.array_equal(out[i].images, alone.images) for i in (1, 2))
    b.close()


def test_batcher_refuses_calls_outside_a_session_and_bad_chunks(store):
    with pytest.raises(ValueError, match="chunk"):
        Batcher(chunk=0)
    with pytest.raises(ValueError, match="group_chunk"):
        Batcher(group_chunk=0)
    with pytest.raises(ValueError, match="threads"):
        Batcher(threads=-1)
    b = Batcher(chunk=4)
    with pytest.raises(RuntimeError, match="session"):
        CDMPipeline.from_store(store, paragon=True)(1, "1", SamplingSettings(steps=2), batcher=b)
    b.close()


@pytest.mark.parametrize("grouped", [False, True])
def test_routed_rows_give_the_same_bytes_as_the_joints_columns(grouped):
    """A committed mixture sends each row to its one model through `routed`: the same model
    calls as the joint makes for that one-hot `keep`, so each row's eps is the same bytes."""
    unets = [build_unet(unet_config("tiny", 8, 1, 10), seed).eval() for seed in range(3)]
    dens = [unet_denoiser(u) for u in unets]
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(7, 1, 8, 8, generator=gen), torch.randint(0, 1000, (7,), generator=gen)
    c, pick = torch.arange(7), torch.tensor([2, 0, 2, 2, 0, 2, 0])  # model 1 idle
    b = Batcher(chunk=4, group_chunk=2)
    joint = BatchedJoint(b, dens, Group(unets) if grouped else None)
    with b.session(), torch.inference_mode():
        columns = joint(x, t, c, torch.nn.functional.one_hot(pick, 3).bool())[torch.arange(7), pick]
        routed = joint.routed(x, t, c, Routes.of(pick, 3))
    b.close()
    assert torch.equal(routed, columns)
    assert Routes.of(pick, 3).counts == [3, 0, 4]
