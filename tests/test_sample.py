"""Sampling from a store: determinism (invariant 6), access isolation (invariant 4), errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from cdm.app import api
from cdm.store.data import load_builtin
from cdm.errors import DataError, Forbidden, StoreError
from cdm.sampling.pipeline import CDMPipeline, PipelineCache
from cdm.sampling.settings import SamplingSettings
from cdm.training.kinds import plan, saw
from cdm.sampling.policy import Policy

from .conftest import make_store


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    path = tmp_path_factory.mktemp("trained") / "s"
    s = make_store(path, digits, "by-class:3")
    api.train(s, paragon=True)
    s.close()
    return path


def _copy(trained, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(trained, dst)
    return api.Store.open(dst)


@pytest.mark.parametrize("router", ["ito", "classifier", "uniform"])
def test_same_seed_same_samples_bit_for_bit(trained, router):
    s = api.Store.open(trained)
    a = api.sample(s, 6, "3", None, router, steps=8, seed=5)
    b = api.sample(s, 6, "3", None, router, steps=8, seed=5)
    c = api.sample(s, 6, "3", None, router, steps=8, seed=6)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.attribution, b.attribution)
    assert np.array_equal(a.final, b.final) and not np.array_equal(a.images, c.images)
    assert np.allclose(a.attribution.sum(1), 1.0) and np.allclose(a.final.sum(1), 1.0)
    assert a.compartments == ["digits-0", "digits-1", "digits-2"]
    # label 3 lives only in digits-0 (3 mod 3 == 0): every weight goes there
    assert np.array_equal(a.final[:, 0], np.ones(6))


@pytest.mark.parametrize("router", ["ito", "classifier"])
def test_access_isolation_outside_files_present_deleted_or_corrupted(trained, tmp_path, router):
    s = _copy(trained, tmp_path)
    allow = ["digits-0", "digits-1"]
    ref = api.sample(s, 5, None, allow, router, steps=6, seed=1)
    outside = s.model_dir("digits-2")
    weights = outside / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"garbage" * 100)
    (outside / "config.json").write_text("{not json")
    corrupted = api.sample(s, 5, None, allow, router, steps=6, seed=1)
    shutil.rmtree(outside)
    deleted = api.sample(s, 5, None, allow, router, steps=6, seed=1)
    for g in (corrupted, deleted):
        assert np.array_equal(g.images, ref.images) and np.array_equal(g.attribution, ref.attribution)
    with pytest.raises(StoreError, match="'digits-2'.*missing or corrupted"):
        api.sample(s, 2, None, None, router, steps=4)


def test_restricted_composition_differs_from_full_and_paragon_samples(trained):
    s = api.Store.open(trained)
    full = api.sample(s, 4, None, None, "ito", steps=6, seed=2)
    part = api.sample(s, 4, None, ["digits-1"], "ito", steps=6, seed=2)
    par = api.sample(s, 4, None, None, steps=6, seed=2, paragon=True)
    assert part.compartments == ["digits-1"] and np.array_equal(part.attribution, np.ones((4, 1)))
    assert not np.array_equal(full.images, part.images)
    assert par.attribution is None and par.images.shape == (4, 8, 8, 1)


def test_per_sample_labels_and_guidance_one(trained):
    s = api.Store.open(trained)
    g = api.sample(s, 3, ["1", "2", "3"], None, "ito", steps=5, guidance=1.0)
    assert g.labels == ["1", "2", "3"]
    assert list(g.final.argmax(1)) == [1, 2, 0]  # the compartment that holds each label


def test_sampling_errors(trained, tmp_path, digits):
    s = _copy(trained, tmp_path)
    with pytest.raises(StoreError, match="unknown compartment.*nope"):
        api.sample(s, 2, allow=["digits-0", "nope"])
    with pytest.raises(DataError, match="label '4' is in none of the composed compartments"):
        api.sample(s, 2, "4", ["digits-0", "digits-2"])  # 4 lives in digits-1
    with pytest.raises(DataError, match="unknown label"):
        api.sample(s, 2, "42")
    with pytest.raises(DataError, match="n must be positive"):
        api.sample(s, 0)
    with pytest.raises(StoreError, match="allowed set of compartments is empty"):
        api.sample(s, 2, allow=[])
    with pytest.raises(DataError, match="needs the stochastic ddpm sampler"):
        api.sample(s, 2, router="ito", sampler="ddim", steps=4)
    g = api.sample(s, 2, "3", router="classifier", sampler="ddim", steps=4)  # deterministic is fine there
    assert g.images.shape == (2, 8, 8, 1)
    with pytest.raises(DataError, match="unknown router"):
        api.sample(s, 2, router="magic")
    api.ingest(s, "late", load_builtin("digits", "test")[:10], "one")
    with pytest.raises(StoreError, match="'late' is not trained"):
        api.sample(s, 2, steps=4)
    with pytest.raises(StoreError, match="classifier router is stale"):
        api.sample(s, 2, allow=["digits-0"], router="classifier", steps=4)
    ok = api.sample(s, 2, allow=["digits-0"], router="ito", steps=4)  # ito needs nothing but the models
    assert ok.images.shape == (2, 8, 8, 1)


def test_sparse_settings_through_the_api(trained):
    s = api.Store.open(trained)
    dense = api.sample(s, 6, None, None, "ito", steps=6, seed=3)
    every = api.sample(s, 6, None, None, "ito", steps=6, seed=3, subset=3, prune=float("inf"))
    assert np.array_equal(dense.images, every.images) and np.array_equal(dense.attribution, every.attribution)
    one = api.sample(s, 6, None, None, "ito", steps=6, seed=3, subset=1)
    assert one.evaluations == 6 * 6 and dense.evaluations == 3 * 6 * 6
    assert ((one.attribution == 0) | (one.attribution == 1)).all()  # one compartment per sample throughout
    two = api.sample(s, 6, None, None, "ito", steps=6, seed=3, subset=2, commit=0.5)
    assert 6 * 6 < two.evaluations < 2 * 6 * 6 and (two.final.max(1) == 1).all()
    again = api.sample(s, 6, None, None, "ito", steps=6, seed=3, subset=2, commit=0.5)  # invariant 6: the draws
    assert np.array_equal(two.images, again.images) and np.array_equal(two.attribution, again.attribution)
    other = api.sample(s, 6, None, None, "ito", steps=6, seed=4, subset=2, commit=0.5)
    assert not np.array_equal(two.attribution, other.attribution)
    for bad, match in [(dict(subset=0), "subset must be"), (dict(subset=1.5), "subset must be"),
                       (dict(commit=2.0), "commit must be"), (dict(prune=-1.0), "prune must be")]:
        with pytest.raises(DataError, match=match):  # bad arguments: a DataError (cdm.errors), exit 2 / HTTP 422
            api.sample(s, 2, steps=4, **bad)


# the pipeline: load once, sample many times ------------------------------------------------


def test_a_loaded_pipeline_reads_nothing_from_the_store_per_call(trained, tmp_path):
    s = _copy(trained, tmp_path)
    pipe = CDMPipeline.from_store(s, ["digits-0", "digits-1"], router="ito")
    want = api.sample(s, 4, "1", ["digits-0", "digits-1"], "ito", steps=5, seed=2)
    s.close()  # any registry read would now fail...
    shutil.rmtree(tmp_path / "copy" / "models")  # ...and so would any model file read or digest check
    for _ in range(2):
        g = pipe(4, "1", SamplingSettings(steps=5, seed=2))
        assert np.array_equal(g.images, want.images) and np.array_equal(g.attribution, want.attribution)
    with pytest.raises(DataError, match="n must be positive"):
        pipe(0)


def test_pipeline_cache_follows_the_registry_generation(trained, tmp_path, digits):
    s = _copy(trained, tmp_path)
    cache = PipelineCache()
    a = cache.get(s, ["digits-0"], router="uniform")
    assert cache.get(s, ["digits-0"], router="uniform") is a  # nothing changed: the same loaded pipeline
    assert cache.get(s, ["digits-0"], router="ito") is not a
    gen = s.generation()
    api.ingest(s, "late", digits[:5], "one")  # a registry change: pipelines of older generations are dropped
    assert s.generation() > gen
    b = cache.get(s, ["digits-0"], router="uniform")
    assert b is not a and len(cache.lru) == 1


def test_policy_is_resolved_by_the_pipeline(trained, tmp_path):
    s = _copy(trained, tmp_path)
    pol = Policy.parse('[users.bob]\ncompartments = ["digits-1", "digits-2"]\nrouters = ["ito"]\n')
    pipe = CDMPipeline.from_store(s, user="bob", policy=pol)
    assert pipe.names == ["digits-1", "digits-2"]
    for kw, match in [(dict(router="uniform"), "user 'bob' may not use the uniform router"),
                      (dict(allow=["digits-0"]), "user 'bob' may not use: digits-0")]:
        with pytest.raises(Forbidden, match=match):
            CDMPipeline.from_store(s, user="bob", policy=pol, **kw)
    with pytest.raises(Forbidden) as e:  # what a client over HTTP is told names nothing
        pol.resolve(s, "bob", "ito", ["digits-0", "no-such"], reveal=False)
    assert str(e.value) == "this key may not use the requested compartment(s)"


def test_one_plan_says_what_saw_an_item_and_what_to_rebuild(trained, tmp_path):
    s = _copy(trained, tmp_path)
    item = s.items("digits-1")[0]
    assert saw(s, [item]) == ["digits-1", "paragon", "router"]
    assert plan(s, ["digits-0", "digits-1", "paragon", "router"]) == []  # all up to date
    s.db.execute("DELETE FROM models WHERE name IN ('digits-1', 'router')")
    assert plan(s, ["router", "paragon", "digits-1", "digits-0"]) == ["digits-1", "router"]  # in training order
    assert api.plan(s) == ["digits-1", "router"]  # `cdm train` asks the same function


def test_sampling_precision_is_a_setting(trained):
    """Issue 28: bf16 autocast sampling runs on a CPU too, deterministically, close to fp32 and
    not equal to it; `auto` is fp32 on a CPU; tf32 needs CUDA."""
    s = api.Store.open(trained)
    kw = dict(n=6, label="4", router="ito", steps=6, seed=2)
    fp, auto = api.sample(s, precision="fp32", **kw), api.sample(s, **kw)
    bf = [api.sample(s, precision="bf16", **kw) for _ in range(2)]
    assert np.array_equal(fp.images, auto.images) and np.array_equal(bf[0].images, bf[1].images)
    assert not np.array_equal(fp.images, bf[0].images)
    assert np.abs(fp.images.astype(int) - bf[0].images.astype(int)).mean() < 16  # of 255
    assert np.abs(fp.attribution - bf[0].attribution).max() < 0.1
    with pytest.raises(DataError, match="tf32 needs a CUDA device"):
        api.sample(s, precision="tf32", **kw)
    with pytest.raises(DataError, match="unknown precision"):
        api.sample(s, precision="fp16", **kw)
    from cdm.sampling.policy import Policy, new_key
    from cdm.serving.config import ServeConfig
    from cdm.serving.routes import create_app

    policy = Policy.parse(f'[users.a]\nsources = ["digits"]\nkeys = ["{new_key()[1]}"]\n')
    with pytest.raises(DataError, match="tf32 needs a CUDA device"):  # `cdm serve --precision`: refused at start
        create_app(trained, policy, ServeConfig(precision="tf32"))
