"""Adapter compartments: LoRA (Hu et al. 2021) or a learned prompt on a shared base model.

A base denoiser is trained only on sources the operator marks public (or imported from a
diffusers or Stable Diffusion folder), and each compartment is an adapter on it, trained
only on the compartment's items: a LoRA adapter (via peft), or, in a text-conditioned
store, a learned prompt (the CDM paper's "models or prompts", Sec. 4): `tokens` context
vectors prepended to the text encoder's output, the only trained weights (prompt tuning,
Lester et al. 2021, in the cross-attention context). Forgetting a private item retrains
one adapter (SISA, as for full models); the base never sees private data.

Composition runs the base with each adapter. `AdapterBank` holds one base and the stacked
weights of all adapters, and evaluates several adapters in one call of the base: each row
adds its own adapter's low-rank delta (batched small matmuls, one grouped conv); `merged`
folds one adapter into a copy of the base, a plain UNet.
"""

from __future__ import annotations

import copy
import itertools
import threading

import torch
import torch.nn.functional as F

from .denoisers import Keyed, cond_rows, unet_inputs


class PromptModel(torch.nn.Module):
    """A prompt compartment: a frozen base UNet2DConditionModel that cross-attends to the
    compartment's learned context vectors followed by the prompt's embeddings. Holds the base
    by reference (every prompt compartment shares one copy)."""

    def __init__(self, base, prompt: torch.Tensor):
        super().__init__()
        self.base = base
        self.prompt = torch.nn.Parameter(prompt.clone())

    @classmethod
    def fresh(cls, base, recipe: dict, seed: int) -> "PromptModel":
        """A new prompt whose values depend only on (recipe, seed, the base's width)."""
        dim = base.config.get("cross_attention_dim")
        if dim is None:
            raise ValueError("prompt compartments need a text-conditioned base (`cdm text` first)")
        gen = torch.Generator().manual_seed(seed)
        base.requires_grad_(False)
        return cls(base, 0.02 * torch.randn(recipe["tokens"], dim, generator=gen))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, **kw):
        p = self.prompt.to(encoder_hidden_states.dtype).expand(encoder_hidden_states.shape[0], -1, -1)
        return self.base(sample, timestep, encoder_hidden_states=torch.cat([p, encoder_hidden_states], dim=1), **kw)


def lora_config(recipe: dict):
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ValueError("adapter compartments need peft: pip install 'cdm[lora]'") from e

    return LoraConfig(r=recipe["rank"], lora_alpha=recipe["alpha"], target_modules=recipe["targets"],
                      init_lora_weights=True)


def attach(unet, recipe: dict, seed: int, name: str = "default"):
    """Inject a freshly initialised adapter whose weights depend only on (recipe, seed); only it trains."""
    from peft import inject_adapter_in_model

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(lora_config(recipe), unet, adapter_name=name)
    for n, p in unet.named_parameters():
        p.requires_grad_(f".{name}." in n or n.endswith(f".{name}"))
    return unet


def adapter_state(unet, name: str = "default") -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()}


def merged(base, recipe: dict, state: dict[str, torch.Tensor]):
    """A plain UNet: the base with one adapter folded into its weights."""
    from peft.tuners.lora import LoraModel

    lm = LoraModel(copy.deepcopy(base), lora_config(recipe), "a")
    _load(lm.model, state, "a")
    return lm.merge_and_unload().eval().requires_grad_(False)


def _load(unet, state: dict, name: str) -> None:
    from peft import set_peft_model_state_dict

    res = set_peft_model_state_dict(unet, state, adapter_name=name)
    missing = [k for k in res.missing_keys if f".{name}." in k or k.endswith(f".{name}")]
    if res.unexpected_keys or missing:
        raise ValueError(f"adapter weights do not fit the base: unexpected {res.unexpected_keys[:3]}, "
                         f"missing {missing[:3]}")


class _Rows:
    """The rows of the current call, grouped by adapter: (adapter index, first row, end row)
    for each run of rows that one adapter serves; shared by every banked layer of one bank."""

    segments: list[tuple[int, int, int]] = []


class _Banked(torch.nn.Module):
    """A base layer plus, per row, its own adapter's low-rank delta: the LoRA weights of all K
    adapters stacked (A: K x ..., B: K x out x r), each adapter applied to its run of rows as
    two small matmuls or convs (the S-LoRA / Punica idea; no copy of the base per adapter)."""

    def __init__(self, base: torch.nn.Module, A: torch.Tensor, B: torch.Tensor, scale: list[float], rows: _Rows):
        super().__init__()
        self.base, self.rows, self.scale = base, rows, scale
        self.register_buffer("A", A)
        self.register_buffer("B", B)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        for k, a, b in self.rows.segments:  # in place: y is this call's own new tensor
            y[a:b] += (self.delta(x[a:b], k) * self.scale[k]).to(y.dtype)
        return y


class _BankedLinear(_Banked):
    def delta(self, x, k):  # A (K, r, in); B (K, out, r)
        return F.linear(F.linear(x, self.A[k].to(x.dtype)), self.B[k].to(x.dtype))


class _BankedConv(_Banked):
    def delta(self, x, k):  # A (K, r, C, kh, kw) with the base conv's stride and padding; B (K, out, r): 1x1
        h = F.conv2d(x, self.A[k].to(x.dtype), None, self.base.stride, self.base.padding, self.base.dilation)
        return F.conv2d(h, self.B[k, :, :, None, None].to(x.dtype))


