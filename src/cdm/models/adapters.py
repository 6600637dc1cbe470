"""Adapter compartments: LoRA (Hu et al. 2021) or a learned prompt on a shared base model.

A base denoiser is trained only on sources the operator marks public (or imported from a
diffusers or Stable Diffusion folder), and each compartment is an adapter on it, trained
only on the compartment's items: a LoRA adapter (via peft), or, in a text-conditioned
store, a learned prompt (the CDM paper's "models or prompts", Sec. 4): `tokens` context
vectors prepended to the text encoder's output, the only trained weights (prompt tuning,
Lester et al. 2021, in the cross-attention context). Forgetting a private item retrains
one adapter (SISA, as for full models); the base never sees private data.

Composition runs the base with each adapter. `AdapterBank` holds one base with all
adapters injected and evaluates several adapters in one batched call (peft's mixed-adapter
batches); `merged` folds one adapter into a copy of the base, a plain UNet.
"""

from __future__ import annotations

import copy
import threading
import warnings
from contextlib import contextmanager

import torch

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


class AdapterBank:
    """One base UNet with several adapters; a denoiser per adapter, and a joint call.

    Calls hold a lock: the adapter of each row is passed to peft's layers through forward
    hooks on the shared modules."""

    def __init__(self, base, adapters: dict[str, tuple[dict, dict[str, torch.Tensor]]]):
        from peft import inject_adapter_in_model

        self.unet = copy.deepcopy(base).eval().requires_grad_(False)
        self.names = list(adapters)
        for name, (recipe, state) in adapters.items():
            with warnings.catch_warnings():  # peft warns that several adapters share the model: that is the point
                warnings.simplefilter("ignore", UserWarning)
                inject_adapter_in_model(lora_config(recipe), self.unet, adapter_name=name)
            _load(self.unet, state, name)
        self.unet.requires_grad_(False)
        self._lock = threading.Lock()
        from peft.tuners.lora import LoraLayer

        self._layers = [m for m in self.unet.modules() if isinstance(m, LoraLayer)]

    @contextmanager
    def _rows(self, adapter_names: list[str]):
        def hook(module, args, kwargs):
            kwargs["adapter_names"] = adapter_names
            return args, kwargs

        with self._lock:
            handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self._layers]
            try:
                yield
            finally:
                for h in handles:
                    h.remove()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond, adapter_names: list[str]) -> torch.Tensor:
        with self._rows(adapter_names):
            return self.unet(x, t, **unet_inputs(cond)).sample

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
