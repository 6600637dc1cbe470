"""The store's recipes as typed configs: how every model in it is built.

The configs are defined here and saved in the registry's meta at `cdm init` (training,
router), `cdm adapters` (adapters), `cdm text` (text) and a Stable Diffusion import
(latent); they are read back here and nowhere else. Seeds are pure functions of the store
seed and a model's name. Nothing here imports torch: light commands (`cdm status`) read
recipes without it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .data import hash_int
from .registry import ENCODER, Store

@dataclass(frozen=True)
class TrainConfig:
    """Recipe shared by every compartment and the paragon of a store (DDPM, Ho et al. 2020)."""

    preset: str = "small"
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.9995
    ema_power: float = 0.75  # EMA warm-up: decay = 1 - (1 + step) ** -power, capped at ema_decay
    label_dropout: float = 0.1  # in text stores: caption dropout (the empty prompt)
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001  # diffusers' defaults; a Stable Diffusion import sets its own
    beta_end: float = 0.02
    checkpoint_every: int = 250
    # a budget in passes over a model's own items instead of a fixed count: a model on n items
    # trains clip(ceil(epochs * n / batch_size), min_steps, steps) steps (steps is then the cap),
    # so small compartments are not overtrained and large ones not undertrained
    epochs: float | None = None
    min_steps: int = 100
    # the arithmetic of training (cdm.models.precision): "auto" until the first `cdm train`
    # records what it used (bf16 on CUDA for a store with no trained model, else fp32)
    precision: str = "auto"

    def for_items(self, n: int) -> "TrainConfig":
        """The recipe of one model trained on n items: the epoch budget resolved into steps."""
        if self.epochs is None:
            return self
        steps = max(self.min_steps, math.ceil(self.epochs * n / self.batch_size))
        return replace(self, steps=min(self.steps, steps), epochs=None, min_steps=TrainConfig.min_steps)

    def schedule(self) -> dict:
        """The noise schedule as a diffusers `DDPMScheduler` config (`DDPMScheduler(**schedule)`)."""
        return dict(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                    beta_start=self.beta_start, beta_end=self.beta_end, timestep_spacing="trailing")


PRECISIONS = ("auto", "fp32", "tf32", "bf16")  # arithmetic of model calls (cdm.models.precision)


def trains_as(precision: str) -> str:
    """The arithmetic a recipe trains with: an "auto" not yet recorded by `cdm train` trains as
    fp32, which is what every spec judged before the first run says (so no model goes stale)."""
    return "fp32" if precision == "auto" else precision


@dataclass(frozen=True)
class RouterConfig:
    """Recipe of the classifier router (CDM paper: a noisy-input compartment classifier)."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 50
    width: int = 32
    label_dropout: float = 0.1
    checkpoint_every: int = 250




def recipe_fields(cfg) -> dict:
    """A recipe as a spec sees it. Fields added after the first release are left out while they
    hold their defaults, so a model trained before they existed stays up to date."""
    d = asdict(cfg)
    if isinstance(cfg, TrainConfig):
        for k in ("epochs", "min_steps", "beta_start", "beta_end"):
            if d[k] == getattr(TrainConfig, k):
                del d[k]
        if trains_as(d["precision"]) == "fp32":
            del d["precision"]
    return d




# resnet convolutions and time projections, attention projections, the label embedding
TARGETS = r".*(conv1|conv2|time_emb_proj|to_q|to_k|to_v|to_out\.0|class_embedding)$"


