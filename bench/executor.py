"""Ray executor vs the local one: train the same K compartments (no paragon, no router) on
fresh copies of one store, side by side in one run, and check the weights agree.

    python bench/executor.py                    # 8 compartments x 300 steps, small preset
    python bench/executor.py --quick            # 4 x 40 steps, tiny preset

Configurations (each on a fresh store, interleaved over --repeats rounds):
- local, T threads: one job after the other in this process, torch on T threads;
- ray, J jobs x T threads: a local Ray instance (started and stopped inside the timing)
  running J jobs at once, each reserving T CPUs.
Weights are bit-identical between configurations with the same threads per job (and
differ between 1 and 2 threads: CPU kernels split their sums by thread count).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from common import console, digits_store, emit

from cdm.app import api
from cdm.training.executor import LocalExecutor, RayExecutor
from cdm.store.recipes import RouterConfig, TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--k", type=int, default=None, help="compartments (default 8; quick 4)")
    ap.add_argument("--steps", type=int, default=None, help="steps per compartment (default 300; quick 40)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("bench-work/executor"))
    args = ap.parse_args()
    q = args.quick
    k, steps = args.k or (4 if q else 8), args.steps or (40 if q else 300)
    tc = TrainConfig(preset="tiny" if q else "small", steps=steps, checkpoint_every=1000)
    cpus = os.cpu_count() or 1
    # name -> (threads per job, executor factory)
    configs = {f"local, {cpus} threads": (cpus, lambda: LocalExecutor(threads=cpus)),
               "local, 1 thread": (1, lambda: LocalExecutor(threads=1)),
               f"ray, {cpus} jobs x 1 thread": (1, lambda: RayExecutor(threads=1, num_cpus=cpus))}
    if cpus > 1:
        configs[f"ray, 1 job x {cpus} threads"] = (cpus, lambda: RayExecutor(threads=cpus, num_cpus=cpus))
    times: dict[str, list[float]] = {c: [] for c in configs}
    digests: dict[str, dict] = {}
    for rep in range(args.repeats):
        for name, (_, make) in configs.items():
            path = args.work / "store"
            shutil.rmtree(path, ignore_errors=True)
            s = digits_store(path, f"iid:{k}", tc, RouterConfig())
            console.print(f"round {rep + 1}: {name}")
            t = time.perf_counter()
            api.train(s, router=False, executor=make())
            times[name].append(time.perf_counter() - t)
            digests[name] = {n: r.digest for n, r in s.models().items()}
            s.close()
    base = statistics.median(times[f"local, {cpus} threads"])
    rows = [dict(config=c, seconds=round(statistics.median(v), 1), all=[round(x, 1) for x in v],
                 vs_local=round(base / statistics.median(v), 3)) for c, v in times.items()]
    local = {configs[c][0]: d for c, d in digests.items() if c.startswith("local")}
    same = {c: d == local[configs[c][0]] for c, d in digests.items()}  # vs local with the same threads per job
    out = dict(k=k, steps=steps, preset=tc.preset, cpus=cpus, torch=torch.__version__, results=rows,
               identical_to_local_with_same_threads=same,
               threads_change_weights=local[1] != local[cpus] if cpus > 1 else None)
    emit(out, f"{k} compartments x {steps} steps ({tc.preset} preset), {cpus} CPUs, median of {args.repeats}",
         ["executor", "seconds", "speed vs local", "weights = local with the same threads per job"],
         [[r["config"], r["seconds"], f"{r['vs_local']:.2f}x", "yes" if same[r["config"]] else "no"] for r in rows])


if __name__ == "__main__":
    main()
