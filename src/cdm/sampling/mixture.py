"""The mixture: a composition of denoisers that is itself a denoiser (Golatkar et al. 2023, Eq. 3).

    eps(x_t, t, cond) = sum_i w_i(x_t, t) eps_i(x_t, t, cond),   w_i = p(compartment i | x_t)

Derivation in docs/routers.md Sec. 1. The weights come from a router (cdm.sampling.routers); a
stateful one learns from each sampler step through `Mixture.on_step`, which the sampler
calls like any other step hook, so a mixture wrapped in guidance (or anything else) still
routes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.denoisers import Cond, Denoiser, Joint, RoutedJoint, separate
from .router_specs import check_sampler, router_spec
from .routers import Router
from .settings import Sparsity
from .sampler import Step

@dataclass(frozen=True)
class Routes:
    """Each row's one denoiser `pick` (B,): the rows in `order` (grouped by denoiser, rows in
    ascending order within each), `counts` rows per denoiser, `back` their places again."""

    pick: torch.Tensor
    order: torch.Tensor
    counts: list[int]
    back: torch.Tensor

    @classmethod
    def of(cls, pick: torch.Tensor, k: int) -> "Routes":
        order = torch.argsort(pick, stable=True)
        return cls(pick, order, torch.bincount(pick, minlength=k).tolist(), torch.argsort(order))


class Mixture:
    """eps = sum_i w_i eps_i over `denoisers`, weighted per row by `router`.

    `log_prior` (rows, K) holds log pi_i per row, -inf where compartment i is not eligible
    (e.g. it has no item of that row's label). `copies` says how many stacked copies of each
    sample the mixture is called with: 2 inside classifier-free guidance (conditional rows,
    then null rows, each with its own prior and router state), else 1. Register `on_step`
    as a sampler hook.

    Sparse composition; each model then runs once per step on just the rows that need it:
    - `prune` (nats): a compartment whose log-weight in a row falls more than `prune` below
      the leader's is not evaluated for that row, and the remaining weights are renormalised.
      The posterior p(i | x_t) is a martingale along the reverse trajectory, so a compartment
      at weight w later wins with probability at most ~2w: the margin bounds the error.
      Under a stateful router (`ito`) a pruned compartment is dropped for good.
    - `commit` (fraction of the trajectory, 0..1): once that much of the trajectory is done,
      each sample draws one compartment from its current weights and continues with it alone.
      Given x_t, the mixture's reverse process is component i's with probability p(i | x_t),
      so this samples the same distribution (exactly, for exact models and weights, without
      guidance); under guidance a sample's copies share the draw.
    - `subset` (a count m): each sample composes only m compartments, drawn once at its
      first step with probability proportional to the sum of their priors (draw one by the
      prior, the rest uniformly). Averaged over the draw, the m-subset composition is the
      union, sum_S P(S) sum_{i in S} pi_i p_i / pi_S = sum_i pi_i p_i (exact in distribution
      like `commit`, which is the case m = 1 at the first step), while a few compartments
      still share the high-noise steps where averaging predictions pays.
    With all three None every compartment is evaluated: the dense mixture, bit for bit.
    `joint`, if given, evaluates all denoisers in one call (adapters on one base); by default
    each is called in turn (`separate`).
    """

    def __init__(self, denoisers: list[Denoiser], router: Router, log_prior: torch.Tensor,
                 sparsity: Sparsity = Sparsity(), *, generator: torch.Generator | None = None,
                 num_train_timesteps: int = 1000, joint: Joint | None = None, copies: int = 1):
        if log_prior.shape[1] != len(denoisers):
            raise ValueError(f"log_prior has {log_prior.shape[1]} columns for {len(denoisers)} denoisers")
        if not torch.isfinite(log_prior).any(dim=1).all():
            raise ValueError("every row needs at least one eligible compartment")
        if copies < 1 or log_prior.shape[0] % copies:
            raise ValueError(f"{log_prior.shape[0]} prior rows are not {copies} copies of the samples")
        prune, commit, subset = sparsity.prune, sparsity.commit, sparsity.subset
        self.denoisers, self.router, self.router_spec, self.prune = denoisers, router, router_spec(router), prune
        self.joint = joint or separate(denoisers)
        self.subset, self.log_prior, self.copies = subset, log_prior, copies
        self.samples = log_prior.shape[0] // copies  # rows of one copy
        self.commit_t = None if commit is None else (1 - commit) * (num_train_timesteps - 1)
        self.generator = generator or torch.Generator().manual_seed(0)
        self.committed = self.drawn = self._dropped = False
        self.state = router.init(log_prior)
        self.active = torch.isfinite(log_prior)  # (rows, K): evaluated in the last call
        self.evaluations = 0  # rows x models actually evaluated, for the benchmarks
        self.last_weights: torch.Tensor | None = None
        self.trace: list[torch.Tensor] = []  # weights of the first copy's rows at each step (on the CPU)
        self._last: tuple | None = None

    @property
    def sparse(self) -> bool:
        return self.prune is not None or self.commit_t is not None or self.subset is not None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        if self.committed and isinstance(self.joint, RoutedJoint):  # each row through its one model
            self.last_weights = self.active.to(torch.float64)
            self.evaluations += len(x)
            return self.joint.routed(x, t, cond, self.routes) + 0.0  # (+ 0.0: as below)
        if not self.sparse:
            eps = self.joint(x, t, cond, None)
            w = self.router.weights(self.state, x, t, cond)
            self.evaluations += x.shape[0] * len(self.denoisers)
        else:
            w, keep = self._sparse_weights(x, t, cond)
            eps = self.joint(x, t, cond, keep)
            self.evaluations += len(x) if self.committed else int(keep.sum())
        self.last_weights, self._last = w, (x, eps)
        if self.committed:  # one-hot weights: the sum below is each row's own model's eps, and + 0.0 turns
            return eps[torch.arange(len(x), device=x.device), self.routes.pick] + 0.0  # -0.0 to +0.0 as it does
        wf = w.to(eps.dtype)
        out = wf[:, 0, None, None, None] * eps[:, 0]
        for k in range(1, eps.shape[1]):
            out = out + wf[:, k, None, None, None] * eps[:, k]
        return out

    def _sparse_weights(self, x, t, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights (zero where not evaluated) and the (rows, K) mask of what to evaluate."""
        if self.committed:
            return self.active.to(torch.float64), self.active
        if self.subset is not None and not self.drawn:
            self._draw_subsets()
        w = self.router.weights(self.state, x, t, cond)
        keep = w > 0
        if self.prune is not None:
            logw = torch.log(w)
            keep &= logw >= logw.max(dim=1, keepdim=True).values - self.prune
        if self.router_spec.stateful:  # sticky: a dropped density cannot be tracked again
            keep &= self.active
        cut = (keep != (w > 0)).any(dim=1, keepdim=True)  # rows that lost a compartment: renormalise
        masked = torch.where(keep, w, 0.0)
        w = torch.where(cut, masked / masked.sum(1, keepdim=True), w)
        if self.commit_t is not None and float(t.max()) <= self.commit_t:
            pick = torch.multinomial(w[:self.samples].float().cpu(), 1, generator=self.generator).flatten()
            self.routes = Routes.of(pick.repeat(self.copies).to(w.device), w.shape[1])
            keep = torch.nn.functional.one_hot(self.routes.pick, w.shape[1]).bool()
            w, self.committed = keep.to(torch.float64), True
        self.active = keep
        return w, keep

    def _draw_subsets(self) -> None:
        """Restrict each sample to `subset` compartments S, drawn with P(S) proportional to pi_S."""
        lp = self.log_prior[:self.samples].to(torch.float64).cpu()
        eligible = torch.isfinite(lp)
        prior = torch.exp(lp - lp.max(dim=1, keepdim=True).values)  # 0 where not eligible
        first = torch.multinomial(prior.float(), 1, generator=self.generator)  # one by the prior
        keys = torch.rand(lp.shape, generator=self.generator, dtype=torch.float64)  # the rest uniformly
        keys = torch.where(eligible, keys, -1.0).scatter(1, first, 2.0)
        rank = keys.argsort(dim=1, descending=True).argsort(dim=1)
        chosen = ((rank < self.subset) & eligible).repeat(self.copies, 1).to(self.state.device)
        self.state = torch.where(chosen, self.state, -torch.inf)
        self.active, self.drawn = chosen, True

    def on_step(self, step: Step) -> None:
        """Sampler hook: record this step's weights, and tell the router where the step went."""
        check_sampler(self.router, step.stochastic)
        self.trace.append(self.last_weights[:self.samples].cpu())
        if self.committed:  # each sample runs one model from here on: its weights stay one-hot
            if self.router_spec.stateful and not self._dropped:  # its other densities are dropped, once
                self.state, self._dropped = torch.where(self.active, self.state, -torch.inf), True
            return
        x, eps = self._last
        x_prev = step.x_prev.repeat(self.copies, *([1] * (step.x_prev.dim() - 1)))  # every copy moved alike
        self.state = self.router.update(self.state, x, x_prev, eps, step.alpha_bar, step.alpha_bar_prev)
        if self.sparse and self.router_spec.stateful:
            self.state = torch.where(self.active, self.state, -torch.inf)

    def final_weights(self) -> torch.Tensor:
        """Weights of the first copy's rows after the last step (for `ito`, they describe x_0)."""
        w = torch.softmax(self.state, dim=1) if self.router_spec.stateful else self.last_weights
        return w[:self.samples]
