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
import math
import re
import shlex
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup, escape
from plotly.offline import get_plotlyjs
from tqdm.auto import tqdm

from scope.dashboards.stats import StatsConfig
from scope.errors import ScopeError
from scope.files import parse_json
from scope.store.fs import StoreFS

SITE_META = "site.json"
SITE_FORMAT = "scope-dashboard"
SITE_VERSION = 2  # 2: centred contexts, logit and density plots, correlated-feature pages
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

    The line is centred on the example's own token (as Neuronpedia shows it): the tokens before it
    are right-aligned and cut at the left edge, those after it left-aligned and cut at the right.
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
    focus = ex["focus"]
    return Markup(f'<div class="ctx" data-row="{int(ex["row"])}"><span class="val">{float(ex["value"]):.4g}</span>'
                  f'<span class="text"><span class="before">{"".join(spans[:focus])}</span>{spans[focus]}'
                  f'<span class="after">{"".join(spans[focus + 1:])}</span></span></div>\n')


_LAYOUT = {"bargap": 0, "plot_bgcolor": "white", "font": {"size": 12}, "showlegend": False,
           # room above the plot for plotly's toolbar, so it covers no bar; titles are the page's own headings
           "margin": {"l": 50, "r": 10, "t": 28, "b": 40}}


def _bars(edges: list[float], counts: list[int], color: str | list[str], hover: str) -> dict[str, Any]:
    """Bars between exact bin edges, as a plotly trace."""
    return {"type": "bar", "x": [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])], "y": counts,
            "width": [b - a for a, b in zip(edges[:-1], edges[1:])], "marker": {"color": color},
            "hovertemplate": hover + "<extra></extra>"}


def histogram_figure(record: dict[str, Any]) -> dict[str, Any]:
    """The activation histogram as a plotly figure, as plain JSON.

    Built as dicts rather than through ``plotly.graph_objects``: validating a figure object costs
    more than the rest of a feature page.
    """
    hist = record["histogram"]
    return {"data": [_bars(hist["edges"], hist["counts"], "#e8772e", "%{x:.4g}: %{y} rows")],
            "layout": {**_LAYOUT, "height": 240, "xaxis": {"title": {"text": "activation"}},
                       "yaxis": {"title": {"text": "rows"}}}}


def logit_figure(record: dict[str, Any]) -> dict[str, Any]:
    """The feature's logit effect on every token of the vocabulary: suppressed in red, promoted in blue."""
    hist = record["logit_histogram"]
    edges = hist["edges"]
    colors = ["#c62828" if (a + b) / 2 < 0 else "#1565c0" for a, b in zip(edges[:-1], edges[1:])]
    return {"data": [_bars(edges, hist["counts"], colors, "logit %{x:.3g}: %{y} tokens")],
            "layout": {**_LAYOUT, "height": 200, "xaxis": {"title": {"text": "logit effect"}},
                       "yaxis": {"title": {"text": "tokens"}, "type": "log"}}}


def density_figure(record: dict[str, Any]) -> dict[str, Any]:
    """Where the feature's firing density lies among all the dictionary's features (log10 axis)."""
    dens = record["dictionary_density"]
    fig = {"data": [_bars(dens["edges"], dens["counts"], "#b0bec5", "10^%{x:.2f}: %{y} features")],
           "layout": {**_LAYOUT, "height": 200, "xaxis": {"title": {"text": "log10 firing density"}},
                      "yaxis": {"title": {"text": "features"}}}}
    if record["density"] > 0:
        x = math.log10(record["density"])
        fig["layout"]["shapes"] = [{"type": "line", "x0": x, "x1": x, "yref": "paper", "y0": 0, "y1": 1,
                                    "line": {"color": "#e8772e", "width": 3}}]
    return fig


