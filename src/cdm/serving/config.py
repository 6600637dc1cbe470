"""`cdm serve`'s settings: one field each, with the help the command shows (its options are
made from these fields). No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..errors import DataError
from ..store.recipes import PRECISIONS


def setting(default, help: str):
    return field(default=default, metadata=dict(help=help))


@dataclass(frozen=True)
class ServeConfig:
    max_n: int = setting(16, "Most images per request.")
    max_steps: int = setting(100, "Most sampler steps per request.")
    max_body: int = setting(16_384, "Largest request body in bytes.")
    max_list: int = setting(256, "Most names (compartments, items) in one request.")
    workers: int = setting(8, "Requests sampled at once; their model calls are batched together.")
    queue: int = setting(8, "Requests waiting beyond those (more get 503).")
    per_key: int = setting(4, "Requests one API key may have running or waiting (more get 429).")
    rate: float = setting(2.0, "Sampling requests per second one API key may start, on average (a token bucket; "
                               "0: no limit). Past it: 429 with Retry-After, answered once a token is due.")
    burst: int = setting(8, "Sampling requests one API key may start at once after a pause (the bucket's size).")
    deadline: float = setting(120.0, "Seconds: the default and the cap of a request's deadline (504 past it).")
    header_timeout: float = setting(10.0, "Seconds a connection may take to send a request's headers (then it is "
                                          "closed): slow or idle connections hold no place.")
    body_timeout: float = setting(10.0, "Seconds a request may take to send its body (408 past it).")
    idle_timeout: float = setting(5.0, "Seconds an idle keep-alive connection is kept open.")
    device: str = setting("cpu", "torch device, e.g. cpu, cuda.")
    precision: str = setting("auto", "Arithmetic of the model calls: fp32, tf32 (CUDA) or bf16 (autocast); auto: "
                                     "bf16 on CUDA, fp32 on a CPU.")
    chunk: int = setting(16, "Rows of every batched model call (fixed, so that a request's images do not depend "
                             "on what it was batched with).")
    grouped: bool = setting(False, "Compartments' model calls in one wide call of all of them: more images/s with "
                                   "many small models, equal to separate calls within float rounding.")
    group_chunk: int = setting(8, "With --grouped: rows of each slot of a wide call (one slot per compartment, each "
                                  "round given to those with the most rows waiting).")

    def __post_init__(self):
        positive = ("max_n", "max_steps", "max_body", "max_list", "workers", "per_key", "burst", "deadline",
                    "header_timeout", "body_timeout", "idle_timeout", "chunk", "group_chunk")
        bad = [f.name for f in fields(self) if (f.name in positive and not getattr(self, f.name) > 0)
               or (f.name in ("queue", "rate") and not getattr(self, f.name) >= 0)]
        if self.precision not in PRECISIONS:
            bad.append("precision")
        if bad:
            raise DataError(f"serve setting(s) out of range: {', '.join(bad)} (counts and times must be > 0; "
                            "queue and rate >= 0)")
