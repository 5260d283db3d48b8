"""The sparsity-fidelity frontier: L0 (log scale) against FVU for a sweep of evaluated dictionaries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go


def frontier_figure(results: Sequence[Mapping[str, Any]], title: str = "Sparsity vs. fidelity") -> go.Figure:
    """A plotly scatter of L0 (x, log) vs FVU (y), one trace per dictionary kind, points labelled by name.

    ``results`` are :func:`scope.evals.evaluate` dicts (needs ``l0``, ``fvu``; uses ``name``,
    ``kind``, ``d_sae`` and the LM ``delta_loss`` when present, for labels and hover text).
    """
    fig = go.Figure()
    kinds = sorted({str(r.get("kind", "?")) for r in results})
    for kind in kinds:
        # Sorted by L0 so the line through a kind's points reads as its frontier.
        rows = sorted((r for r in results if str(r.get("kind", "?")) == kind), key=lambda r: r["l0"])
        hover = [_hover(r) for r in rows]
        fig.add_trace(go.Scatter(
            x=[max(r["l0"], 1e-3) for r in rows],  # a log axis cannot show L0 = 0
            y=[r["fvu"] for r in rows], mode="lines+markers+text", name=kind,
            text=[str(r.get("name", kind)) for r in rows], textposition="top center",
            hovertext=hover, hoverinfo="text",
        ))
    fig.update_layout(title=title, xaxis_title="L0 (mean active latents per token)",
                      yaxis_title="FVU (mean-centred)", template="plotly_white", legend_title="kind")
    fig.update_xaxes(type="log")
    return fig


def _hover(r: Mapping[str, Any]) -> str:
    parts = [f"{r.get('name', '')} ({r.get('kind', '?')}, d_sae={r.get('d_sae', '?')})",
             f"L0 {r['l0']:.1f}", f"FVU {r['fvu']:.4f}"]
    lm = r.get("lm")
    if lm:
        parts.append(f"delta loss {lm['delta_loss']:.4f} nats")
    return "<br>".join(parts)


def write_frontier(results: Sequence[Mapping[str, Any]], path: str | Path, title: str = "Sparsity vs. fidelity") -> Path:
    """Write the frontier figure as a self-contained HTML file (plotly.js inlined: works offline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frontier_figure(results, title).write_html(str(path), include_plotlyjs=True)
    return path
