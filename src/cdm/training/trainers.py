"""The training code of each model kind (cdm.training.kinds): how a job's network is built,
what it is trained to predict, how it is saved and loaded again. The loop that runs them
is cdm.training.loop; a kind names its trainer in `Kind.trainer`.

- `Denoiser`: a diffusers UNet trained to predict the noise (DDPM, Ho et al. 2020), with an
  EMA of its weights; an adapter compartment trains only its adapter on the frozen base.
- `ClassifierRouter`: the CDM paper's router, a noisy-input classifier of which
  compartment an item came from (cross-entropy), no EMA.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DModel
from safetensors.torch import save_file

from ..models.adapters import PromptModel, adapter_state, attach, lora_config
from ..models.denoisers import Cond, unet_inputs
from ..models.nets import RouterNet, build_router, build_unet, unet_class
from ..store.recipes import TrainConfig, is_full, is_prompt
from ..store.registry import ADAPTER_WEIGHTS, WEIGHTS, file_digest
from .job import TrainJob


class Denoiser:
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

    def save(self, model, job: TrainJob, out_dir: Path) -> None:
        adapter = job.adapter
        if adapter and is_prompt(adapter):
            save_file({"prompt": model.prompt.detach().cpu().contiguous()}, str(out_dir / ADAPTER_WEIGHTS))
        elif adapter and not is_full(adapter):
            save_file(adapter_state(model.to("cpu")), str(out_dir / ADAPTER_WEIGHTS))
            lora_config(adapter).save_pretrained(str(out_dir))  # peft's adapter_config.json
        else:
            model.to("cpu").save_pretrained(out_dir, safe_serialization=True)

    def load(self, folder: Path):
        """A saved full UNet (not an adapter: cdm.sampling.loading applies those to their base)."""
        return unet_class(UNet2DModel.load_config(folder)).from_pretrained(folder, low_cpu_mem_usage=False)


class ClassifierRouter:
    """The classifier router: p(compartment | x_t), trained on noisy items of every compartment."""

    ema = False

    def model(self, job: TrainJob) -> torch.nn.Module:
        return build_router(job.model_config, job.seed)

    def schedule(self, job: TrainJob) -> dict:
        """The denoisers' noise schedule (diffusers' default spacing: only its betas are used)."""
        return {"beta_start": TrainConfig.beta_start, "beta_end": TrainConfig.beta_end, **job.schedule}

    def loss(self, model, xt, t, cond, noise, target):
        return torch.nn.functional.cross_entropy(model(xt, t, cond), target)

    def save(self, model, job: TrainJob, out_dir: Path) -> None:
        model.to("cpu").save_pretrained(out_dir, safe_serialization=True)

    def load(self, folder: Path) -> RouterNet:
        return RouterNet.from_pretrained(folder, low_cpu_mem_usage=False)


TRAINERS = {"denoiser": Denoiser(), "router": ClassifierRouter()}


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
