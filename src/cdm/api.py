"""The Python API: create a store, ingest, train, sample, report status.

    from cdm import api
    store = api.init_store("my-store")
    api.ingest(store, "digits", api.load_builtin("digits"), "iid:4")
    api.train(store, paragon=True)
    out = api.sample(store, n=8, label="3", router="ito")
"""

from __future__ import annotations

import hashlib
import math
import shutil
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from .adapters import ADAPTER_WEIGHTS, AdapterBank, AdapterConfig, merged
from .compose import (ROUTERS, ClassifierRouter, ItoRouter, Mixture, SampleResult, UniformRouter, make_scheduler,
                      sample as run_sampler, unet_denoiser)
from .executor import Executor, LocalExecutor, Task
from .data import DataError, load_builtin, load_folder, to_uint8_images  # noqa: F401 (re-exported)
from .ingest import IngestResult, ingest  # noqa: F401 (re-exported)
from .models import RouterNet, default_preset, unet_config
from .policy import store_policy
from .store import BASE, PARAGON, ROUTER, NotReady, Store, StoreConfig, StoreError, file_digest
from .train import WEIGHTS, Progress, RouterConfig, TrainConfig, TrainJob, TrainResult, weights_file


def init_store(path: str | Path, image_size: int = 8, channels: int = 1, seed: int = 0, slices: int = 4,
               max_labels: int = 16, train: TrainConfig | None = None, router: RouterConfig | None = None) -> Store:
    """Create a store; the training recipe is saved in it so every model is built the same way."""
    store = Store.init(path, StoreConfig(image_size, channels, seed, slices, max_labels))
    train = train or TrainConfig(preset=default_preset(image_size))
    unet_config(train.preset, image_size, channels, max_labels)  # fail now, not at train time
    with store.writing("init"), store.tx() as db:
        store.set_meta(db, "train", asdict(train))
        store.set_meta(db, "router", asdict(router or RouterConfig()))
    return store


def train_config(store: Store) -> TrainConfig:
    return TrainConfig(**store.get_meta("train"))


def router_config(store: Store) -> RouterConfig:
    return RouterConfig(**store.get_meta("router"))


def adapter_config(store: Store) -> AdapterConfig | None:
    """The store's adapter settings, or None when every compartment is a full model."""
    a = store.get_meta("adapter")
    return None if a is None else AdapterConfig(**{**a, "public": tuple(a["public"])})


def set_adapters(store: Store, public: list[str] | None = None, base_from: str | Path | None = None,
                 rank: int = 4, alpha: float | None = None, off: bool = False,
                 actor: str | None = None) -> AdapterConfig | None:
    """Make every compartment a LoRA adapter on a base model trained on the `public` sources
    (or imported from the diffusers folder `base_from`); `off` goes back to full models.
    `alpha` defaults to 4 x rank (LoRA scale 4).
    Changing this makes every compartment stale; `cdm train` then rebuilds them."""
    with store.writing("adapters"):
        if off:
            cfg = None
        else:
            if public:
                missing = [src for src in public if src not in store.sources()]
                if missing:
                    raise StoreError(f"unknown source(s) {', '.join(missing)}; ingest them first "
                                     f"(known: {', '.join(store.sources()) or 'none'})")
            digest = None
            if base_from is not None:
                digest = _check_base_folder(store, Path(base_from))
            cfg = AdapterConfig(rank, 4.0 * rank if alpha is None else alpha, public=tuple(sorted(set(public or ()))),
                                base_from=digest)
        if base_from is not None and cfg is not None:
            _install_base(store, Path(base_from), cfg.base_from)
        with store.tx() as db:
            store.set_meta(db, "adapter", None if cfg is None else asdict(cfg))
            store.log(db, "config", {"adapter": None if cfg is None else asdict(cfg)}, actor)
        return cfg


