"""The RoPE report: frequency usage, head types with their frequency profiles, and p-RoPE costs,
as one JSON-ready object and a folder of plotly figures (what ``scope analyze rope`` writes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from scope.analysis.rope import (FrequencyUsage, HeadScores, PRopeResult, analyze_windows, band_shares,
                                 dropped_chunks, frequency_usage_from_store, p_rope_sweep, store_rope_hooks)
from scope.analysis.output import write_results
from scope.data import Window
from scope.models import LoadedModel
from scope.store.reader import ActivationStore

_TENSORS = {"q": "query", "k": "key", "v": "value (control: not rotated)"}


@dataclass
class RopeReport:
    """Everything ``scope analyze rope`` computes, JSON-ready through :meth:`to_dict`."""

    usage: FrequencyUsage
    heads: HeadScores
    base_ce: float | None = None
    p_rope: list[PRopeResult] = field(default_factory=list)
    eval_tokens: int = 0

    def head_profiles(self) -> list[dict[str, Any]]:
        """Each classified head's q profile, its KV head's k profile, and their band shares."""
        u = self.usage
        group = u.q.shape[1] // u.k.shape[1]
        out = []
        for h in self.heads.classify():
            if h["layer"] not in u.layers:
                continue
            i = u.layers.index(h["layer"])
            q, k = u.q[i, h["head"]], u.k[i, h["head"] // group]
            out.append({**h, "layer_type": u.layer_types[i], "q": q.tolist(), "k": k.tolist(),
                        "q_band_shares": band_shares(q).tolist(), "qk_band_shares": band_shares(q * k).tolist()})
        return out

    def summary(self, profiles: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Per layer type, the mean share of q/k/v norm in each quarter of the frequencies."""
        u = self.usage
        out: dict[str, Any] = {}
        for kind in sorted(set(u.layer_types)):
            rows = [i for i, t in enumerate(u.layer_types) if t == kind]
            out[kind] = {t: u.band_shares(t)[rows].mean((0, 1)).tolist() for t in ("q", "k", "v")}
        by_type: dict[str, list[list[float]]] = {}
        for h in self.head_profiles() if profiles is None else profiles:
            by_type.setdefault(h["type"], []).append(h["qk_band_shares"])
        out["heads_qk_band_shares"] = {t: torch.tensor(v).mean(0).tolist() for t, v in by_type.items()}
        out["bands"] = "quarters of the frequency chunks, highest frequency first"
        return out

    def to_dict(self) -> dict[str, Any]:
        profiles = self.head_profiles()
        return {"summary": self.summary(profiles), "frequency_usage": self.usage.to_dict(),
                "head_scores": self.heads.to_dict(), "head_profiles": profiles, "base_ce": self.base_ce, "eval_tokens": self.eval_tokens,
                "p_rope": [vars(r) for r in self.p_rope]}


