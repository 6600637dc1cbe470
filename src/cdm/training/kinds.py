"""Model kinds, and the plan: what each kind of model trains on, the job that builds it,
whether it is up to date, and what forgetting does to it. `cdm train` and `cdm forget`
both ask the plan what to (re)build.

A model is named by what it serves: a compartment's name, or the name of a kind that has one
model per store (`paragon`, `router`, `base`, `encoder`), and `kind_of(name)` gives its
`Kind`. A kind is one object here plus its training code, a trainer in
cdm.training.trainers named by `Kind.trainer`: adding a kind is one subclass and one line in
`KINDS` (and in `UPSTREAM` if others are built on it), a trainer if none fits, and its model
name in cdm.store.registry.RESERVED (`Encoder`, a text encoder trained on public data, was
added so). A kind built on another model says so in `needs`; the plan trains what is needed
first, and forgetting deletes what was built on what it deletes. Its job
(cdm.training.job.TrainJob) holds everything the model depends on; the registry records the
job's spec, so a model is up to date exactly when a fresh job has the same spec
(docs/architecture.md, invariant 1). Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from ..models.presets import text_unet_config, unet_config
from ..store.recipes import (adapter_config, encoder_config, encoder_pin, latent_config, latent_dir, model_seed,
                             model_shape, null_label, recipe_fields, router_config, text_config, text_dir, train_config)
from ..store.registry import BASE, ENCODER, PARAGON, ROUTER, ItemRow, Store
from ..errors import NotReady, StoreError
from .job import TrainJob


class Kind:
    """One kind of model. The defaults describe a denoiser trained on some of the store's items
    in SISA stages; a subclass overrides what differs.

    - `rows`: the items it trains on; `trainable`: whether the store can train one now.
    - `job`: the self-contained job that builds it (`build_job` adds the store-wide parts).
    - `state`: 'missing', 'stale' or 'ready'.
    - `needs`: the models it is built on (trained first); `blocked`: why one cannot be built.
    - Forgetting: a model whose `rows` held a forgotten item is deleted with its stale slice
      checkpoints (`checkpoints`: it keeps them), then retrained from the last valid one;
      `dependents` are deleted with it (they were built on it).
    """

    name: str
    trainer = "denoiser"  # its training code: cdm.training.trainers.TRAINERS[trainer]
    checkpoints = True  # keeps a checkpoint after each SISA stage
    conditioned = True  # on captions through the store's encoder (a text store), on latents (a latent store)

    def rows(self, store: Store, name: str) -> list[ItemRow]:
        raise NotImplementedError

    def trainable(self, store: Store, name: str, counts: dict[str, int]) -> bool:
        return bool(self.rows(store, name))

    def job(self, store: Store, name: str, rows: list[ItemRow]) -> TrainJob:
        """A denoiser's job: a UNet of the store's preset on `rows` in SISA stages."""
        t = train_config(store).for_items(len(rows))  # an epoch budget becomes this model's steps
        channels, size, _ = model_shape(store)  # pixels, or the VAE's latents
        text = text_config(store)
        model = (text_unet_config(t.preset, size, channels, text.dim) if text else
                 unet_config(t.preset, size, channels, store.config.max_labels))
        return TrainJob(name=name, kind=self.name, hashes=[r.hash for r in rows], labels=_labels(store, rows),
                        slices=[r.slice for r in rows], model_config=model, train=t, seed=model_seed(store, name),
                        stages=store.config.slices, num_slices=store.config.slices, null_label=null_label(store))

    def state(self, store: Store, name: str) -> str:
        row = store.model(name)
        if row is None:
            return "missing"
        return "ready" if row.spec == build_job(store, name, load_pixels=False).spec else "stale"

    def needs(self, store: Store, name: str) -> list[str]:
        """The models this one is built on: a text encoder trained in the store."""
        t = text_config(store)
        return [ENCODER] if self.conditioned and t is not None and t.public else []

    def blocked(self, store: Store) -> Exception | None:
        """Why the store cannot build this model now (kinds others are built on), else None."""
        return None

    def dependents(self, store: Store) -> list[str]:
        return []


class Compartment(Kind):
    """A compartment's own model: a full UNet, or an adapter on the base (`cdm adapters`)."""

    name = "compartment"

    def rows(self, store, name):
        return store.items(name)

    def trainable(self, store, name, counts):
        return counts.get(name, 0) > 0

    def job(self, store, name, rows):
        job = super().job(store, name, rows)
        adapters = adapter_config(store)
        if adapters is not None:  # an adapter: depends on its base, pinned by digest
            base = store.model(BASE)
            job.model_config = {}  # the base is the architecture
            job.adapter = dict(**adapters.recipe(), base=base.digest if base else None)
            job.base_dir = str(store.folder(base)) if base else None
        return job

    def needs(self, store, name):
        return [*super().needs(store, name), *([BASE] if adapter_config(store) is not None else [])]


