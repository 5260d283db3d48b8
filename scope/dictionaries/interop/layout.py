"""Which layout a dictionary folder is in, and loading it whatever the layout."""

from __future__ import annotations

from pathlib import Path

import torch

from scope.dictionaries.base import CONFIG, WEIGHTS, Dictionary
from scope.dictionaries.base import load as load_scope
from scope.dictionaries.interop.gemma_scope import GEMMA_SCOPE_2_WEIGHTS, GEMMA_SCOPE_NPZ, load_gemma_scope
from scope.dictionaries.interop.saelens import SAELENS_CONFIG, SAELENS_WEIGHTS, from_saelens
from scope.errors import ScopeError


def load_any(source: str | Path, device: str | torch.device | None = None) -> Dictionary:
    """A dictionary from any layout scope reads: its own folder, SAELens, Gemma Scope (npz) or Gemma Scope 2."""
    path = Path(source)
    layout = dictionary_layout(path)
    if layout == "scope":
        return load_scope(path, device=device)
    if layout == "saelens":
        return from_saelens(path, device=device)
    return load_gemma_scope(path, device=device)


def dictionary_layout(path: Path) -> str:
    """'scope', 'saelens' or 'gemma-scope' for a dictionary folder or file; ScopeError for anything else."""
    if path.is_dir() and (path / WEIGHTS).exists() and (path / CONFIG).exists():
        return "scope"
    if path.is_dir() and (path / SAELENS_WEIGHTS).exists() and (path / SAELENS_CONFIG).exists():
        return "saelens"
    if (path.is_file() and path.suffix in (".npz", ".safetensors")) or (path.is_dir() and any(
            (path / n).exists() for n in (GEMMA_SCOPE_NPZ, GEMMA_SCOPE_2_WEIGHTS))):
        return "gemma-scope"
    raise ScopeError(f"{str(path)!r} is not a dictionary: expected a folder with {CONFIG} + {WEIGHTS} (scope), "
                     f"{SAELENS_CONFIG} + {SAELENS_WEIGHTS} (SAELens), or {GEMMA_SCOPE_NPZ} / "
                     f"{GEMMA_SCOPE_2_WEIGHTS} (Gemma Scope)")
