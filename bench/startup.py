"""Start-up cost of the light commands against `python -c pass`, side by side in one run.

    python bench/startup.py                      # this checkout
    python bench/startup.py --base /path/to/src  # also another checkout's src/, interleaved

Each command runs `--repeats` times, interleaved with the baseline; medians are reported in
seconds and as ratios to `python -c pass`. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {"--help": ["--help"], "key": ["key", "--user", "a"], "status": ["status", "{store}"],
            "items": ["items", "{store}"], "audit": ["audit", "{store}"], "policy": ["policy", "{store}"]}


def timed(args: list[str], src: str | None) -> float:
    env = {**os.environ, **({"PYTHONPATH": src} if src else {})}
    t = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--base", default=None, help="another checkout's src/ folder, timed beside this one")
    args = ap.parse_args()
    store = Path(tempfile.mkdtemp()) / "s"
    subprocess.run([sys.executable, "-m", "cdm", "init", str(store)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "cdm", "ingest", str(store), "--source", "d", "--builtin", "digits",
                    "--split", "iid:2"], check=True, stdout=subprocess.DEVNULL)
    trees = {"this": None, **({"base": args.base} if args.base else {})}
    times: dict = {"python -c pass": []}
    for _ in range(args.repeats):
        times["python -c pass"].append(timed([sys.executable, "-c", "pass"], None))
        for tree, src in trees.items():
            for name, cmd in COMMANDS.items():
                run = [sys.executable, "-m", "cdm" if tree == "this" else "cdm.cli",
                       *(a.format(store=store) for a in cmd)]
                times.setdefault(f"{tree}: cdm {name}", []).append(timed(run, src))
    base = statistics.median(times["python -c pass"])
    out = {k: dict(median_s=round(statistics.median(v), 3), vs_python=round(statistics.median(v) / base, 1))
           for k, v in times.items()}
    print(json.dumps(dict(repeats=args.repeats, results=out), indent=1))


if __name__ == "__main__":
    main()
