"""Evaluation metrics: known answers for the Fréchet distance and memorization, and the
evaluator on a tiny trained store (cached deterministic extractor, forgetting removes it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdm.app import api
from cdm.store.data import load_builtin
from cdm.evaluation.evaluate import (EvalConfig, Evaluator, ExtractorConfig, Features, evaluate_store, frechet_distance,
                          memorization)
from cdm.training.forget import forget
from cdm.errors import StoreError

from .conftest import make_store

FAST = ExtractorConfig(steps=40, batch_size=64)


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * np.array([1.0, 2.0, 0.5]) + np.array([1.0, 0.0, -2.0])
    # diagonal covariances: |mu|^2 + sum (sigma_a - sigma_b)^2 = 5 + (0 + 1 + 0.25)
    assert frechet_distance(a, b) == pytest.approx(6.25, abs=0.1)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_memorization_flags_copies_and_not_novel_images():
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (200, 8, 8, 1), dtype=np.uint8)
    copies = train[:10].copy()
    novel = rng.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    flags = memorization(np.concatenate([copies, novel]), train, alpha=0.5, k=50)
    assert flags[:10].all() and not flags[10:].any()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    s = make_store(tmp_path_factory.mktemp("ev") / "s", digits, "by-class:2")
    api.train(s, paragon=True)
    return s


def test_evaluator_scores_paragon_and_compositions(trained):
    cfg = EvalConfig.with_sampling(samples=40, steps=4, batch_size=40, attribution_samples=20)
    rep = evaluate_store(trained, ["ito", "uniform"], cfg=cfg, extractor=FAST)
    assert [m.name for m in rep.results] == ["paragon", "cdm-2", "cdm-2"]
    for m in rep.results:
        assert np.isfinite(m.fid) and m.fid > 0 and 0 <= m.accuracy <= 1 and 0 <= m.memorized <= 1
    ito = rep.results[1]
    assert ito.compartments == ["digits-0", "digits-1"] and 0 <= ito.attribution_accuracy <= 1
    assert set(ito.memorized_by_compartment) <= {"digits-0", "digits-1"}
    assert rep.results[0].attribution_accuracy is None and np.isfinite(rep.floor)
    again = evaluate_store(trained, ["ito", "uniform"], cfg=cfg, extractor=FAST)
    key = lambda r: [(m.fid, m.accuracy, m.memorized, m.attribution_accuracy) for m in r.results]  # noqa: E731
    assert key(again) == key(rep) and again.floor == rep.floor  # seeded: the same numbers, exactly
    assert "| paragon |" in rep.table() and "floor" in rep.table()


def test_extractor_is_cached_deterministic_and_forgotten(tmp_path, trained, digits):
    other = make_store(tmp_path / "o", digits, "by-class:2")
    w = [Features(s, cfg=FAST).net.state_dict() for s in (trained, other)]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])  # same items and seed: bit-identical
    cached = list((trained.root / "eval" / "extractor").iterdir())
    assert len(cached) == 1 and (cached[0] / "diffusion_pytorch_model.safetensors").exists()
    victim = other.items()[0].hash
    Features(other, cfg=FAST)
    forget(other, items=[victim], retrain=False)
    assert not (other.root / "eval").exists()  # it saw the forgotten item


def test_inception_path_uses_a_torchscript_file(tmp_path, trained):
    class FakeInception(torch.nn.Module):  # the calling convention of inception-2015-12-05.pt
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return x.float().mean(dim=(2, 3)).repeat(1, 4)

    path = tmp_path / "inception.pt"
    torch.jit.script(FakeInception()).save(str(path))
    f = Features(trained, inception=path)
    imgs = np.stack([it.pixels for it in load_builtin("digits", "test")[:5]])
    feats, preds = f(imgs)
    assert feats.shape == (5, 12) and preds is None and f.kind == "inception:inception.pt"
    assert np.allclose(feats[:, 0], imgs.reshape(5, -1).mean(1))
    with pytest.raises(StoreError, match="not found.*never downloads"):
        Features(trained, inception=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(StoreError, match="not a TorchScript Inception file"):
        Features(trained, inception=tmp_path / "junk.pt")


def test_evaluator_rejects_bad_reference(trained):
    with pytest.raises(StoreError, match="held-out"):
        Evaluator(trained, [], extractor=FAST)
