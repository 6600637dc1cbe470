"""The alignment metric (cdm.evaluation.alignment): a contrastive model on held-out pairs, R-precision,
CLIP-style score, the real-CLIP path, and `cdm eval` on a text-conditioned store."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdm.app import api
from cdm.evaluation.alignment import AlignConfig, AlignScorer, ClipScorer, fit_align, words
from cdm.store.data import Item
from cdm.evaluation.evaluate import EvalConfig, EvalReport, Evaluator, reference_items
from cdm.errors import StoreError
from cdm.models.text import build_default
from cdm.store.recipes import RouterConfig, TrainConfig

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (220, 220, 30)}
SHAPES = ("square", "stripe")


def shape_item(colour: str, shape: str, seed: int) -> Item:
    rng = np.random.RandomState(seed)
    px = np.full((8, 8, 3), 128, np.int64)
    if shape == "square":
        px[2:6, 2:6] = COLOURS[colour]
    else:
        px[3:5, :] = COLOURS[colour]
    px = np.clip(px + rng.randint(-20, 20, px.shape), 0, 255).astype(np.uint8)
    return Item(px, None, f"{colour}-{shape}-{seed}.png", f"a {colour} {shape}")


def shapes(seeds) -> list[Item]:
    return [shape_item(c, s, i) for c in COLOURS for s in SHAPES for i in seeds]


@pytest.fixture(scope="module")
def scorer() -> AlignScorer:
    return AlignScorer(fit_align(shapes(range(12)), AlignConfig(steps=200, batch_size=64)))


def test_words_are_hashed_words_and_bigrams():
    assert words("A red  square!", 4096) == words("a red square", 4096)
    assert len(words("a red square", 4096)) == 5 and words("", 16) == [0]


def test_align_model_retrieves_the_right_caption(scorer):
    test = shapes([100])
    imgs, caps = np.stack([t.pixels for t in test]), [t.caption for t in test]
    pool = sorted({t.caption for t in shapes([0])})
    right = scorer.score(imgs, caps, pool)
    wrong = scorer.score(imgs, caps[1:] + caps[:1], pool)  # every image with another's caption
    assert right.candidates == 8 and right.r_precision >= 0.9 and wrong.r_precision <= 0.2
    assert right.clip_score > wrong.clip_score + 20


def test_alignment_needs_captioned_pairs():
    with pytest.raises(StoreError, match="8 held-out captioned images"):
        fit_align(shapes([0])[:4])


def test_real_clip_folder_path(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    enc = build_default(tmp_path / "enc", width=32, heads=2, max_length=32)
    tok = CLIPTokenizer.from_pretrained(enc / "tokenizer")
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    clip = ClipScorer(tmp_path / "clip")
    test = shapes([1])
    a = clip.score(np.stack([t.pixels for t in test]), [t.caption for t in test], [t.caption for t in test])
    assert 0 <= a.r_precision <= 1 and 0 <= a.clip_score <= 100 and clip.kind == "clip:clip"
    assert clip.images(np.stack([t.pixels for t in test])).shape == (8, 16)
    with pytest.raises(StoreError, match="not a CLIPModel folder"):
        ClipScorer(tmp_path / "enc")


def test_eval_of_a_text_store_reports_alignment(tmp_path):
    s = api.init_store(tmp_path / "s", 8, 3, 0, 2, 16, TrainConfig(preset="tiny", steps=20, batch_size=16, warmup=4),
                       RouterConfig(steps=6, batch_size=16, warmup=2))
    train = shapes(range(6))
    api.ingest(s, "ann", [t for t in train if "square" in t.caption], "one")
    api.ingest(s, "bob", [t for t in train if "stripe" in t.caption], "one")
    api.set_text(s)
    api.train(s, paragon=True)
    held = tmp_path / "held"
    held.mkdir()
    for t in shapes([50, 51]):
        Image.fromarray(t.pixels).save(held / Path(t.origin).name)
        (held / Path(t.origin).with_suffix(".txt").name).write_text(t.caption)
    real = reference_items(s, held)
    assert all(r.caption for r in real) and len(real) == 16
    ev = Evaluator(s, real, EvalConfig.with_sampling(samples=16, steps=4, batch_size=16), align=AlignConfig(steps=100, batch_size=16))
    assert ev.features.kind == "cdm-align"  # no labels: FID in the alignment model's image space
    para = ev.run("paragon", paragon=True)
    cdm = ev.run("cdm-2", ["ann", "bob"], "ito")
    for m in (para, cdm):
        assert 0 <= m.r_precision <= 1 and 0 <= m.clip_score <= 100 and m.accuracy is None and np.isfinite(m.fid)
    assert ev.real_alignment.candidates == 8 and ev.real_alignment.r_precision > 0.5
    rep = EvalReport("held", ev.features.kind, ev.cfg, 0.0, [para, cdm], asdict(ev.real_alignment), ev.scorer.kind)
    table = rep.table()
    assert "R-precision" in table and "held-out images, own captions" in table and table.count("\n") == 5
    with pytest.raises(StoreError, match="captioned"):
        Evaluator(s, [Item(t.pixels, None, t.origin) for t in real], EvalConfig.with_sampling(samples=4))
