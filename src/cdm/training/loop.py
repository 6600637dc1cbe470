"""Train one compartment (or the paragon, or the classifier router) deterministically.

A training job is self-contained: (items, config, seed) -> model folder. It never opens
the store, so a cluster executor can run it unchanged.

Denoisers train in SISA stages (Bourtoule et al. 2021): stage k trains on the items of
slices 0..k, continuing from the state after stage k-1, and a checkpoint is kept after
each stage. A checkpoint is named by the digest of everything that produced it (config,
seed, items of slices <= k), so training resumes from the latest checkpoint that is still
valid: after forgetting an item of slice k this is the checkpoint of stage k-1, and the
result is bit-identical to training from scratch without the item.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file

from ..models.adapters import ADAPTER_WEIGHTS, PromptModel, adapter_state, attach, is_full, is_prompt, lora_config
from ..store.data import to_tensor_array
from ..models.denoisers import unet_inputs
from ..models.latent import LatentConfig, load_latents
from ..models.nets import build_router, build_unet, unet_class
from ..store.registry import file_digest
from ..models.text import load_encoder

Progress = Callable[[str, int, int, float], None]  # (job name, step done, total steps, loss)
WEIGHTS = "diffusion_pytorch_model.safetensors"
RESUME = "resume.pt"  # mid-stage state of an interrupted run, in the job's work folder


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

    def for_items(self, n: int) -> "TrainConfig":
        """The recipe of one model trained on n items: the epoch budget resolved into steps."""
        if self.epochs is None:
            return self
        steps = max(self.min_steps, math.ceil(self.epochs * n / self.batch_size))
        return replace(self, steps=min(self.steps, steps), epochs=None, min_steps=TrainConfig.min_steps)

    def scheduler(self) -> DDPMScheduler:
        return DDPMScheduler(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                             beta_start=self.beta_start, beta_end=self.beta_end,
                             timestep_spacing="trailing")


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


@dataclass
class TrainJob:
    """Everything one model depends on, and nothing else (docs/architecture.md, invariant 1)."""

    name: str
    kind: str  # "compartment" | "paragon" | "router" | "base"
    hashes: list[str]
    labels: list[int]  # label ids, null id for unlabelled
    slices: list[int]  # SISA slice of each item (denoisers); compartment index (router)
    pixels: np.ndarray  # uint8 (N, H, W, C), in the order of `hashes`
    model_config: dict
    train: TrainConfig | RouterConfig
    seed: int
    num_slices: int = 1
    null_label: int = 0
    classes: list[str] = field(default_factory=list)  # router: compartment names, in logit order
    extra: dict = field(default_factory=dict)  # recorded in the spec (e.g. the schedule of the router)
    base_dir: str | None = None  # adapter compartments: folder of the base model (its digest is in `extra`)
    captions: list[str | None] | None = None  # text-conditioned store: each item's caption (None: the empty prompt)
    text_dir: str | None = None  # text-conditioned store: the encoder folder (its digest is in `extra`)
    latent_dir: str | None = None  # latent store: the VAE folder (its digest is in `extra`)

    def stage_spec(self, k: int) -> str:
        """Digest of what the state after stage k depends on: config, seed, items of slices <= k."""
        caps = self.captions if self.captions is not None else [None] * len(self.hashes)
        items = [(h, y, s) if self.captions is None else (h, y, s, c)
                 for h, y, s, c in zip(self.hashes, self.labels, self.slices, caps)
                 if self.kind == "router" or s <= k]
        blob = json.dumps(dict(kind=self.kind, name=self.name if self.kind == "router" else None,
                               model=self.model_config, train=recipe_fields(self.train), seed=self.seed,
                               stage=k, num_slices=self.num_slices, null_label=self.null_label,
                               classes=self.classes, extra=self.extra, items=items),
                          sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def stages(self) -> int:
        return 1 if self.kind == "router" else self.num_slices

    @property
    def spec(self) -> str:
        return self.stage_spec(self.stages - 1)


def recipe_fields(cfg) -> dict:
    """A recipe as a spec sees it. Fields added after the first release are left out while they
    hold their defaults, so a model trained before they existed stays up to date."""
    d = asdict(cfg)
    if isinstance(cfg, TrainConfig):
        for k in ("epochs", "min_steps", "beta_start", "beta_end"):
            if d[k] == getattr(TrainConfig, k):
                del d[k]
    return d


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


def stage_steps(total: int, stages: int) -> list[int]:
    base = total // stages
    return [base] * (stages - 1) + [total - base * (stages - 1)]


def _stage_seed(seed: int, k: int) -> int:
    return int.from_bytes(hashlib.sha256(f"stage\x1f{seed}\x1f{k}".encode()).digest()[:8], "big") >> 1


def _save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save(obj, tmp)
    tmp.replace(path)


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


def weights_file(job: TrainJob) -> str:
    adapter = job.extra.get("adapter")
    return ADAPTER_WEIGHTS if adapter and not is_full(adapter) else WEIGHTS


def _adapter_model(job: TrainJob):
    """The job's base model (checked against the digest in its spec) with a fresh adapter."""
    want = job.extra["adapter"]["base"]
    if not job.base_dir or want is None:
        raise ValueError(f"adapter compartment {job.name!r} needs the base model; train or import it first")
    have = file_digest(Path(job.base_dir) / WEIGHTS)
    if have != want:
        raise ValueError(f"base model in {job.base_dir} has weights {have[:12]}, adapter {job.name!r} "
                         f"expects {want[:12]}")
    base = unet_class(UNet2DModel.load_config(job.base_dir)).from_pretrained(job.base_dir, low_cpu_mem_usage=False)
    if is_prompt(job.extra["adapter"]):
        return PromptModel.fresh(base, job.extra["adapter"], job.seed)
    if is_full(job.extra["adapter"]):
        return base.requires_grad_(True)
    return attach(base, job.extra["adapter"], job.seed)


