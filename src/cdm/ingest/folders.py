"""Image folders as owners hand them over, read into items with labels and captions.

Three layouts, the ecosystem's conventions:
- label sub-folders (`cat/001.png`), or a flat folder (no labels);
- Hugging Face `imagefolder`, as diffusers' training scripts read it: a `metadata.jsonl` or
  `metadata.csv` beside the images, one row per image with `file_name`, a caption column
  (`text` unless told otherwise) and optionally a label column; without a label column, a
  file's sub-folder is its label;
- a caption sidecar per image (`001.png` + `001.txt`), as LoRA training tools use.

Every file and row is checked before anything is returned, and every problem is named
(file, metadata line, column). Images are read with Pillow, as PNG, JPEG or WebP only
(`FORMATS`): Pillow tries no other format's reader, whatever a file holds or is named. An
image's size is checked from its header before it is decoded: one of another size is a
mismatch (without `resize`), and one over `max_pixels` (`MAX_PIXELS`, width x height) is
refused either way. Transparent pixels are composited onto white (`ALPHA_BACKGROUND`). With
`resize`, an image of another size or mode is converted and resized with the bicubic filter
(`RESIZE_FILTER`).
"""

from __future__ import annotations

import csv
import io
import json
import unicodedata
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

from ..store.data import Item, check_caption, item_hash, read_text

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
FORMATS = ("PNG", "JPEG", "WEBP")  # the only readers Pillow may use
MAX_PIXELS = 4096 * 4096  # largest image read (width x height); `cdm ingest --max-pixels` raises it
METADATA = ("metadata.jsonl", "metadata.csv")
ALPHA_BACKGROUND = (255, 255, 255)  # white
RESIZE_FILTER = Image.Resampling.BICUBIC
MODES = {1: "L", 3: "RGB"}


class FormatMismatch(DataError):
    """An image of another size or mode than the store's."""

    def __init__(self, size: tuple[int, int], mode: str, msg: str):
        super().__init__(msg)
        self.size, self.mode = size, mode


def load_folder(folder: Path, image_size: int, channels: int, resize: bool = False, follow_symlinks: bool = False,
                caption_column: str | None = None, label_column: str | None = None,
                max_pixels: int = MAX_PIXELS) -> list[Item]:
    """The items of `folder` (see the module docstring for the layouts). `caption_column`
    (default `text`) and `label_column` name metadata columns. Symbolic links are refused
    unless `follow_symlinks`: a link can point outside the folder the owner handed over."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"folder not found: {folder}")
    if not follow_symlinks:
        links = sorted(str(p) for p in _tree(folder) if p.is_symlink())
        if links:
            raise DataError(f"{len(links)} symbolic link(s) in {folder}, nothing was ingested (pass "
                            f"--follow-symlinks to read what they point to):\n  " + "\n  ".join(links[:20]))
    meta = [folder / m for m in METADATA if (folder / m).is_file()]
    if len(meta) > 1:
        raise DataError(f"{folder}: has both {METADATA[0]} and {METADATA[1]}; keep one")
    if meta:
        entries = _metadata_entries(folder, meta[0], caption_column or "text", caption_column is not None, label_column)
    else:
        if caption_column or label_column:
            raise DataError(f"{folder}: --caption-column and --label-column need a {' or '.join(METADATA)}")
        entries = _sidecar_entries(folder, _folder_entries(folder))
    items, problems, mismatched = [], [], []
    for path, label, caption in entries:
        try:
            items.append(Item(read_image(path, image_size, channels, resize, max_pixels), label, str(path), caption))
        except FormatMismatch as e:
            mismatched.append((path, e))
        except DataError as e:
            problems.append(f"{path}: {e}")
    if problems or mismatched:
        raise DataError(_report(problems, mismatched, len(entries), image_size, channels))
    return items


def _tree(folder: Path) -> list[Path]:
    """The folder's entries and those of its sub-folders (not following links)."""
    out, todo = [], [folder]
    while todo:
        for p in sorted(todo.pop().iterdir()):
            out.append(p)
            if p.is_dir() and not p.is_symlink():
                todo.append(p)
    return out


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _folder_entries(folder: Path) -> list[tuple[Path, str | None]]:
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    flat = _images(folder)
    if subdirs and flat:
        raise DataError(f"{folder}: mixes image files and label sub-folders; use one layout")
    entries: list[tuple[Path, str | None]] = [(p, None) for p in flat]
    for sub in subdirs:
        entries += [(p, sub.name) for p in _images(sub)]
    if not entries:
        raise DataError(f"{folder}: no {'/'.join(sorted(IMAGE_SUFFIXES))} images found")
    return entries


