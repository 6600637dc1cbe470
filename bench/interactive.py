"""Composition at interactive sizes: single-request latency and server throughput of CDM-K
against the paragon, side by side in one run (configurations interleaved within each
repeat; medians). Speed does not depend on how well models are trained, so the store's
models are trained one step. Prints JSON, then tables.

    python bench/interactive.py                 # 8x8 digits, small preset, CDM-8, 10 steps
    python bench/interactive.py --quick         # a smoke run
    python bench/interactive.py --device cuda   # the same on a GPU

Latency: one request of n images, alone, on the plain path (`cdm sample`) and on the
served path (`cdm serve`: model calls through a batcher in fixed chunks; the grouped
configurations in fixed wide calls, `cdm serve --grouped`). Throughput: C client threads
each sending requests of n images for S seconds through the served path (the server's
sampling engine without HTTP, which costs the same for every configuration), and the
paragon's again with larger chunks (--paragon-chunks: fewer, larger calls suit its
throughput, though a small request then pays for the padding). Large batches:
one call of --big images on the plain path.

The served path runs in a process of its own laid out like `cdm serve`'s: requests on
one-core sampler threads, model calls on the batcher's thread, the only one computing on
several cores (an idle team of compute threads on another thread, such as this process's
main thread after the plain path, slows it 2x: cdm.sampling.batching.sampler_thread).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import torch
from common import console, digits_store, emit, median_time, run_clients, train

from cdm.sampling.batching import Batcher, sampler_thread
from cdm.sampling.pipeline import CDMPipeline
from cdm.sampling.settings import SamplingSettings
from cdm.store.recipes import RouterConfig, TrainConfig

# name: (sparse settings, None for the paragon; grouped calls, cdm.models.grouped)
CONFIGS = {"paragon": (None, False), "dense": ({}, False), "commit0": ({"commit": 0.0}, False),
           "dense grouped": ({}, True), "commit0 grouped": ({"commit": 0.0}, True)}


def options() -> argparse.Namespace:
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
    ap.add_argument("--group-chunk", type=int, default=8, help="rows per slot of a grouped call (cdm serve "
                                                                "--group-chunk)")
    ap.add_argument("--group-slots", type=int, default=None, help="slots of a grouped call (Batcher(group_slots=); "
                                                                  "default one per model)")
    ap.add_argument("--paragon-chunks", default="32,64", help="throughput of the paragon served with these chunks "
                                                               "too (its best setting for throughput)")
    ap.add_argument("--big", type=int, default=250, help="images of the large-batch check (0: skip)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    args.repeats, args.seconds = args.repeats or (2 if args.quick else 7), args.seconds or (4 if args.quick else 20)
    return args


def pipelines(args) -> tuple[dict, list[str]]:
    s = digits_store(args.work / f"iid-{args.k}-{args.preset}", f"iid:{args.k}",
                     TrainConfig(preset=args.preset, steps=1), RouterConfig(steps=1))
    train(s, paragon=True, router=False)
    pipes = {name: CDMPipeline.from_store(s, paragon=True, device=args.device) if sparse is None else
             CDMPipeline.from_store(s, router="ito", grouped=grouped, device=args.device)
             for name, (sparse, grouped) in CONFIGS.items()}
    return pipes, list(s.labels())


def settings(args, name: str, seed: int) -> SamplingSettings:
    return SamplingSettings(steps=args.steps, guidance=args.guidance, seed=seed, **(CONFIGS[name][0] or {}))


def latencies(args, request) -> list[dict]:
    """Median seconds of one request of each n, each configuration, interleaved per repeat."""
    ns = list(map(int, args.ns.split(",")))
    for name in CONFIGS:  # warm up every shape once
        for n in ns:
            request(name, n, 0)
    times: dict[tuple, list[float]] = {}
    for r in range(args.repeats):
        for n in ns:
            for name in CONFIGS:
                t = time.perf_counter()
                request(name, n, r)
                times.setdefault((n, name), []).append(time.perf_counter() - t)
    return [dict(n=n, config=name, seconds=statistics.median(ts),
                 vs_paragon=statistics.median(ts) / statistics.median(times[(n, "paragon")]))
            for (n, name), ts in times.items()]


def served(args) -> dict:
    """Latency and throughput on the served path; run in a fresh process (see the top)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # before anything computes here: loading must not leave a team on this thread

    def batcher(chunk: int) -> Batcher:  # one at a time: one compute team
        return Batcher(chunk, args.group_chunk, threads=threads, group_slots=args.group_slots)

    now = {"batcher": batcher(args.chunk)}
    pipes, labels = pipelines(args)
    worker = ThreadPoolExecutor(1, initializer=sampler_thread)  # as cdm serve's workers

    def sample(name: str, n: int, seed: int, label: str = "3"):
        with now["batcher"].session():
            return pipes[name](n, label, settings(args, name, seed), batcher=now["batcher"])

    lat = latencies(args, lambda name, n, seed: worker.submit(sample, name, n, seed).result())

    def load(name: str, n: int = 4) -> dict:
        done, stop_at, lock, b = [], time.monotonic() + args.seconds, threading.Lock(), now["batcher"]
        rounds, calls = b.rounds, b.calls

        def client(i: int) -> None:
            sampler_thread()
            rng = random.Random(i)
            while time.monotonic() < stop_at:
                t = time.perf_counter()
                sample(name, n, rng.randrange(1 << 30), rng.choice(labels))
                with lock:
                    done.append(time.perf_counter() - t)

        wall = run_clients(client, args.clients)
        rounds = b.rounds - rounds
        return dict(config=name, chunk=b.chunk, requests=len(done), images_per_second=len(done) * n / wall,
                    latency_p50=statistics.median(done) if done else None, rounds=rounds,
                    calls_per_round=(b.calls - calls) / max(rounds, 1))

    shared = now["batcher"].shared
    thr = [load(name) for name in CONFIGS]
    shared = now["batcher"].shared - shared
    for chunk in (int(c) for c in args.paragon_chunks.split(",") if c):
        now["batcher"].close()
        now["batcher"] = batcher(chunk)
        thr.append(load("paragon"))
    now["batcher"].close()
    worker.shutdown()
    best = max(o["images_per_second"] for o in thr if o["config"] == "paragon")
    for o in thr:
        o["vs_paragon"] = o["images_per_second"] / thr[0]["images_per_second"]
        o["vs_best_paragon"] = o["images_per_second"] / best
    return dict(latency=lat, throughput=thr, shared_rounds=shared, threads=threads)


