"""Routers, the mixture denoiser and the samplers: the heart of CDM.

Every denoiser has one calling convention, `denoiser(x, t, labels) -> eps`, with `t` a
(B,) long tensor of training timesteps and `labels` a (B,) long tensor (the null id for
unconditional rows). A `Mixture` of denoisers is itself a denoiser:

    eps(x_t, t) = sum_i w_i(x_t, t) eps_i(x_t, t),   w_i = p(compartment i | x_t)

(Golatkar et al. 2023, Eq. 3; derivation in docs/routers.md Sec. 1).
Routers compute w per row; a stateful router (`ito`) is told each step's outcome through
`Mixture.observe`. Schedulers come from diffusers; the loop is a small flat function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from diffusers import DDIMScheduler, DDPMScheduler

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# all denoisers at once: (x, t, labels, keep (B, K) bool or None = all) -> eps (B, K, C, H, W), zero where not kept
Joint = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
SAMPLERS = ("ddpm", "ddim")
LOG_CLAMP = 50.0  # ito: keep log-weights within this margin of the leader (no effect at float precision)


def unet_denoiser(unet) -> Denoiser:
    """Adapt a diffusers UNet2DModel to the calling convention."""

    def eps(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return unet(x, t, class_labels=labels).sample

    return eps


@dataclass(frozen=True)
class RouterSpec:
    """What a router needs: the registry below is the one place router names are spelled."""

    name: str
    stochastic: bool  # needs the stochastic (DDPM) sampler: its estimate is biased under DDIM
    stateful: bool  # carries state across steps, updated with each step's outcome (`Mixture.observe`)
    trained: bool  # a network fit to every compartment's data (stale when the data changes)
    summary: str


ROUTER_SPECS = {s.name: s for s in (  # the first is the default
    RouterSpec("ito", True, True, False, "training-free; tracks each compartment's density along the "
                                         "trajectory; needs the ddpm sampler"),
    RouterSpec("classifier", False, False, True, "the paper's router: a network trained on noisy samples of "
                                                 "every compartment, also those outside a restricted set"),
    RouterSpec("uniform", False, False, False, "naive averaging, the baseline"),
)}
ROUTERS = tuple(sorted(ROUTER_SPECS))


def router_help() -> str:
    return "; ".join(f"{s.name}: {s.summary}" for s in ROUTER_SPECS.values())


class Router(Protocol):
    spec: RouterSpec

    def init(self, log_prior: torch.Tensor) -> torch.Tensor: ...

    def weights(self, state: torch.Tensor, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def update(self, state: torch.Tensor, x: torch.Tensor, x_prev: torch.Tensor, eps: torch.Tensor,
               alpha_bar: float, alpha_bar_prev: float) -> torch.Tensor: ...


class UniformRouter:
    """Naive averaging over the eligible compartments: the baseline CDM improves on."""

    spec = ROUTER_SPECS["uniform"]

    def init(self, log_prior):
        return torch.where(torch.isfinite(log_prior), 0.0, -torch.inf).to(torch.float64)

    def weights(self, state, x, t, labels):
        return torch.softmax(state, dim=1)

    def update(self, state, x, x_prev, eps, alpha_bar, alpha_bar_prev):
        return state


class ClassifierRouter:
    """The CDM paper's router: w = softmax of a noisy-input compartment classifier.

    The classifier was trained on the union of its compartments, so its softmax already
    carries the priors n_i (or n_{i,c} for a label); a composed subset takes the softmax
    over that subset's logits, which is the posterior restricted to the subset.
    """

    spec = ROUTER_SPECS["classifier"]

    def __init__(self, net, columns: list[int]):
        self.net, self.columns = net, columns

    def init(self, log_prior):
        return torch.where(torch.isfinite(log_prior), 0.0, -torch.inf).to(torch.float64)

    def weights(self, state, x, t, labels):
        logits = self.net(x, t, labels)[:, self.columns].to(torch.float64)
        return torch.softmax(logits + state, dim=1)

    def update(self, state, x, x_prev, eps, alpha_bar, alpha_bar_prev):
        return state


class ItoRouter:
    """Training-free router: track log q_i(x_t) along the trajectory (SuperDiff OR, Skreta et al. 2024).

    Kernel-form update of docs/routers.md Sec. 2, for the stochastic DDPM sampler:
        dl_i = -||x_{t-1} - mu_i(x_t)||^2 / (2 beta_t),  mu_i = (x_t - beta_t eps_i / sqrt(1 - abar_t)) / sqrt(alpha_t)
    with l_i(T) = log pi_i and w = softmax(l). Nothing in it was ever fit to data.
    """

    spec = ROUTER_SPECS["ito"]

    def init(self, log_prior):
        return log_prior.to(torch.float64).clone()

    def weights(self, state, x, t, labels):
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


class Mixture:
    """A composition of denoisers that is itself a denoiser: eps = sum_i w_i eps_i.

    `log_prior` (rows, K) holds log pi_i per row, -inf where compartment i is not eligible
    (e.g. it has no item of that row's label). Call `observe` after each sampler step.

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
      guidance); under guidance a sample's conditional and unconditional rows share the draw.
    - `subset` (a count m): each sample composes only m compartments, drawn once at its
      first step with probability proportional to the sum of their priors (draw one by the
      prior, the rest uniformly). Averaged over the draw, the m-subset composition is the
      union, sum_S P(S) sum_{i in S} pi_i p_i / pi_S = sum_i pi_i p_i (exact in distribution
      like `commit`, which is the case m = 1 at the first step), while a few compartments
      still share the high-noise steps where averaging predictions pays.
    With all three None every compartment is evaluated: the dense mixture, bit for bit.
    `joint`, if given, evaluates all denoisers in one call (adapters on one base).
    """

    def __init__(self, denoisers: list[Denoiser], router: Router, log_prior: torch.Tensor,
                 prune: float | None = None, commit: float | None = None, generator: torch.Generator | None = None,
                 num_train_timesteps: int = 1000, joint: Joint | None = None, subset: int | None = None):
        if log_prior.shape[1] != len(denoisers):
            raise ValueError(f"log_prior has {log_prior.shape[1]} columns for {len(denoisers)} denoisers")
        if not torch.isfinite(log_prior).any(dim=1).all():
            raise ValueError("every row needs at least one eligible compartment")
        if prune is not None and not prune >= 0:
            raise ValueError(f"prune must be a margin >= 0 (nats) or None, got {prune}")
        if commit is not None and not 0 <= commit <= 1:
            raise ValueError(f"commit must be a fraction of the trajectory in [0, 1] or None, got {commit}")
        if subset is not None and not (isinstance(subset, int) and subset >= 1):
            raise ValueError(f"subset must be a number of compartments >= 1 or None, got {subset!r}")
        self.denoisers, self.router, self.prune, self.joint = denoisers, router, prune, joint
        self.subset, self.log_prior = subset, log_prior
        self.commit_t = None if commit is None else (1 - commit) * (num_train_timesteps - 1)
        self.generator = generator or torch.Generator().manual_seed(0)
        self.tie: int | None = None  # set by `sample` under guidance: rows i and i + tie are one sample
        self.committed = self.drawn = False
        self.state = router.init(log_prior)
        self.active = torch.isfinite(log_prior)  # (rows, K): evaluated in the last call
        self.evaluations = 0  # rows x models actually evaluated, for the benchmarks
        self.last_weights: torch.Tensor | None = None
        self._last: tuple | None = None

    @property
    def sparse(self) -> bool:
        return self.prune is not None or self.commit_t is not None or self.subset is not None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.sparse:
            if self.joint is not None:
                eps = self.joint(x, t, labels, None)
            else:
                eps = torch.stack([d(x, t, labels) for d in self.denoisers], dim=1)  # (B, K, C, H, W)
            w = self.router.weights(self.state, x, t, labels)
            self.evaluations += x.shape[0] * len(self.denoisers)
        elif self.joint is not None:
            w, keep = self._sparse_weights(x, t, labels)
            eps = self.joint(x, t, labels, keep)
            self.evaluations += int(keep.sum())
        else:
            w, keep = self._sparse_weights(x, t, labels)
            eps = x.new_zeros((x.shape[0], len(self.denoisers), *x.shape[1:]))
            for k, d in enumerate(self.denoisers):
                rows = keep[:, k].nonzero().flatten()
                if len(rows) == len(x):
                    eps[:, k] = d(x, t, labels)
                elif len(rows):
                    eps[rows, k] = d(x[rows], t[rows], labels[rows])
                self.evaluations += len(rows)
        self.last_weights, self._last = w, (x, eps)
        wf = w.to(eps.dtype)
        out = wf[:, 0, None, None, None] * eps[:, 0]
        for k in range(1, eps.shape[1]):
            out = out + wf[:, k, None, None, None] * eps[:, k]
        return out

    def _sparse_weights(self, x, t, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights (zero where not evaluated) and the (rows, K) mask of what to evaluate."""
        if self.committed:
            return self.active.to(torch.float64), self.active
        if self.subset is not None and not self.drawn:
            self._draw_subsets()
        w = self.router.weights(self.state, x, t, labels)
        keep = w > 0
        if self.prune is not None:
            logw = torch.log(w)
            keep &= logw >= logw.max(dim=1, keepdim=True).values - self.prune
        if self.router.spec.stateful:  # sticky: a dropped density cannot be tracked again
            keep &= self.active
        cut = (keep != (w > 0)).any(dim=1, keepdim=True)  # rows that lost a compartment: renormalise
        masked = torch.where(keep, w, 0.0)
        w = torch.where(cut, masked / masked.sum(1, keepdim=True), w)
        if self.commit_t is not None and float(t.max()) <= self.commit_t:
            draw_rows = w if self.tie is None else w[:self.tie]
            pick = torch.multinomial(draw_rows.float().cpu(), 1, generator=self.generator).flatten()
            if self.tie is not None:
                pick = torch.cat([pick, pick])
            keep = torch.nn.functional.one_hot(pick, w.shape[1]).bool().to(w.device)
            w, self.committed = keep.to(torch.float64), True
        self.active = keep
        return w, keep

    def _draw_subsets(self) -> None:
        """Restrict each sample to `subset` compartments S, drawn with P(S) proportional to pi_S."""
        lp = self.log_prior if self.tie is None else self.log_prior[:self.tie]
        lp = lp.to(torch.float64).cpu()
        eligible = torch.isfinite(lp)
        prior = torch.exp(lp - lp.max(dim=1, keepdim=True).values)  # 0 where not eligible
        first = torch.multinomial(prior.float(), 1, generator=self.generator)  # one by the prior
        keys = torch.rand(lp.shape, generator=self.generator, dtype=torch.float64)  # the rest uniformly
        keys = torch.where(eligible, keys, -1.0).scatter(1, first, 2.0)
        rank = keys.argsort(dim=1, descending=True).argsort(dim=1)
        chosen = (rank < self.subset) & eligible
        if self.tie is not None:
            chosen = torch.cat([chosen, chosen])
        chosen = chosen.to(self.state.device)
        self.state = torch.where(chosen, self.state, -torch.inf)
        self.active, self.drawn = chosen, True

    def observe(self, x_prev: torch.Tensor, alpha_bar: float, alpha_bar_prev: float) -> None:
        x, eps = self._last
        self.state = self.router.update(self.state, x, x_prev, eps, alpha_bar, alpha_bar_prev)
        if self.sparse and self.router.spec.stateful:
            self.state = torch.where(self.active, self.state, -torch.inf)

    def final_weights(self) -> torch.Tensor:
        """Weights after the last observed step (for `ito`, they describe x_0)."""
        if self.router.spec.stateful:
            return torch.softmax(self.state, dim=1)
        return self.last_weights


