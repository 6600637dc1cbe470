"""Text-conditioned stores (cdm.models.text): captions through a frozen encoder, prompts at sampling,
isolation, determinism, exact forgetting, access isolation, guidance and bad input."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cdm.app import api
from cdm.errors import DataError, StoreError
from cdm.store.data import check_caption
from cdm.training.forget import forget
from cdm.sampling.pipeline import CDMPipeline
from cdm.sampling.settings import SamplingSettings
from cdm.models.text import Prompts, TextEncoder, build_default, check_folder, folder_digest

from .conftest import digests, make_store

WORDS = "zero one two three four five six seven eight nine".split()


def captioned(items, style="a digit"):
    return [replace(it, caption=f"{style} {WORDS[int(it.label)]}") for it in items]


def text_store(path, items, split="iid:2", slices=2, encoder=None, source="digits"):
    s = make_store(path, items, split, slices=slices, source=source)
    api.set_text(s, encoder)
    return s


@pytest.fixture(scope="module")
def owners(digits):
    """Two owners who caption differently, one compartment each."""
    return captioned(digits[:60], "a digit"), captioned(digits[60:120], "handwritten")


def two_owner_store(path, owners, b_items=None):
    s = make_store(path, owners[0], "one", source="ann")
    api.ingest(s, "bob", owners[1] if b_items is None else b_items, "one")
    api.set_text(s)
    api.train(s, paragon=True)
    return s


def test_text_store_trains_text_models_and_is_deterministic(tmp_path, owners):
    a = two_owner_store(tmp_path / "a", owners)
    b = two_owner_store(tmp_path / "b", owners)
    assert digests(a) == digests(b) and set(digests(a)) == {"ann", "bob", "paragon", "router"}
    conf = json.loads((a.folder(a.model("ann")) / "config.json").read_text())
    assert conf["_class_name"] == "UNet2DConditionModel" and conf["cross_attention_dim"] == api.text_config(a).dim
    g1 = api.sample(a, 3, prompt="a digit three", steps=4, seed=5, router="classifier")
    g2 = api.sample(b, 3, prompt="a digit three", steps=4, seed=5, router="classifier")
    assert np.array_equal(g1.images, g2.images) and np.array_equal(g1.attribution, g2.attribution)
    assert [r["prompt"] for r in g1.records()] == ["a digit three"] * 3
    # a prompt changes the images; the same seed with another prompt does not give the same bytes
    g3 = api.sample(a, 3, prompt="handwritten seven", steps=4, seed=5, router="classifier")
    assert not np.array_equal(g1.images, g3.images)


def test_changing_one_owners_captions_leaves_the_other_bit_identical(tmp_path, owners):
    a = two_owner_store(tmp_path / "a", owners)
    b = two_owner_store(tmp_path / "b", owners, captioned([replace(it, caption=None) for it in owners[1]], "a sketch"))
    da, db = digests(a), digests(b)
    assert da["ann"] == db["ann"]  # its items and captions are the same
    assert da["bob"] != db["bob"] and da["paragon"] != db["paragon"]  # they saw the changed captions


def test_a_new_encoder_makes_every_model_stale(tmp_path, owners):
    s = two_owner_store(tmp_path / "s", owners)
    other = build_default(tmp_path / "enc", width=32, heads=2)
    api.set_text(s, other)
    assert api.text_config(s).dim == 32
    assert {n: api.model_state(s, n) for n in ("ann", "bob", "paragon", "router")} == dict.fromkeys(
        ("ann", "bob", "paragon", "router"), "stale")
    with pytest.raises(StoreError, match="out of date"):
        CDMPipeline.from_store(s)
    api.train(s, paragon=True)
    assert api.model_state(s, "ann") == "ready"
    assert api.sample(s, 2, prompt="a digit one", steps=3).images.shape == (2, 8, 8, 1)


@pytest.mark.parametrize("slice_", [0, 1])
def test_forgetting_a_captioned_item_is_bit_identical(tmp_path, owners, slice_):
    s = two_owner_store(tmp_path / "s", owners)
    victim = next(r for r in s.items("bob") if r.slice == slice_)
    assert (victim.source, victim.hash) in s.captions([victim])
    res = forget(s, items=[victim.hash])
    assert {x["name"] for x in res.retrained} == {"bob", "paragon", "router"}
    assert s.captions([victim]) == {}
    ref = two_owner_store(tmp_path / "ref", owners, [it for it in owners[1] if it.hash != victim.hash])
    assert digests(s) == digests(ref)


def test_forgetting_a_public_caption_retrains_the_base_and_its_adapters_exactly(tmp_path, owners, digits):
    public = captioned(digits[120:160], "a public digit")

    def build(path, pub):
        s = make_store(path, owners[0], "one", source="ann")
        api.ingest(s, "bob", owners[1], "one")
        api.ingest(s, "pub", pub, "one")
        api.set_text(s)
        api.set_adapters(s, public=["pub"])
        api.train(s)
        return s

    s = build(tmp_path / "s", public)
    assert s.model("ann").info["adapter"]["base"] == s.model("base").digest
    victim = public[3].hash
    forget(s, items=[victim])
    ref = build(tmp_path / "ref", [it for it in public if it.hash != victim])
    assert digests(s) == digests(ref)
    g = api.sample(s, 2, prompt="a digit two", steps=3, allow=["ann", "bob"])
    assert g.compartments == ["ann", "bob"]


def test_access_isolation_with_prompts(tmp_path, owners):
    s = two_owner_store(tmp_path / "s", owners)
    alone = make_store(tmp_path / "alone", owners[0], "one", source="ann")
    api.set_text(alone)
    api.train(alone)
    mine = api.sample(s, 4, prompt="handwritten four", allow=["ann"], steps=4, seed=2)
    ref = api.sample(alone, 4, prompt="handwritten four", steps=4, seed=2)
    # composing only ann reads nothing of bob: the same bytes as a store that never held bob,
    # even for a prompt in bob's caption style
    assert mine.compartments == ["ann"] and np.array_equal(mine.images, ref.images)
    assert all(set(r["attribution"]) == {"ann"} for r in mine.records())


def test_guidance_uses_the_empty_prompt(tmp_path, owners):
    s = two_owner_store(tmp_path / "s", owners)
    pipe = CDMPipeline.from_store(s, paragon=True)
    enc = pipe.cond.encoder
    assert torch.equal(pipe.cond.null(2)["text"], enc.encode(["", ""]))
    st = SamplingSettings(steps=4, seed=3, guidance=3.0)
    uncond = pipe(4, settings=st)  # no prompt: the empty prompt, no guidance needed
    empty = pipe(4, settings=st, prompt="")  # guided towards the empty prompt = unguided
    assert np.abs(uncond.images.astype(int) - empty.images.astype(int)).max() <= 1
    one = pipe(4, settings=replace(st, guidance=1.0), prompt="a digit five")
    three = pipe(4, settings=st, prompt="a digit five")
    assert not np.array_equal(one.images, three.images)


def test_bad_prompts_and_conditions_are_refused(tmp_path, owners, digits):
    s = two_owner_store(tmp_path / "s", owners)
    pipe = CDMPipeline.from_store(s)
    limit = pipe.cond.encoder.max_length
    with pytest.raises(DataError, match=f"at most {limit}"):
        pipe(1, prompt="x" * (limit + 5))
    with pytest.raises(DataError, match="give a prompt, not a label"):
        pipe(1, "3")
    with pytest.raises(DataError, match="2 prompts for n=3"):
        pipe(3, prompt=["a", "b"])
    cls_store = make_store(tmp_path / "c", digits[:40], "iid:2")
    api.train(cls_store, router=False)
    with pytest.raises(DataError, match="class-conditional"):
        api.sample(cls_store, 1, prompt="a digit one", steps=2, allow=["digits-0"])


def test_prompts_follow_the_caption_rules_and_errors_do_not_echo_them(tmp_path, owners):
    """Control characters and bidirectional overrides are refused in prompts as in captions; a
    blank prompt is the empty prompt (the same bytes); an error never quotes the prompt."""
    s = two_owner_store(tmp_path / "s", owners)
    pipe = CDMPipeline.from_store(s)
    settings = SamplingSettings(steps=3, seed=2)
    for bad in ("a\x00b", "a \x1b[31m red", "a \u202e reversed", "isolated \u2066 text"):
        with pytest.raises(DataError, match="prompt holds control character"):
            pipe(1, prompt=bad, settings=settings)
    blank, empty = pipe(2, prompt="  \n ", settings=settings), pipe(2, prompt="", settings=settings)
    assert np.array_equal(blank.images, empty.images) and blank.prompts == ["", ""]
    with pytest.raises(DataError) as e:
        pipe(1, prompt="my secret plan " * 20, settings=settings)
    assert "secret" not in str(e.value) and "tokens" in str(e.value)
    with pytest.raises(DataError, match="control character"):
        check_caption("left \u202e right")


def test_captions_that_do_not_fit_the_encoder_change_nothing(tmp_path, digits):
    s = make_store(tmp_path / "s", captioned(digits[:30]), "iid:2")
    long = [replace(digits[40], caption="a very long caption " * 6)]
    api.ingest(s, "long", long, "one")
    before = s.events()
    with pytest.raises(StoreError, match=f"item {long[0].hash[:12]}.*at most 77"):
        api.set_text(s)
    assert api.text_config(s) is None and s.events() == before and not (s.root / "text").exists()
    s2 = text_store(tmp_path / "s2", captioned(digits[:30]))
    n = sum(s2.counts().values())
    with pytest.raises(DataError, match="caption.*at most 77"):
        api.ingest(s2, "long", long, "one")
    assert sum(s2.counts().values()) == n and "long" not in s2.sources()


def test_encoder_folders_missing_or_mismatched_parts_are_named(tmp_path, digits):
    s = make_store(tmp_path / "s", captioned(digits[:30]), "iid:2")
    enc = build_default(tmp_path / "enc")
    assert check_folder(enc)[0].dim == 64
    broken = tmp_path / "broken"
    shutil.copytree(enc, broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(StoreError, match="has no tokenizer/"):
        api.set_text(s, broken)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(enc, mismatched)
    conf = json.loads((mismatched / "text_encoder" / "config.json").read_text())
    conf["vocab_size"] = 100
    (mismatched / "text_encoder" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(StoreError, match="text_encoder"):
        api.set_text(s, mismatched)
    assert api.text_config(s) is None and not (s.root / "text").exists()
    # an imported folder is kept in the store, pinned by its digest
    cfg = api.set_text(s, enc)
    assert cfg.source == str(enc) and (s.root / "text" / cfg.digest / "text_encoder").is_dir()
    shutil.rmtree(enc)  # the store does not need the user's folder any more
    assert TextEncoder(s.root / "text" / cfg.digest).encode(["a"]).shape == (1, 77, 64)
    assert Prompts(TextEncoder(s.root / "text" / cfg.digest)).encode(["a", "b", "a"])["text"].shape[0] == 3


def test_cli_text_and_prompts(tmp_path, owners):
    from .test_cli import cdm

    s = make_store(tmp_path / "s", owners[0], "iid:2")
    s.close()
    st = tmp_path / "s"
    r = json.loads(cdm("text", st, "--json").stdout)
    assert r["source"] == "default" and r["max_length"] == 77
    assert json.loads(cdm("text", st, "--show", "--json").stdout) == r
    cdm("train", st, "--steps", "6")
    out = tmp_path / "out"
    r = json.loads(cdm("sample", st, "-n", "2", "--prompt", "a digit six", "--steps", "3", "--out", out,
                       "--json").stdout)
    assert [x["prompt"] for x in r["samples"]] == ["a digit six"] * 2 and (out / "grid.png").exists()
    (tmp_path / "prompts.txt").write_text("a digit one\n\na digit two\n")
    r = json.loads(cdm("sample", st, "-n", "2", "--prompts", tmp_path / "prompts.txt", "--steps", "3", "--out", out,
                       "--json").stdout)
    assert [x["prompt"] for x in r["samples"]] == ["a digit one"] * 2 + ["a digit two"] * 2
    r = cdm("sample", st, "--prompt", "y" * 90, "--steps", "3", "--out", out, code=2)
    assert "at most 77" in r.output
    r = cdm("sample", st, "--label", "3", "--steps", "3", "--out", out, code=2)
    assert "give a prompt, not a label" in r.output
    assert "conditioned on captions" in cdm("status", st).stdout
    cdm("text", st, "--off")
    assert json.loads(cdm("status", st, "--json").stdout)["text"] is None


def test_served_prompts_stay_inside_the_policy(tmp_path, owners):
    import httpx

    from cdm.sampling.policy import Policy, new_key
    from cdm.serving.config import ServeConfig
    from cdm.serving.routes import create_app

    from .test_serve import Server, pngs

    s = two_owner_store(tmp_path / "s", owners)
    alone = make_store(tmp_path / "alone", owners[0], "one", source="ann")
    api.set_text(alone)
    api.train(alone)
    key, digest = new_key()
    policy = Policy.parse(f'[users.amy]\ncompartments = ["ann"]\nkeys = ["{digest}"]\n')
    ref = api.sample(alone, 2, prompt="handwritten nine", steps=4, seed=7, guidance=2.0)
    s.close()
    with pytest.raises(StoreError, match="--grouped needs class-conditional"):  # refused at start, not per request
        create_app(tmp_path / "s", policy, ServeConfig(grouped=True))
    with Server(create_app(tmp_path / "s", policy, ServeConfig(max_n=4, max_steps=10))) as url, \
            httpx.Client(base_url=url, timeout=60) as c:
        h = {"X-API-Key": key}
        page = c.get("/").text + c.get("/app.js").text
        assert 'id="prompt"' in page and "body.prompt" in page  # the web page's prompt box
        info = c.get("/v1/compartments", headers=h).json()
        assert info["text"] is True and info["compartments"] == ["ann"] and info["labels"] == []
        r = c.post("/v1/generate", json={"n": 2, "prompt": "handwritten nine", "steps": 4, "seed": 7,
                                          "guidance": 2.0}, headers=h)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [x["prompt"] for x in body["samples"]] == ["handwritten nine"] * 2
        assert all(set(x["attribution"]) == {"ann"} for x in body["samples"])
        assert np.array_equal(np.stack(pngs(r))[..., None], ref.images)  # bob's model and captions never read
        r = c.post("/v1/generate", json={"n": 1, "prompt": "z" * 200}, headers=h)
        assert r.status_code == 422 and "at most 77" in r.json()["detail"]
        assert c.post("/v1/generate", json={"n": 1, "label": "3"}, headers=h).status_code == 422


def test_prompt_compartments_train_compose_and_forget_exactly(tmp_path, owners, digits):
    public = captioned(digits[120:160], "a public digit")

    def build(path, bob):
        s = make_store(path, owners[0], "one", source="ann")
        api.ingest(s, "bob", bob, "one")
        api.ingest(s, "pub", public, "one")
        api.set_text(s)
        api.set_adapters(s, public=["pub"], kind="prompt", tokens=3)
        api.train(s)
        return s

    s = build(tmp_path / "s", owners[1])
    dim = api.text_config(s).dim
    for name in ("ann", "bob"):
        row = s.model(name)
        assert row.info["adapter"]["kind"] == "prompt" and row.info["adapter"]["base"] == s.model("base").digest
        weights = load_file(str(s.folder(row) / row.info["weights"]))
        assert list(weights) == ["prompt"] and weights["prompt"].shape == (3, dim)  # the whole compartment
    g = api.sample(s, 2, prompt="a digit eight", steps=3, allow=["ann", "bob"], router="classifier")
    assert g.compartments == ["ann", "bob"] and np.allclose(g.attribution.sum(axis=1), 1)
    with pytest.raises(StoreError, match="prompt compartment, not a LoRA adapter"):
        CDMPipeline.from_store(s, ["ann", "bob"], adapter_mode="joint")
    victim = next(r for r in s.items("bob") if r.slice == 1).hash
    res = forget(s, items=[victim])
    assert {x["name"] for x in res.retrained} == {"bob", "router"}  # one prompt and the router, nothing else
    ref = build(tmp_path / "ref", [it for it in owners[1] if it.hash != victim])
    assert digests(s) == digests(ref)


def test_prompt_compartments_need_a_text_store(tmp_path, digits):
    s = make_store(tmp_path / "s", captioned(digits[:30]), "iid:2")
    with pytest.raises(StoreError, match="cdm text"):
        api.set_adapters(s, public=["digits"], kind="prompt")
    with pytest.raises(DataError, match="unknown adapter kind"):
        api.set_adapters(s, public=["digits"], kind="dora")
    assert api.adapter_config(s) is None


def test_a_prompts_embedding_does_not_depend_on_its_company(tmp_path):
    enc = TextEncoder(build_default(tmp_path / "enc"))
    many = [f"caption number {i}" for i in range(37)]
    alone = enc.encode(["caption number 20"])
    assert torch.equal(enc.encode(many)[20], alone[0]) and torch.equal(enc.encode(many[18:23])[2], alone[0])


def test_only_the_files_an_encoder_reads_are_copied_or_digested(tmp_path, digits):
    """Issue 29 row 3: an encoder folder's other files (code, notes, a nested folder) never reach
    the store, and do not change its digest."""
    s = make_store(tmp_path / "s", captioned(digits[:30]), "iid:2")
    clean = build_default(tmp_path / "clean")
    messy = tmp_path / "messy"
    shutil.copytree(clean, messy)
    (messy / "text_encoder" / "evil.py").write_text("import os; os.system('echo owned')")
    (messy / "tokenizer" / "notes.txt").write_text("private notes")
    (messy / "tokenizer" / "nested").mkdir()
    (messy / "tokenizer" / "nested" / "vocab.json").write_text("{}")
    (messy / "README.md").write_text("other")
    cfg = api.set_text(s, messy)
    assert cfg.digest == folder_digest(clean)
    copied = sorted(p.relative_to(s.root / "text" / cfg.digest).as_posix()
                    for p in (s.root / "text" / cfg.digest).rglob("*") if p.is_file())
    assert copied == sorted(p.relative_to(clean).as_posix() for p in clean.rglob("*") if p.is_file())


def test_imported_encoders_are_safetensors_only_hold_no_links_and_are_kept_owner_only(tmp_path, digits):
    """An encoder folder (`cdm text --encoder`, an SD folder's parts) with pickled weights only
    is refused with how to convert them; a symbolic link inside is refused by name; what is
    copied into the store is owner-only whatever the source's modes. Nothing is written."""
    import os
    import stat

    from safetensors.torch import load_file

    s = make_store(tmp_path / "s", captioned(digits[:30]), "iid:2")
    enc = build_default(tmp_path / "enc")
    pickled = tmp_path / "pickled"
    shutil.copytree(enc, pickled)
    torch.save(load_file(str(pickled / "text_encoder" / "model.safetensors")), pickled / "text_encoder" / "pytorch_model.bin")
    (pickled / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(DataError, match=r"has no model.safetensors: cdm reads safetensors weights only.*safe_serialization"):
        api.set_text(s, pickled)
    linked = tmp_path / "linked"
    shutil.copytree(enc, linked)
    (tmp_path / "elsewhere.txt").write_text("not the owner's")
    os.symlink(tmp_path / "elsewhere.txt", linked / "text_encoder" / "notes.txt")
    with pytest.raises(DataError, match=r"(?s)1 symbolic link\(s\).*text_encoder/notes.txt"):
        api.set_text(s, linked)
    assert api.text_config(s) is None and not (s.root / "text").exists()
    for p in enc.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    cfg = api.set_text(s, enc)
    installed = [s.root / "text" / cfg.digest, *(s.root / "text" / cfg.digest).rglob("*")]
    assert {stat.S_IMODE(p.stat().st_mode) for p in installed if p.is_file()} == {0o600}
    assert {stat.S_IMODE(p.stat().st_mode) for p in installed if p.is_dir()} == {0o700}
