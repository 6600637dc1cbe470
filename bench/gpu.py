"""cdm on a GPU, in one script and one JSON (issue 28): Stable-Diffusion-sized LoRA
compartments composed against the paragon, training speed per precision, the 8x8
interactive figures, and peak GPU memory. Meant to fit 8 minutes on one H200.

    python bench/gpu.py --device cuda          # SD-1.5-shaped random weights, 512 px
    python bench/gpu.py --quick                # tiny sizes on a CPU, K = 2 and 3 (the test suite runs this)

1. A random folder shaped like SD 1.5 (UNet2DConditionModel with diffusers' block sizes and
   cross-attention width 768, SD's VAE, cdm's data-free encoder at width 768, 12 layers),
   written with `StableDiffusionPipeline.save_pretrained`; --quick: a tiny one.
2. Stores of 2 and 8 captioned owners imported onto it as LoRA compartments (rank 8), trained
   a few steps with the paragon. Side by side, warm, median of repeats, n = 1 and 4 images,
   `--steps` steps, guidance 7.5: the SD UNet alone (the reference, "paragon"), cdm's paragon
   (a model of the store's preset, much smaller), one compartment, dense K (merged adapters),
   commit 0 at K, and many-LoRA K (adapter mode joint: one base call, cdm.models.adapters).
3. Training steps/s of the `base` preset at 32 px RGB, batch 512, per precision (fp32, tf32
   on CUDA, bf16), through cdm.models.precision.
4. The 8x8 digits figures: paragon, dense CDM-8 and commit 0 at n = 4 and n = 250, 10 steps.
Every timing is a ratio against the paragon measured in the same run. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import console, digits_store, train

from cdm.app import api
from cdm.models.nets import build_unet
from cdm.models.precision import precision as at_precision
from cdm.models.presets import unet_config
from cdm.sampling.pipeline import CDMPipeline
from cdm.sampling.settings import SamplingSettings
from cdm.store.data import Item, load_builtin
from cdm.store.recipes import RouterConfig, TrainConfig
from cdm.models.random_sd import random_folder


COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (220, 220, 30)}


def owner_items(owner: int, n: int, size: int) -> list[Item]:
    """Captioned squares of one owner's colours (owners differ in what they hold)."""
    rng, out = np.random.RandomState(owner), []
    for i in range(n):
        name = list(COLOURS)[(i + owner) % len(COLOURS)]
        px = np.clip(np.array(COLOURS[name])[None, None] + rng.randint(-20, 20, (size, size, 3)), 0, 255)
        out.append(Item(px.astype(np.uint8), None, f"owner{owner}/{i}.png", f"a {name} square"))
    return out