def _sidecar_entries(folder: Path, entries) -> list[tuple[Path, str | None, str | None]]:
    """Captions from `<image>.txt` beside each image: all images have one, or none."""
    with_txt = [p for p, _ in entries if p.with_suffix(".txt").is_file()]
    if not with_txt:
        return [(p, lab, None) for p, lab in entries]
    out, problems = [], []
    for p, lab in entries:
        txt = p.with_suffix(".txt")
        if not txt.is_file():
            problems.append(f"{p}: no caption file {txt.name} (other images have one)")
            continue
        try:
            text = read_text(txt)
        except DataError as e:
            problems.append(str(e))
            continue
        try:
            out.append((p, lab, check_caption(text)))
        except DataError as e:
            problems.append(f"{txt}: {e}")
    if problems:
        raise DataError(f"{len(problems)} bad caption file(s), nothing was ingested:\n  " + "\n  ".join(problems[:50]))
    return out


def _metadata_entries(folder: Path, meta: Path, caption_column: str, caption_asked: bool,
                      label_column: str | None) -> list[tuple[Path, str | None, str | None]]:
    """Rows of a Hugging Face imagefolder metadata file, checked against the files present."""
    try:
        text = read_text(meta)
    except DataError as e:
        raise DataError(f"{e}; nothing was ingested") from None
    rows, problems = _rows(meta, text)
    captioned = any(caption_column in r for _, r in rows)
    if caption_asked and not captioned and rows:
        problems.append(f"{meta.name}: no row has the caption column {caption_column!r}")
    if label_column and rows and not any(label_column in r for _, r in rows):
        problems.append(f"{meta.name}: no row has the label column {label_column!r}")
    out, seen = [], {}
    root = folder.resolve()
    for line, r in rows:
        where = f"{meta.name} line {line}"
        name = r.get("file_name")
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: no file_name")
            continue
        if any(unicodedata.category(c) == "Cc" for c in name):
            problems.append(f"{where}: file_name holds a control character (a NUL, a newline, ...)")
            continue
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not path.resolve().is_relative_to(root):
            problems.append(f"{where}: file_name {name!r} is outside the folder")
            continue
        if name in seen:
            problems.append(f"{where}: {name!r} is listed again (first on line {seen[name]})")
            continue
        seen[name] = line
        if not path.is_file():
            problems.append(f"{where}: file {name!r} not found")
            continue
        caption = None
        if captioned:
            try:
                caption = check_caption(r.get(caption_column) or "")
            except DataError as e:
                problems.append(f"{where}: {e} (column {caption_column!r})")
                continue
        label = r.get(label_column) if label_column else (Path(name).parent.name or None)
        if label is not None and not isinstance(label, str):
            label = str(label)
        out.append((path, label or None, caption))
    listed = {(folder / n).resolve() for n in seen}
    unlisted = sorted(str(p.relative_to(folder)) for p in _tree(folder)
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.resolve() not in listed)
    if unlisted:
        problems.append(f"{len(unlisted)} image(s) not listed in {meta.name}: {', '.join(unlisted[:20])}")
    if not rows and not problems:
        problems.append(f"{meta.name}: no rows")
    if problems:
        raise DataError(f"{len(problems)} problem(s) in {meta}, nothing was ingested:\n  " + "\n  ".join(problems[:50]))
    return out


