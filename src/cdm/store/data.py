"""Items, sources and the pure assignment of items to compartments and slices.

An *item* is one image (uint8, H x W x C) with an optional label. Its id is the
SHA-256 of its canonical pixel bytes (shape header + raw bytes). Assignment of an item
to a compartment and a slice is a pure function of its hash, the split rule and the
store seed (docs/architecture.md, invariant 2): never of the other items or of order.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

BUILTINS = ("digits", "fashion-mnist")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_LABELS = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot")  # Xiao et al. 2017; "T-shirt/top" loses its slash (labels take no '/')
DIGITS_TEST_FRACTION = 1 / 6  # 300 of 1797 images are held out, never ingested
DIGITS_SPLIT_SEED = 20230803  # fixed: the held-out split must never move
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
LABEL_MAX = 64  # characters; the HTTP schema takes the same limit, so every label can be requested
LABEL_PUNCT = " _-.,+()"
CAPTION_MAX = 1000  # characters, after whitespace is collapsed


@dataclass(frozen=True)
class Item:
    """One training example: canonical uint8 pixels (H, W, C) and an optional label name."""

    pixels: np.ndarray
    label: str | None
    origin: str  # where it came from (file path or builtin index), for error messages
    caption: str | None = None  # stored with the item, removed with it; not part of its id

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


BIDI = {*range(0x202A, 0x202F), *range(0x2066, 0x206A)}  # embeddings, overrides and isolates: text that reads
# differently from what it holds


def check_caption(text: str, what: str = "caption") -> str:
    """A caption, canonical: runs of whitespace (newlines too) become one space; 1-1000
    characters; no other control characters, and no bidirectional overrides. No message
    quotes the text (`what` names it: a caption, or a prompt)."""
    if not isinstance(text, str):
        raise DataError(f"{what} must be text, got {type(text).__name__}")
    canon = " ".join(text.split())
    if not canon:
        raise DataError(f"empty {what}")
    if len(canon) > CAPTION_MAX:
        raise DataError(f"{what} of {len(canon)} characters (at most {CAPTION_MAX})")
    bad = sorted({f"U+{ord(c):04X}" for c in canon if unicodedata.category(c) in ("Cc", "Cs") or ord(c) in BIDI})
    if bad:
        raise DataError(f"{what} holds control character(s) {', '.join(bad)}")
    return canon


def check_prompt(text: str) -> str:
    """A prompt follows the caption rules (`check_caption`), except that a blank one is the
    empty prompt (unconditional): canonical, or ""."""
    if isinstance(text, str) and not text.strip():
        return ""
    return check_caption(text, "prompt")


def read_text(path: Path) -> str:
    """A metadata, caption, questions or policy file's text: UTF-8, with or without a byte-order
    mark. Anything else (UTF-16, a Latin-1 byte among UTF-8, a BOM in the middle) is a
    DataError naming the file and the line (`PATH line N: ...`)."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path} line 1: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if "\ufeff" in text:
        line = text[:text.index("\ufeff")].count("\n") + 1
        raise DataError(f"{path} line {line}: a byte-order mark inside the text (files joined together?)")
    return text


# --- sources --------------------------------------------------------------------------


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) of sklearn's bundled digits; the test part is fixed forever."""
    from sklearn.datasets import load_digits

    n = len(load_digits().target)
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(n)
    n_test = int(round(n * DIGITS_TEST_FRACTION))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def load_builtin(name: str, part: str = "train", path: str | Path | None = None) -> list[Item]:
    """Datasets cdm reads without a download. `digits`: scikit-learn's bundled 8x8 grey digits
    (0..16 scaled to 0..255; 300 held out). `fashion-mnist`: 28x28 grey, 60,000 train and
    10,000 test images (MIT licence), from Debian's `dataset-fashion-mnist` or `path`."""
    if name not in BUILTINS:
        raise DataError(f"unknown builtin dataset {name!r}; available: {', '.join(BUILTINS)}")
    if part not in ("train", "test"):
        raise DataError(f"part must be train or test, got {part!r}")
    if name == "fashion-mnist":
        return _fashion_mnist(Path(path) if path else FASHION_MNIST_DIR, part)
    from sklearn.datasets import load_digits

    d = load_digits()
    train, test = digits_split()
    idx = {"train": train, "test": test}[part]
    px = np.rint(d.images[idx] * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return [Item(px[j], str(int(d.target[i])), f"digits[{i}]") for j, i in enumerate(idx)]


def _fashion_mnist(folder: Path, part: str) -> list[Item]:
    stem = "train" if part == "train" else "t10k"
    files = [folder / f"{stem}-{kind}-idx{n}-ubyte" for kind, n in (("images", 3), ("labels", 1))]
    found = [f if f.is_file() else f.with_name(f.name + ".gz") for f in files]
    missing = [str(f) for f in found if not f.is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST not found: {', '.join(missing)}. Install it with "
                        f"`sudo apt-get install dataset-fashion-mnist` (Debian, Ubuntu), or pass --path DIR "
                        f"with the four IDX files (optionally .gz) from github.com/zalandoresearch/fashion-mnist")
    images, labels = (read_idx(f) for f in found)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{found[0]} and {found[1]} do not hold one label per 2-D image")
    if labels.max(initial=0) >= len(FASHION_MNIST_LABELS):
        raise DataError(f"{found[1]}: label {int(labels.max())} is not a Fashion-MNIST class (0-9)")
    return [Item(images[i][..., None], FASHION_MNIST_LABELS[labels[i]], f"fashion-mnist-{part}[{i}]")
            for i in range(len(images))]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format) of unsigned bytes, plain or gzipped."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: holds {data.size} bytes of data for shape {shape}")
    return data.reshape(shape)


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
            return f"{source}-{hash_int('compartment', seed, str(self), ihash) % self.k}"
        if label_id is None:
            raise DataError(f"item {ihash[:12]} has no label; split rule {self} needs labels")
        return f"{source}-{label_id % self.k}"


def assign_slice(ihash: str, slices: int, seed: int) -> int:
    """SISA slice of one item (Bourtoule et al. 2021): a pure function of (item, seed)."""
    return hash_int("slice", seed, str(slices), ihash) % slices


def hash_int(*parts: object, size: int = 8) -> int:
    """A number that is a pure function of `parts`: the first `size` bytes of the SHA-256 of
    the parts joined by \x1f. Every seed and assignment in cdm is one."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:size], "big")


def to_tensor_array(pixels: list[np.ndarray]) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    a = np.stack(pixels).astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2))


def to_uint8_images(x: np.ndarray) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C)."""
    return np.clip(np.rint((x.transpose(0, 2, 3, 1) + 1.0) * 127.5), 0, 255).astype(np.uint8)
