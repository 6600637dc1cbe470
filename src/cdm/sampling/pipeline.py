"""The pipeline: load a composition of compartments once, sample from it many times.

    pipe = CDMPipeline.from_store(store, allow=["a", "b"], router="ito")
    out = pipe(8, "3", SamplingSettings(steps=50, guidance=2.0, seed=0))
    out.images, out.attribution

`from_store` does everything that depends on the store, once, inside one registry
snapshot: the access policy, checks that every model is trained and up to date, and model
loading (only the composed compartments' files are opened; docs/architecture.md,
invariant 4). A call then only samples: a mixture of the loaded denoisers, wrapped in
classifier-free guidance, run by the flat sampler (cdm.sampling.sampler). `SamplingSettings` is the
one list of sampling options; the CLI, the HTTP service, evaluation, the demo and the
benches all pass one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .batching import Batcher, batched, BatchedJoint
from ..store.data import check_prompt, to_uint8_images
from ..models.denoisers import ClassLabels, guided, unet_denoiser
from ..models.grouped import Group, grouped_joint
from ..models.precision import precision
from .cache import LRU
from .loading import load_bank, load_classifier, load_group, load_text, load_unet, load_vae, scheduler_config
from .mixture import Mixture
from ..training.kinds import model_state
from .policy import Policy, store_policy
from ..store.recipes import adapter_config, model_shape, null_label, text_config
from . import routers
from .router_specs import DEFAULT_ROUTER, ROUTERS, check_sampler, router_spec
from .sampler import make_scheduler, sample
from .settings import SamplingSettings
from ..store.registry import BASE, PARAGON, ROUTER, Store
from ..errors import DataError, NotReady, StoreError
from ..models.text import Prompts

ADAPTER_MODES = ("merged", "loop", "joint")


@dataclass
class Generation:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: list[str | None]
    compartments: list[str]  # composed compartments, in weight-column order
    attribution: np.ndarray | None  # (N, K) trajectory-averaged router weights
    final: np.ndarray | None  # (N, K) weights at the end of sampling
    trace: np.ndarray | None  # (steps, N, K) weights at every step
    router: str | None
    evaluations: int = 0  # model evaluations (rows x models x steps, CFG rows included)
    prompts: list[str] | None = None  # text-conditioned stores: each sample's prompt

    def records(self, files: list[str] | None = None) -> list[dict]:
        out = []
        for i, lab in enumerate(self.labels):
            r = {"index": i, "label": lab} if self.prompts is None else {"index": i, "prompt": self.prompts[i]}
            if files:
                r["file"] = files[i]
            if self.attribution is not None:
                r["attribution"], r["final"] = self.weights(self.attribution, i), self.weights(self.final, i)
            out.append(r)
        return out

    def weights(self, w: np.ndarray, i: int) -> dict[str, float]:
        """Sample i's row of `w` (attribution or final weights) by compartment, as reported (6 decimals)."""
        return {c: round(float(v), 6) for c, v in zip(self.compartments, w[i])}


