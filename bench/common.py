"""Shared by the benchmarks: build and train digits stores with a progress bar, time things."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from rich.console import Console

from cdm import api
from cdm.data import load_builtin
from cdm.store import Store, StoreError
from cdm.train import RouterConfig, TrainConfig

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
    from cdm.progress import training_progress

    prog, cb = training_progress(console)
    with prog:
        return api.train(store, progress=cb, **kw)


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
