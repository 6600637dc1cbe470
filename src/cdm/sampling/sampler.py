"""The sampler: one small loop that treats every denoiser alike.

Schedulers come from diffusers (DDPM ancestral, Ho et al. 2020; DDIM with eta = 0, Song et
al. 2021). After each step the loop calls its hooks with a `Step` (k-diffusion's callback
style): a mixture's router learns from it (`Mixture.on_step`), progress bars and
cancellation read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from .settings import SAMPLERS



@dataclass(frozen=True)
class Step:
    """One finished sampler step: x (at timestep t) went to x_prev."""

    i: int  # 0-based index of this step
    total: int
    t: int
    x: torch.Tensor
    x_prev: torch.Tensor
    eps: torch.Tensor  # the denoiser's prediction the step used
    alpha_bar: float  # at t
    alpha_bar_prev: float  # at the next timestep (1 after the last)
    stochastic: bool  # ancestral (DDPM) rather than deterministic (DDIM)


Hook = Callable[[Step], None]


def make_scheduler(config: dict, sampler: str):
    if sampler == "ddpm":
        return DDPMScheduler.from_config(config)
    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    raise ValueError(f"unknown sampler {sampler!r}; available: {', '.join(SAMPLERS)}")


@torch.no_grad()
def sample(denoiser, scheduler, noise: torch.Tensor, cond, steps: int, generator: torch.Generator,
           hooks: Iterable[Hook] = ()) -> torch.Tensor:
    """Run `scheduler` for `steps` steps from `noise` with denoiser(x, t, cond); returns x_0."""
    if steps < 1 or steps > scheduler.config.num_train_timesteps:
        raise ValueError(f"steps must be in 1..{scheduler.config.num_train_timesteps}, got {steps}")
    hooks = list(hooks)
    stochastic = isinstance(scheduler, DDPMScheduler)
    kw = {} if stochastic else {"eta": 0.0}
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    abar = scheduler.alphas_cumprod
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(timesteps):
        eps = denoiser(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), cond)
        x_prev = scheduler.step(eps, t, x, generator=generator, **kw).prev_sample
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        step = Step(i, len(timesteps), t, x, x_prev, eps, float(abar[t]),
                    float(abar[t_prev]) if t_prev >= 0 else 1.0, stochastic)
        for hook in hooks:
            hook(step)
        x = x_prev
    return x