def _check_base_folder(store: Store, folder: Path) -> str:
    """Validate a diffusers UNet2DModel folder as a base for this store; returns its weights digest."""
    f = folder / WEIGHTS
    if not f.is_file() or not (folder / "config.json").is_file():
        raise StoreError(f"{folder} is not a diffusers UNet2DModel folder (needs config.json and {WEIGHTS})")
    conf = UNet2DModel.load_config(folder)
    cfg = store.config
    want = dict(sample_size=cfg.image_size, in_channels=cfg.channels, out_channels=cfg.channels,
                num_class_embeds=cfg.max_labels + 1)
    bad = {k: (conf.get(k), v) for k, v in want.items() if conf.get(k) != v}
    if bad:
        raise StoreError(f"base model {folder} does not fit this store: "
                         + ", ".join(f"{k}={have} (store needs {need})" for k, (have, need) in bad.items()))
    try:
        UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False)
    except Exception as e:  # corrupted weights
        raise StoreError(f"base model {folder} does not load: {e}") from e
    return file_digest(f)


def _install_base(store: Store, folder: Path, digest: str) -> None:
    tmp = store.new_model_dir(BASE)
    for name in ("config.json", WEIGHTS):
        shutil.copyfile(folder / name, tmp / name)
    train_config(store).scheduler().save_pretrained(tmp)
    store.install_model(BASE, "base", f"import:{digest}", tmp, WEIGHTS, dict(imported_from=str(folder)))


def model_seed(store: Store, name: str) -> int:
    """Seed of one model: a pure function of the store seed and the model's name."""
    return int.from_bytes(hashlib.sha256(f"model\x1f{store.config.seed}\x1f{name}".encode()).digest()[:8], "big") >> 1


def null_label(store: Store) -> int:
    return store.config.max_labels


# --- training ---------------------------------------------------------------------------


def build_job(store: Store, name: str, load_pixels: bool = True) -> TrainJob:
    """The self-contained job for a compartment, the paragon, or the classifier router."""
    cfg, null = store.config, null_label(store)
    if name == ROUTER:
        comps = [c for c, n in sorted(store.counts().items()) if n > 0]
        rows = sorted((r for r in store.items() if r.compartment in comps), key=lambda r: (r.compartment, r.hash))
        t, rc = train_config(store), router_config(store)
        model = dict(compartments=comps, image_size=cfg.image_size, in_channels=cfg.channels,
                     num_class_embeds=cfg.max_labels + 1, width=rc.width, num_train_timesteps=t.num_train_timesteps)
        job = TrainJob(ROUTER, "router", [r.hash for r in rows], [null if r.label is None else r.label for r in rows],
                       [comps.index(r.compartment) for r in rows], np.zeros((0,), np.uint8), model, rc,
                       model_seed(store, ROUTER), 1, null, comps,
                       dict(num_train_timesteps=t.num_train_timesteps, beta_schedule=t.beta_schedule))
    else:
        adapters = adapter_config(store)
        if name == BASE:
            if adapters is None or adapters.base_from:
                raise StoreError("this store's base model is not trained here: "
                                 + ("no adapters are set (see `cdm adapters`)" if adapters is None else "it was imported"))
            rows = [r for r in store.items() if r.source in adapters.public]
            kind = "base"
        else:
            rows = store.items() if name == PARAGON else store.items(name)
            kind = "paragon" if name == PARAGON else "compartment"
        t = train_config(store)
        job = TrainJob(name, kind, [r.hash for r in rows], [null if r.label is None else r.label for r in rows],
                       [r.slice for r in rows], np.zeros((0,), np.uint8),
                       unet_config(t.preset, cfg.image_size, cfg.channels, cfg.max_labels), t, model_seed(store, name),
                       cfg.slices, null)
        if adapters is not None and kind == "compartment":
            base = store.model(BASE)
            job.model_config = {}  # the base (pinned by its digest) is the architecture
            job.extra = dict(adapter=dict(**adapters.recipe(), base=base.digest if base else None))
            job.base_dir = str(store.folder(base)) if base else None
    if load_pixels and job.hashes:
        job.pixels = np.stack([store.read_item(h) for h in job.hashes])
    return job


