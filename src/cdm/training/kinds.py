"""The plan: every kind of model a store holds, what it is trained on, what it depends on,
and whether it is up to date. `cdm train` and `cdm forget` both ask it what to (re)build.

A model is named by what it serves: a compartment's name, `paragon`, `router` or `base`.
Its *job* (cdm.train.TrainJob) holds everything it depends on (items, recipe, seed, and
for an adapter its base's digest); the registry records the digest of the job it was
trained from (its spec), so a model is up to date exactly when a fresh job has the same
spec (docs/architecture.md, invariant 1). Adding a model kind is one `Kind` below plus
its training code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from ..models.nets import text_unet_config, unet_config
from ..store.recipes import (adapter_config, latent_config, latent_dir, model_seed, model_shape, null_label, router_config,
                      text_config, text_dir, train_config)
from ..store.registry import BASE, PARAGON, ROUTER, ItemRow, NotReady, Store, StoreError
from .loop import TrainJob, recipe_fields


@dataclass(frozen=True)
class Kind:
    """One kind of model: which items it learns from, and whether the store can train one now."""

    name: str
    rows: Callable[[Store, str], list[ItemRow]]  # the items it is trained on
    trainable: Callable[[Store, str, dict[str, int]], bool]  # given item counts per compartment


def _base_rows(store: Store, name: str) -> list[ItemRow]:
    a = adapter_config(store)
    return [] if a is None or a.base_from else [r for r in store.items() if r.source in a.public]


def _base_trainable(store: Store, name: str, counts: dict[str, int]) -> bool:
    return bool(_base_rows(store, name))


def _router_rows(store: Store, name: str) -> list[ItemRow]:
    comps = _router_classes(store)
    return sorted((r for r in store.items() if r.compartment in comps), key=lambda r: (r.compartment, r.hash))


def _router_classes(store: Store) -> list[str]:
    return [c for c, n in sorted(store.counts().items()) if n > 0]


KINDS = {k.name: k for k in (
    # a compartment's own model: a full UNet, or a LoRA adapter on the base (`cdm adapters`)
    Kind("compartment", lambda s, n: s.items(n), lambda s, n, counts: counts.get(n, 0) > 0),
    # the monolithic model on everything: the reference CDM is measured against
    Kind("paragon", lambda s, n: s.items(), lambda s, n, counts: bool(counts)),
    # the classifier router: p(compartment | x_t), over compartments that hold items
    Kind("router", _router_rows, lambda s, n, counts: sum(1 for v in counts.values() if v) >= 2),
    # the adapters' shared base, on the public sources (unless imported)
    Kind("base", _base_rows, _base_trainable),
)}


def kind_of(name: str) -> str:
    return {PARAGON: "paragon", ROUTER: "router", BASE: "base"}.get(name, "compartment")


def build_job(store: Store, name: str, load_pixels: bool = True) -> TrainJob:
    """The self-contained job for one model: its items, recipe and seed."""
    cfg, null, kind = store.config, null_label(store), kind_of(name)
    adapters = adapter_config(store)
    if kind == "base" and (adapters is None or adapters.base_from):
        raise StoreError("this store's base model is not trained here: " + (
            "no adapters are set (see `cdm adapters`)" if adapters is None else "it was imported"))
    rows = KINDS[kind].rows(store, name)
    hashes, labels = [r.hash for r in rows], [null if r.label is None else r.label for r in rows]
    text, latent = text_config(store), latent_config(store)
    channels, size, _ = model_shape(store)  # pixels, or the VAE's latents
    if kind == "router":
        comps, t, rc = _router_classes(store), train_config(store), router_config(store)
        model = dict(compartments=comps, image_size=size, in_channels=channels,
                     num_class_embeds=cfg.max_labels + 1, width=rc.width, num_train_timesteps=t.num_train_timesteps)
        if text:
            model["text_dim"] = text.dim
        schedule = {k: v for k, v in recipe_fields(t).items() if k in ("beta_start", "beta_end")}
        job = TrainJob(ROUTER, "router", hashes, labels, [comps.index(r.compartment) for r in rows],
                       np.zeros((0,), np.uint8), model, rc, model_seed(store, ROUTER), 1, null, comps,
                       dict(num_train_timesteps=t.num_train_timesteps, beta_schedule=t.beta_schedule, **schedule))
    else:
        t = train_config(store).for_items(len(rows))  # an epoch budget becomes this model's steps
        job = TrainJob(name, kind, hashes, labels, [r.slice for r in rows], np.zeros((0,), np.uint8),
                       text_unet_config(t.preset, size, channels, text.dim) if text else
                       unet_config(t.preset, size, channels, cfg.max_labels), t,
                       model_seed(store, name), cfg.slices, null)
        if adapters is not None and kind == "compartment":  # a LoRA adapter: depends on its base
            base = store.model(BASE)
            job.model_config = {}  # the base (pinned by its digest) is the architecture
            job.extra = dict(adapter=dict(**adapters.recipe(), base=base.digest if base else None))
            job.base_dir = str(store.folder(base)) if base else None
    if text:  # conditioned on captions through the store's frozen encoder (cdm.text)
        caps = store.captions(hashes)
        job.captions = [caps.get(h) for h in hashes]
        job.extra = dict(job.extra, text=dict(encoder=text.digest))
        job.text_dir = str(text_dir(store, text))
    if latent:  # trained on the frozen VAE's latents (cdm.latent)
        job.extra = dict(job.extra, latent={k: v for k, v in asdict(latent).items() if k != "source"})
        job.latent_dir = str(latent_dir(store, latent))
    if load_pixels and job.hashes:
        job.pixels = np.stack([store.read_item(h) for h in job.hashes])
    return job


def model_state(store: Store, name: str) -> str:
    """'missing' (no model), 'stale' (trained on other items or another recipe) or 'ready'."""
    row = store.model(name)
    if row is None:
        return "missing"
    if name == BASE:
        a = adapter_config(store)
        if a is None:
            return "stale"
        if a.base_from:
            return "ready" if row.spec == f"import:{a.base_from}" else "stale"
    return "ready" if row.spec == build_job(store, name, load_pixels=False).spec else "stale"


def saw(store: Store, hashes: list[str]) -> list[str]:
    """The models whose training saw any of the items `hashes`, then the models built on those
    (adapters on a base that saw them): everything forgetting the items must delete."""
    models, gone = store.models(), set(hashes)
    names = [*sorted(n for n in models if kind_of(n) == "compartment"), PARAGON, ROUTER, BASE]
    direct = [n for n in names if n in models and any(r.hash in gone for r in KINDS[kind_of(n)].rows(store, n))]
    on_base = [n for n, m in sorted(models.items()) if BASE in direct and m.info.get("adapter") and n not in direct]
    return direct + on_base


def plan(store: Store, candidates: list[str], strict: bool = True) -> list[str]:
    """Of the `candidates`, those to (re)train now, in training order (the base first).

    A candidate is dropped if it is up to date or its kind cannot be trained (a compartment
    without items, a router over fewer than two). Adapters need an up-to-date base: a stale
    base is retrained first, with every adapter after it. Where the base cannot be built,
    `strict` raises; otherwise its adapters are dropped (forgetting the last public item).
    """
    counts = store.counts()
    live = store.compartments()
    order = {n: i for i, n in enumerate([BASE, *sorted(live), PARAGON, ROUTER])}
    want = [n for n in dict.fromkeys(candidates) if n in order]  # a dropped compartment is not
    todo = [n for n in want if _trainable(store, n, counts) and model_state(store, n) != "ready"]
    adapters = adapter_config(store)
    comps = [n for n in todo if kind_of(n) in ("compartment", "base")]
    if adapters is not None and comps:
        if adapters.base_from:
            if model_state(store, BASE) != "ready":
                if strict:
                    raise NotReady("the imported base model is missing or corrupted; import it again with "
                                   "`cdm adapters --base-from DIR`")
                todo = [n for n in todo if kind_of(n) not in ("compartment", "base")]
        elif model_state(store, BASE) != "ready":
            if not _trainable(store, BASE, counts):
                if strict:
                    raise StoreError(f"the base model trains on source(s) {', '.join(adapters.public)}, "
                                     f"which hold no items")
                todo = [n for n in todo if kind_of(n) not in ("compartment", "base")]
            else:  # a new base makes every adapter stale
                todo = [*todo, BASE, *(n for n in want if kind_of(n) == "compartment" and counts.get(n, 0))]
    return sorted(dict.fromkeys(todo), key=order.__getitem__)


def _trainable(store: Store, name: str, counts: dict[str, int]) -> bool:
    return KINDS[kind_of(name)].trainable(store, name, counts)


def train_plan(store: Store, compartments: list[str] | None = None, paragon: bool = False,
               router: bool | None = None) -> list[str]:
    """What `cdm train` builds: the named compartments (default: all), the paragon if asked,
    and the router unless only some compartments were named."""
    counts = store.counts()
    names = store.require_compartments(compartments) if compartments else sorted(store.compartments())
    empty = [n for n in names if counts.get(n, 0) == 0]
    if compartments and empty:
        raise StoreError(f"compartment(s) {', '.join(empty)} hold no items; nothing to train")
    if router is None:
        router = not compartments
    return plan(store, [*names, *([PARAGON] if paragon else []), *([ROUTER] if router else [])])
