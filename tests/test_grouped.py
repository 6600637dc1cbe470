"""Grouped model calls (cdm.models.grouped): equal to separate calls within float rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdm.app import api
from cdm.models.denoisers import separate as separate_calls
from cdm.models.grouped import Group, grouped_joint, slot_rows
from cdm.models.nets import build_unet
from cdm.models.presets import text_unet_config, unet_config
from cdm.sampling.pipeline import CDMPipeline
from cdm.sampling.settings import SamplingSettings
from cdm.errors import DataError

from .conftest import make_store


@pytest.mark.parametrize("preset", ["tiny", "small"])  # small: attention, up- and downsamplers
def test_a_group_computes_what_each_model_computes(preset):
    unets = [build_unet(unet_config(preset, 8, 1, 10), seed).eval() for seed in range(3)]
    gen = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(5, 1, 8, 8, generator=gen), torch.randint(0, 1000, (5,), generator=gen), torch.arange(5)
    with torch.inference_mode():
        each = torch.stack([u(x, t, class_labels=c).sample for u in unets], dim=1)
        separate = []  # models called one by one
        dens = [lambda x, t, c, u=u: separate.append(u) or u(x, t, class_labels=c).sample for u in unets]
        group = Group(unets)
        joint = grouped_joint(group, dens)
        torch.testing.assert_close(joint(x, t, c, None), each, rtol=1e-4, atol=1e-5)
        keep = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)
        unused = keep & torch.tensor([True, False, True])  # a sparse step that runs two of the three models
        busy = torch.tensor([[1, 0, 0]] * 4 + [[0, 1, 0]], dtype=torch.bool)  # model 0 in two slots of 2 rows
        assert slot_rows([4, 1], 32) == 2
        for k in (keep, unused, busy):  # just the kept rows, in one call of padded slots; zero elsewhere
            torch.testing.assert_close(joint(x, t, c, k), torch.where(k[..., None, None, None], each, 0.0),
                                       rtol=1e-4, atol=1e-5)
        assert separate == []
        # a slot list with a model twice and another left out: slot g runs model models[g]
        out = group(torch.stack([x[:2], x[2:4], x[3:5]]), torch.stack([t[:2], t[2:4], t[3:5]]),
                    torch.stack([c[:2], c[2:4], c[3:5]]), [2, 0, 2])
        torch.testing.assert_close(out, torch.stack([each[:2, 2], each[2:4, 0], each[3:5, 2]]), rtol=1e-4, atol=1e-5)
        few = grouped_joint(group, dens, max_rows=1)  # busier than max_rows: separate calls, bit for bit
        # (against separate calls on the same rows: a model on 2 rows may round differently from the
        # same model on 5, so `each` is not the reference here on every CPU)
        assert torch.equal(few(x, t, c, keep), separate_calls(dens)(x, t, c, keep))
        separate[len(unets):] = []  # the reference's own calls
        assert separate == unets
        assert torch.equal(few(x, t, c, None), each) and separate == unets * 2  # dense too


def test_slots_trade_padding_against_their_number():
    assert slot_rows([2, 2, 2, 2], 32) == 2  # commit at n = 4 under guidance: a slot per image
    assert slot_rows([8, 2], 32) == 4  # 3 slots of 4 (12 rows) beat 5 of 2 and 2 of 8
    assert slot_rows([30, 30], 32) == 30 and slot_rows([16, 16], 8) == 8  # never more than max_rows
    assert slot_rows([1], 32) == 1


def test_a_rows_result_does_not_depend_on_its_slot_or_company():
    """At a fixed (slots, rows) shape a row's bytes depend only on its model and itself:
    what the batcher's fixed-shape wide calls rely on (cdm.sampling.batching)."""
    unets = [build_unet(unet_config("small", 8, 1, 10), seed).eval() for seed in range(4)]
    group, gen = Group(unets), torch.Generator().manual_seed(1)
    row, outs = torch.randn(1, 8, 8, generator=gen), []
    with torch.inference_mode():
        for trial in range(6):
            models = torch.randint(0, 4, (4,), generator=gen).tolist()
            slot, pos = trial % 4, trial % 2
            models[slot] = 3
            x, t = torch.randn(4, 2, 1, 8, 8, generator=gen), torch.randint(0, 1000, (4, 2), generator=gen)
            c = torch.randint(0, 11, (4, 2), generator=gen)
            x[slot, pos], t[slot, pos], c[slot, pos] = row, 437, 3
            outs.append(group(x, t, c, models)[slot, pos])
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_weights_filled_in_place_give_the_same_bytes_as_stacked_ones():
    """Group(in_place=True) copies just the slots whose model changed into one set of buffers
    (the server's wide calls); results are bit for bit those of freshly stacked weights."""
    unets = [build_unet(unet_config("small", 8, 1, 10), seed).eval() for seed in range(4)]
    group, gen = Group(unets), torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for models in ([0, 1, 2, 3, 0, 1], [0, 0, 2, 3, 3, 1], [2, 2, 2, 2, 2, 2], [3, 0, 1, 2, 1, 0]):
            x, t = torch.randn(6, 2, 1, 8, 8, generator=gen), torch.randint(0, 1000, (6, 2), generator=gen)
            c = torch.randint(0, 11, (6, 2), generator=gen)
            assert torch.equal(group(x, t, c, models, in_place=True), group(x, t, c, models))
            assert group.held(6) == models


