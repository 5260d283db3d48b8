"""ICFL: iterative codebook feature learning (a batched matching-pursuit encoder and a learned codebook).

Source: Donhauser et al. 2025, "Towards scientific discovery with dictionary learning: extracting
biological concepts from microscopy foundation models" (arXiv 2412.16247, ICML 2025). The model is
x ≈ W_dec z + b_pre with no learned encoder. Codes come from an orthogonal-matching-pursuit-style
search: starting from the residual r = x − b_pre, each of J iterations picks the L atoms with the
largest inner product with r, fits only those L coefficients to r by least squares, subtracts
their reconstruction, and adds the coefficients to z; so z has at most J·L signed nonzeros and
‖r‖ never grows. The codebook then takes gradient steps on ‖x − W_dec z − b_pre‖² with z held
fixed, and every ``redraw_every`` steps one atom of every pair whose cosine similarity exceeds
``redraw_cos`` is re-drawn. The paper's defaults: M = 8192 atoms, J = 20, L = 5, batch 8192,
learning rate 5e-5.

Choices made here (docs/methods/icfl.md): ``atom_selection="signed"`` ranks atoms by ⟨d, r⟩ as the
method is described; ``"absolute"`` ranks by |⟨d, r⟩| as classical OMP does, letting an atom serve
with either sign. A re-drawn atom becomes the (normalised) residual of a random row of the
current batch, so it starts where the codebook explains the data worst. Atoms are kept at unit
norm so that inner products compare like with like. ``W_enc`` holds W_decᵀ (it is what the
correlation step multiplies by) so tools that read a linear encoder see the atoms; it does not train.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from scope.dictionaries.base import Dictionary, DictionaryConfig
from scope.dictionaries.losses import LossParts


class ICFLConfig(DictionaryConfig):
    kind: Literal["icfl"] = "icfl"
    d_sae: int = 8192
    iterations: int = Field(20, gt=0, description="J: matching-pursuit iterations")
    atoms_per_iteration: int = Field(5, gt=0, description="L: atoms chosen and fitted per iteration")
    atom_selection: Literal["signed", "absolute"] = "signed"
    redraw_every: int = Field(100, ge=0, description="steps between duplicate-atom re-draws (0: never)")
    redraw_cos: float = Field(0.9, gt=0, le=1, description="cosine above which one atom of a pair is re-drawn")
    ridge: float = Field(1e-6, ge=0, description="added to the L×L Gram diagonal so near-parallel atoms stay solvable")
    apply_b_dec_to_input: bool = True


@torch.no_grad()
def matching_pursuit(x: torch.Tensor, atoms: torch.Tensor, iterations: int, per_iteration: int,
                     signed: bool = True, ridge: float = 1e-6,
                     residual_norms: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Codes ``[B, M]`` of ``x [B, d]`` over unit-norm ``atoms [M, d]``: J rounds of pick-L, fit, subtract.

    Vectorised over the batch: each round is one [B, d]×[d, M] product, a top-L, and B small L×L
    solves. If ``residual_norms`` is a list, the residual norms ``[B]`` after each round are appended.
    """
    if per_iteration > atoms.shape[0]:
        raise ValueError(f"cannot pick {per_iteration} atoms per iteration from a codebook of {atoms.shape[0]}")
    r = x.clone()
    z = torch.zeros(x.shape[0], atoms.shape[0], dtype=x.dtype, device=x.device)
    eye = torch.eye(per_iteration, dtype=x.dtype, device=x.device) * ridge
    for _ in range(iterations):
        scores = r @ atoms.T
        idx = (scores if signed else scores.abs()).topk(per_iteration, dim=1, sorted=False).indices
        chosen = atoms[idx]  # [B, L, d]
        gram = chosen @ chosen.transpose(1, 2) + eye
        coef = torch.linalg.solve(gram, scores.gather(1, idx).unsqueeze(-1))  # least squares on the L atoms
        r = r - (chosen.transpose(1, 2) @ coef).squeeze(-1)
        z.scatter_add_(1, idx, coef.squeeze(-1))
        if residual_norms is not None:
            residual_norms.append(r.norm(dim=-1))
    return z


class ICFL(Dictionary):
    kind = "icfl"
    Config = ICFLConfig

    def __init__(self, cfg: ICFLConfig):
        super().__init__(cfg)
        self.W_enc.requires_grad_(False)
        self.b_enc.requires_grad_(False)
        self._residual: torch.Tensor | None = None

    def _centred(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.to(self.W_dec.dtype) * self.input_scale
        return xs - self.b_dec if self.cfg.apply_b_dec_to_input else xs

    def encode_prepared(self, x: torch.Tensor) -> torch.Tensor:
        """Matching-pursuit codes (signed, at most J·L nonzeros per row)."""
        lead = x.shape[:-1]
        z = self.codes(self._centred(x.reshape(-1, x.shape[-1])))
        return z.reshape(*lead, -1)

    def codes(self, centred: torch.Tensor, residual_norms: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Matching pursuit of already scaled and centred rows over the current atoms."""
        atoms = self.W_dec.detach()
        return matching_pursuit(centred, atoms, self.cfg.iterations, self.cfg.atoms_per_iteration,
                                self.cfg.atom_selection == "signed", self.cfg.ridge, residual_norms)

    def loss(self, x: torch.Tensor, sparsity_coeff: float = 0.0, sparse: bool = True) -> LossParts:
        """‖x − W_dec z − b_pre‖² with z from matching pursuit held fixed; only the codebook and b_pre learn."""
        xs = x.to(self.W_dec.dtype) * self.input_scale
        z = self.codes(self._centred(x))
        err = xs - (z @ self.W_dec + self.b_dec)
        mse = err.pow(2).sum(-1).mean()
        self._residual = err.detach()
        active = z != 0
        return LossParts(loss=mse, mse=mse, l0=active.sum(-1).float().mean(), counts=active.sum(0), codes=z)

    @torch.no_grad()
    def project(self) -> None:
        super().project()
        self.W_enc.copy_(self.W_dec.T)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Every ``redraw_every`` steps, re-draw one atom of each pair with cosine above ``redraw_cos``."""
        every = self.cfg.redraw_every
        if not every or step % every or self._residual is None:
            return
        self.redraw_duplicates(self._residual, seed=step)

    @torch.no_grad()
    def redraw_duplicates(self, residual: torch.Tensor, seed: int = 0) -> int:
        """Re-draw the higher-index atom of every too-similar pair from batch residuals; returns how many."""
        w = self.W_dec
        cos = torch.triu(w @ w.T, diagonal=1)
        dup = (cos > self.cfg.redraw_cos).any(0).nonzero().squeeze(-1)
        if dup.numel() == 0:
            return 0
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randint(0, residual.shape[0], (dup.numel(),), generator=gen).to(residual.device)
        new = residual[rows] + 1e-3 * torch.randn(dup.numel(), w.shape[1], generator=gen).to(residual.device)
        w[dup] = new / new.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        self.W_enc.copy_(w.T)
        return int(dup.numel())
