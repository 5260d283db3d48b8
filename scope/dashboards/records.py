"""A feature's dashboard as plain JSON-ready data: what the site renders and the Neuronpedia export reads.

Token ids become strings here, once per distinct id; floats are kept to 4 significant digits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from scope.dashboards.results import Example, FeatureStats

Decode = Callable[[Sequence[int]], list[str]]


def _f(x: float) -> float:
    return float(f"{x:.4g}") + 0.0  # + 0.0 turns -0.0 into 0.0


def example_record(e: Example, names: dict[int, str]) -> dict[str, Any]:
    """An example: its tokens, the feature's value at each, and which token is the example's own row."""
    return {"row": e.row, "doc_id": e.doc_id, "position": e.position, "value": _f(e.value),
            "focus": e.offsets.index(0), "tokens": [names[t] for t in e.tokens], "token_ids": e.tokens,
            "values": [_f(v) for v in e.values]}


def feature_record(s: FeatureStats, names: dict[int, str], logits: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a feature page shows, as JSON-ready data.

    ``logits`` holds the ``top`` and ``bottom`` (token, logit) pairs and, optionally, the ``histogram``
    of the logit effect over the whole vocabulary.
    """
    top = [example_record(e, names) for e in s.top]
    firing = Counter(r["tokens"][r["focus"]] for r in top)
    logits = logits or {}
    hist = logits.get("histogram") or {"edges": [], "counts": []}
    return {
        "feature": s.feature, "rows": s.rows, "count": s.count, "density": s.density, "max": _f(s.max),
        "mean": _f(s.mean),
        "histogram": {"edges": [_f(x) for x in s.hist_edges], "counts": s.hist_counts},
        "top": top,
        "intervals": [{"lo": _f(iv.lo), "hi": _f(iv.hi), "contains": iv.contains,
                       "examples": [example_record(e, names) for e in iv.examples]} for iv in s.intervals],
        "top_tokens": [t for t, _ in firing.most_common(5)],
        "logits": {k: [[t, _f(v)] for t, v in logits.get(k, [])] for k in ("top", "bottom")},
        "logit_histogram": {"edges": [_f(x) for x in hist["edges"]], "counts": list(hist["counts"])},
        "correlated": [[j, round(r, 4)] for j, r in s.correlated],
        "dictionary_density": s.dictionary.log_density if s.dictionary is not None else None,
    }


def token_names(stats: Sequence[FeatureStats], decode: Decode) -> dict[int, str]:
    """Strings of every token id the examples hold, decoded once each."""
    ids = sorted({t for s in stats for e in s.examples() for t in e.tokens})
    return dict(zip(ids, decode(ids)))


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """The index row of a feature."""
    return {"feature": record["feature"], "density": record["density"], "count": record["count"],
            "max": record["max"], "mean": record["mean"], "top_tokens": record["top_tokens"],
            "promotes": [t for t, _ in record["logits"]["top"][:5]]}
