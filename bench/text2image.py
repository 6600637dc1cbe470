"""Text-to-image compartments on real owners: emoji by vendor, captioned with their names.
Prints JSON, then a markdown table; grids go to --work.

    python bench/text2image.py           # 16 px, google + twitter, ~2 h on 2 CPU cores from scratch
    python bench/text2image.py --quick   # smoke-sized
    python bench/text2image.py --kinds   # only: s/step of full, LoRA and prompt compartments
    python bench/text2image.py --digits  # only: captioned digits, do prompts steer the models?

Needs the vendor folders of `python bench/emoji.py --out bench-work/emoji`. Every store is
text-conditioned with the embedded data-free encoder (cdm.models.text) and sampled with the ito
router and guidance towards the held-out prompt (the empty prompt is the null). Stores:

- vendor-2, equal steps: one full compartment per vendor, T steps each, and the paragon on
  every caption (T steps);
- iid-4, equal steps: both vendors' items, as one source, split into 4, T steps each;
- vendor-2 / iid-4, equal compute: T/2 and T/4 steps per compartment;
- vendor-2 LoRA / prompt: adapters (T steps each) on a base trained on a public quarter of
  the emoji (both vendors' images of the same emoji, T steps, not counted in the budget).

Held out: ~10% of the emoji (the same for both vendors, never ingested). Samples are
prompted with their names; R-precision and the CLIP-style score come from cdm.evaluation.alignment
(trained on the held-out pairs only), FID from one feature extractor (emoji categories)
for every store, memorization against each store's own items, and owner attribution is
whether the top-attributed compartment is the vendor a judge (trained on the training
images) sees in the sample. The `_seen` columns prompt with captions the models were
trained on instead (distinct training captions, a scorer fit to the training pairs):
whether a model follows the prompts it learned, where unseen names test generalisation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from common import console, emit, owner_judge, train

from cdm.app import api
from cdm.evaluation.alignment import AlignConfig, AlignScorer, align_model
from cdm.store.data import Item
from cdm.evaluation.evaluate import EvalConfig, Evaluator, ExtractorConfig, Features
from cdm.ingest.folders import load_folder
from cdm.app.report import grid, to_pil
from cdm.store.registry import PARAGON, Store
from cdm.errors import StoreError
from cdm.store.recipes import RouterConfig, TrainConfig


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


def kinds(sizes: Sizes, repeats: int = 5, steps: int = 10) -> None:
    """Seconds per training step of a full, LoRA and prompt compartment on the same base (batch 64,
    the store's preset, text width 64), interleaved and repeated: medians and ratios to full."""
    import torch

    from cdm.models.adapters import PromptModel, attach
    from cdm.store.recipes import AdapterConfig
    from cdm.models.nets import build_unet
    from cdm.models.presets import text_unet_config

    conf = text_unet_config(sizes.preset, sizes.size, 3, 64)
    models = {"full": build_unet(conf, 0), "lora": attach(build_unet(conf, 0), AdapterConfig(public=("p",)).recipe(), 1),
              "prompt": PromptModel.fresh(build_unet(conf, 0), {"tokens": 8}, 2)}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]) for k, m in models.items()}
    x, e = torch.randn(64, 3, sizes.size, sizes.size), torch.randn(64, 77, 64)
    times = {k: [] for k in models}
    for r in range(repeats + 1):
        for k, m in models.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = m(x, torch.randint(0, 1000, (64,)), encoder_hidden_states=e).sample.pow(2).mean()
                opts[k].zero_grad()
                loss.backward()
                opts[k].step()
            if r:  # the first round warms up
                times[k].append((time.perf_counter() - t0) / steps)
    med = {k: float(np.median(v)) for k, v in times.items()}
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    out = dict(preset=sizes.preset, size=sizes.size, batch=64, repeats=repeats, steps=steps, seconds_per_step=med,
               ratio_to_full={k: v / med["full"] for k, v in med.items()}, trainable_parameters=trainable)
    emit(out, "seconds per training step by compartment kind", ["kind", "s/step", "ratio to full", "trainable"],
         [[k, f"{med[k]:.4f}", f"{med[k] / med['full']:.2f}", trainable[k]] for k in models])


