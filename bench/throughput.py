"""Training throughput per model preset: steps/s, FLOPs per step, GFLOP/s, and the share of the
machine's matmul peak measured in the same run. Prints JSON, then a table.

    python bench/throughput.py                       # 32x32 RGB, batch 64, this machine's CPU threads
    python bench/throughput.py --device cuda         # the same on a GPU (add --presets base,large)
    python bench/throughput.py --quick               # one repeat, for CI

A step is one AdamW step of the class-conditional UNet (forward, backward, update) at the
store's batch size, timed after a warm-up; FLOPs come from torch.utils.flop_counter. The peak
is the median rate of a square fp32 matmul, timed beside the presets in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cdm.models.nets import build_unet

from cdm.models.presets import PRESETS, unet_config


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, n: int, repeats: int) -> float:
    """GFLOP/s of an n x n fp32 matmul (median of repeats)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    rates = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        rates.append(5 * 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return statistics.median(rates)


def preset_rate(preset: str, size: int, channels: int, batch: int, device: str, steps: int, repeats: int) -> dict:
    model = build_unet(unet_config(preset, size, channels, 16), 0).to(device)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, 17, (batch,), generator=g).to(device)

    def step():
        loss = (model(x, t, class_labels=y).sample - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    step()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        times.append((time.perf_counter() - t0) / steps)
    sec = statistics.median(times)
    return dict(params=sum(p.numel() for p in model.parameters()), gflop_per_step=round(flops / 1e9, 2),
                steps_per_s=round(1 / sec, 3), gflop_per_s=round(flops / sec / 1e9, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="small,medium,base")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, steps = (1, 2) if args.quick else (5, 3)
    unknown = [p for p in args.presets.split(",") if p not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown preset(s) {', '.join(unknown)}; available: {', '.join(PRESETS)}")
    peak = matmul_peak(args.device, 1024 if args.quick else 2048, repeats)
    rows = {p: preset_rate(p, args.size, args.channels, args.batch, args.device, steps, repeats)
            for p in args.presets.split(",")}
    for r in rows.values():
        r["share_of_matmul_peak"] = round(r["gflop_per_s"] / peak, 3)
    out = dict(device=args.device, threads=torch.get_num_threads(), size=args.size, channels=args.channels,
               batch=args.batch, matmul_peak_gflop_per_s=round(peak, 1), presets=rows)
    print(json.dumps(out, indent=2))
    print(f"\n{args.size}x{args.size}x{args.channels}, batch {args.batch}, {args.device}, "
          f"{torch.get_num_threads()} threads; matmul peak {peak:.0f} GFLOP/s\n")
    print("| preset | params | GFLOP/step | steps/s | GFLOP/s | share of peak |\n|---|---|---|---|---|---|")
    for p, r in rows.items():
        print(f"| {p} | {r['params'] / 1e6:.2f}M | {r['gflop_per_step']} | {r['steps_per_s']} | {r['gflop_per_s']} | "
              f"{r['share_of_matmul_peak']:.2f} |")


if __name__ == "__main__":
    main()
