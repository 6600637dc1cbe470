"""Admission and fair dispatch of sampling requests: a rate per key (a token bucket), bounded
places (503 when full, 429 past a key's share), slots round-robin over keys, deadlines
honoured while queued (504), and a client that hangs up frees its place."""

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from fastapi import HTTPException


class Deadline(Exception):
    pass


class Gone(Exception):
    """The client hung up: its work is abandoned."""


@dataclass(frozen=True)
class Caller:
    user: str
    key: str  # the key's hash: the unit of fairness


@dataclass
class TokenBucket:
    """A key's rate: `burst` requests at once, refilled at `rate` per second. `take` spends a
    token and returns 0, or returns the seconds until one is there (and spends nothing)."""

    rate: float
    burst: int
    tokens: float = field(init=False)
    at: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        self.tokens = float(self.burst)

    def take(self, now: float) -> float:
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Admission:
    """Admission and dispatch of sampling requests; used on the event loop only (no locks).

    At most `workers` requests run and `queue` more wait; one key holds at most `per_key` of
    those places (429 past it). A freed slot goes to the waiting key served least recently,
    so a key that floods waits behind its own requests, not in front of everyone else's."""

    def __init__(self, workers: int, queue: int, per_key: int, rate: float = 0.0, burst: int = 1):
        self.free, self.limit, self.per_key = workers, workers + queue, per_key
        self.admitted, self.held = 0, {}
        self.waiting: dict[str, deque[asyncio.Future]] = {}
        self.last: dict[str, int] = {}  # key -> dispatch number when last given a slot
        self.dispatched = 0
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, TokenBucket] = {}  # keys of the policy only: bounded by its size
        self.stalled: dict[str, int] = {}  # key -> its over-rate answers being held back now

    async def limit_rate(self, key: str, now: float | None = None) -> None:
        """Spend one of the key's tokens, or answer 429 with Retry-After once a token is due. The
        answer is held back until then (at most 4 x `per_key` at once per key, the rest are
        answered at once), so a client that retries without waiting costs a sleeping
        coroutine, not a busy loop of refusals."""
        if self.rate <= 0:
            return
        bucket = self.buckets.setdefault(key, TokenBucket(self.rate, self.burst))
        wait = bucket.take(time.monotonic() if now is None else now)
        if not wait:
            return
        if self.stalled.get(key, 0) < 4 * self.per_key:
            self.stalled[key] = self.stalled.get(key, 0) + 1
            try:
                await asyncio.sleep(min(wait, 1.0))
            finally:
                self.stalled[key] -= 1
            wait = max(0.0, wait - 1.0)
        raise HTTPException(429, f"this key is over its rate of {self.rate:g} requests/s (burst {self.burst}); "
                                 "retry after the time in Retry-After", headers={"Retry-After": str(math.ceil(wait))})

    def admit(self, key: str) -> None:
        if self.admitted >= self.limit:
            raise HTTPException(503, f"server busy ({self.admitted} requests admitted); retry later",
                                headers={"Retry-After": "1"})
        if self.held.get(key, 0) >= self.per_key:
            raise HTTPException(429, f"this key already has {self.per_key} requests admitted; wait for one to end",
                                headers={"Retry-After": "1"})
        self.admitted += 1
        self.held[key] = self.held.get(key, 0) + 1

    def leave(self, key: str) -> None:
        self.admitted -= 1
        self.held[key] -= 1
        if not self.held[key]:
            del self.held[key]

    def _give(self, key: str) -> None:
        self.dispatched += 1
        self.last[key] = self.dispatched

    async def acquire(self, key: str, deadline: float, cancel: threading.Event) -> None:
        """Wait for a slot until `deadline` (Deadline) or until the client hangs up (Gone)."""
        if self.free and not self.waiting:
            self.free -= 1
            self._give(key)
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(key, deque()).append(fut)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Deadline("deadline passed while queued")
                if cancel.is_set():
                    raise Gone()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), min(0.2, left))
                    return
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # a slot was handed over as we gave up: pass it on
            fut.cancel()
            q = self.waiting.get(key)
            if q is not None and fut in q:
                q.remove(fut)
                if not q:
                    del self.waiting[key]
            raise

    def release(self) -> None:
        while self.waiting:
            key = min(self.waiting, key=lambda k: self.last.get(k, 0))
            q = self.waiting[key]
            fut = q.popleft()
            if not q:
                del self.waiting[key]
            if not fut.done():
                fut.set_result(None)
                self._give(key)
                return
        self.free += 1
