"""Several models of one architecture evaluated in one call: their weights stacked and the
forward pass vectorised over them (`torch.func.functional_call` + `vmap`; convolutions
become one grouped convolution).

With a handful of rows per model, a step of a K-model composition costs K calls, each
mostly fixed per-call overhead; one grouped call pays that overhead once. The arithmetic
is the same but the kernels differ, so results differ from separate calls in the last bits
(about 1e-6). Dense steps run every model on every row; sparse steps (`commit`, `subset`,
`prune`) run just the models some row keeps, each on as many rows as the busiest one (rows
repeated as padding), while that is at most `max_rows`; beyond it, separate calls. An option
only (`CDMPipeline.from_store(grouped=True)`, `cdm sample --grouped`). Speed:
bench/interactive.py; FID change: bench/sampling.py --sparse grouped=1 --fid N.
"""

from __future__ import annotations

import copy

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor
from torch.func import functional_call, vmap

from .denoisers import Cond, cond_rows
from .mixture import separate


class _GroupNorm(torch.nn.GroupNorm):
    """GroupNorm written out, which vmap handles for any memory format (torch's own kernel
    asks for the memory format, which vmap does not support)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], self.num_groups, -1)
        var, mean = torch.var_mean(h, dim=-1, unbiased=False, keepdim=True)
        h = ((h - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return h * self.weight.view(shape) + self.bias.view(shape)


class Group:
    """K UNets with one config, called as one: `group(x, t, cond)` with x (K, R, C, H, W)
    (rows for each model), or `group.shared(x, t, cond)` with x (R, C, H, W) for all."""

    def __init__(self, unets: list):
        configs = {repr(sorted((k, v) for k, v in dict(u.config).items() if not k.startswith("_"))) for u in unets}
        if len(configs) != 1:
            raise ValueError("models of different architectures cannot be grouped")
        with torch.no_grad():  # copies in the default memory format; the live (shared) models are untouched
            params = [dict(u.named_parameters()) for u in unets]
            buffers = [dict(u.named_buffers()) for u in unets]
            self.params = {n: torch.stack([p[n].contiguous() for p in params]) for n in params[0]}
            self.buffers = {n: torch.stack([b[n].contiguous() for b in buffers]) for n in buffers[0]}
        skeleton = copy.deepcopy(unets[0]).to("meta")
        for m in skeleton.modules():
            if type(m) is torch.nn.GroupNorm:
                m.__class__ = _GroupNorm
            elif isinstance(m, Attention):  # plain attention: vmap has no batching rule for the fused CPU kernel
                m.set_processor(AttnProcessor())

        def one(p, b, x, t, c):
            return functional_call(skeleton, (p, b), (x, t), {"class_labels": c}).sample

        self._each = vmap(one)
        self._shared = vmap(one, in_dims=(0, 0, None, None, None))
        self.k = len(unets)
        self._subset: tuple = (None, None)  # (model indices, their stacked weights): the last subset asked for

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, models: list[int] | None = None) -> torch.Tensor:
        """x (G, R, ...): R rows for each of the G models `models` (default: all, in order)."""
        params, buffers = (self.params, self.buffers) if models is None else self._weights(tuple(models))
        return self._each(params, buffers, x, t, cond)

    def shared(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self._shared(self.params, self.buffers, x, t, cond)

    def _weights(self, models: tuple) -> tuple[dict, dict]:
        """The stacked weights of some models, kept while the same subset is asked for (a
        committed sample keeps its model for every remaining step)."""
        kept, weights = self._subset  # one read: another thread may replace it meanwhile
        if kept != models:
            idx = torch.tensor(models, device=next(iter(self.params.values())).device)
            weights = ({n: p.index_select(0, idx) for n, p in self.params.items()},
                       {n: b.index_select(0, idx) for n, b in self.buffers.items()})
            self._subset = (models, weights)
        return weights


def grouped_joint(group: Group, denoisers: list, max_rows: int = 32):
    """A mixture's `joint` (cdm.mixture.Joint) in one grouped call per step: the dense
    mixture runs every model on every row; a sparse step runs just the models some row
    keeps, each on its kept rows padded to the busiest model's count (the padding repeats a
    kept row and is thrown away). A sparse step that keeps one model, or whose busiest model
    has more than `max_rows` rows, makes separate calls: there the calls are large and the
    padding would cost more than the overhead it saves."""

    each = separate(denoisers)

    def run(x: torch.Tensor, t: torch.Tensor, cond: Cond, keep: torch.Tensor | None) -> torch.Tensor:
        if keep is None:
            return group.shared(x, t, cond).transpose(0, 1)  # (B, K, C, H, W)
        counts = keep.sum(0)
        models = counts.nonzero().flatten().tolist()
        r = int(counts.max())
        if r > max_rows or len(models) < 2:  # one model: a plain call has no vmap overhead
            return each(x, t, cond, keep)
        rows = torch.stack([_padded(keep[:, k].nonzero().flatten(), r) for k in models])  # (G, R)
        out = group(x[rows], t[rows], cond_rows(cond, rows), models)  # (G, R, C, H, W)
        eps = x.new_zeros((x.shape[0], len(denoisers), *x.shape[1:]))
        for g, k in enumerate(models):
            n = int(counts[k])
            eps[rows[g, :n], k] = out[g, :n]
        return eps

    return run


def _padded(rows: torch.Tensor, r: int) -> torch.Tensor:
    return torch.cat([rows, rows[:1].expand(r - len(rows))])
