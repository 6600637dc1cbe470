"""The Python API in one import, for scripts and notebooks:

    from cdm.app import api
    store = api.init_store("my-store")
    api.ingest(store, "digits", api.load_builtin("digits"), "iid:4")
    api.train(store, paragon=True)
    out = api.sample(store, 8, "3", router="ito")

Sampling many times from one composition: `api.CDMPipeline.from_store(...)` loads it once.

Each name is imported from the layer that owns it when first used (`EXPORTS`), so a
command that needs only the registry (`cdm status`) never imports torch or diffusers.
"""

from __future__ import annotations

import importlib

EXPORTS = {  # name -> "module" or "module:attribute"
    **dict.fromkeys(("CdmError", "DataError", "Forbidden", "NotFound", "NotReady", "StoreError"), "cdm.errors"),
    **dict.fromkeys(("Store", "StoreConfig"), "cdm.store.registry"),
    **dict.fromkeys(("load_builtin", "to_uint8_images"), "cdm.store.data"),
    **dict.fromkeys(("TrainConfig", "RouterConfig", "AdapterConfig", "TextConfig", "EncoderConfig", "LatentConfig",
                     "train_config", "router_config", "adapter_config", "text_config", "encoder_config",
                     "latent_config", "model_seed", "model_shape", "null_label"), "cdm.store.recipes"),
    "load_folder": "cdm.ingest.folders",
    **dict.fromkeys(("ingest", "IngestResult"), "cdm.ingest.ingest"),
    **dict.fromkeys(("init_store", "set_adapters", "set_text"), "cdm.training.configure"),
    **dict.fromkeys(("train", "run_jobs", "TrainError"), "cdm.training.build"),
    **dict.fromkeys(("build_job", "model_state", "train_plan"), "cdm.training.kinds"),
    "plan": "cdm.training.kinds:train_plan",  # the models `train` would (re)train, in order
    **dict.fromkeys(("forget", "ForgetResult"), "cdm.training.forget"),
    "SamplingSettings": "cdm.sampling.settings",
    **dict.fromkeys(("CDMPipeline", "Generation", "ADAPTER_MODES"), "cdm.sampling.pipeline"),
    "sample": "cdm.sampling.pipeline:sample_composition",
    **dict.fromkeys(("load_unet", "load_bank"), "cdm.sampling.loading"),
    **dict.fromkeys(("Policy", "store_policy"), "cdm.sampling.policy"),
    "resize_items": "cdm.ingest.ingest",
    "make_executor": "cdm.training.executor",
    **dict.fromkeys(("EvalConfig", "evaluate_store"), "cdm.evaluation.evaluate"),
    "create_app": "cdm.serving.routes",
    "server_config": "cdm.serving.http",
    "status": "cdm.app.status",
    **dict.fromkeys(("DemoConfig", "run_demo"), "cdm.app.demo"),
}
__all__ = sorted(EXPORTS)


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attr = EXPORTS[name].partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return __all__
