"""Time to forget one item (first, middle, last slice) vs retraining its compartment and the
paragon from scratch, side by side on copies of one trained store. Prints JSON and a table.

    python bench/forget.py --store cdm-demo/store          # a store trained by `cdm demo`
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from cdm import api
from cdm.protect import forget
from cdm.store import PARAGON, Store


def scratch(store: Store, name: str) -> float:
    shutil.rmtree(store.root / "checkpoints" / name, ignore_errors=True)
    t = time.perf_counter()
    api.run_job(store, api.build_job(store, name))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, required=True, help="a trained store (with paragon); it is copied, not changed")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    src = Store.open(args.store)
    slices = src.config.slices
    comp = sorted(src.compartments())[0]
    rows = src.items(comp)
    src.close()
    positions = {"first": 0, "middle": slices // 2, "last": slices - 1}
    out: dict = {"store": str(args.store), "compartment": comp, "slices": slices, "steps": None, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for pos, k in positions.items():
                victim = next(r.hash for r in rows if r.slice == k)
                dst = Path(tmp) / f"{pos}-{rep}"
                shutil.copytree(args.store, dst)
                s = Store.open(dst)
                out["steps"] = api.train_config(s).steps
                res = forget(s, items=[victim])
                per = {x["name"]: x["seconds"] for x in res.retrained}
                out["runs"].setdefault(f"forget {pos} slice (compartment)", []).append(per[comp])
                out["runs"].setdefault(f"forget {pos} slice (whole call)", []).append(res.seconds)
                if rep == 0 and pos == "first":
                    out["runs"].setdefault("retrain compartment from scratch", []).append(scratch(s, comp))
                    out["runs"].setdefault("retrain paragon from scratch", []).append(scratch(s, PARAGON))
                s.close()
                shutil.rmtree(dst)
    med = {k: statistics.median(v) for k, v in out["runs"].items()}
    par = med["retrain paragon from scratch"]
    out["median_seconds"] = {k: round(v, 2) for k, v in med.items()}
    out["speedup_vs_paragon"] = {k: round(par / v, 2) for k, v in med.items()}
    print(json.dumps(out, indent=2))
    print("\n| what | median s | paragon / this |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} | {par / v:.2f} |")


if __name__ == "__main__":
    main()