def _rows(meta: Path, text: str) -> tuple[list[tuple[int, dict]], list[str]]:
    rows, problems = [], []
    if meta.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{meta.name} line {i}: not JSON ({e.msg})")
                continue
            except RecursionError:
                problems.append(f"{meta.name} line {i}: JSON nested too deeply")
                continue
            if not isinstance(r, dict):
                problems.append(f"{meta.name} line {i}: not a JSON object")
                continue
            rows.append((i, r))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            for r in reader:
                rows.append((reader.line_num, {k: v for k, v in r.items() if k is not None and v not in (None, "")}))
        except csv.Error as e:  # a field over csv's limit, a NUL, an unclosed quote: the rest is unreadable
            problems.append(f"{meta.name} line {reader.line_num + 1}: not CSV ({e})")  # the row that failed
    return rows, problems


def read_image(path: Path, size: int, channels: int, resize: bool = False, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One image file as canonical uint8 (size, size, channels) pixels (see the module docstring)."""
    try:
        with warnings.catch_warnings():  # Pillow's own, larger bomb limit: ours is checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path, formats=FORMATS)
        with im:
            w, h = im.size
            if (w, h) != (size, size) and not resize:  # refused before decoding
                mode = canonical_mode(im)
                raise FormatMismatch(im.size, mode, f"{w}x{h} {mode}, the store holds {size}x{size} {MODES[channels]}")
            if w * h > max_pixels:
                raise DataError(f"{w}x{h} is {w * h} pixels, over the limit of {max_pixels} "
                                "(`cdm ingest --max-pixels` raises it)")
            im.load()
            img = im.copy()
    except UnidentifiedImageError:
        raise DataError(f"not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} image (cdm reads only these formats)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"unreadable or corrupt image ({e.__class__.__name__})") from None
    return canonical(img, size, channels, resize)


def file_item_id(path: Path, size: int, channels: int) -> str:
    """The id an ingest gave (or would give) this file in a store of this format: the hash of its
    canonical pixels, converted as `--resize` converts (not the file's own SHA-256)."""
    return item_hash(read_image(Path(path), size, channels, resize=True))


def canonical_mode(img: Image.Image) -> str:
    """The mode `canonical` reads an image as before converting it to the store's: L or RGB."""
    return "L" if img.mode in ("L", "LA", "1") else "RGB"


def canonical(img: Image.Image, size: int, channels: int, resize: bool = False) -> np.ndarray:
    mode = MODES[channels]
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        bg = Image.new("RGBA", img.size, (*ALPHA_BACKGROUND, 255))
        img = Image.alpha_composite(bg, img.convert("RGBA")).convert("RGB" if img.mode != "LA" else "L")
    if img.mode == "P":
        img = img.convert("RGB")
    if img.mode == "1":
        img = img.convert("L")
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    if (img.mode != mode or img.size != (size, size)) and not resize:
        raise FormatMismatch(img.size, img.mode, f"{img.size[0]}x{img.size[1]} {img.mode}, the store holds "
                                                 f"{size}x{size} {mode}")
    if img.mode != mode:
        img = img.convert(mode)
    if img.size != (size, size):
        img = img.resize((size, size), RESIZE_FILTER)
    return np.asarray(img, dtype=np.uint8).reshape(size, size, channels)


def _report(problems: list[str], mismatched: list, total: int, size: int, channels: int) -> str:
    lines = []
    if mismatched:
        kinds: dict[tuple, list[Path]] = {}
        for path, e in mismatched:
            kinds.setdefault((e.size, e.mode), []).append(path)
        (w, h), mode = max(kinds, key=lambda k: len(kinds[k]))
        lines.append(f"{len(mismatched)} of {total} image(s) are not {size}x{size} {MODES[channels]} like the store "
                     f"({', '.join(f'{len(v)} are {k[0][0]}x{k[0][1]} {k[1]}' for k, v in kinds.items())}).")
        if w == h:
            lines.append(f"For images like these, make a store with `cdm init STORE --image-size {w} --channels "
                         f"{1 if mode == 'L' else 3}`; or pass --resize to convert them to this store's "
                         f"{size}x{size} {MODES[channels]} (bicubic; that shrinks or grows them).")
        else:
            lines.append(f"Pass --resize to convert them to this store's {size}x{size} {MODES[channels]} (bicubic).")
        lines += [f"  {p}" for p, _ in mismatched[:10]]
    if problems:
        lines.append(f"{len(problems)} bad file(s):")
        lines += [f"  {p}" for p in problems[:20]]
    return "nothing was ingested: " + "\n".join(lines)
