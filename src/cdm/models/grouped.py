"""Several models of one architecture evaluated as one "wide" model: G models' activations
side by side in the channels, every layer run once for all of them (convolutions as one
grouped convolution, linear layers as one batched matmul, group norms with G times the
groups, attention with G times the heads).

With a handful of rows per model, a step of a K-model composition costs K calls, each
mostly fixed per-call overhead (some 25 convolutions and a few hundred small kernels); one
wide call pays that overhead once. A wide call of 4 models x 2 rows costs about 1.1x one
model's call on all 8 rows, against 3.3x for 4 separate calls (bench/grouped_calls.py).

The arithmetic is the same but the kernels differ, so results differ from separate calls in
the last bits (about 1e-6): an option only (`CDMPipeline.from_store(grouped=True)`,
`cdm sample --grouped`), FID change measured in bench/sampling.py --sparse grouped=1.
Dense steps run every model on every row; a sparse step (`commit`, `subset`, `prune`) runs
the models some row keeps, in "slots" of equal rows: a busy model takes several slots, the
last one padded (see `grouped_joint`). Layout and the layers handled: docs/architecture.md,
"Grouped calls".
"""

from __future__ import annotations

import copy
import math
import threading

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import (AttnDownBlock2D, AttnUpBlock2D, DownBlock2D, UNetMidBlock2D,
                                                   UpBlock2D)
from diffusers.models.upsampling import Upsample2D
from torch import nn

from .denoisers import Cond, cond_rows, padded, separate

SLOT_ROWS = 2  # one more slot costs about as much as two more rows in it (bench/grouped_calls.py, CPU)
CACHED_SUBSETS = 8  # stacked weights of this many recent slot lists are kept

# layers whose forward works unchanged on the wide layout (or that hold the wide layers); exact types only
_AS_IS = (UNet2DModel, nn.ModuleList, nn.SiLU, nn.Dropout, nn.Identity, Timesteps, TimestepEmbedding, ResnetBlock2D,
          DownBlock2D, AttnDownBlock2D, UpBlock2D, AttnUpBlock2D, UNetMidBlock2D)


