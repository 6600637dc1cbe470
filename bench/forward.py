"""Per-evaluation speed of one compartment model: plain vs channels-last vs torch.compile,
under inference mode, at the batch sizes sparse composition produces. Medians over repeats,
the variants interleaved. Prints JSON, then a table.

    python bench/forward.py [--preset small] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cdm.models.nets import build_unet

from cdm.models.presets import unet_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batches", default="32,250,1000")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    base = build_unet(unet_config(args.preset, 8, 1, 16), 0).to(dev).eval()
    variants = {"plain": base}
    variants["channels_last"] = build_unet(unet_config(args.preset, 8, 1, 16), 0).to(dev).eval().to(
        memory_format=torch.channels_last)
    compile_s = None
    if not args.no_compile:
        t = time.perf_counter()
        try:
            variants["compiled"] = torch.compile(build_unet(unet_config(args.preset, 8, 1, 16), 0).to(dev).eval())
            with torch.inference_mode():
                x = torch.randn(32, 1, 8, 8, device=dev)
                variants["compiled"](x, torch.full((32,), 10, device=dev), class_labels=torch.zeros(32, dtype=torch.long, device=dev))
            compile_s = time.perf_counter() - t
        except Exception as e:  # no compiler toolchain, unsupported backend
            variants.pop("compiled", None)
            compile_s = f"failed: {type(e).__name__}: {str(e)[:200]}"
    out = {"preset": args.preset, "device": args.device, "compile_seconds": compile_s, "images_per_second": {}}
    for b in [int(v) for v in args.batches.split(",")]:
        x = torch.randn(b, 1, 8, 8, device=dev)
        t_ = torch.randint(0, 1000, (b,), device=dev)
        y = torch.randint(0, 10, (b,), device=dev)
        times: dict[str, list[float]] = {k: [] for k in variants}
        with torch.inference_mode():
            for rep in range(args.repeats + 2):
                for name, m in variants.items():
                    xi = x.to(memory_format=torch.channels_last) if name == "channels_last" else x
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    m(xi, t_, class_labels=y)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    if rep >= 2:
                        times[name].append(time.perf_counter() - t0)
        out["images_per_second"][b] = {k: round(b / statistics.median(v), 1) for k, v in times.items()}
    print(json.dumps(out, indent=2))
    names = list(variants)
    print("\n| batch | " + " | ".join(f"{n} img/s" for n in names) + " |\n" + "|---" * (len(names) + 1) + "|")
    for b, r in out["images_per_second"].items():
        print(f"| {b} | " + " | ".join(str(r[n]) for n in names) + " |")


if __name__ == "__main__":
    main()
