"""Steering with a dictionary feature: its decoder direction as a rank-1 steering vector, in the others' units.

Feature i of a dictionary at a residual-stream hook adds a·dᵢ to the stream when it is active at a,
dᵢ = decode(eᵢ) − decode(0) being its decoder row in the hook's raw units. As a steering vector it
is w = r · dᵢ/‖dᵢ‖, with r the hook's centred RMS norm sqrt(E‖h − μ‖²), the unit DiffMean and RePS
vectors are measured in: α = 1 adds a vector as long as a typical token's deviation from the mean,
whatever the dictionary's own scale, so one α grid serves every method. The null-out threshold
b = −μ·w removes only what lies above the mean along w, as for DiffMean. r and μ come from a store's
rows at the hook, or from a corpus run through the model (BOS left out, as stores leave it out).

Source: AxBench (Wu et al. 2025, arXiv 2501.17148), which steers with SAE features' decoder rows
and scores them beside DiffMean and ReFT-r1 on the same concepts; RePS (arXiv 2505.20809) compares
against the same SAE baseline. See docs/methods/feature_analysis.md.
"""

from __future__ import annotations

import torch

from scope.analysis.splice import check_features, feature_directions
from scope.data import open_source, pad_token_id, take_windows
from scope.dictionaries.base import Dictionary
from scope.errors import ScopeError
from scope.hooks import block_of, capture, check_hooks
from scope.models import LoadedModel
from scope.steering.vector import LayerScale, SteeringVector
from scope.store.reader import ActivationStore
from scope.store.windows import padded_batches

_STREAM = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


def store_scale(store: ActivationStore, hook: str, max_rows: int | None = None, batch_size: int = 4096) -> LayerScale:
    """μ and r of ``hook`` over a store's rows (the first ``max_rows``, default all)."""
    layer = LayerScale(store.width(store.check_hook(hook)))
    for b in store.rows([hook], batch_size=batch_size, shuffle=False, dtype="float32"):
        x = b.acts[hook]
        layer.add(x if max_rows is None else x[: max_rows - layer.rows])
        if max_rows is not None and layer.rows >= max_rows:
            break
    if layer.rows < 2:
        raise ScopeError(f"store {store.url!r} holds {layer.rows} row(s) of {hook}; the layer scale needs more")
    return layer


@torch.no_grad()
def text_scale(model: LoadedModel, hook: str, corpus: str = "wiki", tokens: int = 4096, context: int = 64,
               batch_size: int = 8) -> LayerScale:
    """μ and r of ``hook`` over ``tokens`` tokens of a corpus run through the model (BOS and padding left out)."""
    windows = take_windows(model.tokenizer, open_source(corpus).documents(0), context, tokens)
    layer = LayerScale(model.facts.d_model)
    for toks, mask in padded_batches(windows, batch_size, pad_token_id(model.tokenizer)):
        h = capture(model, toks, [hook], attention_mask=mask)[hook]
        keep = mask.bool().clone()
        keep[:, 0] = False
        layer.add(h[keep.to(h.device)].float())
    if layer.rows < 2:
        raise ScopeError(f"corpus {corpus!r} gave {layer.rows} token(s) after BOS; the layer scale needs more")
    return layer


def feature_direction(model: LoadedModel, sae: Dictionary, feature: int, hook: str | None = None
                      ) -> tuple[str, torch.Tensor]:
    """(hook, the feature's decoder row in raw units), after checking the hook, the widths and the feature id."""
    hook = hook or sae.cfg.hook
    if hook is None:
        raise ScopeError("the dictionary does not name its hook; pass hook= (e.g. blocks.6.hook_resid_post)")
    check_hooks(model, [hook])
    if not hook.endswith(_STREAM) or block_of(hook) is None:
        raise ScopeError(f"steering adds to the residual stream; the dictionary reads {hook}, not one of "
                         f"blocks.L.{{{', '.join(_STREAM)}}}")
    if sae.cfg.d_in != model.facts.d_model:
        raise ScopeError(f"hook {hook} has width {model.facts.d_model} but the SAE expects {sae.cfg.d_in}")
    (feature,) = check_features(sae, [feature], hook)
    d = feature_directions(sae, [feature])[0].cpu()
    if float(d.norm()) == 0:
        raise ScopeError(f"feature {feature} has a zero decoder row; it has no direction to steer along")
    return hook, d


def feature_vector(model: LoadedModel, sae: Dictionary, feature: int, scale: LayerScale | None = None,
                   hook: str | None = None, concept: str | None = None, source: str = "") -> SteeringVector:
    """The steering vector of one feature: r times its unit decoder row at the dictionary's hook.

    ``scale`` (from :func:`store_scale` or :func:`text_scale`) gives r and μ; by default they are
    measured on 4,096 tokens of the bundled wiki corpus.
    """
    hook, d = feature_direction(model, sae, feature, hook)
    layer = scale or text_scale(model, hook)
    w = d / d.norm() * layer.scale
    info = {"sae": source, "feature": int(feature), "decoder_norm": float(d.norm()), "scale_rows": layer.rows}
    return SteeringVector(w=w, b=-float(layer.mean.float() @ w), hook=hook, model=model.spec,
                          concept=concept or f"feature {feature}", method="feature", scale=layer.scale, info=info)