class Paragon(Kind):
    """The monolithic model on everything: the reference CDM is measured against."""

    name = "paragon"

    def rows(self, store, name):
        return store.items()


class Router(Kind):
    """The classifier router, p(compartment | x_t) over the compartments that hold items
    (the CDM paper's router). Trained once on all its items, no SISA stages."""

    name = "router"
    trainer = "router"
    checkpoints = False

    def rows(self, store, name):
        comps = _router_classes(store)
        return sorted((r for r in store.items() if r.compartment in comps), key=lambda r: (r.compartment, r.hash))

    def trainable(self, store, name, counts):
        return sum(1 for v in counts.values() if v) >= 2

    def job(self, store, name, rows):
        comps, t, rc = _router_classes(store), train_config(store), router_config(store)
        channels, size, _ = model_shape(store)
        text = text_config(store)
        model = dict(compartments=comps, image_size=size, in_channels=channels,
                     num_class_embeds=store.config.max_labels + 1, width=rc.width,
                     num_train_timesteps=t.num_train_timesteps, **({"text_dim": text.dim} if text else {}))
        schedule = {k: v for k, v in recipe_fields(t).items() if k in ("beta_start", "beta_end")}
        return TrainJob(name=name, kind=self.name, hashes=[r.hash for r in rows], labels=_labels(store, rows),
                        slices=[comps.index(r.compartment) for r in rows], model_config=model, train=rc,
                        seed=model_seed(store, name), staged=False, null_label=null_label(store), classes=comps,
                        schedule=dict(num_train_timesteps=t.num_train_timesteps, beta_schedule=t.beta_schedule,
                                      **schedule))


class Base(Kind):
    """The adapters' shared base, trained on the public sources, or imported."""

    name = "base"

    def rows(self, store, name):
        a = adapter_config(store)
        return [] if a is None or a.base_from else [r for r in store.items() if r.source in a.public]

    def job(self, store, name, rows):
        adapters = adapter_config(store)
        if adapters is None or adapters.base_from:
            raise StoreError("this store's base model is not trained here: " + (
                "no adapters are set (see `cdm adapters`)" if adapters is None else "it was imported"))
        return super().job(store, name, rows)

    def state(self, store, name):
        a, row = adapter_config(store), store.model(name)
        if row is not None and (a is None or a.base_from):
            return "ready" if a is not None and row.spec == f"import:{a.base_from}" else "stale"
        return super().state(store, name)

    def blocked(self, store):
        a = adapter_config(store)
        if a is not None and a.base_from:
            return NotReady("the imported base model is missing or corrupted; import it again with "
                            "`cdm adapters --base-from DIR`")
        if a is not None and not self.rows(store, BASE):
            return StoreError(f"the base model trains on source(s) {', '.join(a.public)}, which hold no items")
        return None

    def dependents(self, store):
        return [n for n, m in sorted(store.models().items()) if m.info.get("adapter")]


class Encoder(Kind):
    """A text encoder trained in the store on the captioned items of public sources only
    (`cdm text --train-on`): the data-free default fine-tuned with CLIP's contrastive loss beside
    a small image tower (cdm.training.trainers.Clip). Every denoiser and the router read it,
    frozen, pinned by its folder's digest; forgetting one of its items retrains it from scratch
    (no SISA stages), and then everything built on it."""

    name = "encoder"
    trainer = "clip"
    checkpoints = False
    conditioned = False  # it is the encoder; it sees pixels, never latents

    def rows(self, store, name):
        t = text_config(store)
        if t is None or not t.public:
            return []
        caps = store.captions()
        return sorted((r for r in store.items() if r.source in t.public and caps.get((r.source, r.hash))),
                      key=lambda r: (r.source, r.hash))

    def trainable(self, store, name, counts):
        return len(self.rows(store, name)) >= 2

    def job(self, store, name, rows):
        t, cfg = text_config(store), encoder_config(store)
        if t is None or not t.public:
            raise StoreError("this store's text encoder is not trained here (see `cdm text --train-on`)")
        caps = store.captions(rows)
        return TrainJob(name=name, kind=self.name, hashes=[r.hash for r in rows], labels=[null_label(store)] * len(rows),
                        slices=[0] * len(rows), captions=[caps[(r.source, r.hash)] for r in rows],
                        model_config=dict(image_size=store.config.image_size, in_channels=store.config.channels,
                                          width=cfg.image_width, dim=cfg.dim),
                        train=cfg, seed=model_seed(store, name), staged=False, null_label=null_label(store),
                        text_encoder=t.digest, text_dir=str(text_dir(store, t)),  # the data-free start
                        weights_file="text_encoder/model.safetensors")

    def blocked(self, store):
        t = text_config(store)
        if t is not None and t.public and not self.trainable(store, ENCODER, {}):
            return StoreError(f"the text encoder trains on the captioned items of source(s) {', '.join(t.public)}, "
                              "which hold fewer than 2")
        return None

    def dependents(self, store):
        return [n for n in sorted(store.models()) if n != ENCODER]


