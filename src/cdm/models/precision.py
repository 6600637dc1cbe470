"""The arithmetic of model calls: fp32, tf32 (CUDA matmuls and convolutions on TF32 tensor
cores) or bf16 (autocast: matmuls and convolutions in bfloat16, master weights and the
optimiser in fp32). `auto` is bf16 on CUDA and fp32 on a CPU; a store records what its
training used (cdm.store.recipes.TrainConfig.precision), because it changes the weights.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import DataError
from ..store.recipes import PRECISIONS


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