class _Wide(nn.Module):
    """A layer of K models, run on the slot list `select` last chose: `w` holds its stacked
    weights (made once per slot list and cached; `Group` evicts old ones), `g` its length."""

    def __init__(self, layers: list[nn.Module], names: tuple[str, ...]):
        super().__init__()
        self.cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self.stacks = {n: torch.stack([getattr(m, n).detach() for m in layers]) for n in names
                       if getattr(layers[0], n, None) is not None}
        self.select(tuple(range(len(layers))))

    def select(self, models: tuple) -> None:
        w = self.cache.get(models)
        if w is None:
            idx = torch.tensor(models, device=next(iter(self.stacks.values())).device)
            w = self.cache[models] = {n: self.arrange(n, s.index_select(0, idx)) for n, s in self.stacks.items()}
        self.w, self.g = w, len(models)

    def arrange(self, name: str, stacked: torch.Tensor) -> torch.Tensor:  # (G, ...) -> what forward uses
        return stacked.flatten(0, 1).contiguous()

    def slot_views(self, size: int) -> tuple[dict[str, torch.Tensor], list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        """Weights for `size` slots filled in place (Group.__call__(in_place=True)): the buffers,
        each slot's block of them, and each model's block to copy there (every arrangement
        is slot-major, so a slot's block is one row of buffer.view(size, -1))."""
        k = len(next(iter(self.stacks.values())))
        one = {n: [self.arrange(n, s[m:m + 1]).reshape(-1) for m in range(k)] for n, s in self.stacks.items()}
        buf = {n: self.arrange(n, s[:1].expand(size, *s.shape[1:])).clone(memory_format=torch.contiguous_format)
               for n, s in self.stacks.items()}
        dst = [[buf[n].view(size, -1)[i] for n in buf] for i in range(size)]
        return buf, dst, [[one[n][m] for n in buf] for m in range(k)]


class _Conv(_Wide):
    """Conv2d on (R, G*C, H, W): one convolution with G groups."""

    def __init__(self, convs: list[nn.Conv2d]):
        c = convs[0]
        if c.groups != 1 or c.padding_mode != "zeros":
            raise ValueError(f"cannot group a convolution with groups={c.groups}, padding_mode={c.padding_mode!r}")
        super().__init__(convs, ("weight", "bias"))
        self.stride, self.padding, self.dilation = c.stride, c.padding, c.dilation

    def forward(self, x):
        return F.conv2d(x, self.w["weight"], self.w.get("bias"), self.stride, self.padding, self.dilation, self.g)


class _Linear(_Wide):
    """Linear on (..., G*in) -> (..., G*out): one batched matmul over the G models."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__(layers, ("weight", "bias"))

    def arrange(self, name, stacked):
        return stacked.transpose(1, 2).contiguous() if name == "weight" else stacked[:, None]  # (G, in, out), (G, 1, out)

    def forward(self, x):
        w, g, shape = self.w, self.g, x.shape
        h = x.reshape(-1, g, shape[-1] // g).transpose(0, 1)  # (G, rows, in)
        h = torch.baddbmm(w["bias"], h, w["weight"]) if "bias" in w else torch.bmm(h, w["weight"])
        return h.transpose(0, 1).reshape(*shape[:-1], -1)


class _GroupNorm(_Wide):
    """GroupNorm with G times the groups: each model's channels are normalised on their own."""

    def __init__(self, layers: list[nn.GroupNorm]):
        super().__init__(layers, ("weight", "bias"))
        self.num_groups, self.eps = layers[0].num_groups, layers[0].eps

    def forward(self, x):
        return F.group_norm(x, self.num_groups * self.g, self.w.get("weight"), self.w.get("bias"), self.eps)


class _Embedding(_Wide):
    """Class embedding: ids (R, G), one per slot, -> (R, G*dim)."""

    def __init__(self, layers: list[nn.Embedding]):
        super().__init__(layers, ("weight",))
        self.n = layers[0].num_embeddings

    def forward(self, ids):
        offset = torch.arange(ids.shape[1], device=ids.device) * self.n
        return F.embedding(ids + offset, self.w["weight"]).flatten(1)


class _Attention(nn.Module):
    """diffusers' Attention (self-attention over the pixels, as in AttnDownBlock2D) with G
    times the heads: a head never spans two models' channels."""

    def __init__(self, layers: list[Attention]):
        super().__init__()
        a = layers[0]
        if (a.is_cross_attention or a.spatial_norm is not None or a.norm_q is not None or a.norm_k is not None
                or a.group_norm is None or getattr(a, "add_q_proj", None) is not None):
            raise ValueError("cannot group an attention layer other than plain self-attention with a group norm")
        self.head_dim = a.to_q.out_features // a.heads
        if abs(a.scale - self.head_dim ** -0.5) > 1e-12:  # scaled_dot_product_attention's default scale
            raise ValueError(f"cannot group an attention layer with scale {a.scale}")
        self.residual, self.rescale = a.residual_connection, a.rescale_output_factor
        self.group_norm = _GroupNorm([m.group_norm for m in layers])
        self.to_q, self.to_k, self.to_v = (_Linear([getattr(m, n) for m in layers])
                                           for n in ("to_q", "to_k", "to_v"))
        self.to_out = _Linear([m.to_out[0] for m in layers])

    def forward(self, x, *args, **kwargs):
        b, c, height, width = x.shape
        h = self.group_norm(x.view(b, c, -1)).transpose(1, 2)  # (B, pixels, G*C)
        q, k, v = (f(h).view(b, -1, c // self.head_dim, self.head_dim).transpose(1, 2)
                   for f in (self.to_q, self.to_k, self.to_v))
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        h = self.to_out(h).transpose(1, 2).reshape(b, c, height, width).contiguous()  # channels first, as x (else
        return (h + x if self.residual else h) / self.rescale  # every later convolution converts its weights)


class _Down(nn.Module):
    """Downsample2D as its strided convolution (the only form grouped)."""

    def __init__(self, layers: list[Downsample2D]):
        super().__init__()
        d = layers[0]
        if not d.use_conv or d.norm is not None or d.padding == 0:
            raise ValueError("cannot group a downsampler other than a padded strided convolution")
        self.conv = _Conv([m.conv for m in layers])

    def forward(self, x, *args, **kwargs):
        return self.conv(x)


class _Up(nn.Module):
    """Upsample2D as nearest-neighbour doubling, then its convolution."""

    def __init__(self, layers: list[Upsample2D]):
        super().__init__()
        u = layers[0]
        if not (u.use_conv and u.interpolate) or u.use_conv_transpose or u.norm is not None:
            raise ValueError("cannot group an upsampler other than interpolation and a convolution")
        self.conv = _Conv([m.conv for m in layers])

    def forward(self, x, output_size=None, *args, **kwargs):
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x)


class _Joined(nn.Module):
    """A resnet of an up block, whose input is torch.cat([h, skip], dim=1) of two wide
    tensors: [G blocks of h | G blocks of skip], put back to G blocks of (h, skip)."""

    def __init__(self, resnet: nn.Module, c_h: int):
        super().__init__()
        self.resnet, self.c_h = resnet, c_h

    def forward(self, x, *args, **kwargs):
        r, c, height, width = x.shape
        g = self.resnet.conv1.g  # models in the call
        h, skip = x[:, :g * self.c_h].view(r, g, -1, height, width), x[:, g * self.c_h:].view(r, g, -1, height, width)
        return self.resnet(torch.cat([h, skip], dim=2).view(r, c, height, width), *args, **kwargs)


_KINDS = {nn.Conv2d: _Conv, nn.Linear: _Linear, nn.GroupNorm: _GroupNorm, nn.Embedding: _Embedding,
          Attention: _Attention, Downsample2D: _Down, Upsample2D: _Up}


class Group:
    """K UNets with one config, called as one: `group(x, t, cond, models)` with x (G, R, C, H, W),
    R rows for each of G slots, slot g run by model `models[g]` (a model may take several
    slots); or `group.shared(x, t, cond)` with x (R, C, H, W) for all K models."""

    def __init__(self, unets: list):
        configs = {repr(sorted((k, v) for k, v in dict(u.config).items() if not k.startswith("_"))) for u in unets}
        if len(configs) != 1:
            raise ValueError("models of different architectures cannot be grouped")
        u0 = unets[0]
        if not isinstance(u0, UNet2DModel):
            raise ValueError(f"cannot group {type(u0).__name__} models, only class-conditional UNet2DModel ones")
        conf = u0.config
        if (conf.center_input_sample or conf.time_embedding_type != "positional" or conf.class_embed_type is not None
                or conf.resnet_time_scale_shift != "default"):
            raise ValueError("cannot group a UNet2DModel with centred input, fourier or class-typed embeddings, or "
                             "scale-shift time conditioning")
        self.k = len(unets)
        self.every = self.now = tuple(range(self.k))  # all models, in order; the slot list of the call running
        self._lock, self._recent = threading.Lock(), [self.every]
        self._slots = None  # in-place slot buffers: (model held by each slot, buffers, slot blocks, model blocks)
        self.wide = copy.deepcopy(u0).to("meta")  # the skeleton; every layer with weights is replaced below
        layers = [dict(u.named_modules()) for u in unets]
        replaced: list[str] = []
        for name, m in list(self.wide.named_modules()):
            if any(name.startswith(r + ".") for r in replaced):
                continue  # inside a layer already replaced (its constructor checks what it holds)
            kind = _KINDS.get(type(m))
            if kind is not None:
                parent, _, leaf = name.rpartition(".")
                setattr(self.wide.get_submodule(parent), leaf, kind([d[name] for d in layers]))
                replaced.append(name)
            elif type(m) not in _AS_IS:
                raise ValueError(f"cannot group a model with a {type(m).__name__} layer ({name})")
        skips = _skip_channels(u0)  # after the check: a model with other blocks may not even run this way
        for block, channels in zip(self.wide.up_blocks, skips):
            for j, resnet in enumerate(block.resnets):
                block.resnets[j] = _Joined(resnet, resnet.conv1.stacks["weight"].shape[2] - channels[-1 - j])
        self._wide_layers = [m for m in self.wide.modules() if isinstance(m, _Wide)]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, models: list[int] | None = None,
                 in_place: bool = False) -> torch.Tensor:
        """`in_place`: the slot list's weights are copied into one set of buffers, just the
        slots whose model changed since the last such call, instead of stacked anew and
        cached: for a caller whose slot list changes with every call (cdm.sampling.batching)."""
        g, r = x.shape[:2]
        return self._run(x.transpose(0, 1).reshape(r, -1, *x.shape[3:]), t.t(), cond.t(),
                         self.every if models is None else tuple(models), in_place)

    def shared(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self._run(x.repeat(1, self.k, 1, 1), t[:, None].expand(-1, self.k), cond[:, None].expand(-1, self.k),
                         self.every, False)

    @torch.inference_mode()
    def _run(self, h: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, models: tuple,
             in_place: bool) -> torch.Tensor:
        """The wide forward of UNet2DModel: h (R, G*C, H, W), t and labels (R, G) -> (G, R, C, H, W)."""
        w, (r, g) = self.wide, t.shape
        with self._lock:
            self._fill(models) if in_place else self._use(models)
            emb = w.time_proj(t.reshape(-1)).to(h.dtype).view(r, -1)
            emb = w.time_embedding(emb)
            if w.class_embedding is not None:
                emb = emb + w.class_embedding(labels)
            h = w.conv_in(h)
            res = (h,)
            for block in w.down_blocks:
                h, more = block(hidden_states=h, temb=emb)
                res += more
            h = w.mid_block(h, emb) if w.mid_block is not None else h
            for block in w.up_blocks:
                n = len(block.resnets)
                h, res = block(h, res[-n:], emb), res[:-n]
            h = w.conv_out(w.conv_act(w.conv_norm_out(h)))
        return h.view(r, g, -1, *h.shape[2:]).transpose(0, 1)

    def held(self, size: int) -> list:
        """The model whose weights each of `size` in-place slots holds now (None: not filled)."""
        return list(self._slots[0]) if self._slots is not None and len(self._slots[0]) == size else [None] * size

    def _fill(self, models: tuple) -> None:
        """Make `models` the current slot list, in the in-place buffers (see __call__)."""
        size = len(models)
        if self._slots is None or len(self._slots[0]) != size:
            views = [layer.slot_views(size) for layer in self._wide_layers]
            self._slots = ([None] * size, [v[0] for v in views],
                           [[d for v in views for d in v[1][i]] for i in range(size)],
                           [[m for v in views for m in v[2][j]] for j in range(self.k)])
        held, bufs, dst, src = self._slots
        changed = [i for i, m in enumerate(models) if held[i] != m]
        if changed:
            torch._foreach_copy_([d for i in changed for d in dst[i]], [v for i in changed for v in src[models[i]]])
            for i in changed:
                held[i] = models[i]
        for layer, buf in zip(self._wide_layers, bufs):
            layer.w, layer.g = buf, size
        self.now = None  # the next _use selects its cached weights again

    def _use(self, models: tuple) -> None:
        """Make `models` the current slot list; forget the stacked weights of an old one."""
        if models == self.now:
            return
        for layer in self._wide_layers:
            layer.select(models)
        self.now = models
        if models in self._recent:
            return
        self._recent.append(models)
        if len(self._recent) > CACHED_SUBSETS + 1:
            old = self._recent.pop(1)  # the full list (first) stays
            for layer in self._wide_layers:
                layer.cache.pop(old, None)


def _skip_channels(unet) -> list[list[int]]:
    """Channels of the skip connections each up block receives (a one-row dry run)."""
    seen, hooks = [], [b.register_forward_pre_hook(lambda m, a: seen.append([s.shape[1] for s in a[1]]))
                       for b in unet.up_blocks]
    conf, p = unet.config, next(unet.parameters())
    try:
        with torch.inference_mode():
            unet(torch.zeros(1, conf.in_channels, conf.sample_size, conf.sample_size, device=p.device, dtype=p.dtype),
                 torch.zeros(1, dtype=torch.long, device=p.device),
                 class_labels=torch.zeros(1, dtype=torch.long, device=p.device)
                 if conf.num_class_embeds is not None else None)
    finally:
        for h in hooks:
            h.remove()
    return seen


# How a group's wide call is divided into slots of rows, one model per slot: `slot_rows` picks
# the rows per slot for a plain sparse step (cdm.models.grouped.grouped_joint), `slot_counts`
# how many slots of fixed rows each model gets in a server round (cdm.sampling.batching).


def slot_counts(waiting: list[int], rows: int, slots: int) -> list[int]:
    """How many of a wide call's `slots` slots of `rows` rows each model gets, given the rows
    it has waiting: one at a time to the model with the most rows not yet given room."""
    want = [0] * len(waiting)
    for _ in range(slots):
        m = max(range(len(waiting)), key=lambda m: waiting[m] - want[m] * rows)
        if waiting[m] <= want[m] * rows:
            break
        want[m] += 1
    return want


def slot_rows(counts: list[int], max_rows: int) -> int:
    """Rows per slot for models with these row counts: the fewest slots x (rows + SLOT_ROWS),
    i.e. padding traded against the cost of one more slot."""
    return min(range(1, min(max(counts), max_rows) + 1),
               key=lambda r: sum(math.ceil(c / r) for c in counts) * (r + SLOT_ROWS))


def grouped_joint(group: Group, denoisers: list, max_rows: int = 32):
    """A mixture's `joint` (cdm.models.denoisers.Joint) in one wide call per step: the dense mixture
    runs every model on every row; a sparse step runs just the models some row keeps, each
    on its kept rows in slots of `slot_rows` rows (a busy model takes several slots, the
    last padded by repeating a row, and the padding is thrown away). A step whose busiest
    model has more than `max_rows` rows, or a sparse step that keeps one model, makes
    separate calls: there the calls are large and grouping saves nothing (dense CDM-8 at 250
    images was 9.8x the paragon grouped against 8.0x separate, bench/interactive.py)."""

    each = separate(denoisers)

    def run(x: torch.Tensor, t: torch.Tensor, cond: Cond, keep: torch.Tensor | None) -> torch.Tensor:
        if keep is None:  # dense: every model on every row
            return each(x, t, cond, None) if len(x) > max_rows else group.shared(x, t, cond).transpose(0, 1)
        counts = keep.sum(0)
        models = counts.nonzero().flatten().tolist()
        if int(counts.max()) > max_rows or len(models) < 2:  # one model: a plain call has no grouping overhead
            return each(x, t, cond, keep)
        kept = [keep[:, k].nonzero().flatten() for k in models]
        r = slot_rows([len(rows) for rows in kept], max_rows)
        slots = [(k, rows[i:i + r]) for k, rows in zip(models, kept) for i in range(0, len(rows), r)]
        idx = torch.stack([padded(rows, r) for _, rows in slots])  # (G, R)
        out = group(x[idx], t[idx], cond_rows(cond, idx), [k for k, _ in slots])  # (G, R, C, H, W)
        eps = x.new_zeros((x.shape[0], len(denoisers), *x.shape[1:]))
        for g, (k, rows) in enumerate(slots):
            eps[rows, k] = out[g, :len(rows)]
        return eps

    return run
