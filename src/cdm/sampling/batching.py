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
`cdm.models.grouped.Group` go through wide calls of the whole group, `group_chunk` rows in each
model's slot (padded), so many small models cost about what one call costs. The shape is
again fixed, and a row's result does not depend on what the other slots or rows hold (also
tested), so a request's bytes stay the same alone or batched, and whichever round its rows
fall in; they differ from separate calls in the last bits, as grouped calls do. A round makes
one wide call per group, its slots given to the models with the most rows waiting (their
weights copied in place, cdm.models.grouped.Group(in_place=True)); rows that do not fit wait for the
next round (continuous batching), so a busy model does not pad every other model's slot.
"""

from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..models.denoisers import Cond, Denoiser, Keyed, cond_cat, cond_rows, fixed_chunks
from ..models.grouped import slot_counts
from ..models.precision import precision


def model_key(denoiser: Denoiser):
    """What identifies a denoiser's weights: calls with the same key may share a batch."""
    return denoiser.key if isinstance(denoiser, Keyed) else denoiser


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
    slot: tuple | None = None  # (Group, model index): the call runs in the group's wide calls
    owner: int = 0  # the sampler's thread
    age: int = 0  # its session's place in line: an older session's rows go first
    done: int = 0  # rows computed so far (a grouped call may take several rounds)
    parts: list[torch.Tensor] = field(default_factory=list)
    out: torch.Tensor | None = None
    error: BaseException | None = None


def pin_threads(n: int) -> None:
    """Set the calling thread's torch thread count for good. torch applies, at a thread's first
    parallel op, the count last set on any thread; reading the count back takes that step now,
    so what other threads set later (sampler_thread) leaves this one alone."""
    torch.set_num_threads(n)
    if torch.get_num_threads() != n:  # another thread set its count in between
        torch.set_num_threads(n)


def sampler_thread() -> None:
    """Call first on a thread that samples through a batcher (`cdm serve`'s workers): its own
    work (router, guidance, scheduler steps) is small, and it must not keep a team of compute
    threads. Once a process holds more OpenMP threads than cores, libgomp stops spin-waiting
    between parallel regions and every region pays a wake-up: the batcher's wide call of 8
    models x 8 rows took 19 ms with its team alone and 39 ms beside one idle team of 2 on 2
    cores. So in a batching process only the batcher's thread computes on several cores."""
    pin_threads(1)


