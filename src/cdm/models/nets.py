"""The networks: denoisers built from a preset (cdm.models.presets), the classifier router
network and the evaluation feature net."""

from __future__ import annotations

import torch
from diffusers import ModelMixin, UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

def unet_class(config: dict) -> type:
    """UNet2DConditionModel for a text-conditioned config, else UNet2DModel."""
    text = config.get("cross_attention_dim") is not None or config.get("_class_name") == "UNet2DConditionModel"
    return UNet2DConditionModel if text else UNet2DModel


def build_unet(config: dict, seed: int) -> UNet2DModel | UNet2DConditionModel:
    """A freshly initialised UNet whose weights depend only on (config, seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return unet_class(config)(**config)


def build_router(config: dict, seed: int) -> "RouterNet":
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RouterNet(**config)


class RouterNet(ModelMixin, ConfigMixin):
    """Noisy-input compartment classifier p(compartment | x_t, t, label) (CDM paper, Sec. 3).

    A small CNN with FiLM conditioning on the timestep and label embeddings; outputs one
    logit per compartment it was trained on, in the order of `compartments`.
    """

    @register_to_config
    def __init__(self, compartments: list[str], image_size: int = 8, in_channels: int = 1,
                 num_class_embeds: int = 17, width: int = 32, num_train_timesteps: int = 1000,
                 text_dim: int | None = None):
        super().__init__()
        emb = 4 * width
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_emb = TimestepEmbedding(width, emb)
        # the condition: a label embedding, or (text stores) the prompt's mean embedding projected
        self.label_emb = nn.Embedding(num_class_embeds, emb) if text_dim is None else nn.Linear(text_dim, emb)
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.films = nn.ModuleList()
        chans = [width, width * 2, width * 2]
        c_in = width
        for i, c in enumerate(chans):
            self.blocks.append(nn.Sequential(
                nn.GroupNorm(8, c_in), nn.SiLU(), nn.Conv2d(c_in, c, 3, stride=2 if i else 1, padding=1)))
            self.films.append(nn.Linear(emb, 2 * c))
            c_in = c
        self.head = nn.Sequential(nn.GroupNorm(8, c_in), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(c_in, len(compartments)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """cond: label ids (B,), or {"text": (B, L, D)} in a text-conditioned store."""
        c = cond["text"].mean(dim=1) if isinstance(cond, dict) else cond
        e = self.time_emb(self.time_proj(t).to(x.dtype)) + self.label_emb(c)
        e = nn.functional.silu(e)
        h = self.conv_in(x)
        for block, film in zip(self.blocks, self.films):
            h = block(h)
            scale, shift = film(e)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        return self.head(h)


class FeatureNet(ModelMixin, ConfigMixin):
    """Label classifier on clean images whose penultimate layer is the evaluation feature space
    (our stand-in for Inception in FID, Heusel et al. 2017, trained on the data itself)."""

    @register_to_config
    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32, features: int = 64):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.GroupNorm(8, 4 * w), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, features), nn.SiLU())
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] -> (features, logits)."""
        f = self.body(x)
        return f, self.head(f)
