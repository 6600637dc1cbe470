"""The GPU tier (issue 28): composition, bit-exact forgetting, precision and many-LoRA on
`cuda`, skipped without a CUDA device; and `bench/gpu.py --quick`, which runs everywhere.

Not yet run on a GPU: the project's machines have none (docs/gpu.md says what is pending).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cdm.app import api
from cdm.training.forget import forget

from .conftest import digests, make_store

BENCH = Path(__file__).resolve().parents[1] / "bench"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_the_gpu_bench_runs_quick_on_a_cpu(tmp_path):
    r = subprocess.run([sys.executable, "gpu.py", "--quick", "--work", str(tmp_path)], cwd=BENCH,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    for k in (2, 3):
        for n in ("n=1", "n=4"):
            row = out[f"sd_K{k}"][n]
            assert row["paragon"]["vs_paragon"] == 1.0
            assert {"one compartment", f"dense K={k}", f"commit0 K={k}", f"many-LoRA dense K={k}"} <= set(row)
            assert all(v["seconds"] > 0 for name, v in row.items() if name != "peak_gpu_gb")
    assert set(out["training_steps_per_s"]) >= {"fp32", "bf16"} and out["training_steps_per_s"]["fp32"] > 0
    assert set(out["digits_8x8"]) == {"n=4", "n=16"}


@pytest.mark.gpu
@cuda
def test_training_twice_on_cuda_gives_the_same_digest_and_forgetting_is_exact(tmp_path, digits):
    items = digits[:60]
    runs = [make_store(tmp_path / f"s{i}", items, "iid:2") for i in range(2)]
    for s in runs:
        api.train(s, paragon=True, device="cuda")
    assert api.train_config(runs[0]).precision == "bf16"  # auto on CUDA, recorded
    assert digests(runs[0]) == digests(runs[1])
    victim = runs[0].items("digits-0")[0]
    forget(runs[0], items=[victim.hash], device="cuda")
    ref = make_store(tmp_path / "ref", [it for it in items if it.hash != victim.hash], "iid:2")
    api.train(ref, paragon=True, device="cuda")
    assert digests(runs[0]) == digests(ref)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_composition_on_cuda_is_repeatable_at_each_precision(tmp_path, digits, precision):
    s = make_store(tmp_path / "s", digits[:60], "iid:2")
    api.train(s, device="cuda", precision="fp32")
    kw = dict(n=4, label="3", steps=4, seed=1, device="cuda", precision=precision)
    a, b = api.sample(s, **kw), api.sample(s, **kw)
    assert np.array_equal(a.images, b.images) and np.allclose(a.attribution.sum(axis=1), 1.0)
    cpu = api.sample(s, 4, "3", steps=4, seed=1)
    assert np.abs(a.images.astype(int) - cpu.images.astype(int)).mean() < 16


@pytest.mark.gpu
@cuda
def test_many_lora_on_cuda_equals_merged(tmp_path, digits):
    from .test_adapters import adapter_store

    s = adapter_store(tmp_path / "s", digits[:100])
    api.train(s, device="cuda", precision="fp32")
    kw = dict(n=4, label="3", steps=3, seed=4, device="cuda", precision="fp32")
    joint, merged = api.sample(s, adapter_mode="joint", **kw), api.sample(s, **kw)
    assert np.abs(joint.images.astype(int) - merged.images.astype(int)).max() <= 2
    assert np.abs(joint.attribution - merged.attribution).max() < 1e-3
