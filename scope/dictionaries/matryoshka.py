"""Reconstruction losses shared by the sparse kinds: plain, or Matryoshka (nested prefixes of the latents).

Matryoshka SAEs (Bussmann, Nabeshima, Karvonen and Nanda 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders", arXiv 2503.17547; first proposed by Nabeshima 2024, "Matryoshka Sparse
Autoencoders", LessWrong) ask every prefix of the latents, ``0:m₁ ⊂ 0:m₂ ⊂ … ⊂ 0:d_sae``, to reconstruct
x on its own. With x̂ⱼ = Σ_{i < mⱼ} fᵢ W_dec,ᵢ + b_dec the loss is

    L_rec = Σⱼ ‖x − x̂ⱼ‖²   (summed over the prefixes, the full width last; each a batch mean)

so early latents learn general directions and later ones specialise instead of absorbing them. The
prefixes share one encoder pass and one selection of active codes; only the decode is split, into one
bucket of latents per prefix step, and the prefix reconstructions are running sums of the buckets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scope.dictionaries.sparse import SparseDecode


def prefix_ends(widths: list[int] | None, d_sae: int) -> list[int]:
    """The prefix widths a loss sums over: the configured ones, then the full width."""
    ends = list(widths or [])
    if any(b <= a for a, b in zip(ends, ends[1:])) or any(w <= 0 or w > d_sae for w in ends):
        raise ValueError(f"matryoshka_widths must increase strictly within (0, d_sae={d_sae}], got {ends}")
    return ends if ends and ends[-1] == d_sae else [*ends, d_sae]


@dataclass
class Reconstruction:
    """The summed reconstruction loss, the full-width MSE and the full-width residual x − x̂."""

    loss: torch.Tensor
    mse: torch.Tensor
    err: torch.Tensor


class _PrefixErrors(torch.autograd.Function):
    """(Σⱼ mse_j, the last prefix's mse, its residual) for residuals err_j = xs − b_dec − Σ_{i ≤ j} partᵢ.

    mse_j is the batch mean of ‖err_j‖². The backward is written out because autograd's version of these few
    lines writes and rereads about ten [batch × d_in] temporaries (the running sum, the differences, their squares
    and the gradient of each), which cost a tenth of a training step at 4,096 latents; this one makes one pass per
    prefix forward and one back. The residual is returned without gradient (AuxK's target is detached).
    """

    @staticmethod
    def forward(ctx, xs, b_dec, *parts):
        ctx.set_materialize_grads(False)  # the residual gets no gradient: no [batch × d_in] of zeros for it
        err = xs - b_dec
        errs = []
        for part in parts:
            err = err - part if errs else err.sub_(part)  # earlier residuals are kept for the backward
            errs.append(err)
        flat = [e.reshape(-1) for e in errs]
        mses = [torch.dot(f, f) / xs.shape[0] for f in flat]
        ctx.save_for_backward(*errs)
        ctx.mark_non_differentiable(err)
        return torch.stack(mses).sum(), mses[-1], err

    @staticmethod
    def backward(ctx, grad_loss, grad_mse, _):
        errs = ctx.saved_tensors
        scale = -2.0 / errs[0].shape[0]
        zero = errs[0].new_zeros(())
        grad_loss = zero if grad_loss is None else grad_loss
        grad_mse = zero if grad_mse is None else grad_mse
        grads, acc = [], None
        for j in reversed(range(len(errs))):  # part i's gradient sums those of every prefix that contains it
            weight = (grad_loss + grad_mse if j == len(errs) - 1 else grad_loss) * scale
            acc = errs[j] * weight if acc is None else acc.add_(errs[j] * weight)
            grads.append(acc.clone() if j else acc)
        grads.reverse()
        first = grads[0]
        grad_b_dec = first.sum(0) if ctx.needs_input_grad[1] else None
        grad_xs = -first if ctx.needs_input_grad[0] else None
        return grad_xs, grad_b_dec, *grads


def _nested(xs: torch.Tensor, parts: list[torch.Tensor], b_dec: torch.Tensor) -> Reconstruction:
    loss, mse, err = _PrefixErrors.apply(xs, b_dec, *parts)
    return Reconstruction(loss, mse, err)


def sparse_reconstruction(xs: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                          rows: torch.Tensor, cols: torch.Tensor, ends: list[int]) -> Reconstruction:
    """Loss of codes given as row-major (row, latent) pairs with values ``vals``, over prefixes ``ends``."""
    batch = xs.shape[0]
    if len(ends) == 1:
        return _nested(xs, [SparseDecode.apply(vals, W_dec, rows, cols, batch)], b_dec)
    bucket = torch.bucketize(cols, torch.tensor(ends[:-1], device=cols.device), right=True)
    parts = []
    for j in range(len(ends)):
        sel = bucket == j  # a sub-sequence of row-major pairs is still row-major
        parts.append(SparseDecode.apply(vals[sel], W_dec, rows[sel], cols[sel], batch))
    return _nested(xs, parts, b_dec)


def dense_reconstruction(xs: torch.Tensor, f: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                         ends: list[int]) -> Reconstruction:
    """The same loss from dense codes ``f [batch, d_sae]`` (the reference path)."""
    starts = [0, *ends[:-1]]
    return _nested(xs, [f[:, a:b] @ W_dec[a:b] for a, b in zip(starts, ends)], b_dec)
