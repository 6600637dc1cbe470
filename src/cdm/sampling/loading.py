"""Open live models from the store, each checked against its registry digest when read.

Models already in memory with the same digest are reused across calls (models are never
modified in place); forgetting drops every copy (`forget_unused_models`). Only what a
caller names is opened (docs/architecture.md, invariant 4).
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from ..models.adapters import ADAPTER_WEIGHTS, AdapterBank, PromptModel, is_full, is_prompt, merged
from ..models.grouped import Group
from ..models.nets import RouterNet, unet_class
from ..models.latent import load_latents
from ..store.recipes import latent_config, latent_dir, text_config, text_dir
from .routers import ClassifierRouter
from ..store.registry import BASE, ROUTER, NotReady, Store, StoreError, file_digest
from ..models.text import load_encoder
from ..training.loop import WEIGHTS

UNET_CACHE = 32  # models kept in memory across calls, keyed by folder, weights digest and device
_UNETS: dict[tuple, UNet2DModel] = {}
_UNETS_LOCK = threading.Lock()
_HOLDERS: "weakref.WeakSet" = weakref.WeakSet()  # other in-memory holders of models (pipeline caches)


def register_holder(holder) -> None:
    """`holder.clear()` is called whenever forgetting drops models from memory."""
    _HOLDERS.add(holder)


def load_unet(store: Store, name: str, device: str = "cpu") -> UNet2DModel:
    """Load one live model, checking its weights file against the registry digest.
    An adapter compartment comes back merged into (a copy of) its base. Models are kept
    channels-last (the same weights, rounding may differ): 5-14% faster sampling on CPU."""
    row, folder = _checked(store, name)
    adapter = row.info.get("adapter")
    base_row = store.model(BASE) if adapter else None
    if adapter and is_full(adapter) and (base_row is None or base_row.digest != adapter["base"]):
        raise StoreError(f"compartment {name!r} is a fine-tune of another base model; retrain with `cdm train`")
    if adapter and not is_full(adapter):
        if base_row is None or base_row.digest != adapter["base"]:
            raise StoreError(f"compartment {name!r} is an adapter on another base model; retrain with `cdm train`")
        base = load_unet(store, BASE, device)
        key = (str(folder.resolve()), row.digest, str(device), adapter["base"])
        if is_prompt(adapter):  # shares the base: one copy in memory for every prompt compartment
            return _cached(key, lambda: PromptModel(base, _adapter_weights(folder)["prompt"].to(device))
                           .eval().requires_grad_(False))
        return _cached(key, lambda: merged(base, adapter, _adapter_weights(folder))
                       .to(device, memory_format=torch.channels_last))
    key = (str(folder.resolve()), row.digest, str(device))
    cls = unet_class(UNet2DModel.load_config(folder))
    return _cached(key, lambda: cls.from_pretrained(folder, low_cpu_mem_usage=False)
                   .to(device, memory_format=torch.channels_last).eval().requires_grad_(False))


def load_bank(store: Store, names: list[str], device: str = "cpu") -> AdapterBank:
    """The base with the adapters of `names` injected, unmerged (one copy of the base in memory)."""
    rows = {n: _checked(store, n) for n in names}
    base_row = store.model(BASE)
    for n, (row, _) in rows.items():
        if is_prompt(row.info.get("adapter") or {}) or is_full(row.info.get("adapter") or {}):
            raise StoreError(f"compartment {n!r} is a {row.info['adapter']['kind']} compartment, not a LoRA adapter: "
                             "it runs in adapter mode 'merged'")
        if not row.info.get("adapter") or base_row is None or row.info["adapter"]["base"] != base_row.digest:
            raise StoreError(f"compartment {n!r} is not an adapter on this store's base model")
    base = load_unet(store, BASE, device)
    key = ("bank", base_row.digest, str(device), tuple((n, r.digest) for n, (r, _) in rows.items()))
    return _cached(key, lambda: AdapterBank(base, {n: (r.info["adapter"], _adapter_weights(f))
                                                   for n, (r, f) in rows.items()}))


def load_classifier(store: Store, names: list[str], device: str = "cpu") -> ClassifierRouter:
    """The classifier router, restricted to the columns of `names`."""
    row = store.model(ROUTER)
    folder = store.folder(row)
    if file_digest(folder / WEIGHTS) != row.digest:
        raise NotReady(f"classifier router files ({row.path} in the store) are corrupted; retrain with `cdm train`")
    net = RouterNet.from_pretrained(folder, low_cpu_mem_usage=False).to(device).eval()
    classes = list(net.config.compartments)
    return ClassifierRouter(net, [classes.index(c) for c in names])


def load_text(store: Store, device: str = "cpu"):
    """The store's frozen text encoder (checked against its digest), or None for a class-conditional store."""
    config = text_config(store)
    if config is None:
        return None
    folder = text_dir(store, config)
    return _cached((str(folder), config.digest, str(device), "text"), lambda: load_encoder(folder, config.digest, device))


def load_vae(store: Store, device: str = "cpu"):
    """The store's frozen VAE (checked against its digest), or None when models see pixels."""
    config = latent_config(store)
    if config is None:
        return None
    folder = latent_dir(store, config)
    return _cached((str(folder), config.digest, str(device), "vae"), lambda: load_latents(folder, config, device))


def load_group(store: Store, names: list[str], unets: list, device: str = "cpu") -> Group:
    """The models of `names` (loaded: `unets`) as one cdm.grouped.Group, shared by every
    pipeline that composes them, so the server's wide calls carry all their requests."""
    base = store.model(BASE)
    key = ("group", str(device), base.digest if base else None, *((n, store.model(n).digest) for n in names))
    return _cached(key, lambda: Group(unets))


def scheduler_config(store: Store, name: str) -> dict:
    """The noise schedule a model was trained with (saved beside its weights)."""
    return dict(DDPMScheduler.load_config(store.model_dir(name)))


def forget_unused_models() -> None:
    """Drop models from memory whose folder is gone (replaced or forgotten), and every cached pipeline."""
    with _UNETS_LOCK:
        for key in [k for k in _UNETS if k[0] in ("bank", "group") or not Path(k[0]).exists()]:
            _UNETS.pop(key, None)
    for holder in list(_HOLDERS):
        holder.clear()


def _checked(store: Store, name: str):
    row = store.model(name)
    if row is None:
        what = "the base model" if name == BASE else f"compartment {name!r}"
        raise NotReady(f"{what} is not trained; run `cdm train`")
    folder = store.folder(row)
    try:
        ok = file_digest(folder / row.info.get("weights", WEIGHTS)) == row.digest
    except OSError:
        ok = False
    if not ok:
        raise NotReady(f"model files of {name!r} ({row.path} in the store) are missing or corrupted; "
                       "retrain with `cdm train`")
    return row, folder


def _adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / ADAPTER_WEIGHTS))


def _cached(key: tuple, build):
    with _UNETS_LOCK:
        if key in _UNETS:
            _UNETS[key] = _UNETS.pop(key)  # most recently used last
            return _UNETS[key]
    model = build()
    with _UNETS_LOCK:
        _UNETS[key] = model
        while len(_UNETS) > UNET_CACHE:
            _UNETS.pop(next(iter(_UNETS)))
    return model
