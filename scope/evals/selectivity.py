"""How label-specific a dictionary's features are, and whether its reconstructions keep label information.

Source: Donhauser et al. 2025 (arXiv 2412.16247), who score features of microscopy embeddings by
how much more often they fire on one perturbation than on others. For a feature f and a label i,
with P(f | i) the fraction of label-i rows on which f is active:

- average selectivity  P(f | i) − P(f | not i), "not i" being all other rows pooled;
- maximum selectivity  P(f | i) − max_{j≠i} P(f | j), the margin over the closest other label.

Per label we count the features above 0.5 and 0.2 of each. A feature is dead when it is active on
fewer than ``dead_frequency`` (1e-5) of the rows. The probe is a class-balanced logistic
regression of the label from a row's activation, fitted on some documents and scored (balanced
accuracy) on others, once on the original activations and once on the reconstructions: what the
dictionary loses about the labels shows as the gap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from scope.dictionaries.base import Dictionary
from scope.errors import ScopeError
from scope.evals.reconstruction import resolve_hook
from scope.data import doc_bucket
from scope.store.reader import ActivationStore

THRESHOLDS = (0.5, 0.2)


@dataclass
class LabelSelectivity:
    label: str
    rows: int
    above: dict[str, int]  # "average>0.5", "average>0.2", "maximum>0.5", "maximum>0.2" -> feature counts
    top_features: list[int]  # most selective features (maximum selectivity), best first
    top_selectivity: list[float]


@dataclass
class SelectivityMetrics:
    rows: int
    labels: list[LabelSelectivity]
    dead: int
    dead_fraction: float
    mean_max_selectivity: float  # over live features: each feature's best maximum selectivity
    cosine: float  # mean cosine similarity of reconstruction and input
    probe: dict[str, float] = field(default_factory=dict)  # balanced accuracy: original, reconstructed, chance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def selectivity_from_counts(counts: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(average, maximum) selectivity ``[labels, features]`` from per-label activation counts and row totals."""
    if counts.shape[0] < 2:
        raise ScopeError(f"selectivity needs rows of at least 2 labels, got {counts.shape[0]}")
    counts, rows = counts.double(), rows.double().clamp_min(1)
    p = counts / rows[:, None]
    others = (counts.sum(0) - counts) / (rows.sum() - rows).clamp_min(1)[:, None]
    average = p - others
    # The largest P(f | j) over j ≠ i: the top value, or the runner-up where i itself is the top.
    top2 = p.topk(2, dim=0).values
    best_other = torch.where(p >= top2[0], top2[1], top2[0])
    return average, p - best_other


