"""Compositional captioned scenes where alignment is checkable (issue 30): coloured shapes
whose caption names colour, shape, size, count and position, e.g. "two small red circles
left of a large blue square". Generated here, never committed.

    python bench/scenes.py --out bench-work/scenes            # 32 px
    python bench/scenes.py --out bench-work/scenes --size 16 --per-owner 300

Writes captioned imagefolders (metadata.jsonl: file_name, text):

    OUT/fill/            owner "fill": shapes drawn filled, on a light background
    OUT/outline/         owner "outline": the same scenes' kind drawn as outlines, on a dark one
    OUT/fill-dark/       owner "fill-dark": filled, on the dark background
    OUT/outline-light/   owner "outline-light": outlines, on the light background
    OUT/public/          every style, for a public-data encoder (`cdm text --train-on`)
    OUT/held-out/        scenes no model sees, every style

Each folder has a questions.jsonl (TIFA-style) beside its metadata.jsonl.

bench/alignment.py composes them as 4 owners, or as 2 (filled against outlined: each holds
both backgrounds).

A scene is one group on the left or right, or a group on each side ("A left of B"). Each
caption answers questions about its regions (cdm.evaluation.tifa): per group, its colour,
shape, size and count; per side, whether anything is there.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 75, 220), "yellow": (225, 200, 40)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
COUNTS = {1: "a", 2: "two"}
LIGHT, DARK = (235, 235, 228), (40, 40, 48)
STYLES = {"fill": dict(background=LIGHT, fill=True), "outline": dict(background=DARK, fill=False),
          "fill-dark": dict(background=DARK, fill=True), "outline-light": dict(background=LIGHT, fill=False)}


@dataclass(frozen=True)
class Group:
    count: int
    size: str
    colour: str
    shape: str

    def words(self) -> str:
        return f"{COUNTS[self.count]} {self.size} {self.colour} {self.shape}{'s' if self.count > 1 else ''}"


@dataclass(frozen=True)
class Scene:
    left: Group | None
    right: Group | None

    def caption(self) -> str:
        if self.left and self.right:
            return f"{self.left.words()} left of {self.right.words()}"
        g, side = (self.left, "left") if self.left else (self.right, "right")
        return f"{g.words()} on the {side}"

    def questions(self) -> list[dict]:
        out = []
        for side, g in (("left", self.left), ("right", self.right)):
            out.append(dict(q=f"is there anything on the {side}?", region=side, attribute="present",
                            answer="yes" if g else "no"))
            if g:
                out += [dict(q=f"what colour is the {g.shape} on the {side}?", region=side, attribute="colour",
                             answer=g.colour),
                        dict(q=f"what shape is the {g.colour} object on the {side}?", region=side,
                             attribute="shape", answer=g.shape),
                        dict(q=f"how big is the {g.colour} {g.shape} on the {side}?", region=side,
                             attribute="size", answer=g.size),
                        dict(q=f"how many {g.colour} {g.shape}s are on the {side}?", region=side,
                             attribute="count", answer=str(g.count))]
        return out


def random_scene(rng: np.random.RandomState) -> Scene:
    def group() -> Group:
        return Group(int(rng.choice([1, 2])), str(rng.choice(SIZES)), str(rng.choice(list(COLOURS))),
                     str(rng.choice(SHAPES)))

    kind = rng.randint(3)
    return Scene(group() if kind != 1 else None, group() if kind != 0 else None)


def draw(scene: Scene, size: int, style: str, rng: np.random.RandomState) -> np.ndarray:
    """The scene at `size` px: each side is half the width; a group of two stacks vertically."""
    st = STYLES[style]
    im = Image.new("RGB", (size, size), st["background"])
    d = ImageDraw.Draw(im)
    for side, g in (("left", scene.left), ("right", scene.right)):
        if g is None:
            continue
        cx0 = size * (0.25 if side == "left" else 0.75)
        r = size * (0.09 if g.size == "small" else 0.17) * (0.8 if g.count == 2 else 1.0)
        ys = [size * 0.5] if g.count == 1 else [size * 0.27, size * 0.73]
        for cy in ys:
            cx, cy = cx0 + rng.uniform(-0.04, 0.04) * size, cy + rng.uniform(-0.04, 0.04) * size
            box = [cx - r, cy - r, cx + r, cy + r]
            kw = dict(fill=COLOURS[g.colour]) if st["fill"] else dict(outline=COLOURS[g.colour],
                                                                       width=max(1, size // 16))
            if g.shape == "circle":
                d.ellipse(box, **kw)
            elif g.shape == "square":
                d.rectangle(box, **kw)
            else:
                d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], **kw)
    return np.asarray(im)


def write_folder(folder: Path, scenes: list[tuple[Scene, str]], size: int, seed: int, questions: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    meta, qs = [], []
    for i, (scene, style) in enumerate(scenes):
        name = f"{i:05d}.png"
        Image.fromarray(draw(scene, size, style, rng)).save(folder / name)
        meta.append(dict(file_name=name, text=scene.caption(), style=style))
        if questions:
            qs.append(dict(file_name=name, text=scene.caption(), questions=scene.questions()))
    (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    if questions:
        (folder / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))


def build(out: Path, size: int = 32, per_owner: int = 600, public: int = 600, held_out: int = 400,
          seed: int = 0) -> dict:
    """Every folder; held-out captions are never an owner's or the public part's."""
    rng = np.random.RandomState(seed)
    seen: set[str] = set()

    def scenes(n: int, styles: list[str], exclude: set[str]) -> list[tuple[Scene, str]]:
        got = []
        while len(got) < n:
            s = random_scene(rng)
            if s.caption() not in exclude:
                got.append((s, styles[len(got) % len(styles)]))
        return got

    styles = list(STYLES)
    held = scenes(held_out, styles, set())
    held_caps = {s.caption() for s, _ in held}
    parts = {**{st: scenes(per_owner, [st], held_caps) for st in styles}, "public": scenes(public, styles, held_caps)}
    for name, items in parts.items():
        seen |= {s.caption() for s, _ in items}
        write_folder(out / name, items, size, seed + len(name), questions=True)  # for scores on seen captions
    write_folder(out / "held-out", held, size, seed + 99, questions=True)
    return dict(size=size, **{k: len(v) for k, v in parts.items()}, held_out=len(held),
                held_out_captions=len(held_caps), train_captions=len(seen))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-work/scenes"))
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--per-owner", type=int, default=600)
    ap.add_argument("--public", type=int, default=600)
    ap.add_argument("--held-out", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judge", type=int, default=0, metavar="STEPS",
                    help="then train a judge on the held-out scenes for STEPS steps: its accuracy on the fifth it did "
                         "not train on, and the score of real images under shuffled captions (chance level)")
    args = ap.parse_args()
    out = build(args.out, args.size, args.per_owner, args.public, args.held_out, args.seed)
    if args.judge:
        out["judge"] = judge_check(args.out / "held-out", args.judge, args.seed)
    print(json.dumps(out, indent=2))


def judge_check(held: Path, steps: int, seed: int) -> dict:
    from cdm.evaluation.tifa import fit_judge, read_questions, tifa

    qs = read_questions(held / "questions.jsonl")
    names = sorted(qs)
    images = np.stack([np.asarray(Image.open(held / n).convert("RGB")) for n in names])
    questions = [qs[n] for n in names]
    judge = fit_judge(images, questions, steps=steps, seed=seed)
    shuffled = tifa(judge, images, [questions[i] for i in np.random.RandomState(seed).permutation(len(questions))])
    return dict(steps=steps, accuracy_on_unseen_real=round(judge.accuracy, 3),
                shuffled_captions_score=round(shuffled.score, 3), shuffled_by_attribute=shuffled.by_attribute)


if __name__ == "__main__":
    main()
