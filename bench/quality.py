"""Is the composition as good as the paragon? Paragon vs CDM-K (K = 2, 4, 8) on the builtin
digits, `iid` and `by-class` splits, every router, at equal steps per model and at equal
total compute (each of K compartments gets 1/K of the paragon's steps). Prints JSON, then
a markdown table. Stores are kept in --work, so an interrupted run resumes.

    python bench/quality.py            # full (~45 min on 2 cores)
    python bench/quality.py --quick    # smoke run (~3 min)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import console, digits_store, train  # noqa: E402

from cdm.evaluate import EvalConfig, Evaluator, ExtractorConfig, Features, reference_items  # noqa: E402
from cdm.store import PARAGON  # noqa: E402
from cdm.train import RouterConfig, TrainConfig  # noqa: E402

ROUTERS = ["ito", "classifier", "uniform"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("bench-work/quality"))
    ap.add_argument("--ks", default=None, help="comma-separated K values (default 2,4,8; quick: 2)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model (default 600; quick 200)")
    ap.add_argument("--samples", type=int, default=None, help="samples per model (default 1000; quick 200)")
    ap.add_argument("--sample-steps", type=int, default=None, help="sampler steps (default 25; quick 10)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    q = args.quick
    ks = [int(k) for k in (args.ks or ("2" if q else "2,4,8")).split(",")]
    steps = args.steps or (200 if q else 600)
    preset = "tiny" if q else "small"
    tc = TrainConfig(preset=preset, steps=steps, checkpoint_every=250)
    rc = RouterConfig(steps=steps)
    cfg = EvalConfig(samples=args.samples or (200 if q else 1000), steps=args.sample_steps or (10 if q else 25),
                     batch_size=500, attribution_samples=(50 if q else 500))
    ext = ExtractorConfig(steps=100 if q else 600)
    torch.set_num_threads(torch.get_num_threads())
    t_start = time.perf_counter()
    work = args.work / ("quick" if q else "full")
    work.mkdir(parents=True, exist_ok=True)

    # stores: (name, split, recipe, routers)
    plans = [(f"iid-{k}", f"iid:{k}", tc) for k in ks] + [(f"byclass-{k}", f"by-class:{k}", tc) for k in ks]
    plans += [(f"iid-{k}-eqcompute", f"iid:{k}", replace(tc, steps=steps // k)) for k in ks]
    stores = {}
    train_seconds = {}
    for name, split, recipe in plans:
        s = digits_store(work / name, split, recipe, rc)
        console.print(f"[bold]{name}[/]: training (resumes if interrupted)")
        t = time.perf_counter()
        res = train(s, paragon=name == f"iid-{ks[0]}")
        train_seconds[name] = round(time.perf_counter() - t, 1)
        if res:
            train_seconds[name + " (steps/s)"] = round(sum(r.steps for r in res) / max(1e-9, sum(r.seconds for r in res)), 1)
        stores[name] = s

    first = stores[f"iid-{ks[0]}"]
    feats = Features(first, cfg=ext)
    real = reference_items(first)
    rows = []
    ev0 = Evaluator(first, real, cfg, features=feats)
    floor = ev0.floor()
    console.print("sampling the paragon")
    rows.append(dict(store="paragon", split="-", compute="-", **asdict(ev0.run(PARAGON, paragon=True))))
    for name, split, recipe in plans:
        s = stores[name]
        ev = Evaluator(s, real, replace(cfg, attribution_samples=cfg.attribution_samples if "byclass" in name else 0),
                       features=feats)
        for r in ROUTERS:
            console.print(f"sampling {name} with the {r} router")
            m = ev.run(name, router=r)
            rows.append(dict(store=name, split=split, compute="equal total" if "eqcompute" in name else "equal per model",
                             **asdict(m)))
    para = rows[0]["fid"]
    for r in rows:
        r["fid_ratio"] = round(r["fid"] / para, 4)
    out = dict(quick=q, preset=preset, steps_per_model=steps, ks=ks, eval=asdict(cfg), extractor=asdict(ext),
               floor=floor, train_seconds=train_seconds, results=rows,
               wall_seconds=round(time.perf_counter() - t_start, 1))
    print(json.dumps(out, indent=2))
    print(f"\nreal-vs-real floor: {floor:.3f}  (samples {cfg.samples}, sampler steps {cfg.steps}, "
          f"{steps} training steps per model, preset {preset})\n")
    print("| store | compute | router | K | FID | FID / paragon | cond. acc. | memorized | attribution acc. |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        att = "" if r["attribution_accuracy"] is None else f"{r['attribution_accuracy']:.3f}"
        print(f"| {r['store']} | {r['compute']} | {r['router'] or '-'} | {len(r['compartments'])} | {r['fid']:.3f} | "
              f"{r['fid_ratio']:.3f} | {r['accuracy']:.3f} | {r['memorized']:.3f} | {att} |")


if __name__ == "__main__":
    main()