def model_state(store: Store, name: str) -> str:
    """'missing' (no model), 'stale' (trained on other items or another recipe) or 'ready'."""
    row = store.model(name)
    if row is None:
        return "missing"
    if name == BASE:
        a = adapter_config(store)
        if a is None:
            return "stale"
        if a.base_from:
            return "ready" if row.spec == f"import:{a.base_from}" else "stale"
    return "ready" if row.spec == build_job(store, name, load_pixels=False).spec else "stale"


def plan(store: Store, compartments: list[str] | None = None, paragon: bool = False,
         router: bool | None = None) -> list[str]:
    """Names of the models that `train` would (re)train, in training order."""
    counts = store.counts()
    names = store.require_compartments(compartments) if compartments else sorted(store.compartments())
    empty = [n for n in names if counts.get(n, 0) == 0]
    if compartments and empty:
        raise StoreError(f"compartment(s) {', '.join(empty)} hold no items; nothing to train")
    todo = [n for n in names if counts.get(n, 0) and model_state(store, n) != "ready"]
    adapters = adapter_config(store)
    if adapters is not None and todo:
        if adapters.base_from:
            if model_state(store, BASE) != "ready":
                raise NotReady("the imported base model is missing or corrupted; import it again with "
                               "`cdm adapters --base-from DIR`")
        elif model_state(store, BASE) != "ready":
            if not any(r.source in adapters.public for r in store.items()):
                raise StoreError(f"the base model trains on source(s) {', '.join(adapters.public)}, "
                                 f"which hold no items")
            todo = [BASE, *(n for n in names if counts.get(n, 0))]  # a new base makes every adapter stale
    if paragon and counts and model_state(store, PARAGON) != "ready":
        todo.append(PARAGON)
    if router is None:
        router = not compartments
    if router and sum(1 for n in counts.values() if n) >= 2 and model_state(store, ROUTER) != "ready":
        todo.append(ROUTER)
    return todo


def train(store: Store, compartments: list[str] | None = None, paragon: bool = False, router: bool | None = None,
          steps: int | None = None, device: str = "cpu", progress: Progress | None = None,
          actor: str | None = None, executor: Executor | None = None) -> list[TrainResult]:
    """Train every compartment without an up-to-date model (or the named ones), and optionally
    the paragon and the classifier router. Interrupted work resumes from its last checkpoint.
    Jobs run on `executor` (default: locally, on `device`); this process alone writes the
    registry, and holds the store's writer lock throughout."""
    with store.writing("train"):
        if steps is not None:
            if steps < 1:
                raise StoreError(f"steps must be >= 1, got {steps}")
            if steps != train_config(store).steps:
                with store.tx() as db:
                    store.set_meta(db, "train", asdict(replace(train_config(store), steps=steps)))
                    store.log(db, "config", {"train.steps": steps}, actor)
        return run_jobs(store, plan(store, compartments, paragon, router), executor or LocalExecutor(device),
                        progress, actor)


class TrainError(StoreError):
    """Some jobs failed; the others' models were installed. `failed` maps model name to error."""

    def __init__(self, failed: dict[str, str], results: list[TrainResult]):
        self.failed, self.results = failed, results
        lines = "; ".join(f"{n}: {e}" for n, e in failed.items())
        super().__init__(f"training failed for {len(failed)} model(s), the others were installed: {lines}")


