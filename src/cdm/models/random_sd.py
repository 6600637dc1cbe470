"""Stable Diffusion folders with random weights, for tests and benchmarks: nothing is
downloaded, and the folder is what `cdm adapters --base-from` imports (cdm.training.sd).
Only tests and benches import this module (it loads diffusers' pipelines and transformers).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .text import build_default


def random_folder(path: Path, shape: str = "tiny") -> Path:
    """A Stable Diffusion folder with random weights, for tests and benchmarks (nothing is
    downloaded): "tiny" (8 px latents, width 32) or "sd-1.5" (SD 1.5's UNet blocks with
    cross-attention width 768, 860M parameters; its VAE; cdm's data-free encoder at width 768,
    12 layers), written with `StableDiffusionPipeline.save_pretrained`, as diffusers' own tests do."""
    if shape not in ("tiny", "sd-1.5"):
        raise ValueError(f"unknown random SD folder shape {shape!r}: tiny or sd-1.5")
    tiny = shape == "tiny"
    enc = build_default(path.parent / f"{path.name}-encoder", **(dict(width=32, heads=2, max_length=32) if tiny else
                                                                 dict(width=768, layers=12, heads=12, max_length=77)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if tiny:
            unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                        layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
                                        cross_attention_dim=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
            vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                latent_channels=4, norm_num_groups=4, sample_size=16)
        else:
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # diffusers' SD 1.x blocks
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                                block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel.from_pretrained(enc / "text_encoder"),
                            tokenizer=CLIPTokenizer.from_pretrained(enc / "tokenizer"), unet=unet, scheduler=sched,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return path
