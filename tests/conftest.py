"""Tiny seeded stores for the tests: a 'tiny' UNet (~20k params) and a few dozen steps."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cdm.app import api
from cdm.store.data import Item, load_builtin
from cdm.store.recipes import RouterConfig, TrainConfig

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY = TrainConfig(preset="tiny", steps=24, batch_size=16, warmup=5, checkpoint_every=4)
TINY_ROUTER = RouterConfig(steps=12, batch_size=32, warmup=2, checkpoint_every=4)


@pytest.fixture(scope="session")
def digits() -> list[Item]:
    """A fixed 160-item subset of the builtin digits' training split."""
    return load_builtin("digits")[:160]


def make_store(path, items, split="iid:3", slices=2, seed=0, train=TINY, source="digits"):
    store = api.init_store(path, 8, 1, seed, slices, 16, train, TINY_ROUTER)
    api.ingest(store, source, items, split)
    return store


def digests(store) -> dict[str, str]:
    return {name: row.digest for name, row in store.models().items()}


def noise_item(seed: int, label: str | None = "0") -> Item:
    px = np.random.RandomState(seed).randint(0, 256, (8, 8, 1)).astype(np.uint8)
    return Item(px, label, f"noise[{seed}]")
