"""Evaluating dictionaries: reconstruction metrics over a store and spliced-in language-model loss.

:func:`evaluate` combines both into one JSON-ready dict; see docs/methods/evaluation.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from scope.dictionaries.base import Dictionary
from scope.errors import ScopeError
from scope.evals.frontier import frontier_figure, write_frontier
from scope.evals.lm_loss import (LMLossMetrics, lm_loss_on_windows, lm_losses_on_windows, spliced_lm_loss,
                                 spliced_lm_losses)
from scope.store.windows import load_store_model, store_windows
from scope.evals.reconstruction import DENSE_THRESHOLD, ReconstructionMetrics, reconstruction_metrics
from scope.models import LoadedModel
from scope.store.reader import ActivationStore

__all__ = ["DENSE_THRESHOLD", "LMLossMetrics", "ReconstructionMetrics", "evaluate", "evaluate_many", "frontier_figure",
           "lm_loss_on_windows", "lm_losses_on_windows", "load_store_model", "reconstruction_metrics",
           "spliced_lm_loss", "spliced_lm_losses", "store_windows", "write_frontier"]


def evaluate_many(
    saes: Mapping[str, Dictionary],
    store: ActivationStore,
    model: LoadedModel | None = None,
    lm_tokens: int = 4096,
    hook: str | None = None,
    max_rows: int | None = None,
    batch_size: int = 4096,
    lm_batch_size: int = 4,
    dense_threshold: float = DENSE_THRESHOLD,
    device: str | torch.device | None = None,
    frequencies: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Reconstruction metrics and (when a model is given or loadable) spliced-in LM loss per SAE, as dicts.

    ``store`` is the view to evaluate on, normally the held-out split (``store.split(...)[1]``).
    ``lm_tokens=0`` skips the language-model part; with ``model=None`` the store's own model is
    loaded, and if that fails each dict holds ``"lm": None`` and the reason under ``"lm_error"``.
    The SAEs share the clean and zero-ablated forward passes of the LM loss.
    """
    if lm_tokens < 0:
        raise ScopeError(f"lm_tokens must be 0 (skip) or positive, got {lm_tokens}")
    if device is None and model is not None:
        device = model.device  # keep the SAEs next to the model they will be spliced into
    outs: dict[str, dict[str, Any]] = {}
    for name, sae in saes.items():
        recon = reconstruction_metrics(sae, store, hook=hook, max_rows=max_rows, batch_size=batch_size,
                                       device=device, dense_threshold=dense_threshold)
        outs[name] = {"name": name, "kind": sae.cfg.kind, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
                      **({"d_out": sae.cfg.d_out, "output_hook": sae.output_hook, "skip": sae.cfg.skip,
                          "activation": sae.cfg.activation} if sae.cfg.kind == "transcoder" else {}),
                      "store": store.url, "documents": len(store.documents),
                      **recon.to_dict(frequencies=frequencies), "lm": None}
    if lm_tokens == 0 or not saes:
        return list(outs.values())
    if model is None:
        try:
            model = load_store_model(store, device=device)
        except ScopeError as err:
            warnings.warn(f"skipping the language-model loss: {err}", stacklevel=2)
            for out in outs.values():
                out["lm_error"] = str(err)
            return list(outs.values())
    lms = spliced_lm_losses(saes, model, store, hook=hook, max_tokens=lm_tokens, batch_size=lm_batch_size,
                            progress=progress)  # one set of windows, grouped by hook inside
    for name, lm in lms.items():
        outs[name]["lm"] = lm.to_dict()
    return list(outs.values())


def evaluate(sae: Dictionary, store: ActivationStore, model: LoadedModel | None = None, lm_tokens: int = 4096,
             name: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate_many` for one SAE (named ``name``, by default its kind)."""
    return evaluate_many({name or sae.cfg.kind: sae}, store, model=model, lm_tokens=lm_tokens, **kwargs)[0]
