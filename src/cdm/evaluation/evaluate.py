"""Evaluation: Fréchet distance, conditional accuracy, memorization, attribution accuracy.

- Features come from `FeatureNet`, a small classifier trained on the store's labelled items
  and cached in STORE/eval/ (deterministic; forgetting deletes it, it saw the items). Where
  a user has a TorchScript Inception file (StyleGAN / clean-fid `inception-2015-12-05.pt`),
  `inception=PATH` uses its 2048-d pool features instead; nothing is ever downloaded.
- FID (Heusel et al. 2017) is measured against held-out real images, beside the floor: the
  distance between the same number of real training items and the same held-out set.
- Memorization follows Carlini et al. (2023): a sample is memorized when its nearest
  training item (pixel L2) is closer than alpha times the mean distance to its k nearest.
- Attribution accuracy: on unconditional samples, the fraction whose top-attributed
  compartment holds data of the label the extractor reads in the sample (by-class splits).
- Text-conditioned stores are prompted with held-out captions and scored for alignment too
  (R-precision and a CLIP-style score, cdm.evaluation.alignment); without labels, FID uses the
  alignment model's image features (or real CLIP's, `clip=DIR`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from .alignment import AlignConfig, AlignScorer, ClipScorer, align_model
from .tifa import JUDGE_STEPS, Judge, Question, fit_judge, read_questions, tifa
from ..store.data import BUILTINS, Item, load_builtin, to_tensor_array
from ..ingest.folders import load_folder
from ..ingest.ingest import resize_items
from ..models.nets import FeatureNet
from ..sampling.pipeline import CDMPipeline
from ..sampling.settings import EVALUATION, SamplingSettings
from ..training.kinds import model_state
from ..store.recipes import text_config
from ..store.registry import PARAGON, Store, write_folder_once
from ..errors import StoreError


@dataclass(frozen=True)
class ExtractorConfig:
    steps: int = 600  # ~50 epochs of digits: more makes training items' features drift from held-out ones
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 32
    features: int = 64
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    samples: int = 1000
    sampling: SamplingSettings = EVALUATION  # the unguided model by default, its own seed, large batches
    alpha: float = 0.5  # Carlini et al. relative criterion
    neighbours: int = 50
    attribution_samples: int = 0  # unconditional samples for attribution accuracy (0: skip)

    @classmethod
    def with_sampling(cls, samples: int = 1000, attribution_samples: int = 0, **sampling) -> "EvalConfig":
        """`samples` per model, sampled with the evaluation's defaults changed by `sampling`
        (SamplingSettings fields: steps, guidance, seed, batch_size, ...)."""
        return cls(samples=samples, sampling=replace(cls.sampling, **sampling), attribution_samples=attribution_samples)

    @property
    def seed(self) -> int:
        return self.sampling.seed

    def record(self) -> dict:
        """As the report records it: one flat dict (the sampling options that differ from the
        defaults beyond steps, guidance, seed and batch size are listed only when set)."""
        s, plain, flat = self.sampling, SamplingSettings(), ("steps", "guidance", "seed", "batch_size")
        extra = {f.name: getattr(s, f.name) for f in fields(SamplingSettings)
                 if f.name not in flat and getattr(s, f.name) != getattr(plain, f.name)}
        return dict(samples=self.samples, steps=s.steps, guidance=s.guidance, seed=s.seed, batch_size=s.batch_size,
                    alpha=self.alpha, neighbours=self.neighbours, attribution_samples=self.attribution_samples, **extra)


@dataclass
class Metrics:
    name: str
    router: str | None
    compartments: list[str]
    samples: int
    fid: float
    accuracy: float | None  # conditional accuracy
    memorized: float  # fraction of samples
    memorized_by_compartment: dict[str, float] = field(default_factory=dict)  # by top-attributed compartment
    attribution_accuracy: float | None = None
    r_precision: float | None = None  # text stores: top-1 retrieval of the own prompt (cdm.evaluation.alignment)
    clip_score: float | None = None  # text stores: 100 x max(cos(image, prompt), 0)
    sample_seconds: float = 0.0
    evaluations_per_sample_step: float = 0.0  # model evaluations per sample per sampler step


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two feature sets (rows)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as pytorch-fid does
        eps = np.eye(len(s1)) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def memorization(samples: np.ndarray, train: np.ndarray, alpha: float = 0.5, k: int = 50) -> np.ndarray:
    """Per sample: memorized under Carlini et al.'s criterion d_1 < alpha * mean(d_1..d_k)."""
    x = torch.from_numpy(samples.reshape(len(samples), -1).astype(np.float64) / 255)
    y = torch.from_numpy(train.reshape(len(train), -1).astype(np.float64) / 255)
    d = torch.cdist(x, y)
    near = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False).values
    return (near[:, 0] < alpha * near.mean(1)).numpy()