@torch.inference_mode()
def selectivity_metrics(sae: Dictionary, store: ActivationStore, hook: str | None = None,
                        max_rows: int | None = 200_000, batch_size: int = 4096, dead_frequency: float = 1e-5,
                        probe_rows: int = 20_000, top: int = 10, seed: int = 0) -> SelectivityMetrics:
    """Selectivity per label, dead features, cosine, and the label probe on original vs reconstructed rows."""
    hook = resolve_hook(sae, store, hook)
    docs = store.documents
    label_of = {d: lab for d, (lab, _) in docs.items() if lab is not None}
    names = sorted(set(label_of.values()))
    if len(names) < 2:
        raise ScopeError(f"selectivity needs documents of at least 2 labels in {store.url!r}; this view has "
                         f"{names or 'no labels'}")
    index = {lab: i for i, lab in enumerate(names)}
    n_doc = max(docs) + 1
    doc_label = torch.full((n_doc,), -1, dtype=torch.long)
    for d, lab in label_of.items():
        doc_label[d] = index[lab]
    dev = sae.W_dec.device
    counts = torch.zeros(len(names), sae.cfg.d_sae, dtype=torch.float64, device=dev)
    per_label = torch.zeros(len(names), dtype=torch.long)
    n, cos_sum = 0, 0.0
    kept_x, kept_hat, kept_y, kept_doc = [], [], [], []
    for b in store.rows([hook], batch_size=batch_size, shuffle=True, seed=seed, buffer_rows=max(batch_size, 1 << 16),
                        dtype=sae.W_dec.dtype, device=dev):
        x = b.acts[hook].reshape(b.acts[hook].shape[0], -1)
        y = doc_label[b.doc_id.cpu()]
        keep = y >= 0
        if max_rows is not None:
            keep &= torch.arange(len(y)) < max_rows - n
        if not keep.any():
            if max_rows is not None and n >= max_rows:
                break
            continue
        x, y, doc = x[keep.to(dev)], y[keep], b.doc_id.cpu()[keep]
        codes, x_hat = sae.reconstruct(x)
        onehot = torch.nn.functional.one_hot(y, len(names)).to(dev, torch.float64)
        counts += onehot.T @ (codes != 0).to(torch.float64)
        per_label += torch.bincount(y, minlength=len(names))
        cos_sum += float(torch.nn.functional.cosine_similarity(x.float(), x_hat.float(), dim=-1).sum())
        have = sum(t.shape[0] for t in kept_x)
        if have < probe_rows:
            take = slice(0, probe_rows - have)
            kept_x.append(x[take].float().cpu())
            kept_hat.append(x_hat[take].float().cpu())
            kept_y.append(y[take])
            kept_doc.append(doc[take])
        n += int(keep.sum())
        if max_rows is not None and n >= max_rows:
            break
    if n == 0:
        raise ScopeError(f"store {store.url!r} has no labelled rows in this view; nothing to score")
    counts, rows = counts.cpu(), per_label
    average, maximum = selectivity_from_counts(counts, rows)
    freq = counts.sum(0) / n
    dead = freq < dead_frequency if dead_frequency > 0 else freq == 0
    labels = []
    for i, lab in enumerate(names):
        best = maximum[i].masked_fill(dead, float("-inf")).topk(min(top, sae.cfg.d_sae))
        labels.append(LabelSelectivity(
            label=lab, rows=int(rows[i]),
            above={f"{kind}>{t}": int((sel[i] > t).sum()) for kind, sel in (("average", average), ("maximum", maximum))
                   for t in THRESHOLDS},
            top_features=[int(f) for f, v in zip(best.indices, best.values) if v > float("-inf")],
            top_selectivity=[round(float(v), 4) for v in best.values if v > float("-inf")]))
    live_best = maximum.max(0).values[~dead]
    probe = label_probe(torch.cat(kept_x), torch.cat(kept_hat), torch.cat(kept_y), torch.cat(kept_doc), seed)
    return SelectivityMetrics(rows=n, labels=labels, dead=int(dead.sum()), dead_fraction=float(dead.double().mean()),
                              mean_max_selectivity=float(live_best.mean()) if live_best.numel() else float("nan"),
                              cosine=cos_sum / n, probe=probe)


def label_probe(x: torch.Tensor, x_hat: torch.Tensor, y: torch.Tensor, doc: torch.Tensor, seed: int = 0,
                test_fraction: float = 0.3) -> dict[str, float]:
    """Balanced accuracy of a class-balanced logistic probe on x and on x̂, split by document."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    test = torch.tensor([doc_bucket(int(d), seed + 17) < test_fraction for d in doc.tolist()])
    out = {"rows": int(len(y)), "test_rows": int(test.sum()), "chance": 1.0 / max(len(torch.unique(y)), 1)}
    if test.all() or not test.any() or len(torch.unique(y[~test])) < 2:
        out["error"] = "too few documents to fit and test a probe"  # type: ignore[assignment]
        return out
    for name, data in (("original", x), ("reconstructed", x_hat)):
        # Standardising matters on Gemma: a few residual channels are thousands of times larger.
        clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=500))
        clf.fit(data[~test].numpy(), y[~test].numpy())
        out[name] = float(balanced_accuracy_score(y[test].numpy(), clf.predict(data[test].numpy())))
    return out
