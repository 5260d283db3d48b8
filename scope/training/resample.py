"""Bringing dead latents back: resampling (point each at a training row that the dictionary reconstructs badly)
and, for a JumpReLU leaving its BatchTopK phase, lifting them to their thresholds (:func:`lift_dead_latents`).

Bricken et al. 2023 ("Towards Monosemanticity", Anthropic, the appendix on neuron resampling) reinitialise a
dead latent from an input drawn with probability proportional to its squared reconstruction loss: the
decoder row becomes that input's direction, the encoder column the same direction at 0.2 times the mean
norm of the live latents' encoder columns, the encoder bias 0, and Adam's state of those weights is reset.
dictionary_learning's ``resample_steps`` and early SAELens follow the same recipe.

Two changes for the sparse SAEs scope trains rather than the L1 ReLU SAE of the paper:

- **The new encoder is calibrated on the batch, not set to 0.2 times the live norm with b_enc = 0.** A TopK or
  BatchTopK SAE keeps whatever ranks highest, and a latent that points exactly along a data row outranks the
  trained ones: on Gemma 3 270M (layer 6, 16,384 latents, a BatchTopK phase at 6.7M token-steps) 1,024 latents
  resampled the paper's way took 84 % of the next batch's kept pairs. Here each new latent's encoder scale s
  and bias b are set so that it fires on about as many of the batch's rows as a latent fires on average (L0 /
  width) at the 5th percentile of the live codes, and on the row it projects on most at their median: a new
  latent starts as a typical one. Where the rows it projects on most are all the same (a store holds the first
  position of every window, the same activation each time), the spread is taken as at least a tenth of the top
  projection: with a spread of 0 one latent got an encoder scale near 10⁶ in the 16k study, and the batch FVU
  went from 0.04 to 10⁵ within ten steps.
- **Adam's second moment of the new weights is set to the live latents' mean, not 0.** With β2 = 0.999 and a
  second moment of 0, the first step after a reset moves each weight by about 30 learning rates.

A JumpReLU's trained θ of a resampled latent is set to the live latents' median (in a BatchTopK phase every θ
is the shared threshold anyway).
"""

from __future__ import annotations

import torch

from scope.dictionaries import Dictionary


@torch.no_grad()
def resample_dead(sae: Dictionary, opt: torch.optim.Optimizer, x: torch.Tensor, dead: torch.Tensor,
                  generator: torch.Generator, limit: int | None = None) -> int:
    """Point up to ``limit`` (default: a quarter of ``x``'s rows) of the ``dead`` latents at rows of ``x``
    (prepared inputs) drawn without replacement with probability ∝ squared reconstruction error; return how many."""
    idx = dead.nonzero().squeeze(1)
    alive = ~dead
    limit = x.shape[0] // 4 if limit is None else limit
    if idx.numel() == 0 or not bool(alive.any()) or limit <= 0:
        return 0
    if idx.numel() > limit:  # the rest wait for the next resampling
        idx = idx[torch.randperm(idx.numel(), generator=generator, device="cpu")[:limit].to(idx.device)]
    codes = sae.encode_prepared(x)
    err = (x - sae.decode_prepared(codes)).float().pow(2).sum(-1)
    fired = codes[:, alive]
    fired = fired[fired != 0].float()
    if not bool((err > 0).any()) or fired.numel() < 2:
        return 0
    n = min(idx.numel(), int((err > 0).sum()))
    idx = idx[:n]
    rows = torch.multinomial(err.cpu().double(), n, replacement=False, generator=generator).to(x.device)
    xs = x.to(sae.W_enc.dtype) * sae.input_scale
    xin = xs - sae.b_dec if sae.cfg.apply_b_dec_to_input else xs
    u = xin[rows] / xin[rows].norm(dim=-1, keepdim=True).clamp_min(1e-12)

    # Fire on about rate·rows rows at the live codes' 5th percentile, and on the best-matching row at their median.
    lo, mid = torch.quantile(fired, torch.tensor([0.05, 0.5], device=fired.device)).tolist()
    rate = float((codes != 0).sum()) / codes.numel()
    proj = (xin @ u.T).float()  # [rows, n]
    kth = min(max(1, round(rate * x.shape[0])), x.shape[0] - 1)
    top = proj.topk(kth + 1, dim=0).values
    # Identical rows (the first position of every window holds the same activation) can fill the top: a gap of 0
    # would give an unbounded scale; a floor of a tenth of the top projection bounds it.
    scale = (mid - lo) / torch.maximum(top[0] - top[-1], 0.1 * top[0].abs()).clamp_min(1e-12)
    bias = lo - scale * top[-1]

    dec_norm = sae.W_dec[alive].norm(dim=1).mean()
    sae.W_enc[:, idx] = (u * scale[:, None]).T.to(sae.W_enc.dtype)
    sae.W_dec[idx] = (u * dec_norm).to(sae.W_dec.dtype)
    sae.b_enc[idx] = bias.to(sae.b_enc.dtype)
    theta = sae.trained_threshold()
    if theta is not None:
        theta[idx] = theta[alive].median()

    _warm_adam(sae, opt, idx, alive)
    return n


def _warm_adam(sae: Dictionary, opt: torch.optim.Optimizer, idx: torch.Tensor, alive: torch.Tensor) -> None:
    """Give latents ``idx`` the ``alive`` latents' mean Adam second moment and no first moment (module doc)."""
    for p, latent_dim in sae.latent_params():
        state = opt.state.get(p)
        if state:  # views with the latents along the first axis; writes reach the optimiser's tensors
            avg, sq = state["exp_avg"].movedim(latent_dim, 0), state["exp_avg_sq"].movedim(latent_dim, 0)
            avg[idx] = 0
            sq[idx] = sq[alive].mean(0)


@torch.no_grad()
def lift_dead_latents(sae: Dictionary, opt: torch.optim.Optimizer, x: torch.Tensor, dead: torch.Tensor,
                          rate: float) -> int:
    """Make each ``dead`` latent fire on about ``rate`` of the rows of ``x`` (prepared inputs) by raising its
    encoder bias until its k-th largest pre-activation there (k = round(rate · rows), at least 1) sits just
    above its θ; return how many moved.

    For a JumpReLU at the end of its BatchTopK phase (``handover_revive``): there a latent died because it
    never ranked in the batch's top, not because its direction is useless, and at the hand-over it inherits the
    shared threshold, above all of its pre-activations. Shifting b_enc rather than lowering θ works whatever the
    sign of the pre-activations: on Gemma 3 270M (4,096 latents, batch 1,024) the dead latents' pre-activations
    at the hand-over were all negative, where no θ > 0 would make them fire. The latent then fires at once on the
    rows it matches best, with codes near θ, and trains from there. Its Adam state is warmed as for resampling.
    """
    theta = sae.trained_threshold()
    idx = dead.nonzero().squeeze(1)
    if theta is None or idx.numel() == 0:
        return 0
    pre = sae.pre_acts(x)[:, idx].float()
    k = min(x.shape[0], max(1, round(rate * x.shape[0])))
    kth = pre.topk(k, dim=0).values[-1]
    th = theta[idx].float()
    # A hair above θ, so that the k-th row fires (JumpReLU fires on z > θ) despite the bias's round-off.
    lift = th - kth + 1e-6 * th.abs().clamp_min(1e-3)
    move = lift > 0
    sae.b_enc[idx[move]] += lift[move].to(sae.b_enc.dtype)
    _warm_adam(sae, opt, idx[move], ~dead)
    return int(move.sum())

