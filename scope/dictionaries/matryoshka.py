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


def _nested(xs: torch.Tensor, parts: list[torch.Tensor], b_dec: torch.Tensor) -> Reconstruction:
    recon, loss, mse = b_dec, 0.0, None
    for part in parts:
        recon = recon + part
        err = xs - recon
        mse = err.pow(2).sum(-1).mean()
        loss = loss + mse
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