class Batcher:
    """Shares model calls among the samplers of concurrent requests.

        with batcher.session():
            pipe(n, label, settings, batcher=batcher)   # on each request's own thread

    A round starts when every sampler in a session is waiting for its calls. It runs every
    plain call in full, in `chunk`-row calls, and one wide call per group of `group_slots`
    slots (default: one per model of the group) x `group_chunk` rows. Slots go to the models
    with the most rows waiting, so a busy model takes several and an idle one none; rows
    that do not fit wait for the next round, older sessions' rows first (a request's rows may
    span rounds; its calls return when all are done). `threads`: torch threads of the compute
    thread (default: the count when the batcher is made). Counters: `rounds` (rounds run),
    `shared` (rounds that carried rows of two or more requests), `calls` (model calls, a wide
    call counted once)."""

    def __init__(self, chunk: int = 16, group_chunk: int = 8, threads: int | None = None,
                 group_slots: int | None = None, precision: str = "fp32"):
        for name, v in (("chunk", chunk), ("group_chunk", group_chunk), ("threads", 1 if threads is None else threads),
                        ("group_slots", 1 if group_slots is None else group_slots)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.chunk, self.group_chunk, self.group_slots = chunk, group_chunk, group_slots
        self.precision = precision  # of every model call it runs (cdm.models.precision)
        self.threads = torch.get_num_threads() if threads is None else threads
        self.rounds = self.shared = self.calls = 0
        self._cv = threading.Condition()
        self._active = 0  # samplers in a session
        self._todo: list[_Call] = []  # calls not done yet, in arrival order
        self._waiting: set[int] = set()  # threads with calls in _todo
        self._ages = itertools.count()
        self._local = threading.local()
        self._stop = False
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="cdm-batcher", daemon=True)
        self._thread.start()
        ready.wait()  # its thread count is set before any sampler sets its own

    @contextmanager
    def session(self):
        """One sampler takes part while inside (a request, on its own thread)."""
        with self._cv:
            self._active += 1
            self._local.age = next(self._ages)
        try:
            yield self
        finally:
            self._local.age = None
            with self._cv:
                self._active -= 1
                self._cv.notify_all()  # the others may be all that is left to wait for

    def run(self, calls: list[tuple]) -> list[torch.Tensor]:
        """eps of each (denoiser, x, t, cond[, (group, index)]), computed together with the
        other samplers' calls; with a (group, index), in the group's wide calls."""
        age, me = getattr(self._local, "age", None), threading.get_ident()
        if age is None:
            raise RuntimeError("Batcher.run outside a session")
        mine = [_Call(model_key(d), d, x, t, c, *slot, owner=me, age=age) for d, x, t, c, *slot in calls]
        with self._cv:
            self._todo.extend(mine)
            self._waiting.add(me)
            self._cv.notify_all()
            while any(c.out is None and c.error is None for c in mine):
                self._cv.wait()
        error = next((c.error for c in mine if c.error is not None), None)
        if error is not None:
            raise RuntimeError("a batched model call failed") from error
        return [c.out for c in mine]

    def close(self) -> None:
        """Stop the compute thread (its team of threads goes with it); calls still waiting fail."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join()
        with self._cv:
            for c in self._todo:
                c.error = RuntimeError("the batcher was closed")
            self._todo = []
            self._cv.notify_all()

    def _serve(self, ready: threading.Event) -> None:
        pin_threads(self.threads)
        ready.set()
        while True:
            with self._cv:
                while not self._stop and not (self._todo and len(self._waiting) >= self._active):
                    self._cv.wait()
                if self._stop:
                    return
                todo = list(self._todo)
            done: list[tuple[_Call, torch.Tensor]] = []
            owners: set[int] = set()
            try:
                self._compute(todo, done, owners)
                error = None
            except BaseException as e:  # the samplers with rows in this round get it
                error = e
            with self._cv:
                self.rounds += 1
                self.shared += len(owners) > 1
                for c, out in done:
                    c.out = out
                for c in self._todo:
                    if error is not None and c.owner in owners:
                        c.error = error
                self._todo = [c for c in self._todo if c.out is None and c.error is None]
                self._waiting = {c.owner for c in self._todo}
                self._cv.notify_all()

    def _compute(self, todo: list[_Call], done: list, owners: set[int]) -> None:
        """One round: every plain call in full, one wide call per group, at the batcher's precision."""
        with torch.inference_mode(), precision(self.precision, todo[0].x.device):
            self._round(todo, done, owners)

    def _round(self, todo: list[_Call], done: list, owners: set[int]) -> None:
        plain: dict[object, list[_Call]] = {}
        wide: dict[object, list[_Call]] = {}
        for c in sorted(todo, key=lambda c: c.age):  # stable: arrival order within a session
            if c.slot is None:
                plain.setdefault(c.key, []).append(c)
            else:
                wide.setdefault(c.slot[0], []).append(c)
        for group, calls in wide.items():
            self._grouped(group, calls, done, owners)
        for calls in plain.values():
            owners.update(c.owner for c in calls)
            x = torch.cat([c.x for c in calls])
            eps = chunked(calls[0].denoiser, x, torch.cat([c.t for c in calls]), cond_cat(*[c.cond for c in calls]),
                          self.chunk)
            self.calls += -(-len(x) // self.chunk)
            done.extend(zip(calls, eps.split([len(c.x) for c in calls])))

    def _grouped(self, group, calls: list[_Call], done: list, owners: set[int]) -> None:
        """One wide call of `group_slots` slots x `group_chunk` rows. Slots go to the models
        with the most rows waiting (a slot whose weights already belong to such a model keeps
        them; others get theirs copied in place), then fill from `calls` in order; a short slot
        is padded with copies of a row, an idle one computes some row (padding is thrown away)."""
        r, size = self.group_chunk, self.group_slots or group.k
        left = [0] * group.k
        for c in calls:
            left[c.slot[1]] += len(c.x) - c.done
        want = slot_counts(left, r, size)
        held = group.held(size)
        models: list = [None] * size
        for i, m in enumerate(held):
            if m is not None and want[m]:
                models[i], want[m] = m, want[m] - 1
        free = iter(i for i in range(size) if models[i] is None)
        for m in range(group.k):
            for _ in range(want[m]):
                models[next(free)] = m
        for i in free:  # idle slots keep their weights
            models[i] = 0 if held[i] is None else held[i]
        room, taken = [r] * size, []  # taken: (call, slot, first row, rows)
        for c in calls:
            start = c.done
            for i in (i for i in range(size) if models[i] == c.slot[1]):
                n = min(room[i], len(c.x) - start)
                if n:
                    taken.append((c, i, start, n))
                    room[i], start = room[i] - n, start + n
                    owners.add(c.owner)
        # one gather builds the call's input: row j of slot i at j * size + i (rows major, the
        # layout the wide model runs on); a short slot repeats its last row, an idle one row 0
        first, at, place = {}, 0, [[] for _ in range(size)]
        for c in calls:
            first[id(c)], at = at, at + len(c.x)
        for c, i, s, n in taken:
            place[i].extend(range(first[id(c)] + s, first[id(c)] + s + n))
        index = [place[i][min(j, len(place[i]) - 1)] if place[i] else 0 for j in range(r) for i in range(size)]
        idx = torch.tensor(index, device=calls[0].x.device)
        x, t, cond = (torch.cat([getattr(c, a) for c in calls])[idx] for a in ("x", "t", "cond"))  # class labels
        eps = group(x.view(r, size, *x.shape[1:]).transpose(0, 1), t.view(r, size).t(),
                    cond.view(r, size).t(), models, in_place=True)  # (S, r, ...)
        self.calls += 1
        at = [0] * size
        for c, i, s, n in taken:  # in row order for each call
            c.parts.append(eps[i, at[i]:at[i] + n])
            at[i] += n
            c.done += n
            if c.done == len(c.x):
                done.append((c, c.parts[0] if len(c.parts) == 1 else torch.cat(c.parts)))


class BatchedJoint:
    """A mixture's joint (cdm.models.denoisers.RoutedJoint) that sends its calls through
    `batcher`: every compartment's rows of one step go in one round; with `group` (a
    cdm.models.grouped.Group of the denoisers' models, in order), in the group's wide calls."""

    def __init__(self, batcher: Batcher, denoisers: list[Denoiser], group=None):
        self.batcher, self.denoisers, self.group = batcher, denoisers, group

    def _slot(self, k: int) -> tuple:  # where model k's calls run: the group's wide calls, or its own
        return () if self.group is None else ((self.group, k),)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, keep: torch.Tensor | None) -> torch.Tensor:
        calls, cols = [], []
        for k in range(len(self.denoisers)) if keep is None else keep.any(0).nonzero().flatten().tolist():
            if keep is None:
                calls.append((self.denoisers[k], x, t, cond, *self._slot(k)))
                cols.append((k, slice(None)))
                continue
            rows = keep[:, k].nonzero().flatten()
            calls.append((self.denoisers[k], x[rows], t[rows], cond_rows(cond, rows), *self._slot(k)))
            cols.append((k, rows))
        out = x.new_zeros((x.shape[0], len(self.denoisers), *x.shape[1:]))
        for (k, rows), eps in zip(cols, self.batcher.run(calls)):
            out[rows, k] = eps
        return out

    def routed(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, routes) -> torch.Tensor:
        """Each row through its one denoiser (cdm.sampling.mixture.Routes): the same calls as
        a one-hot `keep` makes, so the same bytes, with fewer small ops around them."""
        xs, ts, cs, calls, at = x[routes.order], t[routes.order], cond_rows(cond, routes.order), [], 0
        for k, n in enumerate(routes.counts):
            if n:
                rows = slice(at, at + n)
                calls.append((self.denoisers[k], xs[rows], ts[rows], cond_rows(cs, rows), *self._slot(k)))
                at += n
        return torch.cat(self.batcher.run(calls))[routes.back]


def batched(batcher: Batcher, denoiser: Denoiser) -> Denoiser:
    """One denoiser whose calls go through `batcher` (the paragon)."""

    def eps(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return batcher.run([(denoiser, x, t, cond)])[0]

    return eps
