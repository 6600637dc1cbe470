"""`cdm demo`: the whole story on the embedded digits, written up in report.md.

init -> ingest (iid:4) -> train 4 compartments + paragon + classifier router -> sample the
full composition with each router and a restricted one -> grids, attribution, weight plot.
With `--text`, the same again text-conditioned: the digits captioned with their names,
prompted at sampling, scored for alignment. Re-running resumes: models that are up to date
are not trained again.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from rich.console import Console

from . import api
from ..evaluation.alignment import AlignConfig
from ..evaluation.evaluate import EvalConfig, EvalReport, Evaluator, ExtractorConfig, evaluate_store
from ..sampling.pipeline import CDMPipeline
from ..sampling.settings import SamplingSettings
from .progress import training_progress
from .report import grid, plot_weights, to_pil
from ..sampling.router_specs import DEFAULT_ROUTER, ROUTER_SPECS
from ..store.registry import Store
from ..store.recipes import RouterConfig, TrainConfig


@dataclass(frozen=True)
class DemoConfig:
    split: str = "iid:4"
    preset: str = "small"
    steps: int = 1200
    router_steps: int = 800
    sample_steps: int = 50
    samples_per_label: int = 8
    guidance: float = 2.0
    seed: int = 0
    eval_samples: int = 1000
    eval_steps: int = 25
    extractor_steps: int = 600
    align_steps: int = 1500
    smoke: bool = False  # a --quick run: says so in the report
    text: bool = False  # also the text-to-image story (captioned digits, prompts)

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(steps=120, router_steps=100, sample_steps=25, samples_per_label=4, eval_samples=200, eval_steps=10,
                   extractor_steps=200, align_steps=200, smoke=True)

    def replace(self, **kw) -> "DemoConfig":
        return replace(self, **kw)

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(steps=self.sample_steps, guidance=self.guidance, seed=self.seed)


def run_demo(out: Path, cfg: DemoConfig, device: str = "cpu", console: Console | None = None) -> Path:
    console = console or Console(stderr=True)
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "store"
    if (path / "registry.sqlite").exists():
        store = Store.open(path)
        console.print(f"resuming with the existing store {path}")
    else:
        store = api.init_store(path, 8, 1, cfg.seed, train=TrainConfig(preset=cfg.preset, steps=cfg.steps),
                               router=RouterConfig(steps=cfg.router_steps))
    timings: dict[str, float] = {}
    try:
        t = time.perf_counter()
        r = api.ingest(store, "digits", api.load_builtin("digits"), cfg.split)
        timings["ingest"] = time.perf_counter() - t
        console.print(f"ingested {r.added} digits ({r.duplicates} already present) into {len(r.compartments)} compartments")

        t = time.perf_counter()
        prog, cb = training_progress(console)
        with prog:
            results = api.train(store, paragon=True, router=True, steps=cfg.steps, device=device, progress=cb)
        timings["train"] = time.perf_counter() - t
        trained = {r.name: r for r in results}

        comps = sorted(store.compartments())
        labels = list(store.labels())
        per_label = [lab for lab in labels for _ in range(cfg.samples_per_label)]
        runs = [("paragon", dict(paragon=True)), *[(f"CDM-{len(comps)}, {rt} router", dict(router=rt))
                                                   for rt in ("classifier", "ito", "uniform")],
                (f"restricted to {', '.join(comps[:2])}, ito router", dict(router="ito", allow=comps[:2]))]
        gens = {}
        t = time.perf_counter()
        with console.status("sampling") as st:
            for title, kw in runs:
                st.update(f"sampling: {title}")
                allow = kw.get("allow")
                labs = per_label if allow is None else [lab for lab in per_label
                                                        if _has_label(store, allow, lab)]
                pipe = CDMPipeline.from_store(store, allow, router=kw.get("router", DEFAULT_ROUTER),
                                              paragon=kw.get("paragon", False), device=device)
                gens[title] = pipe(len(labs), labs, cfg.sampling())
        timings["sample"] = time.perf_counter() - t
        t = time.perf_counter()
        with console.status("evaluating") as st:
            ev = evaluate_store(store, list(ROUTER_SPECS), True, None,
                                EvalConfig.with_sampling(samples=cfg.eval_samples, steps=cfg.eval_steps, seed=cfg.seed + 1),
                                device=device, log=st.update, extractor=ExtractorConfig(steps=cfg.extractor_steps))
        timings["eval"] = time.perf_counter() - t
        text = _text_part(out, cfg, device, console) if cfg.text else []
        report = _write_report(out, store, cfg, gens, trained, timings, time.perf_counter() - t_start, ev, text)
    finally:
        store.close()
    return report


WORDS = "zero one two three four five six seven eight nine".split()


def _captioned(items: list) -> list:
    return [replace(it, caption=f"a handwritten {WORDS[int(it.label)]}") for it in items]


def _text_part(out: Path, cfg: DemoConfig, device: str, console: Console) -> list[str]:
    """The text-to-image story: captioned digits, the embedded encoder, prompts; report lines."""
    path = out / "text-store"
    if (path / "registry.sqlite").exists():
        store = Store.open(path)
    else:
        store = api.init_store(path, 8, 1, cfg.seed, train=TrainConfig(preset=cfg.preset, steps=cfg.steps),
                               router=RouterConfig(steps=cfg.router_steps))
    try:
        t = time.perf_counter()
        api.ingest(store, "digits", _captioned(api.load_builtin("digits")), cfg.split)
        if api.text_config(store) is None:
            api.set_text(store)
        prog, cb = training_progress(console)
        with prog:
            api.train(store, paragon=True, router=True, device=device, progress=cb)
        prompts = [f"a handwritten {w}" for w in WORDS for _ in range(cfg.samples_per_label)]
        gens = {}
        with console.status("sampling with prompts"):
            for title, kw in (("paragon", dict(paragon=True)), ("CDM, ito router", dict(router="ito"))):
                pipe = CDMPipeline.from_store(store, device=device, **kw)
                gens[title] = pipe(len(prompts), settings=cfg.sampling(), prompt=prompts)
        with console.status("evaluating with prompts"):
            ev = Evaluator(store, _captioned(api.load_builtin("digits", "test")),
                           EvalConfig.with_sampling(samples=cfg.eval_samples, steps=cfg.eval_steps, seed=cfg.seed + 1), device=device,
                           extractor=ExtractorConfig(steps=cfg.extractor_steps), align=AlignConfig(steps=cfg.align_steps))
            results = [ev.run("paragon", paragon=True), ev.run(f"cdm-{len(store.compartments())}", router="ito")]
            rep = EvalReport("digits (captioned)", ev.features.kind, ev.cfg, ev.floor(), results,
                             asdict(ev.real_alignment), ev.scorer.kind)
        t = time.perf_counter() - t
        enc = api.text_config(store)
        lines = ["## Text-to-image", "",
                 f"The same digits, each captioned `a handwritten <name>` (`a handwritten three`), in a text-conditioned "
                 f"store (`cdm text`: the embedded data-free encoder `{enc.digest[:12]}`, {enc.max_length} tokens, width "
                 f"{enc.dim}). Every model is a UNet2DConditionModel trained on its compartment's captions; samples "
                 f"are prompted with the names, guidance {cfg.guidance} away from the empty prompt "
                 f"({t:.0f} s for this part).", ""]
        for i, (title, g) in enumerate(gens.items()):
            name = f"text-grid-{i}.png"
            to_pil(grid(g.images, cfg.samples_per_label), 6).save(out / name)
            lines += [f"### {title}: one row per prompt, `a handwritten zero` to `a handwritten nine`", "",
                      f"![{title}]({name})", ""]
        lines += [f"Evaluation: {cfg.eval_samples} samples per model prompted with the held-out test split's captions, "
                  f"{cfg.eval_steps} DDPM steps, no guidance; "
                  f"R-precision among the {ev.real_alignment.candidates} distinct captions and the CLIP-style score "
                  "come from a contrastive model trained on the held-out pairs only (cdm.evaluation.alignment).", "",
                  rep.table(), ""]
        return lines
    finally:
        store.close()


def _has_label(store: Store, allow: list[str], label: str) -> bool:
    lid = store.labels()[label]
    hist = store.label_counts()
    return any(hist.get(c, {}).get(lid, 0) for c in allow)


def _write_report(out: Path, store: Store, cfg: DemoConfig, gens: dict, trained: dict, timings: dict,
                  total: float, ev: EvalReport, text: list[str] = ()) -> Path:
    st = api.status(store)
    lines = ["# cdm demo: compartmentalized diffusion on the embedded digits", "",
             f"{st['items']} training digits (8x8, the fixed held-out test split is never ingested), split "
             f"`{cfg.split}` into {len(st['compartments'])} compartments; one class-conditional UNet "
             f"(preset `{cfg.preset}`, {cfg.steps} steps, {st['config']['slices']} SISA slices) per compartment, "
             f"a paragon trained on all items with the same recipe, and a classifier router.", "",
             *([f"> **Smoke run (`--quick`).** Every model trained for only {cfg.steps} steps and the evaluation "
                f"used {cfg.eval_samples} samples: this report shows that every stage works, not what the models "
                "can do. Run `cdm demo` without `--quick` for that.", ""] if cfg.smoke else []),
             f"Wall time: {total:.0f} s (ingest {timings['ingest']:.1f} s, training {timings['train']:.0f} s, "
             f"sampling {timings['sample']:.0f} s, evaluation {timings['eval']:.0f} s).", "", "## Models", "",
             "| model | items | model digest | trained now (steps, s, steps/s) |", "|---|---|---|---|"]
    for name, c in st["compartments"].items():
        lines.append(f"| {name} | {c['items']} | `{(c['digest'] or '-')[:12]}` | {_trained(trained.get(name))} |")
    for name in ("paragon", "router"):
        row = store.model(name)
        lines.append(f"| {name} | {row.info.get('items') if row else '-'} | `{row.digest[:12] if row else '-'}` | "
                     f"{_trained(trained.get(name))} |")
    lines += ["", "## Samples", "",
              f"{cfg.samples_per_label} samples per label (one row per label 0-9), {cfg.sample_steps} DDPM steps, "
              f"guidance {cfg.guidance}, seed {cfg.seed}. Same seed in every grid.", ""]
    for i, (title, g) in enumerate(gens.items()):
        name = f"grid-{i}.png"
        to_pil(grid(g.images, cfg.samples_per_label), 6).save(out / name)
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    lines += ["## Evaluation", "",
              f"{cfg.eval_samples} class-conditional samples per model (labels balanced), {cfg.eval_steps} DDPM steps, "
              f"no guidance; FID in the features of a classifier trained on the store's items ({ev.features}), "
              f"against the {ev.reference} held-out test split. The floor is the FID of as many real training "
              "items: the extractor has seen those, so a model can land below it. Memorized: Carlini et al. "
              "(2023) criterion, alpha 0.5, 50 neighbours. The attribution accuracy column stays empty here: it is "
              "measured on unconditional samples by `cdm eval --attribution N`, which the demo skips to keep "
              "within its time.", "", ev.table(), ""]
    lines += ["## Attribution", "",
              "Trajectory-averaged router weight of each compartment, averaged over the samples; "
              "'top share' is how often each compartment has the largest final weight (a tie, as under the "
              "uniform router, is shared equally among the tied compartments).", ""]
    for title, g in gens.items():
        if g.attribution is None:
            continue
        top = top_share(g.final)
        lines += [f"**{title}**", "", "| compartment | mean attribution | top share | mean final weight |",
                  "|---|---|---|---|"]
        for k, c in enumerate(g.compartments):
            lines.append(f"| {c} | {g.attribution[:, k].mean():.3f} | {top[k]:.2f} | {g.final[:, k].mean():.3f} |")
        lines.append(f"\nmean largest final weight: {g.final.max(1).mean():.3f}\n")
    lines += ["## Router weights over the sampling steps", ""]
    for title, g in gens.items():
        if g.trace is None or "uniform" in title:
            continue
        name = f"weights-{g.router}-{len(g.compartments)}.png"
        plot_weights(g.trace, g.compartments, out / name, title)
        lines += [f"![{title}]({name})", ""]
    lines += list(text)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def top_share(final: np.ndarray) -> np.ndarray:
    """Per compartment, the fraction of samples in which it has the largest weight; ties share."""
    best = np.isclose(final, final.max(1, keepdims=True), rtol=0, atol=1e-9)
    return (best / best.sum(1, keepdims=True)).mean(0)


def _trained(r) -> str:
    if r is None:
        return "up to date"
    return f"{r.steps}, {r.seconds:.0f}, {r.steps / r.seconds:.1f}" if r.seconds else "0"
