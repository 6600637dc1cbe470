"""Routers and the mixture sampler on a case with a known answer.

Each compartment's data is an isotropic Gaussian N(m_i, s^2 I), so its exact noise
predictor and the exact posterior p(i | x_t) have closed forms (docs/routers.md Sec. 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from diffusers import DDPMScheduler

from cdm.models.denoisers import guided
from cdm.sampling.mixture import Mixture
from cdm.sampling.settings import Sparsity
from cdm.models.nets import RouterNet
from cdm.sampling.routers import ClassifierRouter, ItoRouter, UniformRouter
from cdm.sampling.sampler import make_scheduler, sample
from cdm.store.recipes import RouterConfig, TrainConfig
from cdm.training.job import TrainJob
from cdm.training.loop import train_job

SCHED = DDPMScheduler(**TrainConfig().schedule()).config
MEANS = [torch.full((1, 4, 4), v) for v in (-0.6, 0.2, 0.7)]
S = 0.3
PI = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


class Gaussian:
    def __init__(self, m, abar):
        self.m, self.abar = m, abar

    def __call__(self, x, t, labels):
        ab = self.abar[t].view(-1, 1, 1, 1).to(x.dtype)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.m) / (ab * S * S + 1 - ab)


def exact_posterior(x, t, abar):
    ab = float(abar[t])
    v = ab * S * S + 1 - ab
    ll = torch.stack([-((x - ab ** 0.5 * m) ** 2).flatten(1).sum(1) / (2 * v) for m in MEANS], 1).double()
    return torch.softmax(ll + PI.log(), dim=1)


@dataclass
class Result:
    images: torch.Tensor
    weights: torch.Tensor  # (steps, B, K)
    final: torch.Tensor

    @property
    def attribution(self):
        return self.weights.mean(0)


def compose(mix, sched, noise, steps, g, den=None) -> Result:
    """Sample with the mixture, or with a denoiser wrapping it; its router learns through the step hook."""
    x = sample(den or mix, sched, noise, torch.zeros(len(noise), dtype=torch.long), steps, g, hooks=[mix.on_step])
    return Result(x, torch.stack(mix.trace), mix.final_weights())


def run(router, steps, n=1500, seed=0):
    sched = make_scheduler(SCHED, "ddpm")
    errs = []
    dens = [Gaussian(m, sched.alphas_cumprod) for m in MEANS]
    mix = Mixture(dens, router, PI.log().expand(n, 3))

    def recorder(x, t, cond):  # a denoiser wrapping the mixture: compares the weights it used with the exact ones
        out = mix(x, t, cond)
        errs.append((mix.last_weights - exact_posterior(x, int(t[0]), sched.alphas_cumprod)).abs().mean())
        return out

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, 4, 4, generator=g)
    res = compose(mix, sched, noise, steps, g, den=recorder)
    d = torch.stack([((res.images - m) ** 2).flatten(1).sum(1) for m in MEANS], 1)
    return res, d.argmin(1), float(torch.stack(errs).mean())


@pytest.mark.parametrize("steps,tol", [(1000, 0.01), (50, 0.02)])
def test_ito_router_tracks_the_exact_posterior(steps, tol):
    res, nearest, mae = run(ItoRouter(), steps)
    assert mae < tol  # a reference run measured 0.0022 (1000 steps) and 0.0033 (50 steps)
    frac = torch.bincount(nearest, minlength=3).double() / len(nearest)
    assert torch.allclose(frac, PI, atol=0.04)  # samples follow the union: fractions = priors
    assert (res.final.argmax(1) == nearest).double().mean() > 0.98  # weights pick the right compartment
    assert torch.allclose(res.attribution.sum(1), torch.ones(len(nearest), dtype=torch.float64))


def test_uniform_router_is_clearly_wrong_on_the_same_case():
    res, nearest, _ = run(UniformRouter(), 50)
    frac = torch.bincount(nearest, minlength=3).double() / len(nearest)
    assert (frac - PI).abs().max() > 0.3  # averaging eps collapses onto the middle compartment


def test_ito_router_refuses_a_deterministic_sampler():
    sched = make_scheduler(SCHED, "ddim")
    mix = Mixture([Gaussian(m, sched.alphas_cumprod) for m in MEANS], ItoRouter(), PI.log().expand(2, 3))
    with pytest.raises(ValueError, match="needs the stochastic ddpm sampler"):
        compose(mix, sched, torch.randn(2, 1, 4, 4), 10, torch.Generator())


def test_mixture_of_one_is_the_denoiser_itself():
    sched = make_scheduler(SCHED, "ddpm")
    den = Gaussian(MEANS[1], sched.alphas_cumprod)
    mix = Mixture([den], ItoRouter(), torch.zeros(4, 1, dtype=torch.float64))
    x, t, y = torch.randn(4, 1, 4, 4), torch.full((4,), 300), torch.zeros(4, dtype=torch.long)
    assert torch.equal(mix(x, t, y), den(x, t, y))
    a = compose(mix, make_scheduler(SCHED, "ddpm"), x, 20, torch.Generator().manual_seed(3))
    b = sample(den, make_scheduler(SCHED, "ddpm"), x, y, 20, torch.Generator().manual_seed(3))
    assert torch.equal(a.images, b)


def test_ineligible_compartments_get_zero_weight():
    sched = make_scheduler(SCHED, "ddpm")
    prior = torch.tensor([[0.0, -torch.inf, np.log(0.5)]], dtype=torch.float64).expand(8, 3)
    for router in (ItoRouter(), UniformRouter()):
        mix = Mixture([Gaussian(m, sched.alphas_cumprod) for m in MEANS], router, prior)
        res = compose(mix, make_scheduler(SCHED, "ddpm"), torch.randn(8, 1, 4, 4), 20, torch.Generator().manual_seed(0))
        assert (res.weights[:, :, 1] == 0).all() and (res.final[:, 1] == 0).all()


def test_classifier_router_picks_the_right_compartment(tmp_path):
    """Train the noisy classifier on samples of the two outer Gaussians, then compose them."""
    rng = np.random.RandomState(0)
    means, n = [MEANS[0], MEANS[2]], 400
    px = [np.clip(np.rint((m.numpy().transpose(1, 2, 0) + S * rng.randn(4, 4, 1) + 1) * 127.5), 0, 255)
          for m in means for _ in range(n)]
    cfg = RouterConfig(steps=150, batch_size=64, width=16, warmup=10, checkpoint_every=1000)
    job = TrainJob(name="router", kind="router", hashes=[f"{i:064x}" for i in range(2 * n)], labels=[2] * (2 * n),
                   slices=[0] * n + [1] * n, pixels=np.stack(px).astype(np.uint8),
                   model_config=dict(compartments=["a", "b"], image_size=4, in_channels=1, num_class_embeds=3, width=16),
                   train=cfg, seed=0, staged=False, null_label=2, classes=["a", "b"],
                   schedule=dict(num_train_timesteps=1000, beta_schedule="linear"))
    r = train_job(job, tmp_path / "out", tmp_path / "ck", tmp_path / "work")
    assert r.final_loss < 0.5
    net = RouterNet.from_pretrained(tmp_path / "out").eval()
    sched = make_scheduler(SCHED, "ddpm")
    mix = Mixture([Gaussian(m, sched.alphas_cumprod) for m in means], ClassifierRouter(net, [0, 1]),
                  torch.zeros(300, 2, dtype=torch.float64))
    res = compose(mix, sched, torch.randn(300, 1, 4, 4, generator=torch.Generator().manual_seed(1)), 50,
                  torch.Generator().manual_seed(1))
    d = torch.stack([((res.images - m) ** 2).flatten(1).sum(1) for m in means], 1)
    assert (res.final.argmax(1) == d.argmin(1)).double().mean() > 0.95


def _mix_sample(router, prune, n=600, steps=50, seed=0, commit=None, subset=None):
    sched = make_scheduler(SCHED, "ddpm")
    mix = Mixture([Gaussian(m, sched.alphas_cumprod) for m in MEANS], router, PI.log().expand(n, 3),
                  Sparsity(prune, commit, subset), generator=torch.Generator().manual_seed(5))
    noise = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    return compose(mix, sched, noise, steps, torch.Generator().manual_seed(seed)), mix


def test_pruning_with_an_infinite_margin_is_bit_identical_to_dense():
    for router in (ItoRouter, UniformRouter):
        dense, m0 = _mix_sample(router(), None)
        inf, m1 = _mix_sample(router(), float("inf"))
        assert torch.equal(dense.images, inf.images) and torch.equal(dense.weights, inf.weights)
        assert m0.evaluations == m1.evaluations == 600 * 3 * 50


def test_ito_pruning_saves_evaluations_and_keeps_the_answer():
    dense, md = _mix_sample(ItoRouter(), None)
    res, mp = _mix_sample(ItoRouter(), 5.0)
    assert mp.evaluations < 0.9 * md.evaluations  # weights concentrate late: a safe margin saves ~17% here
    d = torch.stack([((res.images - m) ** 2).flatten(1).sum(1) for m in MEANS], 1)
    frac = torch.bincount(d.argmin(1), minlength=3).double() / len(d)
    assert torch.allclose(frac, PI, atol=0.05)  # still samples the union
    assert (res.final.argmax(1) == d.argmin(1)).double().mean() > 0.98
    dropped = res.weights == 0  # (steps, B, K): once dropped under ito, never back
    assert dropped.any() and (dropped[:-1] <= dropped[1:]).all()
    with pytest.raises(ValueError, match="prune must be a margin"):
        _mix_sample(ItoRouter(), -1.0)


@pytest.mark.parametrize("commit", [0.0, 0.5])
def test_commit_samples_the_same_union_at_a_fraction_of_the_cost(commit):
    res, mix = _mix_sample(ItoRouter(), None, n=1500, commit=commit)
    d = torch.stack([((res.images - m) ** 2).flatten(1).sum(1) for m in MEANS], 1)
    frac = torch.bincount(d.argmin(1), minlength=3).double() / len(d)
    assert torch.allclose(frac, PI, atol=0.04)  # drawing a compartment from p(i | x_t) is exact
    assert mix.evaluations == pytest.approx(1500 * 50 * (1 + 2 * commit), rel=0.03)
    assert (res.final.max(1).values == 1).all() and (res.final.argmax(1) == d.argmin(1)).all()
    with pytest.raises(ValueError, match="commit must be a fraction"):
        _mix_sample(ItoRouter(), None, commit=1.5)


def test_subsets_are_drawn_in_proportion_to_their_prior_mass():
    n = 20000
    prior = torch.tensor([[0.5, 0.3, 0.2, 0.0]], dtype=torch.float64).log().expand(n, 4)  # 4th: not eligible
    mix = Mixture([lambda x, t, y: x] * 4, ItoRouter(), prior, Sparsity(subset=2), generator=torch.Generator().manual_seed(0))
    mix(torch.zeros(n, 1, 1, 1), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))
    assert (mix.active.sum(1) == 2).all() and not mix.active[:, 3].any()
    pairs = {(0, 1): 0.8, (0, 2): 0.7, (1, 2): 0.5}  # P(S) = pi_S / sum over S
    for (i, j), mass in pairs.items():
        got = (mix.active[:, i] & mix.active[:, j]).double().mean()
        assert got == pytest.approx(mass / 2.0, abs=0.01)
    assert mix.evaluations == 2 * n


def test_subset_samples_the_same_union_with_fewer_evaluations():
    res, mix = _mix_sample(ItoRouter(), None, n=1500, subset=2)
    d = torch.stack([((res.images - m) ** 2).flatten(1).sum(1) for m in MEANS], 1)
    frac = torch.bincount(d.argmin(1), minlength=3).double() / len(d)
    assert torch.allclose(frac, PI, atol=0.04)  # averaged over the draws, the subsets compose the union
    assert mix.evaluations == 1500 * 50 * 2
    assert ((res.weights > 0).sum(2) <= 2).all()
    both, _ = _mix_sample(ItoRouter(), None, n=1500, subset=2, commit=0.5)
    d = torch.stack([((both.images - m) ** 2).flatten(1).sum(1) for m in MEANS], 1)
    assert torch.allclose(torch.bincount(d.argmin(1), minlength=3).double() / len(d), PI, atol=0.04)


def test_a_subset_of_every_compartment_is_bit_identical_to_dense():
    dense, _ = _mix_sample(ItoRouter(), None)
    full, _ = _mix_sample(ItoRouter(), None, subset=3)
    assert torch.equal(dense.images, full.images) and torch.equal(dense.weights, full.weights)
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="subset must be"):
            _mix_sample(ItoRouter(), None, subset=bad)


def test_a_mixture_wrapped_in_guidance_still_routes():
    """Guidance stacks each sample's conditional and null rows; the mixture inside keeps a prior
    and router state per copy and learns from the sampler's hook like an unwrapped one. With
    denoisers that ignore the condition both copies agree, so guidance changes nothing at all."""
    n, sched = 64, make_scheduler(SCHED, "ddpm")
    dens = [Gaussian(m, sched.alphas_cumprod) for m in MEANS]
    noise = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    for kw in (dict(), dict(prune=3.0), dict(subset=2, commit=0.5)):
        plain = Mixture(dens, ItoRouter(), PI.log().expand(n, 3), Sparsity(**kw), generator=torch.Generator().manual_seed(1))
        a = compose(plain, make_scheduler(SCHED, "ddpm"), noise, 30, torch.Generator().manual_seed(2))
        inner = Mixture(dens, ItoRouter(), PI.log().expand(2 * n, 3), Sparsity(**kw),
                        generator=torch.Generator().manual_seed(1), copies=2)
        null = torch.full((n,), 9, dtype=torch.long)
        b = compose(inner, make_scheduler(SCHED, "ddpm"), noise, 30, torch.Generator().manual_seed(2),
                    den=guided(inner, 3.0, null))
        assert torch.equal(a.images, b.images) and torch.equal(a.weights, b.weights)
        assert torch.equal(a.final, b.final) and inner.evaluations == 2 * plain.evaluations
        assert (a.final.max(1).values > 0.99).float().mean() > 0.9  # it routed: weights settled on one compartment


def test_a_committed_step_is_the_weighted_sum_bit_for_bit():
    """Once committed, a row's eps is its one compartment's, picked out of the joint's columns
    instead of summed with zero weights for the others: the same bits as the sum."""
    n, sched = 256, make_scheduler(SCHED, "ddpm")
    dens = [Gaussian(m, sched.alphas_cumprod) for m in MEANS]
    mix = Mixture(dens, ItoRouter(), PI.log().expand(n, 3), Sparsity(commit=0.5), generator=torch.Generator().manual_seed(1))
    checked = []

    def summed(x, t, cond):  # the mixture, and the weighted sum over every column it kept
        out = mix(x, t, cond)
        eps = torch.stack([d(x, t, cond) for d in dens], 1) * mix.active[:, :, None, None, None]
        w = mix.last_weights.to(eps.dtype)[:, :, None, None, None]
        ref = w[:, 0] * eps[:, 0]
        for k in range(1, 3):
            ref = ref + w[:, k] * eps[:, k]
        checked.append(mix.committed)
        assert torch.equal(out, ref)
        return out

    compose(mix, sched, torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(3)), 20,
            torch.Generator().manual_seed(4), den=summed)
    assert checked.count(True) == 10  # committed from the step that drew (t <= 499.5 of 20 steps)
