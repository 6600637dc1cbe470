"""The store's recipes as typed configs: how every model in it is built.

Saved in the registry's meta at `cdm init` (training, router), `cdm adapters` and `cdm text`; read here
and nowhere else. Seeds are pure functions of the store seed and a model's name.
"""

from __future__ import annotations

import hashlib

from pathlib import Path

from ..models.adapters import AdapterConfig
from ..models.latent import LatentConfig, latent_shape
from .registry import Store
from ..models.text import TextConfig
from ..training.loop import RouterConfig, TrainConfig


def train_config(store: Store) -> TrainConfig:
    return TrainConfig(**store.get_meta("train"))


def router_config(store: Store) -> RouterConfig:
    return RouterConfig(**store.get_meta("router"))


def adapter_config(store: Store) -> AdapterConfig | None:
    """The store's adapter settings, or None when every compartment is a full model."""
    a = store.get_meta("adapter")
    return None if a is None else AdapterConfig(**{**a, "public": tuple(a["public"])})


def text_config(store: Store) -> TextConfig | None:
    """The store's text conditioning (`cdm text`), or None when it is class-conditional."""
    t = store.get_meta("text")
    return None if t is None else TextConfig(**t)


def text_dir(store: Store, config: TextConfig) -> Path:
    """Where the store keeps its text encoder folder."""
    return store.root / "text" / config.digest


def latent_config(store: Store) -> LatentConfig | None:
    """The store's latent space (a Stable Diffusion import), or None when models see pixels."""
    v = store.get_meta("latent")
    return None if v is None else LatentConfig(**v)


def latent_dir(store: Store, config: LatentConfig) -> Path:
    """Where the store keeps its VAE folder."""
    return store.root / "vae" / config.digest.replace(":", "-")


def model_shape(store: Store) -> tuple[int, int, int]:
    """(C, H, W) of what the store's models see: pixels, or the VAE's latents."""
    return latent_shape(store.config.channels, store.config.image_size, latent_config(store))


def model_seed(store: Store, name: str) -> int:
    """Seed of one model: a pure function of the store seed and the model's name."""
    return int.from_bytes(hashlib.sha256(f"model\x1f{store.config.seed}\x1f{name}".encode()).digest()[:8], "big") >> 1


def null_label(store: Store) -> int:
    """The label id of "no label": the null condition of classifier-free guidance."""
    return store.config.max_labels
