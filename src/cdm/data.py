"""Items, sources and the pure assignment of items to compartments and slices.

An *item* is one image (uint8, H x W x C) with an optional label. Its id is the
SHA-256 of its canonical pixel bytes (shape header + raw bytes). Assignment of an item
to a compartment and a slice is a pure function of its hash, the split rule and the
store seed (docs/architecture.md, invariant 2): never of the other items or of order.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
BUILTINS = ("digits",)
DIGITS_TEST_FRACTION = 1 / 6  # 300 of 1797 images are held out, never ingested
DIGITS_SPLIT_SEED = 20230803  # fixed: the held-out split must never move
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
LABEL_MAX = 64  # characters; the HTTP schema takes the same limit, so every label can be requested
LABEL_PUNCT = " _-.,+()"


@dataclass(frozen=True)
class Item:
    """One training example: canonical uint8 pixels (H, W, C) and an optional label name."""

    pixels: np.ndarray
    label: str | None
    origin: str  # where it came from (file path or builtin index), for error messages

    @property
    def hash(self) -> str:
        return item_hash(self.pixels)


def item_hash(pixels: np.ndarray) -> str:
    """SHA-256 of the canonical bytes: 'cdm-item-v1 HxWxC' header, then C-order uint8 pixels."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise DataError(f"item pixels must be uint8 HxWxC, got {pixels.dtype} {pixels.shape}")
    h = hashlib.sha256(f"cdm-item-v1 {pixels.shape[0]}x{pixels.shape[1]}x{pixels.shape[2]}\n".encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise DataError(f"{kind} name {name!r} is invalid: use lowercase letters, digits, '_', '.', '-' (max 64)")
    return name


def check_label(label: str) -> str:
    """A label is 1-64 characters: letters, marks and digits of any script, and ' _-.,+()',
    not starting or ending with a space. Nothing that markup, a path or a terminal would read."""
    ok = (isinstance(label, str) and 0 < len(label) <= LABEL_MAX and label == label.strip(" ")
          and all(c in LABEL_PUNCT or unicodedata.category(c)[0] in "LMN" for c in label))
    if not ok:
        raise DataError(f"label {label!r} is invalid: use 1-{LABEL_MAX} letters, digits, spaces and "
                        f"'_-.,+()', not starting or ending with a space")
    return label


# --- sources --------------------------------------------------------------------------


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) of sklearn's bundled digits; the test part is fixed forever."""
    from sklearn.datasets import load_digits

    n = len(load_digits().target)
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(n)
    n_test = int(round(n * DIGITS_TEST_FRACTION))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def load_builtin(name: str, part: str = "train") -> list[Item]:
    """The embedded datasets. `digits`: 8x8 grey, pixel values 0..16 scaled to 0..255."""
    if name not in BUILTINS:
        raise DataError(f"unknown builtin dataset {name!r}; available: {', '.join(BUILTINS)}")
    from sklearn.datasets import load_digits

    d = load_digits()
    train, test = digits_split()
    idx = {"train": train, "test": test}[part]
    px = np.rint(d.images[idx] * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return [Item(px[j], str(int(d.target[i])), f"digits[{i}]") for j, i in enumerate(idx)]


def load_folder(folder: Path, image_size: int, channels: int, resize: bool = False,
                follow_symlinks: bool = False) -> list[Item]:
    """Images from `folder`: one sub-folder per label, or flat (unlabelled).

    Every file is checked before anything is returned; all problems are reported together.
    Symbolic links (to files or sub-folders) are refused unless `follow_symlinks`: a link can
    point outside the folder the owner handed over.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"folder not found: {folder}")
    if not follow_symlinks:
        links = sorted(str(p) for p in [*folder.iterdir(), *(q for d in folder.iterdir()
                                                             if d.is_dir() and not d.is_symlink() for q in d.iterdir())]
                       if p.is_symlink())
        if links:
            raise DataError(f"{len(links)} symbolic link(s) in {folder}, nothing was ingested (pass "
                            f"--follow-symlinks to read what they point to):\n  " + "\n  ".join(links[:20]))
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    flat = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if subdirs and flat:
        raise DataError(f"{folder}: mixes image files and label sub-folders; use one layout")
    entries: list[tuple[Path, str | None]] = [(p, None) for p in flat]
    for sub in subdirs:
        files = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        entries += [(p, sub.name) for p in files]
    if not entries:
        raise DataError(f"{folder}: no .png/.jpg images found")
    items, problems = [], []
    for path, label in entries:
        try:
            items.append(Item(_read_image(path, image_size, channels, resize), label, str(path)))
        except DataError as e:
            problems.append(f"{path}: {e}")
    if problems:
        raise DataError(f"{len(problems)} bad file(s), nothing was ingested:\n  " + "\n  ".join(problems))
    return items


def _read_image(path: Path, size: int, channels: int, resize: bool) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            img = im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"unreadable or corrupt image ({e.__class__.__name__})") from None
    mode = {1: "L", 3: "RGB"}[channels]
    if img.mode == "P":
        img = img.convert("RGB")
    if img.mode == "1":
        img = img.convert("L")
    if img.mode != mode:
        if not resize:
            raise DataError(f"mode {img.mode} but the store wants {channels} channel(s) ({mode}); pass --resize to convert")
        img = img.convert(mode)
    if img.size != (size, size):
        if not resize:
            raise DataError(f"size {img.size[0]}x{img.size[1]} but the store wants {size}x{size}; pass --resize")
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).reshape(size, size, channels)


# --- split rules and assignment ----------------------------------------------------------


@dataclass(frozen=True)
class SplitRule:
    """`iid:K` (by item hash), `by-class:K` (label id mod K), or `one` (whole source)."""

    kind: str
    k: int = 1

    @classmethod
    def parse(cls, text: str) -> "SplitRule":
        m = re.fullmatch(r"(iid|by-class):(\d+)|one", text.strip())
        if not m:
            raise DataError(f"split rule {text!r} is invalid; use iid:K, by-class:K or one")
        if text.strip() == "one":
            return cls("one", 1)
        k = int(m.group(2))
        if not 1 <= k <= 256:
            raise DataError(f"split rule {text!r}: K must be between 1 and 256")
        return cls(m.group(1), k)

    def __str__(self) -> str:
        return "one" if self.kind == "one" else f"{self.kind}:{self.k}"

    def compartment_names(self, source: str) -> list[str]:
        return [source] if self.kind == "one" else [f"{source}-{i}" for i in range(self.k)]

    def assign(self, source: str, ihash: str, label_id: int | None, seed: int) -> str:
        """Compartment of one item: a pure function of (item, rule, seed)."""
        if self.kind == "one":
            return source
        if self.kind == "iid":
            return f"{source}-{_hash_int('compartment', seed, str(self), ihash) % self.k}"
        if label_id is None:
            raise DataError(f"item {ihash[:12]} has no label; split rule {self} needs labels")
        return f"{source}-{label_id % self.k}"


def assign_slice(ihash: str, slices: int, seed: int) -> int:
    """SISA slice of one item (Bourtoule et al. 2021): a pure function of (item, seed)."""
    return _hash_int("slice", seed, str(slices), ihash) % slices


def _hash_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


def to_tensor_array(pixels: list[np.ndarray]) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    a = np.stack(pixels).astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2))


def to_uint8_images(x: np.ndarray) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C)."""
    return np.clip(np.rint((x.transpose(0, 2, 3, 1) + 1.0) * 127.5), 0, 255).astype(np.uint8)
