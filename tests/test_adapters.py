"""Adapter compartments: LoRA on a base trained only on public sources; exact forgetting;
merged, looped and batched adapter evaluation agree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cdm.app import api
from cdm.training.forget import forget
from cdm.sampling.mixture import Mixture
from cdm.sampling.settings import Sparsity
from cdm.models.nets import build_unet
from cdm.models.presets import unet_config
from cdm.sampling.routers import ItoRouter
from cdm.errors import DataError, StoreError

from .conftest import digests, make_store

pytest.importorskip("peft")


def adapter_store(path, items, public=40, split="iid:2"):
    s = make_store(path, items[:public], "one", source="public")
    api.ingest(s, "private", items[public:], split)
    api.set_adapters(s, public=["public"])
    return s


def test_adapters_train_on_a_public_base_and_sample(tmp_path, digits):
    s = adapter_store(tmp_path / "s", digits[:100])
    res = api.train(s, paragon=True)
    assert [r.name for r in res] == ["base", "private-0", "private-1", "public", "paragon", "router"]
    public = {r.hash for r in s.items() if r.source == "public"}
    assert set(api.build_job(s, "base", load_pixels=False).hashes) == public  # never a private item
    models = s.models()
    for c in ("private-0", "private-1", "public"):
        folder = s.root / models[c].path
        assert models[c].info["adapter"]["base"] == models["base"].digest
        # (tiny preset: narrow layers make rank 4 relatively big; the bench measures the real preset)
        assert (folder / "adapter_model.safetensors").stat().st_size < 0.5 * (
            s.root / models["paragon"].path / "diffusion_pytorch_model.safetensors").stat().st_size
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4  # peft can read it
    st = api.status(s)
    assert st["adapters"]["public"] == ["public"] and st["adapters"]["base"] == "ready"
    g = api.sample(s, 3, "4", steps=4, seed=1)
    again = api.sample(s, 3, "4", steps=4, seed=1)
    assert np.array_equal(g.images, again.images) and g.attribution.shape == (3, 3)

    # a new private item retrains its adapter only; the base is untouched (it saw no private data)
    before = digests(s)
    api.ingest(s, "private", digits[100:101], "iid:2")
    (comp,) = {r.compartment for r in s.items() if r.hash == digits[100].hash}
    assert api.plan(s) == [comp, "router"]
    api.train(s)
    assert digests(s)["base"] == before["base"]


@pytest.mark.parametrize("source", ["private", "public"])
def test_forgetting_is_exact_for_adapters(tmp_path, digits, source):
    items = digits[:100]
    s = adapter_store(tmp_path / "s", items)
    api.train(s, paragon=True)
    victim = next(r for r in s.items() if r.source == source and r.slice == 1)
    before = digests(s)
    res = forget(s, items=[victim.hash])
    rest = [d for d in items if d.hash != victim.hash]
    ref = make_store(tmp_path / "ref", rest[:39] if source == "public" else rest[:40], "one", source="public")
    api.ingest(ref, "private", rest[39:] if source == "public" else rest[40:], "iid:2")
    api.set_adapters(ref, public=["public"])
    api.train(ref, paragon=True)
    assert digests(s) == digests(ref)  # base, every adapter, paragon and router, bit for bit
    assert sorted(p.name for p in (s.root / "checkpoints").rglob("*.pt")) == \
        sorted(p.name for p in (ref.root / "checkpoints").rglob("*.pt"))
    retrained = {x["name"]: x["resumed_from"] for x in res.retrained}
    if source == "private":
        assert digests(s)["base"] == before["base"] and "base" not in retrained
        assert retrained[victim.compartment] == "stage 0"
        others = {"private-0", "private-1", "public"} - {victim.compartment}
        assert all(digests(s)[c] == before[c] for c in others)  # other adapters untouched
    else:  # the base saw it: the base resumes from its slice, every adapter retrains on the new base
        assert retrained["base"] == "stage 0"
        assert {"private-0", "private-1", "public"} <= set(retrained)


def test_adapter_modes_agree(tmp_path, digits):
    s = adapter_store(tmp_path / "s", digits[:100])
    api.train(s)
    names = sorted(s.compartments())
    bank = api.load_bank(s, names)
    merged = [api.load_unet(s, c) for c in names]
    x, t = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((6,), 500)
    y = torch.tensor([1, 2, 3, 4, 5, 16])
    with torch.inference_mode():
        loop = torch.stack([bank.denoiser(c)(x, t, y) for c in names], 1)
        full = torch.stack([m(x, t, class_labels=y).sample for m in merged], 1)
        joint = bank.joint(names)(x, t, y, None)
        keep = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)
        part = bank.joint(names)(x, t, y, keep)
    assert torch.allclose(loop, full, atol=1e-5) and torch.allclose(loop, joint, atol=1e-5)
    assert torch.equal(part[~keep], torch.zeros_like(part[~keep]))
    assert torch.allclose(part[keep], loop[keep], atol=1e-5)
    base = api.load_unet(s, "base")
    with torch.inference_mode():
        assert not torch.allclose(full[:, 0], base(x, t, class_labels=y).sample, atol=1e-3)  # adapters do something

    # a Mixture over the joint call is the Mixture over the loop, dense and sparse
    prior = torch.zeros(6, 3, dtype=torch.float64)
    for kw in (dict(), dict(prune=0.0)):
        a = Mixture([bank.denoiser(c) for c in names], ItoRouter(), prior, Sparsity(**kw))
        b = Mixture([bank.denoiser(c) for c in names], ItoRouter(), prior, Sparsity(**kw), joint=bank.joint(names))
        with torch.inference_mode():
            assert torch.allclose(a(x, t, y), b(x, t, y), atol=1e-5) and a.evaluations == b.evaluations
    g = {m: api.sample(s, 2, "3", steps=3, adapter_mode=m) for m in api.ADAPTER_MODES}
    assert np.abs(g["merged"].attribution - g["joint"].attribution).max() < 1e-4
    with pytest.raises(DataError, match="adapter mode"):
        api.sample(s, 2, "3", steps=3, adapter_mode="fused")


def test_imported_base_and_bad_settings(tmp_path, digits):
    s = make_store(tmp_path / "s", digits[:60], "iid:2")
    with pytest.raises(StoreError, match="unknown source"):
        api.set_adapters(s, public=["museum"])
    wrong = build_unet(unet_config("tiny", 16, 1, 15), 0)
    wrong.save_pretrained(tmp_path / "wrong")
    with pytest.raises(StoreError, match=r"sample_size=16 \(store needs 8\).*num_class_embeds=16 \(store needs 17\)"):
        api.set_adapters(s, base_from=tmp_path / "wrong")
    assert api.adapter_config(s) is None and s.model("base") is None  # nothing changed
    good = build_unet(unet_config("tiny", 8, 1, 16), 7)
    good.save_pretrained(tmp_path / "good")
    a = api.set_adapters(s, base_from=tmp_path / "good")
    assert a.base_from == s.model("base").digest and api.plan(s) == ["digits-0", "digits-1", "router"]
    api.train(s)
    assert api.sample(s, 2, "1", steps=3).images.shape == (2, 8, 8, 1)
    with pytest.raises(StoreError, match="not trained here"):
        api.build_job(s, "base")
    api.set_adapters(s, off=True)
    assert api.plan(s, router=False) == ["digits-0", "digits-1"]  # full models again


def test_cli_adapters(tmp_path, digits):
    from typer.testing import CliRunner

    from cdm.app.cli import app

    s = adapter_store(tmp_path / "s", digits[:60])
    api.set_adapters(s, off=True)
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    r = run("adapters", s.root, "--public", "nope")
    assert r.exit_code == 2 and "unknown source(s) nope" in r.output
    assert run("adapters", s.root, "--json").stdout.strip() == "null"
    r = run("adapters", s.root, "--public", "public", "--rank", "2", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["rank"] == 2
    r = run("status", s.root)
    assert "adapters: rank 2 on a base model trained on public source(s) public: missing" in r.output
    assert "LoRA adapters (rank 2" in run("adapters", s.root).output
    assert run("adapters", s.root, "--off", "--public", "x").exit_code == 2
    assert run("adapters", s.root, "--off").output.strip() == "compartments are full models"


@pytest.mark.parametrize("text", [False, True])
def test_a_bank_of_many_adapters_is_one_base_call_equal_to_merged(text):
    """Issue 28: K LoRA adapters in one call of the shared base (each row its own adapter's
    low-rank delta: linear, conv and embedding layers; cross-attention in a text UNet) equal
    K merged copies within float tolerance, and hold one base, not K."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    from cdm.models.adapters import AdapterBank, lora_config, merged
    from cdm.models.presets import text_unet_config
    from cdm.store.recipes import AdapterConfig

    config = text_unet_config("tiny", 8, 1, 16) if text else unet_config("tiny", 8, 1, 16)
    base = build_unet(config, seed=0).eval().requires_grad_(False)
    recipe = AdapterConfig(rank=2, public=("p",)).recipe()
    states = {}
    for i in range(3):
        probe = build_unet(config, seed=0)
        inject_adapter_in_model(lora_config(recipe), probe, adapter_name="a")
        gen = torch.Generator().manual_seed(i)
        states[f"c{i}"] = {k: 0.1 * torch.randn(v.shape, generator=gen)
                           for k, v in get_peft_model_state_dict(probe, adapter_name="a").items()}
    kinds = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in states["c0"]}
    assert {"conv1", "to_k", "time_emb_proj"} <= kinds and ("class_embedding" in kinds) == (not text)
    bank = AdapterBank(base, {n: (recipe, st) for n, st in states.items()})
    plain = {n: merged(base, recipe, st) for n, st in states.items()}
    gen = torch.Generator().manual_seed(9)
    x, t = torch.randn(7, 1, 8, 8, generator=gen), torch.randint(0, 1000, (7,), generator=gen)
    cond = dict(encoder_hidden_states=torch.randn(7, 5, 16, generator=gen)) if text \
        else dict(class_labels=torch.randint(0, 17, (7,), generator=gen))
    names = ["c2", "c0", "c1", "c1", "c0", "c2", "c2"]  # rows in any order
    with torch.inference_mode():
        got = bank.forward(x, t, dict(text=cond["encoder_hidden_states"]) if text else cond["class_labels"], names)
        want = torch.cat([plain[n](x[i:i + 1], t[i:i + 1], **{k: v[i:i + 1] for k, v in cond.items()}).sample
                          for i, n in enumerate(names)])
        plain_base = base(x, t, **cond).sample
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain_base, atol=1e-3)
    n_base = sum(p.numel() for p in base.parameters())
    n_bank = sum(p.numel() for p in [*bank.unet.parameters(), *bank.unet.buffers()])
    n_lora = sum(v.numel() for st in states.values() for v in st.values())
    assert n_bank == n_base + n_lora  # one base plus K adapters
