"""The class-embedding report: identifiability by layer (trained vs random init), per-token
heatmaps over text, MLP memories; JSON and plotly figures (what ``scope analyze class-embedding`` writes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from scope.analysis.class_embedding import ClassSpace, Identifiability, identifiability
from scope.analysis.logit_lens import (MemoryReport, gemma_class_space, lens_identifiability, mlp_memories,
                                       residual_sites)
from scope.analysis.output import write_results
from scope.data import Window
from scope.hooks import capture
from scope.errors import ScopeError
from scope.models import LoadedModel, random_init


@dataclass
class ClassEmbeddingReport:
    """Identifiability of the trained model and of its random initialisation, plus optional extras."""

    trained: Identifiability
    random: Identifiability | None = None
    classes: list[str] | None = None
    memories: MemoryReport | None = None
    memory_examples: dict[int, list[dict]] = field(default_factory=dict)
    heatmap: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"trained": self.trained.to_dict(), "random": self.random.to_dict() if self.random else None,
                               "classes": self.classes, "heatmap": self.heatmap}
        if self.memories is not None:
            out["memories"] = {"layers": self.memories.layers, "agreement": self.memories.agreement,
                               "examples": {str(k): v for k, v in self.memory_examples.items()}}
        return out


@torch.no_grad()
def token_heatmap(model: LoadedModel, space: ClassSpace, window: Window, sites: Sequence[str],
                  label: int | None = None) -> dict[str, Any]:
    """Per-token identifiability ``[site, position]`` over one window (next token, or a fixed label)."""
    toks = torch.tensor([window.tokens])
    acts = capture(model, toks, sites)
    if label is None:
        target, cols = toks[0, 2:], slice(1, len(window.tokens) - 1)  # position t predicts token t+1
        shown: Any = [model.tokenizer.decode([t]) for t in target.tolist()]
    else:
        target, cols = torch.full((len(window.tokens) - 1,), label), slice(1, len(window.tokens))
        shown = space.classes[label] if space.classes else label
    rows = [identifiability(space.logits(acts[s][0, cols].float()), target).tolist() for s in sites]
    return {"tokens": [model.tokenizer.decode([t]) for t in window.tokens[cols]], "sites": list(sites), "scores": rows,
            "target": shown}


def _label(site: str) -> str:
    """Short axis label: embed, L6 (residual after block 6), L6 attn_out / mlp_out."""
    if site.endswith("hook_resid_pre"):
        return "embed"
    if not site.startswith("blocks."):
        return site
    parts = site.split(".")
    return f"L{parts[1]}" if site.endswith("resid_post") else f"L{parts[1]} {parts[-1].removeprefix('hook_')}"


def lens_report(model: LoadedModel, windows: Sequence[Window], labels: Sequence[int] | None = None,
                class_ids: Sequence[int] | None = None, class_names: Sequence[str] | None = None,
                layers: Sequence[int] | None = None, components: bool = False, trained: Identifiability | None = None,
                random_baseline: bool = True, memories: bool = False, batch_size: int = 4,
                progress: bool = True) -> ClassEmbeddingReport:
    """Identifiability of a Gemma model over windows (unless ``trained`` was scored already, e.g. from a
    store), a heatmap of the first window, optionally MLP memories and the random-init baseline.

    Classes are the next token, or with ``labels`` (one class index per window) the unembedding
    rows ``class_ids`` named ``class_names``.
    """
    if not windows:
        raise ScopeError("no text to project: the corpus or store gave no windows (with labels: no labelled documents)")
    space = gemma_class_space(model, class_ids, class_names)
    if trained is None:
        trained = lens_identifiability(model, windows, labels, space, layers, components, batch_size, progress)
    report = ClassEmbeddingReport(trained=trained, classes=space.classes)
    chain = residual_sites(model, layers)[1]
    report.heatmap = token_heatmap(model, space, windows[0], chain, labels[0] if labels else None)
    if memories:
        mem_layers = list(layers) if layers else list(range(model.facts.n_layers))
        report.memories = mlp_memories(model, windows, space, mem_layers, labels, class_top=1 if labels else 10,
                                       batch_size=batch_size)
        if space.classes:
            names = lambda ids: [space.classes[i] for i in ids]  # noqa: E731
        else:
            names = lambda ids: [model.tokenizer.decode([i]) for i in ids]  # noqa: E731
        report.memory_examples = {L: [{"memory": i, **report.memories.top_classes[L].named(i, names)} for i in range(3)]
                                  for L in mem_layers}
    if random_baseline:  # the same classes, read through the random copy's own norm and unembedding
        rand = random_init(model)
        report.random = lens_identifiability(rand, windows, labels, gemma_class_space(rand, class_ids, class_names),
                                             layers, False, batch_size, progress)
    return report


def layers_figure(report: ClassEmbeddingReport, title: str = "") -> go.Figure:
    """Mean identifiability and % identifiable tokens per residual site, trained vs random init."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["mean identifiability s", "% tokens with s = 1 (top-1)"])
    for name, res, dash in (("trained", report.trained, "solid"), ("random init", report.random, "dot")):
        if res is None:
            continue
        chain = [s for s in res.sites if s.change_rate_pct is not None or s is res.sites[0]]
        x = [_label(s.site) for s in chain]
        fig.add_trace(go.Scatter(x=x, y=[s.mean_score for s in chain], name=name, line={"dash": dash},
                                 legendgroup=name), row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=[s.identifiable_pct for s in chain], name=name, line={"dash": dash},
                                 legendgroup=name, showlegend=False), row=1, col=2)
    fig.update_yaxes(range=[0.4, 1.0], row=1, col=1)
    fig.update_layout(title=title or f"Class identifiability by layer ({report.trained.mode}, |C| = "
                      f"{report.trained.n_classes:,}, {report.trained.tokens:,} tokens)", height=420)
    return fig


def heatmap_figure(heatmap: dict[str, Any]) -> go.Figure:
    """Per-token identifiability over a text: sites down, tokens across; hover shows the target."""
    tokens = [t.replace("\n", "⏎") for t in heatmap["tokens"]]
    x = [f"{i}:{t}" for i, t in enumerate(tokens)]
    target = heatmap["target"]
    hover = [[f"→ {target[j]!r}" if isinstance(target, list) else f"class {target}" for j in range(len(x))]
             for _ in heatmap["sites"]]
    fig = go.Figure(go.Heatmap(z=heatmap["scores"], x=x, y=[_label(s) for s in heatmap["sites"]], zmin=0.5, zmax=1,
                               colorscale="Viridis", customdata=hover,
                               hovertemplate="%{y} %{x}<br>%{customdata}<br>s = %{z:.4f}<extra></extra>"))
    fig.update_layout(title="Identifiability of the true class per token and layer", height=300 + 16 * len(heatmap["sites"]),
                      xaxis={"tickangle": -60})
    return fig


def write_report(report: ClassEmbeddingReport, out: str) -> dict[str, str]:
    """Write ``class_embedding.json`` and the figures into folder or fsspec URL ``out``; returns the paths."""
    figs = {"identifiability_by_layer": layers_figure(report)}
    if report.heatmap:
        figs["token_heatmap"] = heatmap_figure(report.heatmap)
    return write_results(out, "class_embedding.json", report.to_dict(), figs)