def lora_store(path: Path, folder: Path, k: int, args) -> api.Store:
    size = 16 if args.quick else 512
    s = api.init_store(path, size, 3, 0, 2, 16, TrainConfig(preset="tiny", steps=args.train_steps, batch_size=4,
                                                            warmup=1, lr=1e-4, checkpoint_every=1000),
                       RouterConfig(steps=2, batch_size=8, warmup=1))
    for o in range(k):
        api.ingest(s, f"owner{o}", owner_items(o, 2 if args.quick else 4, size), "one")
    api.set_adapters(s, base_from=folder, rank=8)
    api.train(s, paragon=True, device=args.device, precision="fp32")
    return s


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def side_by_side(calls: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each call, warm, interleaved within each repeat."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def ratios(med: dict[str, float], base: str) -> dict:
    return {name: dict(seconds=round(s, 4), vs_paragon=round(s / med[base], 2)) for name, s in med.items()}


def peak_reset(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.device(device).type == "cuda" else None


def base_alone(store, device: str) -> CDMPipeline:
    """The imported SD UNet alone, as one model: the reference for the compartments' cost. (cdm's
    own paragon in such a store is a model of the store's preset, far smaller than SD's UNet.)"""
    import copy

    from cdm.models.denoisers import unet_denoiser

    pipe = copy.copy(CDMPipeline.from_store(store, paragon=True, device=device))
    pipe.names, pipe.denoisers = ["base"], [unet_denoiser(api.load_unet(store, "base", device))]
    return pipe


def params(store, name: str) -> int:
    return sum(p.numel() for p in api.load_unet(store, name).parameters())


def composition(store, k: int, args) -> dict:
    names = sorted(store.compartments())
    pipes = {"paragon": (base_alone(store, args.device), {}),
             "cdm paragon (store preset)": (CDMPipeline.from_store(store, paragon=True, device=args.device), {}),
             "one compartment": (CDMPipeline.from_store(store, names[:1], device=args.device), {}),
             f"dense K={k}": (CDMPipeline.from_store(store, device=args.device), {}),
             f"commit0 K={k}": (CDMPipeline.from_store(store, device=args.device), {"commit": 0.0}),
             f"many-LoRA dense K={k}": (CDMPipeline.from_store(store, adapter_mode="joint", device=args.device), {})}
    out = {}
    for n in (1, 4):
        peak_reset(args.device)
        calls = {name: (lambda p=p, kw=kw: p(n, settings=SamplingSettings(steps=args.steps, guidance=7.5, seed=0,
                                                                          precision="fp32", **kw),
                                             prompt="a red square"))
                 for name, (p, kw) in pipes.items()}
        out[f"n={n}"] = ratios(side_by_side(calls, args.repeats, args.device), "paragon")
        out[f"n={n}"]["peak_gpu_gb"] = peak_gb(args.device)
    out["parameters"] = dict(base=params(store, "base"), cdm_paragon=params(store, "paragon"))
    return out


def training_speed(args) -> dict:
    """Steps/s of the diffusion loss on the `base` preset (quick: tiny at 8 px) per precision."""
    size, batch, preset = (8, 16, "tiny") if args.quick else (32, 512, "base")
    dev = torch.device(args.device)
    out = {}
    for prec in ("fp32", "tf32", "bf16") if dev.type == "cuda" else ("fp32", "bf16"):
        model = build_unet(unet_config(preset, size, 3, 16), seed=0).to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(batch, 3, size, size, device=dev)
        y = torch.randint(0, 16, (batch,), device=dev)
        t = torch.randint(0, 1000, (batch,), device=dev)

        def step():
            with at_precision(prec, dev):
                loss = torch.nn.functional.mse_loss(model(x, t, class_labels=y).sample.float(), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(2):
            step()
        sync(args.device)
        n = args.train_bench_steps
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync(args.device)
        out[prec] = round(n / (time.perf_counter() - t0), 2)
    out["batch"], out["preset"], out["image_size"] = batch, preset, size
    return out


def digits_figures(work: Path, args) -> dict:
    """The 8x8 figures: CDM-8 of the small preset against the paragon, 10 steps (quick: 200 items,
    tiny preset, n = 4 and 16)."""
    recipe = TrainConfig(preset="tiny" if args.quick else "small", steps=1)
    if args.quick:
        s = api.init_store(work / "digits", 8, 1, 0, 2, 16, recipe, RouterConfig(steps=1))
        api.ingest(s, "digits", load_builtin("digits")[:200], "iid:8")
    else:
        s = digits_store(work / "digits", "iid:8", recipe, RouterConfig(steps=1))
    train(s, paragon=True, device=args.device)
    sizes = (4, 16) if args.quick else (4, 250)
    labels = [str(i % 10) for i in range(max(sizes))]
    out = {}
    for n in sizes:
        pipes = {"paragon": (CDMPipeline.from_store(s, paragon=True, device=args.device), {}),
                 "dense K=8": (CDMPipeline.from_store(s, device=args.device), {}),
                 "commit0 K=8": (CDMPipeline.from_store(s, device=args.device), {"commit": 0.0})}
        calls = {name: (lambda p=p, kw=kw: p(n, labels[:n], SamplingSettings(steps=10, guidance=2.0, seed=0,
                                                                              precision="fp32", **kw)))
                 for name, (p, kw) in pipes.items()}
        out[f"n={n}"] = ratios(side_by_side(calls, args.repeats, args.device), "paragon")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; quick 2)")
    ap.add_argument("--repeats", type=int, default=None, help="default 3; quick 1")
    args = ap.parse_args()
    args.steps = args.steps or (2 if args.quick else 20)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.train_steps = 2 if args.quick else 10
    args.train_bench_steps = 3 if args.quick else 20
    work = args.work or Path(tempfile.mkdtemp(prefix="cdm-gpu-bench-"))
    t0 = time.perf_counter()
    out: dict = dict(device=args.device, quick=args.quick, torch=torch.__version__,
                     gpu=torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else None)
    console.print("building the random SD folder")
    folder = random_folder(work / "sd", "tiny" if args.quick else "sd-1.5")
    for k in (2, 3) if args.quick else (2, 8):
        console.print(f"LoRA store of {k} owners")
        peak_reset(args.device)
        store = lora_store(work / f"lora-{k}", folder, k, args)
        out[f"train_lora_K{k}_peak_gpu_gb"] = peak_gb(args.device)
        out[f"sd_K{k}"] = composition(store, k, args)
        store.close()
    console.print("training speed per precision")
    out["training_steps_per_s"] = training_speed(args)
    console.print("8x8 digits")
    out["digits_8x8"] = digits_figures(work, args)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
