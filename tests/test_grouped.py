"""Grouped model calls (cdm.grouped): equal to separate calls within float rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdm import api
from cdm.grouped import Group, grouped_joint
from cdm.models import build_unet, unet_config
from cdm.pipeline import CDMPipeline, SamplingSettings
from cdm.store import StoreError

from .conftest import make_store


def test_a_group_computes_what_each_model_computes():
    unets = [build_unet(unet_config("tiny", 8, 1, 10), seed).eval() for seed in range(3)]
    gen = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(5, 1, 8, 8, generator=gen), torch.randint(0, 1000, (5,), generator=gen), torch.arange(5)
    with torch.inference_mode():
        each = torch.stack([u(x, t, class_labels=c).sample for u in unets], dim=1)
        separate = []  # models called one by one
        dens = [lambda x, t, c, u=u: separate.append(u) or u(x, t, class_labels=c).sample for u in unets]
        joint = grouped_joint(Group(unets), dens)
        torch.testing.assert_close(joint(x, t, c, None), each, rtol=1e-4, atol=1e-5)
        keep = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)
        unused = keep & torch.tensor([True, False, True])  # a sparse step that runs two of the three models
        for k in (keep, unused):  # just the kept rows, in one padded call; zero elsewhere
            torch.testing.assert_close(joint(x, t, c, k), torch.where(k[..., None, None, None], each, 0.0),
                                       rtol=1e-4, atol=1e-5)
        assert separate == []
        few = grouped_joint(Group(unets), dens, max_rows=1)  # busier than max_rows: separate calls, bit for bit
        assert torch.equal(few(x, t, c, keep), torch.where(keep[..., None, None, None], each, 0.0))
        assert separate == unets
    with pytest.raises(ValueError, match="architectures"):
        Group([unets[0], build_unet(unet_config("small", 8, 1, 10), 0)])


def test_grouped_sampling_equals_the_default_within_rounding(tmp_path, digits):
    s = make_store(tmp_path / "s", digits[:90], "iid:3")
    api.train(s)
    settings = SamplingSettings(steps=8, seed=3)
    a = CDMPipeline.from_store(s, router="ito")(6, "4", settings)
    b = CDMPipeline.from_store(s, router="ito", grouped=True)(6, "4", settings)
    diff = np.abs(a.images.astype(int) - b.images.astype(int))
    assert diff.max() <= 2 and (diff == 0).mean() > 0.99
    np.testing.assert_allclose(a.attribution, b.attribution, atol=1e-4)
    # sparse steps: the same draw, the kept models in one padded call, within rounding
    sparse = SamplingSettings(steps=8, seed=3, commit=0.0)
    a, b = (CDMPipeline.from_store(s, router="ito", grouped=g)(6, "4", sparse) for g in (False, True))
    diff = np.abs(a.images.astype(int) - b.images.astype(int))
    assert diff.max() <= 2 and (diff == 0).mean() > 0.99 and np.array_equal(a.attribution, b.attribution)
    with pytest.raises(StoreError, match="grouped"):
        CDMPipeline.from_store(s, router="ito", grouped=True, adapter_mode="loop")