def run_jobs(store: Store, names: list[str], executor: Executor | None = None, progress: Progress | None = None,
             actor: str | None = None) -> list[TrainResult]:
    """Build the named models' jobs, run them on `executor` and install each model atomically
    as it arrives. A failed job is reported by name (`TrainError`) after the rest are installed.
    A named base model is trained and installed first, and the other jobs built after it: an
    adapter's job holds its base's digest (if the base fails, nothing else runs)."""
    executor = executor or LocalExecutor()
    waves = [[BASE], [n for n in names if n != BASE]] if BASE in names else [names]
    results: list[TrainResult] = []
    failed: dict[str, str] = {}
    with store.writing("train"):
        for wave in waves:
            if not failed:
                results += _run_wave(store, wave, executor, progress, failed, actor)
    if failed:
        raise TrainError(failed, results)
    return results


def _run_wave(store: Store, names: list[str], executor: Executor, progress: Progress | None,
              failed: dict[str, str], actor: str | None = None) -> list[TrainResult]:
    tasks = [Task(build_job(store, n), store.new_model_dir(n), store.checkpoint_dir(n), store.work_dir(n))
             for n in names]
    results = []
    try:
        for o in executor.run(tasks, progress):
            job, res = o.task.job, o.result
            if o.error is not None:
                failed[job.name] = o.error
                continue
            info = dict(items=res.items, steps=job.train.steps, seconds=round(res.seconds, 3),
                        final_loss=res.final_loss, resumed_from=res.resumed_from, classes=job.classes,
                        executor=executor.name, threads=o.threads, weights=weights_file(job))
            if job.extra.get("adapter"):
                info["adapter"] = job.extra["adapter"]  # recipe and base digest
            row = store.install_model(job.name, job.kind, job.spec, o.task.out_dir, weights_file(job), info,
                                      event=dict(items=res.items, steps_run=res.steps,
                                                 resumed_from=res.resumed_from, executor=executor.name), actor=actor)
            res.out_dir = store.folder(row)
            results.append(res)
    finally:
        for t in tasks:  # folders of failed or unfinished jobs
            if t.out_dir.exists():
                shutil.rmtree(t.out_dir, ignore_errors=True)
    return results


# --- sampling ---------------------------------------------------------------------------


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

    def records(self, files: list[str] | None = None) -> list[dict]:
        out = []
        for i, lab in enumerate(self.labels):
            r = {"index": i, "label": lab}
            if files:
                r["file"] = files[i]
            if self.attribution is not None:
                r["attribution"] = {c: round(float(w), 6) for c, w in zip(self.compartments, self.attribution[i])}
                r["final"] = {c: round(float(w), 6) for c, w in zip(self.compartments, self.final[i])}
            out.append(r)
        return out


def load_unet(store: Store, name: str, device: str = "cpu") -> UNet2DModel:
    """Load one live model, checking its weights file against the registry digest on every call;
    a model already in memory with that digest is reused (models are never modified in place).
    An adapter compartment comes back merged into (a copy of) its base. Models are kept
    channels-last (the same weights, rounding may differ): 5-14% faster sampling on CPU."""
    row, folder = _checked(store, name)
    adapter = row.info.get("adapter")
    if adapter:
        base = load_unet(store, BASE, device)
        if store.model(BASE).digest != adapter["base"]:
            raise StoreError(f"compartment {name!r} is an adapter on another base model; retrain with `cdm train`")
        key = (str(folder.resolve()), row.digest, str(device), adapter["base"])
        return _cached(key, lambda: merged(base, adapter, _adapter_weights(folder))
                       .to(device, memory_format=torch.channels_last))
    key = (str(folder.resolve()), row.digest, str(device))
    return _cached(key, lambda: UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False)
                   .to(device, memory_format=torch.channels_last).eval().requires_grad_(False))


def load_bank(store: Store, names: list[str], device: str = "cpu") -> AdapterBank:
    """The base with the adapters of `names` injected, unmerged (one copy of the base in memory)."""
    rows = {n: _checked(store, n) for n in names}
    base_row = store.model(BASE)
    for n, (row, _) in rows.items():
        if not row.info.get("adapter") or base_row is None or row.info["adapter"]["base"] != base_row.digest:
            raise StoreError(f"compartment {n!r} is not an adapter on this store's base model")
    base = load_unet(store, BASE, device)
    key = ("bank", base_row.digest, str(device), tuple((n, r.digest) for n, (r, _) in rows.items()))
    return _cached(key, lambda: AdapterBank(base, {n: (r.info["adapter"], _adapter_weights(f))
                                                   for n, (r, f) in rows.items()}))


