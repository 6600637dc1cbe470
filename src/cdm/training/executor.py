"""Executors: where training jobs run. The driver alone writes the store.

A `Task` is a self-contained `TrainJob` and the store folders its files belong in. An
executor runs tasks and yields, per task, the result or the error it raised; the driver
(`build.run_jobs`) then registers each model; no worker ever opens the registry. The same
job with the same number of threads gives bit-identical weights on either executor (CPU
kernels split their sums by thread count, so threads are recorded with each model).

- `LocalExecutor`: runs the jobs one after the other in this process.
- `RayExecutor`: one Ray task per job with its CPUs and GPUs, on a local Ray instance it
  starts and stops (temporary directory in the system temp) or on a cluster (`address`).
  The files a job resumes from (its latest valid slice checkpoint, the base model of an
  adapter compartment) and the files it produces travel through Ray's object store, so
  workers need no shared filesystem; the driver writes them into the store.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Union

import torch

from .job import RESUME, Progress, TrainJob, TrainResult, prune_checkpoints, stage_checkpoint
from .loop import train_job

EXECUTORS = ("local", "ray")
Executor = Union["LocalExecutor", "RayExecutor"]


@dataclass
class Task:
    """A job and where its files live in the store (driver-side paths)."""

    job: TrainJob
    out_dir: Path  # new model folder
    ckpt_dir: Path  # slice checkpoints
    work_dir: Path  # interrupted-run state


@dataclass
class Outcome:
    task: Task
    result: TrainResult | None = None  # the model is in task.out_dir
    error: str | None = None  # "ExceptionType: message"
    threads: int = 0  # torch threads the job ran with


@contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


class LocalExecutor:
    """Jobs one after the other, in this process, training in place (a killed run resumes
    mid-stage from the store's work folder)."""

    name = "local"

    def __init__(self, device: str = "cpu", threads: int | None = None):
        self.device, self.threads = device, threads

    def run(self, tasks: list[Task], progress: Progress | None = None) -> Iterator[Outcome]:
        def report(*args) -> None:  # the caller's errors are the caller's, not the job's
            try:
                progress(*args)
            except BaseException as e:
                raise _CallerError() from e

        for t in tasks:
            try:
                with _threads(self.threads) as n:
                    res = train_job(t.job, t.out_dir, t.ckpt_dir, t.work_dir, self.device, progress and report)
                yield Outcome(t, res, None, n)
            except _CallerError as e:
                raise e.__cause__ from None
            except Exception as e:  # reported per job; KeyboardInterrupt and kills propagate
                yield Outcome(t, error=f"{type(e).__name__}: {e}")


class _CallerError(Exception):
    pass


class RayExecutor:
    """One Ray task per job (`pip install cdm[ray]`).

    `address`: an existing cluster ("auto", "ray://host:10001", "host:6379"); None starts a
    local instance for the duration of `run` and shuts it down after. `threads` is the CPUs
    reserved per job (and torch's thread count in it); `gpus_per_job` > 0 trains on CUDA.
    A job whose worker dies is retried `retries` times; a job that raises is reported.
    """

    name = "ray"

    def __init__(self, address: str | None = None, threads: int | None = None, gpus_per_job: float = 0,
                 retries: int = 2, num_cpus: int | None = None, device: str = "cpu"):
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise ValueError("the ray executor needs Ray: pip install 'cdm[ray]'") from e
        if gpus_per_job < 0:
            raise ValueError(f"gpus_per_job must be >= 0, got {gpus_per_job}")
        if device != "cpu" and not gpus_per_job:
            raise ValueError(f"with the ray executor, ask for GPUs with --gpus-per-job, not --device {device}")
        self.address, self.threads, self.gpus, self.retries = address, threads or 1, gpus_per_job, retries
        self.num_cpus = num_cpus

    @contextmanager
    def _cluster(self):
        import ray

        if ray.is_initialized():  # the caller's own Ray session
            yield
            return
        tmp = None
        if self.address is None:
            tmp = tempfile.mkdtemp(prefix="cdm-ray-")
            if len(tmp) > 40 and Path("/tmp").is_dir():  # Ray's socket paths must stay under 108 bytes
                shutil.rmtree(tmp)
                tmp = tempfile.mkdtemp(prefix="cdm-ray-", dir="/tmp")
            ray.init(num_cpus=self.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     configure_logging=False, _temp_dir=tmp, object_store_memory=512 * 2**20)
        else:
            ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        try:
            yield
        finally:
            ray.shutdown()
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)

    def run(self, tasks: list[Task], progress: Progress | None = None) -> Iterator[Outcome]:
        import ray

        with self._cluster():
            sink = ray.remote(num_cpus=0)(_ProgressSink).remote()
            remote = ray.remote(_ray_task).options(num_cpus=self.threads, num_gpus=self.gpus,
                                                   max_retries=self.retries, retry_exceptions=False)
            device = "cuda" if self.gpus else "cpu"
            pending = {remote.remote(t.job, _pack(t), device, self.threads, sink): t for t in tasks}
            shown: dict[str, tuple] = {}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                if progress:
                    for name, rec in sorted(ray.get(sink.latest.remote()).items()):
                        if shown.get(name) != rec:
                            shown[name] = rec
                            progress(name, *rec)
                for ref in done:
                    task = pending.pop(ref)
                    try:
                        out = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        cause = getattr(e, "cause", None) or e
                        yield Outcome(task, error=f"{type(cause).__name__}: {cause}")
                        continue
                    except ray.exceptions.RayError as e:  # worker or node lost beyond the retries
                        yield Outcome(task, error=f"{type(e).__name__}: {str(e).splitlines()[0]}")
                        continue
                    if progress and shown.get(task.job.name, (0,))[0] != task.job.train.steps:
                        progress(task.job.name, task.job.train.steps, task.job.train.steps, out["result"].final_loss)
                    yield _unpack(task, out)


