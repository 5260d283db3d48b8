"""Interventions on features: ablate, clamp or scale features and watch the next-token log-probabilities move.

The prompt runs twice with the dictionary spliced in (by default with its error term, so the first
run is the clean model and the second differs only by the edit): once as it is, once with the
:class:`~scope.analysis.splice.FeatureEdit` s applied. At the prompt's last position (the next
token) the result gives the log-probability change of chosen tokens, the tokens that rose and fell
most, and KL(before ‖ after).

Source: the Gemma Scope tutorial (Lieberum et al. 2024) and SAELens's ``HookedSAETransformer``,
where a feature is steered or ablated through a hook on the SAE's activations with the error term
kept. See docs/methods/feature_analysis.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from scope.analysis.features import token_strings
from scope.analysis.splice import SAEs, FeatureEdit, prompt_tokens, spliced, token_id
from scope.errors import ScopeError
from scope.models import LoadedModel


@dataclass
class TokenShift:
    """A next token's log-probability before and after the edit."""

    token: str
    token_id: int
    before: float
    after: float

    @property
    def delta(self) -> float:
        return self.after - self.before

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "delta": self.delta}


@dataclass
class InterventionResult:
    """What an edit of features did to the prediction of the token after the prompt."""

    text: str
    edits: list[FeatureEdit]
    error_term: bool
    tokens: list[TokenShift]  # the tokens asked about
    rose: list[TokenShift]  # largest increases of log-probability, largest first
    fell: list[TokenShift]  # largest decreases, largest first
    kl: float  # KL(before ‖ after) of the next-token distribution, nats
    top_before: list[TokenShift] = field(default_factory=list)  # most likely next tokens before the edit
    top_after: list[TokenShift] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "edits": [e.to_dict() for e in self.edits], "error_term": self.error_term,
                "kl": self.kl, **{k: [t.to_dict() for t in getattr(self, k)]
                                  for k in ("tokens", "rose", "fell", "top_before", "top_after")}}

    def figure(self):
        """Log-probability change of the chosen tokens and of those that moved most (plotly bars)."""
        import plotly.graph_objects as go

        shown = list({t.token_id: t for t in [*self.tokens, *self.rose, *self.fell]}.values())
        shown.sort(key=lambda t: t.delta)
        asked = {t.token_id for t in self.tokens}
        fig = go.Figure(go.Bar(x=[t.delta for t in shown], y=[repr(t.token) for t in shown], orientation="h",
                               marker_color=["#e8772e" if t.token_id in asked else "#8aa" for t in shown],
                               hovertemplate="%{y}: Δ log p = %{x:.4g}<extra></extra>"))
        what = "; ".join(_describe(e) for e in self.edits)
        fig.update_layout(title=f"Next-token log-probability change after {what}", xaxis_title="Δ log p (nats)",
                          yaxis={"type": "category"}, height=max(300, 22 * len(shown) + 120))
        return fig


def _describe(e: FeatureEdit) -> str:
    what = {"ablate": "ablating", "clamp": f"clamping to {e.value:g}", "scale": f"scaling by {e.value:g}"}[e.mode]
    where = "every position" if e.positions is None else f"positions {list(e.positions)}"
    return f"{what} features {list(e.features)} at {where}"


def _shifts(model: LoadedModel, ids: list[int], before: torch.Tensor, after: torch.Tensor) -> list[TokenShift]:
    names = token_strings(model, ids)
    return [TokenShift(n, i, float(before[i]), float(after[i])) for n, i in zip(names, ids)]


@torch.no_grad()
def next_token_logprobs(model: LoadedModel, saes: SAEs, ids: torch.Tensor, edits: Sequence[FeatureEdit] = (),
                        error_term: bool = True) -> torch.Tensor:
    """Float32 log-probabilities ``[vocab]`` of the token after ``ids [1, pos]``, dictionaries spliced in."""
    with spliced(model, saes, error_term=error_term, edits=edits, record=False):
        logits = model.bridge(ids)
    return logits[0, -1].float().log_softmax(-1)


def intervene(model: LoadedModel, saes: SAEs, text: str, edits: FeatureEdit | Sequence[FeatureEdit],
              tokens: Sequence[str | int] = (), k: int = 10, error_term: bool = True) -> InterventionResult:
    """The change of the next-token log-probabilities after ``text`` when ``edits`` are applied."""
    edits = [edits] if isinstance(edits, FeatureEdit) else list(edits)
    if not edits:
        raise ScopeError("no feature edits given; ablate, clamp or scale some features")
    if k < 0:
        raise ScopeError(f"k (tokens that moved most) must be 0 or more, got {k}")
    asked = [token_id(model, t) for t in tokens]
    ids = prompt_tokens(model, text)
    before = next_token_logprobs(model, saes, ids, error_term=error_term)
    after = next_token_logprobs(model, saes, ids, edits, error_term=error_term)
    delta = after - before
    kl = float((before.exp() * (before - after)).sum())
    return InterventionResult(
        text=text, edits=edits, error_term=error_term, tokens=_shifts(model, asked, before, after),
        rose=_shifts(model, delta.topk(k).indices.tolist(), before, after),
        fell=_shifts(model, (-delta).topk(k).indices.tolist(), before, after), kl=kl,
        top_before=_shifts(model, before.topk(k).indices.tolist(), before, after),
        top_after=_shifts(model, after.topk(k).indices.tolist(), before, after))
