"""How to sample: `SamplingSettings`, the one list of sampling options, and `Sparsity`, the
part of it the mixture reads (cdm.sampling.mixture). No torch here: the CLI builds its
options from these fields and the HTTP service its request schema, bounds included.

Each field's metadata holds its help text, its bounds (`ge`, `le`: inclusive, checked
wherever settings are made), the tighter limits the HTTP service puts on a request (`cap`),
and whether the CLI (`cli`) and the HTTP service (`http`) offer it. A new option is one
field here and the code that reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from ..errors import DataError
from ..store.recipes import PRECISIONS

SAMPLERS = ("ddpm", "ddim")  # diffusers' DDPMScheduler (ancestral) and DDIMScheduler (deterministic)


@dataclass(frozen=True)
class Sparsity:
    """Which compartments the mixture evaluates (Mixture's docstring says how each works).
    All None: every compartment, the dense mixture."""

    prune: float | None = None  # nats below the leader
    commit: float | None = None  # fraction of the trajectory
    subset: int | None = None  # compartments per sample

    def __post_init__(self):
        if self.prune is not None and not self.prune >= 0:  # inf: prune nothing
            raise DataError(f"prune must be a margin >= 0 in nats, got {self.prune}")
        if self.commit is not None and not 0 <= self.commit <= 1:
            raise DataError(f"commit must be a fraction of the trajectory in [0, 1], got {self.commit}")
        if self.subset is not None and not (isinstance(self.subset, int) and self.subset >= 1):
            raise DataError(f"subset must be a number of compartments >= 1, got {self.subset!r}")

    @property
    def dense(self) -> bool:
        return self.prune is None and self.commit is None and self.subset is None


def option(default, help: str, *, ge=None, le=None, cap: tuple = (None, None), finite: bool = True,
           cli: bool = True, http: bool = True):
    """A settings field: its default, help, inclusive bounds (`finite`: infinity is out of
    bounds), the service's limits, and who offers it."""
    return field(default=default, metadata=dict(help=help, ge=ge, le=le, cap=cap, finite=finite, cli=cli, http=http))


@dataclass(frozen=True)
class SamplingSettings:
    """Every option of a sampling call, validated when made (the composition is the pipeline's).

    `prune`, `commit` and `subset` make the composition sparse (`sparsity`); with all None
    every compartment is evaluated. `batch_size` bounds the samples run at once (memory only:
    the images do not depend on it)."""

    steps: int = option(50, "Sampling steps.", ge=1)  # the service caps them at its max_steps
    guidance: float = option(2.0, "Classifier-free guidance scale (1 = none).", ge=0, cap=(0, 20))
    sampler: str = option("ddpm", "ddpm (ancestral) or ddim (deterministic).", http=False)
    seed: int = option(0, "Seed of the noise and of sparse routing's draws.", cap=(0, 2 ** 31 - 1))
    prune: float | None = option(None, "Sparse routing: skip compartments this many nats below the leader "
                                       "(default: evaluate all).", ge=0, cap=(0, 1000), finite=False)  # inf: none
    commit: float | None = option(None, "Sparse routing: after this fraction of the steps, each sample continues "
                                        "with one compartment drawn from its weights.", ge=0, le=1)
    subset: int | None = option(None, "Sparse routing: each sample composes this many compartments, drawn by "
                                      "their priors.", ge=1)  # the service caps it at its max_list
    batch_size: int = option(256, "Most samples run at once (memory only).", ge=1, cli=False, http=False)
    precision: str = option("auto", "Arithmetic of the model calls: fp32, tf32 (CUDA) or bf16 (autocast); auto: "
                                    "bf16 on CUDA, fp32 on a CPU.", http=False)  # the service: cdm serve --precision

    def __post_init__(self):
        for f in fields(self):
            v, m = getattr(self, f.name), f.metadata
            lo, hi = m["ge"], m["le"]
            if v is None or isinstance(v, str):
                continue
            if v != v or m["finite"] and not math.isfinite(v) or lo is not None and v < lo or hi is not None and v > hi:
                what = "a finite number" if m["finite"] and isinstance(v, float) else "a number"
                raise DataError(f"{f.name} must be " + (f"{what} >= {lo}" if hi is None else f"{what} in [{lo}, {hi}]")
                                + f", got {v}")
        if self.sampler not in SAMPLERS:
            raise DataError(f"unknown sampler {self.sampler!r}; available: {', '.join(SAMPLERS)}")
        if self.precision not in PRECISIONS:
            raise DataError(f"unknown precision {self.precision!r}; available: {', '.join(PRECISIONS)}")
        self.sparsity  # checks the sparse options

    @property
    def sparsity(self) -> Sparsity:
        return Sparsity(self.prune, self.commit, self.subset)


# The two places that deliberately sample with other defaults, each said once here:
EVALUATION = SamplingSettings(guidance=1.0, seed=1, batch_size=500)  # `cdm eval` scores the unguided model
SERVED = SamplingSettings(steps=25, guidance=1.0)  # `cdm serve`: a request's defaults, for interactive latency
