"""Export of a published site in the batch JSON that Neuronpedia's upload pipeline reads.

Neuronpedia imports SAE dashboards as ``batch-N.json`` files, the output of SAEDashboard's
``NeuronpediaRunner`` (each is converted into Neuronpedia's feature and activation tables by the
``convert-saedashboard-to-neuronpedia-export.py`` script in Neuronpedia's utilities). One batch::

    {"model_id": "gemma-3-270m", "layer": 6, "sae_set": "...", "sae_id_suffix": null,
     "features": [FEATURE, ...]}

and one FEATURE (fields scope has no data for are present and empty, as SAEDashboard leaves them
when a table is switched off)::

    feature_index                     the feature's index in the dictionary
    frac_nonzero                      firing density: share of rows with activation > 0
    freq_hist_data_bar_values/_heights  activation histogram: bin centres and row counts
    logits_hist_data_bar_values/_heights  the decoder direction's logit effect on every token: bin centres, counts
    pos_str / pos_values              tokens the decoder direction promotes most, and their logits
    neg_str / neg_values              ... suppresses most
    correlated_features_indices / _pearson  most correlated other features (Pearson r over the rows)
    activations                       examples: {tokens, values, bin_min, bin_max, bin_contains}
    n_prompts_total, n_tokens_in_prompt, dataset   what the statistics were computed over

Top activations carry ``bin_min = -1``, ``bin_max`` = the feature's maximum, ``bin_contains = -1``
(SAEDashboard's marker for the top group); quantile-interval samples carry their interval's edges
and the share of firing rows it holds. ``tokens`` are the example's context (the rows around the
firing row within its captured window), ``values`` the feature's activation at each.
"""

from __future__ import annotations

import json
from typing import Any

from scope.dashboards.site import SITE_META, feature_data, read_index, read_site_json, safe_name
from scope.errors import ScopeError
from scope.hooks import block_of
from scope.store.fs import StoreFS

BATCH_FEATURES = 128
_EMPTY_TABLES = ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                 "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                 "correlated_features_l1", "decoder_weights_dist")


def neuronpedia_feature(rec: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """One feature's record in Neuronpedia's batch shape."""
    edges, heights = rec["histogram"]["edges"], rec["histogram"]["counts"]
    logit_edges = rec["logit_histogram"]["edges"]
    acts = [_activation(e, -1, rec["max"], -1) for e in rec["top"]]
    acts += [_activation(e, iv["lo"], iv["hi"], iv["contains"]) for iv in rec["intervals"] for e in iv["examples"]]
    return {
        "feature_index": rec["feature"], **{k: [] for k in _EMPTY_TABLES},
        "correlated_features_indices": [j for j, _ in rec["correlated"]],
        "correlated_features_pearson": [r for _, r in rec["correlated"]],
        "neg_str": [t for t, _ in rec["logits"]["bottom"]], "neg_values": [v for _, v in rec["logits"]["bottom"]],
        "pos_str": [t for t, _ in rec["logits"]["top"]], "pos_values": [v for _, v in rec["logits"]["top"]],
        "frac_nonzero": rec["density"],
        "freq_hist_data_bar_values": [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])],
        "freq_hist_data_bar_heights": heights,
        "logits_hist_data_bar_values": [(a + b) / 2 for a, b in zip(logit_edges[:-1], logit_edges[1:])],
        "logits_hist_data_bar_heights": rec["logit_histogram"]["counts"],
        "n_prompts_total": meta["windows"], "n_tokens_in_prompt": meta["context"], "dataset": meta["corpus"],
        "activations": acts,
    }


def _activation(e: dict[str, Any], lo: float, hi: float, contains: float) -> dict[str, Any]:
    return {"bin_min": lo, "bin_max": hi, "bin_contains": contains, "tokens": e["tokens"], "values": e["values"]}


def layer_of(hook: str) -> int:
    """The block number in a hook name such as blocks.6.hook_resid_post."""
    block = block_of(hook)
    if block is None:
        raise ScopeError(f"hook {hook!r} names no block (blocks.L....); Neuronpedia needs a layer number")
    return block


def write_neuronpedia(site: str, out: str, batch_features: int = BATCH_FEATURES) -> list[str]:
    """Write every feature of a published site as Neuronpedia ``batch-N.json`` files into ``out``."""
    fs = StoreFS(site)
    if not fs.exists(SITE_META):
        raise ScopeError(f"{site!r} is not a published dashboard site (no {SITE_META}); run `scope dashboard "
                         "publish` first")
    if batch_features <= 0:
        raise ScopeError(f"batch_features must be positive, got {batch_features}")
    meta = read_site_json(fs, SITE_META)
    features = sorted(read_index(site))
    dest = StoreFS(out)
    dest.makedirs()
    written = []
    head = {"model_id": meta["model"].rsplit("/", 1)[-1], "layer": layer_of(meta["hook"]),
            "sae_set": safe_name(meta["name"]), "sae_id_suffix": None}
    for n, a in enumerate(range(0, len(features), batch_features)):
        batch = {**head, "features": [neuronpedia_feature(read_site_json(fs, feature_data(f)), meta)
                                      for f in features[a : a + batch_features]]}
        dest.write_atomic(f"batch-{n}.json", json.dumps(batch).encode())
        written.append(dest.path(f"batch-{n}.json"))
    return written
