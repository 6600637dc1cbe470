"""Crash safety (docs/architecture.md, invariant 5): a real `cdm` process is killed with SIGKILL
during ingest, train and forget; the store must open, hold the old state or the new one
(never a mix, never a file that a forget should have removed), and resume to exactly the
result of an uninterrupted run.

Kill points are either named (`CDM_CRASHPOINT`: the process kills itself there) or observed
from outside (the parent kills the child when a training state file appears).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from cdm.app import api
from cdm.ingest.folders import load_folder
from cdm.store.registry import Store
from cdm.errors import StoreError
from cdm.store.recipes import TrainConfig

from .conftest import TINY_ROUTER, digests

# long enough stages that a kill observed from outside lands mid-training
CRASH = TrainConfig(preset="tiny", steps=60, batch_size=16, warmup=5, checkpoint_every=4)
CLI = [sys.executable, "-c", "from cdm.app.cli import app; app()"]


def run_cdm(args: list[str], crashpoint: str = "", kill_when=None, timeout: float = 180) -> int:
    """Run the CLI in a child process; return its exit code (-9 when killed)."""
    env = dict(os.environ, CDM_CRASHPOINT=crashpoint, OMP_NUM_THREADS=str(torch.get_num_threads()))
    p = subprocess.Popen(CLI + [str(a) for a in args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while p.poll() is None:
        if kill_when is not None and kill_when():
            p.send_signal(signal.SIGKILL)
            break
        if time.monotonic() - t0 > timeout:
            p.kill()
            raise AssertionError(f"cdm {args} did not end within {timeout} s")
        time.sleep(0.002)
    rc = p.wait()
    assert rc in (0, -signal.SIGKILL), p.stderr.read().decode()
    return rc


def _store(path: Path, items, train: bool) -> Store:
    s = api.init_store(path, 8, 1, 0, 2, 16, CRASH, TINY_ROUTER)
    api.ingest(s, "digits", items, "iid:2")
    if train:
        api.train(s, paragon=True)
    return s


def _model_dirs(root: Path) -> dict[str, list[str]]:
    return {d.name: sorted(x.name for x in d.iterdir()) for d in sorted((root / "models").iterdir())}


def _files(root: Path, sub: str) -> set[str]:
    return {str(p.relative_to(root)) for p in (root / sub).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    """A trained store (2 compartments, paragon, router) and a reference trained without one item."""
    base = tmp_path_factory.mktemp("crash")
    items = digits[:48]
    s = _store(base / "trained", items, train=True)
    victim = next(r for r in s.items() if r.slice == 1)
    ref = _store(base / "ref", [d for d in items if d.hash != victim.hash], train=True)
    out = dict(path=base / "trained", items=items, victim=victim, digests=digests(s),
               ref_root=ref.root, ref_digests=digests(ref), ref_ckpts=_files(ref.root, "checkpoints"))
    s.close(), ref.close()
    return out


def test_ingest_killed_after_writing_files_leaves_the_old_state(tmp_path, digits):
    folder = tmp_path / "art"
    for i, it in enumerate(digits[:30]):
        (folder / str(it.label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(it.pixels[..., 0]).save(folder / str(it.label) / f"{i}.png")
    s = api.init_store(tmp_path / "s", 8, 1, 0, 2, 16, CRASH, TINY_ROUTER)
    s.close()
    rc = run_cdm(["ingest", tmp_path / "s", "--source", "art", "--folder", folder, "--split", "iid:2"],
                 crashpoint="ingest:files-written")
    assert rc == -signal.SIGKILL
    assert len(_files(tmp_path / "s", "items")) == 30  # the files were written, the registry not
    s = Store.open(tmp_path / "s")  # opening finishes the killed ingest's cleanup intent
    assert s.items() == [] and s.sources() == {} and s.compartments() == {}
    assert _files(s.root, "items") == set() and s.pending_cleanups() == []
    assert [e["kind"] for e in s.events()][-1] == "recover"
    r = api.ingest(s, "art", load_folder(folder, 8, 1), "iid:2")  # the same ingest, again, succeeds
    assert r.added == 30 and len(_files(s.root, "items")) == 30


@pytest.mark.parametrize("point", ["observed", "install:renamed", "install:committed"])
def test_train_killed_resumes_to_the_uninterrupted_result(tmp_path, trained, point):
    s = _store(tmp_path / "s", trained["items"], train=False)
    s.close()
    watch = tmp_path / "s" / "work" / "digits-1" / "resume.pt"
    rc = run_cdm(["train", tmp_path / "s", "--paragon"], crashpoint="" if point == "observed" else point,
                 kill_when=watch.exists if point == "observed" else None)
    assert rc == -signal.SIGKILL
    s = Store.open(tmp_path / "s")
    live = digests(s)
    want = {"install:renamed": set(), "install:committed": {"digits-0"}, "observed": {"digits-0"}}[point]
    assert set(live) == want  # old state (no model) or new state (installed whole)
    assert all(live[n] == trained["digests"][n] for n in live)
    # a renamed but uncommitted folder, or a half-written one, is removed on open
    assert _model_dirs(s.root) == {n: [s.model(n).path.split("/")[-1]] for n in live}
    for n in live:
        api.load_unet(s, n)  # the installed model opens and matches its digest
    results = {r.name: r for r in api.train(s, paragon=True)}
    assert digests(s) == trained["digests"]
    if point == "observed":
        assert results["digits-1"].resumed_from.startswith(("step", "stage"))


@pytest.mark.parametrize("point", ["forget:committed", "forget:cleaned", "observed"])
def test_forget_killed_leaves_nothing_of_the_item_and_resumes_exactly(tmp_path, trained, point):
    root = tmp_path / "s"
    shutil.copytree(trained["path"], root)
    v = trained["victim"]
    watch = root / "work" / v.compartment / "resume.pt"
    rc = run_cdm(["forget", root, "--item", v.hash], crashpoint="" if point == "observed" else point,
                 kill_when=watch.exists if point == "observed" else None)
    assert rc == -signal.SIGKILL
    s = Store.open(root)
    assert v.hash not in {r.hash for r in s.items()} and not s.item_path(v.hash).exists()
    assert s.pending_cleanups() == []
    live = digests(s)
    assert not {v.compartment, "paragon", "router"} & set(live)  # every model that saw the item is gone
    assert live == {c: d for c, d in trained["digests"].items() if c not in (v.compartment, "paragon", "router")}
    assert _files(root, "checkpoints") <= trained["ref_ckpts"]  # no checkpoint that saw the item survives
    assert not list((root / "work").glob("*/resume.pt")) or point == "observed"
    results = {r.name: r for r in api.train(s, paragon=True)}
    assert digests(s) == trained["ref_digests"]
    assert results[v.compartment].resumed_from != "scratch"  # from the slice-0 checkpoint or later
    assert "forget" in [e["kind"] for e in s.events()]


def test_second_writer_is_refused_with_the_holder_named(tmp_path, digits):
    s = api.init_store(tmp_path / "s", 8, 1, 0, 2, 16, CRASH, TINY_ROUTER)
    other = Store.open(tmp_path / "s")
    with s.writing("cdm train"):
        with pytest.raises(StoreError, match=r"busy: cdm train \(pid \d+"):
            with other.writing("ingest", wait=0.1):
                pass
    with other.writing("ingest", wait=0.1):  # free again once the holder is done
        pass


@pytest.mark.parametrize("command,point", [("text", "text:installed"), ("unet", "install:renamed"),
                                           ("unet", "install:committed"), ("sd", "install:renamed"),
                                           ("sd", "install:committed")])
def test_text_and_base_imports_killed_are_old_or_new_and_resume(tmp_path, digits, command, point):
    """`cdm text`, `cdm adapters --base-from UNET_DIR` and `--base-from SD_DIR` (cdm.training.sd): the
    settings and the files they need are all live or none is."""
    from cdm.models.nets import build_unet
    from cdm.models.presets import unet_config

    from .test_sd import SD_TRAIN, squares, tiny_sd_folder

    def store(path):
        if command != "sd":
            return _store(path, digits[:20], False)
        s = api.init_store(path, 16, 3, 0, 2, 16, SD_TRAIN)
        api.ingest(s, "ann", squares(0, 6), "one")
        return s

    if command == "text":
        apply, args = api.set_text, ["text"]
    else:
        folder = tiny_sd_folder(tmp_path / "sd") if command == "sd" else tmp_path / "unet"
        if command == "unet":
            build_unet(unet_config("tiny", 8, 1, 16), 7).save_pretrained(folder)
        apply, args = (lambda s: api.set_adapters(s, base_from=folder)), ["adapters", "--base-from", folder]

    def state(s):
        return (api.adapter_config(s), api.text_config(s), api.latent_config(s), s.model("base"))

    ref, s = store(tmp_path / "ref"), store(tmp_path / "s")
    apply(ref)
    s.close()
    assert run_cdm(args[:1] + [tmp_path / "s"] + args[1:], crashpoint=point) == -signal.SIGKILL
    s = Store.open(tmp_path / "s")
    live = [x is not None for x in state(ref)]  # what the command sets
    if point == "install:committed":  # the new settings, whole
        assert [x is not None for x in state(s)] == live
    else:  # the old store: nothing of the command is live
        assert state(s) == (None, None, None, None)
    apply(s)  # running it again ends where an uninterrupted run ends
    assert api.adapter_config(s) == api.adapter_config(ref) and api.text_config(s) == api.text_config(ref)
    assert api.latent_config(s) == api.latent_config(ref) and digests(s) == digests(ref)
    assert not list(s.root.glob(".tmp-*"))
    if api.text_config(s) is not None:  # one encoder folder, the one the setting names
        assert [p.name for p in (s.root / "text").iterdir()] == [api.text_config(s).digest]
    if s.model("base") is not None:  # one base folder, the live one
        assert [p.name for p in (s.root / "models" / "base").iterdir()] == [s.model("base").path.split("/")[-1]]
