"""Features of a prompt: which dictionary features fire on which token, as a table and a heatmap.

The prompt runs once with the dictionary spliced in with its error term (so the model is unchanged)
and the features of every token are read off the splice. BOS is left out of the table, as stores
leave it out of training. Feature ids link to the pages of a published dashboard site when links are
given (:func:`scope.dashboards.links.site_links`).

Source: the Gemma Scope tutorial (Lieberum et al. 2024), whose first step is exactly this: the
features a JumpReLU SAE finds on each token of a prompt, then their Neuronpedia dashboards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from scope.analysis.splice import prompt_tokens, spliced
from scope.dictionaries.base import Dictionary
from scope.errors import ScopeError
from scope.models import LoadedModel

Links = Callable[[int], "str | None"]  # feature id -> URL of its dashboard page (None where unpublished)


@dataclass
class TokenFeatures:
    """One token of the prompt and its strongest features, strongest first."""

    position: int  # absolute (BOS is 0)
    token: str
    token_id: int
    features: list[int]
    values: list[float]


@dataclass
class PromptFeatures:
    """Per token, the top features and their activations; ``acts`` holds every feature of every token."""

    text: str
    hook: str
    k: int
    tokens: list[TokenFeatures]
    acts: torch.Tensor = field(repr=False)  # [positions without BOS, d_sae]
    links: Links | None = field(default=None, repr=False)

    def link(self, feature: int) -> str | None:
        """The URL of the feature's dashboard page, when a site holds it."""
        return self.links(feature) if self.links is not None else None

    def top(self, n: int = 10) -> list[tuple[int, float]]:
        """(feature, largest activation over the prompt), the ``n`` strongest features first."""
        best = self.acts.max(0).values
        values, idx = best.topk(min(n, best.numel()))
        return [(int(i), float(v)) for i, v in zip(idx, values) if v > 0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the prompt, its hook and every token's top features (with links when known)."""
        return {"text": self.text, "hook": self.hook, "k": self.k,
                "tokens": [{"position": t.position, "token": t.token, "token_id": t.token_id,
                            "features": [{"feature": f, "value": v, "link": self.link(f)}
                                         for f, v in zip(t.features, t.values)]} for t in self.tokens],
                "top": [{"feature": f, "max": v, "link": self.link(f)} for f, v in self.top()]}

    def to_frame(self):
        """One row per (token, feature): position, token, rank, feature, value and link (pandas)."""
        pd = _pandas()
        return pd.DataFrame([{"position": t.position, "token": t.token, "rank": r, "feature": f, "value": v,
                              "link": self.link(f)}
                             for t in self.tokens for r, (f, v) in enumerate(zip(t.features, t.values))])

    def figure(self, n: int = 20):
        """A token-by-feature heatmap of the ``n`` strongest features; linked feature ids open their pages."""
        import plotly.graph_objects as go

        feats = [f for f, _ in self.top(n)]
        if not feats:
            raise ScopeError(f"no feature of the SAE at {self.hook} fires on {self.text!r}")
        z = self.acts[:, feats].T.tolist()
        rows = [f"{t.position}: {t.token!r}" for t in self.tokens]
        names = [f'<a href="{url}">{f}</a>' if (url := self.link(f)) else str(f) for f in feats]
        fig = go.Figure(go.Heatmap(z=z, x=rows, y=[str(f) for f in feats], colorscale="Oranges", zmin=0,
                                   hovertemplate="token %{x}<br>feature %{y}<br>activation %{z:.4g}<extra></extra>"))
        fig.update_layout(title=f"Features of the SAE at {self.hook} on {self.text!r}", xaxis_title="token",
                          yaxis={"title": "feature (strongest on top)", "autorange": "reversed", "type": "category",
                                 "tickvals": [str(f) for f in feats], "ticktext": names},
                          height=max(300, 22 * len(feats) + 150))
        return fig


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ScopeError("to_frame needs pandas, an optional dependency: pip install pandas") from None
    return pandas


def token_strings(model: LoadedModel, ids: list[int]) -> list[str]:
    """Each token id as its own text."""
    return [model.tokenizer.decode([i]) for i in ids]


def open_dictionary(path: str, model: str | None = None, dtype: str | None = None,
                    device: str | None = None) -> tuple[Dictionary, LoadedModel]:
    """A dictionary folder (scope, SAELens or Gemma Scope layout) and its model: ``model``, else the one the
    dictionary names, else the bundled Gemma 3 270M."""
    from scope.dictionaries.interop import load_any
    from scope.models import BUNDLED_MODEL, load_model

    sae = load_any(path)
    lm = load_model(model or sae.cfg.model or BUNDLED_MODEL, dtype=dtype, device=device)
    return sae.to(lm.device), lm


@torch.no_grad()
def prompt_features(model: LoadedModel, sae: Dictionary, text: str, k: int = 5, hook: str | None = None,
                    links: Links | None = None) -> PromptFeatures:
    """The ``k`` strongest features of every token of ``text`` (BOS left out), from one spliced forward."""
    if k <= 0:
        raise ScopeError(f"k (features per token) must be positive, got {k}")
    hook = hook or sae.cfg.hook
    ids = prompt_tokens(model, text)
    with spliced(model, {hook: sae} if hook else sae, error_term=True) as sp:
        model.bridge(ids, return_type=None)
    hook = next(iter(sp.acts))
    acts = sp.acts[hook][0, 1:].float().cpu()
    values, idx = acts.topk(min(k, acts.shape[-1]), dim=-1)
    names = token_strings(model, ids[0].tolist())
    rows = []
    for p in range(acts.shape[0]):
        keep = values[p] > 0  # a feature at zero is not firing, whatever its rank
        rows.append(TokenFeatures(p + 1, names[p + 1], int(ids[0, p + 1]), idx[p][keep].tolist(),
                                  values[p][keep].tolist()))
    return PromptFeatures(text=text, hook=hook, k=k, tokens=rows, acts=acts, links=links)
