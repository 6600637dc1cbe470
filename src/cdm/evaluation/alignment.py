"""Text-image alignment: our stand-in for TIFA (the CDM paper's alignment measure, which
needs a VQA model we cannot download).

`AlignNet` is a small contrastive image-text model (CLIP, Radford et al. 2021): a CNN image
tower and a bag-of-words text tower trained with the symmetric InfoNCE loss on held-out
real (image, caption) pairs only: never on a store's items, so it holds no owner's data
and forgetting never touches it. It is cached in STORE/eval/align/ by the digest of the
pairs and its recipe. Two scores come from it:

- R-precision (Park et al. 2021): does a generated image retrieve its own prompt, top-1,
  among 100 candidate captions (its own and 99 other held-out captions, seeded)?
- CLIP-style score (Hessel et al. 2021): 100 x max(cos(image, prompt), 0), averaged.

Users with real CLIP weights on disk (a transformers `CLIPModel` folder) score with those
instead (`ClipScorer`); nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from ..store.data import Item, hash_int, to_tensor_array
from ..store.registry import Store, write_folder_once
from ..errors import StoreError
from ..models.text import quiet_transformers
from ..models.nets import clip_loss

WORD = re.compile(r"[a-z0-9]+")


def words(caption: str, buckets: int) -> list[int]:
    """A caption's words (lower case, letters and digits) hashed into `buckets` ids, plus bigrams."""
    w = WORD.findall(caption.lower())
    grams = w + [f"{a} {b}" for a, b in zip(w, w[1:])]
    return [hash_int(g, size=4) % buckets for g in grams] or [0]


@dataclass(frozen=True)
class AlignConfig:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 32
    dim: int = 64  # joint embedding
    buckets: int = 4096  # hashed words and bigrams
    seed: int = 0


class AlignNet(ModelMixin, ConfigMixin):
    """Image and caption -> unit vectors in one space; logit scale learned (CLIP)."""

    @register_to_config
    def __init__(self, in_channels: int = 3, width: int = 32, dim: int = 64, buckets: int = 4096):
        super().__init__()
        w = width
        self.image = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 4 * w), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, dim))
        self.words = nn.EmbeddingBag(buckets, 4 * w, mode="mean")
        self.text = nn.Sequential(nn.SiLU(), nn.Linear(4 * w, dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(10.0))))

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image(x), dim=-1)

    def embed_texts(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.text(self.words(ids, offsets)), dim=-1)


def _bag(captions: list[str], buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [words(c, buckets) for c in captions]
    offsets = torch.tensor([0, *np.cumsum([len(i) for i in ids[:-1]])], dtype=torch.long)
    return torch.tensor([x for i in ids for x in i], dtype=torch.long), offsets


def pairs_spec(pairs: list[Item], cfg: AlignConfig) -> str:
    blob = json.dumps(dict(cfg=asdict(cfg), pairs=sorted((it.hash, it.caption) for it in pairs)))
    return hashlib.sha256(blob.encode()).hexdigest()


def fit_align(pairs: list[Item], cfg: AlignConfig = AlignConfig()) -> AlignNet:
    """Train on (image, caption) pairs with the symmetric InfoNCE loss; seeded, with one-pixel shifts."""
    if len(pairs) < 8 or len({it.caption for it in pairs}) < 2:
        raise StoreError("the alignment model needs at least 8 held-out captioned images with 2+ distinct captions")
    x = torch.from_numpy(to_tensor_array([it.pixels for it in pairs]))
    caps = [it.caption for it in pairs]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = AlignNet(x.shape[1], cfg.width, cfg.dim, cfg.buckets)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps)
    net.train()
    for _ in range(cfg.steps):
        b = torch.randperm(len(x), generator=gen)[:cfg.batch_size]
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
        img = net.embed_images(torch.roll(x[b], (dx, dy), dims=(2, 3)))
        bc = [caps[i] for i in b]
        txt = net.embed_texts(*_bag(bc, cfg.buckets))
        same = torch.tensor([[a == c for c in bc] for a in bc], dtype=torch.float32)  # equal captions are positives
        loss = clip_loss(img, txt, net.logit_scale, same)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def align_model(store: Store, pairs: list[Item], cfg: AlignConfig = AlignConfig(), device: str = "cpu") -> AlignNet:
    """The cached alignment model for these held-out pairs, trained and cached on first use."""
    spec = pairs_spec(pairs, cfg)
    folder = store.eval_dir() / "align" / spec[:16]
    if not folder.exists():
        net = fit_align(pairs, cfg)

        def write(tmp: Path) -> None:
            net.save_pretrained(tmp, safe_serialization=True)
            (tmp / "cdm.json").write_text(json.dumps(dict(spec=spec, pairs=len(pairs), config=asdict(cfg))))

        write_folder_once(folder, write)
    return AlignNet.from_pretrained(folder, low_cpu_mem_usage=False).to(device).eval()