def test_only_what_a_group_computes_exactly_is_grouped():
    with pytest.raises(ValueError, match="architectures"):
        Group([build_unet(unet_config("tiny", 8, 1, 10), 0), build_unet(unet_config("small", 8, 1, 10), 0)])
    with pytest.raises(ValueError, match="only class-conditional UNet2DModel"):
        Group([build_unet(text_unet_config("tiny", 8, 1, 16), s) for s in range(2)])
    conf = dict(unet_config("tiny", 8, 1, 10), resnet_time_scale_shift="scale_shift")
    with pytest.raises(ValueError, match="scale-shift"):
        Group([build_unet(conf, s) for s in range(2)])
    conf = dict(unet_config("tiny", 8, 1, 10), down_block_types=("DownBlock2D", "ResnetDownsampleBlock2D"),
                up_block_types=("ResnetUpsampleBlock2D", "UpBlock2D"))
    with pytest.raises(ValueError, match="cannot group a model with a"):
        Group([build_unet(conf, s) for s in range(2)])


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
    with pytest.raises(DataError, match="grouped"):
        CDMPipeline.from_store(s, router="ito", grouped=True, adapter_mode="loop")


def test_forgetting_drops_the_group_from_memory(tmp_path, digits, monkeypatch):
    """A group holds copies of its models' weights. After a forget their digests are no longer
    live: the next load drops every entry holding them (no hook from forgetting into the
    cache), and the next grouped pipeline builds a new group."""
    from cdm.sampling.loading import MODELS

    monkeypatch.chdir(tmp_path)
    (tmp_path / "group").mkdir()  # a cache key is not a path, whatever the working directory holds
    s = make_store(tmp_path / "s", digits[:40], "iid:2")
    api.train(s)
    old = CDMPipeline.from_store(s, router="ito", grouped=True).group
    mine = lambda: [k for k in MODELS.lru.keys() if k[0] == str(s.root.resolve())]  # noqa: E731 (other tests' stores too)
    assert any(k[1].startswith("group:") for k in mine())
    gone = s.model("digits-0").digest
    assert any(gone in k[2] for k in mine())
    api.forget(s, [s.items("digits-0")[0].hash])
    assert CDMPipeline.from_store(s, router="ito", grouped=True).group is not old
    assert not any(gone in k[2] for k in mine())  # neither the group nor the model itself
