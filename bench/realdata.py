"""Real data: Fashion-MNIST quality at two budgets, memorization against exposure, and emoji
owners that differ in style. Prints JSON, then markdown tables; grids go to --work.

    python bench/realdata.py --part fashion      # CDM-8 (iid, by-class) vs the paragon, two budgets
    python bench/realdata.py --part exposure     # memorization vs epochs, compartments and paragon
    python bench/realdata.py --part emoji --emoji bench-work/emoji   # one compartment per vendor
    python bench/realdata.py --part fashion --quick                  # CI-sized smoke run
    python bench/realdata.py --part fashion --full --device cuda     # the sizes a GPU user would run

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` (or --fashion DIR); its test split
is the held-out set, never ingested. Emoji folders come from `bench/emoji.py`. Stores are
kept in --work, so an interrupted run resumes. Sizes, steps and sample counts of each
setting are printed in the JSON; defaults are chosen to fit a 2-core CPU (see --help).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from common import console, emit, owner_judge, train

from cdm.app import api
from cdm.store.data import Item, load_builtin
from cdm.app.demo import top_share
from cdm.evaluation.evaluate import EvalConfig, Evaluator, ExtractorConfig, Features, frechet_distance
from cdm.ingest.folders import load_folder
from cdm.ingest.ingest import resize_items
from cdm.sampling.pipeline import CDMPipeline
from cdm.sampling.settings import SamplingSettings
from cdm.app.report import grid, to_pil
from cdm.store.registry import PARAGON, Store
from cdm.errors import StoreError
from cdm.store.recipes import RouterConfig, TrainConfig


@dataclass(frozen=True)
class Sizes:
    size: int  # image side: Fashion-MNIST (28 px) and emoji (64 px) are resized, bicubic
    preset: str
    steps: int  # training steps of a model at "equal steps per model"
    items: int  # Fashion-MNIST training items ingested (of 60,000)
    samples: int  # samples per evaluated model
    sample_steps: int
    extractor_steps: int
    epochs: tuple[float, ...]  # exposure part
    exposure_items: int


QUICK = Sizes(8, "tiny", 60, 600, 100, 5, 60, (2, 8), 400)
DEFAULT = Sizes(16, "small", 600, 12000, 1000, 25, 600, (4, 16, 64), 2000)
FULL = Sizes(32, "base", 20000, 60000, 10000, 50, 3000, (4, 16, 64, 256), 60000)


def fashion_items(sizes: Sizes, path: Path | None, part: str = "train") -> list[Item]:
    items = load_builtin("fashion-mnist", part, path)
    if part == "train" and sizes.items < len(items):  # a fixed subset: every class, by item hash
        items = sorted(items, key=lambda it: it.hash)[:sizes.items]
    return resize_items(items, sizes.size, 1) if sizes.size != 28 else items


def fashion_store(path: Path, items: list[Item], split: str, tc: TrainConfig, rc: RouterConfig,
                  base: Path | None = None) -> Store:
    """A Fashion-MNIST store; with `base` (a diffusers folder), every compartment is a LoRA adapter on it."""
    try:
        return Store.open(path)
    except StoreError:
        s = api.init_store(path, items[0].pixels.shape[0], 1, 0, 4, 16, tc, rc)
        api.ingest(s, "fashion", items, split)
        if base is not None:
            api.set_adapters(s, base_from=base, rank=8)
        return s


def public_base(folder: Path, items: list[Item], tc: TrainConfig, rc: RouterConfig, public: float) -> tuple[Store, list]:
    """Train a base on a public fraction of the items (by hash) in a store of its own at `folder`;
    returns that store (its one compartment, "fashion", is the base) and the private rest."""
    cut = int(256 * public)
    pub = [it for it in items if int(it.hash[:2], 16) < cut]
    s = fashion_store(folder, pub, "one", tc, rc)
    train(s, router=False)
    return s, [it for it in items if int(it.hash[:2], 16) >= cut]


def bootstrap_ratio(a: np.ndarray, b: np.ndarray, real: np.ndarray, n: int = 200) -> tuple[float, float]:
    """90% interval of FID(a)/FID(b), resampling samples (paired) and held-out images."""
    rng = np.random.default_rng(0)
    r = []
    for _ in range(n):
        i, j = rng.integers(0, len(a), len(a)), rng.integers(0, len(real), len(real))
        r.append(frechet_distance(a[i], real[j]) / frechet_distance(b[i % len(b)], real[j]))
    return float(np.quantile(r, 0.05)), float(np.quantile(r, 0.95))


def part_fashion(args, sizes: Sizes, work: Path) -> dict:
    items = fashion_items(sizes, args.fashion)
    real = fashion_items(sizes, args.fashion, "test")
    k, t = 8, sizes.steps
    tc = TrainConfig(preset=sizes.preset, steps=t, checkpoint_every=max(50, t // 4))
    rc = RouterConfig(steps=min(t, 1000))
    # a base on a public quarter, trained within the budget (1/2 of the paragon's steps) or before it (a
    # pretrained public model whose steps are not counted, as the paper's Stable Diffusion base is not)
    half, private = public_base(work / "public-base", items, replace(tc, steps=max(1, t // 2)), rc, 0.25)
    pre, _ = public_base(work / "public-base-pretrained", items, tc, rc, 0.25)
    base, pretrained = half.model_dir("fashion"), pre.model_dir("fashion")
    plans = [("iid-8", "iid:8", tc, items, None, "equal steps per model"),
             ("byclass-8", "by-class:8", tc, items, None, "equal steps per model"),
             ("iid-8-eqc", "iid:8", replace(tc, steps=max(1, t // k)), items, None, "equal total compute"),
             ("iid-8-base-eqc", "iid:8", replace(tc, steps=max(1, t // (2 * k))), private, base,
              "equal total compute, public base"),  # the base takes 1/2 of the steps; adapters 1/16 each
             ("iid-8-pretrained-eqc", "iid:8", replace(tc, steps=max(1, t // k)), private, pretrained,
              "equal compute on private data, pretrained public base")]  # adapters 1/8 each on the uncounted base
    if args.only:  # evaluate just these stores (beside the paragon, which every ratio needs)
        plans = [p for p in plans if p[0] == "iid-8" or p[0] in args.only.split(",")]
    stores, seconds = {}, {}
    for name, split, recipe, its, base_dir, _ in plans:
        s = fashion_store(work / name, its, split, recipe, rc, base_dir)
        t0 = time.perf_counter()
        train(s, paragon=name == "iid-8", router=name == "byclass-8")
        seconds[name] = round(time.perf_counter() - t0, 1)
        stores[name] = s
    cfg = EvalConfig.with_sampling(samples=sizes.samples, steps=sizes.sample_steps, batch_size=500,
                     attribution_samples=sizes.samples // 2)
    feats = Features(stores["iid-8"], cfg=ExtractorConfig(steps=sizes.extractor_steps))
    # attribution accuracy asks whether the top compartment holds the sample's class: only by-class splits say something
    ev = {n: Evaluator(s, real, cfg if n.startswith("byclass") else replace(cfg, attribution_samples=0), features=feats)
          for n, s in stores.items()}
    rows, f = [], {}
    para = ev["iid-8"].run(PARAGON, paragon=True)
    f[PARAGON] = ev["iid-8"].last_features
    rows.append(dict(store="paragon", budget="-", **asdict(para)))
    for name, st, steps in (("public base alone", half, t // 2), ("pretrained base alone", pre, t)):
        e = Evaluator(st, real, replace(cfg, attribution_samples=0), features=feats)
        m = e.run(name, router="ito")
        lo, hi = bootstrap_ratio(e.last_features, f[PARAGON], e.real_feats)
        rows.append(dict(store=name, budget=f"{steps} steps on the public quarter", fid_ratio=round(m.fid / para.fid, 3),
                         low=round(lo, 3), high=round(hi, 3), **asdict(m)))
    for name, *_, budget in plans:
        if args.only and name not in args.only.split(","):
            continue
        for router in args.routers.split(","):
            console.print(f"sampling {name} with the {router} router")
            m = ev[name].run(name, router=router)
            f[(name, router)] = ev[name].last_features
            lo, hi = bootstrap_ratio(f[(name, router)], f[PARAGON], ev[name].real_feats)
            rows.append(dict(store=name, budget=budget, fid_ratio=round(m.fid / para.fid, 3), low=round(lo, 3),
                             high=round(hi, 3), **asdict(m)))
    return dict(sizes=asdict(sizes), train_seconds=seconds, floor=ev["iid-8"].floor(), results=rows)


def part_exposure(args, sizes: Sizes, work: Path) -> dict:
    """Memorization against epochs: CDM-8 compartments and the paragon at equal exposure."""
    items = fashion_items(replace(sizes, items=sizes.exposure_items), args.fashion)
    real = fashion_items(sizes, args.fashion, "test")
    cfg = EvalConfig.with_sampling(samples=sizes.samples, steps=sizes.sample_steps, batch_size=500)
    rows, feats = [], None
    for e in sizes.epochs:
        tc = TrainConfig(preset=sizes.preset, steps=10 ** 6, epochs=e, min_steps=1, checkpoint_every=10 ** 6)
        s = fashion_store(work / f"exposure-{e:g}", items, "iid:8", tc, RouterConfig(steps=1))
        train(s, paragon=True, router=False)
        feats = feats or Features(s, cfg=ExtractorConfig(steps=sizes.extractor_steps))
        ev = Evaluator(s, real, cfg, features=feats)
        steps = {n: m.info["steps"] for n, m in s.models().items()}
        for name, kw in (("paragon", dict(paragon=True)), ("cdm-8 ito", dict(router="ito"))):
            m = ev.run(name, **kw)
            rows.append(dict(epochs=e, model=name, steps=steps[PARAGON] if name == "paragon" else
                             sorted({v for n, v in steps.items() if n != PARAGON}), fid=m.fid, memorized=m.memorized,
                             accuracy=m.accuracy))
    return dict(sizes=asdict(sizes), items=len(items), results=rows)


def vendor_folders(root: Path) -> dict[str, Path]:
    found = {p.name: p for p in sorted(root.iterdir()) if (p / "metadata.jsonl").is_file()}
    if len(found) < 2:
        raise SystemExit(f"{root}: needs 2+ vendor folders from `python bench/emoji.py --out {root}`")
    return found


def part_emoji(args, sizes: Sizes, work: Path) -> dict:
    """One compartment per vendor: can the composition tell owners apart?"""
    size = max(16, sizes.size)
    vendors, held, train_items = vendor_folders(args.emoji), {}, {}
    for v, folder in vendors.items():
        items = load_folder(folder, size, 3, resize=True, label_column="label")
        out = {it.origin for it in items if int(hashlib.sha256(Path(it.origin).name.encode()).hexdigest()[:2], 16) < 26}
        held[v] = [it for it in items if it.origin in out]  # ~10% of emoji (the same ones for every vendor)
        train_items[v] = [it for it in items if it.origin not in out]
    t = sizes.steps
    path = work / f"emoji-{size}" if t == DEFAULT.steps else work / f"emoji-{size}-{t}"  # --steps: a store of its own
    try:
        s = Store.open(path)
    except StoreError:
        s = api.init_store(path, size, 3, 0, 4, 16, TrainConfig(preset=sizes.preset if size <= 16 else "medium",
                                                                 steps=t, checkpoint_every=max(50, t // 4)),
                           RouterConfig(steps=min(t, 1000)))
    for v, its in train_items.items():  # every vendor (a previous run may have forgotten one)
        if v not in s.sources():
            api.ingest(s, v, its, "one")
    t0 = time.perf_counter()
    train(s, paragon=True)
    train_s = round(time.perf_counter() - t0, 1)
    # the judge: a classifier of the vendor, trained on the training images, scored on held-out ones
    names = list(vendors)
    vendor_of = owner_judge(train_items, args.judge_steps or 5 * sizes.extractor_steps)

    hx = np.stack([it.pixels for v in names for it in held[v]])
    hy = np.array([i for i, v in enumerate(names) for _ in held[v]])
    judge_acc = float((vendor_of(hx) == hy).mean())
    feats = Features(s, cfg=ExtractorConfig(steps=sizes.extractor_steps))
    real_all = feats(hx)[0]
    settings = SamplingSettings(steps=sizes.sample_steps, guidance=1.0, seed=1, batch_size=500)
    rows, grids = [], {}
    comp = CDMPipeline.from_store(s, router="ito")(sizes.samples, None, settings)
    judged = vendor_of(comp.images)
    top = np.array([names.index(c) for c in np.array(comp.compartments)[comp.final.argmax(1)]])
    grids["composition"] = comp.images[:64]
    rows.append(dict(model="composition (ito)", fid=frechet_distance(feats(comp.images)[0], real_all),
                     attribution_top1=float((top == judged).mean()), mean_largest_weight=float(comp.final.max(1).mean()),
                     judged_share={v: float((judged == i).mean()) for i, v in enumerate(names)},
                     top_share=dict(zip(comp.compartments, map(float, top_share(comp.final))))))
    par = CDMPipeline.from_store(s, paragon=True)(sizes.samples, None, settings)
    grids["paragon"] = par.images[:64]
    rows.append(dict(model="paragon", fid=frechet_distance(feats(par.images)[0], real_all),
                     judged_share={v: float((vendor_of(par.images) == i).mean()) for i, v in enumerate(names)}))
    for i, v in enumerate(names):
        g = CDMPipeline.from_store(s, [v], router="ito")(sizes.samples, None, settings)
        grids[v] = g.images[:64]
        rows.append(dict(model=f"{v} alone", fid=frechet_distance(feats(g.images)[0], feats(np.stack(
            [it.pixels for it in held[v]]))[0]), judged_as_itself=float((vendor_of(g.images) == i).mean())))
    for name, imgs in grids.items():
        to_pil(grid(imgs, 8), 4).save(work / f"emoji-{size}-{name}.png")
    t0 = time.perf_counter()
    forgot = api.forget(s, source=names[-1]) if not args.keep else None
    return dict(size=size, steps=t, train_seconds=train_s, vendors={v: len(train_items[v]) for v in names},
                held_out={v: len(held[v]) for v in names}, judge_accuracy=judge_acc, results=rows,
                forget_vendor=None if forgot is None else dict(vendor=names[-1], seconds=round(time.perf_counter() - t0, 1),
                                                               retrained=[r["name"] for r in forgot.retrained]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("fashion", "exposure", "emoji"), required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true", help="the sizes a GPU user would run")
    ap.add_argument("--work", type=Path, default=Path("bench-work/realdata"))
    ap.add_argument("--fashion", type=Path, default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    ap.add_argument("--emoji", type=Path, default=Path("bench-work/emoji"), help="output of bench/emoji.py")
    ap.add_argument("--routers", default="ito")
    ap.add_argument("--steps", type=int, default=None, help="override the training steps of the chosen sizes")
    ap.add_argument("--judge-steps", type=int, default=None,
                    help="emoji: training steps of the vendor judge (default 5x the feature extractor's)")
    ap.add_argument("--only", default=None, help="fashion: evaluate only these stores (comma-separated; the paragon "
                                                  "and the public bases always)")
    ap.add_argument("--keep", action="store_true", help="emoji: do not forget a vendor at the end")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    sizes = QUICK if args.quick else FULL if args.full else DEFAULT
    if args.steps:
        sizes = replace(sizes, steps=args.steps)
    work = args.work / ("quick" if args.quick else "full" if args.full else "default") / args.part
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    out = dict(part=args.part, **globals()[f"part_{args.part}"](args, sizes, work))
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (work / "result.json").write_text(json.dumps(out, indent=2, default=str))
    rows = out["results"]
    header = [k for k in COLUMNS[args.part] if any(k in r for r in rows)]
    emit(out, f"{args.part}: {json.dumps(out.get('sizes', {}))}", header,
         [["" if r.get(k) is None else f"{r[k]:.4g}" if isinstance(r[k], float) else r[k] for k in header] for r in rows])


COLUMNS = {"fashion": ["store", "budget", "router", "fid", "fid_ratio", "low", "high", "accuracy", "memorized",
                       "attribution_accuracy"],
           "exposure": ["epochs", "model", "steps", "fid", "accuracy", "memorized"],
           "emoji": ["model", "fid", "attribution_top1", "mean_largest_weight", "judged_as_itself"]}


if __name__ == "__main__":
    main()
