"""One steering run folder: the concept data, its vector (trained or computed) and its offline scorer.

Layout of a run folder (``scope steer train --out DIR``)::

    steer_config.json      the SteerConfig; a different one is refused
    concept.jsonl          the training triples (and suppression prompts) used
    vector.safetensors     w and b            vector.json   where and how it was made
    metrics.jsonl          training loss per step (RePS, LM)
    checkpoint/            resume state while training
    scorer/                the concept probe and calibration (made by `scope steer eval`)
    eval.json, *.html      evaluation results and figures
"""

from __future__ import annotations

from pathlib import Path

from scope.dictionaries.base import Dictionary
from scope.errors import ScopeError
from scope.models import LoadedModel
from scope.steering.concepts import ConceptData, load_concept, parse_concept, pool_of
from scope.steering.diffmean import diffmean
from scope.steering.interventions import resid_hook
from scope.steering.reps import SteerConfig, claim_run, train_vector
from scope.steering.scoring import Scorer, fit_scorer, load_scorer
from scope.steering.vector import SteeringVector, load_vector


def concept_data(model: LoadedModel, cfg: SteerConfig, n_classifier: int = 64) -> ConceptData:
    """The concept data a config names (a .jsonl file or CORPUS:LABEL); ``n_classifier`` texts for the probe."""
    if not cfg.concept:
        raise ScopeError(f"this {cfg.method} vector was made without a concept, so there is nothing to score it on; "
                         "make it again with --concept CORPUS:LABEL (e.g. bbc:sport) or a .jsonl file")
    return load_concept(cfg.concept, model.tokenizer, n_train=cfg.n_train, n_eval=cfg.n_eval,
                        response_tokens=cfg.response_tokens, n_classifier=n_classifier, seed=cfg.seed)


def store_for_diffmean(model: LoadedModel, cfg: SteerConfig, out: Path, tokens: int = 40_000,
                       progress: bool = True):
    """The config's store, or one captured into ``out/store`` from the concept's corpus at the layer."""
    from scope.store import ActivationStore

    if cfg.store is not None:
        return ActivationStore(cfg.store)
    if cfg.concept.endswith(".jsonl"):
        raise ScopeError("DiffMean from a .jsonl concept needs --store: a labelled activation store holding the layer")
    from scope.data import open_source
    from scope.store.capture import capture_store

    corpus, _ = parse_concept(cfg.concept)
    folder = out / "store"
    capture_store(model, open_source(corpus), [resid_hook(cfg.layer)], str(folder), tokens, context=64,
                  progress=progress)
    return ActivationStore(str(folder))


def make_vector(model: LoadedModel, data: ConceptData, cfg: SteerConfig, out: str | Path | None,
                progress: bool = True) -> SteeringVector:
    """Train (RePS, LM) or compute (DiffMean) the vector of a config; a finished run folder is reused."""
    if out is not None:
        claim_run(out, cfg)
        if (Path(out) / "vector.json").is_file():  # written once, when the vector is complete
            return load_vector(out)
        data.to_jsonl(Path(out) / "concept.jsonl")
    if cfg.method != "diffmean":
        return train_vector(model, data, cfg, out, progress=progress)
    if out is None and cfg.store is None:
        raise ScopeError("DiffMean needs an activation store: pass store= (or a run folder to capture one into)")
    store = store_for_diffmean(model, cfg, Path(out) if out is not None else Path("."), progress=progress)
    hook = resid_hook(cfg.layer)
    corpus = cfg.concept.partition(":")[0]
    if store.manifest.config.source.spec == corpus:  # keep the evaluation documents out of the direction
        store = store.select(d for d in store.documents if pool_of(d, cfg.seed) == 0)
    w, info = diffmean(store, hook, cfg.concept, max_rows=cfg.max_rows)
    vec = SteeringVector(w=w, b=info.pop("b"), hook=hook, model=model.spec, concept=data.concept, method="diffmean",
                         scale=info.pop("scale"), info=info)
    if out is not None:
        vec.save(out)
    return vec


def feature_run(model: LoadedModel, cfg: SteerConfig, out: str | Path, tokens: int = 4096,
                sae: Dictionary | None = None) -> SteeringVector:
    """The feature vector a config names (``cfg.sae``, ``cfg.feature``), written into run folder ``out``.

    r and μ come from ``cfg.store`` when given, else from ``tokens`` tokens of the concept's corpus
    (wiki without a corpus concept). A finished run folder is reused; ``sae`` is ``cfg.sae`` loaded.
    """
    from scope.dictionaries.interop import load_any
    from scope.steering.feature import feature_direction, feature_vector, store_scale, text_scale
    from scope.store import ActivationStore

    if cfg.method != "feature" or cfg.sae is None or cfg.feature is None:
        raise ScopeError("a feature run needs method 'feature', a dictionary (sae) and a feature id")
    sae = sae if sae is not None else load_any(cfg.sae, device=model.device)
    # Everything checked before the run folder is claimed, so a typo leaves no folder behind.
    hook, _ = feature_direction(model, sae, cfg.feature, sae.cfg.hook or resid_hook(cfg.layer))
    store = ActivationStore(cfg.store) if cfg.store is not None else None
    claim_run(out, cfg)
    if (Path(out) / "vector.json").is_file():
        return load_vector(out)
    if store is not None:
        scale, source = store_scale(store, hook, cfg.max_rows), cfg.store
    else:
        corpus = parse_concept(cfg.concept)[0] if cfg.concept and not cfg.concept.endswith(".jsonl") else "wiki"
        scale, source = text_scale(model, hook, corpus, tokens), f"{tokens} tokens of {corpus}"
    vec = feature_vector(model, sae, cfg.feature, scale, hook=hook, concept=cfg.concept or None, source=cfg.sae)
    vec.info["scale_from"] = source
    vec.save(out)
    return vec


def scorer_for(model: LoadedModel, data: ConceptData, folder: str | Path | None, probe_layer: int | None = None,
               seed: int = 0) -> Scorer:
    """The offline scorer saved in ``folder``, or a new one fitted (and saved there)."""
    if folder is not None:
        found = load_scorer(folder, model)
        if found is not None:
            return found
    scorer = fit_scorer(model, data, probe_layer=probe_layer, seed=seed)
    if folder is not None:
        scorer.save(folder)
    return scorer
