"""The one calling convention every denoiser follows, and the wrappers built on it.

    denoiser(x, t, cond) -> eps

`x` is (B, C, H, W), `t` a (B,) long tensor of training timesteps, and `cond` whatever
the model is conditioned on, batch first: a (B,) long tensor of class-label ids (the
null id for "no label"), or a dict of tensors: {"text": (B, L, D)} prompt embeddings in a
text-conditioned store (cdm.models.text; the empty prompt is the null condition). A
composition of denoisers (cdm.sampling.mixture.Mixture) and classifier-free guidance
(`guided`) are themselves denoisers, so they nest (docs/architecture.md, "Data flow").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Union, runtime_checkable

import torch

Cond = Union[torch.Tensor, dict]  # batch-first tensor, or a dict of batch-first tensors


class Denoiser(Protocol):
    """The calling convention: eps = denoiser(x, t, cond)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor: ...


class Joint(Protocol):
    """All of a mixture's denoisers at once: eps (B, K, C, H, W) for `keep` (B, K) bool (None:
    every denoiser on every row), zero where not kept."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, keep: torch.Tensor | None) -> torch.Tensor: ...


@runtime_checkable
class RoutedJoint(Protocol):
    """A joint that can also send each row through its one denoiser (a committed mixture;
    `routes` is a cdm.sampling.mixture.Routes): eps (B, C, H, W)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, keep: torch.Tensor | None) -> torch.Tensor: ...

    def routed(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, routes) -> torch.Tensor: ...


class Keyed:
    """A denoiser with a batching key: calls of denoisers with the same `key` (the same
    weights) may share one batch (cdm.sampling.batching)."""

    def __init__(self, fn: Denoiser, key):
        self.fn, self.key = fn, key

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.fn(x, t, cond)


def cond_cat(*conds: Cond) -> Cond:
    """Stack conditions along the batch."""
    if isinstance(conds[0], dict):
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(conds)


def fixed_chunks(fn: Callable[[torch.Tensor], torch.Tensor], n: int, chunk: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """fn(rows) on exactly `chunk` row indices at a time (the last chunk padded with copies of
    its first row), concatenated without the padding. Every call has the same shape, so a
    row's result does not depend on the rows computed with it."""
    out = []
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=device)
        out.append(fn(padded(rows, chunk))[:len(rows)])
    return torch.cat(out)


def padded(rows: torch.Tensor, r: int) -> torch.Tensor:
    """Row indices made up to `r` with copies of the first (its result is thrown away)."""
    return torch.cat([rows, rows[:1].expand(r - len(rows))])


def cond_rows(c: Cond, rows: torch.Tensor) -> Cond:
    """The condition of some rows."""
    if isinstance(c, dict):
        return {k: v[rows] for k, v in c.items()}
    return c[rows]


@dataclass(frozen=True)
class ClassLabels:
    """Conditioning on class-label ids; `null_id` (the store's max_labels) is the null condition,
    which the models were trained on with label dropout (Ho & Salimans 2022)."""

    null_id: int

    def encode(self, ids: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=device)

    def null(self, rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.full((rows,), self.null_id, dtype=torch.long, device=device)


def unet_inputs(cond: Cond) -> dict:
    """A condition as a diffusers UNet's keyword arguments: class labels (UNet2DModel), or the
    prompt embeddings a UNet2DConditionModel cross-attends to."""
    return {"encoder_hidden_states": cond["text"]} if isinstance(cond, dict) else {"class_labels": cond}


def unet_denoiser(unet) -> Keyed:
    """A diffusers UNet (class- or text-conditioned) under the calling convention; calls on
    the same model may share a batch."""

    def eps(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return unet(x, t, **unet_inputs(cond)).sample

    return Keyed(eps, unet)


def separate(denoisers: list[Denoiser]) -> Joint:
    """All denoisers at once by calling each in turn: on every row (keep None), or on just
    the rows `keep` marks for it (zero elsewhere)."""

    def run(x: torch.Tensor, t: torch.Tensor, cond: Cond, keep: torch.Tensor | None) -> torch.Tensor:
        if keep is None:
            return torch.stack([d(x, t, cond) for d in denoisers], dim=1)  # (B, K, C, H, W)
        eps = x.new_zeros((x.shape[0], len(denoisers), *x.shape[1:]))
        for k, d in enumerate(denoisers):
            rows = keep[:, k].nonzero().flatten()
            if len(rows) == len(x):
                eps[:, k] = d(x, t, cond)
            elif len(rows):
                eps[rows, k] = d(x[rows], t[rows], cond_rows(cond, rows))
        return eps

    return run


def guided(denoiser: Denoiser, scale: float, null: Cond) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022) as a denoiser:

        eps = eps(x, t, null) + scale * (eps(x, t, cond) - eps(x, t, null))

    One call of `denoiser` on the conditional rows stacked over the null rows (`null` has as
    many rows as `x`), so a mixture inside sees both row sets (docs/routers.md Sec. 4)."""

    def eps(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        e_c, e_u = denoiser(torch.cat([x, x]), torch.cat([t, t]), cond_cat(cond, null)).chunk(2)
        return e_u + scale * (e_c - e_u)

    return eps
