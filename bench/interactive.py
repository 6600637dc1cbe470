"""Composition at interactive sizes: single-request latency and server throughput of CDM-K
against the paragon, side by side in one run (configurations interleaved within each
repeat; medians). Speed does not depend on how well models are trained, so the store's
models are trained one step. Prints JSON, then tables.

    python bench/interactive.py                 # 8x8 digits, small preset, CDM-8, 10 steps
    python bench/interactive.py --quick         # a smoke run
    python bench/interactive.py --device cuda   # the same on a GPU

Latency: one request of n images, alone, on the plain path (`cdm sample`) and on the
served path (`cdm serve`: model calls through a batcher in fixed chunks; the grouped
configurations in fixed wide calls, `cdm serve --grouped`), each request on a sampler thread
as in `cdm serve` (one core of its own; model calls on the batcher's thread). Throughput: C
client threads each sending requests of n images for S seconds through the served path
(the server's sampling engine without HTTP, which costs the same for every configuration),
and the same clients served one request at a time without batching (the server before
batching). Large batches: one call of --big images on the plain path.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import console, digits_store, emit, median_time, run_clients, train

from cdm.batching import Batcher, sampler_thread
from cdm.pipeline import CDMPipeline, SamplingSettings
from cdm.train import RouterConfig, TrainConfig

# name: (sparse settings, None for the paragon; grouped calls, cdm.grouped)
CONFIGS = {"paragon": (None, False), "dense": ({}, False), "commit0": ({"commit": 0.0}, False),
           "dense grouped": ({}, True), "commit0 grouped": ({"commit": 0.0}, True)}
SERVED = list(CONFIGS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("bench-work/interactive"))
    ap.add_argument("-k", type=int, default=8)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=2.0, help="the served default; 1 = no guidance rows")
    ap.add_argument("--ns", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=None, help="default 7; quick 2")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=None, help="per throughput configuration; default 20, quick 4")
    ap.add_argument("--chunk", type=int, default=16, help="rows of every batched model call (cdm serve --chunk)")
    ap.add_argument("--group-chunk", type=int, default=8, help="rows per model of a grouped call (cdm serve "
                                                                "--group-chunk)")
    ap.add_argument("--big", type=int, default=250, help="images of the large-batch check (0: skip)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    repeats, seconds = args.repeats or (2 if args.quick else 7), args.seconds or (4 if args.quick else 20)
    s = digits_store(args.work / f"iid-{args.k}-{args.preset}", f"iid:{args.k}",
                     TrainConfig(preset=args.preset, steps=1), RouterConfig(steps=1))
    train(s, paragon=True, router=False)
    pipes = {name: CDMPipeline.from_store(s, paragon=True, device=args.device) if sparse is None else
             CDMPipeline.from_store(s, router="ito", grouped=grouped, device=args.device)
             for name, (sparse, grouped) in CONFIGS.items()}
    labels = list(s.labels())
    batcher = Batcher(args.chunk, args.group_chunk)

    worker = ThreadPoolExecutor(1, initializer=sampler_thread)  # served requests run as on cdm serve's workers

    def request(name: str, n: int, seed: int, served: bool, label: str = "3", here: bool = False):
        settings = SamplingSettings(steps=args.steps, guidance=args.guidance, seed=seed, **(CONFIGS[name][0] or {}))
        if not served:
            return pipes[name](n, label, settings)
        if not here:
            return worker.submit(request, name, n, seed, served, label, True).result()
        with batcher.session():
            return pipes[name](n, label, settings, batcher=batcher)

    lat: dict[tuple, list[float]] = {}
    # the plain path first, before the batcher's thread ever computes: afterwards its idle
    # compute threads spin for a while after each round and slow whatever runs next
    for served in (False, True):
        paths = [name for name in CONFIGS if not served or name in SERVED]
        for name in paths:  # warm up every shape once
            for n in map(int, args.ns.split(",")):
                request(name, n, 0, served)
        for r in range(repeats):
            for n in map(int, args.ns.split(",")):
                for name in paths:
                    t = time.perf_counter()
                    request(name, n, r, served)
                    lat.setdefault((n, name, served), []).append(time.perf_counter() - t)
    rows, out_lat = [], []
    for (n, name, served), ts in lat.items():
        med = statistics.median(ts)
        ratio = med / statistics.median(lat[(n, "paragon", served)])
        out_lat.append(dict(n=n, config=name, path="served" if served else "plain", seconds=med, vs_paragon=ratio))
    for n in map(int, args.ns.split(",")):
        for name in CONFIGS:
            p, v = (next((o for o in out_lat if o["n"] == n and o["config"] == name and o["path"] == path), None)
                    for path in ("plain", "served"))
            rows.append([n, name, f"{p['seconds'] * 1e3:.0f}", f"{p['vs_paragon']:.2f}x",
                         f"{v['seconds'] * 1e3:.0f}" if v else "", f"{v['vs_paragon']:.2f}x" if v else ""])

    def load(name: str, batched: bool, n: int = 4) -> dict:
        done, stop_at, lock = [], time.monotonic() + seconds, threading.Lock()
        serial = threading.Lock()  # without batching the server sampled one request at a time

        def client(i: int) -> None:
            if batched:
                sampler_thread()
            rng = random.Random(i)
            while time.monotonic() < stop_at:
                t = time.perf_counter()
                if batched:
                    request(name, n, rng.randrange(1 << 30), True, rng.choice(labels), here=True)
                else:
                    with serial:
                        request(name, n, rng.randrange(1 << 30), False, rng.choice(labels))
                with lock:
                    done.append(time.perf_counter() - t)

        wall = run_clients(client, args.clients)
        return dict(config=name, batched=batched, requests=len(done), images_per_second=len(done) * n / wall,
                    latency_p50=statistics.median(done) if done else None)

    shared0 = batcher.shared
    thr = [load(name, batched) for batched in (True, False) for name in SERVED]
    for o in thr:
        o["vs_paragon"] = o["images_per_second"] / next(p["images_per_second"] for p in thr
                                                        if p["config"] == "paragon" and p["batched"] == o["batched"])
    big = []
    if args.big:
        for name in ("paragon", "dense", "commit0", "dense grouped", "commit0 grouped"):
            t, _ = median_time(lambda name=name: request(name, args.big, 0, False), max(1, repeats // 3))
            big.append(dict(config=name, n=args.big, seconds=t))
        for o in big:
            o["vs_paragon"] = o["seconds"] / big[0]["seconds"]
    out = dict(k=args.k, preset=args.preset, steps=args.steps, guidance=args.guidance, chunk=args.chunk,
               group_chunk=args.group_chunk,
               repeats=repeats, device=args.device, latency=out_lat, throughput=thr, shared_rounds=batcher.shared - shared0,
               large_batch=big)
    emit(out, f"latency (ms, median of {repeats}), CDM-{args.k} vs paragon, {args.steps} steps, guidance {args.guidance}",
         ["n", "config", "plain ms", "plain vs paragon", "served ms", "served vs paragon"], rows)
    console.print()
    print(f"\nthroughput: {args.clients} clients, n=4, {seconds:.0f} s each\n")
    print("| config | batched | images/s | vs paragon | p50 s |\n|---|---|---|---|---|")
    for o in thr:
        print(f"| {o['config']} | {o['batched']} | {o['images_per_second']:.1f} | {o['vs_paragon']:.2f}x | "
              f"{o['latency_p50']:.3f} |")
    if big:
        print(f"\nlarge batch: n={args.big}, plain path\n\n| config | s | vs paragon |\n|---|---|---|")
        for o in big:
            print(f"| {o['config']} | {o['seconds']:.2f} | {o['vs_paragon']:.2f}x |")
    batcher.close()
    worker.shutdown()


if __name__ == "__main__":
    main()