def _pack(t: Task) -> dict[str, bytes]:
    """The files a job resumes from: its latest valid slice checkpoint, a valid resume file,
    and the base model of an adapter compartment."""
    files = {}
    for k in reversed(range(t.job.stages)):
        p = stage_checkpoint(t.ckpt_dir, k, t.job.stage_spec(k))
        if p.exists():
            files[f"ckpt/{p.name}"] = p.read_bytes()
            break
    if (t.work_dir / RESUME).exists():
        files[f"work/{RESUME}"] = (t.work_dir / RESUME).read_bytes()
    for part, folder in _folders(t.job).items():  # read-only inputs named by digest in the job's spec
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                files[f"{part}/{p.relative_to(folder).as_posix()}"] = p.read_bytes()
    return files


def _folders(job: TrainJob) -> dict[str, str]:
    """A job's input folders: an adapter's base, a text store's encoder, a latent store's VAE."""
    return {k: v for k, v in (("base", job.base_dir), ("text", job.text_dir), ("vae", job.latent_dir)) if v}


def _unpack(t: Task, out: dict) -> Outcome:
    """Write a remote run's model folder and new checkpoints into the store (atomic renames;
    leftovers of a crash here are removed by `Store.recover`)."""
    for rel, data in [*((f"out/{k}", v) for k, v in out["model"].items()),
                      *((f"ckpt/{k}", v) for k, v in out["ckpt"].items())]:
        sub, name = rel.split("/", 1)
        dest = (t.out_dir if sub == "out" else t.ckpt_dir) / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{dest.name}")
        tmp.write_bytes(data)
        tmp.replace(dest)
    prune_checkpoints(t.job, t.ckpt_dir)
    (t.work_dir / RESUME).unlink(missing_ok=True)
    res = out["result"]
    res.out_dir = t.out_dir
    return Outcome(t, res, None, out["threads"])


class _ProgressSink:
    """A Ray actor holding each job's latest (step, total, loss)."""

    def __init__(self):
        self.state: dict[str, tuple] = {}

    def report(self, name: str, step: int, total: int, loss: float) -> None:
        self.state[name] = (step, total, loss)

    def latest(self) -> dict[str, tuple]:
        return dict(self.state)


def _ray_task(job: TrainJob, files: dict[str, bytes], device: str, threads: int, sink) -> dict:
    """Runs on a Ray worker: train in a scratch folder, return the files."""
    last = [0.0]

    def progress(name: str, step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.5 or step == total:
            last[0] = now
            sink.report.remote(name, step, total, loss)

    with tempfile.TemporaryDirectory(prefix="cdm-job-") as tmp:
        root = Path(tmp)
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        moved = {"base": "base_dir", "text": "text_dir", "vae": "latent_dir"}
        job = replace(job, **{moved[k]: str(root / k) for k in _folders(job)})
        shipped = {rel.split("/", 1)[1] for rel in files if rel.startswith("ckpt/")}
        with _threads(threads) as n:
            res = train_job(job, root / "out", root / "ckpt", root / "work", device, progress)
        read = (lambda d: {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
                if d.is_dir() else {})  # a model folder may have parts (an encoder's text_encoder/, tokenizer/)
        ckpt = {k: v for k, v in read(root / "ckpt").items() if k not in shipped}
        return dict(result=res, model=read(root / "out"), ckpt=ckpt, threads=n)


def make_executor(name: str = "local", device: str = "cpu", threads: int | None = None, address: str | None = None,
                  gpus_per_job: float = 0) -> LocalExecutor | RayExecutor:
    if name == "local":
        if address is not None or gpus_per_job:
            raise ValueError("--address and --gpus-per-job need --executor ray")
        return LocalExecutor(device, threads)
    if name == "ray":
        return RayExecutor(address, threads, gpus_per_job, device=device)
    raise ValueError(f"unknown executor {name!r}; available: {', '.join(EXECUTORS)}")
