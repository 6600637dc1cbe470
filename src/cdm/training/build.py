"""Build models: run the jobs a plan names on an executor and install each result atomically.

`train` is `cdm train`; `run_jobs` is shared with forgetting (cdm.training.forget). The executor
(local or Ray) never opens the registry: this process alone writes it, under the store's
writer lock.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, replace

from .executor import Executor, LocalExecutor, Task
from .kinds import UPSTREAM, build_job, kind_of, train_plan
from ..models.precision import resolve
from ..store.recipes import router_config, train_config, trains_as
from ..store.registry import Store
from ..errors import DataError, StoreError
from .job import Progress, TrainResult


class TrainError(StoreError):
    """Some jobs failed; the others' models were installed. `failed` maps model name to error."""

    def __init__(self, failed: dict[str, str], results: list[TrainResult]):
        self.failed, self.results = failed, results
        lines = "; ".join(f"{n}: {e}" for n, e in failed.items())
        super().__init__(f"training failed for {len(failed)} model(s), the others were installed: {lines}")


def train(store: Store, compartments: list[str] | None = None, paragon: bool = False, router: bool | None = None,
          steps: int | None = None, device: str = "cpu", progress: Progress | None = None,
          actor: str | None = None, executor: Executor | None = None,
          router_steps: int | None = None, epochs: float | None = None,
          precision: str | None = None) -> list[TrainResult]:
    """Train every compartment without an up-to-date model (or the named ones), and optionally
    the paragon and the classifier router. Interrupted work resumes from its last checkpoint.
    `steps` (denoisers) and `router_steps` (the classifier router) change the store's recipe,
    and the change is logged; so does `epochs` (a budget in passes over each model's items,
    `steps` its cap; 0 goes back to a fixed step count), and `precision` (cdm.models.precision).
    A recipe still at precision "auto" is made concrete and recorded on the first run: bf16 on
    CUDA for a store without trained denoisers, else fp32 (so no trained model goes stale).
    Jobs run on `executor` (default: locally, on `device`); this
    process alone writes the registry, and holds the store's writer lock throughout."""
    with store.writing("train"):
        _set_precision(store, precision, device, actor)
        for key, value, config in (("train", steps, train_config), ("router", router_steps, router_config)):
            if value is None:
                continue
            if value < 1:
                raise DataError(f"{'router_' if key == 'router' else ''}steps must be >= 1, got {value}")
            if value != config(store).steps:
                with store.tx() as db:
                    store.set_meta(db, key, asdict(replace(config(store), steps=value)))
                    store.log(db, "config", {f"{key}.steps": value}, actor)
        if epochs is not None:
            if epochs < 0 or epochs != epochs:
                raise DataError(f"epochs must be >= 0 (0: a fixed step count), got {epochs}")
            budget = epochs or None
            if budget != train_config(store).epochs:
                with store.tx() as db:
                    store.set_meta(db, "train", asdict(replace(train_config(store), epochs=budget)))
                    store.log(db, "config", {"train.epochs": budget}, actor)
        return run_jobs(store, train_plan(store, compartments, paragon, router), executor or LocalExecutor(device),
                        progress, actor)


def _set_precision(store: Store, asked: str | None, device: str, actor: str | None) -> None:
    current = train_config(store).precision
    want = asked or current
    if want == "auto":
        trained = any(kind_of(n).trainer == "denoiser" for n in store.models())
        want = "fp32" if trained else resolve("auto", device)
    resolve(want, device)  # refuses what `device` cannot run, before anything is recorded
    if want != current:
        with store.tx() as db:
            store.set_meta(db, "train", asdict(replace(train_config(store), precision=want)))
            if trains_as(current) != want:  # an unrecorded auto trained as fp32 already: no model changes
                store.log(db, "config", {"train.precision": want}, actor)


def run_jobs(store: Store, names: list[str], executor: Executor | None = None, progress: Progress | None = None,
             actor: str | None = None) -> list[TrainResult]:
    """Build the named models' jobs, run them on `executor` and install each model atomically
    as it arrives. A failed job is reported by name (`TrainError`) after the rest are installed.
    Named upstream models (the trained text encoder, then the adapters' base) are trained and
    installed first, each alone, and the other jobs built after them: a job holds the digests
    of what it is built on (if one fails, nothing after it runs)."""
    executor = executor or LocalExecutor()
    waves = [w for w in [*([u] for u in UPSTREAM if u in names), [n for n in names if n not in UPSTREAM]] if w]
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
                        executor=executor.name, threads=o.threads, weights=job.weights, **res.info)
            if job.adapter:
                info["adapter"] = job.adapter  # recipe and base digest
            row = store.install_model(job.name, job.kind, job.spec, o.task.out_dir, job.weights, info,
                                      event=dict(items=res.items, steps_run=res.steps,
                                                 resumed_from=res.resumed_from, executor=executor.name), actor=actor)
            res.out_dir = store.folder(row)
            results.append(res)
    finally:
        for t in tasks:  # folders of failed or unfinished jobs
            if t.out_dir.exists():
                shutil.rmtree(t.out_dir, ignore_errors=True)
    return results