# --- the feature extractor --------------------------------------------------------------


def extractor_spec(store: Store, cfg: ExtractorConfig) -> str:
    rows = [(r.hash, r.label) for r in store.items() if r.label is not None]
    blob = json.dumps(dict(cfg=asdict(cfg), items=rows, labels=store.labels(), channels=store.config.channels))
    return hashlib.sha256(blob.encode()).hexdigest()


def feature_extractor(store: Store, cfg: ExtractorConfig = ExtractorConfig(), device: str = "cpu") -> FeatureNet:
    """Load the cached extractor for the store's current labelled items, or train and cache it."""
    spec = extractor_spec(store, cfg)
    folder = store.eval_dir() / "extractor" / spec[:16]
    if not folder.exists():
        rows = [r for r in store.items() if r.label is not None]
        if len(store.labels()) < 2 or len(rows) < 10:
            raise StoreError("the feature extractor needs at least 10 labelled items of 2+ labels; "
                             "for unlabelled data pass an Inception file (--inception)")
        x = torch.from_numpy(to_tensor_array([store.read_item(r.hash) for r in rows]))
        y = torch.tensor([r.label for r in rows])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = FeatureNet(store.config.max_labels, store.config.channels, cfg.width, cfg.features)
        _fit(net, x, y, cfg)

        def write(tmp: Path) -> None:  # features of the store's items: owner-only like the store
            net.save_pretrained(tmp, safe_serialization=True)
            (tmp / "cdm.json").write_text(json.dumps(dict(spec=spec, items=len(rows), config=asdict(cfg))))

        write_folder_once(folder, write)
        for old in folder.parent.iterdir():  # older specs saw other (perhaps forgotten) items
            if old != folder and not old.name.startswith(".tmp-"):
                shutil.rmtree(old, ignore_errors=True)
    return FeatureNet.from_pretrained(folder, low_cpu_mem_usage=False).to(device).eval()


def _fit(net: FeatureNet, x: torch.Tensor, y: torch.Tensor, cfg: ExtractorConfig) -> None:
    """Cross-entropy with light, seeded augmentation (one-pixel shifts)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps)
    net.train()
    for _ in range(cfg.steps):
        b = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
        xb = x[b]
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
        xb = torch.roll(xb, (dx, dy), dims=(2, 3))
        loss = torch.nn.functional.cross_entropy(net(xb)[1], y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()


class Features:
    """Images (uint8 N,H,W,C) -> features, and label predictions where the extractor has them."""

    def __init__(self, store: Store, inception: str | Path | None = None, device: str = "cpu",
                 cfg: ExtractorConfig = ExtractorConfig()):
        self.device = device
        if inception is not None:
            path = Path(inception)
            if not path.is_file():
                raise StoreError(f"Inception file {path} not found (a TorchScript file such as "
                                 f"inception-2015-12-05.pt; cdm never downloads weights)")
            try:
                self.inception = torch.jit.load(str(path), map_location=device).eval()
            except (RuntimeError, ValueError) as e:
                raise StoreError(f"{path} is not a TorchScript Inception file ({e})") from None
            self.net, self.kind = None, f"inception:{path.name}"
        else:
            self.inception, self.net, self.kind = None, feature_extractor(store, cfg, device), "cdm-features"

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, batch: int = 500) -> tuple[np.ndarray, np.ndarray | None]:
        feats, preds = [], []
        for s in range(0, len(images), batch):
            chunk = images[s:s + batch]
            if self.inception is not None:
                x = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2)
                x = (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).to(self.device)
                feats.append(self.inception(x, return_features=True).double().cpu().numpy())
            else:
                f, logits = self.net(torch.from_numpy(to_tensor_array(list(chunk))).to(self.device))
                feats.append(f.double().cpu().numpy())
                preds.append(logits.argmax(1).cpu().numpy())
        return np.concatenate(feats), (np.concatenate(preds) if preds else None)


# --- evaluation -------------------------------------------------------------------------


class AlignFeatures:
    """FID features from an alignment scorer's image tower (text stores without labels)."""

    net = inception = None

    def __init__(self, scorer: AlignScorer):
        self.scorer, self.kind = scorer, scorer.kind

    def __call__(self, images: np.ndarray, batch: int = 500) -> tuple[np.ndarray, None]:
        return self.scorer.images(images).double().numpy(), None


