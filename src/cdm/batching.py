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

Grouped calls (`group_chunk`, `cdm serve --grouped`): the rows of every model of one
`cdm.grouped.Group` go through one wide call of the whole group, `group_chunk` rows in each
model's slot (padded), so many small models cost about what one call costs. The shape is
again fixed, and a row's result does not depend on what the other slots or rows hold (also
tested), so a request's bytes stay the same alone or batched; they differ from separate calls
in the last bits, as grouped calls do.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .denoisers import Cond, Denoiser, cond_cat, cond_rows, fixed_chunks, padded


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
    slot: tuple | None = None  # (Group, model index): the call may run in the group's wide call
    out: torch.Tensor | None = None


@dataclass
class _Round:
    calls: list[_Call] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None


def sampler_thread() -> None:
    """Call first on a thread that samples through a batcher (`cdm serve`'s workers). Its own
    work (router, guidance, scheduler steps) is small, so it runs on one core: a thread that
    keeps a team of compute threads, even idle, slows every other thread's torch calls (2 of
    them on 2 cores: 8.4 ms -> 20 ms for one model call), here the batcher's. A served
    4-image request took 206 ms with multi-threaded samplers and 105 ms with these (the same
    script, run both ways)."""
    torch.set_num_threads(1)


class Batcher:
    """Shares model calls among the samplers of concurrent requests.

        with batcher.session():
            pipe(n, label, settings, batcher=batcher)   # on each request's own thread

    `chunk` is the number of rows of every model call, `group_chunk` the rows of each model's
    slot in a grouped call. Counters: `rounds` (model-call rounds run), `shared` (rounds that
    carried rows of two or more requests), `calls` (model calls, a grouped call counted once)."""

    def __init__(self, chunk: int = 16, group_chunk: int = 8):
        for name, v in (("chunk", chunk), ("group_chunk", group_chunk)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1 row, got {v}")
        self.chunk, self.group_chunk = chunk, group_chunk
        self.threads = torch.get_num_threads()  # the compute thread's; samplers may run on one (sampler_thread)
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

    def run(self, calls: list[tuple]) -> list[torch.Tensor]:
        """eps of each (denoiser, x, t, cond[, (group, index)]), computed together with the
        other samplers' calls; with a (group, index), in the group's wide call."""
        mine = [_Call(model_key(d), d, x, t, c, *slot) for d, x, t, c, *slot in calls]
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
        torch.set_num_threads(self.threads)  # a new thread would take the count last set on any thread
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
        wide: dict[object, list[_Call]] = {}
        for c in calls:
            (groups if c.slot is None else wide).setdefault(c.key if c.slot is None else c.slot[0], []).append(c)
        for group, mine in wide.items():
            self._grouped(group, mine)
        for group in groups.values():
            x = torch.cat([c.x for c in group])
            t = torch.cat([c.t for c in group])
            cond = cond_cat(*[c.cond for c in group])
            eps = chunked(group[0].denoiser, x, t, cond, self.chunk)
            self.calls += -(-len(x) // self.chunk)
            for c, e in zip(group, eps.split([len(c.x) for c in group])):
                c.out = e

    def _grouped(self, group, calls: list[_Call]) -> None:
        """The calls on a group's models in wide calls of all of them, `group_chunk` rows in
        each model's slot (slot k is model k), short slots padded with a copy of a row and idle
        ones computing some other model's row; what padding computes is thrown away."""
        r = self.group_chunk
        per = [[c for c in calls if c.slot[1] == k] for k in range(group.k)]
        rows = [None if not cs else (torch.cat([c.x for c in cs]), torch.cat([c.t for c in cs]),
                                     torch.cat([c.cond for c in cs])) for cs in per]
        filler = next(v for v in rows if v is not None)
        out: list[list[torch.Tensor]] = [[] for _ in per]
        for start in range(0, max(len(v[0]) for v in rows if v is not None), r):
            slots = []
            for v in rows:
                n = 0 if v is None else max(0, min(r, len(v[0]) - start))
                idx = padded(torch.arange(start, start + n, device=filler[0].device), r) if n else \
                    torch.zeros(r, dtype=torch.long, device=filler[0].device)
                slots.append((n, [a[idx] for a in (v if n else filler)]))
            eps = group(*(torch.stack([inputs[j] for _, inputs in slots]) for j in range(3)))  # (K, r, ...)
            self.calls += 1
            for k, (n, _) in enumerate(slots):
                if n:
                    out[k].append(eps[k, :n])
        for cs, o in zip(per, out):
            if cs:
                for c, e in zip(cs, torch.cat(o).split([len(c.x) for c in cs])):
                    c.out = e


def batched_joint(batcher: Batcher, denoisers: list[Denoiser], group=None):
    """A mixture's `joint` (cdm.mixture.Joint) that sends its calls through `batcher`: every
    compartment's rows of one step go in one round; with `group` (a cdm.grouped.Group of the
    denoisers' models, in order), in the group's wide calls."""

    def run(x: torch.Tensor, t: torch.Tensor, cond: Cond, keep: torch.Tensor | None) -> torch.Tensor:
        calls, cols = [], []
        for k, d in enumerate(denoisers):
            slot = () if group is None else ((group, k),)
            if keep is None:
                calls.append((d, x, t, cond, *slot))
                cols.append((k, slice(None)))
                continue
            rows = keep[:, k].nonzero().flatten()
            if len(rows):
                calls.append((d, x[rows], t[rows], cond_rows(cond, rows), *slot))
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
