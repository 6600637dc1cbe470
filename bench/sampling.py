"""Sampling speed: images per second of the paragon and of CDM-K compositions with each
router, side by side in one run (configurations interleaved within each repeat), medians
over repeats. Speed does not depend on how well the models are trained, so without --work
the stores are trained for one step only. With --sparse, CDM-K is also timed with sparse
composition at each setting (`+` joins settings: subset=2+commit=0.5), and with --fid N each
configuration's FID (N samples) is measured so the speed/quality curve comes from one run. Every
configuration draws the same noise and labels, so each sparse FID is compared with its dense
one on paired samples (a grouped setting with the same setting's separate calls, when it is
measured too): the table gives the change and its 90% bootstrap interval (samples resampled
jointly across configurations, held-out images too). Prints JSON, then a table.

    python bench/sampling.py --work bench-work/quality/full   # the quality bench's stores
    python bench/sampling.py --work bench-work/quality/full --ks 8 --routers ito \\
        --sparse prune=5,commit=0.5,commit=0,subset=2+commit=0.5 --fid 4000
    python bench/sampling.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from common import console, digits_store, train

from cdm.evaluation.evaluate import ExtractorConfig, Features, frechet_distance, reference_items
from cdm.sampling.pipeline import CDMPipeline
from cdm.sampling.settings import SamplingSettings
from cdm.sampling.router_specs import ROUTER_SPECS
from cdm.store.recipes import RouterConfig, TrainConfig

ROUTERS = list(ROUTER_SPECS)  # ito, classifier, uniform


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="folder with trained iid-K stores (quality bench)")
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("-n", type=int, default=None, help="images per call (default 250; quick 50)")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default 25; quick 10)")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=None, help="default 5; quick 2")
    ap.add_argument("--routers", default=",".join(ROUTERS))
    ap.add_argument("--sparse", default="", help="comma-separated settings to time beside dense, "
                                                 "e.g. prune=5,commit=0.5 (see cdm.sampling.mixture.Mixture); "
                                                 "grouped=1: one grouped model call per step (cdm.models.grouped)")
    ap.add_argument("--fid", type=int, default=0, help="also measure FID with this many samples per configuration")
    ap.add_argument("--fid-batch", type=int, default=500, help="images per call when sampling for FID (grouped "
                                                                "sparse steps group up to 32 rows per model)")
    ap.add_argument("--real", default="digits", help="held-out images for FID: a builtin (digits, fashion-mnist) "
                                                     "or a folder")
    ap.add_argument("--boot", type=int, default=200, help="bootstrap resamples for the FID change")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    q = args.quick
    ks = [int(k) for k in args.ks.split(",")]
    n, steps, repeats = args.n or (50 if q else 250), args.steps or (10 if q else 25), args.repeats or (2 if q else 5)
    work = args.work or Path("bench-work/sampling")
    stores = {}
    for k in ks:
        s = digits_store(work / f"iid-{k}", f"iid:{k}", TrainConfig(preset="small", steps=1),
                         RouterConfig(steps=1))
        train(s, paragon=k == ks[0])
        stores[k] = s
    routers = args.routers.split(",")
    settings = [{}] + [parse_setting(s) for s in args.sparse.split(",") if s.strip()]
    configs = [("paragon", ks[0], None, {})] + [
        (" ".join([f"cdm-{k} {r}", *(f"{a} {v:g}" for a, v in m.items())]), k, r, m)
        for k in ks for r in routers for m in settings]
    names = list(stores[ks[0]].labels())  # every label in turn
    labels = [names[i % len(names)] for i in range(n)]
    times: dict[str, list[float]] = {}
    evals: dict[str, float] = {}
    for rep in range(repeats + 1):  # the first round warms up and is not counted
        for name, k, router, m in configs:
            t = time.perf_counter()
            pipe = CDMPipeline.from_store(stores[k], router=router or "ito", paragon=router is None,
                                          grouped=bool(m.get("grouped")), device=args.device)
            g = pipe(n, labels, SamplingSettings(steps, args.guidance, seed=rep, batch_size=n, **sparse(m)))
            if rep:
                times.setdefault(name, []).append(time.perf_counter() - t)
            evals[name] = g.evaluations / (n * steps)
        console.print(f"round {rep} done")
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["paragon"]
    fid, delta = {}, {}
    if args.fid:
        feats = Features(stores[ks[0]], cfg=ExtractorConfig(steps=100 if q else 600))
        real = feats(np.stack([it.pixels for it in reference_items(stores[ks[0]], args.real)]))[0]
        fid_labels = [names[i % len(names)] for i in range(args.fid)]
        gen_feats = {}
        for name, k, router, m in configs:
            console.print(f"FID of {name}")
            pipe = CDMPipeline.from_store(stores[k], router=router or "ito", paragon=router is None,
                                          grouped=bool(m.get("grouped")), device=args.device)
            g = pipe(args.fid, fid_labels, SamplingSettings(steps, args.guidance, seed=1, batch_size=args.fid_batch,
                                                            **sparse(m)))
            gen_feats[name] = feats(g.images)[0]
            fid[name] = frechet_distance(gen_feats[name], real)
        rng = np.random.default_rng(0)  # resample the samples (paired) and the held-out images
        boot = [(rng.integers(0, args.fid, args.fid), rng.integers(0, len(real), len(real))) for _ in range(args.boot)]
        for name, k, router, m in configs:
            if router and m:  # against dense; a grouped setting against the same setting with separate calls
                ref = " ".join([f"cdm-{k} {router}", *(f"{a} {v:g}" for a, v in m.items() if a != "grouped")])
                ref = ref if ref in fid and ref != name else f"cdm-{k} {router}"
                rel = [frechet_distance(gen_feats[name][i], real[j]) / frechet_distance(gen_feats[ref][i], real[j]) - 1
                       for i, j in boot]
                delta[name] = dict(against=ref, change=fid[name] / fid[ref] - 1,
                                   low=float(np.quantile(rel, 0.05)), high=float(np.quantile(rel, 0.95)))
    out = dict(n=n, steps=steps, guidance=args.guidance, repeats=repeats, device=args.device,
               seconds=times, images_per_second={k: round(n / v, 2) for k, v in med.items()},
               time_vs_paragon={k: round(v / base, 3) for k, v in med.items()},
               evaluations_per_sample_step=evals, fid=fid or None, fid_samples=args.fid or None,
               fid_change_vs_dense=delta or None)
    print(json.dumps(out, indent=2))
    print(f"\n{n} images, {steps} steps, guidance {args.guidance}, median of {repeats}"
          + (f"; FID from {args.fid} samples" if fid else "") + "\n")
    print("| model | images/s | time / paragon | model evals per sample-step | FID | FID change [90% interval] |\n"
          "|---|---|---|---|---|---|")
    for name, k, router, m in configs:
        v = med[name]
        d = delta.get(name)
        rel = f"{100 * d['change']:+.2f}% [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]" if d else ""
        print(f"| {name} | {n / v:.1f} | {v / base:.2f} | {evals[name]:.2f} | "
              f"{fid[name]:.3f} | {rel} |" if fid else f"| {name} | {n / v:.1f} | {v / base:.2f} | {evals[name]:.2f} | | |")


def parse_setting(text: str) -> dict:
    """'subset=2+commit=0.5' -> {'subset': 2, 'commit': 0.5} (fields of SamplingSettings);
    'grouped=1' asks for grouped model calls (cdm.models.grouped)."""
    out = {}
    for kv in text.split("+"):
        key, _, value = kv.strip().partition("=")
        if key not in ("prune", "commit", "subset", "grouped") or not value:
            raise SystemExit(f"bad --sparse setting {kv!r}: use prune=M, commit=F, subset=N or grouped=1, joined by +")
        out[key] = float(value) if key in ("prune", "commit") else int(value)  # SamplingSettings.check checks ranges
    return out


def sparse(m: dict) -> dict:
    """The SamplingSettings fields of a setting."""
    return {k: v for k, v in m.items() if k != "grouped"}


if __name__ == "__main__":
    main()