class CDMPipeline:
    """A loaded composition (or the paragon). Call it to sample; it is safe to share across threads."""

    def __init__(self, *, names: list[str], denoisers: list, router, labels: dict[str, int], hist: dict,
                 schedule: dict, cond: ClassLabels | Prompts, shape: tuple[int, int, int], device: str = "cpu",
                 joint=None, vae=None, group: Group | None = None):
        self.names, self.denoisers, self.router, self.joint = names, denoisers, router, joint
        self.group = group  # the models as one cdm.models.grouped.Group (`grouped`), used by batched calls too
        self.vae = vae  # latent stores: samples are decoded with the store's VAE (cdm.models.latent)
        self.labels, self.hist, self.cond = labels, hist, cond  # label ids; label counts per compartment
        self.schedule = schedule  # the noise schedule the models were trained with (a diffusers scheduler config)
        self.shape, self.device = shape, torch.device(device)

    @property
    def paragon(self) -> bool:
        return self.router is None

    @property
    def text(self) -> bool:
        """Conditioned on prompts (a text store, `cdm text`) rather than class labels."""
        return isinstance(self.cond, Prompts)

    @classmethod
    def from_store(cls, store: Store, allow: list[str] | None = None, *, user: str | None = None,
                   policy: Policy | None = None, router: str = DEFAULT_ROUTER, paragon: bool = False,
                   adapter_mode: str = "merged", grouped: bool = False, device: str = "cpu") -> "CDMPipeline":
        """Compose `allow` (default: every compartment, or everything `user` may use under
        `policy`, default the store's) with `router`; or load the paragon.

        Adapter compartments run `adapter_mode`: "merged" (each adapter folded into a copy of the
        base; fastest on CPU), "loop" (one base, adapters applied per call; least memory) or
        "joint" (one base, every adapter's rows in one batched call). `grouped` evaluates all
        compartments in one vectorised call per step (cdm.models.grouped; last-bit differences)."""
        if router not in ROUTERS:
            raise DataError(f"unknown router {router!r}; available: {', '.join(ROUTERS)}")
        if adapter_mode not in ADAPTER_MODES:
            raise DataError(f"unknown adapter mode {adapter_mode!r}; available: {', '.join(ADAPTER_MODES)}")
        if grouped and adapter_mode != "merged":
            raise DataError(f"grouped calls need full or merged models, not adapter mode {adapter_mode!r}")
        if grouped and text_config(store) is not None:
            raise DataError("grouped calls need class-conditional models; this store is text-conditioned")
        with store.snapshot():  # one registry snapshot: old models or new ones, never a mix
            if user is not None:
                policy = policy or store_policy(store)
                if policy is None:
                    raise DataError(f"user {user!r} needs --policy FILE or a store policy "
                                     f"(`cdm policy STORE --set FILE`)")
                allow = policy.resolve(store, user, router, allow)
            elif policy is not None:
                raise DataError("--policy needs --user")
            names = [PARAGON] if paragon else cls._composed(store, allow)
            joint = group = None
            adapters = not paragon and adapter_config(store) is not None
            if adapters:
                state = model_state(store, BASE)
                if state != "ready":
                    raise NotReady(f"the base model of the adapter compartments is "
                                   f"{'not trained' if state == 'missing' else 'out of date'}; run `cdm train`")
            if adapters and adapter_mode != "merged":
                bank = load_bank(store, names, device)
                dens = [bank.denoiser(c) for c in names]
                joint = bank.joint(names) if adapter_mode == "joint" else None
            else:
                unets = [load_unet(store, c, device) for c in names]
                dens = [unet_denoiser(u) for u in unets]
                if grouped and len(unets) > 1:
                    group = load_group(store, names, unets, device)
                    joint = grouped_joint(group, dens)
            comp_router = None if paragon else cls._router(store, router, names, device)
            encoder = load_text(store, device)
            cond = ClassLabels(null_label(store)) if encoder is None else Prompts(encoder)
            return cls(names=names, denoisers=dens, router=comp_router, labels=store.labels(),
                       hist=store.label_counts(), schedule=scheduler_config(store, names[0]), cond=cond,
                       shape=model_shape(store), device=device, joint=joint, vae=load_vae(store, device), group=group)

    @staticmethod
    def _composed(store: Store, allow: list[str] | None) -> list[str]:
        names = store.require_compartments(allow) if allow is not None else sorted(store.compartments())
        if not names:
            raise StoreError("nothing to compose: the allowed set of compartments is empty")
        for c in names:
            state = model_state(store, c)
            if state != "ready":
                raise NotReady(f"compartment {c!r} is {'not trained' if state == 'missing' else 'out of date'}; "
                               f"run `cdm train`")
        return names

    @staticmethod
    def _router(store: Store, name: str, names: list[str], device: str):
        s = router_spec(name)
        if not s.trained:
            return getattr(routers, s.cls)()
        state = model_state(store, ROUTER)
        if state != "ready":
            raise NotReady(f"the classifier router is {'not trained' if state == 'missing' else 'stale (the data changed)'}"
                           f"; run `cdm train`, or use --router ito")
        return load_classifier(store, names, device)

    def __call__(self, n: int, label: str | list[str] | None = None, settings: SamplingSettings = SamplingSettings(),
                 callback: Callable[[int, int], None] | None = None, batcher: Batcher | None = None,
                 prompt: str | list[str] | None = None) -> Generation:
        """Sample n images. `label` (class-conditional stores) or `prompt` (text-conditioned
        stores) is one for all, a list with one per sample, or None (unconditional: the null
        label, or the empty prompt). `callback(step, total)` runs after every step (it may raise
        to stop). With `batcher` (inside its session), model calls are shared with other
        requests sampling at the same time (cdm.sampling.batching); the images do not depend on the company."""
        prompts = self._prompts(n, label, prompt)
        per_sample, lids = self._labels(n, label) if prompts is None else ([None] * n, None)
        if self.router is not None:
            try:
                check_sampler(self.router, settings.sampler == "ddpm")
            except ValueError as e:
                raise DataError(str(e)) from None
        s, dev = settings, self.device
        gen = torch.Generator().manual_seed(s.seed)
        noise_all = torch.randn((n, *self.shape), generator=gen)
        draws = torch.Generator().manual_seed(s.seed + 0x5EED)  # compartment draws of `commit` and `subset`
        cfg = (lids is not None or bool(prompts)) and s.guidance != 1.0  # conditional and null rows
        hooks = [] if callback is None else [lambda step: callback(step.i + 1, step.total)]
        images, att, fin, trace, evals = [], [], [], [], 0
        for start in range(0, n, s.batch_size):
            noise = noise_all[start:start + s.batch_size].to(dev)
            b = noise.shape[0]
            if prompts:
                cond = self.cond.encode(prompts[start:start + b], dev)
            else:
                cond = self.cond.null(b, dev) if lids is None else self.cond.encode(lids[start:start + b], dev)
            mix = None
            if self.router is None:
                den = self.denoisers[0] if batcher is None else batched(batcher, self.denoisers[0])
            else:
                if lids is None:
                    prior = _log_prior(self.hist, self.names, None, b)
                else:
                    each = {c: _log_prior(self.hist, self.names, c, 1) for c in set(lids[start:start + b])}
                    prior = torch.cat([each[c] for c in lids[start:start + b]])
                if cfg:
                    prior = torch.cat([prior, _log_prior(self.hist, self.names, None, b)])
                joint = self.joint if batcher is None else BatchedJoint(batcher, self.denoisers, self.group)
                den = mix = Mixture(self.denoisers, self.router, prior.to(dev), s.sparsity, generator=draws,
                                    num_train_timesteps=self.schedule["num_train_timesteps"], joint=joint,
                                    copies=2 if cfg else 1)
            if cfg:
                den = guided(den, s.guidance, self.cond.null(b, dev))
            with torch.inference_mode(), precision(s.precision if batcher is None else "fp32", dev):
                # (with a batcher, the model calls run on its thread, at its precision)
                x = sample(den, make_scheduler(self.schedule, s.sampler), noise, cond, s.steps, gen,
                           ([mix.on_step] if mix else []) + hooks)
            x = x.float()
            if self.vae is not None:
                x = self.vae.decode(x)
            images.append(to_uint8_images(x.float().cpu().numpy()))
            evals += mix.evaluations if mix else b * (2 if cfg else 1) * s.steps
            if mix is not None:
                weights = torch.stack(mix.trace)
                att.append(weights.mean(dim=0).numpy())
                fin.append(mix.final_weights().cpu().double().numpy())
                trace.append(weights.numpy())
        cat = (lambda xs, ax=0: np.concatenate(xs, axis=ax) if xs else None)
        return Generation(np.concatenate(images), per_sample, self.names, cat(att), cat(fin), cat(trace, 1),
                          None if self.router is None else self.router.name, evals,
                          (prompts or [""] * n) if self.text else None)

    def _prompts(self, n: int, label, prompt) -> list[str] | None:
        """Each sample's prompt (text stores; [] when unconditional), or None (class-conditional)."""
        if not self.text:
            if prompt is not None:
                raise DataError("this store is class-conditional: give a label, not a prompt "
                                 "(`cdm text` conditions a captioned store on prompts)")
            return None
        if label is not None:
            raise DataError("this store is text-conditioned: give a prompt, not a label")
        if n <= 0:
            raise DataError(f"n must be positive, got {n}")
        if prompt is None:
            return []
        per_sample = [prompt] * n if isinstance(prompt, str) else list(prompt)
        if len(per_sample) != n:
            raise DataError(f"got {len(per_sample)} prompts for n={n} samples")
        if any(not isinstance(p, str) for p in per_sample):
            raise DataError("a prompt must be text")
        per_sample = [check_prompt(p) for p in per_sample]  # the caption rules; blank: the empty prompt
        self.cond.encoder.check(list(dict.fromkeys(per_sample)))
        return per_sample

    def _labels(self, n: int, label) -> tuple[list[str | None], list[int] | None]:
        if n <= 0:
            raise DataError(f"n must be positive, got {n}")
        per_sample = [label] * n if label is None or isinstance(label, str) else list(label)
        if len(per_sample) != n:
            raise DataError(f"got {len(per_sample)} labels for n={n} samples")
        if any(lab is None for lab in per_sample) and not all(lab is None for lab in per_sample):
            raise DataError("give a label for every sample, or for none")
        unknown = sorted({lab for lab in per_sample if lab is not None and lab not in self.labels})
        if unknown:
            raise DataError(f"unknown label(s) {', '.join(map(repr, unknown))}; the store has: "
                             f"{', '.join(self.labels) or 'no labels'}")
        for lab in sorted(set(per_sample) - {None}):
            if not any(self.hist.get(c, {}).get(self.labels[lab], 0) for c in (self.hist if self.paragon else self.names)):
                raise DataError(f"label {lab!r} is in none of the composed compartments ({', '.join(self.names)})")
        return per_sample, None if per_sample[0] is None else [self.labels[lab] for lab in per_sample]


