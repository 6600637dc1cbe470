"""Time to forget one item: retrain the paragon, retrain one of 8 compartments from scratch,
or forget with SISA slices (one random item in each slice), side by side in one run, with
the FID of the composition before and after. The paragon gets the compartments' total
compute (8 x their steps), as in the paper's comparison. Prints JSON, then a table.

    python bench/forget.py --from bench-work/quality/full/iid-8   # reuse the quality bench's CDM-8
    python bench/forget.py --quick                                # smoke run (~3 min)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from common import console, digits_store, train

from cdm.app import api
from cdm.evaluation.evaluate import EvalConfig, Evaluator, ExtractorConfig, Features, reference_items
from cdm.training.forget import forget
from cdm.store.registry import PARAGON, Store
from cdm.store.recipes import RouterConfig, TrainConfig


def timed_job(store: Store, name: str) -> float:
    """Train `name` from scratch (its checkpoints removed first) and install it; seconds."""
    shutil.rmtree(store.root / "checkpoints" / name, ignore_errors=True)
    shutil.rmtree(store.root / "work" / name, ignore_errors=True)
    t = time.perf_counter()
    api.run_jobs(store, [name])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("bench-work/forget"))
    ap.add_argument("--from", dest="source", type=Path, default=None,
                    help="a trained iid:8 digits store to copy (e.g. the quality bench's iid-8)")
    ap.add_argument("--steps", type=int, default=None, help="steps per compartment (default 600; quick 40)")
    ap.add_argument("--samples", type=int, default=None, help="samples for FID (default 1000; quick 100)")
    ap.add_argument("--repeats", type=int, default=1, help="repeats of the compartment-from-scratch timing")
    ap.add_argument("--seed", type=int, default=0, help="which random items are forgotten")
    args = ap.parse_args()
    q = args.quick
    steps = args.steps or (40 if q else 600)
    k = 8
    tc = TrainConfig(preset="tiny" if q else "small", steps=steps, checkpoint_every=250)
    rc = RouterConfig(steps=steps)
    cfg = EvalConfig.with_sampling(samples=args.samples or (100 if q else 1000), steps=10 if q else 25)
    work = args.work / ("quick" if q else "full")
    shutil.rmtree(work / "cdm", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    if args.source:
        shutil.copytree(args.source, work / "cdm")
    cdm = digits_store(work / "cdm", f"iid:{k}", tc, rc)
    if api.train_config(cdm) != tc:
        console.print(f"[yellow]note: {args.source} has recipe {api.train_config(cdm)}; using it")
        tc = api.train_config(cdm)
    console.print("CDM-8: training (or reusing)")
    train(cdm)

    # the paragon with the compartments' total compute, timed from scratch
    para = digits_store(work / "paragon", "one", replace(tc, steps=k * tc.steps), rc)
    console.print(f"paragon: training {k * tc.steps} steps from scratch")
    t_paragon = timed_job(para, PARAGON)

    feats = Features(cdm, cfg=ExtractorConfig(steps=100 if q else 600))
    real = reference_items(cdm)
    before = Evaluator(cdm, real, cfg, features=feats).run("cdm-8 before", router="ito")
    para_fid = Evaluator(para, real, cfg, features=feats).run("paragon", paragon=True).fid

    comps = sorted(cdm.compartments())
    rng = random.Random(args.seed)
    shutil.rmtree(work / "scratch", ignore_errors=True)
    shutil.copytree(work / "cdm", work / "scratch")
    scratch_copy = Store.open(work / "scratch")
    t_scratch = [timed_job(scratch_copy, rng.choice(comps)) for _ in range(args.repeats)]
    scratch_copy.close()
    shutil.rmtree(work / "scratch")

    forgets = []
    for sl in range(cdm.config.slices):
        victim = rng.choice([r for r in cdm.items() if r.slice == sl])
        console.print(f"forgetting {victim.hash[:12]} ({victim.compartment}, slice {sl})")
        res = forget(cdm, items=[victim.hash])
        per = {x["name"]: x for x in res.retrained}
        forgets.append(dict(slice=sl, item=victim.hash, compartment=victim.compartment,
                            compartment_seconds=per[victim.compartment]["seconds"],
                            compartment_steps=per[victim.compartment]["steps"],
                            resumed_from=per[victim.compartment]["resumed_from"],
                            router_seconds=per.get("router", {}).get("seconds"), call_seconds=round(res.seconds, 3)))
    after = Evaluator(cdm, real, cfg, features=feats).run("cdm-8 after", router="ito")

    med_scratch = statistics.median(t_scratch)
    mean_forget = statistics.mean(f["compartment_seconds"] for f in forgets)
    out = dict(quick=q, compartments=k, slices=cdm.config.slices, steps_per_compartment=tc.steps,
               paragon_steps=k * tc.steps, preset=tc.preset,
               seconds=dict(paragon_from_scratch=round(t_paragon, 2), compartment_from_scratch=t_scratch,
                            forget_mean_over_slices=round(mean_forget, 2)),
               speedup=dict(compartment_from_scratch=round(t_paragon / med_scratch, 2),
                            forget_with_slices_mean=round(t_paragon / mean_forget, 2),
                            by_slice=[round(t_paragon / f["compartment_seconds"], 2) for f in forgets]),
               forgets=forgets, fid=dict(before=before.fid, after=after.fid, change=after.fid / before.fid - 1,
                                         paragon=para_fid), eval=asdict(cfg))
    print(json.dumps(out, indent=2))
    print("\n| what | seconds | paragon / this |\n|---|---|---|")
    print(f"| retrain paragon ({k * tc.steps} steps) | {t_paragon:.1f} | 1.00 |")
    print(f"| retrain one compartment from scratch ({tc.steps} steps, median of {args.repeats}) | "
          f"{med_scratch:.1f} | {t_paragon / med_scratch:.2f} |")
    for f in forgets:
        print(f"| forget an item in slice {f['slice']} (compartment, {f['compartment_steps']} steps) | "
              f"{f['compartment_seconds']:.1f} | {t_paragon / f['compartment_seconds']:.2f} |")
    print(f"| forget, mean over slices | {mean_forget:.1f} | {t_paragon / mean_forget:.2f} |")
    print(f"\nFID of CDM-8 (ito) before {before.fid:.3f}, after forgetting {len(forgets)} items {after.fid:.3f} "
          f"({100 * (after.fid / before.fid - 1):+.2f}%); paragon {para_fid:.3f}")


if __name__ == "__main__":
    main()
