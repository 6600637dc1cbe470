"""A small thread-safe LRU map, shared by the model cache (cdm.sampling.loading) and the
pipeline cache (cdm.sampling.pipeline)."""

from __future__ import annotations

import threading
from typing import Callable


class LRU:
    """Up to `size` values, least recently used dropped first. `get` builds a missing value
    outside the lock (two threads may build the same value; the last one is kept)."""

    def __init__(self, size: int):
        self.size = size
        self._items: dict = {}
        self._lock = threading.Lock()

    def get(self, key, build: Callable[[], object]):
        with self._lock:
            if key in self._items:
                self._items[key] = self._items.pop(key)  # most recently used last
                return self._items[key]
        value = build()
        self.put(key, value)
        return value

    def put(self, key, value) -> None:
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.pop(next(iter(self._items)))

    def drop(self, stale: Callable[[object], bool]) -> None:
        """Drop every entry whose key is `stale`."""
        with self._lock:
            for key in [k for k in self._items if stale(k)]:
                del self._items[key]

    def keys(self) -> list:
        with self._lock:
            return list(self._items)

    def values(self) -> list:
        with self._lock:
            return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)
