"""Real owners' folders: captioned imagefolders, caption sidecars, RGB(A), Fashion-MNIST's IDX
files; every bad row named with nothing written; captions stored and forgotten with their item."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cdm.app import api
from cdm.app.cli import app as cli_app
from cdm.errors import DataError
from cdm.store.data import FASHION_MNIST_LABELS, Item, load_builtin
from cdm.evaluation.evaluate import EvalConfig, ExtractorConfig, evaluate_store
from cdm.ingest.folders import file_item_id, load_folder
from cdm.store.registry import Store

from .conftest import TINY, TINY_ROUTER


def _rgb(seed: int, size: int = 8) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (size, size, 3)).astype(np.uint8)


def _folder(root, n=6, layout="jsonl"):
    """n RGB images in two label sub-folders, captioned by metadata.jsonl, metadata.csv or .txt sidecars."""
    rows = []
    for i in range(n):
        name = f"{'cat' if i % 2 else 'dog'}/{i:03d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rgb(i)).save(root / name)
        rows.append(dict(file_name=name, text=f"a picture, number {i}", kind="odd" if i % 2 else "even"))
        if layout == "txt":
            (root / name).with_suffix(".txt").write_text(f"a picture,\n number {i}\n")
    if layout == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif layout == "csv":
        (root / "metadata.csv").write_text("file_name,text,kind\n"
                                           + "".join(f"{r['file_name']},\"{r['text']}\",{r['kind']}\n" for r in rows))
    return rows


def _store(path, channels=3, size=8):
    return api.init_store(path, size, channels, 0, 2, 16, TINY, TINY_ROUTER)


@pytest.mark.parametrize("layout", ["jsonl", "csv", "txt"])
def test_each_layout_gives_items_with_labels_and_captions(tmp_path, layout):
    _folder(tmp_path / "in", layout=layout)
    items = sorted(load_folder(tmp_path / "in", 8, 3), key=lambda it: it.origin[-7:])  # by file number
    assert [it.caption for it in items] == [f"a picture, number {i}" for i in range(6)]  # whitespace collapsed
    assert [it.label for it in items] == ["dog", "cat"] * 3  # the sub-folder is the label
    assert all(np.array_equal(it.pixels, _rgb(i)) for i, it in enumerate(items))
    if layout != "txt":
        by_column = sorted(load_folder(tmp_path / "in", 8, 3, label_column="kind"), key=lambda it: it.origin[-7:])
        assert [it.label for it in by_column] == ["even", "odd"] * 3


def test_captions_round_trip_through_the_store_and_the_cli(tmp_path):
    _folder(tmp_path / "in")
    s = _store(tmp_path / "s")
    api.ingest(s, "pets", load_folder(tmp_path / "in", 8, 3), "one")
    want = {("pets", it.hash): it.caption for it in load_folder(tmp_path / "in", 8, 3)}
    assert s.captions() == want
    r = CliRunner().invoke(cli_app, ["items", str(tmp_path / "s"), "--file", str(tmp_path / "in/cat/003.png"),
                                     "--json"])
    assert r.exit_code == 0, r.output
    (rec,) = json.loads(r.output)
    assert rec["caption"] == "a picture, number 3" and rec["label"] == "cat" and rec["source"] == "pets"
    assert ("pets", rec["id"]) in want and rec["id"] == file_item_id(tmp_path / "in/cat/003.png", 8, 3)
    listed = json.loads(CliRunner().invoke(cli_app, ["items", str(tmp_path / "s"), "--json"]).output)
    assert {(x["source"], x["id"]): x["caption"] for x in listed} == want


BAD = {
    "missing file": (lambda d: (d / "dog/000.png").unlink(), "line 1: file 'dog/000.png' not found"),
    "unlisted file": (lambda d: Image.fromarray(_rgb(9)).save(d / "cat/extra.png"),
                      "1 image(s) not listed in metadata.jsonl: cat/extra.png"),
    "empty caption": (lambda d: _edit(d, 2, text="  "), "line 3: empty caption (column 'text')"),
    "bad json": (lambda d: _append(d, b"{not json\n"), "line 7: not JSON"),
    "bad encoding": (lambda d: _append(d, b'{"file_name": "x\xff.png"}\n'), "not UTF-8 text (byte"),
    "listed twice": (lambda d: _append(d, b'{"file_name": "dog/000.png", "text": "again"}\n'),
                     "line 7: 'dog/000.png' is listed again (first on line 1)"),
    "outside": (lambda d: _edit(d, 0, file_name="../x.png"), "line 1: file_name '../x.png' is outside the folder"),
    "control character": (lambda d: _edit(d, 1, text="bell\x07"), "line 2: caption holds control character(s) U+0007"),
}


def _edit(d, i, **kw):
    rows = [json.loads(x) for x in (d / "metadata.jsonl").read_text().splitlines()]
    rows[i].update(kw)
    (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _append(d, raw: bytes):
    with open(d / "metadata.jsonl", "ab") as f:
        f.write(raw)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_rows_are_named_and_nothing_is_written(tmp_path, case):
    _folder(tmp_path / "in")
    spoil, message = BAD[case]
    spoil(tmp_path / "in")
    _store(tmp_path / "s").close()
    r = CliRunner().invoke(cli_app, ["ingest", str(tmp_path / "s"), "--source", "pets", "--folder",
                                     str(tmp_path / "in"), "--split", "one"])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    with Store.open(tmp_path / "s") as s:
        assert s.items() == [] and s.captions() == {} and not list((tmp_path / "s" / "items").rglob("*.png"))


def _csv_row(d, raw: bytes):
    (d / "metadata.jsonl").unlink()
    rows = "".join(f"{p.relative_to(d)},a caption\n" for p in sorted(d.rglob("*.png")))
    (d / "metadata.csv").write_bytes(b"file_name,text\n" + rows.encode() + raw)


MALFORMED = {  # issue 29 row 5: each a one-line problem naming the file and the line, never a traceback
    "deep nesting": (lambda d: _append(d, b"[" * 200_000 + b"\n"), "metadata.jsonl line 7: JSON nested too deeply"),
    "deep value": (lambda d: _append(d, b'{"file_name": "dog/000.png", "x": ' + b"[" * 200_000 + b"}\n"),
                   "metadata.jsonl line 7: JSON nested too deeply"),
    "huge csv field": (lambda d: _csv_row(d, b"cat/001.png," + b"x" * 140_000 + b"\n"),
                       "metadata.csv line 8: not CSV (field larger than field limit"),
    "nul in file_name": (lambda d: _edit(d, 0, file_name="dog/000.png\x00.txt"),
                         "metadata.jsonl line 1: file_name holds a control character"),
    "nul in a csv file_name": (lambda d: _csv_row(d, b"cat/0\x0001.png,x\n"),
                               "metadata.csv line 8: file_name holds a control character"),
    "bom inside": (lambda d: _append(d, b"\xef\xbb\xbf" + b'{"file_name": "x.png"}\n'),
                   "metadata.jsonl line 7: a byte-order mark inside the text"),
    "utf-16": (lambda d: (d / "metadata.jsonl").write_bytes((d / "metadata.jsonl").read_text().encode("utf-16")),
               "metadata.jsonl line 1: UTF-16 text"),
    "mixed encodings": (lambda d: _append(d, '{"file_name": "x.png", "text": "café"}\n'.encode("latin-1")),
                        "metadata.jsonl line 7: not UTF-8 text"),
    "latin-1 sidecar": (lambda d: (d / "dog/002.txt").write_bytes(b"line one\ncaf\xe9\n"),
                        "002.txt line 2: not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_metadata_is_one_line_naming_file_and_line(tmp_path, case):
    _folder(tmp_path / "in", layout="txt" if "sidecar" in case else "jsonl")
    spoil, message = MALFORMED[case]
    spoil(tmp_path / "in")
    _store(tmp_path / "s").close()
    r = CliRunner().invoke(cli_app, ["ingest", str(tmp_path / "s"), "--source", "pets", "--folder",
                                     str(tmp_path / "in"), "--split", "one"])
    assert r.exit_code == 2 and message in " ".join(r.output.split()) and "Traceback" not in r.output, r.output
    with Store.open(tmp_path / "s") as s:
        assert s.items() == []


def test_a_leading_utf8_bom_is_accepted(tmp_path):
    _folder(tmp_path / "in")
    meta = tmp_path / "in/metadata.jsonl"
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes())
    assert len(load_folder(tmp_path / "in", 8, 3)) == 6


def test_caption_sidecars_all_or_none_and_utf8(tmp_path):
    _folder(tmp_path / "in", layout="txt")
    (tmp_path / "in/cat/001.txt").unlink()
    with pytest.raises(DataError, match="001.png: no caption file 001.txt"):
        load_folder(tmp_path / "in", 8, 3)
    (tmp_path / "in/cat/001.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match="001.txt line 1: not UTF-8 text"):
        load_folder(tmp_path / "in", 8, 3)


def test_alpha_is_composited_on_white_and_the_size_error_names_the_store_to_make(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4, :, :3], rgba[:4, :, 3] = (10, 20, 30), 255  # top half opaque, bottom half transparent black
    (tmp_path / "a").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a" / "x.png")
    (it,) = load_folder(tmp_path / "a", 8, 3)
    assert (it.pixels[:4] == (10, 20, 30)).all() and (it.pixels[4:] == 255).all()
    for i in range(3):
        Image.fromarray(_rgb(i, 32)).save(tmp_path / "a" / f"big{i}.png")
    with pytest.raises(DataError) as e:
        load_folder(tmp_path / "a", 8, 1)
    msg = str(e.value)
    assert "4 of 4 image(s) are not 8x8 L" in msg and "3 are 32x32 RGB" in msg
    assert "cdm init STORE --image-size 32 --channels 3" in msg and "--resize" in msg


def test_forgetting_a_captioned_item_removes_its_caption_everywhere(tmp_path):
    _folder(tmp_path / "in", n=8)
    items = load_folder(tmp_path / "in", 8, 3)
    a, b = _store(tmp_path / "a"), _store(tmp_path / "b")
    api.ingest(a, "pets", items, "iid:2")
    api.ingest(b, "pets", items[1:], "iid:2")  # built without the first item
    api.train(a)
    r = CliRunner().invoke(cli_app, ["forget", str(tmp_path / "a"), "--file", str(tmp_path / "in/dog/000.png"),
                                     "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["items"] == [items[0].hash]
    api.train(b)
    assert a.captions() == b.captions() and ("pets", items[0].hash) not in a.captions()
    assert {n: m.digest for n, m in a.models().items()} == {n: m.digest for n, m in b.models().items()}
    events = json.dumps(a.events())
    assert items[0].hash in events and "number 0" not in events  # the audit keeps the id, never the caption
    r = CliRunner().invoke(cli_app, ["forget", str(tmp_path / "a"), "--file", str(tmp_path / "in/dog/000.png")])
    assert r.exit_code == 2 and "no item of this store has the pixels of" in r.output


def _idx(path, arr: np.ndarray, gz: bool):
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = head + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_fashion_mnist_reads_idx_files_plain_or_gzipped(tmp_path):
    imgs = np.random.RandomState(0).randint(0, 256, (5, 28, 28)).astype(np.uint8)
    labels = np.array([0, 9, 3, 3, 1], np.uint8)
    _idx(tmp_path / "train-images-idx3-ubyte.gz", imgs, True)
    _idx(tmp_path / "train-labels-idx1-ubyte", labels, False)
    items = load_builtin("fashion-mnist", "train", tmp_path)
    assert [it.label for it in items] == [FASHION_MNIST_LABELS[i] for i in labels]
    assert all(np.array_equal(it.pixels[..., 0], imgs[i]) for i, it in enumerate(items))
    with pytest.raises(DataError, match="sudo apt-get install dataset-fashion-mnist"):
        load_builtin("fashion-mnist", "test", tmp_path)
    _idx(tmp_path / "train-labels-idx1-ubyte", labels[:4], False)
    with pytest.raises(DataError, match="one label per 2-D image"):
        load_builtin("fashion-mnist", "train", tmp_path)


def test_rgb_32px_store_trains_samples_and_forgets(tmp_path):
    root = tmp_path / "in"
    for i in range(12):
        (root / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rgb(i, 32)).save(root / str(i % 2) / f"{i}.png")
    s = api.init_store(tmp_path / "s", 32, 3, 0, 2, 16, TINY, TINY_ROUTER)
    api.ingest(s, "art", load_folder(root, 32, 3), "iid:2")
    api.train(s)
    g = api.sample(s, 3, "1", steps=3)
    assert g.images.shape == (3, 32, 32, 3) and g.images.dtype == np.uint8
    rep = evaluate_store(s, real=root, cfg=EvalConfig.with_sampling(samples=8, steps=2, batch_size=8),
                         extractor=ExtractorConfig(steps=5, batch_size=8))
    assert rep.features == "cdm-features" and [m.name for m in rep.results] == ["cdm-2"]
    assert np.isfinite(rep.results[0].fid) and 0 <= rep.results[0].memorized <= 1
    victim = s.items("art-0")[0].hash
    api.forget(s, [victim])
    assert victim not in {r.hash for r in s.items()} and api.status(s)["compartments"]["art-0"]["model"] == "ready"


def _bench_module(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_emoji_script_reads_an_npm_tarball_into_a_captioned_imagefolder(tmp_path):
    import io
    import tarfile

    emoji = _bench_module("emoji")
    data = [dict(name="GRINNING FACE", unified="1F600", image="1f600.png", category="Smileys & Emotion",
                 has_img_google=True),
            dict(name="WAVING HAND SIGN", unified="1F44B", image="1f44b.png", category="People & Body",
                 has_img_google=True, skin_variations={"1F3FD": dict(image="1f44b-1f3fd.png", has_img_google=True),
                                                       "1F3FF": dict(image="1f44b-1f3ff.png", has_img_google=False)}),
            dict(name="ONLY ELSEWHERE", unified="1F999", image="1f999.png", category="Objects", has_img_google=False)]
    files = {"package/emoji.json": json.dumps(data).encode(), "package/LICENSE": b"The MIT License (MIT)\n"}
    for i, name in enumerate(["1f600.png", "1f44b.png", "1f44b-1f3fd.png"]):
        buf = io.BytesIO()
        Image.fromarray(np.full((64, 64, 4), 40 * i, np.uint8), "RGBA").save(buf, format="PNG")
        files[f"package/img/google/64/{name}"] = buf.getvalue()
    files["package/img/google/sheets/64.png"] = b"not one emoji"
    with tarfile.open(tmp_path / "emoji-datasource-google-1.0.0.tgz", "w:gz") as tar:
        for name, raw in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    recs, images, licence = emoji.read_package(tmp_path / "emoji-datasource-google-1.0.0.tgz", "google")
    assert [r["text"] for r in recs] == ["grinning face", "waving hand sign", "waving hand sign, medium skin tone"]
    assert {r["label"] for r in recs} == {"Smileys and Emotion", "People and Body"} and "MIT" in licence
    assert emoji.write_imagefolder(tmp_path / "out", "google", recs, images, licence) == 3
    assert "Apache-2.0" in (tmp_path / "out" / "google" / "LICENCE.md").read_text()
    items = load_folder(tmp_path / "out" / "google", 32, 3, resize=True, label_column="label")
    assert sorted(it.caption for it in items) == sorted(r["text"] for r in recs)
    assert {it.label for it in items} == {"Smileys and Emotion", "People and Body"}


# what an owner's folder can hold (issue: hardening, second pass) ------------------------------


def test_only_png_jpeg_and_webp_are_opened_whatever_a_file_is_named(tmp_path, monkeypatch):
    """PostScript saved as `a.png` is refused by name, and Pillow's EPS reader (which would
    start Ghostscript) is never tried; nor is any other format's."""
    from PIL import EpsImagePlugin

    tried = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: tried.append(self) or 1 / 0)
    root = tmp_path / "f"
    root.mkdir()
    Image.fromarray(_rgb(0)).save(root / "ok.png")
    (root / "a.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    Image.fromarray(_rgb(1)).save(root / "b.png", format="BMP")  # a BMP under a PNG name
    with pytest.raises(DataError) as e:
        load_folder(root, 8, 3)
    msg = str(e.value)
    assert f"{root / 'a.png'}: not a PNG, JPEG or WEBP image" in msg and f"{root / 'b.png'}: not a PNG" in msg
    assert tried == []


def test_image_dimensions_are_checked_before_decoding(tmp_path, monkeypatch):
    """An image over the pixel limit is refused from its header, with or without --resize; one
    of another size is a mismatch without being decoded. Nothing is decoded in either case."""
    root = tmp_path / "f"
    root.mkdir()
    Image.new("L", (5000, 5000)).save(root / "bomb.png")  # 25 Mpx, a few kB on disk
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or 1 / 0)
    with pytest.raises(DataError, match=r"bomb.png: 5000x5000 is 25000000 pixels, over the limit of 16777216"):
        load_folder(root, 8, 1, resize=True)
    with pytest.raises(DataError, match=r"are 5000x5000 L\)"):
        load_folder(root, 8, 1)
    with pytest.raises(DataError, match=r"over the limit of 100 "):
        load_folder(root, 8, 1, resize=True, max_pixels=100)
    assert decoded == []
    monkeypatch.undo()
    Image.new("L", (16, 16)).save(root / "bomb.png")
    assert load_folder(root, 8, 1, resize=True, max_pixels=256)[0].pixels.shape == (8, 8, 1)  # a raised limit
    s = api.init_store(tmp_path / "s")
    r = CliRunner().invoke(cli_app, ["ingest", str(tmp_path / "s"), "--source", "s", "--folder", str(root),
                                     "--resize", "--max-pixels", "100"])
    assert r.exit_code == 2 and "over the limit of 100" in r.output and not s.items()  # nothing was written


