"""Writing an analysis's results: one JSON file and plotly figures that open offline."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from scope.store.fs import StoreFS


def write_results(out: str, json_name: str, data: dict[str, Any], figures: dict[str, go.Figure]) -> dict[str, str]:
    """Write ``json_name`` and ``<name>.html`` per figure into folder or fsspec URL ``out``, atomically.

    The figures load one ``plotly.min.js`` written beside them, so they open from ``file://`` with
    no network. NaN and infinities become null so the JSON stays standard. Returns the written paths.
    """
    fs = StoreFS(out)
    fs.makedirs()
    fs.write_atomic(json_name, json.dumps(_finite(data), indent=1).encode())
    if not fs.exists("plotly.min.js"):
        fs.write_atomic("plotly.min.js", get_plotlyjs().encode())
    written = {"json": fs.path(json_name)}
    for name, fig in figures.items():
        fs.write_atomic(f"{name}.html", fig.to_html(include_plotlyjs="directory", full_html=True).encode())
        written[name] = fs.path(f"{name}.html")
    return written


def write_html(fig: go.Figure, path: str | Path) -> Path:
    """One figure as a self-contained HTML file (plotly.js inlined, so it opens offline on its own)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True)
    return path


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
