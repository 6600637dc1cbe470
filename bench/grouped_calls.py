"""One model step of a small composition, per call path: K separate calls against one grouped
call (cdm.models.grouped), eager and through torch.compile, beside the paragon's one call on all
the rows. Medians of --repeats calls, every path measured in one run. Prints JSON, then a table.

    python bench/grouped_calls.py            # small preset, 8x8, G = 4 and 8 models, 1-4 rows each
    python bench/grouped_calls.py --no-compile

Compiling (inductor, one fixed shape per row count) costs tens of seconds per shape on a
CPU; `compile_s` reports it. Untrained models: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import emit

from cdm.models.grouped import Group
from cdm.models.nets import build_unet
from cdm.models.presets import unet_config


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--groups", default="4,8")
    ap.add_argument("--rows", default="1,2,4", help="rows per model")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    args = ap.parse_args()
    groups, row_counts = [int(g) for g in args.groups.split(",")], [int(r) for r in args.rows.split(",")]
    unets = [build_unet(unet_config(args.preset, args.size, 1, 16), seed).eval().requires_grad_(False)
             .to(memory_format=torch.channels_last) for seed in range(max(groups))]

    def call(u, x, t, c):
        return u(x, t, class_labels=c, return_dict=False)[0]

    torch._dynamo.config.recompile_limit = 64  # one compiled graph per shape, all kept
    compiled = torch.compile(call, dynamic=False) if args.compile else None
    results, rows = [], []
    with torch.inference_mode():
        for g in groups:
            group = Group(unets[:g])
            each = torch.compile(lambda x, t, c: group(x, t, c), dynamic=False) if args.compile else None
            for r in row_counts:
                gen = torch.Generator().manual_seed(r)
                x = torch.randn(g, r, 1, args.size, args.size, generator=gen)
                t, c = torch.full((g, r), 500), torch.zeros((g, r), dtype=torch.long)
                xp, tp, cp = x.flatten(0, 1), t.flatten(), c.flatten()
                o = dict(models=g, rows_per_model=r,
                         paragon_eager_ms=median_ms(lambda: call(unets[0], xp, tp, cp), args.repeats),
                         separate_eager_ms=median_ms(lambda: [call(unets[i], x[i], t[i], c[i]) for i in range(g)],
                                                     args.repeats),
                         grouped_eager_ms=median_ms(lambda: group(x, t, c), args.repeats))
                if args.compile:
                    t0 = time.perf_counter()
                    compiled(unets[0], xp, tp, cp)
                    each(x, t, c)
                    o["compile_s"] = time.perf_counter() - t0
                    o["paragon_compiled_ms"] = median_ms(lambda: compiled(unets[0], xp, tp, cp), args.repeats)
                    o["grouped_compiled_ms"] = median_ms(lambda: each(x, t, c),
                                                         args.repeats)
                    o["grouped_compiled_max_diff"] = float((each(x, t, c)
                                                            - group(x, t, c)).abs().max())
                results.append(o)
                rows.append([g, r, g * r] + [f"{o[k]:.1f}" if k in o else "" for k in (
                    "paragon_eager_ms", "separate_eager_ms", "grouped_eager_ms", "paragon_compiled_ms",
                    "grouped_compiled_ms", "compile_s")])
    emit(dict(preset=args.preset, size=args.size, repeats=args.repeats, threads=torch.get_num_threads(),
              results=results),
         f"one step, ms (medians of {args.repeats}); the paragon runs all G x R rows in one call",
         ["models G", "rows each R", "rows", "paragon eager", "G separate eager", "grouped eager",
          "paragon compiled", "grouped compiled", "compile s"], rows)


if __name__ == "__main__":
    main()
