"""A training job: everything one model depends on, and the digests that name its states.

A job is self-contained: (items, recipe, seed, pinned inputs) -> model folder. It never
opens the store, so a cluster executor runs it unchanged. Its *spec* is the digest of
what it depends on; the registry records the spec a model was trained from, so a model is
up to date exactly when a fresh job has the same spec (docs/architecture.md, invariant 1).

Denoisers train in SISA stages (Bourtoule et al. 2021): stage k trains on the items of
slices 0..k, continuing from the state after stage k-1, and a checkpoint is kept after
each stage, named by the digest of what produced it (`stage_spec`). After forgetting an
item of slice k the latest still-valid checkpoint is stage k-1's, so the retrained model
is bit-identical to training from scratch without the item. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..store.data import hash_int
from ..store.recipes import RouterConfig, TrainConfig, is_full, recipe_fields
from ..store.registry import ADAPTER_WEIGHTS, WEIGHTS

Progress = Callable[[str, int, int, float], None]  # (job name, step done, total steps, loss)
RESUME = "resume.pt"  # mid-stage state of an interrupted run, in the job's work folder


@dataclass(kw_only=True)
class TrainJob:
    """Everything one model depends on, and nothing else (docs/architecture.md, invariant 1).

    The pinned inputs (an adapter's base, a text store's encoder, a latent store's VAE) are
    named by digest in the spec; their folders travel beside (`*_dir`), outside the spec."""

    name: str
    kind: str  # a name in cdm.training.kinds.KINDS
    hashes: list[str]
    labels: list[int]  # label ids, null id for unlabelled
    slices: list[int]  # SISA slice of each item (denoisers); compartment index (router)
    model_config: dict  # the architecture ({} for an adapter: its base is)
    train: TrainConfig | RouterConfig
    seed: int
    stages: int = 1  # SISA stages: the store's slices for a denoiser, 1 for the router
    staged: bool = True  # items join stage by stage (denoisers); False: all at once, the spec names the model
    num_slices: int = 1
    null_label: int = 0
    classes: list[str] = field(default_factory=list)  # router: compartment names, in logit order
    pixels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.uint8))  # uint8 (N, H, W, C)
    schedule: dict | None = None  # router: the denoisers' noise schedule it classifies under
    adapter: dict | None = None  # adapter compartment: its recipe and its base's weights digest ("base")
    base_dir: str | None = None
    captions: list[str | None] | None = None  # text store: each item's caption (None: the empty prompt)
    text_encoder: str | None = None  # text store: the encoder folder's digest (a trained encoder's job: its start)
    text_dir: str | None = None
    latent: dict | None = None  # latent store: the VAE (LatentConfig without its source)
    latent_dir: str | None = None
    weights_file: str | None = None  # the file whose digest the registry records, where not the default

    def pinned(self) -> dict:
        """What the job depends on besides items, recipe and seed, as the spec records it."""
        out = dict(self.schedule or {})
        if self.adapter is not None:
            out["adapter"] = self.adapter
        if self.text_encoder is not None:
            out["text"] = dict(encoder=self.text_encoder)
        if self.latent is not None:
            out["latent"] = self.latent
        return out

    def stage_spec(self, k: int) -> str:
        """Digest of what the state after stage k depends on: config, seed, items of slices <= k."""
        caps = self.captions if self.captions is not None else [None] * len(self.hashes)
        items = [(h, y, s) if self.captions is None else (h, y, s, c)
                 for h, y, s, c in zip(self.hashes, self.labels, self.slices, caps) if not self.staged or s <= k]
        blob = json.dumps(dict(kind=self.kind, name=None if self.staged else self.name,
                               model=self.model_config, train=recipe_fields(self.train), seed=self.seed,
                               stage=k, num_slices=self.num_slices, null_label=self.null_label,
                               classes=self.classes, extra=self.pinned(), items=items),
                          sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def spec(self) -> str:
        return self.stage_spec(self.stages - 1)

    @property
    def weights(self) -> str:
        """The file of its model folder whose digest the registry records."""
        if self.weights_file:
            return self.weights_file
        return ADAPTER_WEIGHTS if self.adapter and not is_full(self.adapter) else WEIGHTS


@dataclass
class TrainResult:
    name: str
    kind: str
    items: int
    steps: int  # optimisation steps actually run now
    seconds: float
    final_loss: float | None
    resumed_from: str  # "scratch", "stage k" (slice checkpoint) or "step s of stage k"
    spec: str
    out_dir: Path
    planned: int = 0  # the model's steps by its recipe (after an epoch budget), all stages
    notes: tuple[str, ...] = ()  # why `steps` differs from `planned`, one reason each
    info: dict = field(default_factory=dict)  # what its trainer adds to the registry's record (trainer.save)


def stage_steps(total: int, stages: int) -> list[int]:
    base = total // stages
    return [base] * (stages - 1) + [total - base * (stages - 1)]


def stage_seed(seed: int, k: int) -> int:
    return hash_int("stage", seed, k) >> 1


def stage_checkpoint(ckpt_dir: Path, k: int, spec: str) -> Path:
    return ckpt_dir / f"stage-{k}-{spec[:16]}.pt"


def stale_checkpoints(job: TrainJob, ckpt_dir: Path) -> list[Path]:
    """Slice checkpoints that the job's current items no longer produce.

    After forgetting an item of slice k, the checkpoints of stages >= k held its influence
    (docs/architecture.md, invariant 7)."""
    valid = {stage_checkpoint(ckpt_dir, k, job.stage_spec(k)).name for k in range(job.stages)}
    return [p for p in sorted(ckpt_dir.iterdir()) if p.name not in valid] if ckpt_dir.is_dir() else []


def prune_checkpoints(job: TrainJob, ckpt_dir: Path) -> list[str]:
    """Delete the job's stale checkpoints; returns their names."""
    gone = stale_checkpoints(job, ckpt_dir)
    for p in gone:
        p.unlink()
    return [p.name for p in gone]