def main() -> None:
    args = options()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        serve = pool.submit(served, args).result()  # first, so that nothing of this process runs beside it
    pipes, _ = pipelines(args)

    def request(name: str, n: int, seed: int):
        return pipes[name](n, "3", settings(args, name, seed))

    plain = latencies(args, request)
    big = []
    if args.big:
        for name in CONFIGS:
            t, _ = median_time(lambda name=name: request(name, args.big, 0), max(1, args.repeats // 3))
            big.append(dict(config=name, n=args.big, seconds=t))
        for o in big:
            o["vs_paragon"] = o["seconds"] / big[0]["seconds"]
    out = dict(k=args.k, preset=args.preset, steps=args.steps, guidance=args.guidance, chunk=args.chunk,
               group_chunk=args.group_chunk, repeats=args.repeats, clients=args.clients, seconds=args.seconds,
               device=args.device, threads=serve["threads"],
               latency=[dict(o, path="plain") for o in plain] + [dict(o, path="served") for o in serve["latency"]],
               throughput=serve["throughput"], shared_rounds=serve["shared_rounds"], large_batch=big)
    rows = []
    for p in plain:
        v = next(o for o in serve["latency"] if o["n"] == p["n"] and o["config"] == p["config"])
        rows.append([p["n"], p["config"], f"{p['seconds'] * 1e3:.0f}", f"{p['vs_paragon']:.2f}x",
                     f"{v['seconds'] * 1e3:.0f}", f"{v['vs_paragon']:.2f}x"])
    emit(out, f"latency (ms, median of {args.repeats}), CDM-{args.k} vs paragon, {args.steps} steps, "
              f"guidance {args.guidance}",
         ["n", "config", "plain ms", "plain vs paragon", "served ms", "served vs paragon"], rows)
    console.print()
    print(f"\nthroughput: {args.clients} clients, n=4, {args.seconds:.0f} s each, served; vs the paragon at "
          f"--chunk {args.chunk} and at its best chunk\n")
    print("| config | chunk | images/s | vs paragon | vs best paragon | p50 s | model calls per round |\n"
          "|---|---|---|---|---|---|---|")
    for o in serve["throughput"]:
        print(f"| {o['config']} | {o['chunk'] if o['config'] == 'paragon' or not CONFIGS[o['config']][1] else ''} | "
              f"{o['images_per_second']:.1f} | {o['vs_paragon']:.2f}x | {o['vs_best_paragon']:.2f}x | "
              f"{o['latency_p50']:.3f} | {o['calls_per_round']:.2f} |")
    if big:
        print(f"\nlarge batch: n={args.big}, plain path\n\n| config | s | vs paragon |\n|---|---|---|")
        for o in big:
            print(f"| {o['config']} | {o['seconds']:.2f} | {o['vs_paragon']:.2f}x |")


if __name__ == "__main__":
    main()
