"""Batching model calls across concurrent samplers (the way LLM servers batch requests).

Each request keeps its own sampler loop, noise generator, router state, guidance and
deadline; only the model calls are shared. A sampler inside `Batcher.session()` hands its
calls to the batcher and waits; when every sampler in a session is waiting, one compute
thread runs the calls of all of them, grouped by model: the rows of every request that
uses a model (at any timestep) go through that model together. Requests that compose
different compartments share the models they have in common, and a request's rows only
ever go to the models its own mixture asked for.

A row's result must not depend on what it was batched with, so a request's images are the
same bytes alone or batched. Convolution libraries pick kernels by batch size (on CPU,
oneDNN gives last-bit differences between batches of 4, 16 and 64 rows), so every model
call is made on exactly `chunk` rows, the last chunk padded; within a chunk a row's result
does not depend on its position or neighbours (tested in tests/test_batching.py).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .denoisers import Cond, Denoiser, cond_cat, cond_rows, fixed_chunks


def model_key(denoiser: Denoiser):
    """What identifies a denoiser's weights: calls with the same key may share a batch."""
    return getattr(denoiser, "key", denoiser)


def chunked(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Cond, chunk: int) -> torch.Tensor:
    """denoiser on `chunk` rows at a time, the last chunk padded with copies of its first row."""
    return fixed_chunks(lambda rows: denoiser(x[rows], t[rows], cond_rows(cond, rows)), len(x), chunk, x.device)


@dataclass
class _Call:
    key: object
    denoiser: Denoiser
    x: torch.Tensor
    t: torch.Tensor
    cond: Cond
    out: torch.Tensor | None = None


@dataclass
class _Round:
    calls: list[_Call] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None


class Batcher:
    """Shares model calls among the samplers of concurrent requests.

        with batcher.session():
            pipe(n, label, settings, batcher=batcher)   # on each request's own thread

    `chunk` is the number of rows of every model call. Counters: `rounds` (model-call rounds
    run), `shared` (rounds that carried rows of two or more requests), `calls` (model calls)."""

    def __init__(self, chunk: int = 16):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 row, got {chunk}")
        self.chunk = chunk
        self.rounds = self.shared = self.calls = 0
        self._cv = threading.Condition()
        self._active = 0  # samplers in a session
        self._round = _Round()
        self._waiting: set[int] = set()  # threads whose calls are in the current round
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="cdm-batcher", daemon=True)
        self._thread.start()

    @contextmanager
    def session(self):
        """One sampler takes part while inside (a request, on its own thread)."""
        with self._cv:
            self._active += 1
        try:
            yield self
        finally:
            with self._cv:
                self._active -= 1
                self._cv.notify_all()  # the others may be all that is left to wait for

    def run(self, calls: list[tuple[Denoiser, torch.Tensor, torch.Tensor, Cond]]) -> list[torch.Tensor]:
        """eps of each (denoiser, x, t, cond), computed together with the other samplers' calls."""
        mine = [_Call(model_key(d), d, x, t, c) for d, x, t, c in calls]
        with self._cv:
            if self._active < 1:
                raise RuntimeError("Batcher.run outside a session")
            rnd = self._round
            rnd.calls.extend(mine)
            self._waiting.add(threading.get_ident())
            self._cv.notify_all()
            while not rnd.done:
                self._cv.wait()
        if rnd.error is not None:
            raise RuntimeError("a batched model call failed") from rnd.error
        return [c.out for c in mine]

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join()

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not (self._round.calls and len(self._waiting) >= self._active):
                    self._cv.wait()
                if self._stop:
                    return
                rnd, self._round = self._round, _Round()
                waiting, self._waiting = len(self._waiting), set()
            try:
                self._compute(rnd.calls)
            except BaseException as e:  # every waiting sampler gets it
                rnd.error = e
            with self._cv:
                self.rounds += 1
                self.shared += waiting > 1
                rnd.done = True
                self._cv.notify_all()

    @torch.inference_mode()
    def _compute(self, calls: list[_Call]) -> None:
        groups: dict[object, list[_Call]] = {}
        for c in calls:
            groups.setdefault(c.key, []).append(c)
        for group in groups.values():
            x = torch.cat([c.x for c in group])
            t = torch.cat([c.t for c in group])
            cond = cond_cat(*[c.cond for c in group])
            eps = chunked(group[0].denoiser, x, t, cond, self.chunk)
            self.calls += -(-len(x) // self.chunk)
            for c, e in zip(group, eps.split([len(c.x) for c in group])):
                c.out = e


def batched_joint(batcher: Batcher, denoisers: list[Denoiser]):
    """A mixture's `joint` (cdm.mixture.Joint) that sends its calls through `batcher`: every
    compartment's rows of one step go in one round."""

    def run(x: torch.Tensor, t: torch.Tensor, cond: Cond, keep: torch.Tensor | None) -> torch.Tensor:
        calls, cols = [], []
        for k, d in enumerate(denoisers):
            if keep is None:
                calls.append((d, x, t, cond))
                cols.append((k, slice(None)))
                continue
            rows = keep[:, k].nonzero().flatten()
            if len(rows):
                calls.append((d, x[rows], t[rows], cond_rows(cond, rows)))
                cols.append((k, rows))
        out = x.new_zeros((x.shape[0], len(denoisers), *x.shape[1:]))
        for (k, rows), eps in zip(cols, batcher.run(calls)):
            out[rows, k] = eps
        return out

    return run


def batched(batcher: Batcher, denoiser: Denoiser) -> Denoiser:
    """One denoiser whose calls go through `batcher` (the paragon)."""

    def eps(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return batcher.run([(denoiser, x, t, cond)])[0]

    return eps
