"""Ingest: hashing, stable assignment (invariant 2), folders, duplicates, bad input."""

from __future__ import annotations

import hashlib
import random
import sqlite3

import numpy as np
import pytest
from PIL import Image

from cdm.app import api
from cdm.errors import DataError, StoreError
from cdm.store.data import Item, SplitRule, item_hash, load_builtin
from cdm.store.registry import Store

from .conftest import make_store


def test_item_hash_is_canonical_pixels():
    px = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    assert item_hash(px) == item_hash(px.copy())
    assert item_hash(px) != item_hash(px.reshape(4, 16, 1))  # same bytes, other shape
    # documented canonical form: sha256(b"cdm-item-v1 HxWxC\n" + C-order uint8 bytes)
    assert item_hash(px) == hashlib.sha256(b"cdm-item-v1 8x8x1\n" + px.tobytes()).hexdigest()
    assert item_hash(px) == "daa11be5f996f5d1fc2c7a2f5bfe142a374cd3041f4d288ccddc6f490833767d"


def test_digits_test_split_is_fixed_and_disjoint():
    train, test = load_builtin("digits", "train"), load_builtin("digits", "test")
    assert (len(train), len(test)) == (1497, 300)
    assert {i.origin for i in train}.isdisjoint({i.origin for i in test})
    assert train[0].origin == load_builtin("digits")[0].origin


@pytest.mark.parametrize("text,expected", [("iid:4", ("iid", 4)), ("by-class:2", ("by-class", 2)), ("one", ("one", 1))])
def test_split_rule_parse(text, expected):
    r = SplitRule.parse(text)
    assert (r.kind, r.k) == expected and str(r) == text


@pytest.mark.parametrize("text", ["iid", "iid:0", "rand:3", "by-class:x", ""])
def test_split_rule_rejects(text):
    with pytest.raises(DataError, match="split rule"):
        SplitRule.parse(text)


def _assignment(store) -> dict[str, tuple[str, int]]:
    return {r.hash: (r.compartment, r.slice) for r in store.items()}


def test_assignment_is_pure_function_of_item(tmp_path, digits):
    a = make_store(tmp_path / "a", digits, "iid:3", slices=4)
    shuffled = digits[:]
    random.Random(1).shuffle(shuffled)
    b = make_store(tmp_path / "b", shuffled[:70], "iid:3", slices=4)
    api.ingest(b, "digits", shuffled[70:], "iid:3")  # in two batches, other order
    c = make_store(tmp_path / "c", digits[::2], "iid:3", slices=4)  # other items absent
    ea, eb, ec = _assignment(a), _assignment(b), _assignment(c)
    assert ea == eb
    assert all(ea[h] == v for h, v in ec.items())
    assert len(set(v[0] for v in ea.values())) == 3 and len(set(v[1] for v in ea.values())) == 4
    d = make_store(tmp_path / "d", digits, "iid:3", slices=4, seed=1)  # another store seed reshuffles
    assert _assignment(d) != ea


def test_by_class_compartments_hold_disjoint_labels(tmp_path, digits):
    s = make_store(tmp_path / "s", digits, "by-class:2")
    hist = s.label_counts()
    names = s.label_names()
    assert set(hist) == {"digits-0", "digits-1"}
    assert {int(names[k]) % 2 for k in hist["digits-0"]} == {0}
    assert {int(names[k]) % 2 for k in hist["digits-1"]} == {1}


def test_duplicates_are_skipped_and_counted(tmp_path, digits):
    s = make_store(tmp_path / "s", digits[:50])
    r = api.ingest(s, "digits", digits[:60] + digits[:5], "iid:3")
    assert (r.added, r.duplicates) == (10, 55)
    assert sum(r.compartments.values()) == 60 == len(s.items())