def digits(work: Path, steps: int, samples: int = 200) -> None:
    """Do prompts steer the models? The builtin digits captioned `a handwritten <name>`, iid:2
    and the paragon; the feature net's conditional accuracy on prompted samples (chance 0.1)."""
    from cdm.store.data import load_builtin
    from cdm.sampling.pipeline import CDMPipeline
    from cdm.sampling.settings import SamplingSettings

    words = "zero one two three four five six seven eight nine".split()
    try:
        s = Store.open(work)
    except StoreError:
        s = api.init_store(work, 8, 1, 0, 2, 16, TrainConfig(preset="small", steps=steps), RouterConfig(steps=100))
        api.ingest(s, "digits", [replace(it, caption=f"a handwritten {words[int(it.label)]}")
                                 for it in load_builtin("digits")], "iid:2")
        api.set_text(s)
    train(s, paragon=True, router=False)
    feats = Features(s, cfg=ExtractorConfig(steps=300))
    prompts = [f"a handwritten {words[i % 10]}" for i in range(samples)]
    rows = []
    for name, kw in (("paragon", dict(paragon=True)), ("CDM-2, ito", dict(router="ito"))):
        for g in (1.0, 2.0):
            out = CDMPipeline.from_store(s, **kw)(samples, settings=SamplingSettings(steps=25, guidance=g, seed=1),
                                                  prompt=prompts)
            rows.append(dict(model=name, guidance=g,
                             accuracy=float((feats(out.images)[1] == np.arange(samples) % 10).mean())))
    emit(dict(steps=steps, samples=samples, results=rows), "prompted digits: conditional accuracy (chance 0.1)",
         ["model", "guidance", "accuracy"], [[r["model"], r["guidance"], f"{r['accuracy']:.3f}"] for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kinds", action="store_true", help="only: seconds per training step of full, LoRA and "
                                                         "prompt compartments, side by side")
    ap.add_argument("--digits", action="store_true", help="only: do prompts steer the models (captioned digits)")
    ap.add_argument("--emoji", type=Path, default=Path("bench-work/emoji"), help="output of bench/emoji.py")
    ap.add_argument("--work", type=Path, default=Path("bench-work/text2image"))
    ap.add_argument("--steps", type=int, default=None, help="override T")
    args = ap.parse_args()
    sizes = QUICK if args.quick else DEFAULT
    if args.steps:
        sizes = replace(sizes, steps=args.steps)
    if args.kinds:
        return kinds(sizes, 2 if args.quick else 5)
    if args.digits:
        return digits(args.work / ("quick" if args.quick else "default") / "digits", 60 if args.quick else 800)
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
        "iid-4": (store_at(work / "iid-equal-steps", sizes, T, {"all": every}, "iid:4"), "equal steps", T),
        "iid-4 (compute)": (store_at(work / "iid-equal-compute", sizes, T // 4, {"all": every}, "iid:4"),
                            "equal compute", T // 4),
        "vendor-2 LoRA": (store_at(work / "vendor-lora", sizes, T, {"public": pub, **private},
                                   adapters=dict(public=["public"], kind="lora")), "equal steps, base not counted", T),
    }
    seconds = {}
    for name, (s, _, _) in stores.items():
        console.print(f"training {name}")
        t0 = time.perf_counter()
        train(s, compartments=names if "LoRA" in name else None, paragon=name == "vendor-2", router=False)
        seconds[name] = round(time.perf_counter() - t0, 1)
    # prompt compartments: a copy of the LoRA store (the same base), each vendor's adapter a learned prompt
    if not (work / "vendor-prompt").exists():
        shutil.copytree(work / "vendor-lora", work / "vendor-prompt")
    prompts = store_at(work / "vendor-prompt", sizes, T, {}, adapters=dict(public=["public"], kind="prompt", tokens=8))
    console.print("training vendor-2 prompt")
    t0 = time.perf_counter()
    train(prompts, compartments=names, router=False)
    seconds["vendor-2 prompt"] = round(time.perf_counter() - t0, 1)
    stores["vendor-2 prompt"] = (prompts, "equal steps, base not counted", T)
    heldout = [it for v in names for it in held[v]]
    base = stores["vendor-2"][0]
    features = Features(base, cfg=ExtractorConfig(steps=sizes.extractor_steps))
    scorer = AlignScorer(align_model(base, heldout, AlignConfig(steps=sizes.align_steps)))
    # prompts the models were trained on: a scorer fit to the training pairs, one item per distinct caption
    seen_scorer = AlignScorer(align_model(base, every, AlignConfig(steps=sizes.align_steps)))
    by_caption = {it.caption: it for it in every}
    pick = np.random.default_rng(0).choice(sorted(by_caption), min(sizes.samples, len(by_caption)), replace=False)
    seen = [by_caption[c] for c in pick]
    judge = owner_judge(train_items, sizes.judge_steps)
    cfg = EvalConfig.with_sampling(samples=sizes.samples, steps=sizes.sample_steps, guidance=sizes.guidance, batch_size=250)
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
        m_seen = Evaluator(s, seen, cfg, features=features, scorer=seen_scorer).run(label, **run)
        row["r_precision_seen"], row["clip_score_seen"] = m_seen.r_precision, m_seen.clip_score
        rows.append(row)
        to_pil(grid(g.images[:64], 8), 4).save(work / f"{label.replace(' ', '_')}.png")
        console.print(row)

    score("paragon", base, "all data", T, paragon=True)
    for name, (s, budget, steps) in stores.items():
        score(name, s, budget, steps, allow=[c for c in sorted(s.compartments()) if c != "public"], router="ito")
    out = dict(sizes=asdict(sizes), vendors={v: len(train_items[v]) for v in names},
               public={v: len(public[v]) for v in names}, held_out={v: len(held[v]) for v in names},
               captions_dropped_too_long=dropped, train_seconds=seconds, results=rows,
               real_r_precision=rows[0]["real_r_precision"],
               wall_seconds=round(time.perf_counter() - t_start, 1))
    (work / "result.json").write_text(json.dumps(out, indent=2, default=str))
    header = ["store", "budget", "steps", "fid", "fid_ratio", "r_precision", "clip_score", "r_precision_seen",
              "clip_score_seen", "owner_attribution", "memorized", "bytes_per_model", "train_s_per_model"]
    emit(out, f"text2image: {json.dumps(asdict(sizes))}", header,
         [["" if r.get(k) is None else f"{r[k]:.4g}" if isinstance(r[k], float) else r[k] for k in header] for r in rows])


if __name__ == "__main__":
    main()
