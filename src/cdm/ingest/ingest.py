"""Ingest: validate items, skip the source's duplicates, assign each to a compartment and slice, record it.

Validation runs over every item before anything is written; the registry write is one
transaction, item files are content-addressed and written atomically before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from ..errors import DataError

from ..store.data import Item, SplitRule, assign_slice, check_caption, check_label, check_name
from .folders import canonical
from ..models.text import load_encoder
from ..store.recipes import text_config, text_dir
from ..store.registry import RESERVED, Store, crashpoint, now


@dataclass
class IngestResult:
    added: int
    duplicates: int
    compartments: dict[str, int] = field(default_factory=dict)  # items now in each of the source's compartments


def resize_items(items: list[Item], size: int, channels: int) -> list[Item]:
    """Convert builtin items to the store's format (used with --resize), as folders are converted."""
    return [Item(canonical(Image.fromarray(it.pixels[..., 0] if it.pixels.shape[2] == 1 else it.pixels), size,
                           channels, resize=True), it.label, it.origin, it.caption) for it in items]


def ingest(store: Store, source: str, items: list[Item], split: str, actor: str | None = None) -> IngestResult:
    with store.writing(f"ingest {source}"):
        return _ingest(store, source, items, split, actor)


def _ingest(store: Store, source: str, items: list[Item], split: str, actor: str | None) -> IngestResult:
    check_name("source", source)
    rule = SplitRule.parse(split)
    cfg = store.config
    existing_rule = store.sources().get(source)
    if existing_rule is not None and existing_rule != str(rule):
        raise DataError(f"source {source!r} was ingested with split {existing_rule}; cannot add with {rule}")
    want = (cfg.image_size, cfg.image_size, cfg.channels)
    bad = [f"{it.origin}: shape {it.pixels.shape}, store wants {want}" for it in items if it.pixels.shape != want]
    if bad:
        raise DataError(f"{len(bad)} item(s) do not fit the store, nothing was ingested "
                        f"(pass --resize to convert):\n  " + "\n  ".join(bad[:20]))
    bad_labels: dict[str, str] = {}
    for it in items:
        if it.label is not None and it.label not in bad_labels:
            try:
                check_label(it.label)
            except DataError as e:
                bad_labels[it.label] = f"{e} (from {it.origin})"
    if bad_labels:
        raise DataError(f"{len(bad_labels)} invalid label(s), nothing was ingested:\n  "
                        + "\n  ".join(list(bad_labels.values())[:20]))
    bad_captions, captions = [], {}  # canonical caption of each captioned item (by object)
    for it in items:
        if it.caption is not None:
            try:
                captions[id(it)] = check_caption(it.caption)
            except DataError as e:
                bad_captions.append(f"{it.origin}: {e}")
    text = text_config(store) if captions else None
    encoder = None if text is None else load_encoder(text_dir(store, text), text.digest)
    if encoder is not None:  # a text-conditioned store: every caption must fit its encoder
        bad_captions += encoder.misfits([(it.origin, captions[id(it)]) for it in items if id(it) in captions])
    if bad_captions:
        raise DataError(f"{len(bad_captions)} invalid caption(s), nothing was ingested:\n  "
                        + "\n  ".join(bad_captions[:20]))
    if rule.kind == "by-class":
        unlabelled = [it.origin for it in items if it.label is None]
        if unlabelled:
            raise DataError(f"split {rule} needs labels; unlabelled: {', '.join(unlabelled[:20])}")

    # duplicates: within this batch, then against this source's items. Another source's copy of
    # the same pixels is another item: it is neither reported nor touched (docs/security.md)
    unique: dict[str, Item] = {}
    for it in items:
        unique.setdefault(it.hash, it)
    present = store.has_items(list(unique), source)
    new = {h: it for h, it in unique.items() if h not in present}
    duplicates = len(items) - len(new)

    labels = store.labels()
    new_labels = sorted({it.label for it in new.values() if it.label is not None} - set(labels))
    if len(labels) + len(new_labels) > cfg.max_labels:
        raise DataError(f"store allows {cfg.max_labels} labels; this ingest would make {len(labels) + len(new_labels)} "
                        f"(new: {', '.join(new_labels[:20])}); re-create the store with a larger --max-labels")
    next_id = max(labels.values(), default=-1) + 1
    for i, name in enumerate(new_labels):
        labels[name] = next_id + i

    comps = rule.compartment_names(source)
    reserved = [c for c in comps if c in RESERVED]
    if reserved:
        raise DataError(f"compartment name(s) {', '.join(reserved)} are reserved; rename source {source!r}")
    owners = store.compartments()
    clash = [c for c in comps if owners.get(c, source) != source]
    if clash:
        raise DataError(f"compartment name(s) {', '.join(clash)} already belong to another source; rename source {source!r}")

    rows = []
    for h, it in sorted(new.items()):
        lid = None if it.label is None else labels[it.label]
        rows.append((h, source, rule.assign(source, h, lid, cfg.seed), assign_slice(h, cfg.slices, cfg.seed), lid))

    # files first, named in a cleanup intent that the commit below voids: a killed ingest
    # leaves the old state, and whoever next takes the writer lock deletes the orphans
    with store.tx() as db:
        intent = store.add_cleanup(db, [store.relative(store.item_path(h)) for h in new])
    for h, it in new.items():
        store.write_item_file(h, it.pixels)
    crashpoint("ingest:files-written")
    t = now()
    with store.tx() as db:
        store.drop_cleanup(db, intent)
        store.record_ingest(db, source, str(rule) if existing_rule is None else None, comps,
                            {n: labels[n] for n in new_labels}, rows, t,
                            {h: captions[id(it)] for h, it in new.items() if id(it) in captions})
        store.log(db, "ingest", {"source": source, "split": str(rule), "added": len(rows),
                                 "duplicates": duplicates, "items": [r[0] for r in rows]}, actor)
    counts = store.counts()
    return IngestResult(len(rows), duplicates, {c: counts.get(c, 0) for c in comps})
