"""Lazy Adam for dictionaries: a latent that gets no gradient in a step keeps its Adam state.

Why: with β1 = 0 (Gemma Scope's setting) Adam moves a weight by lr · g / √v, v the running mean of g² with
β2 = 0.999. A latent that fires in a fraction p of the steps has g = 0 in the others, so v ≈ p·g² and each
step it does fire moves it by about lr / √p: ten learning rates for a latent in one step of a hundred. The rare
latents of a wide dictionary are the ones kicked hardest, and a kick that lowers their pre-activations can
leave them below every row for good. Lazy Adam (``torch.optim.SparseAdam`` for embeddings, TensorFlow Addons'
``LazyAdam``) updates the moments only where a gradient arrived, so v is the mean of the g² a latent actually
received and each of its updates is about one learning rate whatever p is.

With β1 = 0 a weight whose gradient is 0 does not move, so the only state to keep is the second moment: Adam
multiplied an idle latent's by β2, and dividing by β2 after the step undoes it (to float rounding). Idle is
decided per parameter and per latent (W_enc's column, W_dec's row, b_enc's and θ's entry each on its own: θ gets
a pseudo-gradient from rows just below it, where the latent did not fire).
"""

from __future__ import annotations

from typing import Callable

import torch

from scope.dictionaries import Dictionary


@torch.no_grad()
def hold_idle(sae: Dictionary, opt: torch.optim.Optimizer) -> Callable[[], None]:
    """Call between backward and ``opt.step()`` (Adam with β1 = 0); the function it returns, called after the
    step, gives the latents that had no gradient back the second moment they had before it."""
    beta2 = {id(p): group["betas"][1] for group in opt.param_groups for p in group["params"]}
    held = []
    for p, axis in sae.latent_params():
        if p.grad is None:
            continue
        others = [d for d in range(p.dim()) if d != axis]
        idle = p.grad.eq(0).all(dim=others[0]) if others else p.grad.eq(0)
        if bool(idle.any()):
            shape = [1] * p.dim()
            shape[axis] = -1
            factor = torch.where(idle, 1.0 / beta2[id(p)], 1.0).to(p.dtype).view(shape)
            held.append((p, factor))

    def restore() -> None:
        with torch.no_grad():
            for p, factor in held:
                opt.state[p]["exp_avg_sq"].mul_(factor)

    return restore
