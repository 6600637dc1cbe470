"""A fixed end-to-end scenario through the `cdm` command, reduced to a manifest of hashes of
everything a user sees. A refactor that changes nothing a user sees leaves it identical.

    python bench/scenario.py --out bench-work/scenario                 # run, print the manifest
    python bench/scenario.py --out bench-work/scenario --check bench/results/scenario-reference.json

It covers a store with an `iid:4` and a `by-class:2` source, the paragon and the classifier
router, an adapter store (merged, loop and joint), samples with every router, guidance on
and off, dense and each sparse setting, a policy-restricted user, one forgotten item, and
`cdm status --json`, `cdm eval --json`, `cdm audit --json`. Recorded: model digests,
checkpoint file names, sample PNG bytes, attribution JSON, and the JSON outputs with their
timings and timestamps removed. It runs every command with one torch thread. Bit-identity
holds on one machine; other CPUs may round differently.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cdm.store.data import load_builtin
from cdm.sampling.policy import new_key
from cdm.store.registry import Store

VOLATILE = ("seconds", "time", "actor", "created", "trained", "added", "per_s")  # vary run to run


def strip(obj):
    """Drop timings and timestamps, recursively."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if not any(w in k for w in VOLATILE)}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


class Scenario:
    def __init__(self, work: Path):
        self.work, self.manifest = work, {}
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}

    def cdm(self, *args) -> str:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "cdm", *map(str, args)], cwd=self.work, env=self.env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"cdm {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        print(f"  {time.perf_counter() - t:6.1f} s  cdm {' '.join(map(str, args))}", file=sys.stderr)
        return r.stdout

    def record_json(self, name: str, text: str) -> dict:
        obj = strip(json.loads(text))
        self.manifest[name] = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
        (self.work / "records").mkdir(exist_ok=True)
        (self.work / "records" / f"{name}.json").write_text(json.dumps(obj, indent=1, sort_keys=True))
        return obj

    def record_files(self, name: str, folder: Path) -> None:
        h = hashlib.sha256()
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes())
        self.manifest[name] = h.hexdigest()

    def record_store(self, name: str, store: str) -> None:
        with Store.open(self.work / store) as s:
            models = {n: r.digest for n, r in sorted(s.models().items())}
            ckpt = self.work / store / "checkpoints"
            names = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()) if ckpt.exists() else []
        self.record_json(f"{name}.models", json.dumps(models))
        self.record_json(f"{name}.checkpoints", json.dumps(names))

    def sample(self, name: str, store: str, *args) -> None:
        out = self.work / "samples" / name
        shutil.rmtree(out, ignore_errors=True)
        self.record_json(f"sample.{name}", self.cdm("sample", store, "--out", out.relative_to(self.work), "--json",
                                                    *args))
        self.record_files(f"sample.{name}.png", out)


def museum_folder(path: Path) -> None:
    """A second owner: 200 digits of the training split, mirrored (new items, same labels)."""
    for i, it in enumerate(load_builtin("digits")[:200]):
        d = path / it.label
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(it.pixels[:, ::-1, 0])).save(d / f"{i:04d}.png")


