"""Routers: w_i(x_t, t) = p(compartment i | x_t), the mixture's weights (Golatkar et al. 2023, Eq. 3).

A router keeps a state per row (log-weights or offsets, float64, -inf where a compartment
is not eligible). `weights` reads it; a stateful router also learns from each sampler step
through `update`. Which routers exist, and what each needs, is cdm.sampling.router_specs
(no torch there): adding a router is one class here and one line there (docs/routers.md).
"""

from __future__ import annotations

from typing import Protocol

import torch

LOG_CLAMP = 50.0  # ito: keep log-weights within this margin of the leader (no effect at float precision)


class Router(Protocol):
    name: str

    def init(self, log_prior: torch.Tensor) -> torch.Tensor: ...

    def weights(self, state: torch.Tensor, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor: ...

    def update(self, state: torch.Tensor, x: torch.Tensor, x_prev: torch.Tensor, eps: torch.Tensor,
               alpha_bar: float, alpha_bar_prev: float) -> torch.Tensor: ...


def _eligible(log_prior: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(log_prior), 0.0, -torch.inf).to(torch.float64)


class UniformRouter:
    """Naive averaging over the eligible compartments: the baseline CDM improves on."""

    name = "uniform"

    def init(self, log_prior):
        return _eligible(log_prior)

    def weights(self, state, x, t, cond):
        return torch.softmax(state, dim=1)

    def update(self, state, x, x_prev, eps, alpha_bar, alpha_bar_prev):
        return state


class ClassifierRouter:
    """The CDM paper's router: w = softmax of a noisy-input compartment classifier.

    The classifier was trained on the union of its compartments, so its softmax already
    carries the priors n_i (or n_{i,c} for a label); a composed subset takes the softmax
    over that subset's logits, which is the posterior restricted to the subset.
    """

    name = "classifier"

    def __init__(self, net, columns: list[int]):
        self.net, self.columns = net, columns

    def init(self, log_prior):
        return _eligible(log_prior)

    def weights(self, state, x, t, cond):
        logits = self.net(x, t, cond)[:, self.columns].to(torch.float64)
        return torch.softmax(logits + state, dim=1)

    def update(self, state, x, x_prev, eps, alpha_bar, alpha_bar_prev):
        return state


class ItoRouter:
    """Training-free router: track log q_i(x_t) along the trajectory (SuperDiff OR, Skreta et al. 2024).

    Kernel-form update of docs/routers.md Sec. 2, for the stochastic DDPM sampler:
        dl_i = -||x_{t-1} - mu_i(x_t)||^2 / (2 beta_t),  mu_i = (x_t - beta_t eps_i / sqrt(1 - abar_t)) / sqrt(alpha_t)
    with l_i(T) = log pi_i and w = softmax(l). Nothing in it was ever fit to data.
    """

    name = "ito"

    def init(self, log_prior):
        return log_prior.to(torch.float64).clone()

    def weights(self, state, x, t, cond):
        return torch.softmax(state, dim=1)

    def update(self, state, x, x_prev, eps, alpha_bar, alpha_bar_prev):
        alpha = alpha_bar / alpha_bar_prev
        beta = 1.0 - alpha
        c = 1.0 / (1.0 - alpha_bar) ** 0.5
        xd, xp, ed = x.to(torch.float64), x_prev.to(torch.float64), eps.to(torch.float64)
        mu = (xd[:, None] - beta * c * ed) / alpha ** 0.5  # (B, K, ...)
        dl = -((xp[:, None] - mu) ** 2).flatten(2).sum(-1) / (2.0 * beta)
        state = state + dl
        state = state - state.max(dim=1, keepdim=True).values
        return torch.where(torch.isfinite(state), state.clamp(min=-LOG_CLAMP), state)
