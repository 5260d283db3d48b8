"""What every format shares: the tensor names, the renames into scope's, and building a dictionary from them.

All formats store ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]`` (plus
``threshold [d_sae]`` for JumpReLU), the layout scope's dictionaries use (see dictionaries/base.py); only
the spelling differs, and :func:`scope_names` is the one place that knows the spellings.
"""

from __future__ import annotations

from typing import Any

import torch

from scope.dictionaries.base import Dictionary, build
from scope.errors import ScopeError

SAE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")


def scope_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors renamed to scope's spelling (Gemma Scope 2 writes lower-case ``w_enc``, ``w_dec``)."""
    return {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in tensors.items()}


def relu_threshold(theta: torch.Tensor) -> torch.Tensor:
    """θ for scope's z·1[z > θ] that reproduces relu(z)·1[z > θ] (SAELens, Gemma Scope) exactly: max(θ, 0)."""
    # They differ only for θ < 0, where the ReLU form is plain ReLU, i.e. θ = 0 (SAELens initialises θ to 0).
    return theta.float().clamp_min(0.0)


def assemble(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], source: str,
             input_scale: float = 1.0) -> Dictionary:
    """A dictionary built from ``cfg`` whose saved-form tensors are replaced by ``tensors``."""
    d = build(cfg)
    # Start from the kind's own saved form, so buffers a foreign format lacks (TopK counters) keep defaults.
    full = d.saved_tensors(fold=False)
    jump = cfg["kind"] == "jumprelu" or (cfg["kind"] == "transcoder" and cfg.get("activation", "jumprelu") == "jumprelu")
    required = (*SAE_KEYS, "threshold") if jump else SAE_KEYS
    required = (*required, "W_skip") if cfg.get("skip") else required
    missing = [k for k in required if k not in tensors]
    if missing:
        raise ScopeError(f"{source}: tensors {missing} are missing for a {cfg['kind']} dictionary; "
                         f"found {sorted(tensors)}")
    extra = sorted(set(tensors) - set(full))
    if extra:
        raise ScopeError(f"{source}: unexpected tensors {extra} for a {cfg['kind']} dictionary; "
                         f"expected {sorted(full)}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(full[name].shape):
            raise ScopeError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                             f"{tuple(full[name].shape)} for d_in={cfg['d_in']}, d_sae={cfg['d_sae']}")
        full[name] = t.to(full[name].dtype)
    full["input_scale"] = torch.tensor(float(input_scale))
    d.load_state_dict(d.import_state(full))
    return d
