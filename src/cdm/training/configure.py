"""A store's recipe: create a store with it, make its compartments adapters on a base model
(trained on public sources or imported, cdm.training.sd), condition it on text. Every
change is logged, and makes the models it touches stale; `cdm train` rebuilds them.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import asdict, replace
from pathlib import Path

from diffusers import UNet2DModel

from ..models import text
from ..models.nets import unet_class
from ..models.presets import default_preset, unet_config
from ..models.text import build_default, check_folder
from ..store.recipes import (AdapterConfig, EncoderConfig, RouterConfig, TextConfig, TrainConfig, check_kind,
                             encoder_config, model_shape, text_config, train_config)
from ..store.registry import ENCODER, WEIGHTS, Store, StoreConfig, crashpoint, file_digest, refuse_links
from ..errors import DataError, StoreError
from .sd import import_sd, install_base, is_sd_folder


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
    are imported together (cdm.training.sd). `kind` "prompt" makes each compartment a learned prompt
    of `tokens` vectors instead (text-conditioned stores)."""
    if not off:
        try:
            check_kind(kind, tokens)
        except ValueError as e:
            raise DataError(str(e)) from None
    if base_from is not None and not off and is_sd_folder(Path(base_from)):
        if public:
            raise DataError("a Stable Diffusion base is imported, not trained: give --base-from or --public")
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
             actor: str | None = None, train_on: list[str] | None = None,
             recipe: EncoderConfig | None = None) -> TextConfig | None:
    """Condition every denoiser on its items' captions through a frozen text encoder: the one in
    folder `encoder` (its `text_encoder/` and `tokenizer/`, e.g. a Stable Diffusion folder), by
    default the embedded data-free encoder (cdm.models.text), or with `train_on` one trained in
    the store on those sources' captioned items only (they become public: every composition
    reads the encoder; cdm.training.kinds.Encoder; `recipe`: how it trains). `off` goes back to
    class labels. Changing the setting away from a trained encoder deletes it and every model.
    Every stored caption must fit the encoder (the error names each item that does not, and
    nothing changes). Changing this makes every model stale; `cdm train` rebuilds them."""
    if train_on and (encoder is not None or off):
        raise DataError("an encoder trained on public sources (--train-on) starts from the data-free one: "
                        "give no --encoder or --off with it")
    with store.writing("text"):
        cfg = None
        if train_on:
            for src in train_on:
                store.require_source(src)
        if not off:
            tmp = None
            if encoder is None:
                tmp = store.root / f".tmp-text-default-{uuid.uuid4().hex}"
                encoder = build_default(tmp)
            try:
                cfg, enc = check_folder(Path(encoder))
                if tmp is not None:
                    cfg = replace(cfg, source="trained", public=tuple(sorted(set(train_on)))) if train_on else \
                        replace(cfg, source="default")
                enc.check_store(store)
                text.install(Path(encoder), store.root / "text", cfg.digest)
                crashpoint("text:installed")
            finally:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
        intent = None
        with store.tx() as db:
            if store.model(ENCODER) is not None and cfg != text_config(store):
                intent = _drop_trained_encoder(store, db)
            store.set_meta(db, "text", None if cfg is None else asdict(cfg))
            if train_on:
                store.set_meta(db, "encoder", asdict(recipe or encoder_config(store)))
            store.log(db, "config", {"text": None if cfg is None else asdict(cfg),
                                     **({"encoder": asdict(encoder_config(store))} if train_on else {})}, actor)
        if intent is not None:
            store.finish_cleanup(intent)
        return cfg


def _drop_trained_encoder(store: Store, db) -> str:
    """Inside the transaction that changes the text setting: delete the encoder trained on public
    sources and every model built on it, with their checkpoints (they are all stale, and forgetting
    judges the encoder by the sources it is set to learn from now, so none may outlive the setting).
    Returns the cleanup intent to finish after the commit."""
    names = sorted(store.models())
    store.delete_records(db, [], names, [], None)
    held = [p for n in names for p in (*store.model_versions(n), store.checkpoint_dir(n), store.work_dir(n))]
    return store.add_cleanup(db, [store.relative(p) for p in held])


def _check_base_folder(store: Store, folder: Path) -> str:
    """Validate a diffusers UNet2DModel folder as a base for this store; returns its weights digest."""
    f = folder / WEIGHTS
    if not f.is_file() or not (folder / "config.json").is_file():
        raise StoreError(f"{folder} is not a diffusers UNet folder (needs config.json and {WEIGHTS}) "
                         "nor a Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    refuse_links(folder)
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