def _write_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_folder_with_label_subfolders_and_flat(tmp_path):
    rng = np.random.RandomState(0)
    for lab in ("cat", "dog"):
        for i in range(3):
            _write_png(tmp_path / "lab" / lab / f"{i}.png", rng.randint(0, 255, (8, 8), dtype=np.uint8))
    for i in range(4):
        _write_png(tmp_path / "flat" / f"{i}.jpg", rng.randint(0, 255, (8, 8), dtype=np.uint8))
    s = api.init_store(tmp_path / "s")
    r = api.ingest(s, "pets", api.load_folder(tmp_path / "lab", 8, 1), "by-class:2")
    assert r.added == 6 and s.labels() == {"cat": 0, "dog": 1}
    r = api.ingest(s, "misc", api.load_folder(tmp_path / "flat", 8, 1), "one")
    assert r.added == 4 and r.compartments == {"misc": 4}
    assert sum(1 for row in s.items() if row.label is None) == 4
    # stored files round-trip to the same hash
    for row in s.items():
        assert item_hash(s.read_item(row.hash)) == row.hash


def _nothing_written(store_path):
    s = Store.open(store_path)
    try:
        return not s.items() and not s.sources() and not list((store_path / "items").glob("*/*"))
    finally:
        s.close()


def test_bad_files_are_all_named_and_nothing_is_written(tmp_path):
    good = np.zeros((8, 8), np.uint8)
    _write_png(tmp_path / "in" / "a" / "ok.png", good)
    _write_png(tmp_path / "in" / "a" / "big.png", np.zeros((9, 9), np.uint8))
    _write_png(tmp_path / "in" / "b" / "rgb.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "in" / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    api.init_store(tmp_path / "s").close()
    s = Store.open(tmp_path / "s")
    with pytest.raises(DataError) as e:
        api.load_folder(tmp_path / "in", 8, 1)
    msg = str(e.value)
    for name in ("big.png", "rgb.png", "broken.png"):
        assert name in msg
    assert "ok.png" not in msg and "2 of 4 image(s) are not 8x8 L" in msg and "1 bad file(s)" in msg
    assert _nothing_written(tmp_path / "s")
    # --resize converts size and mode, the corrupt file is still refused
    (tmp_path / "in" / "b" / "broken.png").unlink()
    items = api.load_folder(tmp_path / "in", 8, 1, resize=True)
    assert len(items) == 3 and all(i.pixels.shape == (8, 8, 1) for i in items)
    s.close()


def test_missing_folder_and_unknown_builtin(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        api.load_folder(tmp_path / "nope", 8, 1)
    with pytest.raises(DataError, match="unknown builtin dataset 'mnist'"):
        load_builtin("mnist")


def test_wrong_shape_items_and_rule_conflicts_change_nothing(tmp_path, digits):
    s = api.init_store(tmp_path / "s", image_size=16)
    with pytest.raises(DataError, match=r"digits\[.*shape \(8, 8, 1\)"):
        api.ingest(s, "digits", digits, "iid:2")
    assert _nothing_written(tmp_path / "s")
    s = make_store(tmp_path / "t", digits[:20], "iid:2")
    with pytest.raises(DataError, match="ingested with split iid:2"):
        api.ingest(s, "digits", digits[20:30], "iid:3")
    with pytest.raises(DataError, match="reserved"):
        api.ingest(s, "paragon", digits[20:30], "one")
    with pytest.raises(DataError, match="source name"):
        api.ingest(s, "Bad Name", digits[20:30], "one")
    unl = [Item(d.pixels, None, d.origin) for d in digits[40:45]]
    with pytest.raises(DataError, match="needs labels"):
        api.ingest(s, "other", unl, "by-class:2")
    assert len(s.items()) == 20


def test_store_schema_version_and_not_a_store(tmp_path):
    api.init_store(tmp_path / "s").close()
    db = sqlite3.connect(tmp_path / "s" / "registry.sqlite")
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99 is not supported"):
        Store.open(tmp_path / "s")
    with pytest.raises(StoreError, match="not a cdm store"):
        Store.open(tmp_path / "empty")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        api.init_store(tmp_path / "full")
