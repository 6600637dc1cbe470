"""Training: determinism, isolation (invariant 1), diffusers round trip, resume, SISA checkpoints."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from cdm.app import api
from cdm.store.data import SplitRule, assign_slice
from cdm.errors import DataError, StoreError

from .conftest import digests, make_store, noise_item


def test_training_is_deterministic(tmp_path, digits):
    a = make_store(tmp_path / "a", digits)
    b = make_store(tmp_path / "b", digits)
    ra = api.train(a, paragon=True)
    api.train(b, paragon=True)
    assert [r.name for r in ra] == ["digits-0", "digits-1", "digits-2", "paragon", "router"]
    assert digests(a) == digests(b)
    assert len(set(digests(a).values())) == 5
    assert api.train(a, paragon=True) == []  # everything up to date: nothing retrained


def test_isolation_changing_an_item_of_b_leaves_a_bit_identical(tmp_path, digits):
    a = make_store(tmp_path / "a", digits)
    rows = a.items()
    victim = next(r for r in rows if r.compartment == "digits-1")
    changed = []
    for d in digits:
        if d.hash == victim.hash:  # replace one item of digits-1 by another image in digits-1
            seed = 0
            while True:
                cand = noise_item(seed, d.label)
                if SplitRule.parse("iid:3").assign("digits", cand.hash, 0, a.config.seed) == "digits-1":
                    break
                seed += 1
            changed.append(cand)
        else:
            changed.append(d)
    b = make_store(tmp_path / "b", changed)
    api.train(a, router=False)
    api.train(b, router=False)
    da, db = digests(a), digests(b)
    assert da["digits-0"] == db["digits-0"] and da["digits-2"] == db["digits-2"]
    assert da["digits-1"] != db["digits-1"]


def test_compartment_folder_is_a_plain_diffusers_folder(tmp_path, digits):
    s = make_store(tmp_path / "s", digits[:40], "one")
    api.train(s)
    folder = s.model_dir("digits")
    unet = UNet2DModel.from_pretrained(folder)  # diffusers alone
    sched = DDPMScheduler.from_pretrained(folder)
    ours = api.load_unet(s, "digits")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([3, 16])
    plain, kept = unet.state_dict(), ours.state_dict()
    assert plain.keys() == kept.keys() and all(torch.equal(plain[k], kept[k]) for k in plain)  # the same weights
    assert ours.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # kept channels-last for speed
    with torch.no_grad():  # so the convolutions may round differently
        assert torch.allclose(unet(x, t, class_labels=y).sample, ours(x, t, class_labels=y).sample, atol=1e-5)
    assert sched.config.num_train_timesteps == 1000 and (folder / "cdm.json").exists()


def test_interrupted_training_resumes_bit_identically(tmp_path, digits):
    ref = make_store(tmp_path / "ref", digits[:60], "one")
    api.train(ref)
    s = make_store(tmp_path / "s", digits[:60], "one")

    class Stop(Exception):
        pass

    def stop_at_18(name, done, total, loss):
        if done == 18:  # stage 1 (of 2, 12 steps each), after its step-4 resume file
            raise Stop

    with pytest.raises(Stop):
        api.train(s, progress=stop_at_18)
    assert s.model("digits") is None  # nothing half-trained is live
    assert (tmp_path / "s" / "work" / "digits" / "resume.pt").exists()
    (r,) = api.train(s)
    assert r.resumed_from == "step 4 of stage 1" and r.steps == 8
    assert digests(s) == digests(ref)
    assert not (tmp_path / "s" / "work" / "digits" / "resume.pt").exists()
    assert not list((tmp_path / "s" / "models" / "digits").glob(".tmp-*"))


def test_sisa_checkpoints_and_stage_reuse(tmp_path, digits):
    s = make_store(tmp_path / "s", digits[:60], "one", slices=3)
    api.train(s)
    ckpts = sorted(p.name for p in (tmp_path / "s" / "checkpoints" / "digits").iterdir())
    assert [c.split("-")[1] for c in ckpts] == ["0", "1", "2"]
    # adding an item whose slice is k restarts from the checkpoint of stage k-1
    extra = next(noise_item(i) for i in range(100) if assign_slice(noise_item(i).hash, 3, 0) == 2)
    api.ingest(s, "digits", [extra], "one")
    (r,) = api.train(s)
    assert r.resumed_from == "stage 1" and r.steps == 8


def test_steps_option_changes_the_recipe_and_retrains(tmp_path, digits):
    s = make_store(tmp_path / "s", digits[:30], "one")
    api.train(s)
    d1 = digests(s)["digits"]
    assert api.status(s)["compartments"]["digits"]["model"] == "ready"
    (r,) = api.train(s, steps=10)
    assert r.steps == 10 and digests(s)["digits"] != d1
    with pytest.raises(DataError, match="steps must be >= 1"):
        api.train(s, steps=0)
    with pytest.raises(StoreError, match="unknown compartment"):
        api.train(s, compartments=["nope"])


def test_an_epoch_budget_scales_steps_with_each_models_items(tmp_path, digits):
    from dataclasses import replace

    from .conftest import TINY, TINY_ROUTER

    s = api.init_store(tmp_path / "s", 8, 1, 0, 2, 16, replace(TINY, epochs=4, min_steps=2), TINY_ROUTER)
    api.ingest(s, "big", digits[:60], "one")
    api.ingest(s, "small", digits[60:70], "one")
    api.train(s, paragon=True, router=False)
    steps = {n: m.info["steps"] for n, m in s.models().items()}
    assert steps == {"big": 15, "small": 3, "paragon": 18}  # ceil(4 x items / 16), capped at 24
    # an epoch-budgeted model is the model of that fixed step count, bit for bit
    f = api.init_store(tmp_path / "f", 8, 1, 0, 2, 16, replace(TINY, steps=15), TINY_ROUTER)
    api.ingest(f, "big", digits[:60], "one")
    api.train(f, router=False)
    assert f.model("big").digest == s.model("big").digest and f.model("big").spec == s.model("big").spec
    with pytest.raises(DataError, match="epochs must be >= 0"):
        api.train(s, epochs=-1)
    api.train(s, epochs=0, paragon=True, router=False)  # back to a fixed count: every model retrains at 24 steps
    assert {m.info["steps"] for m in s.models().values()} == {24}


def test_training_precision_is_in_the_recipe_and_bf16_is_exact_too(tmp_path, digits):
    """Issue 28: precision is part of the recipe and the spec. The first run records what
    `auto` became (fp32 on a CPU; old specs unchanged); bf16 autocast trains deterministically
    to other weights, and forgetting under it is still bit-identical; tf32 needs CUDA."""
    from cdm.errors import DataError
    from cdm.models.precision import resolve
    from cdm.training.forget import forget

    items = digits[:40]
    fp = make_store(tmp_path / "fp", items, "iid:2")
    assert api.train_config(fp).precision == "auto"
    api.train(fp)
    assert api.train_config(fp).precision == "fp32"
    assert not any("train.precision" in e["detail"] for e in fp.events() if e["kind"] == "config")  # auto was fp32
    bf = [make_store(tmp_path / f"bf{i}", items, "iid:2") for i in range(2)]
    for s in bf:
        api.train(s, precision="bf16")
    assert digests(bf[0]) == digests(bf[1]) and digests(bf[0])["digits-0"] != digests(fp)["digits-0"]
    victim = bf[0].items("digits-0")[0]
    forget(bf[0], items=[victim.hash])
    ref = make_store(tmp_path / "ref", [it for it in items if it.hash != victim.hash], "iid:2")
    api.train(ref, precision="bf16")
    assert digests(bf[0]) == digests(ref)
    with pytest.raises(DataError, match="tf32 needs a CUDA device"):
        api.train(fp, precision="tf32")
    assert api.train_config(fp).precision == "fp32" and api.model_state(fp, "digits-0") == "ready"
    retrained = {r.name for r in api.train(fp, precision="bf16")}  # a recipe change: every model is stale
    assert [e["detail"] for e in fp.events() if e["kind"] == "config"][-1] == {"train.precision": "bf16"}
    assert retrained >= {"digits-0", "digits-1"} and digests(fp) == digests(bf[1])
    assert (resolve("auto", "cuda"), resolve("auto", "cpu"), resolve("tf32", "cuda:1")) == ("bf16", "fp32", "tf32")
