"""The router registry: which routers exist and what each needs (w_i = p(compartment i | x_t),
Golatkar et al. 2023, Eq. 3; the routers themselves are in cdm.sampling.routers).

`ROUTER_SPECS` is the one place router names are spelled: the CLI, the HTTP schema,
policies, the page, the demo and the benches read them from here. No torch here, so
policies and light commands can name routers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RouterSpec:
    """What a router needs, so callers can check and build it without knowing it."""

    name: str
    cls: str  # its class in cdm.sampling.routers
    stochastic: bool  # needs the stochastic (DDPM) sampler: its estimate is biased under DDIM
    stateful: bool  # carries state across steps, updated with each step's outcome (`update`)
    trained: bool  # a network fit to every compartment's data: the "router" model (cdm.training.kinds)
    summary: str


ROUTER_SPECS = {s.name: s for s in (  # the first is the default
    RouterSpec("ito", "ItoRouter", True, True, False, "training-free; tracks each compartment's density along the "
                                                    "trajectory; needs the ddpm sampler"),
    RouterSpec("classifier", "ClassifierRouter", False, False, True, "the paper's router: a network trained on noisy "
                                                                   "samples of every compartment, also those outside "
                                                                   "a restricted set"),
    RouterSpec("uniform", "UniformRouter", False, False, False, "naive averaging, the baseline"),
)}
ROUTERS = tuple(sorted(ROUTER_SPECS))
DEFAULT_ROUTER = next(iter(ROUTER_SPECS))


def router_help() -> str:
    return "; ".join(f"{s.name}: {s.summary}" for s in ROUTER_SPECS.values())


def router_spec(router) -> RouterSpec:
    """The spec of a router, given its name or the router itself."""
    name = router if isinstance(router, str) else router.name
    if name not in ROUTER_SPECS:
        raise ValueError(f"unknown router {name!r}; available: {', '.join(ROUTERS)}")
    return ROUTER_SPECS[name]


def check_sampler(router, stochastic: bool) -> None:
    """Refuse a router under a sampler it cannot work with (the one place this rule lives)."""
    s = router_spec(router)
    if s.stochastic and not stochastic:
        raise ValueError(f"router {s.name!r} needs the stochastic ddpm sampler (its density estimate is biased "
                         f"under a deterministic one); use --sampler ddpm or --router classifier")
