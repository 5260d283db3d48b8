"""PCA whitening against a control set, then unit norm: the input transform of Donhauser et al.

Source: Donhauser et al. 2025, "Towards scientific discovery with dictionary learning: extracting
biological concepts from microscopy foundation models" (arXiv 2412.16247, ICML 2025). Before
learning a dictionary they centre every embedding on the mean of a control population and whiten
it with the control population's covariance, so that the control data has zero mean and identity
covariance and what remains stands out; each vector is then scaled to unit L2 norm.

The map is u = P (x − μ) with P = Λ^{-1/2} Vᵀ from the eigendecomposition C = V Λ Vᵀ of the
control covariance, then û = u / ‖u‖. It is inverted exactly given the norm: x = P⁻¹ (‖u‖ û) + μ
with P⁻¹ = V Λ^{1/2}. Directions with (near-)zero control variance would blow up, so eigenvalues
are floored at ``eps`` times their mean (documented in docs/methods/icfl.md); with ``eps`` = 0 and
a full-rank control covariance the control data is exactly white.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from scope.errors import ScopeError


class WhiteningSpec(BaseModel):
    """Where the control set comes from and how the transform is regularised."""

    model_config = ConfigDict(extra="forbid")

    control: list[str] | None = Field(
        None, description="control documents: labels or glob patterns over labels (e.g. 'tweets:*'); "
                          "'store:PATH' reads a second store; empty means all training documents")
    eps: float = Field(1e-6, ge=0, description="eigenvalue floor, as a fraction of the mean eigenvalue")
    unit_norm: bool = Field(True, description="scale every whitened vector to unit L2 norm")
    rows: int = Field(200_000, gt=0, description="control rows used to estimate mean and covariance")


class Whitening(nn.Module):
    """x ↦ (û, ‖u‖) with u = P(x − μ); saved as buffers with the dictionary that uses it."""

    def __init__(self, d_in: int, unit_norm: bool = True):
        super().__init__()
        self.unit_norm = unit_norm
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("P", torch.eye(d_in))
        self.register_buffer("P_inv", torch.eye(d_in))
        # Typical ‖u‖ on the control set; decode() uses it when no per-row norm is given.
        self.register_buffer("typical_norm", torch.ones(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whitened (and unit-norm) rows plus each row's whitened norm, for :meth:`inverse`."""
        u = (x.to(self.P.dtype) - self.mean) @ self.P.T
        norms = u.norm(dim=-1, keepdim=True)
        if not self.unit_norm:
            return u, torch.ones_like(norms)
        return u / norms.clamp_min(1e-12), norms

    def inverse(self, u: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        """Back to the raw units: P⁻¹(norm · û) + μ (norm defaults to the control set's typical one)."""
        if self.unit_norm:
            u = u * (self.typical_norm if norms is None else norms)
        return u @ self.P_inv.T + self.mean


def fit_whitening(control: torch.Tensor | Iterable[torch.Tensor], eps: float = 1e-6,
                  unit_norm: bool = True) -> Whitening:
    """Estimate μ and the control covariance (in float64, streaming) and build the transform."""
    batches = [control] if isinstance(control, torch.Tensor) else control
    n, s, ss = 0, None, None
    for x in batches:
        x = x.reshape(-1, x.shape[-1]).double()
        s = x.sum(0) if s is None else s + x.sum(0)
        ss = x.T @ x if ss is None else ss + x.T @ x
        n += x.shape[0]
    if n < 2:
        raise ScopeError(f"the whitening control set has {n} row(s); it needs at least 2 (check its label filter)")
    if n < 2 * s.numel():
        warnings.warn(f"the whitening control set has {n} rows for {s.numel()} dimensions; its covariance is "
                      "poorly estimated (directions it barely covers get blown up): use a larger control set",
                      stacklevel=2)
    mean = s / n
    cov = (ss - n * torch.outer(mean, mean)) / (n - 1)
    evals, evecs = torch.linalg.eigh(cov)
    floor = eps * float(evals.clamp_min(0).mean())
    if float(evals.max()) <= 0:
        raise ScopeError("the whitening control set has zero variance; choose a control set with varied rows")
    evals = evals.clamp_min(max(floor, 1e-30))
    w = Whitening(cov.shape[0], unit_norm)
    P = evals.rsqrt()[:, None] * evecs.T
    P_inv = evecs * evals.sqrt()[None, :]
    with torch.no_grad():
        w.mean.copy_(mean.float())
        w.P.copy_(P.float())
        w.P_inv.copy_(P_inv.float())
        # E‖u‖² on white control data is the trace of the identity, d.
        w.typical_norm.fill_(float(cov.shape[0]) ** 0.5)
    return w