def _checked(store: Store, name: str):
    row = store.model(name)
    if row is None:
        what = "the base model" if name == BASE else f"compartment {name!r}"
        raise NotReady(f"{what} is not trained; run `cdm train`")
    folder = store.folder(row)
    try:
        ok = file_digest(folder / row.info.get("weights", WEIGHTS)) == row.digest
    except OSError:
        ok = False
    if not ok:
        raise NotReady(f"model files of {name!r} ({row.path} in the store) are missing or corrupted; "
                       "retrain with `cdm train`")
    return row, folder


def _adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / ADAPTER_WEIGHTS))


def _cached(key: tuple, build):
    with _UNETS_LOCK:
        if key in _UNETS:
            _UNETS[key] = _UNETS.pop(key)  # most recently used last
            return _UNETS[key]
    model = build()
    with _UNETS_LOCK:
        _UNETS[key] = model
        while len(_UNETS) > UNET_CACHE:
            _UNETS.pop(next(iter(_UNETS)))
    return model


ADAPTER_MODES = ("merged", "loop", "joint")
UNET_CACHE = 32  # models kept in memory across calls, keyed by folder, weights digest and device
_UNETS: dict[tuple, UNet2DModel] = {}
_UNETS_LOCK = threading.Lock()


def forget_unused_models() -> None:
    """Drop models from memory whose folder is gone (replaced or forgotten)."""
    with _UNETS_LOCK:
        for key in [k for k in _UNETS if k[0] == "bank" or not Path(k[0]).exists()]:
            _UNETS.pop(key, None)