class Evaluator:
    """Held-out real images and the store's training items, featurised once; `run` scores one model."""

    def __init__(self, store: Store, real: list[Item], cfg: EvalConfig = EvalConfig(),
                 inception: str | Path | None = None, device: str = "cpu", extractor: ExtractorConfig = ExtractorConfig(),
                 features: Features | None = None, clip: str | Path | None = None,
                 align: AlignConfig = AlignConfig(), scorer: AlignScorer | None = None,
                 questions: dict[str, list[Question]] | None = None,  # by image file (resolved path)
                 judge: Judge | None = None):  # fit on the questions' images if not given
        if len(real) < 2:
            raise StoreError("evaluation needs held-out real images (at least 2)")
        want = (store.config.image_size, store.config.image_size, store.config.channels)
        bad = [it.origin for it in real if it.pixels.shape != want]
        if bad:
            raise StoreError(f"{len(bad)} held-out image(s) do not have the store's shape {want}: {', '.join(bad[:5])}")
        self.store, self.cfg, self.device = store, cfg, device
        self.scorer, self.pool = None, []
        if text_config(store) is not None:  # prompted with held-out captions, scored for alignment
            pairs = [it for it in real if it.caption]
            if not pairs:
                raise StoreError("a text-conditioned store is scored against held-out captioned images: "
                                 "--real FOLDER with captions")
            self.pool = [it.caption for it in pairs]
            self.scorer = scorer or (ClipScorer(clip, device) if clip else
                                     AlignScorer(align_model(store, pairs, align, device), device))
            self.real_alignment = self.scorer.score(np.stack([it.pixels for it in pairs]), self.pool, self.pool,
                                                    seed=cfg.seed)
            if features is None and inception is None and len(store.labels()) < 2:
                features = AlignFeatures(self.scorer)
        self.questions, self.judge, self.tifa = {}, None, {}  # TIFA-style scoring (cdm.evaluation.tifa)
        if self.scorer is not None and questions:
            key = lambda it: str(Path(it.origin).resolve())  # noqa: E731 (questions are keyed by image file)
            asked = [it for it in real if it.caption and key(it) in questions]
            if not asked:
                raise StoreError("questions.jsonl names none of the held-out images")
            self.questions = {it.caption: questions[key(it)] for it in asked}
            self.judge = judge or fit_judge(np.stack([it.pixels for it in asked]), [questions[key(it)] for it in asked],
                                            JUDGE_STEPS, cfg.seed)
        self.features = features or Features(store, inception, device, extractor)
        self.real_feats, _ = self.features(np.stack([it.pixels for it in real]))
        rows = store.items()
        self.train_comp = np.array([r.compartment for r in rows])
        self.train_pixels = np.stack([store.read_item(r.hash) for r in rows])
        self.label_names = store.label_names()

    def floor(self, n: int | None = None) -> float:
        """FID of n real training items (seeded choice) against the held-out set: the best a model can do."""
        n = min(n or self.cfg.samples, len(self.train_pixels))
        pick = np.random.default_rng(self.cfg.seed).choice(len(self.train_pixels), n, replace=False)
        return frechet_distance(self.features(self.train_pixels[pick])[0], self.real_feats)

    def run(self, name: str, allow: list[str] | None = None, router: str = "ito", paragon: bool = False,
            settings: SamplingSettings | None = None) -> Metrics:
        """Score one composition (or the paragon); `settings` default to the config's (`EvalConfig.sampling`)."""
        cfg, store, settings = self.cfg, self.store, settings or self.cfg.sampling
        comps = [PARAGON] if paragon else (sorted(allow) if allow else sorted(store.compartments()))
        hist = store.label_counts()
        present = sorted({lid for c in (hist if paragon else comps) for lid, k in hist.get(c, {}).items()
                          if k and lid is not None})
        labels = [self.label_names[present[i % len(present)]] for i in range(cfg.samples)] if present else None
        prompts = None
        if self.scorer is not None:  # held-out captions, each as often as the samples allow (seeded order)
            order = np.random.default_rng(cfg.seed).permutation(len(self.pool))
            prompts, labels = [self.pool[order[i % len(order)]] for i in range(cfg.samples)], None
        t0 = time.perf_counter()
        pipe = CDMPipeline.from_store(store, None if paragon else comps, router=router, paragon=paragon,
                                      device=self.device)
        gen = pipe(cfg.samples, labels, settings, prompt=prompts)
        seconds = time.perf_counter() - t0
        feats, preds = self.features(gen.images)
        self.last_features, self.last_generation = feats, gen  # for benches: bootstrap intervals, grids
        acc = None
        if labels is not None and preds is not None:
            want = np.array([store.labels()[lab] for lab in labels])
            acc = float((preds == want).mean())
        in_set = np.isin(self.train_comp, comps) if not paragon else np.ones(len(self.train_comp), bool)
        mem = memorization(gen.images, self.train_pixels[in_set], cfg.alpha, cfg.neighbours)
        by_comp = {}
        if gen.attribution is not None:
            top = np.array(gen.compartments)[gen.attribution.argmax(1)]
            by_comp = {c: float(mem[top == c].mean()) for c in gen.compartments if (top == c).any()}
        m = Metrics(name, None if paragon else router, gen.compartments, cfg.samples,
                    frechet_distance(feats, self.real_feats), acc, float(mem.mean()), by_comp,
                    sample_seconds=round(seconds, 3),
                    evaluations_per_sample_step=round(gen.evaluations / (cfg.samples * settings.steps), 4))
        if prompts is not None:
            a = self.scorer.score(gen.images, prompts, self.pool, seed=cfg.seed)
            m.r_precision, m.clip_score = a.r_precision, a.clip_score
        if self.judge is not None and prompts is not None:
            asked = [i for i, p in enumerate(prompts) if p in self.questions]
            if asked:
                t = tifa(self.judge, gen.images[asked], [self.questions[prompts[i]] for i in asked], seed=cfg.seed)
                self.tifa[f"{name}:{m.router or ''}"] = asdict(t)
        if cfg.attribution_samples and not paragon and len(comps) > 1 and self.features.net is not None \
                and prompts is None:
            m.attribution_accuracy = self.attribution_accuracy(pipe)
        return m

    def attribution_accuracy(self, pipe: CDMPipeline) -> float:
        """Unconditional samples: is the top-attributed compartment one holding the sample's label?"""
        cfg, hist = self.cfg, self.store.label_counts()
        gen = pipe(cfg.attribution_samples, None, replace(cfg.sampling, guidance=1.0, seed=cfg.seed + 1))
        _, preds = self.features(gen.images)
        top = [gen.compartments[i] for i in gen.attribution.argmax(1)]
        return float(np.mean([hist.get(c, {}).get(int(p), 0) > 0 for c, p in zip(top, preds)]))


