"""The arithmetic of model calls: fp32, tf32 (CUDA matmuls and convolutions on TF32 tensor
cores) or bf16 (autocast: matmuls and convolutions in bfloat16, master weights and the
optimiser in fp32). `auto` is bf16 on CUDA and fp32 on a CPU; a store records what its
training used (cdm.store.recipes.TrainConfig.precision), because it changes the weights.

Training is deterministic on CUDA too (`deterministic`): deterministic algorithms, cuDNN
without autotuning, and cuBLAS's fixed workspace (`CUBLAS_WORKSPACE_CONFIG`, set when this
module is imported, before any cuBLAS call, unless the user set it). Exact forgetting then
holds on one device type: a model retrained on the device kind that trained it is
bit-identical; each model's `cdm.json` records its device and these settings.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..errors import DataError
from ..store.recipes import PRECISIONS

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it once, at its first call


def resolve(precision: str, device: str | torch.device) -> str:
    """`auto` made concrete for `device`; a precision the device cannot run is refused."""
    if precision not in PRECISIONS:
        raise DataError(f"unknown precision {precision!r}; available: {', '.join(PRECISIONS)}")
    cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        return "bf16" if cuda else "fp32"
    if precision == "tf32" and not cuda:
        raise DataError("precision tf32 needs a CUDA device (a CPU has no TF32): use fp32 or bf16")
    return precision


@contextlib.contextmanager
def precision(name: str, device: str | torch.device):
    """Run the model calls inside at precision `name` (`auto` as `resolve` makes it)."""
    name, dev = resolve(name, device), torch.device(device)
    if name == "fp32":
        yield
    elif name == "bf16":
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            yield
    else:  # tf32: global switches, restored afterwards
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def deterministic(device: str | torch.device):
    """Deterministic kernels for the work inside, on CUDA (a CPU's are already); an op with no
    deterministic CUDA kernel raises, naming itself, instead of training irreproducibly."""
    if torch.device(device).type != "cuda":
        yield
        return
    old = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
           torch.backends.cudnn.deterministic)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = old[1], old[2]


def determinism(device: str | torch.device) -> dict:
    """What a model's `cdm.json` records about how reproducible its training was."""
    if torch.device(device).type != "cuda":
        return dict(device="cpu")
    return dict(device="cuda", gpu=torch.cuda.get_device_name(torch.device(device)), torch=torch.__version__,
                cuda=torch.version.cuda, deterministic_algorithms=True,
                cublas_workspace=os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
