"""DiffMean: the mean in-concept activation minus the mean out-of-concept activation, from a store by label.

Source: AxBench (Wu et al. 2025, arXiv 2501.17148), where this difference of means is the
strongest simple baseline for concept detection and steering; RePS (arXiv 2505.20809, its AxBench steering table)
reports it beside RePS and the LM objective. As in AxBench, the direction is what matters: it is
saved with unit norm times the layer's scale r (the residual stream's centred RMS norm,
sqrt E‖h − E h‖²), so α = 1 adds a vector as long as a typical token's deviation from the mean.
"""

from __future__ import annotations

import torch

from scope.errors import ScopeError
from scope.steering.concepts import resolve_label
from scope.steering.vector import LayerScale
from scope.store.reader import ActivationStore


def concept_label(store: ActivationStore, concept: str) -> str:
    """The store label a concept ``CORPUS:LABEL`` (or a bare label) names."""
    labels = sorted({lab for lab, _ in store.documents.values() if lab is not None})
    if not labels:
        raise ScopeError(f"store {store.url!r} has no document labels; capture a labelled corpus (bbc, wiki, tweets)")
    corpus, _, label = concept.rpartition(":")
    if concept in labels:
        return concept
    spec = store.manifest.config.source.spec
    if corpus and corpus != spec and not any(lab.startswith(f"{corpus}:") for lab in labels):
        raise ScopeError(f"concept {concept!r} names corpus {corpus!r}, but store {store.url!r} holds {spec!r} "
                         f"with labels {labels}")
    prefix = f"{corpus}:" if corpus and any(lab.startswith(f"{corpus}:") for lab in labels) else ""
    return resolve_label(prefix + label, labels, spec)


@torch.no_grad()
def diffmean_stats(store: ActivationStore, hook: str, label: str, max_rows: int | None = None,
                   batch_size: int = 4096) -> dict[str, torch.Tensor | int]:
    """Per-group sums over the store's rows: in-concept mean, out-of-concept mean, rows, centred RMS norm."""
    store.check_hook(hook)
    inside = {d for d, (lab, _) in store.documents.items() if lab == label}
    outside = {d for d, (lab, _) in store.documents.items() if lab is not None and lab != label}
    if not inside or not outside:
        raise ScopeError(f"DiffMean needs rows with label {label!r} and rows with other labels in {store.url!r}; "
                         f"it has {len(inside)} documents inside and {len(outside)} outside")
    width = store.width(hook)
    sums = {k: torch.zeros(width, dtype=torch.float64) for k in ("in", "out")}
    counts = {"in": 0, "out": 0}
    layer = LayerScale(width)
    in_ids, labelled_ids = torch.tensor(sorted(inside)), torch.tensor(sorted(inside | outside))
    for b in store.rows([hook], batch_size=batch_size, shuffle=max_rows is not None, dtype="float32"):
        x = b.acts[hook].reshape(len(b.doc_id), -1).double()
        labelled = torch.isin(b.doc_id, labelled_ids.to(b.doc_id.dtype))
        x, doc = x[labelled], b.doc_id[labelled]
        is_in = torch.isin(doc, in_ids.to(doc.dtype))
        sums["in"] += x[is_in].sum(0)
        sums["out"] += x[~is_in].sum(0)
        counts["in"] += int(is_in.sum())
        counts["out"] += int((~is_in).sum())
        layer.add(x)
        if max_rows is not None and layer.rows >= max_rows:
            break
    if counts["in"] == 0 or counts["out"] == 0:
        raise ScopeError(f"the rows read from {store.url!r} hold {counts['in']} in-concept and {counts['out']} "
                         "out-of-concept rows; DiffMean needs both (raise max_rows)")
    return {"mu_in": sums["in"] / counts["in"], "mu_out": sums["out"] / counts["out"], "rows_in": counts["in"],
            "rows_out": counts["out"], "scale": layer.scale}


def diffmean(store: ActivationStore, hook: str, concept: str, max_rows: int | None = None) -> tuple[torch.Tensor, dict]:
    """(w, info): the unit DiffMean direction times the layer scale r, and the raw statistics.

    ``info["b"]`` = −μ·w (μ the mean of the labelled rows) is the null-out threshold: suppression
    removes only what lies above the mean along w.
    """
    label = concept_label(store, concept)
    s = diffmean_stats(store, hook, label, max_rows=max_rows)
    d = (s["mu_in"] - s["mu_out"]).float()
    if float(d.norm()) == 0:
        raise ScopeError(f"in- and out-of-concept means of {label!r} are equal; DiffMean has no direction")
    w = d / d.norm() * s["scale"]
    mu = (s["mu_in"] * s["rows_in"] + s["mu_out"] * s["rows_out"]).float() / (s["rows_in"] + s["rows_out"])
    info = {"label": label, "rows_in": s["rows_in"], "rows_out": s["rows_out"], "diff_norm": float(d.norm()),
            "store": store.url, "b": -float(mu @ w)}
    return w, {**info, "scale": s["scale"]}
