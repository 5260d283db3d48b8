"""``scope dashboard``: publish feature dashboards as a static site, export them for Neuronpedia."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from scope.cli.common import DeviceOpt, JsonOpt, emit, friendly

dashboard_app = typer.Typer(help="Feature dashboards: a static site from a dictionary and a store; Neuronpedia export.",
                            no_args_is_help=True)


@dashboard_app.command("publish")
@friendly
def dashboard_publish(
    sae: Annotated[str, typer.Option(help="Dictionary folder (scope, SAELens or Gemma Scope layout).")],
    store: Annotated[str, typer.Option(help="Activation store folder or fsspec URL holding the dictionary's hook.")],
    out: Annotated[str, typer.Option(help="Site folder (or fsspec URL); an existing site gets the new pages.")],
    features: Annotated[Optional[str], typer.Option(help="Features to publish: START:STOP, indices or a comma list "
                                                         "(e.g. 0:500 or 3,17,42); default: all.")] = None,
    hook: Annotated[Optional[str], typer.Option(help="Store hook the dictionary reads (default: its own).")] = None,
    force_hook: Annotated[bool, typer.Option("--force-hook",
                                             help="Accept a --hook other than the dictionary's own.")] = False,
    max_rows: Annotated[Optional[int], typer.Option(help="Read at most this many rows of the store.")] = None,
    top_k: Annotated[int, typer.Option(help="Top activating examples per feature.")] = 20,
    intervals: Annotated[int, typer.Option(help="Quantile intervals of the firing activations.")] = 10,
    per_interval: Annotated[int, typer.Option(help="Examples shown per interval.")] = 5,
    left: Annotated[int, typer.Option(help="Context tokens before an example.")] = 12,
    right: Annotated[int, typer.Option(help="Context tokens after an example.")] = 4,
    correlated: Annotated[int, typer.Option(help="Most correlated other features to list (0 skips them).")] = 5,
    logits: Annotated[int, typer.Option(help="Tokens per logit table (0 skips the logit effects).")] = 10,
    name: Annotated[Optional[str], typer.Option(help="Title of the site (default: the dictionary folder's name).")] = None,
    neuronpedia: Annotated[Optional[str], typer.Option(help="Also write the Neuronpedia batch JSON into this folder.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a site computed from another dictionary, store or settings.")] = False,
    batch_size: Annotated[Optional[int], typer.Option(help="Rows per step (default: by dictionary width).")] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compute feature dashboards from a store in one pass and publish them as a static site."""
    from pydantic import ValidationError

    from scope.dashboards import StatsConfig, publish
    from scope.errors import ScopeError

    try:
        cfg = StatsConfig(top_k=top_k, intervals=intervals, per_interval=per_interval, left=left, right=right,
                          correlated=correlated, max_rows=max_rows, batch_size=batch_size)
    except ValidationError as err:
        first = err.errors()[0]
        raise ScopeError(f"--{str(first['loc'][0]).replace('_', '-')} {first['input']!r} is not accepted: "
                         f"{first['msg'].lower()}") from None
    done = publish(sae, store, out, features, hook=hook, cfg=cfg, name=name, logits=logits, overwrite=overwrite,
                   device=device, neuronpedia=neuronpedia, progress=not as_json, force_hook=force_hook)
    result = done.to_dict()
    human = (f"published {result['features']} features ({result['first']}…{result['last']}) from {result['rows']:,} "
             f"rows in {result['seconds']:.1f} s ({result['features_per_s']:.1f} features/s); the site holds "
             f"{result['site_features']} features\nindex: {result['index']}")
    if done.neuronpedia:
        human += f"\nNeuronpedia batches: {', '.join(done.neuronpedia)}"
    emit(result, as_json, human)


@dashboard_app.command("neuronpedia")
@friendly
def dashboard_neuronpedia(
    site: Annotated[str, typer.Argument(help="A site written by `scope dashboard publish`.")],
    out: Annotated[str, typer.Option(help="Folder for the batch-N.json files.")],
    batch_features: Annotated[int, typer.Option(help="Features per batch file.")] = 128,
    as_json: JsonOpt = False,
) -> None:
    """Export a published site's features in the batch JSON that Neuronpedia's upload reads."""
    from scope.dashboards import write_neuronpedia

    files = write_neuronpedia(site, out, batch_features)
    emit({"site": site, "files": files}, as_json, f"wrote {len(files)} Neuronpedia batch file(s) to {out}")

