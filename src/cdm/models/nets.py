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


class ClipPair(nn.Module):
    """A text encoder beside a small image tower, trained with CLIP's symmetric contrastive loss
    (Radford et al. 2021, Eq. in Fig. 3): the text side is a CLIPTextModel (its EOS state,
    projected), the image side a small CNN; equal captions in a batch are all positives."""

    def __init__(self, text: nn.Module, in_channels: int, width: int, dim: int):
        super().__init__()
        w = width
        self.text = text
        self.image = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 4 * w), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, dim))
        self.text_proj = nn.Linear(text.config.hidden_size, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))  # log(1 / 0.07), CLIP's start

    def forward(self, x: torch.Tensor, ids: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
        """The loss of a batch: images in [-1, 1], token ids, and an id per distinct caption."""
        img = nn.functional.normalize(self.image(x), dim=-1)
        txt = nn.functional.normalize(self.text_proj(self.text(ids).pooler_output), dim=-1)
        return clip_loss(img, txt, self.logit_scale, (caption[:, None] == caption[None, :]).float())


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over unit image and text embeddings; `same[i, j]` = 1 where pair i's
    caption is pair j's (every such pair is a positive)."""
    logits = logit_scale.exp().clamp(max=100) * img @ txt.T
    target = same / same.sum(1, keepdim=True)
    return (torch.sum(-target * logits.log_softmax(1), 1).mean() + torch.sum(-target * logits.log_softmax(0).T, 1).mean()) / 2


def build_clip(text: nn.Module, config: dict, seed: int) -> ClipPair:
    """`text` (trainable from here on) with a fresh image tower and projection from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ClipPair(text.train().requires_grad_(True), config["in_channels"], config["width"], config["dim"])
