"""``scope features``: which features of a dictionary fire on each token of a prompt."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from scope.cli.common import DeviceOpt, JsonOpt, ModelDtypeOpt, SaeModelOpt, emit, friendly


@friendly
def features(
    sae: Annotated[str, typer.Option(help="Dictionary folder (scope, SAELens or Gemma Scope layout).")],
    text: Annotated[str, typer.Option(help="The prompt (BOS is added).")],
    k: Annotated[int, typer.Option(help="Features shown per token.")] = 5,
    site: Annotated[Optional[str], typer.Option(help="A dashboard site of this dictionary (`scope dashboard "
                                                     "publish`): feature ids link to their pages.")] = None,
    html: Annotated[Optional[str], typer.Option(help="Also write the token-by-feature heatmap to this HTML file "
                                                     "(self-contained, opens offline).")] = None,
    hook: Annotated[Optional[str], typer.Option(help="Hook the dictionary splices into (default: its own).")] = None,
    model: SaeModelOpt = None,
    dtype: ModelDtypeOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The strongest features of every token of a prompt, the dictionary spliced in with its error term."""
    from scope.analysis.features import open_dictionary, prompt_features
    from scope.analysis.output import write_html
    from scope.dashboards.links import site_links

    d, lm = open_dictionary(sae, model, dtype=dtype, device=device)
    links = site_links(site, d) if site else None
    found = prompt_features(lm, d, text, k=k, hook=hook, links=links)
    out = {"sae": sae, "site": site, **found.to_dict(), "html": str(write_html(found.figure(), html)) if html else None}
    emit(out, as_json, _text(found, out))


def _text(found, out: dict) -> str:
    lines = [f"features of the SAE at {found.hook} on {found.text!r} (strongest first, BOS left out)"]
    for t in found.tokens:
        cells = "  ".join(f"{f:>6} {v:<7.3g}" for f, v in zip(t.features, t.values)) or "(none fire)"
        lines.append(f"  {t.position:>3} {t.token!r:<16} {cells}")
    top = found.top(5)
    if top:
        lines.append("strongest over the prompt: " + ", ".join(f"{f} ({v:.3g})" for f, v in top))
    pages = [(f, found.link(f)) for f, _ in top if found.link(f)]
    lines += [f"  page of {f}: {url}" for f, url in pages]
    if out["html"]:
        lines.append(f"heatmap written to {out['html']}")
    return "\n".join(lines)