class _BankedEmbedding(_Banked):
    def delta(self, x, k):  # A (K, r, num); B (K, out, r)
        return F.linear(F.embedding(x, self.A[k].T), self.B[k]).to(self.base.weight.dtype)


def _stack(name: str, states: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    keys = (f"{name}.lora_A.weight", f"{name}.lora_B.weight")
    if keys[0] not in states[0]:
        keys = (f"{name}.lora_embedding_A", f"{name}.lora_embedding_B")
    A, B = (torch.stack([st[k] for st in states]) for k in keys)
    if B.dim() == 5:  # a conv's B is a 1x1 conv: (K, out, r, 1, 1)
        B = B[..., 0, 0]
    return A, B


class AdapterBank:
    """One base UNet with several LoRA adapters; a denoiser per adapter, and a joint call in
    which each row takes its own adapter: one forward of the shared base over all rows, each
    targeted layer adding the row's low-rank delta. Memory: one base plus K adapters.

    Calls hold a lock (the rows' adapters are the bank's state during a call)."""

    def __init__(self, base, adapters: dict[str, tuple[dict, dict[str, torch.Tensor]]], rows_per_call: int | None = None):
        self.unet = copy.deepcopy(base).eval().requires_grad_(False)
        self.rows_per_call = rows_per_call  # None: every row in one call; else calls of at most this many rows
        self.names = list(adapters)
        recipes = [r for r, _ in adapters.values()]
        if any((r["rank"], r["alpha"], r["targets"]) != (recipes[0]["rank"], recipes[0]["alpha"], recipes[0]["targets"])
               for r in recipes):
            raise ValueError("the adapters of one bank must share rank, alpha and targets (one store's recipe)")
        states = [st for _, st in adapters.values()]
        layers = sorted({k.rsplit(".lora_", 1)[0] for k in states[0]})
        if any({k.rsplit(".lora_", 1)[0] for k in st} != set(layers) for st in states):
            raise ValueError("the adapters of one bank must adapt the same layers")
        device = next(self.unet.parameters()).device
        scale = [r["alpha"] / r["rank"] for r in recipes]
        self._rows = _Rows()
        modules = dict(self.unet.named_modules())
        for name in layers:
            base_layer = modules.get(name)
            kind = {torch.nn.Linear: _BankedLinear, torch.nn.Conv2d: _BankedConv,
                    torch.nn.Embedding: _BankedEmbedding}.get(type(base_layer))
            if kind is None:
                raise ValueError(f"adapter weights do not fit the base: no linear, conv or embedding layer {name!r}")
            A, B = _stack(name, states)
            parent, _, attr = name.rpartition(".")
            setattr(modules[parent] if parent else self.unet, attr,
                    kind(base_layer, A.to(device), B.to(device), scale, self._rows))
        self._lock = threading.Lock()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond, adapter_names: list[str]) -> torch.Tensor:
        """eps of each row under its own adapter (`adapter_names`, one per row), in one call of the
        base: rows are grouped by adapter for the call, and put back in order after it."""
        idx = [self.names.index(n) for n in adapter_names]
        order = sorted(range(len(idx)), key=idx.__getitem__)  # stable: rows of one adapter keep their order
        perm = None if order == list(range(len(idx))) else torch.tensor(order, device=x.device)
        if perm is not None:
            x, t, cond = x[perm], t[perm], cond_rows(cond, perm)
        ks = [idx[i] for i in order]
        cap = self.rows_per_call or len(ks)
        outs = []
        with self._lock:
            for c0 in range(0, len(ks), cap):
                segments, start = [], 0
                for k, run in itertools.groupby(ks[c0:c0 + cap]):
                    n = len(list(run))
                    segments.append((k, start, start + n))
                    start += n
                self._rows.segments = segments
                rows = slice(c0, c0 + cap)
                try:
                    outs.append(self.unet(x[rows], t[rows], **unet_inputs(cond_rows(cond, rows))).sample)
                finally:
                    self._rows.segments = []
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if perm is None:
            return out
        back = torch.empty_like(out)
        back[perm] = out
        return back

    def denoiser(self, name: str):
        """One adapter under the denoiser calling convention (cdm.models.denoisers)."""
        if name not in self.names:
            raise KeyError(name)
        def eps(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
            return self.forward(x, t, cond, [name] * x.shape[0])

        return Keyed(eps, (self, name))  # calls on the same adapter may share a batch (cdm.sampling.batching)

    def joint(self, names: list[str]):
        """eps of every (row, adapter) pair marked in `keep` (rows, K), in one batched call."""

        def run(x: torch.Tensor, t: torch.Tensor, cond, keep: torch.Tensor | None) -> torch.Tensor:
            rows, cols = (keep if keep is not None else torch.ones(len(x), len(names), dtype=torch.bool)).nonzero(
                as_tuple=True)
            out = x.new_zeros((x.shape[0], len(names), *x.shape[1:]))
            if len(rows):
                eps = self.forward(x[rows], t[rows], cond_rows(cond, rows), [names[int(c)] for c in cols])
                out[rows, cols] = eps
            return out

        return run
