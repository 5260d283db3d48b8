"""``scope steer``: train (RePS, LM objective) or compute (DiffMean) steering vectors, score them, generate."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from scope.cli.common import DeviceOpt, JsonOpt, ModelDtypeOpt, ModelOpt, SaeModelOpt, emit, floats, friendly
from scope.errors import ScopeError, validation_summary

steer_app = typer.Typer(help="Steering vectors: RePS, DiffMean and the LM objective; steering, suppression, scores.",
                        no_args_is_help=True)


def _open_run(folder: str, device: str | None):
    """(config, vector, model) of a run folder made by `scope steer train`."""
    from scope.models import load_model
    from scope.steering.reps import read_config
    from scope.steering.vector import load_vector

    cfg = read_config(folder)
    vec = load_vector(folder)
    return cfg, vec, load_model(cfg.model, dtype=cfg.dtype, device=device)


def _config(**fields):
    """A SteerConfig from the flags; a bad value is one line naming the field."""
    from pydantic import ValidationError

    from scope.steering.reps import SteerConfig

    try:
        return SteerConfig(**fields)
    except ValidationError as err:
        raise ScopeError(f"bad steering config: {validation_summary(err)}") from None


@steer_app.command("train")
@friendly
def steer_train(
    concept: Annotated[str, typer.Option(help="CORPUS:LABEL of a labelled corpus (bbc:sport, wiki:Mathematics…) or a .jsonl "
                                              "of {concept, instruction, response, steered_response}.")],
    out: Annotated[str, typer.Option(help="Run folder (created; resumed if interrupted; a different config is refused).")],
    model: ModelOpt = "gemma-3-270m",
    layer: Annotated[int, typer.Option(help="Steer the residual stream after this block.")] = 6,
    method: Annotated[str, typer.Option(help="reps (RePS), lm (language-modelling objective) or diffmean.")] = "reps",
    n_train: Annotated[int, typer.Option(help="Training triples (x, y, y^c).")] = 32,
    n_eval: Annotated[int, typer.Option(help="Evaluation prompts (half choose α, half report).")] = 16,
    response_tokens: Annotated[int, typer.Option(help="Tokens of each training response.")] = 32,
    epochs: Annotated[int, typer.Option(help="Passes over the training triples.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Triples per step.")] = 4,
    lr: Annotated[float, typer.Option(help="Adam learning rate (w is trained in units of the layer scale).")] = 0.01,
    factors: Annotated[str, typer.Option(help="Steering factors α⁺ sampled per example in training.")] = "0.25,0.5,0.75,1",
    store: Annotated[Optional[str], typer.Option(help="DiffMean: labelled activation store holding the layer "
                                                      "(default: capture one into OUT/store).")] = None,
    max_rows: Annotated[Optional[int], typer.Option(help="DiffMean: rows read from the store (default all).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of data split, initialisation and factor sampling.")] = 0,
    dtype: ModelDtypeOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a rank-1 steering vector (RePS or LM objective) or compute DiffMean from a store."""
    from scope.models import load_model
    from scope.steering.pipeline import concept_data, make_vector

    if method not in ("reps", "lm", "diffmean"):
        raise ScopeError(f"--method must be reps, lm or diffmean, got {method!r}")
    cfg = _config(model=model, concept=concept, layer=layer, method=method, n_train=n_train, n_eval=n_eval,
                  response_tokens=response_tokens, epochs=epochs, batch_size=batch_size, lr=lr,
                  factors=floats(factors, "--factors"), seed=seed, dtype=dtype, store=store, max_rows=max_rows)
    lm = load_model(model, dtype=dtype, device=device)
    if not 0 <= layer < lm.facts.n_layers:
        raise ScopeError(f"--layer {layer} is outside 0..{lm.facts.n_layers - 1} of {model}")
    t0 = time.time()
    data = concept_data(lm, cfg)
    vec = make_vector(lm, data, cfg, out, progress=not as_json)
    result = {"out": out, "seconds": round(time.time() - t0, 1), "data": data.summary(), "vector": vec.meta()}
    emit(result, as_json, f"{method} vector for {vec.concept} at {vec.hook}: ‖w‖ = {vec.meta()['norm']:.1f} "
                           f"({vec.meta()['norm_over_scale']:.2f} × layer scale {vec.scale:.1f}), b = {vec.b:.1f} -> {out}")