@dataclass
class Alignment:
    r_precision: float  # top-1 retrieval of the own prompt among `candidates`
    clip_score: float  # 100 x max(cos, 0), mean
    candidates: int


class AlignScorer:
    """Scores images against prompts with an `AlignNet` (or, via `ClipScorer`, real CLIP weights)."""

    kind = "cdm-align"

    def __init__(self, net: AlignNet, device: str = "cpu"):
        self.net, self.device = net, device

    @torch.inference_mode()
    def images(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(to_tensor_array(list(images))).to(self.device)
        return torch.cat([self.net.embed_images(x[i:i + 500]) for i in range(0, len(x), 500)]).cpu()

    @torch.inference_mode()
    def texts(self, captions: list[str]) -> torch.Tensor:
        ids, offsets = _bag(captions, self.net.config.buckets)
        return self.net.embed_texts(ids.to(self.device), offsets.to(self.device)).cpu()

    def score(self, images: np.ndarray, prompts: list[str], pool: list[str], candidates: int = 100,
              seed: int = 0) -> Alignment:
        """R-precision against `candidates` - 1 distractors drawn from `pool` (captions other than
        the prompt), and the CLIP-style score of each image with its prompt."""
        pool = sorted(set(pool))
        if len(pool) < 2:
            raise StoreError("R-precision needs a pool of 2+ distinct held-out captions")
        img = self.images(images)
        k = min(candidates, len(pool))
        rng = np.random.default_rng(seed)
        hits, scores = [], []
        cache = dict(zip(pool, self.texts(pool)))
        for p, e in zip(prompts, img):
            others = [c for c in pool if c != p]
            cands = [p, *rng.choice(others, k - 1, replace=False)]
            txt = torch.stack([cache[c] if c in cache else self.texts([c])[0] for c in cands])
            sims = txt @ e
            hits.append(int(sims.argmax()) == 0)
            scores.append(100 * max(float(sims[0]), 0.0))
        return Alignment(float(np.mean(hits)), float(np.mean(scores)), k)


class ClipScorer(AlignScorer):
    """Real CLIP weights from a local transformers `CLIPModel` folder (with its tokenizer)."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from transformers import CLIPModel, CLIPTokenizer

        quiet_transformers()
        folder = Path(folder)
        try:
            self.model = CLIPModel.from_pretrained(folder).to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        except Exception as e:
            raise StoreError(f"{folder} is not a CLIPModel folder with its tokenizer ({e}); "
                             "cdm never downloads weights") from e
        self.device, self.kind = device, f"clip:{folder.name}"
        self.size = self.model.config.vision_config.image_size
        self.mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    @torch.inference_mode()
    def images(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        x = ((x - self.mean) / self.std).to(self.device)
        out = torch.cat([_tensor(self.model.get_image_features(pixel_values=x[i:i + 64])) for i in range(0, len(x), 64)])
        return nn.functional.normalize(out, dim=-1).cpu()

    @torch.inference_mode()
    def texts(self, captions: list[str]) -> torch.Tensor:
        tok = self.tokenizer(captions, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return nn.functional.normalize(_tensor(self.model.get_text_features(**tok)), dim=-1).cpu()


def _tensor(out) -> torch.Tensor:
    """transformers 4 returns the features, 5 may return an output object holding them."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