def _text_conditions(job: TrainJob, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Text stores: embeddings of the distinct captions (row 0: the empty prompt, the null
    condition), and each item's row. The encoder is checked against the digest in the spec."""
    enc = load_encoder(Path(job.text_dir), job.extra["text"]["encoder"])
    prompts = ["", *dict.fromkeys(c for c in job.captions if c)]
    row = {p: i for i, p in enumerate(prompts)}
    emb = enc.encode(prompts).to(device)
    return emb, torch.tensor([row[c or ""] for c in job.captions], device=device)


def train_job(job: TrainJob, out_dir: Path, ckpt_dir: Path, work_dir: Path, device: str = "cpu",
              progress: Progress | None = None) -> TrainResult:
    """Run one job to completion, resuming where possible; write the model into `out_dir`."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    prune_checkpoints(job, ckpt_dir)
    specs = [job.stage_spec(k) for k in range(job.stages)]
    cfg = job.train
    is_router = job.kind == "router"
    adapter = job.extra.get("adapter")
    if is_router:
        model = build_router(job.model_config, job.seed)
    elif adapter:
        model = _adapter_model(job)
    else:
        model = build_unet(job.model_config, job.seed)
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ema = None if is_router else EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power)
    per_stage = stage_steps(cfg.steps, job.stages)

    def weights() -> dict:  # an adapter's checkpoints hold the adapter only
        if not adapter:
            return model.state_dict()
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def state(stage: int, step: int, gen: torch.Generator | None) -> dict:
        return dict(spec=specs[stage], stage=stage, step=step, model=weights(), opt=opt.state_dict(),
                    ema=None if ema is None else ema.state_dict(), gen=None if gen is None else gen.get_state())

    def load(s: dict) -> None:
        if adapter:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if p.requires_grad:
                        p.copy_(s["model"][n])
        else:
            model.load_state_dict(s["model"])
        opt.load_state_dict(s["opt"])
        if ema is not None:
            ema.load_state_dict(s["ema"])
            ema.to(dev)

    # where to start: the latest valid slice checkpoint, then a mid-stage resume file on top
    start_stage, start_step, resumed, gen_state = 0, 0, "scratch", None
    for k in reversed(range(job.stages)):
        p = stage_checkpoint(ckpt_dir, k, specs[k])
        if p.exists():
            load(torch.load(p, map_location=dev, weights_only=True))
            start_stage, resumed = k + 1, f"stage {k}"
            break
    resume_file = work_dir / RESUME
    if resume_file.exists():
        r = torch.load(resume_file, map_location=dev, weights_only=True)
        if r["stage"] >= start_stage and r["stage"] < job.stages and r["spec"] == specs[r["stage"]]:
            load(r)
            start_stage, start_step, gen_state = r["stage"], r["step"], r["gen"]
            resumed = f"step {start_step} of stage {start_stage}"

    scheduler = (DDPMScheduler(num_train_timesteps=job.extra["num_train_timesteps"],
                               beta_schedule=job.extra["beta_schedule"],
                               beta_start=job.extra.get("beta_start", TrainConfig.beta_start),
                               beta_end=job.extra.get("beta_end", TrainConfig.beta_end)) if is_router else cfg.scheduler())
    alphas = scheduler.alphas_cumprod.to(dev)
    if job.extra.get("latent") and len(job.pixels):  # latent diffusion: train on the frozen VAE's latents
        vae = load_latents(Path(job.latent_dir), LatentConfig(source=job.latent_dir, **job.extra["latent"]), dev)
        x_all = torch.cat([vae.encode(torch.from_numpy(to_tensor_array(list(job.pixels[i:i + 64]))))
                           for i in range(0, len(job.pixels), 64)])
    else:
        x_all = torch.from_numpy(to_tensor_array(list(job.pixels))).to(dev) if len(job.pixels) else None
    y_all = torch.tensor(job.labels, dtype=torch.long, device=dev)
    text = job.extra.get("text")
    if text:  # the condition is the caption's embedding; dropout gives the empty prompt's
        emb, caption_row = _text_conditions(job, dev)
    s_all = torch.tensor(job.slices, dtype=torch.long)
    total, done_before = sum(per_stage), sum(per_stage[:start_stage]) + start_step
    steps_run, loss_val = 0, None
    for k in range(start_stage, job.stages):
        idx = torch.arange(len(job.hashes)) if is_router else torch.nonzero(s_all <= k).flatten()
        gen = torch.Generator().manual_seed(_stage_seed(job.seed, k))
        step0 = 0
        if k == start_stage and gen_state is not None:
            gen.set_state(gen_state)
            step0 = start_step
        for step in range(step0, per_stage[k] if len(idx) else 0):
            global_step = sum(per_stage[:k]) + step
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (global_step + 1) / cfg.warmup)
            b = idx[torch.randint(0, len(idx), (cfg.batch_size,), generator=gen)].to(dev)
            x0, y = x_all[b], y_all[b].clone()
            drop = (torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout).to(dev)
            y[drop] = job.null_label
            if text:
                rows = caption_row[b].clone()
                rows[drop] = 0
                y = {"text": emb[rows]}
            noise = torch.randn(x0.shape, generator=gen).to(dev)
            t = torch.randint(0, len(alphas), (cfg.batch_size,), generator=gen).to(dev)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            if is_router:
                loss = torch.nn.functional.cross_entropy(model(xt, t, y), s_all.to(dev)[b])
            else:
                loss = torch.nn.functional.mse_loss(model(xt, t, **unet_inputs(y)).sample, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.step(params)
            steps_run += 1
            loss_val = float(loss.detach())
            if progress:
                progress(job.name, done_before + steps_run, total, loss_val)
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < per_stage[k]:
                _save(state(k, step + 1, gen), resume_file)
        if not is_router:
            _save(state(k, per_stage[k], None), stage_checkpoint(ckpt_dir, k, specs[k]))
        resume_file.unlink(missing_ok=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    scheduler.save_pretrained(out_dir)
    if ema is not None:
        ema.copy_to(params)
    if adapter and is_prompt(adapter):
        save_file({"prompt": model.prompt.detach().cpu().contiguous()}, str(out_dir / ADAPTER_WEIGHTS))
    elif adapter and not is_full(adapter):
        save_file(adapter_state(model.to("cpu")), str(out_dir / ADAPTER_WEIGHTS))
        lora_config(adapter).save_pretrained(str(out_dir))  # peft's adapter_config.json
    else:
        model.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    meta = dict(name=job.name, kind=job.kind, items=len(job.hashes), spec=job.spec, seed=job.seed,
                train=recipe_fields(cfg), num_slices=job.num_slices, null_label=job.null_label, classes=job.classes,
                adapter=adapter)
    (out_dir / "cdm.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return TrainResult(job.name, job.kind, len(job.hashes), steps_run, time.perf_counter() - t0, loss_val,
                       resumed, job.spec, out_dir)

