"""Stable Diffusion folders (cdm.training.sd): a tiny random SD folder written by diffusers'
`StableDiffusionPipeline.save_pretrained`, imported, two LoRA compartments trained in its
VAE's latent space, composed with every router, forgotten bit for bit; bad folders refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cdm.app import api
from cdm.store.data import Item
from cdm.training.forget import forget
from cdm.errors import StoreError
from cdm.store.recipes import RouterConfig, TrainConfig
from cdm.models.random_sd import random_folder

from .conftest import digests

SD_TRAIN = TrainConfig(preset="tiny", steps=12, batch_size=8, warmup=2, checkpoint_every=4)
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def tiny_sd_folder(path: Path) -> Path:
    """A random SD folder with every part (as diffusers' own pipeline tests build one)."""
    return random_folder(path, "tiny")


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    return tiny_sd_folder(tmp_path_factory.mktemp("sd") / "sd")


def squares(owner: int, n: int) -> list[Item]:
    rng = np.random.RandomState(owner)
    out = []
    for i in range(n):
        name = list(COLOURS)[(i + owner) % 3]
        px = np.clip(np.array(COLOURS[name])[None, None] + rng.randint(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        out.append(Item(px, None, f"owner{owner}/{i}.png", f"a {name} square"))
    return out


def sd_store(path, sd, ann, bob, kind="lora"):
    s = api.init_store(path, 16, 3, 0, 2, 16, SD_TRAIN, RouterConfig(steps=6, batch_size=16, warmup=2))
    api.ingest(s, "ann", ann, "one")
    api.ingest(s, "bob", bob, "one")
    api.set_adapters(s, base_from=sd, kind=kind)
    api.train(s, paragon=True)
    return s


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_sd_folder_import_compose_and_forget(tmp_path, sd, kind):
    ann, bob = squares(0, 18), squares(1, 18)
    s = sd_store(tmp_path / "s", sd, ann, bob, kind)
    st = api.status(s)
    assert st["adapters"]["base"] == "ready" and st["latent"]["factor"] == 2 and st["text"]["dim"] == 32
    assert api.train_config(s).beta_schedule == "scaled_linear" and api.train_config(s).beta_end == 0.012
    assert {n: s.model(n).info["adapter"].get("kind", "lora") for n in ("ann", "bob")} == {"ann": kind, "bob": kind}
    if kind == "full":  # a whole fine-tuned UNet, every weight moved from the base's
        from diffusers import UNet2DConditionModel

        tuned = UNet2DConditionModel.from_pretrained(s.folder(s.model("ann")))
        base = UNet2DConditionModel.from_pretrained(sd / "unet")
        assert all(not torch.equal(a, b) for (_, a), (_, b) in zip(tuned.named_parameters(), base.named_parameters())
                   if a.dim() > 1)
    # the base is the folder's UNet, byte for byte
    assert (s.folder(s.model("base")) / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (sd / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    for router, extra in (("ito", {}), ("classifier", {}), ("ito", {"commit": 0.5}), ("ito", {"subset": 1})):
        g = api.sample(s, 2, prompt="a red square", steps=3, router=router, seed=1, **extra)
        assert g.images.shape == (2, 16, 16, 3) and g.images.dtype == np.uint8
        assert g.compartments == ["ann", "bob"]
        assert np.allclose(g.attribution.sum(axis=1), 1.0)
    if kind == "lora":
        loop = api.sample(s, 2, prompt="a blue square", steps=3, seed=4, adapter_mode="loop")
        merged = api.sample(s, 2, prompt="a blue square", steps=3, seed=4)
        assert np.abs(loop.images.astype(int) - merged.images.astype(int)).max() <= 2  # unmerged vs merged LoRA
    victim = ann[5].hash
    res = forget(s, items=[victim])
    assert {x["name"] for x in res.retrained} == {"ann", "paragon", "router"}
    ref = sd_store(tmp_path / "ref", sd, [it for it in ann if it.hash != victim], bob, kind)
    assert digests(s) == digests(ref)
    assert np.array_equal(api.sample(s, 2, prompt="a red square", steps=3).images,
                          api.sample(ref, 2, prompt="a red square", steps=3).images)


def _broken(sd: Path, tmp_path: Path, name: str, edit) -> Path:
    dest = tmp_path / name
    shutil.copytree(sd, dest)
    edit(dest)
    return dest


def _set_json(path: Path, **kw) -> None:
    conf = json.loads(path.read_text())
    conf.update(kw)
    path.write_text(json.dumps(conf))


@pytest.mark.parametrize("name, edit, match", [
    ("no-vae", lambda d: shutil.rmtree(d / "vae"), r"has no vae/"),
    ("no-tokenizer", lambda d: shutil.rmtree(d / "tokenizer"), r"has no tokenizer/"),
    ("unet-width", lambda d: _set_json(d / "unet" / "config.json", cross_attention_dim=48), r"unet.*cross_attention_dim=48"),
    ("v-prediction", lambda d: _set_json(d / "scheduler" / "scheduler_config.json", prediction_type="v_prediction"),
     r"scheduler.*v_prediction"),
    ("unet-weights", lambda d: (d / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights"),
     r"unet.*does not load"),
    ("vae-channels", lambda d: _set_json(d / "vae" / "config.json", latent_channels=8), r"vae|unet"),
])
def test_bad_sd_folders_name_the_part_and_change_nothing(tmp_path, sd, name, edit, match):
    s = api.init_store(tmp_path / "s", 16, 3, 0, 2, 16, SD_TRAIN)
    api.ingest(s, "ann", squares(0, 6), "one")
    before = (s.events(), s.models())
    with pytest.raises(StoreError, match=match):
        api.set_adapters(s, base_from=_broken(sd, tmp_path, name, edit))
    assert (s.events(), s.models()) == before
    assert api.adapter_config(s) is None and api.text_config(s) is None and api.latent_config(s) is None
    assert not (s.root / "text").exists() and not (s.root / "vae").exists()


def test_sd_folder_needs_an_rgb_store_of_a_fitting_size(tmp_path, sd):
    grey = api.init_store(tmp_path / "g", 16, 1, 0, 2, 16, SD_TRAIN)
    with pytest.raises(StoreError, match="RGB"):
        api.set_adapters(grey, base_from=sd)
    odd = api.init_store(tmp_path / "o", 6, 3, 0, 2, 16, TrainConfig(preset="tiny"))
    with pytest.raises(StoreError, match="multiple of 4"):
        api.set_adapters(odd, base_from=sd)


def test_sd_folder_with_prompt_compartments(tmp_path, sd):
    s = api.init_store(tmp_path / "s", 16, 3, 0, 2, 16, SD_TRAIN, RouterConfig(steps=6, batch_size=16, warmup=2))
    api.ingest(s, "ann", squares(0, 12), "one")
    api.ingest(s, "bob", squares(1, 12), "one")
    a = api.set_adapters(s, base_from=sd, kind="prompt", tokens=2)
    assert a.kind == "prompt" and a.base_from == s.model("base").digest.split(":")[0]
    api.train(s)
    assert s.model("ann").info["adapter"] == {"kind": "prompt", "tokens": 2, "base": a.base_from}
    g = api.sample(s, 2, prompt="a green square", steps=3, router="classifier")
    assert g.images.shape == (2, 16, 16, 3) and g.compartments == ["ann", "bob"]


def test_an_items_latent_does_not_depend_on_its_company(sd):
    from cdm.models.latent import Latents, check_vae

    vae = Latents(sd / "vae", check_vae(sd / "vae"))
    x = torch.rand(19, 3, 16, 16) * 2 - 1
    assert torch.equal(vae.encode(x)[17], vae.encode(x[17:18])[0]) and torch.equal(vae.encode(x[10:])[7], vae.encode(x)[17])