def run(work: Path) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sc = Scenario(work)
    museum_folder(work / "museum")
    _, digest = new_key()
    (work / "policy.toml").write_text(f'[users.alice]\nsources = ["museum"]\nrouters = ["ito", "uniform"]\n'
                                      f'keys = ["{digest}"]\n[users.bob]\ncompartments = ["digits-0", "digits-2"]\n')

    # a store with two sources, the paragon and the classifier router
    sc.cdm("init", "store", "--preset", "tiny", "--slices", "2")
    sc.record_json("ingest.digits", sc.cdm("ingest", "store", "--source", "digits", "--builtin", "digits",
                                           "--split", "iid:4", "--json"))
    sc.record_json("ingest.museum", sc.cdm("ingest", "store", "--source", "museum", "--folder", "museum",
                                           "--split", "by-class:2", "--json"))
    sc.record_json("train", sc.cdm("train", "store", "--paragon", "--steps", "30", "--json"))
    sc.record_store("store", "store")
    sc.cdm("policy", "store", "--set", "policy.toml")

    common = ("-n", "6", "--steps", "8", "--seed", "3")
    for router in ("ito", "classifier", "uniform"):
        for guidance in ("1", "2"):
            sc.sample(f"{router}.g{guidance}", "store", *common, "--label", "3", "--router", router,
                      "--guidance", guidance)
    sc.sample("ito.uncond", "store", *common, "--guidance", "1")
    sc.sample("classifier.ddim", "store", *common, "--label", "5", "--router", "classifier", "--sampler", "ddim")
    for name, sparse in [("prune5", ("--prune", "5")), ("commit0", ("--commit", "0")),
                         ("commit0.5", ("--commit", "0.5")), ("subset2", ("--subset", "2")),
                         ("subset2.commit0.5", ("--subset", "2", "--commit", "0.5"))]:
        for guidance in ("1", "2"):
            sc.sample(f"ito.{name}.g{guidance}", "store", *common, "--label", "7", "--guidance", guidance, *sparse)
    sc.sample("allow", "store", *common, "--label", "1", "--allow", "digits-1,museum-0")
    sc.sample("user.alice", "store", *common, "--label", "4", "--user", "alice")
    sc.sample("user.bob", "store", *common, "--label", "4", "--user", "bob", "--router", "classifier")
    sc.sample("paragon", "store", *common, "--label", "2", "--paragon")
    sc.record_json("status", sc.cdm("status", "store", "--json"))
    sc.record_json("eval", sc.cdm("eval", "store", "--samples", "60", "--steps", "6", "--router", "ito",
                                  "--router", "classifier", "--router", "uniform", "--json"))

    # forget one item: only its compartment, the paragon and the router retrain
    with Store.open(work / "store") as s:
        victim = s.items("digits-2")[0].hash
    sc.record_json("forget", sc.cdm("forget", "store", "--item", victim, "--json"))
    sc.record_store("store.after-forget", "store")
    sc.sample("after-forget.ito.g2", "store", *common, "--label", "3", "--guidance", "2")
    sc.sample("after-forget.classifier", "store", *common, "--label", "3", "--router", "classifier")
    sc.record_json("status.after-forget", sc.cdm("status", "store", "--json"))
    sc.record_json("audit", sc.cdm("audit", "store", "--json"))

    # an adapter store: a public base, LoRA compartments, each sampling mode
    sc.cdm("init", "astore", "--preset", "tiny", "--slices", "2")
    sc.cdm("ingest", "astore", "--source", "public", "--builtin", "digits", "--split", "one")
    sc.cdm("ingest", "astore", "--source", "museum", "--folder", "museum", "--split", "iid:2")
    sc.cdm("adapters", "astore", "--public", "public", "--rank", "4")
    sc.record_json("adapters.train", sc.cdm("train", "astore", "--steps", "20", "--json"))
    sc.record_store("astore", "astore")
    for mode in ("merged", "loop", "joint"):
        sc.sample(f"adapters.{mode}", "astore", *common, "--label", "6", "--adapter-mode", mode)
    with Store.open(work / "astore") as s:
        victim = s.items("museum-1")[0].hash
    sc.record_json("adapters.forget", sc.cdm("forget", "astore", "--item", victim, "--json"))
    sc.record_store("astore.after-forget", "astore")
    sc.sample("adapters.after-forget", "astore", *common, "--label", "6")
    sc.record_json("adapters.status", sc.cdm("status", "astore", "--json"))
    return sc.manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-work/scenario"))
    ap.add_argument("--check", type=Path, default=None, help="a reference manifest: exit 1 on any difference")
    args = ap.parse_args()
    t0 = time.perf_counter()
    manifest = run(args.out.resolve())
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(json.dumps(dict(entries=len(manifest), seconds=round(time.perf_counter() - t0, 1),
                          manifest=str(args.out / "manifest.json")), indent=1))
    if args.check is not None:
        ref = json.loads(args.check.read_text())
        diff = sorted(k for k in set(ref) | set(manifest) if ref.get(k) != manifest.get(k))
        for k in diff:
            print(f"differs: {k} (records/{k}.json)" if k in manifest else f"missing: {k}")
        print(f"{len(ref) - len(diff)} of {len(ref)} entries identical")
        sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
