"""Denoiser presets: diffusers UNet configs as plain dicts (no torch; the networks are built
in cdm.models.nets).

A denoiser is class-conditional (UNet2DModel) with one extra "null" class (id = max_labels)
used for label dropout and classifier-free guidance (Ho & Salimans 2022); in a
text-conditioned store it is a UNet2DConditionModel that cross-attends to the prompt's
embeddings, the same preset with cross-attention where the preset has attention.
"""

from __future__ import annotations

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