def reference_items(store: Store, real: str | Path = "digits") -> list[Item]:
    """Held-out real images: a builtin's test split (converted to the store's format) or a folder."""
    cfg = store.config
    if str(real) in BUILTINS:
        items = load_builtin(str(real), "test")
        if items[0].pixels.shape != (cfg.image_size, cfg.image_size, cfg.channels):
            items = resize_items(items, cfg.image_size, cfg.channels)
        return items
    return load_folder(Path(real), cfg.image_size, cfg.channels, resize=True)


@dataclass
class EvalReport:
    reference: str
    features: str
    config: EvalConfig
    floor: float  # FID of as many real training items as samples, against the reference
    results: list[Metrics]
    real_alignment: dict | None = None  # text stores: the held-out images scored with their own captions
    scorer: str | None = None  # text stores: the alignment model (cdm-align, or clip:FOLDER)
    tifa: dict | None = None  # with questions.jsonl: judge_accuracy, and each "model:router"'s TIFA-style score

    def table(self) -> str:
        """A markdown table, with FID relative to the paragon where there is one."""
        para = next((m.fid for m in self.results if m.name == PARAGON), None)
        f = lambda v, p=3: "" if v is None else f"{v:.{p}f}"  # noqa: E731
        text = self.real_alignment is not None
        extra = " R-precision | CLIP score |" if text else ""
        lines = ["| model | router | K | FID | FID / paragon | cond. acc. | memorized | attribution acc. |" + extra
                 + " sample s |", "|---|---|---|---|---|---|---|---|" + "---|---|" * text + "---|",
                 f"| real training items (floor) | | | {self.floor:.3f} | | | | |" + " |" * (2 * text) + " |"]
        if text:
            ra = self.real_alignment
            lines.append("| held-out images, own captions | | | | | | | | "
                         f"{f(ra['r_precision'])} | {f(ra['clip_score'], 1)} | |")
        for m in self.results:
            cols = f" {f(m.r_precision)} | {f(m.clip_score, 1)} |" if text else ""
            lines.append(f"| {m.name} | {m.router or ''} | {len(m.compartments)} | {m.fid:.3f} | "
                         f"{f(m.fid / para if para else None)} | {f(m.accuracy)} | {m.memorized:.3f} | "
                         f"{f(m.attribution_accuracy)} |{cols} {m.sample_seconds:.1f} |")
        if self.tifa:
            lines += ["", f"TIFA-style score (questions.jsonl; the judge answers {self.tifa['judge_accuracy']:.3f} of "
                      "real held-out images' questions right)", "",
                      "| model | router | score | 90% interval | questions | by attribute |", "|---|---|---|---|---|---|"]
            for key, t in self.tifa["scores"].items():
                name, router = key.split(":")
                by = ", ".join(f"{a} {v:.2f}" for a, v in t["by_attribute"].items())
                lines.append(f"| {name} | {router} | {t['score']:.3f} | {t['low']:.3f}-{t['high']:.3f} | "
                             f"{t['questions']} | {by} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = dict(asdict(self), config=self.config.record())
        if self.tifa is None:  # only where questions were given
            del d["tifa"]
        return d


def evaluate_store(store: Store, routers: list[str] = ("ito",), paragon: bool | None = None,
                   allow: list[str] | None = None, cfg: EvalConfig = EvalConfig(), real: str | Path = "digits",
                   inception: str | Path | None = None, device: str = "cpu", log=None,
                   extractor: ExtractorConfig = ExtractorConfig(), clip: str | Path | None = None) -> EvalReport:
    """Score the paragon (when trained, unless paragon=False) and the composition with each router.
    Text-conditioned stores are prompted with the held-out captions and scored for alignment
    (with the CLIPModel folder `clip` where given)."""
    asked = Path(str(real)) / "questions.jsonl"  # TIFA-style questions beside a held-out folder
    questions = None if str(real) in BUILTINS or not asked.is_file() else \
        {str((asked.parent / name).resolve()): qs for name, qs in read_questions(asked).items()}
    ev = Evaluator(store, reference_items(store, real), cfg, inception, device, extractor, clip=clip,
                   questions=questions)
    results = []
    if paragon or (paragon is None and model_state(store, PARAGON) == "ready"):
        if log:
            log(f"sampling {cfg.samples} from the paragon")
        results.append(ev.run(PARAGON, paragon=True))
    comps = sorted(allow) if allow else sorted(store.compartments())
    for r in routers:
        if log:
            log(f"sampling {cfg.samples} from CDM-{len(comps)} with the {r} router")
        results.append(ev.run(f"cdm-{len(comps)}", comps, r))
    return EvalReport(str(real), ev.features.kind, cfg, ev.floor(), results,
                      None if ev.scorer is None else asdict(ev.real_alignment), None if ev.scorer is None else ev.scorer.kind,
                      None if ev.judge is None else dict(judge_accuracy=ev.judge.accuracy, scores=ev.tifa))