@dataclass(frozen=True)
class AdapterConfig:
    """How a store's compartments are built when they are adapters.

    `public`: the sources the base model trains on (every compartment then is an adapter);
    `base_from`: instead, the weights digest of a base imported from a diffusers folder."""

    rank: int = 4
    alpha: float = 16.0  # scale alpha / rank = 4: on digits FID +3.2% vs full models, scale 1 gave +7.2%
    targets: str = TARGETS
    public: tuple[str, ...] = field(default_factory=tuple)
    base_from: str | None = None
    kind: str = "lora"  # "prompt": a learned prompt of `tokens` vectors (text stores); "full": a fine-tune of the base
    tokens: int = 4

    def __post_init__(self):
        check_kind(self.kind, self.tokens)
        if self.rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"adapter alpha must be > 0, got {self.alpha}")
        if bool(self.public) == bool(self.base_from):
            raise ValueError("adapters need exactly one base: public source(s) to train it on, or an imported folder")

    def recipe(self) -> dict:
        """What an adapter's weights depend on besides its items (goes into its spec)."""
        if self.kind == "prompt":
            return dict(kind="prompt", tokens=self.tokens)
        if self.kind == "full":
            return dict(kind="full")
        return dict(rank=self.rank, alpha=self.alpha, targets=self.targets)


ADAPTER_KINDS = ("lora", "prompt", "full")


def check_kind(kind: str, tokens: int) -> None:
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; available: {', '.join(ADAPTER_KINDS)}")
    if not 1 <= tokens <= 64:
        raise ValueError(f"a learned prompt has 1-64 tokens, got {tokens}")




def is_prompt(recipe: dict) -> bool:
    return recipe.get("kind") == "prompt"


def is_full(recipe: dict) -> bool:
    """A full fine-tune of the base: every weight trains, the compartment is a whole UNet."""
    return recipe.get("kind") == "full"



@dataclass(frozen=True)
class TextConfig:
    """A store's text conditioning (meta "text"): which encoder, pinned by its digest."""

    digest: str  # of the encoder folder (`folder_digest`); a trained encoder's: the data-free one it starts from
    source: str  # "default", the folder it was imported from, or "trained" (on `public`)
    max_length: int  # tokens per prompt, start and end included
    dim: int  # width of the embeddings (the UNets' cross_attention_dim)
    # the sources a text encoder trained in the store learns from (`cdm text --train-on`): the
    # model `encoder` (cdm.training.kinds.Encoder), fine-tuned contrastively from the folder above
    public: tuple[str, ...] = ()


@dataclass(frozen=True)
class EncoderConfig:
    """Recipe of a text encoder trained on public sources (CLIP's contrastive loss, Radford et al.
    2021): the data-free default encoder fine-tuned beside a small image tower."""

    steps: int = 1500
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 100
    image_width: int = 32  # the image tower's first convolution (then 2x, 4x)
    dim: int = 64  # the joint embedding
    checkpoint_every: int = 250




@dataclass(frozen=True)
class LatentConfig:
    """A store's latent space (meta "latent"): which VAE, pinned by its weights digest."""

    digest: str
    source: str
    channels: int  # latent channels
    factor: int  # pixels per latent, per side
    scaling_factor: float




def latent_shape(channels: int, image_size: int, latent: LatentConfig | None) -> tuple[int, int, int]:
    """The shape models see: pixels (C, H, W), or the VAE's latents."""
    if latent is None:
        return channels, image_size, image_size
    return latent.channels, image_size // latent.factor, image_size // latent.factor




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
    return None if t is None else TextConfig(**{**t, "public": tuple(t.get("public", ()))})


def text_dir(store: Store, config: TextConfig) -> Path:
    """Where the store keeps its text encoder folder (a trained encoder's: the one it starts from)."""
    return store.root / "text" / config.digest


def encoder_config(store: Store) -> EncoderConfig:
    return EncoderConfig(**store.get_meta("encoder", {}))


def encoder_pin(store: Store) -> tuple[Path, str] | None:
    """The encoder folder the store's denoisers read and its digest (what their specs pin): the
    imported or default one, or the trained model `encoder` (None while it is not trained)."""
    t = text_config(store)
    if t is None:
        return None
    if not t.public:
        return text_dir(store, t), t.digest
    row = store.model(ENCODER)
    return None if row is None else (store.folder(row), row.info["text_digest"])


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
    return hash_int("model", store.config.seed, name) >> 1


def null_label(store: Store) -> int:
    """The label id of "no label": the null condition of classifier-free guidance."""
    return store.config.max_labels