def figures(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The plots of a feature page by the id of the element each is drawn in; a dead feature has no activations."""
    out = {}
    if record["count"]:
        out["hist"] = histogram_figure(record)
    if record["logit_histogram"]["counts"]:
        out["logit-hist"] = logit_figure(record)
    if record.get("dictionary_density"):
        out["density"] = density_figure(record)
    return out


def publish_command(meta: dict[str, Any], out: str, features: str) -> str | None:
    """The ``scope dashboard publish`` command that adds ``features`` to this site (None for an in-memory
    dictionary, or settings that have no flag)."""
    source, settings = meta.get("sae_source"), meta.get("settings", {})
    if not source or source == "(in memory)":
        return None
    flags = {k: settings[k] for k in ("top_k", "intervals", "per_interval", "left", "right", "correlated",
                                      "max_rows") if k in settings}
    if StatsConfig(**flags).model_dump(exclude={"batch_size"}) != settings:
        return None
    defaults = StatsConfig().model_dump()
    args = ["scope", "dashboard", "publish", "--sae", source, "--store", meta["store_url"], "--out", out,
            "--features", features, "--hook", meta["hook"]]
    if meta["sae"].get("hook") not in (None, meta["hook"]):
        args.append("--force-hook")
    args += [a for k, v in flags.items() if v != defaults[k] for a in (f"--{k.replace('_', '-')}", str(v))]
    if meta["name"] != Path(source).name:
        args += ["--name", meta["name"]]
    return shlex.join(args)


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
    for rec in tqdm(records, desc="feature pages", unit="page", disable=not progress, dynamic_ncols=True):
        fs.write_atomic(feature_data(rec["feature"]), json.dumps(rec).encode())
        html = page.render(f=rec, meta=meta, figures=figures(rec), root="../")
        fs.write_atomic(feature_page(rec["feature"]), html.encode())
    _write_stubs(fs, env, records, index, meta, out)
    rows = [index[k] for k in sorted(index)]
    fs.write_atomic("data/index.json", json.dumps({"features": rows}).encode())
    fs.write_atomic("index.html", env.get_template("index.html.j2").render(rows=rows, meta=meta, root="").encode())
    return {"index": fs.path("index.html"), "folder": fs.path("")}


def _write_stubs(fs: StoreFS, env: Environment, records: list[dict[str, Any]], index: dict[int, Any],
                 meta: dict[str, Any], out: str) -> None:
    """A short page for every correlated feature that has none yet, so each correlated feature is a link that
    opens; publishing that feature later replaces it with its dashboard."""
    refs: dict[int, list[tuple[int, float]]] = {}
    for rec in records:
        for j, r in rec["correlated"]:
            if j not in index:
                refs.setdefault(int(j), []).append((rec["feature"], r))
    stub = env.get_template("stub.html.j2")
    for j, by in sorted(refs.items()):
        if not fs.exists(feature_page(j)):
            html = stub.render(feature=j, by=by, meta=meta, command=publish_command(meta, out, str(j)), root="../")
            fs.write_atomic(feature_page(j), html.encode())


def read_site_json(fs: StoreFS, rel: str) -> Any:
    """A JSON file of a site, or a ScopeError naming it when it is not JSON."""
    return parse_json(fs.read_bytes(rel), fs.url(rel), "it is not part of a scope dashboard site; publish into "
                      "another --out, or pass --overwrite to start this site afresh")


def read_index(out: str) -> dict[int, dict[str, Any]]:
    """The index rows of an existing site (empty for a new folder)."""
    fs = StoreFS(out)
    if not fs.exists("data/index.json"):
        return {}
    data = read_site_json(fs, "data/index.json")
    if not isinstance(data, dict) or not isinstance(data.get("features"), list):
        raise ScopeError(f"{fs.url('data/index.json')} is not a dashboard index (no \"features\" list); publish "
                         "into another --out, or pass --overwrite to start this site afresh")
    return {int(r["feature"]): r for r in data["features"]}


def read_feature(out: str, feature: int) -> dict[str, Any]:
    """The data behind one feature's page of an existing site."""
    return read_site_json(StoreFS(out), feature_data(feature))
