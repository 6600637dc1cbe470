"""Denoiser presets (diffusers UNet configs) and the classifier router network.

A denoiser is class-conditional (UNet2DModel) with one extra "null" class (id = max_labels)
used for label dropout and classifier-free guidance (Ho & Salimans 2022); in a
text-conditioned store it is a UNet2DConditionModel that cross-attends to the prompt's
embeddings, the same preset with cross-attention where the preset has attention.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin, UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

PRESETS: dict[str, dict] = {
    # tests: ~20k parameters, no attention
    "tiny": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")),
    # 8x8 .. 16x16 images (digits): ~0.7M parameters, attention at the coarsest level
    "small": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    # 32x32 RGB on a few CPU cores: ~2.6M parameters, attention at 16x16
    "medium": dict(block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=8, attention_head_dim=16,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    # 32x32 and larger on a GPU: ~6M parameters
    "base": dict(block_out_channels=(64, 128, 128), layers_per_block=2, norm_num_groups=32, attention_head_dim=16,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}


def default_preset(image_size: int) -> str:
    """The preset `cdm init` picks (sized for CPUs); `--preset base` suits a GPU at 32 px and up."""
    return "small" if image_size <= 16 else "medium"


def unet_config(preset: str, image_size: int, channels: int, max_labels: int) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; available: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    levels = len(p["block_out_channels"])
    if image_size % (2 ** (levels - 1)):
        raise ValueError(f"preset {preset!r} needs an image size divisible by {2 ** (levels - 1)}, got {image_size}")
    return dict(sample_size=image_size, in_channels=channels, out_channels=channels,
                num_class_embeds=max_labels + 1, **p)


def text_unet_config(preset: str, image_size: int, channels: int, text_dim: int) -> dict:
    """The preset as a text-conditioned UNet2DConditionModel: attention blocks become
    cross-attention blocks (a preset without attention gets one at its coarsest level)."""
    conf = unet_config(preset, image_size, channels, 0)
    del conf["num_class_embeds"]
    down, up = list(conf["down_block_types"]), list(conf["up_block_types"])
    if "AttnDownBlock2D" not in down:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    heads = conf.pop("attention_head_dim", 4)
    return dict(conf, down_block_types=tuple("CrossAttnDownBlock2D" if b == "AttnDownBlock2D" else b for b in down),
                up_block_types=tuple("CrossAttnUpBlock2D" if b == "AttnUpBlock2D" else b for b in up),
                attention_head_dim=heads, cross_attention_dim=text_dim)


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