def test_a_forgotten_caption_leaves_no_bytes_in_the_registry_file(tmp_path, monkeypatch):
    """Every registry connection sets `secure_delete`, so a forgotten item's caption is not left
    in a free page of the registry (or its WAL or journal), even where SQLite's default is off;
    its pixels were never in the registry, and its file is gone."""
    import sqlite3

    real = sqlite3.connect

    def connect(*args, **kw):  # a SQLite build whose default is secure_delete = OFF
        db = real(*args, **kw)
        db.execute("PRAGMA secure_delete = OFF")
        return db

    monkeypatch.setattr(sqlite3, "connect", connect)
    secret = "zebra crossing at dawn, owner 4711"
    items = [Item(_rgb(i), None, f"x{i}", secret if i == 0 else f"plain {i}") for i in range(6)]
    s = _store(tmp_path / "s")
    api.ingest(s, "pets", items, "iid:2")
    assert secret in s.captions().values()
    api.forget(s, [items[0].hash], retrain=False)
    s.close()
    blob = b"".join(p.read_bytes() for p in (tmp_path / "s").glob("registry.sqlite*"))  # the file, WAL, journal
    assert secret.encode() not in blob and b"plain 3" in blob
    assert items[0].pixels.tobytes() not in blob and not s.item_path(items[0].hash).exists()  # its pixels too


def test_sampling_a_captioned_class_store_says_how_to_condition_on_text(tmp_path):
    _folder(tmp_path / "in", n=6)
    s = _store(tmp_path / "s")
    api.ingest(s, "pets", load_folder(tmp_path / "in", 8, 3), "iid:2")
    api.train(s, router=False)
    r = CliRunner().invoke(cli_app, ["sample", str(tmp_path / "s"), "-n", "1", "--steps", "1",
                                     "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "have captions" in r.output and "cdm text STORE" in r.output
    r = CliRunner().invoke(cli_app, ["sample", str(tmp_path / "s"), "-n", "1", "--steps", "1", "--label", "dog",
                                     "--out", str(tmp_path / "out")])
    assert r.exit_code == 0 and "have captions" not in r.output  # a label was asked for: nothing to say
