"""Many LoRA compartments in one base call (issue 28): one eps evaluation of K adapter
compartments at n rows each, side by side in one process, interleaved, median of repeats:

- paragon: the base alone on n rows (the cost of one model);
- merged: K plain UNets (each adapter folded into its own copy of the base), K calls of n rows;
- bank: `AdapterBank`, one call of the shared base on n x K rows, each row adding its own
  adapter's low-rank delta (what adapter modes `loop` and `joint` run), and the same in
  calls of at most 32 rows (on a CPU a large batch runs slower per row: cache);
- peft mixed batch: the same one call through peft's `adapter_names` (cdm's joint mode before).

Random adapters (timing does not depend on training); the bank is checked against merged.
Also reports parameter memory: K bases for merged, one base plus K adapters for the bank.

    python bench/many_lora.py                     # medium preset, 32 px RGB, K = 8, n = 4 and 32
    python bench/many_lora.py --quick             # small preset, 8 px, K = 4
    python bench/many_lora.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from common import emit, median_time

from cdm.models.adapters import AdapterBank, lora_config, merged
from cdm.models.nets import build_unet
from cdm.models.presets import unet_config
from cdm.store.recipes import AdapterConfig


def random_adapter(base, recipe: dict, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA adapter's weights (peft's state-dict keys) with random A and B."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    unet = copy.deepcopy(base)
    inject_adapter_in_model(lora_config(recipe), unet, adapter_name="a")
    gen = torch.Generator().manual_seed(seed)
    state = get_peft_model_state_dict(unet, adapter_name="a")
    return {k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def peft_mixed(base, recipe: dict, states: dict[str, dict]):
    """cdm's former joint call: every adapter injected with peft, rows routed by `adapter_names`."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    unet = copy.deepcopy(base)
    for name, st in states.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            inject_adapter_in_model(lora_config(recipe), unet, adapter_name=name)
        set_peft_model_state_dict(unet, st, adapter_name=name)
    unet.eval().requires_grad_(False)
    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]

    def call(x, t, y, names):
        hooks = [m.register_forward_pre_hook(lambda mod, a, kw: (a, {**kw, "adapter_names": names}), with_kwargs=True)
                 for m in layers]
        try:
            return unet(x, t, class_labels=y).sample
        finally:
            for h in hooks:
                h.remove()

    return call


def params_mb(*modules) -> float:
    seen = {id(p): p for m in modules for p in [*m.parameters(), *m.buffers()]}
    return round(sum(p.numel() * p.element_size() for p in seen.values()) / 2**20, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--k", type=int, default=None, help="adapter compartments (default 8; quick 4)")
    ap.add_argument("--n", type=int, nargs="+", default=None, help="rows per compartment (default 4 32; quick 4)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=None, help="default 5; quick 3")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    k, ns, repeats = args.k or (4 if args.quick else 8), args.n or ([4] if args.quick else [4, 32]), \
        args.repeats or (3 if args.quick else 5)
    preset, size, ch = ("small", 8, 1) if args.quick else ("medium", 32, 3)
    base = build_unet(unet_config(preset, size, ch, 16), seed=0).eval().requires_grad_(False)
    recipe = AdapterConfig(rank=args.rank, public=("public",)).recipe()
    states = {f"c{i}": random_adapter(base, recipe, i) for i in range(k)}
    dev = torch.device(args.device)
    base = base.to(dev)
    bank = AdapterBank(base, {n: (recipe, st) for n, st in states.items()})
    chunked = AdapterBank(base, {n: (recipe, st) for n, st in states.items()}, rows_per_call=32)
    plain = [merged(base, recipe, st).to(dev) for st in states.values()]
    mixed = peft_mixed(base, recipe, states)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    results, rows = [], []
    for n in ns:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(n, ch, size, size, generator=gen).to(dev)
        t, y = torch.full((n,), 500, device=dev), torch.randint(0, 10, (n,), generator=gen).to(dev)
        xk, tk, yk = x.repeat(k, 1, 1, 1), t.repeat(k), y.repeat(k)
        names = [c for c in states for _ in range(n)]

        def run(fn):
            def timed():
                with torch.inference_mode():
                    fn()
                sync()
            return timed

        calls = {
            "paragon (one model, n rows)": run(lambda: base(x, t, class_labels=y)),
            "merged (K calls of n rows)": run(lambda: [m(x, t, class_labels=y) for m in plain]),
            "bank (one call of n x K rows)": run(lambda: bank.forward(xk, tk, yk, names)),
            "bank (calls of at most 32 rows)": run(lambda: chunked.forward(xk, tk, yk, names)),
            "peft mixed batch (one call)": run(lambda: mixed(xk, tk, yk, names)),
        }
        with torch.inference_mode():
            want = torch.cat([m(x, t, class_labels=y).sample for m in plain])
            diff = float((bank.forward(xk, tk, yk, names) - want).abs().max())
        for fn in calls.values():
            fn()  # warm
        times = {name: [] for name in calls}
        for _ in range(repeats):  # interleaved: each repeat times every variant once
            for name, fn in calls.items():
                times[name].append(median_time(fn, 1)[0])
        med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
        p = med["paragon (one model, n rows)"]
        for name, s in med.items():
            results.append(dict(n=n, config=name, seconds=round(s, 4), vs_paragon=round(s / p, 2)))
            rows.append([n, name, f"{s * 1000:.1f}", f"{s / p:.2f}"])
        results.append(dict(n=n, config="bank vs merged, max abs difference", value=diff))
    out = dict(preset=preset, image_size=size, channels=ch, k=k, rank=args.rank, repeats=repeats, device=args.device,
               threads=torch.get_num_threads(), results=results,
               memory_mb=dict(paragon=params_mb(base), merged=params_mb(*plain), bank=params_mb(bank.unet)))
    emit(out, f"One eps evaluation of K = {k} LoRA compartments ({preset}, {size} px, rank {args.rank}, "
              f"{args.device}), median of {repeats}; memory (MB of parameters): paragon "
              f"{out['memory_mb']['paragon']}, merged {out['memory_mb']['merged']}, bank {out['memory_mb']['bank']}",
         ["n", "config", "ms", "vs paragon"], rows)


if __name__ == "__main__":
    main()
