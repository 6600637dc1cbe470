"""A text encoder trained in the store on public sources only (`cdm text --train-on`,
cdm.training.kinds.Encoder): what it reads, what is built on it, exact forgetting, bad input."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from cdm.app import api
from cdm.app.cli import app
from cdm.errors import DataError, NotFound, StoreError
from cdm.store.recipes import EncoderConfig
from cdm.training.forget import forget
from cdm.store.registry import RESERVED
from cdm.training.kinds import NAMED, UPSTREAM, build_job

from .conftest import digests, make_store
from .test_text import captioned

RECIPE = EncoderConfig(steps=30, batch_size=16, warmup=5, image_width=8, dim=16, checkpoint_every=10)


@pytest.fixture(scope="module")
def parts(digits):
    """Two private owners and a public source, each captioning its digits its own way."""
    return dict(ann=captioned(digits[:40], "a digit"), bob=captioned(digits[40:80], "handwritten"),
                pub=captioned(digits[80:120], "a public digit"))


def test_every_kind_with_one_model_is_a_reserved_name_and_upstream_kinds_are_among_them():
    """Adding a kind takes its name in registry.RESERVED (ingest reads it without torch); a
    kind missing there could be shadowed by a compartment of the same name."""
    assert set(NAMED) == set(RESERVED)
    assert set(UPSTREAM) <= set(NAMED)


def encoder_store(path, parts, public=("pub",), train=True):
    s = make_store(path, parts["ann"], "one", source="ann")
    for name in ("bob", "pub"):
        api.ingest(s, name, parts[name], "one")
    api.set_text(s, train_on=list(public), recipe=RECIPE)
    if train:
        api.train(s, paragon=True)
    return s


def test_the_encoder_trains_on_public_captions_only_and_every_model_pins_it(tmp_path, parts):
    s = encoder_store(tmp_path / "s", parts, train=False)
    t = api.text_config(s)
    assert (t.source, t.public) == ("trained", ("pub",)) and api.encoder_config(s) == RECIPE
    job = build_job(s, "encoder")
    assert sorted(job.hashes) == sorted(it.hash for it in parts["pub"])
    private = {it.caption for k in ("ann", "bob") for it in parts[k]}
    assert set(job.captions) == {it.caption for it in parts["pub"]} and not set(job.captions) & private
    assert api.plan(s, paragon=True) == ["encoder", "ann", "bob", "pub", "paragon", "router"]

    results = api.train(s, paragon=True)
    assert [r.name for r in results][0] == "encoder"  # trained first: the others' jobs pin it
    enc = s.model("encoder")
    first = json.loads((s.folder(enc) / "cdm.json").read_text())
    assert first["kind"] == "encoder" and enc.info["text_digest"] != t.digest  # it moved from the data-free start
    assert (s.folder(enc) / "text_encoder" / "model.safetensors").is_file() and (s.folder(enc) / "tokenizer").is_dir()
    assert results[0].final_loss < math.log(RECIPE.batch_size)  # below chance: it learned which caption is whose
    for name in ("ann", "bob", "pub", "paragon", "router"):
        j = build_job(s, name, load_pixels=False)
        assert (j.text_encoder, j.text_dir) == (enc.info["text_digest"], str(s.folder(enc)))
        assert api.model_state(s, name) == "ready"
    assert api.sample(s, 2, prompt="a digit two", steps=3, allow=["ann"]).images.shape == (2, 8, 8, 1)

    # private captions never reach it: other captions for bob leave the encoder bit-identical
    other = dict(parts, bob=captioned([it for it in parts["bob"]], "a private sketch"))
    b = encoder_store(tmp_path / "b", other)
    assert digests(b)["encoder"] == enc.digest and digests(b)["ann"] == digests(s)["ann"] is not None
    assert digests(b)["bob"] != digests(s)["bob"]


def test_forgetting_a_public_caption_retrains_the_encoder_and_everything_built_on_it_exactly(tmp_path, parts):
    s = encoder_store(tmp_path / "s", parts)
    victim = parts["pub"][5].hash
    res = forget(s, items=[victim])
    assert [r["name"] for r in res.retrained] == ["encoder", "ann", "bob", "pub", "paragon", "router"]
    assert res.retrained[0]["resumed_from"] == "scratch"
    ref = encoder_store(tmp_path / "ref", dict(parts, pub=[it for it in parts["pub"] if it.hash != victim]))
    assert digests(s) == digests(ref) and set(digests(s)) == {"encoder", "ann", "bob", "pub", "paragon", "router"}

    # a private item: the encoder and the other owner stay as they are
    before = digests(s)
    res = forget(s, items=[parts["ann"][0].hash])
    assert {r["name"] for r in res.retrained} == {"ann", "paragon", "router"}
    assert digests(s)["encoder"] == before["encoder"] and digests(s)["bob"] == before["bob"]


def test_an_interrupted_encoder_resumes_bit_identically(tmp_path, parts):
    from cdm.training.build import run_jobs

    ref = encoder_store(tmp_path / "ref", parts, train=False)
    run_jobs(ref, ["encoder"])
    s = encoder_store(tmp_path / "s", parts, train=False)

    class Stop(Exception):
        pass

    def stop_at_15(name, done, total, loss):
        if done == 15:  # after its step-10 resume file
            raise Stop

    with pytest.raises(Stop):
        run_jobs(s, ["encoder"], progress=stop_at_15)
    assert s.model("encoder") is None and (s.work_dir("encoder") / "resume.pt").exists()
    (r,) = run_jobs(s, ["encoder"])
    assert (r.resumed_from, r.steps) == ("step 10 of stage 0", 20)
    assert s.model("encoder").digest == ref.model("encoder").digest
    assert s.model("encoder").info["text_digest"] == ref.model("encoder").info["text_digest"]


def test_bad_encoder_settings_are_refused_and_change_nothing(tmp_path, parts):
    s = make_store(tmp_path / "s", parts["ann"], "one", source="ann")
    with pytest.raises(NotFound, match="unknown source 'nobody'"):
        api.set_text(s, train_on=["nobody"])
    with pytest.raises(DataError, match="--train-on"):
        api.set_text(s, tmp_path, train_on=["ann"])
    assert api.text_config(s) is None and s.get_meta("encoder") is None
    api.ingest(s, "pub", [it.__class__(it.pixels, it.label, it.origin) for it in parts["pub"][:5]], "one")  # uncaptioned
    api.set_text(s, train_on=["pub"], recipe=RECIPE)
    with pytest.raises(StoreError, match="captioned items of source.s. pub, which hold fewer than 2"):
        api.train(s)
    assert s.models() == {}
    with pytest.raises(StoreError, match="not trained"):
        api.sample(s, 1, prompt="a digit", steps=2)


def test_leaving_a_trained_encoder_deletes_it_and_everything_built_on_it(tmp_path, parts):
    s = encoder_store(tmp_path / "s", parts)
    folders = [s.folder(r) for r in s.models().values()]
    api.set_text(s, train_on=["pub"], recipe=RECIPE)  # the same setting: nothing changes
    assert set(digests(s)) == {"encoder", "ann", "bob", "pub", "paragon", "router"}
    api.set_text(s)  # the data-free encoder: forgetting would no longer judge the trained one by its sources
    assert s.models() == {} and not any(f.exists() for f in folders)
    assert not (s.root / "checkpoints" / "ann").exists() and api.text_config(s).source == "default"


def test_cli_trains_an_encoder_on_public_sources(tmp_path, parts):
    s = encoder_store(tmp_path / "s", parts, train=False)
    run = CliRunner().invoke
    r = run(app, ["text", str(s.root), "--train-on", "pub", "--encoder-steps", "7"])
    assert r.exit_code == 0, r.output
    assert "trained here on public source(s) pub" in " ".join(r.output.split()) and api.encoder_config(s).steps == 7
    r = run(app, ["text", str(s.root), "--encoder-steps", "7"])
    assert r.exit_code != 0 and "--encoder-steps goes with --train-on" in r.output
    r = run(app, ["status", str(s.root), "--json"])
    assert json.loads(r.output)["text"]["encoder"] == "missing"
    r = run(app, ["status", str(s.root)])
    assert r.exit_code == 0 and "trained on public source(s) pub: missing" in " ".join(r.output.split())
