"""Exact forgetting (invariants 3 and 7) and continual addition, compared bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cdm.app import api
from cdm.store.data import load_builtin
from cdm.training.forget import forget
from cdm.errors import DataError, NotFound, StoreError
from cdm.store.registry import Store

from .conftest import digests, make_store


def _ckpts(store) -> dict[str, list[str]]:
    root = store.root / "checkpoints"
    return {d.name: sorted(p.name for p in d.iterdir()) for d in sorted(root.iterdir())}


@pytest.mark.parametrize("slice_", [0, 1, 2])
def test_forget_item_is_bit_identical_to_training_without_it(tmp_path, digits, slice_):
    items = digits[:90]
    s = make_store(tmp_path / "s", items, "iid:2", slices=3)
    api.train(s, paragon=True)
    victim = next(r for r in s.items() if r.slice == slice_)
    (tmp_path / "s" / "work" / "router").mkdir(parents=True, exist_ok=True)
    (tmp_path / "s" / "work" / "router" / "resume.pt").write_bytes(b"state of an interrupted router run")
    res = forget(s, items=[victim.hash])
    ref = make_store(tmp_path / "ref", [d for d in items if d.hash != victim.hash], "iid:2", slices=3)
    api.train(ref, paragon=True)
    assert digests(s) == digests(ref)  # compartments, paragon and classifier router
    assert _ckpts(s) == _ckpts(ref)  # no checkpoint that saw the item survives
    retrained = {x["name"]: x for x in res.retrained}
    assert retrained[victim.compartment]["resumed_from"] == ("scratch" if slice_ == 0 else f"stage {slice_ - 1}")
    assert set(retrained) == {victim.compartment, "paragon", "router"} and res.router == "retrained"
    assert not s.item_path(victim.hash).exists() and victim.hash not in {r.hash for r in s.items()}
    assert not list((tmp_path / "s" / "work").glob("*/resume.pt"))  # no interrupted state that saw it
    for router in ("ito", "classifier"):
        a = api.sample(s, 4, "5", None, router, steps=5, seed=3)
        b = api.sample(ref, 4, "5", None, router, steps=5, seed=3)
        assert np.array_equal(a.images, b.images) and np.array_equal(a.attribution, b.attribution)
    ev = [e for e in s.events() if e["kind"] == "forget"][-1]
    logged = json.dumps(ev)
    assert victim.hash in logged and "pixels" not in logged


def test_forget_source_equals_store_without_it(tmp_path, digits):
    other = load_builtin("digits", "test")[:40]
    s = make_store(tmp_path / "s", digits[:60], "iid:2")
    api.ingest(s, "museum", other, "one")
    api.train(s)
    r = forget(s, source="museum")
    assert r.dropped == ["museum"] and len(r.items) == 40
    ref = make_store(tmp_path / "ref", digits[:60], "iid:2")
    api.train(ref)
    assert digests(s) == digests(ref)
    assert not (tmp_path / "s" / "models" / "museum").exists()
    assert not (tmp_path / "s" / "checkpoints" / "museum").exists()


def test_unknown_targets_change_nothing(tmp_path, digits):
    s = make_store(tmp_path / "s", digits[:30], "iid:2")
    api.train(s)
    before, n_events = digests(s), len(s.events())
    with pytest.raises(StoreError, match="unknown item hash.*deadbeef"):
        forget(s, items=["deadbeef"])
    with pytest.raises(StoreError, match="unknown source 'nope'"):
        forget(s, source="nope")
    with pytest.raises(StoreError, match="unknown compartment"):
        forget(s, compartment="nope")
    assert digests(s) == before and len(s.events()) == n_events and len(s.items()) == 30


def test_continual_addition_trains_only_the_new_compartment(tmp_path, digits):
    s = make_store(tmp_path / "s", digits[:60], "iid:2")
    api.train(s)
    before = digests(s)
    api.ingest(s, "museum", load_builtin("digits", "test")[:30], "one")
    ran = [r.name for r in api.train(s)]
    assert ran == ["museum", "router"]
    after = digests(s)
    assert all(after[c] == before[c] for c in ("digits-0", "digits-1"))
    g = api.sample(s, 3, "1", None, "ito", steps=4)
    assert g.compartments == ["digits-0", "digits-1", "museum"]


def test_policy_composes_exactly_the_users_set(tmp_path, digits):
    from cdm.sampling.policy import Policy, set_store_policy, store_policy

    s = make_store(tmp_path / "s", digits[:60], "iid:2")
    api.ingest(s, "museum", load_builtin("digits", "test")[:30], "one")
    api.train(s, router=False)
    pol = Policy.parse('[users.alice]\nsources = ["museum"]\ncompartments = ["digits-1"]\n'
                       '[users.bob]\nsources = ["digits"]\n')
    assert pol.allowed(s, "alice") == ["digits-1", "museum"]
    assert pol.allowed(s, "bob") == ["digits-0", "digits-1"]
    with pytest.raises(StoreError, match="unknown user 'carol'"):
        pol.allowed(s, "carol")
    typo = Policy.parse('[users.x]\ncompartments = ["nope", "museum"]\n')
    assert typo.allowed(s, "x") == ["museum"] and typo.missing(s) == {"x": ["users.x.compartments: nope"]}
    with pytest.raises(DataError, match=r"users.x.compartments: nope"):
        set_store_policy(s, typo)  # a name the store does not hold is refused when set (unless allow_missing)
    assert Policy.parse('[users.x]\nsources = []\n').allowed(s, "x") == []
    with pytest.raises(DataError, match="not valid TOML"):
        Policy.parse("[users.x")
    set_store_policy(s, pol)
    assert store_policy(s).allowed(s, "alice") == ["digits-1", "museum"]
    assert s.events()[-1]["kind"] == "policy"


def test_each_sources_copy_is_its_own_item_and_forgetting_one_copy_is_exact(tmp_path, digits):
    """Issue 29 row 10: two owners hold the same pixels. Neither ingest tells about the other,
    each forget acts on its own copy only, and forgetting one copy is bit-identical to a store
    that never had it."""
    shared = digits[0]
    a_items, b_items = digits[:30], [*digits[30:60], shared]
    s = make_store(tmp_path / "s", a_items, "one", source="a")
    got = api.ingest(s, "b", b_items, "one")
    fresh = api.init_store(tmp_path / "fresh", 8, 1, 0, 2, 16)
    want = api.ingest(fresh, "b", b_items, "one")  # B's answer is the same whether or not A holds the image
    assert got == want and (got.added, got.duplicates) == (31, 0)
    assert sorted(r.source for r in s.items() if r.hash == shared.hash) == ["a", "b"]
    api.train(s, paragon=True)
    before = digests(s)

    with pytest.raises(DataError, match="held by more than one source"):
        forget(s, items=[shared.hash])  # ambiguous: nothing changes
    assert digests(s) == before and len(s.items()) == 61
    res = forget(s, items=[shared.hash], source="a")
    assert res.items == [shared.hash] and {x["name"] for x in res.retrained} == {"a", "paragon", "router"}
    assert [r.source for r in s.items() if r.hash == shared.hash] == ["b"]
    assert digests(s)["b"] == before["b"]  # B's compartment was not touched
    assert np.array_equal(s.read_item(shared.hash), shared.pixels)  # B's copy is whole
    ref = make_store(tmp_path / "ref", a_items[1:], "one", source="a")
    api.ingest(ref, "b", b_items, "one")
    api.train(ref, paragon=True)
    assert digests(s) == digests(ref)

    forget(s, items=[shared.hash], source="b", retrain=False)
    assert not s.item_path(shared.hash).exists() and shared.hash not in {r.hash for r in s.items()}
    with pytest.raises(NotFound):
        forget(s, items=[digits[1].hash], source="b")  # A's item is not B's to forget


def test_a_schema_1_store_opens_with_every_item_and_caption(tmp_path, digits):
    s = make_store(tmp_path / "s", digits[:12], "iid:2")
    items, hashes = s.items(), [r.hash for r in s.items()]
    caption = {h: f"caption {i}" for i, h in enumerate(hashes[:5])}
    with s.tx() as db:  # back to schema 1 as an older cdm wrote it: items and captions keyed by hash
        db.execute("DROP TABLE captions")
        db.execute("ALTER TABLE items RENAME TO items_v2")
        db.execute("DROP INDEX items_by_compartment")
        db.execute("DROP INDEX items_by_hash")
        db.execute("CREATE TABLE items(hash TEXT PRIMARY KEY, source TEXT NOT NULL REFERENCES sources(name), "
                   "compartment TEXT NOT NULL REFERENCES compartments(name), slice INTEGER NOT NULL, "
                   "label INTEGER REFERENCES labels(id), added TEXT NOT NULL)")
        db.execute("CREATE INDEX items_by_compartment ON items(compartment, hash)")
        db.execute("INSERT INTO items SELECT * FROM items_v2")
        db.execute("DROP TABLE items_v2")
        db.execute("CREATE TABLE captions(hash TEXT PRIMARY KEY REFERENCES items(hash), text TEXT NOT NULL)")
        db.executemany("INSERT INTO captions VALUES (?, ?)", sorted(caption.items()))
        db.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    s.close()
    s = Store.open(tmp_path / "s")
    assert s.items() == items and s.get_meta("schema_version") == 2
    assert s.captions() == {("digits", h): t for h, t in caption.items()}
    forget(s, items=[hashes[0]], retrain=False)
    assert s.captions() == {("digits", h): t for h, t in caption.items() if h != hashes[0]}
