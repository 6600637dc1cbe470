"""The Python API: create a store, ingest, train, sample, forget, report status.

    from cdm import api
    store = api.init_store("my-store")
    api.ingest(store, "digits", api.load_builtin("digits"), "iid:4")
    api.train(store, paragon=True)
    out = api.sample(store, 8, "3", router="ito")

Sampling many times from one composition: `api.CDMPipeline.from_store(...)` loads it once.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import asdict, replace
from pathlib import Path

from diffusers import UNet2DModel

from ..store.recipes import AdapterConfig, RouterConfig, TextConfig, TrainConfig, check_kind, recipe_fields
from ..training.build import TrainError, run_jobs, train  # noqa: F401 (re-exported)
from ..store.data import DataError, load_builtin, to_uint8_images  # noqa: F401 (re-exported)
from ..ingest.folders import load_folder  # noqa: F401 (re-exported)
from ..training.forget import ForgetResult, forget  # noqa: F401 (re-exported)
from ..ingest.ingest import IngestResult, ingest  # noqa: F401 (re-exported)
from ..sampling.loading import load_bank, load_unet  # noqa: F401 (re-exported)
from ..models.nets import unet_class
from ..models.presets import default_preset, unet_config
from ..sampling.pipeline import ADAPTER_MODES, CDMPipeline, Generation  # noqa: F401 (re-exported)
from ..sampling.settings import SamplingSettings
from ..training.kinds import build_job, model_state, train_plan  # noqa: F401 (re-exported)
from ..sampling.policy import Policy, store_policy
from ..store.recipes import (adapter_config, latent_config, model_seed, model_shape, null_label, router_config,  # noqa: F401
                      text_config, train_config)
from ..training.sd import import_sd, install_base, is_sd_folder
from ..models import text
from ..sampling.routers import DEFAULT_ROUTER
from ..store.registry import BASE, PARAGON, ROUTER, WEIGHTS, Store, StoreConfig, StoreError, crashpoint, file_digest
from ..models.text import build_default, check_folder

plan = train_plan  # the models `train` would (re)train, in order


def init_store(path: str | Path, image_size: int = 8, channels: int = 1, seed: int = 0, slices: int = 4,
               max_labels: int = 16, train: TrainConfig | None = None,  # noqa: F811 (the recipe)
               router: RouterConfig | None = None) -> Store:
    """Create a store; the training recipe is saved in it so every model is built the same way."""
    store = Store.init(path, StoreConfig(image_size, channels, seed, slices, max_labels))
    train = train or TrainConfig(preset=default_preset(image_size))
    unet_config(train.preset, image_size, channels, max_labels)  # fail now, not at train time
    with store.writing("init"), store.tx() as db:
        store.set_meta(db, "train", asdict(train))
        store.set_meta(db, "router", asdict(router or RouterConfig()))
    return store


def set_adapters(store: Store, public: list[str] | None = None, base_from: str | Path | None = None,
                 rank: int = 4, alpha: float | None = None, off: bool = False,
                 actor: str | None = None, kind: str = "lora", tokens: int = 4) -> AdapterConfig | None:
    """Make every compartment a LoRA adapter on a base model trained on the `public` sources
    (or imported from the diffusers folder `base_from`); `off` goes back to full models.
    `alpha` defaults to 4 x rank (LoRA scale 4).
    Changing this makes every compartment stale; `cdm train` then rebuilds them.
    `base_from` may also be a Stable Diffusion folder: its UNet, text encoder, VAE and schedule
    are imported together (cdm.sd). `kind` "prompt" makes each compartment a learned prompt
    of `tokens` vectors instead (text-conditioned stores)."""
    if not off:
        try:
            check_kind(kind, tokens)
        except ValueError as e:
            raise StoreError(str(e)) from None
    if base_from is not None and not off and is_sd_folder(Path(base_from)):
        if public:
            raise StoreError("a Stable Diffusion base is imported, not trained: give --base-from or --public")
        return import_sd(store, Path(base_from), rank, alpha, actor, kind, tokens)
    if not off and kind == "prompt" and text_config(store) is None:
        raise StoreError("prompt compartments need a text-conditioned store: run `cdm text` first")
    with store.writing("adapters"):
        if off:
            cfg = None
        else:
            if public:
                missing = [src for src in public if src not in store.sources()]
                if missing:
                    raise StoreError(f"unknown source(s) {', '.join(missing)}; ingest them first "
                                     f"(known: {', '.join(store.sources()) or 'none'})")
            digest = None
            if base_from is not None:
                digest = _check_base_folder(store, Path(base_from))
            cfg = AdapterConfig(rank, 4.0 * rank if alpha is None else alpha, public=tuple(sorted(set(public or ()))),
                                base_from=digest, kind=kind, tokens=tokens)
        def settings(db) -> None:
            store.set_meta(db, "adapter", None if cfg is None else asdict(cfg))
            store.log(db, "config", {"adapter": None if cfg is None else asdict(cfg)}, actor)

        if base_from is not None and cfg is not None:  # the base's row and the setting commit together
            install_base(store, Path(base_from), cfg.base_from, train_config(store), also=settings)
        else:
            with store.tx() as db:
                settings(db)
        return cfg


def set_text(store: Store, encoder: str | Path | None = None, off: bool = False,
             actor: str | None = None) -> TextConfig | None:
    """Condition every denoiser on its items' captions through a frozen text encoder: the one in
    folder `encoder` (its `text_encoder/` and `tokenizer/`, e.g. a Stable Diffusion folder) or,
    by default, the embedded data-free encoder (cdm.text). `off` goes back to class labels.
    Every stored caption must fit the encoder (the error names each item that does not, and
    nothing changes). Changing this makes every model stale; `cdm train` rebuilds them."""
    with store.writing("text"):
        cfg = None
        if not off:
            tmp = None
            if encoder is None:
                tmp = store.root / f".tmp-text-default-{uuid.uuid4().hex}"
                encoder = build_default(tmp)
            try:
                cfg, enc = check_folder(Path(encoder))
                if tmp is not None:
                    cfg = replace(cfg, source="default")
                enc.check_store(store)
                text.install(Path(encoder), store.root / "text", cfg.digest)
                crashpoint("text:installed")
            finally:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
        with store.tx() as db:
            store.set_meta(db, "text", None if cfg is None else asdict(cfg))
            store.log(db, "config", {"text": None if cfg is None else asdict(cfg)}, actor)
        return cfg


def _check_base_folder(store: Store, folder: Path) -> str:
    """Validate a diffusers UNet2DModel folder as a base for this store; returns its weights digest."""
    f = folder / WEIGHTS
    if not f.is_file() or not (folder / "config.json").is_file():
        raise StoreError(f"{folder} is not a diffusers UNet folder (needs config.json and {WEIGHTS}) "
                         "nor a Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    conf = UNet2DModel.load_config(folder)
    cfg, text = store.config, text_config(store)
    channels, size, _ = model_shape(store)
    want = dict(sample_size=size, in_channels=channels, out_channels=channels,
                **({"num_class_embeds": cfg.max_labels + 1} if text is None else {"cross_attention_dim": text.dim}))
    bad = {k: (conf.get(k), v) for k, v in want.items() if conf.get(k) != v}
    if bad:
        raise StoreError(f"base model {folder} does not fit this store: "
                         + ", ".join(f"{k}={have} (store needs {need})" for k, (have, need) in bad.items()))
    try:
        unet_class(conf).from_pretrained(folder, low_cpu_mem_usage=False)
    except Exception as e:  # corrupted weights
        raise StoreError(f"base model {folder} does not load: {e}") from e
    return file_digest(f)


def sample(store: Store, n: int, label: str | list[str] | None = None, allow: list[str] | None = None,
           router: str = DEFAULT_ROUTER, *, paragon: bool = False, user: str | None = None,
           policy: Policy | None = None, adapter_mode: str = "merged", grouped: bool = False, device: str = "cpu",
           callback=None, prompt: str | list[str] | None = None, **settings) -> Generation:
    """Sample n images from the composition of `allow` (default: every compartment) in one call:
    `CDMPipeline.from_store(...)` then a call with `SamplingSettings(**settings)` (steps,
    guidance, sampler, seed, prune, commit, subset, batch_size). A text-conditioned store
    takes `prompt` instead of `label`."""
    pipe = CDMPipeline.from_store(store, allow, user=user, policy=policy, router=router, paragon=paragon,
                                  adapter_mode=adapter_mode, grouped=grouped, device=device)
    return pipe(n, label, SamplingSettings(**settings), callback, prompt=prompt)


# --- status -----------------------------------------------------------------------------


def status(store: Store) -> dict:
    cfg = store.config
    counts, hist, names = store.counts(), store.label_counts(), store.label_names()
    comps = {}
    for c, src in store.compartments().items():
        row = store.model(c)
        comps[c] = dict(source=src, items=counts.get(c, 0), model=model_state(store, c),
                        digest=row.digest if row else None,
                        labels={("-" if k is None else names[k]): v for k, v in sorted(hist.get(c, {}).items(),
                                                                                       key=lambda kv: (kv[0] is None, kv[0] or 0))})
    models = {}
    for special in (PARAGON, ROUTER):
        row = store.model(special)
        models[special] = dict(state=model_state(store, special) if counts else "missing",
                               digest=row.digest if row else None)
    hist_all: dict[str, int] = {}
    for c in hist.values():
        for k, v in c.items():
            key = "-" if k is None else names[k]
            hist_all[key] = hist_all.get(key, 0) + v
    pol, users = store_policy(store), {}
    missing = pol.missing(store) if pol else {}
    for u in sorted(pol.users) if pol else []:
        allowed = pol.allowed(store, u)
        users[u] = dict(compartments=allowed, restricted=len(allowed) < len(comps))
        if u in missing:
            users[u]["missing"] = missing[u]  # names that grant nothing (forgotten or never ingested)
    a = adapter_config(store)
    adapters = None if a is None else dict(asdict(a), public=list(a.public), base=model_state(store, BASE))
    t = text_config(store)
    return dict(store=str(store.root), config=asdict(cfg), train=recipe_fields(train_config(store)), policy=users or None,
                adapters=adapters, text=None if t is None else asdict(t),
                latent=None if latent_config(store) is None else asdict(latent_config(store)),
                sources=store.sources(), items=sum(counts.values()), labels=hist_all, compartments=comps,
                paragon=models[PARAGON], router=dict(
                    **models[ROUTER],
                    note="the classifier router is trained on every compartment's data: a restricted composition "
                         "using it still reads a network fit to compartments outside the allowed set; "
                         "the ito router holds no data"))
