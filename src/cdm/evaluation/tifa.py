"""TIFA-style scoring (Hu et al. 2023, the CDM paper's text-image alignment measure) with
questions answered by judges trained here, since no VQA model can be downloaded.

A question asks one attribute of one region of an image: "what colour is the object on the
left?" is region "left", attribute "colour", answer "red". The questions of each held-out
caption come with the held-out set (`questions.jsonl` beside its images, one line per
image: `file_name`, `text`, `questions`; bench/scenes.py writes them from its scene
grammar). A `Judge` is a small CNN with one head per (region, attribute), trained only on
held-out real images, whose questions are its labels. Part of the held-out images is kept
from it to measure its own accuracy, which is reported beside every score so a reader sees
how far a score can be trusted. The TIFA-style score of generated images is the fraction of
their prompts' questions the judge answers as the prompt says, with a 90% bootstrap
interval over prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import DataError
from ..store.data import read_text, to_tensor_array

JUDGE_STEPS = 600  # a judge's training steps (`cdm eval` with questions.jsonl)


@dataclass(frozen=True)
class Question:
    q: str  # the question in words
    region: str  # where in the image: "left", "right", ...
    attribute: str  # what about it: "colour", "shape", "count", ...
    answer: str  # what the caption says

    @property
    def head(self) -> str:
        return f"{self.region}.{self.attribute}"


def read_questions(path: Path) -> dict[str, list[Question]]:
    """`questions.jsonl`: each image's questions, by file name. A bad line is a DataError naming it."""
    out: dict[str, list[Question]] = {}
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            qs = [Question(**{k: str(q[k]) for k in ("q", "region", "attribute", "answer")}) for q in row["questions"]]
            name = str(row["file_name"])
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise DataError(f"{path.name} line {i}: not a questions row ({e.__class__.__name__}: {e}); expected "
                            '{"file_name": ..., "questions": [{"q", "region", "attribute", "answer"}, ...]}') from None
        if name in out:
            raise DataError(f"{path.name} line {i}: {name!r} is listed again")
        out[name] = qs
    if not out:
        raise DataError(f"{path}: no questions")
    return out


class JudgeNet(nn.Module):
    """A CNN over the whole image with one classifier head per (region, attribute)."""

    def __init__(self, channels: int, heads: dict[str, int], width: int = 32):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d((2, 2)),
            nn.Flatten())
        self.heads = nn.ModuleDict({h.replace(".", ":"): nn.Linear(8 * width, n) for h, n in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.trunk(x)
        return {h.replace(":", "."): head(f) for h, head in self.heads.items()}


@dataclass
class Judge:
    net: JudgeNet
    classes: dict[str, list[str]]  # head -> its answers, in logit order
    accuracy: float = float("nan")  # on held-out real images it never trained on

    @torch.no_grad()
    def answers(self, images: np.ndarray) -> dict[str, list[str]]:
        self.net.eval()
        x = torch.from_numpy(to_tensor_array(images))
        out = {h: [] for h in self.classes}
        for i in range(0, len(x), 256):
            for h, logits in self.net(x[i:i + 256]).items():
                out[h] += [self.classes[h][j] for j in logits.argmax(1).tolist()]
        return out


@dataclass(frozen=True)
class TifaResult:
    score: float  # fraction of questions answered as the prompt says
    low: float  # 90% bootstrap interval over prompts
    high: float
    questions: int
    by_attribute: dict[str, float] = field(default_factory=dict)


def fit_judge(images: np.ndarray, questions: list[list[Question]], steps: int = 600, seed: int = 0,
              test_fraction: float = 0.2) -> Judge:
    """Train a judge on real images and their questions; its accuracy is measured on the
    `test_fraction` of them it does not train on (seeded split)."""
    if len(images) != len(questions) or len(images) < 10:
        raise DataError(f"a judge needs 10+ real images with questions, got {len(images)}")
    classes: dict[str, set[str]] = {}
    for qs in questions:
        for q in qs:
            classes.setdefault(q.head, set()).add(q.answer)
    cls = {h: sorted(v) for h, v in sorted(classes.items())}
    labels = np.full((len(images), len(cls)), -100, dtype=np.int64)
    heads = list(cls)
    for i, qs in enumerate(questions):
        for q in qs:
            labels[i, heads.index(q.head)] = cls[q.head].index(q.answer)
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(images))
    n_test = max(2, int(len(images) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    torch.manual_seed(seed)
    net = JudgeNet(images.shape[3], {h: len(v) for h, v in cls.items()})
    x, y = torch.from_numpy(to_tensor_array(images)), torch.from_numpy(labels)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        b = torch.from_numpy(train)[torch.randint(0, len(train), (min(128, len(train)),), generator=gen)]
        out = net(x[b])
        loss = sum(nn.functional.cross_entropy(out[h], y[b, j], ignore_index=-100)
                   for j, h in enumerate(heads) if (y[b, j] >= 0).any())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    judge = Judge(net, cls)
    judge.accuracy = tifa(judge, images[test], [questions[i] for i in test]).score
    return judge


def tifa(judge: Judge, images: np.ndarray, questions: list[list[Question]], seed: int = 0,
         resamples: int = 1000) -> TifaResult:
    """The fraction of each image's questions the judge answers as its prompt says, pooled;
    a question whose (region, attribute) or answer the judge never saw counts as wrong."""
    said = judge.answers(images)
    right = [[q.head in said and said[q.head][i] == q.answer for q in qs] for i, qs in enumerate(questions)]
    n = sum(len(r) for r in right)
    if not n:
        raise DataError("no questions to score")
    per = np.array([sum(r) for r in right], dtype=float), np.array([len(r) for r in right], dtype=float)
    rng = np.random.RandomState(seed)
    boots = [per[0][idx].sum() / max(per[1][idx].sum(), 1) for idx in
             (rng.randint(0, len(right), len(right)) for _ in range(resamples))]
    by: dict[str, list[bool]] = {}
    for qs, r in zip(questions, right):
        for q, ok in zip(qs, r):
            by.setdefault(q.attribute, []).append(ok)
    return TifaResult(float(per[0].sum() / n), float(np.percentile(boots, 5)), float(np.percentile(boots, 95)), n,
                      {a: float(np.mean(v)) for a, v in sorted(by.items())})