def sample(store: Store, n: int, label: str | list[str] | None = None, allow: list[str] | None = None, router: str = "ito",
           steps: int = 50, guidance: float = 2.0, seed: int = 0, sampler: str = "ddpm", device: str = "cpu",
           paragon: bool = False, batch_size: int = 256, callback=None, prune: float | None = None,
           commit: float | None = None, adapter_mode: str = "merged", subset: int | None = None) -> Generation:
    """Sample n images from the composition of `allow` (default: every compartment).

    `label` is one label for all samples, a list with one per sample, or None (unconditional).
    `prune` (margin in nats), `commit` (fraction of the trajectory) and `subset` (compartments
    per sample) make the composition sparse (see `compose.Mixture`); with all None every
    compartment is evaluated.

    Adapter compartments run `adapter_mode`: "merged" (each adapter folded into a copy of the
    base; fastest on CPU), "loop" (one base, adapters applied per call; least memory) or
    "joint" (one base, every adapter's rows in one batched call).

    Only models of composed compartments are opened (docs/architecture.md, invariant 4).
    """
    if n <= 0:
        raise StoreError(f"n must be positive, got {n}")
    if router not in ROUTERS:
        raise StoreError(f"unknown router {router!r}; available: {', '.join(ROUTERS)}")
    if guidance < 0 or not math.isfinite(guidance):
        raise StoreError(f"guidance must be a finite number >= 0, got {guidance}")
    if prune is not None and not prune >= 0:
        raise StoreError(f"prune must be a margin >= 0 in nats, got {prune}")
    if commit is not None and not 0 <= commit <= 1:
        raise StoreError(f"commit must be a fraction of the trajectory in [0, 1], got {commit}")
    if subset is not None and not (isinstance(subset, int) and subset >= 1):
        raise StoreError(f"subset must be a number of compartments >= 1, got {subset!r}")
    if adapter_mode not in ADAPTER_MODES:
        raise StoreError(f"unknown adapter mode {adapter_mode!r}; available: {', '.join(ADAPTER_MODES)}")
    with store.snapshot():  # one registry snapshot: old models or new ones, never a mix
        labels = store.labels()
        per_sample = [label] * n if label is None or isinstance(label, str) else list(label)
        if len(per_sample) != n:
            raise StoreError(f"got {len(per_sample)} labels for n={n} samples")
        if any(lab is None for lab in per_sample) and not all(lab is None for lab in per_sample):
            raise StoreError("give a label for every sample, or for none")
        unknown = sorted({lab for lab in per_sample if lab is not None and lab not in labels})
        if unknown:
            raise StoreError(f"unknown label(s) {', '.join(map(repr, unknown))}; the store has: "
                             f"{', '.join(labels) or 'no labels'}")
        lids = None if per_sample[0] is None else [labels[lab] for lab in per_sample]
        if paragon:
            names = [PARAGON]
            if model_state(store, PARAGON) != "ready":
                raise NotReady("the paragon is not trained or out of date; run `cdm train --paragon`")
        else:
            names = store.require_compartments(allow) if allow is not None else sorted(store.compartments())
            if not names:
                raise StoreError("nothing to compose: the allowed set of compartments is empty")
            for c in names:
                state = model_state(store, c)
                if state != "ready":
                    raise NotReady(f"compartment {c!r} is {'not trained' if state == 'missing' else 'out of date'}; "
                                   f"run `cdm train`")
        hist = store.label_counts()
        for lab in sorted(set(per_sample) - {None}):
            if not any(hist.get(c, {}).get(labels[lab], 0) for c in (names if not paragon else hist)):
                raise StoreError(f"label {lab!r} is in none of the composed compartments ({', '.join(names)})")

        dev = torch.device(device)
        joint = None
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
            dens = [unet_denoiser(load_unet(store, c, device)) for c in names]
        sched_conf = _scheduler_config(store, names[0])
        make_scheduler(sched_conf, sampler)  # validates the sampler name before any work
        comp_router = None
        if not paragon:
            comp_router = {"uniform": UniformRouter, "ito": ItoRouter}.get(router)
            comp_router = comp_router() if comp_router else _classifier(store, names, device)
            if comp_router.spec.stochastic and sampler != "ddpm":
                raise StoreError(f"router {router!r} needs the stochastic ddpm sampler, not {sampler!r}; "
                                 f"use --sampler ddpm or --router classifier")
    null = null_label(store)
    cfg = store.config
    gen = torch.Generator().manual_seed(seed)
    noise_all = torch.randn((n, cfg.channels, cfg.image_size, cfg.image_size), generator=gen)
    images, att, fin, trace, evals = [], [], [], [], 0
    draws = torch.Generator().manual_seed(seed + 0x5EED)  # compartment draws of `commit` and `subset`
    two = lids is not None and guidance != 1.0  # conditional and unconditional rows (guidance)
    for s in range(0, n, batch_size):
        noise = noise_all[s:s + batch_size].to(dev)
        b = noise.shape[0]
        y = None if lids is None else torch.tensor(lids[s:s + b], dtype=torch.long, device=dev)
        if paragon:
            den = dens[0]
        else:
            cond = None if lids is None else torch.cat([_log_prior(hist, names, c, 1) for c in lids[s:s + b]])
            uncond = _log_prior(hist, names, None, b)
            prior = torch.cat([cond, uncond]) if two else (cond if cond is not None else uncond)
            den = Mixture(dens, comp_router, prior.to(dev), prune, commit, draws, sched_conf["num_train_timesteps"],
                          joint, subset)
        with torch.inference_mode():
            res: SampleResult = run_sampler(den, make_scheduler(sched_conf, sampler), noise, y, null,
                                            guidance, steps, gen, callback)
        images.append(to_uint8_images(res.images.float().cpu().numpy()))
        evals += den.evaluations if isinstance(den, Mixture) else b * (2 if two else 1) * steps
        if res.weights is not None:
            att.append(res.attribution.numpy())
            fin.append(res.final.double().numpy())
            trace.append(res.weights.numpy())
    cat = (lambda xs, ax=0: np.concatenate(xs, axis=ax) if xs else None)
    return Generation(np.concatenate(images), per_sample, names, cat(att), cat(fin), cat(trace, 1),
                      None if paragon else router, evals)


