"""Feature search: the features that fire most on a token, a string or a label's documents, across a store.

One pass over the store's rows in order selects rows (those whose token ends an occurrence of the
string within one document, those of documents with a label, or both) and compares each feature on
the selected rows with the rest: its mean activation, how often it fires, and its selectivity
P(fires | selected) − P(fires | rest), the average selectivity of :mod:`scope.evals.selectivity`
for two groups. Hits are ranked by mean activation or by selectivity and link to the feature's
dashboard page when a site is given.

Source: Neuronpedia's search of a release's features by the tokens they fire on, and the
selectivity of Donhauser et al. 2025 (arXiv 2412.16247). See docs/methods/feature_analysis.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from scope.dashboards.stats import dictionary_hook
from scope.dictionaries.base import Dictionary
from scope.errors import ScopeError
from scope.steering.diffmean import concept_label
from scope.store.reader import ActivationStore, Batch

Rank = Literal["mean", "selectivity"]


@dataclass
class FeatureHit:
    """One feature on the selected rows against the rest of the store view."""

    feature: int
    mean: float  # mean activation over the selected rows (0 where it does not fire)
    frequency: float  # fraction of the selected rows it fires on
    max: float
    mean_rest: float
    frequency_rest: float
    link: str | None = None

    @property
    def selectivity(self) -> float:
        return self.frequency - self.frequency_rest

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "selectivity": self.selectivity}


@dataclass
class FeatureSearch:
    """The features ranked for one query over a store."""

    query: str
    hook: str
    by: Rank
    rows: int  # rows read
    selected: int  # of which selected
    hits: list[FeatureHit] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "hook": self.hook, "by": self.by, "rows": self.rows, "selected": self.selected,
                "hits": [h.to_dict() for h in self.hits]}

    def to_frame(self):
        """One row per hit (pandas)."""
        from scope.analysis.features import _pandas

        return _pandas().DataFrame([h.to_dict() for h in self.hits])

    def figure(self):
        """Mean activation on the selected rows against the rest, per hit (plotly bars)."""
        import plotly.graph_objects as go

        names = [str(h.feature) for h in self.hits]
        fig = go.Figure([go.Bar(x=names, y=[h.mean for h in self.hits], name="mean on the selected rows"),
                         go.Bar(x=names, y=[h.mean_rest for h in self.hits], name="mean on the other rows")])
        fig.update_layout(title=f"Features of the SAE at {self.hook} on {self.query} ({self.selected:,} of "
                                f"{self.rows:,} rows), by {self.by}", barmode="group",
                          xaxis={"title": "feature", "type": "category"}, yaxis_title="mean activation")
        return fig


class _Matcher:
    """Rows that end an occurrence of a token sequence inside one document, across batch boundaries."""

    def __init__(self, seq: Sequence[int]):
        self.seq = torch.tensor(list(seq), dtype=torch.long)
        self.carry: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, tok: torch.Tensor, doc: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        tok, doc, pos = tok.long(), doc.long(), pos.long()
        c = 0
        if self.carry is not None:
            c = len(self.carry[0])
            tok, doc, pos = (torch.cat([a, x]) for a, x in zip(self.carry, (tok, doc, pos)))
        n, length = len(tok) - c, len(self.seq)
        here = torch.arange(c, c + n)
        ok = torch.ones(n, dtype=torch.bool)
        for j in range(length):  # row r − j holds the token length − 1 − j of the sequence
            back = here - j
            valid = back >= 0
            back = back.clamp_min(0)
            same_run = (doc[back] == doc[here]) & (pos[back] == pos[here] - j)
            ok &= valid & same_run & (tok[back] == self.seq[length - 1 - j])
        keep = max(length - 1, 0)
        self.carry = tuple(x[len(x) - keep:] for x in (tok, doc, pos)) if keep else None
        return ok


def _first(b: Batch, n: int) -> Batch:
    return Batch({h: a[:n] for h, a in b.acts.items()}, b.token_id[:n], b.doc_id[:n], b.position[:n])


def _query(text: str | None, ids: list[int] | None, label: str | None) -> str:
    parts = []
    if text is not None:
        parts.append(f"the token(s) {text!r}")
    elif ids is not None:
        parts.append(f"token ids {ids}")
    if label is not None:
        parts.append(f"documents labelled {label!r}")
    return " in ".join(parts)


@torch.no_grad()
def search_features(sae: Dictionary, store: ActivationStore, *, text: str | None = None, tokenizer: Any = None,
                    token_ids: Sequence[int] | None = None, label: str | None = None, by: Rank = "mean", k: int = 20,
                    hook: str | None = None, max_rows: int | None = None, batch_size: int | None = None,
                    device: str | torch.device | None = None,
                    links: Callable[[int], str | None] | None = None) -> FeatureSearch:
    """The ``k`` features that fire most on ``text`` (or ``token_ids``) and/or a label's documents, across a store.

    A string of several tokens selects the rows of its last token wherever the whole string occurs
    within a document; ``tokenizer`` turns ``text`` into ids (the store's model's).
    """
    if by not in ("mean", "selectivity"):
        raise ScopeError(f"rank features by 'mean' or 'selectivity', got {by!r}")
    if k <= 0:
        raise ScopeError(f"k (features to return) must be positive, got {k}")
    if text is not None:
        if tokenizer is None:
            raise ScopeError("searching for a string needs the model's tokenizer (tokenizer=model.tokenizer)")
        token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not token_ids:
            raise ScopeError(f"{text!r} is no token; give a string such as ' Paris'")
    if token_ids is None and label is None:
        raise ScopeError("say what to search for: a string (text=), token ids (token_ids=) or a label (label=)")
    hook = dictionary_hook(sae, store, hook)
    if device is not None:
        sae.to(device)
    dev = sae.W_enc.device
    match = _Matcher(token_ids) if token_ids is not None else None
    inside = None
    if label is not None:
        label = concept_label(store, label)
        inside = torch.tensor(sorted(d for d, (lab, _) in store.documents.items() if lab == label))
    m = sae.cfg.d_sae
    sums = {g: torch.zeros(m, dtype=torch.float64, device=dev) for g in ("sel", "rest")}
    fires = {g: torch.zeros(m, dtype=torch.float64, device=dev) for g in ("sel", "rest")}
    top = torch.zeros(m, device=dev)
    rows = selected = 0
    step = batch_size or max(64, min(8192, (1 << 24) // m))
    for b in store.rows([hook], batch_size=step, shuffle=False, dtype="float32"):
        if max_rows is not None:
            b = _first(b, max_rows - rows)
        sel = torch.ones(len(b.doc_id), dtype=torch.bool)
        if match is not None:
            sel &= match(b.token_id, b.doc_id, b.position)
        if inside is not None:
            sel &= torch.isin(b.doc_id.long(), inside)
        codes = sae.encode(b.acts[hook].reshape(len(sel), -1).to(dev)).clamp_min(0)
        sel = sel.to(dev)
        for g, rows_of in (("sel", sel), ("rest", ~sel)):
            part = codes[rows_of]
            sums[g] += part.sum(0).double()
            fires[g] += (part > 0).sum(0).double()
        if sel.any():
            top = torch.maximum(top, codes[sel].max(0).values)
        rows += len(sel)
        selected += int(sel.sum())
        if max_rows is not None and rows >= max_rows:
            break
    query = _query(text, list(token_ids) if token_ids is not None else None, label)
    if not selected:
        raise ScopeError(f"no row of store {store.url!r} ({rows:,} rows read) is {query}; nothing to rank")
    n_rest = max(rows - selected, 1)
    mean, freq = sums["sel"] / selected, fires["sel"] / selected
    score = mean if by == "mean" else freq - fires["rest"] / n_rest
    order = score.topk(min(k, m)).indices.tolist()
    hits = [FeatureHit(feature=f, mean=float(mean[f]), frequency=float(freq[f]), max=float(top[f]),
                       mean_rest=float(sums["rest"][f] / n_rest), frequency_rest=float(fires["rest"][f] / n_rest),
                       link=links(f) if links is not None else None) for f in order]
    return FeatureSearch(query=query, hook=hook, by=by, rows=rows, selected=selected, hits=hits)
