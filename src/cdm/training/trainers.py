"""The training code of each model kind (cdm.training.kinds): how a job's network is built,
what it is trained to predict, how it is saved and loaded again. The loop that runs them
is cdm.training.loop; a kind names its trainer in `Kind.trainer`.

- `Denoiser`: a diffusers UNet trained to predict the noise (DDPM, Ho et al. 2020), with an
  EMA of its weights; an adapter compartment trains only its adapter on the frozen base.
- `ClassifierRouter`: the CDM paper's router, a noisy-input classifier of which
  compartment an item came from (cross-entropy), no EMA.
- `Clip`: a text encoder trained on public sources, contrastively beside an image tower
  (CLIP, Radford et al. 2021); only the text encoder is kept, as an encoder folder.

A trainer gives the loop (cdm.training.loop) its network (`model`), its data as tensors
(`data`), the loss of one batch of item indices (`batch_loss`, drawing whatever else the batch
needs from the loop's seeded generator), and saves the result (`save`: what it returns is
added to the model's registry record).
"""

from __future__ import annotations

from pathlib import Path

import shutil

import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

from ..models.adapters import PromptModel, adapter_state, attach, lora_config
from ..models.denoisers import Cond, unet_inputs
from ..models.latent import load_latents
from ..models.nets import RouterNet, build_clip, build_router, build_unet, unet_class
from ..models.precision import precision
from ..models.text import ENCODER, TOKENIZER, TextEncoder, folder_digest, load_encoder
from ..store.data import to_tensor_array
from ..store.recipes import LatentConfig, TrainConfig, is_full, is_prompt
from ..store.registry import ADAPTER_WEIGHTS, WEIGHTS, file_digest
from .job import TrainJob


class NoisyInput:
    """What the denoisers and the classifier router share: batches of noised items x_t (DDPM's
    forward process) under a condition that is dropped to the null one at the recipe's rate."""

    def data(self, job: TrainJob, dev: torch.device) -> dict:
        x, cond_of = _items(job, dev)
        return dict(alphas=DDPMScheduler(**self.schedule(job)).alphas_cumprod.to(dev), x=x, cond_of=cond_of,
                    targets=torch.tensor(job.slices, dtype=torch.long, device=dev))

    def batch_loss(self, model, data: dict, b: torch.Tensor, gen: torch.Generator, job: TrainJob, arith: str,
                   dev: torch.device) -> torch.Tensor:
        n = len(b)
        drop = (torch.rand(n, generator=gen) < job.train.label_dropout).to(dev)  # to the null condition
        x0, cond = data["x"][b], data["cond_of"](b, drop)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        t = torch.randint(0, len(data["alphas"]), (n,), generator=gen).to(dev)
        a = data["alphas"][t].view(-1, 1, 1, 1)
        with precision(arith, dev):  # the forward pass only; the backward follows its dtypes
            return self.loss(model, a.sqrt() * x0 + (1 - a).sqrt() * noise, t, cond, noise, data["targets"][b])

    def save_schedule(self, job: TrainJob, out_dir: Path) -> None:
        DDPMScheduler(**self.schedule(job)).save_pretrained(out_dir)


class Denoiser(NoisyInput):
    """A denoiser (compartment, paragon, base): eps-prediction, EMA weights."""

    ema = True

    def model(self, job: TrainJob) -> torch.nn.Module:
        """A fresh network from the job's seed: its UNet, or its base with a fresh adapter."""
        return build_unet(job.model_config, job.seed) if job.adapter is None else _adapter_model(job)

    def schedule(self, job: TrainJob) -> dict:
        return job.train.schedule()

    def loss(self, model, xt: torch.Tensor, t: torch.Tensor, cond: Cond, noise: torch.Tensor,
             target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(xt, t, **unet_inputs(cond)).sample, noise)

    def save(self, model, job: TrainJob, out_dir: Path) -> dict:
        self.save_schedule(job, out_dir)
        adapter = job.adapter
        if adapter and is_prompt(adapter):
            save_file({"prompt": model.prompt.detach().cpu().contiguous()}, str(out_dir / ADAPTER_WEIGHTS))
        elif adapter and not is_full(adapter):
            save_file(adapter_state(model.to("cpu")), str(out_dir / ADAPTER_WEIGHTS))
            lora_config(adapter).save_pretrained(str(out_dir))  # peft's adapter_config.json
        else:
            model.to("cpu").save_pretrained(out_dir, safe_serialization=True)
        return {}

    def load(self, folder: Path):
        """A saved full UNet (not an adapter: cdm.sampling.loading applies those to their base)."""
        return unet_class(UNet2DModel.load_config(folder)).from_pretrained(folder, low_cpu_mem_usage=False)


