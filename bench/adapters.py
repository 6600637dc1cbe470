"""Adapter compartments at sampling time: merged (each adapter folded into a copy of the
base), loop (one base, one call per adapter) and joint (one base, every adapter's rows in
one batched call), against the paragon and a full-model composition, side by side.

    python bench/adapters.py --work bench-work/quality/full        # after quality.py --adapters
    python bench/adapters.py --work bench-work/quality/quick --k 2

Times whole `api.sample` calls (models already in memory), interleaved, median of repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import console, emit

from cdm.app import api
from cdm.store.registry import Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("bench-work/quality/full"))
    ap.add_argument("--k", type=int, default=8, help="private compartments of the stores to use")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=None, help="default: 4 x rank (as quality.py --adapters)")
    ap.add_argument("--n", type=int, default=250, help="images per call")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    full = Store.open(args.work / f"full-{args.k}")
    ad = Store.open(args.work / f"adapters-{args.k}-r{args.rank}-a{args.alpha or 4.0 * args.rank:g}")
    labels = [str(i % 10) for i in range(args.n)]
    kw = dict(steps=args.steps, guidance=1.0, seed=0, device=args.device, batch_size=args.n)
    calls = {"paragon": lambda: api.sample(full, args.n, labels, paragon=True, **kw),
             "full compartments": lambda: api.sample(full, args.n, labels, router="ito", **kw)}
    for mode in api.ADAPTER_MODES:
        calls[f"adapters, {mode}"] = (lambda m: lambda: api.sample(ad, args.n, labels, router="ito", adapter_mode=m,
                                                                    **kw))(mode)
    for name, f in calls.items():  # load every model once (kept in memory, as in `cdm serve`)
        console.print(f"warm-up: {name}")
        f()
    times: dict[str, list[float]] = {c: [] for c in calls}
    for r in range(args.repeats):
        for name, f in calls.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
        console.print(f"round {r + 1} done")
    para = statistics.median(times["paragon"])
    rows = [dict(config=c, seconds=round(statistics.median(v), 3), images_per_s=round(args.n / statistics.median(v), 1),
                 vs_paragon=round(statistics.median(v) / para, 3)) for c, v in times.items()]
    out = dict(k=len(ad.compartments()), n=args.n, steps=args.steps, threads=torch.get_num_threads(), results=rows)
    emit(out, f"{args.n} images, {args.steps} DDPM steps, CDM of {out['k']} compartments, ito router, "
              f"median of {args.repeats}", ["model", "images/s", "time / paragon"],
         [[r["config"], r["images_per_s"], f"{r['vs_paragon']:.2f}"] for r in rows])


if __name__ == "__main__":
    main()
