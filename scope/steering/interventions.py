"""Rank-1 interventions on a layer's residual stream: add α·w, or null out the component along w.

Source: Wu et al. 2025, "Improved Representation Steering for Language Models" (RePS,
arXiv 2505.20809), its intervention definitions for steering vectors: the steering intervention Φ_steer(h) = h + α·w and the null-out
intervention Φ_null(h) = h − (ReLU(h·w + b)/‖w‖²)·w, which removes the positive part of h's
component along w (above the threshold −b) and leaves everything orthogonal to w untouched.

Both are forward hooks on ``blocks.L.hook_resid_post`` of the TransformerLens bridge, used as
context managers; they nest (each removes only its own hook), and they work during generation
with a KV cache, where each decoding step sees one new position.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from scope.errors import ScopeError
from scope.hooks import PositionCounter, check_hooks
from scope.models import LoadedModel


def resid_hook(layer: int) -> str:
    """The residual-stream hook point after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def phi_steer(h: torch.Tensor, w: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Φ_steer(h) = h + α·w; ``alpha`` is a scalar or one value per batch row."""
    a = torch.as_tensor(alpha, dtype=h.dtype, device=h.device)
    if a.ndim == 1:
        a = a.view(-1, *([1] * (h.ndim - 1)))
    return h + a * w.to(h.dtype)


def phi_null(h: torch.Tensor, w: torch.Tensor, b: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Φ_null(h) = h − (ReLU(h·w + b)/‖w‖²)·w: the positive component along w (above −b) removed."""
    w = w.to(h.dtype)
    b = b.to(h.dtype) if isinstance(b, torch.Tensor) else b
    coef = torch.relu(h @ w + b) / (w @ w)
    return h - coef.unsqueeze(-1) * w


def _check(model: LoadedModel, hook: str, w: torch.Tensor) -> torch.Tensor:
    check_hooks(model, [hook])
    if w.ndim != 1 or w.shape[0] != model.facts.d_model:
        raise ScopeError(f"a steering vector must have shape [{model.facts.d_model}] (d_model of {model.spec}), "
                         f"got {list(w.shape)}")
    if not torch.isfinite(w).all():
        raise ScopeError("the steering vector holds NaN or infinite values")
    return w.to(model.device)


@contextmanager
def _from_position(model: LoadedModel, hook: str, start: int, edit) -> Iterator[None]:
    """Apply ``edit(h)`` to ``hook`` at positions ≥ ``start`` (counted across cached decoding steps)."""
    if start < 0:
        raise ScopeError(f"start position must be 0 or more, got {start}")
    positions = PositionCounter()

    def fn(h: torch.Tensor, *, hook: Any) -> torch.Tensor:
        n = h.shape[1]
        first = positions.advance(n)
        new = edit(h)
        if start <= first:
            return new
        keep = torch.arange(first, first + n, device=h.device) >= start
        return torch.where(keep.view(1, n, 1), new, h)

    with model.bridge.hooks(fwd_hooks=[(hook, fn)]):
        yield


@contextmanager
def steering(model: LoadedModel, hook: str, w: torch.Tensor, alpha: float, start: int = 0) -> Iterator[None]:
    """Add α·w to ``hook`` at every position ≥ ``start`` while the block runs (α = 0: no hook at all)."""
    w = _check(model, hook, w)
    if alpha == 0:  # exactly the unsteered model, not h + 0·w rounded
        yield
        return
    with _from_position(model, hook, start, lambda h: phi_steer(h, w, alpha)):
        yield


@contextmanager
def null_out(model: LoadedModel, hook: str, w: torch.Tensor, b: float = 0.0, start: int = 0) -> Iterator[None]:
    """Replace ``hook``'s activation by Φ_null(h) at every position ≥ ``start`` while the block runs."""
    w = _check(model, hook, w)
    if float(w @ w) == 0:
        raise ScopeError("cannot null out along a zero vector")
    with _from_position(model, hook, start, lambda h: phi_null(h, w, b)):
        yield


@contextmanager
def row_interventions(model: LoadedModel, hook: str, w: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor,
                      null: torch.Tensor) -> Iterator[None]:
    """Training form: row i gets Φ_null(h) where ``null[i]``, else Φ_steer(h) with α = ``alpha[i]``.

    Gradients flow to ``w`` and ``b``; the model's own weights are never touched.
    """
    def apply(h: torch.Tensor, *, hook: Any) -> torch.Tensor:
        steered = phi_steer(h, w, alpha.to(h.dtype))
        nulled = phi_null(h, w, b)
        return torch.where(null.view(-1, 1, 1).to(h.device), nulled, steered)

    with model.bridge.hooks(fwd_hooks=[(hook, apply)]):
        yield
