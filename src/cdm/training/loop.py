"""Run one training job deterministically, in SISA stages, resuming where it stopped.

The job (cdm.training.job) says what the model depends on; its kind's trainer
(cdm.training.trainers) builds, trains and saves the network. Stage k trains on the items
of slices 0..k from the state after stage k-1 and keeps a checkpoint named by its spec;
a mid-stage resume file survives an interruption. The batches come from a generator seeded
by the job's seed and the stage, so a stage gives the same bits however it is resumed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from ..models.precision import deterministic, determinism
from ..store.recipes import recipe_fields, trains_as
from .job import (RESUME, Progress, TrainJob, TrainResult, prune_checkpoints, stage_checkpoint, stage_seed,
                  stage_steps)
from .kinds import KINDS
from .trainers import TRAINERS


def train_job(job: TrainJob, out_dir: Path, ckpt_dir: Path, work_dir: Path, device: str = "cpu",
              progress: Progress | None = None) -> TrainResult:
    """Run one job to completion, resuming where possible; write the model into `out_dir`.
    On CUDA with deterministic kernels (cdm.models.precision.deterministic)."""
    with deterministic(device):
        return _train_job(job, out_dir, ckpt_dir, work_dir, device, progress)


def _train_job(job: TrainJob, out_dir: Path, ckpt_dir: Path, work_dir: Path, device: str,
               progress: Progress | None) -> TrainResult:
    t0, dev, cfg = time.perf_counter(), torch.device(device), job.train
    trainer = TRAINERS[KINDS[job.kind].trainer]
    prune_checkpoints(job, ckpt_dir)
    specs = [job.stage_spec(k) for k in range(job.stages)]
    model = trainer.model(job).to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power) if trainer.ema else None
    state = _State(model, opt, ema, partial=job.adapter is not None, device=dev)
    start_stage, start_step, gen_state, resumed = state.resume(job, specs, ckpt_dir, work_dir / RESUME)

    data = trainer.data(job, dev)
    targets = torch.tensor(job.slices, dtype=torch.long)  # a denoiser's slices (SISA stages)
    per_stage = stage_steps(cfg.steps, job.stages)
    arith = trains_as(getattr(cfg, "precision", "fp32"))  # the recipe's (a router's or encoder's has none: fp32)
    total, done_before = sum(per_stage), sum(per_stage[:start_stage]) + start_step
    steps_run, loss_val, empty = 0, None, []
    for k in range(start_stage, job.stages):
        idx = torch.nonzero(targets <= k).flatten() if job.staged else torch.arange(len(job.hashes))
        if not len(idx):
            empty.append(k)
        gen = torch.Generator().manual_seed(stage_seed(job.seed, k))
        step0 = 0
        if k == start_stage and gen_state is not None:
            gen.set_state(gen_state)
            step0 = start_step
        for step in range(step0, per_stage[k] if len(idx) else 0):
            for g in opt.param_groups:  # linear warm-up
                g["lr"] = cfg.lr * min(1.0, (sum(per_stage[:k]) + step + 1) / cfg.warmup)
            b = idx[torch.randint(0, len(idx), (cfg.batch_size,), generator=gen)].to(dev)
            loss = trainer.batch_loss(model, data, b, gen, job, arith, dev)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.step(params)
            steps_run, loss_val = steps_run + 1, float(loss.detach())
            if progress:
                progress(job.name, done_before + steps_run, total, loss_val)
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < per_stage[k]:
                state.save(specs[k], k, step + 1, gen, work_dir / RESUME)
        if KINDS[job.kind].checkpoints:
            state.save(specs[k], k, per_stage[k], None, stage_checkpoint(ckpt_dir, k, specs[k]))
        (work_dir / RESUME).unlink(missing_ok=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    if ema is not None:
        ema.copy_to(params)
    info = trainer.save(model, job, out_dir)
    meta = dict(name=job.name, kind=job.kind, items=len(job.hashes), spec=job.spec, seed=job.seed,
                train=recipe_fields(cfg), num_slices=job.num_slices, null_label=job.null_label, classes=job.classes,
                adapter=job.adapter, run=determinism(dev))
    (out_dir / "cdm.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return TrainResult(job.name, job.kind, len(job.hashes), steps_run, time.perf_counter() - t0, loss_val,
                       resumed, job.spec, out_dir, total, _notes(per_stage, done_before, resumed, empty), info)


def _notes(per_stage: list[int], done_before: int, resumed: str, empty: list[int]) -> tuple[str, ...]:
    """Why a run's steps differ from its recipe's, in words (`cdm train` prints them)."""
    notes = []
    if done_before:
        notes.append(f"resumed from {resumed}: {done_before} of {sum(per_stage)} steps were run before")
    if empty:
        notes.append(f"SISA stage(s) {', '.join(map(str, empty))} skipped ({sum(per_stage[k] for k in empty)} steps): "
                     f"slice(s) 0-{empty[-1]} hold none of its items yet (a stage trains on the slices up to it)")
    return tuple(notes)


class _State:
    """A run's state as checkpoints hold it: the weights (an adapter's only), optimiser, EMA, and
    mid-stage the batch generator."""

    def __init__(self, model, opt, ema, partial: bool, device: torch.device):
        self.model, self.opt, self.ema, self.partial, self.device = model, opt, ema, partial, device

    def weights(self) -> dict:
        if not self.partial:
            return self.model.state_dict()
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def save(self, spec: str, stage: int, step: int, gen: torch.Generator | None, path: Path) -> None:
        obj = dict(spec=spec, stage=stage, step=step, model=self.weights(), opt=self.opt.state_dict(),
                   ema=None if self.ema is None else self.ema.state_dict(), gen=None if gen is None else gen.get_state())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        torch.save(obj, tmp)
        tmp.replace(path)

    def load(self, s: dict) -> None:
        if self.partial:
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if p.requires_grad:
                        p.copy_(s["model"][n])
        else:
            self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])
        if self.ema is not None:
            self.ema.load_state_dict(s["ema"])
            self.ema.to(self.device)

    def resume(self, job: TrainJob, specs: list[str], ckpt_dir: Path, resume_file: Path):
        """Load the latest valid slice checkpoint, then a mid-stage resume file on top.
        Returns (stage, step, generator state, what it resumed from)."""
        start_stage, start_step, resumed, gen_state = 0, 0, "scratch", None
        for k in reversed(range(job.stages)):
            p = stage_checkpoint(ckpt_dir, k, specs[k])
            if p.exists():
                self.load(torch.load(p, map_location=self.device, weights_only=True))
                start_stage, resumed = k + 1, f"stage {k}"
                break
        if resume_file.exists():
            r = torch.load(resume_file, map_location=self.device, weights_only=True)
            if start_stage <= r["stage"] < job.stages and r["spec"] == specs[r["stage"]]:
                self.load(r)
                start_stage, start_step, gen_state = r["stage"], r["step"], r["gen"]
                resumed = f"step {start_step} of stage {start_stage}"
        return start_stage, start_step, gen_state, resumed