class ClassifierRouter(NoisyInput):
    """The classifier router: p(compartment | x_t), trained on noisy items of every compartment."""

    ema = False

    def model(self, job: TrainJob) -> torch.nn.Module:
        return build_router(job.model_config, job.seed)

    def schedule(self, job: TrainJob) -> dict:
        """The denoisers' noise schedule (diffusers' default spacing: only its betas are used)."""
        return {"beta_start": TrainConfig.beta_start, "beta_end": TrainConfig.beta_end, **job.schedule}

    def loss(self, model, xt, t, cond, noise, target):
        return torch.nn.functional.cross_entropy(model(xt, t, cond), target)

    def save(self, model, job: TrainJob, out_dir: Path) -> dict:
        self.save_schedule(job, out_dir)
        model.to("cpu").save_pretrained(out_dir, safe_serialization=True)
        return {}

    def load(self, folder: Path) -> RouterNet:
        return RouterNet.from_pretrained(folder, low_cpu_mem_usage=False)


class Clip:
    """A text encoder trained on public (image, caption) pairs: the job's data-free start
    (`job.text_dir`, checked against `job.text_encoder`) with an image tower, CLIP's loss. Saved
    as an encoder folder (text_encoder/, tokenizer/) whose digest the denoisers pin."""

    ema = False

    def model(self, job: TrainJob) -> torch.nn.Module:
        return build_clip(load_encoder(Path(job.text_dir), job.text_encoder).model, job.model_config, job.seed)

    def data(self, job: TrainJob, dev: torch.device) -> dict:
        enc = TextEncoder(Path(job.text_dir))
        enc.check(job.captions)
        ids = enc.tokenizer(job.captions, padding="max_length", max_length=enc.max_length, truncation=False,
                            return_tensors="pt")["input_ids"]
        distinct = {c: i for i, c in enumerate(dict.fromkeys(job.captions))}
        return dict(x=torch.from_numpy(to_tensor_array(list(job.pixels))).to(dev), ids=ids.to(dev),
                    caption=torch.tensor([distinct[c] for c in job.captions], device=dev))

    def batch_loss(self, model, data, b, gen, job, arith, dev):
        with precision(arith, dev):
            return model(data["x"][b], data["ids"][b], data["caption"][b])

    def save(self, model, job: TrainJob, out_dir: Path) -> dict:
        shutil.copytree(Path(job.text_dir) / TOKENIZER, out_dir / TOKENIZER)
        model.text.to("cpu").save_pretrained(out_dir / ENCODER, safe_serialization=True)
        return {"text_digest": folder_digest(out_dir)}

    def load(self, folder: Path) -> TextEncoder:
        return TextEncoder(folder)


TRAINERS = {"denoiser": Denoiser(), "router": ClassifierRouter(), "clip": Clip()}


def _adapter_model(job: TrainJob):
    """The job's base model (checked against the digest in its spec) with a fresh adapter."""
    want = job.adapter["base"]
    if not job.base_dir or want is None:
        raise ValueError(f"adapter compartment {job.name!r} needs the base model; train or import it first")
    have = file_digest(Path(job.base_dir) / WEIGHTS)
    if have != want:
        raise ValueError(f"base model in {job.base_dir} has weights {have[:12]}, adapter {job.name!r} "
                         f"expects {want[:12]}")
    base = TRAINERS["denoiser"].load(job.base_dir)
    if is_prompt(job.adapter):
        return PromptModel.fresh(base, job.adapter, job.seed)
    if is_full(job.adapter):
        return base.requires_grad_(True)
    return attach(base, job.adapter, job.seed)


def _items(job: TrainJob, dev: torch.device):
    """The job's items as tensors: x (pixels, or a latent store's VAE latents) and
    `cond_of(batch, drop)`, the batch's condition with `drop` rows set to the null condition
    (the null label, or the empty prompt's embedding in a text store)."""
    if job.latent is not None and len(job.pixels):  # latent diffusion: train on the frozen VAE's latents
        vae = load_latents(Path(job.latent_dir), LatentConfig(source=job.latent_dir, **job.latent), dev)
        x_all = torch.cat([vae.encode(torch.from_numpy(to_tensor_array(list(job.pixels[i:i + 64]))))
                           for i in range(0, len(job.pixels), 64)])
    else:
        x_all = torch.from_numpy(to_tensor_array(list(job.pixels))).to(dev) if len(job.pixels) else None
    if job.text_encoder is None:
        y_all = torch.tensor(job.labels, dtype=torch.long, device=dev)

        def cond_of(b: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
            y = y_all[b].clone()
            y[drop] = job.null_label
            return y
        return x_all, cond_of

    # a text store: embeddings of the distinct captions (row 0: the empty prompt), checked
    # against the encoder's digest in the spec
    enc = load_encoder(Path(job.text_dir), job.text_encoder)
    prompts = ["", *dict.fromkeys(c for c in job.captions if c)]
    row = {p: i for i, p in enumerate(prompts)}
    emb = enc.encode(prompts).to(dev)
    caption_row = torch.tensor([row[c or ""] for c in job.captions], device=dev)

    def cond_of(b: torch.Tensor, drop: torch.Tensor) -> dict:
        rows = caption_row[b].clone()
        rows[drop] = 0
        return {"text": emb[rows]}
    return x_all, cond_of
