"""Latent space: a store whose models train and sample in a VAE's latents (Rombach et al.
2022, latent diffusion), as Stable Diffusion does.

The VAE is frozen, imported from a folder (an SD folder's `vae/`), kept in the store and
pinned by its digest in every model's spec. Items are encoded with the posterior's mean
(deterministic, so forgetting stays bit-exact) and scaled by the VAE's `scaling_factor`;
samples are decoded back to pixels. Routers work on latents; nothing else changes
(docs/architecture.md, "Stable Diffusion folders").
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .denoisers import fixed_chunks
from ..store.recipes import LatentConfig
from ..store.registry import file_digest
from ..errors import StoreError

VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"


def vae_digest(folder: Path) -> str:
    """Digest of a VAE folder: its config and weights."""
    return file_digest(folder / VAE_WEIGHTS) + ":" + file_digest(folder / "config.json")[:16]


def check_vae(folder: Path) -> LatentConfig:
    """Validate a diffusers AutoencoderKL folder; the error names the folder and what is wrong."""
    if not (folder / "config.json").is_file() or not (folder / VAE_WEIGHTS).is_file():
        raise StoreError(f"{folder} is not a diffusers AutoencoderKL folder (needs config.json and {VAE_WEIGHTS})")
    conf = AutoencoderKL.load_config(folder)
    if conf.get("_class_name") not in (None, "AutoencoderKL"):
        raise StoreError(f"{folder}: a {conf['_class_name']}, not an AutoencoderKL")
    try:
        AutoencoderKL.from_pretrained(folder, low_cpu_mem_usage=False)
    except Exception as e:
        raise StoreError(f"{folder} does not load as an AutoencoderKL: {e}") from e
    return LatentConfig(vae_digest(folder), str(folder), int(conf.get("latent_channels", 4)),
                        2 ** (len(conf.get("block_out_channels", (64,))) - 1), float(conf.get("scaling_factor", 1.0)))


class Latents:
    """A frozen VAE: images in [-1, 1] <-> scaled latents."""

    def __init__(self, folder: Path, config: LatentConfig, device: str | torch.device = "cpu"):
        self.vae = AutoencoderKL.from_pretrained(folder, low_cpu_mem_usage=False).to(device).eval().requires_grad_(False)
        self.config, self.device = config, torch.device(device)
        self._lock = threading.Lock()

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch: int = 8) -> torch.Tensor:
        """Scaled posterior means. Calls run on exactly `batch` images (the last one padded), so an
        item's latent does not depend on the items encoded with it (exact forgetting)."""
        with self._lock:
            return fixed_chunks(lambda rows: self.vae.encode(x[rows].to(self.device)).latent_dist.mean,
                                len(x), batch) * self.config.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return self.vae.decode(z / self.config.scaling_factor).sample.clamp(-1, 1)


def load_latents(folder: Path, config: LatentConfig, device: str | torch.device = "cpu") -> Latents:
    """The VAE in `folder`, checked against the digest in `config` (`cdm.sampling.loading.load_vae` keeps it
    in memory)."""
    try:
        ok = vae_digest(folder) == config.digest
    except OSError:
        ok = False
    if not ok:
        raise StoreError(f"VAE files in {folder} are missing or corrupted (expected {config.digest[:12]}); "
                         "import the Stable Diffusion folder again")
    return Latents(folder, config, device)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deeply
        raise StoreError(f"{path}: not readable JSON ({e.__class__.__name__}: {e})") from None
