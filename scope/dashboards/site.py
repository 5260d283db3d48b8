"""The static dashboard site: an index of features and one page per feature, opening from ``file://``.

Layout of a site folder (local or any fsspec URL)::

    index.html               sortable, searchable table of every published feature
    features/000123.html     one page per feature
    data/index.json          the index rows (merged when a subset is published again)
    data/features/000123.json  the full data behind each page (the Neuronpedia export reads it)
    assets/plotly.min.js     plotly.js, once for the whole site
    assets/dashboard.css, assets/dashboard.js
    site.json                what the site was computed from (dictionary, store, settings)

Nothing is fetched from the network: scripts and styles are local files, fonts are the system's.
Every string from tokens or from the user goes through jinja2's autoescaping; data handed to
scripts goes through ``tojson``, which also escapes ``<``, ``>``, ``&`` and quotes.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup, escape
from plotly.offline import get_plotlyjs
from tqdm.auto import tqdm

from scope.store.fs import StoreFS

SITE_META = "site.json"
SITE_FORMAT = "scope-dashboard"
SITE_VERSION = 1
ASSETS = ("dashboard.css", "dashboard.js")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, fallback: str = "dictionary") -> str:
    """A file-name-safe form of user text: letters, digits, '.', '_' and '-' only, never a path."""
    return _UNSAFE.sub("-", text).strip("-.")[:80] or fallback


def feature_page(feature: int) -> str:
    """Relative path of a feature's page (file names come from integers only)."""
    return f"features/{int(feature):06d}.html"


def feature_data(feature: int) -> str:
    return f"data/features/{int(feature):06d}.json"


def _env() -> Environment:
    env = Environment(loader=PackageLoader("scope.dashboards", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda x: f"{100 * x:.3g}%"
    env.filters["num"] = lambda x: f"{x:.4g}"
    env.filters["shown"] = _shown
    env.globals["feature_page"] = feature_page
    env.globals["context"] = context_html
    return env


def _shown(token: str) -> str:
    """A token on its own (a chip, a table cell): newlines and tabs made visible, a bare space too."""
    if token and not token.strip(" "):
        return "␣" * len(token)
    return token.replace("\n", "↵").replace("\t", "⇥") or "∅"


@functools.lru_cache(maxsize=1 << 16)
def _token_html(token: str) -> str:
    """A token inside running text: spaces stay spaces (the line keeps them), newlines and tabs show."""
    return str(escape(token.replace("\n", "↵").replace("\t", "⇥")))


def context_html(ex: dict[str, Any], top: float) -> Markup:
    """One example as a line of token spans shaded by activation, the value in each span's title.

    Built here rather than in a template macro: it is most of a page, and a macro costs ~5x more. The
    token text is the only string from the data and is escaped (once per distinct token); the rest is
    numbers formatted here and fixed markup.
    """
    spans = []
    for i, (token, v) in enumerate(zip(ex["tokens"], ex["values"])):
        v = float(v)
        cls = ("tok on" if v > 0 else "tok") + (" focus" if i == ex["focus"] else "")
        alpha = min(max(v / top, 0.0), 1.0) if top > 0 else 0.0
        spans.append(f'<span class="{cls}" style="--a:{alpha:.3f}" title="{v:.4g}">{_token_html(token)}</span>')
    return Markup(f'<div class="ctx" data-row="{int(ex["row"])}"><span class="val">{float(ex["value"]):.4g}</span>'
                  f'<span class="text">{"".join(spans)}</span></div>\n')


def histogram_figure(record: dict[str, Any], name: str) -> dict[str, Any]:
    """The activation histogram as a plotly figure (bars between the exact bin edges), as plain JSON.

    Built as a dict rather than through ``plotly.graph_objects``: validating a figure object costs
    more than the rest of a feature page.
    """
    edges, counts = record["histogram"]["edges"], record["histogram"]["counts"]
    bar = {"type": "bar", "x": [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])], "y": counts,
           "width": [b - a for a, b in zip(edges[:-1], edges[1:])], "marker": {"color": "#e8772e"},
           "hovertemplate": "%{x:.4g}: %{y} rows<extra></extra>"}
    title = (f"Feature {record['feature']} of {name}: activations when firing "
             f"({record['count']:,} of {record['rows']:,} rows)")
    layout = {"title": {"text": title}, "height": 260, "bargap": 0, "margin": {"l": 50, "r": 10, "t": 30, "b": 40},
              "xaxis": {"title": {"text": "activation"}}, "yaxis": {"title": {"text": "rows"}},
              "plot_bgcolor": "white", "font": {"size": 12}}
    return {"data": [bar], "layout": layout}


def write_assets(fs: StoreFS) -> None:
    """plotly.js and the site's own script and stylesheet (written once; rewritten when they differ)."""
    if not fs.exists("assets/plotly.min.js"):
        fs.write_atomic("assets/plotly.min.js", get_plotlyjs().encode())
    for name in ASSETS:
        data = resources.files("scope.dashboards").joinpath("assets", name).read_bytes()
        if not fs.exists(f"assets/{name}") or fs.read_bytes(f"assets/{name}") != data:
            fs.write_atomic(f"assets/{name}", data)


def render_site(out: str, records: list[dict[str, Any]], index: dict[int, dict[str, Any]], meta: dict[str, Any],
                progress: bool = True) -> dict[str, str]:
    """Write the pages of ``records`` and the index of ``index`` (every published feature) into ``out``.

    Pages are written first, then the index data and page, each atomically, so a reader never sees
    an index row whose page is missing.
    """
    fs = StoreFS(out)
    fs.makedirs()
    write_assets(fs)
    env = _env()
    page = env.get_template("feature.html.j2")
    published = set(index)
    for rec in tqdm(records, desc="feature pages", unit="page", disable=not progress, dynamic_ncols=True):
        fs.write_atomic(feature_data(rec["feature"]), json.dumps(rec).encode())
        html = page.render(f=rec, meta=meta, figure=histogram_figure(rec, meta["name"]), published=published, root="../")
        fs.write_atomic(feature_page(rec["feature"]), html.encode())
    rows = [index[k] for k in sorted(index)]
    fs.write_atomic("data/index.json", json.dumps({"features": rows}).encode())
    fs.write_atomic("index.html", env.get_template("index.html.j2").render(rows=rows, meta=meta, root="").encode())
    return {"index": fs.path("index.html"), "folder": fs.path("")}


def read_index(out: str) -> dict[int, dict[str, Any]]:
    """The index rows of an existing site (empty for a new folder)."""
    fs = StoreFS(out)
    if not fs.exists("data/index.json"):
        return {}
    return {int(r["feature"]): r for r in json.loads(fs.read_bytes("data/index.json"))["features"]}


def read_feature(out: str, feature: int) -> dict[str, Any]:
    """The data behind one feature's page of an existing site."""
    return json.loads(StoreFS(out).read_bytes(feature_data(feature)))