def rope_report(
    model: LoadedModel,
    windows: Sequence[Window],
    heldout: Sequence[Window] = (),
    store: ActivationStore | None = None,
    layers: Sequence[int] | None = None,
    ps: Sequence[float] = (1.0, 0.75, 0.5, 0.25, 0.0),
    batch_size: int = 8,
    progress: bool = True,
) -> RopeReport:
    """Frequency usage (from the store's q/k/v if it has them, else from the model over ``windows``),
    head scores over ``windows`` and the p-RoPE sweep over ``heldout`` (skipped when empty)."""
    for p in ps:  # a bad fraction fails now, not after the analysis pass
        dropped_chunks(model.facts.d_head // 2, p)
    from_store = store is not None and bool(store_rope_hooks(store))
    usage, heads = analyze_windows(model, windows, layers, batch_size, frequencies=not from_store, progress=progress)
    if from_store:
        usage = frequency_usage_from_store(model, store, progress=progress)
    report = RopeReport(usage=usage, heads=heads)
    if heldout:
        report.base_ce, report.p_rope = p_rope_sweep(model, heldout, ps=ps, batch_size=max(1, batch_size // 4),
                                                     progress=progress)
        report.eval_tokens = sum(len(w.tokens) - 1 for w in heldout)
    return report


# --- figures ----------------------------------------------------------------------------------
def _freq_axis(inv_freq: Sequence[float], n: int = 6) -> dict[str, Any]:
    """Tick positions at chunk indices labelled with their frequency in radians per token."""
    idx = [round(i * (len(inv_freq) - 1) / (n - 1)) for i in range(n)]
    return {"tickvals": idx, "ticktext": [f"{inv_freq[i]:.1e}" for i in idx], "title": "frequency g_k (rad/token)"}


def usage_figure(usage: FrequencyUsage, tensor: str = "q") -> go.Figure:
    """Layer × frequency heatmaps of the mean chunk norm (mean over heads), local and global apart."""
    kinds = sorted(set(usage.layer_types))
    values = getattr(usage, tensor).mean(1)
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=[f"{k} layers" for k in kinds],
                        horizontal_spacing=0.08)
    for c, kind in enumerate(kinds, start=1):
        rows = [i for i, t in enumerate(usage.layer_types) if t == kind]
        g = usage.inv_freq[kind]
        fig.add_trace(go.Heatmap(
            z=values[rows].tolist(), y=[f"L{usage.layers[i]}" for i in rows], coloraxis="coloraxis",
            customdata=[[f"{x:.3g}" for x in g]] * len(rows),
            hovertemplate="%{y} chunk %{x}<br>g = %{customdata} rad/token<br>mean norm %{z:.3f}<extra></extra>"),
            row=1, col=c)
        fig.update_xaxes(**_freq_axis(g), row=1, col=c)
    fig.update_layout(title=f"Mean ‖{tensor}^(k)‖ per RoPE frequency ({_TENSORS[tensor]}), {usage.model}, "
                      f"{usage.tokens:,} tokens", coloraxis={"colorscale": "Viridis"}, height=300 + 18 * len(usage.layers))
    return fig


def per_head_figure(usage: FrequencyUsage, tensor: str = "q") -> go.Figure:
    """One layer × frequency heatmap per head (local and global layers stacked, labelled)."""
    x = getattr(usage, tensor)
    heads = x.shape[1]
    fig = make_subplots(rows=1, cols=heads, subplot_titles=[f"head {h}" for h in range(heads)], shared_yaxes=True)
    labels = [f"L{L} {t[0]}" for L, t in zip(usage.layers, usage.layer_types)]
    for h in range(heads):
        fig.add_trace(go.Heatmap(z=x[:, h].tolist(), y=labels, coloraxis="coloraxis",
                                 hovertemplate="%{y} chunk %{x}<br>mean norm %{z:.3f}<extra></extra>"), row=1, col=h + 1)
        fig.update_xaxes(title="chunk k (0 = highest frequency)", row=1, col=h + 1)
    fig.update_layout(title=f"Mean ‖{tensor}^(k)‖ per head ({_TENSORS[tensor]}); rows: layer, l = local, g = global",
                      coloraxis={"colorscale": "Viridis"}, height=300 + 18 * len(usage.layers))
    return fig


def heads_figure(report: RopeReport) -> go.Figure:
    """Head scores (previous vs diagonal, coloured by first-token attention) and classified heads'
    q·k frequency profiles."""
    hs = report.heads
    fig = make_subplots(rows=1, cols=2, subplot_titles=["head scores (thresholds dashed)",
                                                        "frequency profile ‖q^(k)‖·‖k^(k)‖ of classified heads"])
    names = [f"L{L}H{h}" for L in hs.layers for h in range(hs.scores["first"].shape[1])]
    fig.add_trace(go.Scatter(
        x=hs.scores["previous"].flatten().tolist(), y=hs.scores["diagonal"].flatten().tolist(), mode="markers",
        text=names, marker={"color": hs.scores["first"].flatten().tolist(), "colorscale": "Reds", "showscale": True,
                            "colorbar": {"title": "first-token", "x": 0.45}},
        hovertemplate="%{text}<br>previous %{x:.2f}<br>diagonal %{y:.2f}<br>first %{marker.color:.2f}<extra></extra>"),
        row=1, col=1)
    fig.add_vline(x=hs.thresholds["previous"], line_dash="dash", row=1, col=1)
    fig.add_hline(y=hs.thresholds["diagonal"], line_dash="dash", row=1, col=1)
    colours = {"diagonal": "#1f77b4", "previous": "#2ca02c", "first": "#d62728"}
    for h in report.head_profiles():
        prof = torch.tensor(h["q"]) * torch.tensor(h["k"])
        fig.add_trace(go.Scatter(y=(prof / prof.sum()).tolist(), mode="lines", line={"color": colours[h["type"]], "width": 1},
                                 name=f"L{h['layer']}H{h['head']} {h['type']}", legendgroup=h["type"]), row=1, col=2)
    fig.update_xaxes(title="previous-token score", row=1, col=1)
    fig.update_yaxes(title="diagonal score", row=1, col=1)
    fig.update_xaxes(title="chunk k (0 = highest frequency)", row=1, col=2)
    fig.update_yaxes(title="share of the profile", row=1, col=2)
    fig.update_layout(title="Attention head types and the frequencies they use", height=480)
    return fig


def p_rope_figure(report: RopeReport) -> go.Figure:
    """Held-out CE change against unmodified RoPE per kept fraction p, layer set and variant."""
    fig = go.Figure()
    for where in ("local", "global", "all"):
        for drop, dash in (("lowest", "solid"), ("highest", "dot")):
            pts = sorted((r.p, r.delta) for r in report.p_rope if r.where == where and r.drop in (drop, "-"))
            if len(pts) > 1:
                label = "p-RoPE (keep highest)" if drop == "lowest" else "reversed (keep lowest)"
                fig.add_trace(go.Scatter(x=[p for p, _ in pts], y=[d for _, d in pts], mode="lines+markers",
                                         name=f"{where} layers, {label}", line={"dash": dash}))
    fig.update_layout(title=f"p-RoPE at inference: held-out CE − unmodified ({report.base_ce or float('nan'):.3f} nats; "
                            f"{report.eval_tokens:,} tokens)", xaxis_title="fraction p of frequencies still rotating",
                      yaxis_title="Δ CE (nats/token)", yaxis_type="log" if _all_positive(report) else "linear")
    return fig


def _all_positive(report: RopeReport) -> bool:
    return all(r.delta > 0 for r in report.p_rope if r.p < 1) and any(r.p < 1 for r in report.p_rope)


def figures(report: RopeReport) -> dict[str, go.Figure]:
    """All the report's figures, keyed by the file stem they are saved under."""
    out = {f"{t}_usage": usage_figure(report.usage, t) for t in ("q", "k", "v")}
    out |= {f"{t}_usage_per_head": per_head_figure(report.usage, t) for t in ("q", "k")}
    out["head_types"] = heads_figure(report)
    if report.p_rope:
        out["p_rope"] = p_rope_figure(report)
    return out


def write_report(report: RopeReport, out: str) -> dict[str, str]:
    """Write ``rope.json`` and one HTML file per figure into folder or fsspec URL ``out``; returns the paths."""
    return write_results(out, "rope.json", report.to_dict(), figures(report))
