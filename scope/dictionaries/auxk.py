"""The AuxK loss against dead latents, shared by TopK and JumpReLU.

Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (arXiv 2406.04093), Appendix A.2: the
residual error e = x − x̂ of the main reconstruction (detached) is reconstructed from the top k_aux
pre-activations of the dead latents alone, and ‖e − ê‖² / Var(e) is added with a small weight (1/32 in
the paper). Dead latents get no gradient from the main loss; this one pulls their encoder rows and
decoder columns towards what the live latents miss, so they start to fire again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from scope.dictionaries.sparse import SparseDecode

# (rows, cols, pre-activations) of the dead pairs to use -> those pre-activations with their gradient
Gather = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def aux_loss(pre: torch.Tensor, err: torch.Tensor, dead: torch.Tensor, k_aux: int, W_dec: torch.Tensor,
             gather: Gather | None = None) -> torch.Tensor | None:
    """Normalised error of reconstructing ``err`` from the top ``k_aux`` ReLU'd dead pre-activations per row.

    On the plain path ``pre`` is [batch, d_sae] and carries the gradient. On the sparse path it is the dead
    columns' pre-activations alone, [batch, dead.sum()] without gradient, and ``gather`` recomputes the chosen
    pairs with their gradient. None when no latent is dead.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return None
    k_aux = min(k_aux, n_dead)
    residual = err.detach()
    scale = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
    if gather is None:
        dead_pre = torch.relu(pre).masked_fill(~dead, 0.0)
        vals, idx = dead_pre.topk(k_aux, dim=-1, sorted=False)
        aux_recon = torch.zeros_like(dead_pre).scatter(-1, idx, vals) @ W_dec
    else:
        with torch.no_grad():
            # Top-k over the dead columns only: masking and ranking all d_sae columns cost more than the
            # rest of the step once a few per cent of the latents are dead.
            dead_cols = dead.nonzero().squeeze(1)  # ascending, so sorted positions keep the pairs row-major
            vals, idx = torch.relu(pre).topk(k_aux, dim=-1, sorted=False)
            idx, order = idx.sort(-1)
            vals = vals.gather(-1, order).reshape(-1)
            keep = vals > 0  # a row with fewer positive dead entries than k_aux
            rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k_aux)[keep]
            cols = dead_cols[idx.reshape(-1)[keep]]
        z = gather(rows, cols, vals[keep])
        aux_recon = SparseDecode.apply(torch.relu(z), W_dec, rows, cols, pre.shape[0])
    return (residual - aux_recon).pow(2).sum(-1).mean() / scale
