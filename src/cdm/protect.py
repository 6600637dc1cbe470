"""Forgetting: remove items, sources or compartments and every model state that saw them.

Forgetting an item deletes its file and registry row, deletes the live model of its
compartment and every slice checkpoint from the item's slice onwards, then retrains: the
compartment resumes from the checkpoint before the item's slice (SISA, Bourtoule et al.
2021), so the result is bit-identical to training from scratch without the item
(architecture.md, invariants 3 and 7). The classifier router and the paragon were
trained on the item too: they are deleted and retrained. The `ito` router holds no data.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field

from . import api
from .store import PARAGON, ROUTER, Store, StoreError
from .train import Progress, prune_checkpoints


@dataclass
class ForgetResult:
    items: list[str] = field(default_factory=list)  # hashes forgotten
    dropped: list[str] = field(default_factory=list)  # compartments dropped whole
    retrained: list[dict] = field(default_factory=list)  # name, from, steps, seconds
    invalidated: list[str] = field(default_factory=list)  # models deleted, retrained below unless retrain=False
    router: str = "none"  # "retrained", "deleted: retrain with cdm train", or "none" (no classifier router)
    seconds: float = 0.0


def forget(store: Store, items: list[str] | None = None, source: str | None = None,
           compartment: str | None = None, retrain: bool = True, device: str = "cpu",
           progress: Progress | None = None, actor: str | None = None) -> ForgetResult:
    t0 = time.perf_counter()
    if sum(x is not None and x != [] for x in (items, source, compartment)) != 1:
        raise StoreError("forget needs exactly one of: item hashes, a source, a compartment")
    rows = {r.hash: r for r in store.items()}
    comps = store.compartments()
    if items:
        unknown = [h for h in items if h not in rows]
        if unknown:
            raise StoreError(f"unknown item hash(es): {', '.join(unknown)}")
        gone = [rows[h] for h in dict.fromkeys(items)]
        dropped: list[str] = []
    elif source is not None:
        if source not in store.sources():
            raise StoreError(f"unknown source {source!r}; known: {', '.join(store.sources()) or 'none'}")
        dropped = [c for c, s in comps.items() if s == source]
        gone = [r for r in rows.values() if r.source == source]
    else:
        store.require_compartments([compartment])
        dropped = [compartment]
        gone = [r for r in rows.values() if r.compartment == compartment]
    touched = sorted({r.compartment for r in gone} - set(dropped))
    existing = store.models()
    invalid = [n for n in [*touched, *dropped, PARAGON, ROUTER] if n in existing]
    before = {n: existing[n].digest for n in invalid}

    with store.tx() as db:
        db.executemany("DELETE FROM items WHERE hash=?", [(r.hash,) for r in gone])
        db.executemany("DELETE FROM models WHERE name=?", [(n,) for n in invalid])
        db.executemany("DELETE FROM compartments WHERE name=?", [(c,) for c in dropped])
        if source is not None:
            db.execute("DELETE FROM sources WHERE name=?", (source,))
        store.log(db, "forget", dict(
            items=[dict(hash=r.hash, source=r.source, compartment=r.compartment, slice=r.slice) for r in gone],
            dropped=dropped, source=source, models_before=before), actor)
    # after the commit: nothing that held the data may remain restorable
    for r in gone:
        store.item_path(r.hash).unlink(missing_ok=True)
    for n in invalid:
        store.gc_model_dirs(n)
    for c in dropped:
        for sub in ("models", "checkpoints", "work"):
            shutil.rmtree(store.root / sub / c, ignore_errors=True)
    for n in [*touched, PARAGON]:
        if (store.root / "checkpoints" / n).exists():
            prune_checkpoints(api.build_job(store, n, load_pixels=False), store.root / "checkpoints" / n)
    for n in [*touched, PARAGON, ROUTER]:  # interrupted-training state may have seen the items too
        shutil.rmtree(store.root / "work" / n, ignore_errors=True)

    res = ForgetResult([r.hash for r in gone], dropped, [], invalid)
    if ROUTER in existing:
        res.router = "deleted: retrain with cdm train"
    if retrain:
        counts = store.counts()
        todo = [n for n in touched if counts.get(n)]
        if PARAGON in existing and counts:
            todo.append(PARAGON)
        if ROUTER in existing and sum(1 for v in counts.values() if v) >= 2:
            todo.append(ROUTER)
        for name in todo:
            r = api.run_job(store, api.build_job(store, name), device, progress, actor)
            res.retrained.append(dict(name=r.name, resumed_from=r.resumed_from, steps=r.steps,
                                      seconds=round(r.seconds, 3)))
        if ROUTER in todo:
            res.router = "retrained"
    res.seconds = time.perf_counter() - t0
    return res
