"""Text-to-image alignment, measured (issue 30): the paragon against per-owner CDM (K = 2, 4)
and iid CDM-4 on captioned scenes (bench/scenes.py), with an encoder trained on the public
scenes and with the data-free one. Prints JSON, then a markdown table.

    python bench/alignment.py                 # 16 px; the sizes are in DEFAULT
    python bench/alignment.py --quick         # smoke-sized

Every store holds the same items: four owners (a style each: filled or outlined shapes on a
light or dark background) and a public source, a compartment of its own that every
composition includes and that the trained encoder learns from (`cdm text --train-on public`).
Layouts: owners-2 (filled against outlined: each owner holds both backgrounds), owners-4 and
iid-4 (the four owners' items as one source, split at random), each at equal steps per model
(T, as the paragon) and at equal total compute (T / (K + 1) per compartment, the public one
counted). The paragon trains on every item, T steps.

Scored on held-out scenes no model saw (their captions neither), prompted with their captions
(`unseen`), and on captions the models trained on (`seen`, scored against the owners' real
images of those captions), each score for both:
- TIFA-style: the fraction of a caption's questions (colour, shape, size, count, presence per
  side) that a judge trained on real held-out scenes answers as the caption says, with a 90%
  bootstrap interval; the judge's own accuracy on real scenes it did not train on is beside it;
- R-precision (100 candidates: chance 0.01) and CLIP-style score from a contrastive scorer
  trained on the real pairs (cdm.evaluation.alignment); FID in that scorer's image features;
- owner attribution: how often the top-attributed compartment holds the style a style judge
  (trained on the owners' real images) sees in the sample; memorization.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from common import console, emit, owner_judge, train, train_models

from cdm.app import api
from cdm.evaluation.alignment import AlignConfig, AlignScorer, fit_align
from cdm.evaluation.evaluate import EvalConfig, Evaluator
from cdm.evaluation.tifa import fit_judge, read_questions
from cdm.ingest.folders import load_folder
from cdm.store.recipes import EncoderConfig, RouterConfig, TrainConfig
from cdm.store.registry import PARAGON, Store
from cdm.training.kinds import plan
from cdm.errors import StoreError

STYLES = ("fill", "fill-dark", "outline", "outline-light")  # bench/scenes.py's owners
OWNERS_2 = {"filled": ("fill", "fill-dark"), "outlined": ("outline", "outline-light")}


@dataclass(frozen=True)
class Sizes:
    size: int
    preset: str
    steps: int  # T: the paragon's steps, and each compartment's at equal steps
    per_owner: int  # scenes per style
    public: int
    held_out: int
    encoder_steps: int
    samples: int
    sample_steps: int
    guidance: float
    align_steps: int
    judge_steps: int


QUICK = Sizes(16, "tiny", 40, 40, 60, 80, 40, 40, 5, 3.0, 100, 100)
DEFAULT = Sizes(16, "small", 600, 300, 600, 400, 1000, 200, 15, 3.0, 800, 600)


def store_at(path: Path, sizes: Sizes, steps: int, sources: dict, split: str, encoder: str) -> Store:
    """A store of `sources` (name -> items) plus the public source, conditioned on `encoder`."""
    try:
        return Store.open(path)
    except StoreError:
        pass
    s = api.init_store(path, sizes.size, 3, 0, 4, 16, TrainConfig(preset=sizes.preset, steps=steps,
                                                                  checkpoint_every=max(50, steps // 4)),
                       RouterConfig(steps=100))
    for name, items in sources.items():
        api.ingest(s, name, items, "one" if name == "public" else split)
    if encoder == "public":
        api.set_text(s, train_on=["public"], recipe=EncoderConfig(steps=sizes.encoder_steps))
    else:
        api.set_text(s)
    return s


def share_encoder(donor: Store, s: Store) -> None:
    """Install the donor's trained encoder in `s` when its job there is the same (same public
    items, recipe and seed, so training it again gives the same bits): saves retraining it per store."""
    from cdm.training.kinds import build_job

    row, job = donor.model("encoder"), build_job(s, "encoder", load_pixels=False)
    if row is None or s.model("encoder") is not None or row.spec != job.spec:
        return
    with s.writing("share the encoder"):  # a writer clears leftover temporary folders first
        tmp = s.new_model_dir("encoder")
        shutil.rmtree(tmp)
        shutil.copytree(donor.folder(row), tmp)
        s.install_model("encoder", "encoder", row.spec, tmp, job.weights, dict(row.info, shared_from=str(donor.root)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("bench-work/alignment"))
    ap.add_argument("--encoders", nargs="+", default=["public", "data-free"], choices=["public", "data-free"])
    ap.add_argument("--stores", nargs="+", default=None, metavar="LAYOUT/BUDGET",
                    help="only these stores, e.g. owners-2/steps iid-4/compute, and `paragon` (default: every "
                         "layout at both budgets, and the paragon)")
    args = ap.parse_args()
    sizes = QUICK if args.quick else DEFAULT
    work = args.work / ("quick" if args.quick else "default")
    t_start = time.perf_counter()
    import scenes

    data = work / "scenes"
    if not (data / "held-out" / "questions.jsonl").is_file():
        scenes.build(data, sizes.size, sizes.per_owner, sizes.public, sizes.held_out)
    load = lambda name: load_folder(data / name, sizes.size, 3)  # noqa: E731
    owners = {st: load(st) for st in STYLES}
    public, held = load("public"), load("held-out")

    def questions(name: str) -> dict:  # by resolved image path, as Evaluator takes them
        return {str((data / name / k).resolve()): v for k, v in read_questions(data / name / "questions.jsonl").items()}

    qs = questions("held-out")
    seen_qs = {k: v for st in STYLES for k, v in questions(st).items()}
    # captions the models trained on, one owner image each, for the `seen` scores
    by_caption = {it.caption: it for st in STYLES for it in owners[st]}
    pick = np.random.default_rng(0).choice(sorted(by_caption), min(sizes.held_out, len(by_caption)), replace=False)
    seen = [by_caption[c] for c in pick]
    all_items = [it for st in STYLES for it in owners[st]]
    layouts = {  # name -> (sources, split, compartments of owners)
        "owners-2": ({k: [it for st in v for it in owners[st]] for k, v in OWNERS_2.items()}, "one", 2),
        "owners-4": (dict(owners), "one", 4),
        "iid-4": ({"all": all_items}, "iid:4", 4),
    }
    judge_style = owner_judge(owners, sizes.judge_steps)  # image -> index in STYLES
    # scorers trained on real pairs only: held-out (unseen captions) and the owners' (seen)
    scorer = AlignScorer(fit_align(held, AlignConfig(steps=sizes.align_steps)))
    seen_scorer = AlignScorer(fit_align(seen, AlignConfig(steps=sizes.align_steps)))
    asked = [it for it in held if str(Path(it.origin).resolve()) in qs]
    judge = fit_judge(np.stack([it.pixels for it in asked]), [qs[str(Path(it.origin).resolve())] for it in asked],
                      sizes.judge_steps)  # the TIFA judge, on real held-out scenes only
    cfg = EvalConfig.with_sampling(samples=sizes.samples, steps=sizes.sample_steps, guidance=sizes.guidance,
                                   batch_size=sizes.samples)
    done_file = work / "rows.jsonl"  # one line per scored row, kept across invocations (a row is scored once)
    done = {(r["encoder"], r["store"], r["budget"]): r for r in map(json.loads, done_file.read_text().splitlines())} \
        if done_file.is_file() else {}

    def score(enc: str, name: str, budget: str, s: Store, steps: int) -> None:
        if (enc, name, budget) in done:
            return
        run = dict(paragon=True) if name == "paragon" else dict(allow=sorted(s.compartments()), router="ito")
        ev = Evaluator(s, held, cfg, scorer=scorer, questions=qs, judge=judge)
        m = ev.run(name, **run)
        g = ev.last_generation
        t = ev.tifa[f"{name}:{m.router or ''}"]
        row = dict(encoder=enc, store=name, budget=budget, steps=steps, tifa=t["score"], tifa_low=t["low"],
                   tifa_high=t["high"], tifa_by_attribute=t["by_attribute"], judge_accuracy=ev.judge.accuracy,
                   r_precision=m.r_precision, clip_score=m.clip_score, fid=m.fid, memorized=m.memorized,
                   real_r_precision=ev.real_alignment.r_precision, sample_seconds=m.sample_seconds)
        if g.attribution is not None:  # the top compartment against the style the judge sees
            top = np.array(g.compartments)[g.attribution.argmax(1)]
            row["top_is_public"] = float(np.mean(top == "public"))
            if name.startswith("owners"):
                owner_of = {st: next(o for o, sts in OWNERS_2.items() if st in sts) if name == "owners-2" else st
                            for st in STYLES}
                style = np.array(STYLES)[judge_style(g.images)]
                row["owner_attribution"] = float(np.mean([owner_of[st] == c for c, st in zip(top, style)]))
        ev_seen = Evaluator(s, seen, cfg, scorer=seen_scorer, questions=seen_qs, judge=judge)
        ms = ev_seen.run(name, **run)
        ts = ev_seen.tifa[f"{name}:{ms.router or ''}"]
        row.update(tifa_seen=ts["score"], tifa_seen_low=ts["low"], tifa_seen_high=ts["high"],
                   r_precision_seen=ms.r_precision, clip_score_seen=ms.clip_score, fid_seen=ms.fid)
        models = [PARAGON] if name == "paragon" else sorted(s.compartments())
        row["train_seconds"] = round(sum(s.model(c).info["seconds"] for c in models), 1)  # this invocation's or earlier
        done[(enc, name, budget)] = row
        with done_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        console.print(row)

    for enc in args.encoders:
        donor = None
        for name, (sources, split, k) in layouts.items():
            for budget, steps in (("equal steps", sizes.steps), ("equal compute", sizes.steps // (k + 1))):
                key = f"{name}/{budget.split()[1]}"
                home = key == "owners-2/steps"  # the paragon lives in this store
                if args.stores and key not in args.stores and not (home and "paragon" in args.stores):
                    continue
                s = store_at(work / enc / key.replace("/", "-"), sizes, steps, {**sources, "public": public}, split, enc)
                if donor is not None:
                    share_encoder(donor, s)
                console.print(f"[{enc}] training {key}")
                if args.stores and key not in args.stores:  # the paragon alone (and what it is built on)
                    train_models(s, plan(s, [PARAGON]))
                else:
                    train(s, paragon=home, router=False)
                donor = donor or (s if s.model("encoder") else None)
                if home:
                    score(enc, "paragon", "all data", s, sizes.steps)
                if not args.stores or key in args.stores:
                    score(enc, name, budget, s, steps)
        if donor is not None and (enc, "encoder", "") not in done:
            done[(enc, "encoder", "")] = dict(encoder=enc, store="encoder", budget="",
                                              seconds=donor.model("encoder").info["seconds"])
            with done_file.open("a") as f:
                f.write(json.dumps(done[(enc, "encoder", "")]) + "\n")
    order = {k: i for i, k in enumerate(done)}
    rows = [r for k, r in sorted(done.items(), key=lambda kv: order[kv[0]]) if k[1] != "encoder"]
    seconds = {k[0]: r["seconds"] for k, r in done.items() if k[1] == "encoder"}
    out = dict(sizes=asdict(sizes), owners={st: len(owners[st]) for st in STYLES}, public=len(public),
               held_out=len(held), seen=len(seen), encoder_train_seconds=seconds, results=rows,
               wall_seconds=round(time.perf_counter() - t_start, 1))
    work.mkdir(parents=True, exist_ok=True)
    (work / "result.json").write_text(json.dumps(out, indent=2))
    header = ["encoder", "store", "budget", "steps", "tifa", "tifa_90", "tifa_seen", "tifa_seen_90", "judge_accuracy",
              "r_precision", "r_precision_seen", "clip_score", "clip_score_seen", "fid", "fid_seen",
              "owner_attribution", "top_is_public", "memorized"]
    table = []
    for r in rows:
        r = dict(r, tifa_90=f"{r['tifa_low']:.3f}-{r['tifa_high']:.3f}",
                 tifa_seen_90=f"{r['tifa_seen_low']:.3f}-{r['tifa_seen_high']:.3f}")
        table.append(["" if r.get(k) is None else f"{r[k]:.4g}" if isinstance(r[k], float) else r[k] for k in header])
    emit(out, f"alignment on scenes: {json.dumps(asdict(sizes))}", header, table)


if __name__ == "__main__":
    main()
