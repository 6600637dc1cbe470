"""Text-to-image compartments on real owners: emoji by vendor, captioned with their names.
Prints JSON, then a markdown table; grids go to --work.

    python bench/text2image.py           # 16 px, google + twitter, ~1 h on 2 CPU cores
    python bench/text2image.py --quick   # smoke-sized

Needs the vendor folders of `python bench/emoji.py --out bench-work/emoji`. Every store is
text-conditioned with the embedded data-free encoder (cdm.text) and sampled with the ito
router and guidance towards the held-out prompt (the empty prompt is the null). Stores:

- vendor-2, equal steps: one full compartment per vendor, T steps each, and the paragon on
  every caption (T steps);
- vendor-2 / iid-4, equal compute: T/2 and T/4 steps per compartment (iid-4 splits both
  vendors' items, as one source, into 4);
- vendor-2 LoRA / prompt: adapters (T steps each) on a base trained on a public quarter of
  the emoji (both vendors' images of the same emoji, T steps, not counted in the budget).

Held out: ~10% of the emoji (the same for both vendors, never ingested). Samples are
prompted with their names; R-precision and the CLIP-style score come from cdm.alignment
(trained on the held-out pairs only), FID from one feature extractor (emoji categories)
for every store, memorization against each store's own items, and owner attribution is
whether the top-attributed compartment is the vendor a judge (trained on the training
images) sees in the sample.
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

from cdm import api
from cdm.alignment import AlignConfig, AlignScorer, align_model
from cdm.data import Item
from cdm.evaluate import EvalConfig, Evaluator, ExtractorConfig, Features
from cdm.folders import load_folder
from cdm.report import grid, to_pil
from cdm.store import PARAGON, Store, StoreError
from cdm.train import RouterConfig, TrainConfig


@dataclass(frozen=True)
class Sizes:
    size: int
    preset: str
    steps: int  # T: steps of the paragon and of each model at equal steps
    per_vendor: int | None  # training items per vendor (None: all)
    samples: int
    sample_steps: int
    guidance: float
    extractor_steps: int
    align_steps: int
    judge_steps: int


QUICK = Sizes(16, "tiny", 40, 300, 40, 5, 2.0, 60, 100, 100)
DEFAULT = Sizes(16, "small", 600, None, 500, 25, 2.0, 600, 1500, 1500)


def _bucket(name: str, salt: str) -> int:
    return int(hashlib.sha256(f"{salt}{name}".encode()).hexdigest()[:2], 16)


def vendor_items(root: Path, sizes: Sizes, max_tokens: int) -> tuple[dict, dict, dict, int]:
    """(training items, held-out items, public training items) per vendor; the same emoji are
    held out (and public) for every vendor. Captions too long for the encoder are dropped."""
    vendors = {p.name: p for p in sorted(root.iterdir()) if (p / "metadata.jsonl").is_file()}
    if len(vendors) < 2:
        raise SystemExit(f"{root}: needs 2+ vendor folders from `python bench/emoji.py --out {root}`")
    train_, held, public, dropped = {}, {}, {}, 0
    for v, folder in vendors.items():
        items = load_folder(folder, sizes.size, 3, resize=True, label_column="label")
        keep = [it for it in items if len(it.caption) <= max_tokens - 2]  # byte-level: a token per character
        dropped += len(items) - len(keep)
        held[v] = [it for it in keep if _bucket(Path(it.origin).name, "") < 26]
        rest = [it for it in keep if _bucket(Path(it.origin).name, "") >= 26][:sizes.per_vendor]
        public[v] = [it for it in rest if _bucket(Path(it.origin).name, "public") < 64]
        train_[v] = rest
    return train_, held, public, dropped


def store_at(path: Path, sizes: Sizes, steps: int, sources: dict[str, list[Item]], split: str = "one",
             adapters: dict | None = None) -> Store:
    try:
        s = Store.open(path)
    except StoreError:
        s = api.init_store(path, sizes.size, 3, 0, 4, 16, TrainConfig(preset=sizes.preset, steps=steps,
                                                                      checkpoint_every=max(50, steps // 4)),
                           RouterConfig(steps=min(steps, 1000)))
    for name, its in sources.items():
        if name not in s.sources():
            api.ingest(s, name, its, split)
    if api.text_config(s) is None:
        api.set_text(s)
    if adapters is not None:
        a = api.adapter_config(s)
        if a is None or a.kind != adapters["kind"]:
            api.set_adapters(s, **adapters)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--emoji", type=Path, default=Path("bench-work/emoji"), help="output of bench/emoji.py")
    ap.add_argument("--work", type=Path, default=Path("bench-work/text2image"))
    ap.add_argument("--steps", type=int, default=None, help="override T")
    args = ap.parse_args()
    sizes = QUICK if args.quick else DEFAULT
    if args.steps:
        sizes = replace(sizes, steps=args.steps)
    work = args.work / ("quick" if args.quick else "default") / f"T{sizes.steps}"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    T = sizes.steps
    train_items, held, public, dropped = vendor_items(args.emoji, sizes, 77)
    names = list(train_items)
    private = {v: [it for it in train_items[v] if it.origin not in {p.origin for p in public[v]}] for v in names}
    every = [it for v in names for it in train_items[v]]
    pub = [it for v in names for it in public[v]]
    stores = {  # name -> (store, budget, steps per model)
        "vendor-2": (store_at(work / "vendor-equal-steps", sizes, T, train_items), "equal steps", T),
        "vendor-2 (compute)": (store_at(work / "vendor-equal-compute", sizes, T // 2, train_items), "equal compute",
                               T // 2),
        "iid-4 (compute)": (store_at(work / "iid-equal-compute", sizes, T // 4, {"all": every}, "iid:4"),
                            "equal compute", T // 4),
        "vendor-2 LoRA": (store_at(work / "vendor-lora", sizes, T, {"public": pub, **private},
                                   adapters=dict(public=["public"], kind="lora")), "equal steps, base not counted", T),
    }
    seconds = {}
    for name, (s, _, _) in stores.items():
        console.print(f"training {name}")
        t0 = time.perf_counter()
        train(s, paragon=name == "vendor-2", router=False)
        seconds[name] = round(time.perf_counter() - t0, 1)
    heldout = [it for v in names for it in held[v]]
    base = stores["vendor-2"][0]
    features = Features(base, cfg=ExtractorConfig(steps=sizes.extractor_steps))
    scorer = AlignScorer(align_model(base, heldout, AlignConfig(steps=sizes.align_steps)))
    judge = owner_judge(train_items, sizes.judge_steps)
    cfg = EvalConfig(samples=sizes.samples, steps=sizes.sample_steps, guidance=sizes.guidance, batch_size=250)
    rows, para_fid = [], None

    def score(label: str, s: Store, budget: str, steps: int, **run) -> None:
        nonlocal para_fid
        ev = Evaluator(s, heldout, cfg, features=features, scorer=scorer)
        m = ev.run(label, **run)
        g = ev.last_generation
        if run.get("paragon"):
            para_fid = m.fid
        row = dict(store=label, budget=budget, steps=steps, fid=m.fid, fid_ratio=m.fid / para_fid if para_fid else None,
                   r_precision=m.r_precision, clip_score=m.clip_score, memorized=m.memorized)
        comps = [PARAGON] if run.get("paragon") else g.compartments
        weights = [s.model(c) for c in comps]
        row["bytes_per_model"] = int(np.median([(s.folder(w) / w.info["weights"]).stat().st_size for w in weights]))
        row["train_s_per_model"] = float(np.median([w.info["seconds"] for w in weights]))
        if g.attribution is not None and set(g.compartments) <= set(names):  # one compartment per vendor
            top = np.array([names.index(c) for c in np.array(g.compartments)[g.attribution.argmax(1)]])
            row["owner_attribution"] = float((top == judge(g.images)).mean())
        row["real_r_precision"] = ev.real_alignment.r_precision
        rows.append(row)
        to_pil(grid(g.images[:64], 8), 4).save(work / f"{label.replace(' ', '_')}.png")
        console.print(row)

    score("paragon", base, "all data", T, paragon=True)
    for name, (s, budget, steps) in stores.items():
        score(name, s, budget, steps, allow=[c for c in sorted(s.compartments()) if c != "public"], router="ito")
    # prompt compartments: the same store and base, each vendor's adapter now a learned prompt
    lora = stores["vendor-2 LoRA"][0]
    api.set_adapters(lora, public=["public"], kind="prompt", tokens=8)
    t0 = time.perf_counter()
    train(lora, router=False)
    seconds["vendor-2 prompt"] = round(time.perf_counter() - t0, 1)
    score("vendor-2 prompt", lora, "equal steps, base not counted", T, allow=names, router="ito")
    out = dict(sizes=asdict(sizes), vendors={v: len(train_items[v]) for v in names},
               public={v: len(public[v]) for v in names}, held_out={v: len(held[v]) for v in names},
               captions_dropped_too_long=dropped, train_seconds=seconds, results=rows,
               real_r_precision=rows[0]["real_r_precision"],
               wall_seconds=round(time.perf_counter() - t_start, 1))
    (work / "result.json").write_text(json.dumps(out, indent=2, default=str))
    header = ["store", "budget", "steps", "fid", "fid_ratio", "r_precision", "clip_score", "owner_attribution",
              "memorized", "bytes_per_model", "train_s_per_model"]
    emit(out, f"text2image: {json.dumps(asdict(sizes))}", header,
         [["" if r.get(k) is None else f"{r[k]:.4g}" if isinstance(r[k], float) else r[k] for k in header] for r in rows])


if __name__ == "__main__":
    main()