KINDS = {k.name: k for k in (Compartment(), Paragon(), Router(), Base(), Encoder())}
NAMED = {k.name: k for k in KINDS.values() if k.name != "compartment"}  # one model each; every other name: a compartment
UPSTREAM = (ENCODER, BASE)  # kinds others are built on, in the order they are trained


def kind_of(name: str) -> Kind:
    return NAMED.get(name, KINDS["compartment"])


def _labels(store: Store, rows: list[ItemRow]) -> list[int]:
    null = null_label(store)
    return [null if r.label is None else r.label for r in rows]


def _router_classes(store: Store) -> list[str]:
    return [c for c, n in sorted(store.counts().items()) if n > 0]


def build_job(store: Store, name: str, load_pixels: bool = True) -> TrainJob:
    """The self-contained job for one model: its kind's job, conditioned on captions through
    the store's frozen encoder (a text store) and trained on its VAE's latents (a latent store)."""
    kind = kind_of(name)
    rows = kind.rows(store, name)
    job = kind.job(store, name, rows)
    text, latent = text_config(store), latent_config(store)
    if text and kind.conditioned:  # conditioned on captions through the store's frozen encoder (cdm.models.text)
        caps = store.captions(rows)
        job.captions = [caps.get((r.source, r.hash)) for r in rows]
        pin = encoder_pin(store)
        if pin is None and load_pixels:
            raise NotReady(f"{name!r} reads the text encoder trained on public sources, which is not trained; "
                           "run `cdm train`")
        job.text_encoder, job.text_dir = (pin[1], str(pin[0])) if pin else ("untrained", None)
    if latent and kind.conditioned:  # trained on the frozen VAE's latents (cdm.models.latent)
        job.latent = {k: v for k, v in asdict(latent).items() if k != "source"}
        job.latent_dir = str(latent_dir(store, latent))
    if load_pixels and job.hashes:
        job.pixels = np.stack([store.read_item(h) for h in job.hashes])
    return job


def model_state(store: Store, name: str) -> str:
    """'missing' (no model), 'stale' (trained on other items or another recipe) or 'ready'."""
    return kind_of(name).state(store, name)


def saw(store: Store, items: list[ItemRow]) -> list[str]:
    """The models whose training saw any of these items (each a source's copy: another source's
    copy of the same pixels is another item), then the models built on those (adapters on a
    base that saw them): everything forgetting the items must delete."""
    models, gone = store.models(), {(r.source, r.hash) for r in items}
    names = [*sorted(n for n in models if kind_of(n) is KINDS["compartment"]), *NAMED]
    direct = [n for n in names if n in models and any((r.source, r.hash) in gone for r in kind_of(n).rows(store, n))]
    built_on = [d for n in direct for d in kind_of(n).dependents(store) if d not in direct]
    return direct + list(dict.fromkeys(built_on))


def plan(store: Store, candidates: list[str], strict: bool = True) -> list[str]:
    """Of the `candidates`, those to (re)train now, in training order (upstream models first).

    A candidate is dropped if it is up to date or its kind cannot be trained (a compartment
    without items, a router over fewer than two). What is built on an upstream model (`UPSTREAM`:
    the trained text encoder, the adapters' base) needs it up to date: a stale one is retrained
    first, with every candidate built on it after it. Where it cannot be built, `strict` raises;
    otherwise what is built on it is dropped (forgetting the last public item).
    """
    counts = store.counts()
    order = {n: i for i, n in enumerate([*UPSTREAM, *sorted(store.compartments()), PARAGON, ROUTER])}
    want = [n for n in dict.fromkeys(candidates) if n in order]  # a dropped compartment is not
    todo = [n for n in want if _trainable(store, n, counts) and model_state(store, n) != "ready"]
    for up in UPSTREAM:
        on = lambda n: n == up or up in kind_of(n).needs(store, n)  # noqa: E731  (itself, or built on it)
        if not any(on(n) and _trainable(store, n, counts) for n in want) or model_state(store, up) == "ready":
            continue
        why = kind_of(up).blocked(store)
        if why is not None:
            if strict:
                raise why
            todo = [n for n in todo if not on(n)]
        else:  # a new upstream model makes everything built on it stale
            todo = [*todo, up, *(n for n in want if on(n) and n != up and _trainable(store, n, counts))]
    return sorted(dict.fromkeys(todo), key=order.__getitem__)


def _trainable(store: Store, name: str, counts: dict[str, int]) -> bool:
    return kind_of(name).trainable(store, name, counts)


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