def _scheduler_config(store: Store, name: str) -> dict:
    return dict(DDPMScheduler.load_config(store.model_dir(name)))


def _log_prior(hist: dict, names: list[str], lid: int | None, rows: int) -> torch.Tensor:
    """log pi_i per row: pi_i ~ n_i (unconditional) or n_{i,c} (label c); -inf where zero."""
    counts = torch.tensor([float(sum(hist.get(c, {}).values()) if lid is None else hist.get(c, {}).get(lid, 0))
                           for c in names], dtype=torch.float64)
    lp = torch.where(counts > 0, torch.log(counts / counts.sum()), -torch.inf)
    return lp.expand(rows, -1).clone()


def _classifier(store: Store, names: list[str], device: str) -> ClassifierRouter:
    state = model_state(store, ROUTER)
    if state != "ready":
        raise NotReady(f"the classifier router is {'not trained' if state == 'missing' else 'stale (the data changed)'}"
                       f"; run `cdm train`, or use --router ito")
    row = store.model(ROUTER)
    folder = store.folder(row)
    if file_digest(folder / WEIGHTS) != row.digest:
        raise NotReady(f"classifier router files ({row.path} in the store) are corrupted; retrain with `cdm train`")
    net = RouterNet.from_pretrained(folder, low_cpu_mem_usage=False).to(device).eval()
    classes = list(net.config.compartments)
    return ClassifierRouter(net, [classes.index(c) for c in names])


# --- status -----------------------------------------------------------------------------


def status(store: Store) -> dict:
    cfg = store.config
    counts, hist, names = store.counts(), store.label_counts(), store.label_names()
    comps = {}
    for c, src in store.compartments().items():
        row = store.model(c)
        comps[c] = dict(source=src, items=counts.get(c, 0), model=model_state(store, c),
                        digest=row.digest if row else None,
                        labels={("-" if k is None else names[k]): v for k, v in sorted(hist.get(c, {}).items(),
                                                                                       key=lambda kv: (kv[0] is None, kv[0] or 0))})
    models = {}
    for special in (PARAGON, ROUTER):
        row = store.model(special)
        models[special] = dict(state=model_state(store, special) if counts else "missing",
                               digest=row.digest if row else None)
    hist_all: dict[str, int] = {}
    for c in hist.values():
        for k, v in c.items():
            key = "-" if k is None else names[k]
            hist_all[key] = hist_all.get(key, 0) + v
    pol, users = store_policy(store), {}
    missing = pol.missing(store) if pol else {}
    for u in sorted(pol.users) if pol else []:
        allowed = pol.allowed(store, u)
        users[u] = dict(compartments=allowed, restricted=len(allowed) < len(comps))
        if u in missing:
            users[u]["missing"] = missing[u]  # names that grant nothing (forgotten or never ingested)
    a = adapter_config(store)
    adapters = None if a is None else dict(asdict(a), public=list(a.public), base=model_state(store, BASE))
    return dict(store=str(store.root), config=asdict(cfg), train=asdict(train_config(store)), policy=users or None,
                adapters=adapters,
                sources=store.sources(), items=sum(counts.values()), labels=hist_all, compartments=comps,
                paragon=models[PARAGON], router=dict(
                    **models[ROUTER],
                    note="the classifier router is trained on every compartment's data: a restricted composition "
                         "using it still reads a network fit to compartments outside the allowed set; "
                         "the ito router holds no data"))
