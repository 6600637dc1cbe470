"""`cdm serve`'s settings: one field each, with the help the command shows (its options are
made from these fields). No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    deadline: float = setting(120.0, "Seconds: the default and the cap of a request's deadline (504 past it).")
    device: str = setting("cpu", "torch device, e.g. cpu, cuda.")
    chunk: int = setting(16, "Rows of every batched model call (fixed, so that a request's images do not depend "
                             "on what it was batched with).")
    grouped: bool = setting(False, "Compartments' model calls in one wide call of all of them: more images/s with "
                                   "many small models, equal to separate calls within float rounding.")
    group_chunk: int = setting(8, "With --grouped: rows of each slot of a wide call (one slot per compartment, each "
                                  "round given to those with the most rows waiting).")