@steer_app.command("from-feature")
@friendly
def steer_from_feature(
    sae: Annotated[str, typer.Option(help="Dictionary folder (scope, SAELens or Gemma Scope layout) at a "
                                          "residual-stream hook.")],
    feature: Annotated[int, typer.Option(help="The feature whose decoder row is the steering direction.")],
    out: Annotated[str, typer.Option(help="Run folder for the vector (what `scope steer generate` and `eval` read).")],
    concept: Annotated[Optional[str], typer.Option(help="CORPUS:LABEL or .jsonl the feature stands for; needed to score "
                                                        "it with `scope steer eval` against RePS and DiffMean.")] = None,
    store: Annotated[Optional[str], typer.Option(help="Store holding the hook, for the layer scale r and mean μ "
                                                      "(default: 4,096 tokens of the concept's corpus, else wiki).")] = None,
    max_rows: Annotated[Optional[int], typer.Option(help="Rows of --store read for r and μ (default all).")] = None,
    model: SaeModelOpt = None,
    n_eval: Annotated[int, typer.Option(help="Evaluation prompts for `scope steer eval` (use the RePS run's value "
                                             "to score on the same prompts).")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the concept's data split (as for `scope steer train`).")] = 0,
    dtype: ModelDtypeOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A steering vector from a dictionary feature: its unit decoder row times the layer scale r."""
    from scope.analysis.features import open_dictionary
    from scope.hooks import block_of
    from scope.steering.pipeline import feature_run

    d, lm = open_dictionary(sae, model, dtype=dtype, device=device)
    layer = block_of(d.cfg.hook or "")
    cfg = _config(model=lm.spec, concept=concept or "", layer=layer if layer is not None else 0, method="feature",
                  n_eval=n_eval, seed=seed, dtype=dtype, store=store, max_rows=max_rows, sae=sae, feature=feature)
    vec = feature_run(lm, cfg, out, sae=d)
    meta = vec.meta()
    emit({"out": out, "vector": meta}, as_json, f"feature {feature} of {sae} at {vec.hook}: ‖w‖ = {meta['norm']:.1f} "
         f"(the layer scale r; decoder row norm {vec.info['decoder_norm']:.3g}), b = {vec.b:.1f} -> {out}")


@steer_app.command("eval")
@friendly
def steer_eval(
    folder: Annotated[str, typer.Argument(help="A run folder made by `scope steer train`.")],
    alphas: Annotated[str, typer.Option(help="Steering factors to try (0 is always added).")] = "0,0.25,0.5,0.75,1",
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt.")] = 32,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 0.7,
    probe_layer: Annotated[Optional[int], typer.Option(help="Layer of the concept probe (default 2/3 of the depth).")] = None,
    classifier_texts: Annotated[int, typer.Option(help="Labelled texts (half in, half out of the concept) the probe "
                                                       "is fitted on, when DIR has no scorer yet.")] = 64,
    suppression: Annotated[bool, typer.Option(help="Also score suppression (null-out on in-concept prompts).")] = True,
    batch_size: Annotated[int, typer.Option(help="Texts generated per batch (decoding on a CPU costs about the same "
                                                  "per step for 8 or 128 texts).")] = 128,
    judge_url: Annotated[Optional[str], typer.Option(help="Also rate with an LLM judge at this OpenAI-compatible URL "
                                                          "(or SCOPE_JUDGE_URL); off by default.")] = None,
    judge_model: Annotated[Optional[str], typer.Option(help="The judge's model name.")] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Steering and suppression scores (concept, relevance, fluency, harmonic mean) and score-vs-α figure."""
    from scope.analysis.output import write_results
    from scope.steering.evaluate import alpha_figure, evaluate_vector
    from scope.steering.generate import check_sampling
    from scope.steering.judge import Judge
    from scope.steering.pipeline import concept_data, scorer_for

    factors = floats(alphas, "--alphas")  # before the model loads and the probe is fitted
    check_sampling(new_tokens, temperature, batch_size)
    cfg, vec, lm = _open_run(folder, device)
    data = concept_data(lm, cfg, n_classifier=classifier_texts)
    scorer = scorer_for(lm, data, Path(folder) / "scorer", probe_layer=probe_layer, seed=cfg.seed)
    result = evaluate_vector(lm, vec, data, scorer, alphas=factors, max_new_tokens=new_tokens,
                             temperature=temperature, seed=cfg.seed, batch_size=batch_size, suppression=suppression,
                             progress=not as_json, judge=Judge.from_env(judge_url, judge_model))
    out = {"folder": folder, **result.to_dict(), "probe": scorer.fit.__dict__, "calibration": scorer.cal.__dict__}
    files = write_results(folder, "eval.json", out, {"score_vs_alpha": alpha_figure([result])})
    emit({**out, "files": files}, as_json, _eval_text(result, scorer, files))


def _eval_text(r, scorer, files: dict) -> str:
    def row(name: str, s) -> str:
        return (f"  {name:<26} concept {s.concept:.3f}  relevance {s.relevance:.3f}  fluency {s.fluency:.3f}  "
                f"harmonic {s.harmonic:.3f}  (n={s.n})")

    lines = [f"{r.method} vector for {r.concept}; probe at layer {scorer.fit.layer} "
             f"(cross-validated accuracy {scorer.fit.cv_accuracy:.1%})",
             "  α      " + "  ".join(f"{a:>6g}" for a in r.alphas),
             "  choose " + "  ".join(f"{s.harmonic:6.3f}" for s in r.select),
             "  report " + "  ".join(f"{s.harmonic:6.3f}" for s in r.report),
             row(f"steered (α* = {r.best_alpha:g})", r.steer), row("unsteered (α = 0)", r.unsteered)]
    if r.suppress:
        lines += [row("suppressed (null-out)", r.suppress), row("no intervention", r.unsuppressed)]
    if r.judge:
        lines.append(f"  judge {r.judge['model']}: " + ", ".join(f"{k} HM {v['harmonic']:.3f}" for k, v in r.judge.items()
                                                             if isinstance(v, dict)))
    lines.append(f"wrote {files['json']} and {files['score_vs_alpha']}")
    return "\n".join(lines)


@steer_app.command("generate")
@friendly
def steer_generate(
    folder: Annotated[str, typer.Argument(help="A run folder made by `scope steer train`.")],
    prompt: Annotated[list[str], typer.Option(help="Prompt text (repeat for more).")],
    alpha: Annotated[Optional[list[float]], typer.Option(help="Steering factor (repeat for several; 0 = unsteered).")] = None,
    suppress: Annotated[bool, typer.Option(help="Null out the concept instead of steering towards it.")] = False,
    new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 48,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 0.7,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate from prompts with the vector added at factor α (or with the concept nulled out)."""
    import torch

    from scope.steering.generate import RowSteer, generate

    _, vec, lm = _open_run(folder, device)
    settings = [("suppress", 0.0)] if suppress else [("steer", a) for a in (alpha or [1.0])]
    rows = [(p, kind, a) for kind, a in settings for p in prompt]
    steer = RowSteer(vec.hook, vec.w, vec.b, torch.tensor([a for _, _, a in rows]),
                     torch.tensor([k == "suppress" for _, k, _ in rows]))
    texts = generate(lm, [p for p, _, _ in rows], max_new_tokens=new_tokens, temperature=temperature, seed=seed,
                     rows=steer)
    out = [{"prompt": p, "mode": k, "alpha": a if k == "steer" else None, "text": t} for (p, k, a), t in zip(rows, texts)]
    human = "\n\n".join(f"[{_setting(o)}] {o['prompt']!r}\n{o['text']}" for o in out)
    emit({"folder": folder, "concept": vec.concept, "method": vec.method, "generations": out}, as_json, human)


def _setting(o: dict) -> str:
    return "suppressed (null-out)" if o["alpha"] is None else f"α = {o['alpha']:g}"