@dataclass
class SampleResult:
    images: torch.Tensor  # (B, C, H, W) in [-1, 1]
    weights: torch.Tensor | None  # (steps, B, K): router weights used at each step (conditional rows)
    final: torch.Tensor | None  # (B, K)

    @property
    def attribution(self) -> torch.Tensor:
        """Trajectory-averaged weights per sample (rows sum to 1)."""
        return self.weights.mean(dim=0)


def make_scheduler(config: dict, sampler: str):
    if sampler == "ddpm":
        return DDPMScheduler.from_config(config)
    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    raise ValueError(f"unknown sampler {sampler!r}; available: {', '.join(SAMPLERS)}")


@torch.no_grad()
def sample(denoiser: Denoiser | Mixture, scheduler, noise: torch.Tensor, labels: torch.Tensor | None,
           null_label: int, guidance: float, steps: int, generator: torch.Generator,
           callback: Callable[[int, int], None] | None = None) -> SampleResult:
    """DDPM ancestral or DDIM (eta=0) sampling with classifier-free guidance.

    With a label, the denoiser sees the conditional rows and (if guidance != 1) the
    unconditional rows stacked, and eps = eps_u + g (eps_c - eps_u) (Ho & Salimans 2022).
    A `Mixture` keeps separate router state for both row sets, as docs/routers.md
    Sec. 4 prescribes: CFG on the union-equivalent model.
    """
    mixture = denoiser if isinstance(denoiser, Mixture) else None
    stochastic = isinstance(scheduler, DDPMScheduler)
    if mixture is not None and mixture.router.spec.stochastic and not stochastic:
        raise ValueError(f"router {mixture.router.spec.name!r} needs the stochastic DDPM sampler "
                         f"(its density estimate is biased under a deterministic one); use --sampler ddpm "
                         f"or the classifier router")
    if steps < 1 or steps > scheduler.config.num_train_timesteps:
        raise ValueError(f"steps must be in 1..{scheduler.config.num_train_timesteps}, got {steps}")
    b, dev = noise.shape[0], noise.device
    null = torch.full((b,), null_label, dtype=torch.long, device=dev)
    if labels is None:
        rows, cfg = null, False
    elif guidance == 1.0:
        rows, cfg = labels, False
    else:
        rows, cfg = torch.cat([labels, null]), True
    if mixture is not None and cfg:
        mixture.tie = b
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    abar = scheduler.alphas_cumprod
    x = noise * scheduler.init_noise_sigma
    trace = []
    for i, t in enumerate(timesteps):
        xin = torch.cat([x, x]) if cfg else x
        tt = torch.full((xin.shape[0],), t, dtype=torch.long, device=dev)
        eps = denoiser(xin, tt, rows)
        if cfg:
            e_c, e_u = eps.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        kw = {"eta": 0.0} if not stochastic else {}
        x_prev = scheduler.step(eps, t, x, generator=generator, **kw).prev_sample
        if mixture is not None:
            trace.append(mixture.last_weights[:b].cpu())
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            mixture.observe(torch.cat([x_prev, x_prev]) if cfg else x_prev, float(abar[t]),
                            float(abar[t_prev]) if t_prev >= 0 else 1.0)
        x = x_prev
        if callback:
            callback(i + 1, len(timesteps))
    if mixture is None:
        return SampleResult(x, None, None)
    return SampleResult(x, torch.stack(trace), mixture.final_weights()[:b].cpu())
