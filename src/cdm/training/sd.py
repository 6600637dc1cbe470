"""Stable Diffusion folders as a store's base (Rombach et al. 2022; the CDM paper's
text-to-image half fine-tunes SD compartments).

A diffusers `StableDiffusionPipeline` folder on disk (`unet/`, `vae/`, `text_encoder/`,
`tokenizer/`, `scheduler/`) is imported into a store in one step: its text encoder becomes
the store's frozen encoder (cdm.models.text), its VAE the store's latent space (cdm.models.latent), its
UNet the base every compartment is a LoRA adapter of, and its noise schedule the store's
recipe. Nothing is downloaded. Each part is checked before anything is written, and an
error names the part. Compartments then train, compose, attribute and forget as in any
other adapter store (docs/architecture.md, "Stable Diffusion folders").
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, replace
from pathlib import Path

from diffusers import DDPMScheduler, UNet2DConditionModel

from ..store.recipes import AdapterConfig, TrainConfig, latent_shape
from ..models.latent import VAE_WEIGHTS, check_vae, read_json
from ..store.recipes import latent_dir, train_config
from ..store.registry import BASE, WEIGHTS, Store, file_digest, refuse_links
from ..errors import StoreError
from ..models.text import check_folder, install

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def is_sd_folder(folder: Path) -> bool:
    return (Path(folder) / "model_index.json").is_file() or (Path(folder) / "unet").is_dir()


def check_sd_folder(store: Store, folder: Path) -> dict:
    """Validate every part of an SD folder against the store; returns what `import_sd` installs."""
    folder = Path(folder)
    missing = [p for p in PARTS if not (folder / p).is_dir()]
    if missing:
        raise StoreError(f"Stable Diffusion folder {folder} has no {', '.join(p + '/' for p in missing)} "
                         f"(needs {', '.join(p + '/' for p in PARTS)})")
    refuse_links(*(folder / p for p in PARTS))
    sched = read_json(folder / "scheduler" / "scheduler_config.json")
    if sched.get("prediction_type", "epsilon") != "epsilon":
        raise StoreError(f"{folder / 'scheduler'}: prediction_type {sched['prediction_type']!r}; cdm's samplers "
                         "take noise (epsilon) prediction models only (e.g. SD 1.5 or 2.1-base, not 2.1-v)")
    if sched.get("beta_schedule", "linear") not in ("linear", "scaled_linear"):
        raise StoreError(f"{folder / 'scheduler'}: beta_schedule {sched['beta_schedule']!r} is not supported "
                         "(linear or scaled_linear)")
    text, encoder = check_folder(folder)
    latent = check_vae(folder / "vae")
    cfg = store.config
    if cfg.channels != 3:
        raise StoreError(f"Stable Diffusion works on RGB images; this store holds {cfg.channels}-channel images "
                         "(create one with `cdm init --channels 3`)")
    vae_in = read_json(folder / "vae" / "config.json").get("in_channels", 3)
    if vae_in != cfg.channels:
        raise StoreError(f"{folder / 'vae'}: in_channels {vae_in}, the store's images have {cfg.channels}")
    if cfg.image_size % latent.factor:
        raise StoreError(f"{folder / 'vae'} maps {latent.factor} pixels to one latent; the store's image size "
                         f"{cfg.image_size} is not a multiple")
    unet = folder / "unet"
    if not (unet / WEIGHTS).is_file():
        raise StoreError(f"{unet} has no {WEIGHTS} (cdm reads safetensors weights; convert .bin or fp16 variants)")
    conf = read_json(unet / "config.json")
    if conf.get("_class_name") != "UNet2DConditionModel":
        raise StoreError(f"{unet}: a {conf.get('_class_name')}, not a UNet2DConditionModel")
    want = dict(in_channels=latent.channels, out_channels=latent.channels, cross_attention_dim=text.dim)
    bad = {k: (conf.get(k), v) for k, v in want.items() if conf.get(k) != v}
    if bad:
        raise StoreError(f"{unet} does not fit the folder's other parts: "
                         + ", ".join(f"{k}={have} (needs {need})" for k, (have, need) in bad.items()))
    levels = len(conf.get("block_out_channels", ())) - 1
    size = latent_shape(cfg.channels, cfg.image_size, latent)[1]
    if levels > 0 and size % 2 ** levels:
        raise StoreError(f"{unet} halves its input {levels} times; the store's latents are {size} wide "
                         f"(choose an image size that is a multiple of {latent.factor * 2 ** levels})")
    try:
        UNet2DConditionModel.from_pretrained(unet, low_cpu_mem_usage=False)
    except Exception as e:
        raise StoreError(f"{unet} does not load: {e}") from e
    return dict(text=text, encoder=encoder, latent=latent, unet_digest=file_digest(unet / WEIGHTS), scheduler=sched)


def import_sd(store: Store, folder: Path, rank: int = 4, alpha: float | None = None,
              actor: str | None = None, kind: str = "lora", tokens: int = 4) -> AdapterConfig:
    """Make the SD folder the store's base: text encoder, VAE, UNet (adapters on it), schedule.
    Every model becomes stale; `cdm train` then trains each compartment's adapter."""
    folder = Path(folder)
    with store.writing("import"):
        parts = check_sd_folder(store, folder)
        text, latent, sched = parts["text"], parts["latent"], parts["scheduler"]
        parts["encoder"].check_store(store)
        adapters = AdapterConfig(rank, 4.0 * rank if alpha is None else alpha, base_from=parts["unet_digest"],
                                 kind=kind, tokens=tokens)
        recipe = replace(train_config(store), num_train_timesteps=int(sched.get("num_train_timesteps", 1000)),
                         beta_schedule=sched.get("beta_schedule", "linear"),
                         beta_start=float(sched.get("beta_start", TrainConfig.beta_start)),
                         beta_end=float(sched.get("beta_end", TrainConfig.beta_end)))
        # files first (content-addressed, harmless if left), then the registry in one transaction
        install(folder, store.root / "text", text.digest)
        _copy_dir(folder / "vae", latent_dir(store, latent))
        def settings(db) -> None:  # committed with the base's row: the old store or the imported one
            store.set_meta(db, "text", asdict(text))
            store.set_meta(db, "latent", asdict(latent))
            store.set_meta(db, "adapter", asdict(adapters))
            store.set_meta(db, "train", asdict(recipe))
            store.log(db, "import", {"stable_diffusion": str(folder), "unet": parts["unet_digest"],
                                     "text_encoder": text.digest, "vae": latent.digest}, actor)

        install_base(store, folder / "unet", parts["unet_digest"], recipe, also=settings)
        return adapters


def install_base(store: Store, unet: Path, digest: str, recipe: TrainConfig, also) -> None:
    """Copy a diffusers UNet folder in as the store's base, with `recipe`'s noise schedule;
    its registry row commits with `also(db)` (the settings that go with it)."""
    tmp = store.new_model_dir(BASE)
    for name in ("config.json", WEIGHTS):
        shutil.copyfile(unet / name, tmp / name)
    DDPMScheduler(**recipe.schedule()).save_pretrained(tmp)
    store.install_model(BASE, "base", f"import:{digest}", tmp, WEIGHTS, dict(imported_from=str(unet)), also=also)


def _copy_dir(src: Path, dest: Path) -> None:
    if dest.exists():
        return
    tmp = dest.parent.parent / f".tmp-vae-{dest.name[:16]}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp.mkdir(mode=0o700)
    for name in ("config.json", VAE_WEIGHTS):
        shutil.copyfile(src / name, tmp / name)
    tmp.replace(dest)

