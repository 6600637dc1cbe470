"""Channels-last vs contiguous models, end to end: seconds per `api.sample` call of the
paragon, CDM-K with `commit 0`, `subset 2` and dense, both memory formats interleaved in
each round, medians over rounds. Needs the quality bench's iid-8 store. Prints a dict per format.

    python bench/channels_last.py --work bench-work/quality/full
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cdm.app import api

from cdm.sampling import loading
from cdm.store.registry import Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("bench-work/quality/full"))
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    s = Store.open(args.work / "iid-8")
    labels = [str(i % 10) for i in range(250)]

    def run(**kw):
        return api.sample(s, 250, labels, None, "ito", steps=25, guidance=1.0, seed=1, batch_size=250, **kw)

    cfgs = {"paragon": {"paragon": True}, "commit0": {"commit": 0.0}, "subset2": {"subset": 2}, "dense": {}}
    for kw in cfgs.values():
        run(**kw)  # loads every model once (kept in memory, channels-last)

    def set_format(fmt):
        for m in loading.MODELS.lru.values():
            if isinstance(m, torch.nn.Module):
                m.to(memory_format=fmt)

    times: dict = {}
    for _ in range(args.rounds):
        for fmt in ("contiguous", "channels_last"):
            set_format(torch.channels_last if fmt == "channels_last" else torch.contiguous_format)
            for name, kw in cfgs.items():
                t = time.perf_counter()
                run(**kw)
                times.setdefault((name, fmt), []).append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for fmt in ("contiguous", "channels_last"):
        p = med[("paragon", fmt)]
        print(fmt, {n: (round(med[(n, fmt)], 3), round(med[(n, fmt)] / p, 2)) for n in cfgs})
    set_format(torch.contiguous_format)
    a = run(commit=0.0).images
    set_format(torch.channels_last)
    print("identical images:", np.array_equal(a, run(commit=0.0).images))


if __name__ == "__main__":
    main()
