"""Forgetting: remove items, sources or compartments and every model state that saw them.

Forgetting an item deletes its file and registry row, deletes the live model of its
compartment and every slice checkpoint from the item's slice onwards, then retrains: the
compartment resumes from the checkpoint before the item's slice (SISA, Bourtoule et al.
2021), so the result is bit-identical to training from scratch without the item
(docs/architecture.md, invariants 3 and 7). The classifier router and the paragon were
trained on the item too: they are deleted and retrained. The `ito` router holds no data.
In a store of adapter compartments, a private item lives only in its adapter; an item of a
public source was also in the base model, so the base and every adapter are retrained.

Crash safety: the registry change and a cleanup intent naming every file that held the
data commit together; a forget killed after that is finished by the next writer
(`Store.recover`), and its retraining is resumed by `cdm train`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .build import run_jobs
from .executor import Executor, LocalExecutor
from .kinds import build_job, kind_of, plan, saw
from ..store.registry import PARAGON, ROUTER, ItemRow, Store, crashpoint
from ..errors import DataError, NotFound
from .job import Progress, stale_checkpoints


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
           progress: Progress | None = None, actor: str | None = None,
           executor: Executor | None = None, among: list[str] | None = None) -> ForgetResult:
    """Forget items (by hash), a source or a compartment; retrain what saw them on `executor`
    (default: locally, on `device`).

    Each source's copy of an image is its own item: `items` with `source` forgets that
    source's copies only. Without `source`, a hash two sources hold is refused as ambiguous.
    `among` (compartments) narrows where items are looked up: an admin's scope, so that a copy
    outside it is neither touched nor revealed."""
    with store.writing("forget"):
        return _forget(store, items, source, compartment, retrain, device, progress, actor, executor, among)


def _held_data(store: Store, gone, invalid: list[str], dropped: list[str], touched: list[str]) -> list[str]:
    """Every file that may hold the forgotten items' influence, relative to the store root.
    Call inside the forget transaction: checkpoints are judged against the registry without the items."""
    paths = [store.item_path(r.hash) for r in gone]  # kept while another source's copy holds the same pixels
    for n in invalid:
        paths += store.model_versions(n)
    for c in dropped:
        paths += [store.models_dir(c), store.checkpoint_dir(c), store.work_dir(c)]
    for n in dict.fromkeys([*touched, PARAGON, *(n for n in invalid if n not in dropped)]):
        ckpt = store.checkpoint_dir(n)
        if ckpt.exists() and kind_of(n).checkpoints:
            paths += stale_checkpoints(build_job(store, n, load_pixels=False), ckpt)
    paths += [store.work_dir(n) for n in dict.fromkeys([*touched, *invalid, PARAGON, ROUTER])]  # interrupted runs
    paths.append(store.eval_dir())  # the evaluation feature extractor was trained on the items
    return [store.relative(p) for p in paths]


def _item_rows(store: Store, items: list[str], source: str | None, among: list[str] | None) -> list[ItemRow]:
    """The copies to forget: of `source` if given, else each hash's only copy (within `among`)."""
    hashes = list(dict.fromkeys(items))
    rows = [r for r in store.item_rows(hashes, source) if among is None or r.compartment in among]
    held: dict[str, list[ItemRow]] = {}
    for r in rows:
        held.setdefault(r.hash, []).append(r)
    unknown = [h for h in hashes if h not in held]
    if unknown:
        raise NotFound(f"unknown item hash(es){f' of source {source!r}' if source else ''}: {', '.join(unknown)}")
    shared = {h: [r.source for r in rs] for h, rs in held.items() if len(rs) > 1}
    if shared:
        raise DataError("item(s) held by more than one source (each source's copy is its own item): "
                        + "; ".join(f"{h} by {', '.join(s)}" for h, s in shared.items())
                        + "; name the source whose copy to forget (--source)")
    return [held[h][0] for h in hashes]


def _forget(store: Store, items, source, compartment, retrain, device, progress, actor, executor,
            among) -> ForgetResult:
    t0 = time.perf_counter()
    if sum(x is not None and x != [] for x in (items, compartment)) + (source is not None and not items) != 1:
        raise DataError("forget needs exactly one of: item hashes (of one source, optionally), a source, a compartment")
    comps = store.compartments()
    dropped: list[str] = []
    if source is not None:
        store.require_source(source)
    if items:
        gone = _item_rows(store, items, source, among)
        source = None  # the source itself stays
    elif source is not None:
        dropped = [c for c, s in comps.items() if s == source]
        gone = [r for r in store.items() if r.source == source]
    else:
        store.require_compartments([compartment])
        dropped = [compartment]
        gone = store.items(compartment)
    touched = sorted({r.compartment for r in gone} - set(dropped))
    existing = store.models()
    invalid = saw(store, gone)
    before = {n: existing[n].digest for n in invalid}

    with store.tx() as db:
        store.delete_records(db, gone, invalid, dropped, source)
        intent = store.add_cleanup(db, _held_data(store, gone, invalid, dropped, touched))
        store.log(db, "forget", dict(
            items=[dict(hash=r.hash, source=r.source, compartment=r.compartment, slice=r.slice) for r in gone],
            dropped=dropped, source=source, models_before=before), actor)
    crashpoint("forget:committed")
    store.finish_cleanup(intent)  # nothing that held the data remains restorable (models in memory: their
    # digests are no longer live, so cdm.sampling.loading never serves them again and drops them at its next load)
    crashpoint("forget:cleaned")

    res = ForgetResult([r.hash for r in gone], dropped, [], invalid)
    if ROUTER in existing:
        res.router = "deleted: retrain with cdm train"
    if retrain:  # what saw the items and can still be trained, as `cdm train` would build it
        todo = plan(store, invalid, strict=False)
        for r in run_jobs(store, todo, executor or LocalExecutor(device), progress, actor):
            res.retrained.append(dict(name=r.name, resumed_from=r.resumed_from, steps=r.steps,
                                      seconds=round(r.seconds, 3)))
        if ROUTER in todo:
            res.router = "retrained"
    res.seconds = time.perf_counter() - t0
    return res