def _log_prior(hist: dict, names: list[str], lid: int | None, rows: int) -> torch.Tensor:
    """log pi_i per row: pi_i ~ n_i (unconditional) or n_{i,c} (label c); -inf where zero."""
    counts = torch.tensor([float(sum(hist.get(c, {}).values()) if lid is None else hist.get(c, {}).get(lid, 0))
                           for c in names], dtype=torch.float64)
    lp = torch.where(counts > 0, torch.log(counts / counts.sum()), -torch.inf)
    return lp.expand(rows, -1).clone()


def sample_composition(store: Store, n: int, label: str | list[str] | None = None, allow: list[str] | None = None,
           router: str = DEFAULT_ROUTER, *, paragon: bool = False, user: str | None = None,
           policy: Policy | None = None, adapter_mode: str = "merged", grouped: bool = False, device: str = "cpu",
           callback=None, prompt: str | list[str] | None = None, **settings) -> Generation:
    """Sample n images from the composition of `allow` (default: every compartment) in one call:
    `CDMPipeline.from_store(...)` then a call with `SamplingSettings(**settings)` (steps,
    guidance, sampler, seed, prune, commit, subset, batch_size). A text-conditioned store
    takes `prompt` instead of `label`."""
    pipe = CDMPipeline.from_store(store, allow, user=user, policy=policy, router=router, paragon=paragon,
                                  adapter_mode=adapter_mode, grouped=grouped, device=device)
    return pipe(n, label, SamplingSettings(**settings), callback, prompt=prompt)


class PipelineCache:
    """Pipelines of one store, reused while its registry is unchanged (`Store.generation`):
    a long-running server loads and checks a composition once, not per request. A pipeline
    is keyed by the generation it was loaded at, and a newer generation (a forget, a
    retrain) drops every older pipeline."""

    def __init__(self, size: int = 16):
        self.lru, self.generation = LRU(size), -1

    def get(self, store: Store, allow: list[str] | None = None, **composition) -> CDMPipeline:
        with store.snapshot():
            gen = store.generation()
            if gen > self.generation:
                self.lru.drop(lambda key: key[0] < gen)
                self.generation = gen
            key = (gen, None if allow is None else tuple(allow), tuple(sorted(composition.items())))
            return self.lru.get(key, lambda: CDMPipeline.from_store(store, allow, **composition))
