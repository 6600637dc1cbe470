"""Is the composition as good as the paragon? Paragon vs CDM-K (K = 2, 4, 8) on the builtin
digits, `iid` and `by-class` splits, every router, at equal steps per model and at equal
total compute (each of K compartments gets 1/K of the paragon's steps). Prints JSON, then
a markdown table. Stores are kept in --work, so an interrupted run resumes.

    python bench/quality.py            # full (~45 min on 2 cores)
    python bench/quality.py --quick    # smoke run (~3 min)
    python bench/quality.py --adapters # adapter compartments vs full ones vs the paragon (~35 min)

The adapter variant marks a quarter of the digits (by item hash) as a public source; the
base model trains on it; the rest is a private source split iid into K compartments. The
same items are trained as full-model compartments in a second store, where the paragon
(all items) is trained too.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from common import console, digits_store, emit, train

from cdm.sampling.router_specs import ROUTER_SPECS
from cdm.evaluation.evaluate import EvalConfig, Evaluator, ExtractorConfig, Features, reference_items
from cdm.store.registry import PARAGON
from cdm.store.recipes import RouterConfig, TrainConfig

ROUTERS = list(ROUTER_SPECS)  # ito, classifier, uniform


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("bench-work/quality"))
    ap.add_argument("--ks", default=None, help="comma-separated K values (default 2,4,8; quick: 2)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model (default 600; quick 200)")
    ap.add_argument("--samples", type=int, default=None, help="samples per model (default 1000; quick 200)")
    ap.add_argument("--sample-steps", type=int, default=None, help="sampler steps (default 25; quick 10)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--adapters", action="store_true", help="the adapter variant (see above)")
    ap.add_argument("--rank", type=int, default=4, help="adapter variant: LoRA rank")
    ap.add_argument("--alpha", type=float, default=None, help="adapter variant: LoRA alpha (default: 4 x rank)")
    args = ap.parse_args()
    if args.adapters:
        return adapters_variant(args)
    q = args.quick
    ks = [int(k) for k in (args.ks or ("2" if q else "2,4,8")).split(",")]
    steps = args.steps or (200 if q else 600)
    preset = "tiny" if q else "small"
    tc = TrainConfig(preset=preset, steps=steps, checkpoint_every=250)
    rc = RouterConfig(steps=steps)
    cfg = EvalConfig.with_sampling(samples=args.samples or (200 if q else 1000), steps=args.sample_steps or (10 if q else 25),
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
    emit(out, f"real-vs-real floor: {floor:.3f}  (samples {cfg.samples}, sampler steps {cfg.steps}, "
              f"{steps} training steps per model, preset {preset})",
         ["store", "compute", "router", "K", "FID", "FID / paragon", "cond. acc.", "memorized", "attribution acc."],
         [[r["store"], r["compute"], r["router"] or "-", len(r["compartments"]), f"{r['fid']:.3f}", f"{r['fid_ratio']:.3f}",
           f"{r['accuracy']:.3f}", f"{r['memorized']:.3f}",
           "" if r["attribution_accuracy"] is None else f"{r['attribution_accuracy']:.3f}"] for r in rows])


def adapters_variant(args) -> None:
    import hashlib

    from cdm.app import api
    from cdm.store.data import load_builtin
    from cdm.store.registry import Store
    from cdm.errors import StoreError

    q = args.quick
    k = int(args.ks or (2 if q else 8))
    steps = args.steps or (200 if q else 600)
    preset = "tiny" if q else "small"
    tc = TrainConfig(preset=preset, steps=steps, checkpoint_every=250)
    rc = RouterConfig(steps=steps)
    cfg = EvalConfig.with_sampling(samples=args.samples or (200 if q else 1000), steps=args.sample_steps or (10 if q else 25),
                     batch_size=500)
    ext = ExtractorConfig(steps=100 if q else 600)
    t_start = time.perf_counter()
    work = args.work / ("quick" if q else "full")
    items = load_builtin("digits")
    public = [it for it in items if hashlib.sha256(it.hash.encode()).digest()[0] % 4 == 0]
    private = [it for it in items if hashlib.sha256(it.hash.encode()).digest()[0] % 4 != 0]

    def build(name: str, adapters: bool) -> Store:
        try:
            return Store.open(work / name)
        except StoreError:
            s = api.init_store(work / name, 8, 1, 0, 4, 16, tc, rc)
            api.ingest(s, "public", public, "one")
            api.ingest(s, "private", private, f"iid:{k}")
            if adapters:
                api.set_adapters(s, public=["public"], rank=args.rank, alpha=alpha)
            return s

    alpha = args.alpha or 4.0 * args.rank
    stores = {"full": build(f"full-{k}", False), "adapters": build(f"adapters-{k}-r{args.rank}-a{alpha:g}", True)}
    train_s = {}
    for name, s in stores.items():
        console.print(f"[bold]{name}[/]: training (resumes if interrupted)")
        t = time.perf_counter()
        res = train(s, paragon=name == "full", router=False)
        train_s[name] = dict(wall=round(time.perf_counter() - t, 1),
                             per_model={r.name: round(r.seconds, 1) for r in res})
    full, ad = stores["full"], stores["adapters"]
    feats = Features(full, cfg=ext)
    real = reference_items(full)
    ev = {n: Evaluator(s, real, cfg, features=feats) for n, s in stores.items()}
    floor = ev["full"].floor()
    rows = [dict(model="paragon", **asdict(ev["full"].run(PARAGON, paragon=True)))]
    for name in ("full", "adapters"):
        console.print(f"sampling CDM-{k + 1} ({name})")
        rows.append(dict(model=f"CDM-{k + 1} {name}", **asdict(ev[name].run(name, router="ito"))))

    def size(s: Store, c: str) -> dict:
        row = s.model(c)
        params = sum(p.numel() for p in api.load_unet(s, c).parameters())
        file = s.root / row.path / row.info.get("weights", "diffusion_pytorch_model.safetensors")
        out = dict(disk_bytes=file.stat().st_size, merged_params=params)
        if row.info.get("adapter"):
            from safetensors.torch import load_file

            out["adapter_params"] = sum(v.numel() for v in load_file(str(file)).values())
        return out

    comps = sorted(full.compartments())
    sizes = {"full": [size(full, c) for c in comps], "adapters": [size(ad, c) for c in comps]}
    bank = api.load_bank(ad, comps)
    bank_params = sum(p.numel() for p in bank.unet.parameters())
    base_params = sum(p.numel() for p in api.load_unet(ad, "base").parameters())
    per_full = statistics.median(x["disk_bytes"] for x in sizes["full"])
    per_ad = statistics.median(x["disk_bytes"] for x in sizes["adapters"])
    memory = dict(full_model_bytes=4 * statistics.median(x["merged_params"] for x in sizes["full"]),
                  adapter_bank_bytes_per_compartment=4 * (bank_params - base_params) / len(comps),
                  adapter_merged_bytes_per_compartment=4 * statistics.median(x["merged_params"] for x in sizes["adapters"]),
                  base_bytes=4 * base_params)
    by = {r["model"]: r for r in rows}
    fid_full, fid_ad = by[f"CDM-{k + 1} full"]["fid"], by[f"CDM-{k + 1} adapters"]["fid"]
    out = dict(quick=q, preset=preset, steps_per_model=steps, k_private=k, rank=args.rank, alpha=alpha,
               public_items=len(public),
               private_items=len(private), eval=asdict(cfg), floor=floor, train_seconds=train_s, results=rows,
               disk_bytes_per_compartment=dict(full=per_full, adapter=per_ad, ratio=round(per_ad / per_full, 4)),
               memory=memory, fid_adapters_vs_full=round(fid_ad / fid_full, 4),
               wall_seconds=round(time.perf_counter() - t_start, 1))
    para = rows[0]["fid"]
    mem = {"paragon": memory["full_model_bytes"], "full": memory["full_model_bytes"],
           "adapters": f"{memory['adapter_bank_bytes_per_compartment']:.0f} (loop/joint) or "
                       f"{memory['adapter_merged_bytes_per_compartment']:.0f} (merged), + base {memory['base_bytes']}"}
    disk = {"paragon": per_full, "full": per_full, "adapters": per_ad}
    emit(out, f"floor {floor:.3f}; {len(public)} public items (base), {len(private)} private in {k} compartments + "
              f"the public compartment; {steps} steps per model, preset {preset}, rank {args.rank}, alpha {alpha:g}",
         ["model", "FID", "FID / paragon", "FID / full CDM", "cond. acc.", "memorized", "bytes on disk per compartment",
          "bytes in memory per compartment"],
         [[r["model"], f"{r['fid']:.3f}", f"{r['fid'] / para:.3f}", f"{r['fid'] / fid_full:.3f}", f"{r['accuracy']:.3f}",
           f"{r['memorized']:.3f}", disk[r["model"].split()[-1]], mem[r["model"].split()[-1]]] for r in rows])


if __name__ == "__main__":
    main()
