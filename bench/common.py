"""Shared by the benchmarks: build and train digits stores with a progress bar, time things."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from rich.console import Console

from cdm.app import api
from cdm.store.data import load_builtin
from cdm.store.registry import Store
from cdm.errors import StoreError
from cdm.store.recipes import RouterConfig, TrainConfig

console = Console(stderr=True)


def digits_store(path: Path, split: str, train: TrainConfig, router: RouterConfig, slices: int = 4,
                 seed: int = 0) -> Store:
    """Open the store at `path`, or create it with the builtin digits' training split."""
    try:
        return Store.open(path)
    except StoreError:
        s = api.init_store(path, 8, 1, seed, slices, 16, train, router)
        api.ingest(s, "digits", load_builtin("digits"), split)
        return s


def train(store: Store, **kw) -> list:
    """api.train with a rich progress bar; resumes whatever a previous run left."""
    from cdm.app.progress import training_progress

    prog, cb = training_progress(console)
    with prog:
        return api.train(store, progress=cb, **kw)


def train_models(store: Store, names: list[str]) -> list:
    """api.run_jobs (these models, in plan order) with a rich progress bar."""
    from cdm.app.progress import training_progress

    prog, cb = training_progress(console)
    with prog:
        return api.run_jobs(store, names, progress=cb)


def owner_judge(train_items: dict, steps: int):
    """A classifier of the owner (vendor) of an image, trained on the owners' training images;
    returns images (uint8 N,H,W,C) -> owner index, in the order of `train_items`."""
    import numpy as np
    import torch

    from cdm.evaluation.evaluate import ExtractorConfig, _fit
    from cdm.models.nets import FeatureNet

    names = list(train_items)
    x = torch.from_numpy(np.stack([it.pixels for v in names for it in train_items[v]]).astype(np.float32)
                         .transpose(0, 3, 1, 2) / 127.5 - 1)
    y = torch.tensor([i for i, v in enumerate(names) for _ in train_items[v]])
    torch.manual_seed(0)
    judge = FeatureNet(len(names), x.shape[1], 32, 64)
    _fit(judge, x, y, ExtractorConfig(steps=steps))

    def owner_of(images):
        with torch.inference_mode():
            return judge(torch.from_numpy(images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1))[1].argmax(1).numpy()

    return owner_of


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def run_clients(client, count: int) -> float:
    """Run client(i) on `count` threads at once; returns the wall seconds until all are done."""
    import threading

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t0


def emit(out: dict, title: str, header: list[str], rows: list[list]) -> None:
    """Print the JSON result, then a titled markdown table."""
    import json

    print(json.dumps(out, indent=2))
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
