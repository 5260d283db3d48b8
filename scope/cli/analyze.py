"""``scope analyze``: RoPE frequency analyses and class-embedding projections."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from scope.cli.common import DeviceOpt, JsonOpt, ModelDtypeOpt, ModelOpt, emit, floats, friendly, ints
from scope.errors import ScopeError

analyze_app = typer.Typer(help="Analyses of the model's internals: RoPE frequencies, class-embedding projections.",
                          no_args_is_help=True)


@analyze_app.command("rope")
@friendly
def analyze_rope(
    out: Annotated[str, typer.Option(help="Folder (or fsspec URL) for rope.json and the HTML figures.")],
    model: ModelOpt = "gemma-3-270m",
    store: Annotated[Optional[str], typer.Option(help="Analyse the text of this store (its q/k/v rows when it holds them).")] = None,
    corpus: Annotated[Optional[str], typer.Option(help="Or analyse this corpus directly: wiki, bbc, tweets, a file or hf:NAME.")] = None,
    tokens: Annotated[int, typer.Option(help="Tokens for frequency usage and head types.")] = 16_384,
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens for the p-RoPE loss (0 skips p-RoPE).")] = 4096,
    context: Annotated[int, typer.Option(help="Context window length with --corpus, BOS included.")] = 256,
    p: Annotated[str, typer.Option("--p", help="Fractions of frequencies kept for p-RoPE.")] = "1,0.75,0.5,0.25,0",
    layers: Annotated[Optional[str], typer.Option(help="Comma-separated layers (default: all).")] = None,
    batch_size: Annotated[int, typer.Option(help="Context windows per forward pass.")] = 8,
    dtype: ModelDtypeOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per-frequency q/k usage, head types and p-RoPE costs (Barbero et al. 2025); JSON and HTML into --out."""
    from scope.analysis.rope_report import rope_report, write_report
    from scope.models import load_model
    from scope.store import ActivationStore
    from scope.store.windows import split_windows

    if batch_size <= 0:
        raise ScopeError(f"--batch-size must be positive, got {batch_size}")
    ps = floats(p, "--p")
    chosen = ints(layers, "--layers") if layers else None
    if (store is None) == (corpus is None):
        raise ScopeError("pass exactly one of --store DIR or --corpus NAME (wiki, bbc, tweets, a file or hf:NAME)")
    view = ActivationStore(store) if store else None
    lm = load_model(model, dtype=dtype, device=device)
    windows, heldout = split_windows(lm.tokenizer, view, corpus, tokens, eval_tokens, context)
    report = rope_report(lm, windows, heldout, store=view, ps=ps, layers=chosen, batch_size=batch_size,
                         progress=not as_json)
    files = write_report(report, out)
    result = {"out": out, "files": files, **report.to_dict()}
    emit(result, as_json, _rope_text(report, files))


def _rope_text(report, files: dict) -> str:
    s = report.summary()
    lines = [f"RoPE analysis of {report.usage.model} over {report.usage.tokens:,} tokens "
             "(share of the mean chunk norm per quarter of the frequencies, highest first)"]
    for kind in ("local", "global"):
        if kind in s:
            for t in ("q", "k", "v"):
                lines.append(f"  {kind:<6} {t}: " + "  ".join(f"{x:6.1%}" for x in s[kind][t]))
    heads = report.heads.classify()
    lines.append(f"head types ({len(heads)} heads pass a threshold {report.heads.thresholds}):")
    for kind in ("diagonal", "previous", "first"):
        found = [f"L{h['layer']}H{h['head']}" for h in heads if h["type"] == kind]
        lines.append(f"  {kind:<9} {len(found):>3}  {' '.join(found[:12])}{' …' if len(found) > 12 else ''}")
    if report.p_rope:
        lines.append(f"p-RoPE on {report.eval_tokens:,} held-out tokens: unmodified CE {report.base_ce:.4f}")
        lines.append(f"  {'layers':<7} {'dropped':<8} " + " ".join(f"p={r.p:<5g}" for r in report.p_rope if r.where == report.p_rope[0].where and r.drop != "highest"))
        for where in dict.fromkeys(r.where for r in report.p_rope):
            for drop in ("lowest", "highest"):
                row = [r for r in report.p_rope if r.where == where and r.drop in (drop, "-")]
                lines.append(f"  {where:<7} {drop:<8} " + " ".join(f"{r.delta:+7.3f}" for r in row))
    lines.append(f"wrote {len(files)} files to {files['json'].rsplit('/', 1)[0]}")
    return "\n".join(lines)


@analyze_app.command("class-embedding")
@friendly
def analyze_class_embedding(
    out: Annotated[str, typer.Option(help="Folder (or fsspec URL) for class_embedding.json and the HTML figures.")],
    model: ModelOpt = "gemma-3-270m",
    store: Annotated[Optional[str], typer.Option(help="Project the rows of this store (its residual hooks).")] = None,
    corpus: Annotated[Optional[str], typer.Option(help="Or run the model over this corpus: wiki, bbc, tweets, a file or hf:NAME.")] = None,
    labels: Annotated[Optional[str], typer.Option(help="Classes are this corpus's document labels (e.g. bbc), read as "
                                                       "label words after a prompt; default: the next token.")] = None,
    tokens: Annotated[int, typer.Option(help="Tokens to score.")] = 2048,
    context: Annotated[int, typer.Option(help="Context window length, BOS included.")] = 128,
    layers: Annotated[Optional[str], typer.Option(help="Comma-separated layers (default: all).")] = None,
    components: Annotated[bool, typer.Option(help="Also project each block's attention and MLP outputs.")] = False,
    random_baseline: Annotated[bool, typer.Option(help="Also score a randomly initialised copy of the model.")] = True,
    memories: Annotated[bool, typer.Option(help="Also score the MLP key-value memories per layer.")] = False,
    batch_size: Annotated[int, typer.Option(help="Context windows per forward pass.")] = 4,
    dtype: ModelDtypeOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Logit lens / class-embedding projection with class identifiability per layer (Vilas et al. 2023)."""
    from scope.analysis.class_embedding import score_sites
    from scope.analysis.class_embedding_report import lens_report, write_report
    from scope.analysis.logit_lens import gemma_class_space, label_word_ids, prompt_windows, store_batches
    from scope.data import open_source
    from scope.models import load_model
    from scope.store import ActivationStore
    from scope.store.windows import split_windows, store_windows

    if batch_size <= 0 or tokens < 2:
        raise ScopeError(f"need --batch-size > 0 and --tokens >= 2, got {batch_size} and {tokens}")
    chosen = ints(layers, "--layers") if layers else None
    if store is None and corpus is None and labels is not None:
        corpus = labels
    if (store is None) == (corpus is None):
        raise ScopeError("pass exactly one of --store DIR or --corpus NAME (wiki, bbc, tweets, a file or hf:NAME)")
    if labels is not None and corpus is not None and corpus != labels:
        raise ScopeError(f"--labels {labels} names the classes of corpus {labels!r}, but --corpus is {corpus!r}; "
                         "drop --corpus or make them the same")
    lm = load_model(model, dtype=dtype, device=device)
    view = ActivationStore(store) if store else None
    # Label mode: documents without a label cannot be scored and are left out.
    docs = [d for d in open_source(labels).documents(0) if d.label] if labels and view is None else []
    names, ids, label_idx = None, None, None
    if labels is not None:
        names = sorted({lab for lab, _ in view.documents.values() if lab} if view else {d.label for d in docs})
        if not names:
            raise ScopeError(f"{labels!r} has no document labels to use as classes")
        ids, _ = label_word_ids(lm.tokenizer, names)
    trained = None
    if view is not None:
        resid = sorted((h for h in view.hooks if view.width(h) == lm.facts.d_model and "resid" in h),
                       key=lambda h: (int(h.split(".")[1]) if h.startswith("blocks.") else -1, h))
        if not resid:
            raise ScopeError(f"store {store!r} holds no residual-stream hook of width {lm.facts.d_model} "
                             f"(it has {sorted(view.hooks)}); capture e.g. blocks.6.hook_resid_post")
        batches, n_inputs = store_batches(view, resid, {n: i for i, n in enumerate(names)} if names else None,
                                          max_rows=tokens)
        trained = score_sites(gemma_class_space(lm, ids, names), batches, resid, resid, n_inputs,
                              "labels" if names else "next-token")
        chosen = sorted({int(h.split(".")[1]) for h in resid if h.startswith("blocks.")})
        label_of = {d: lab for d, (lab, _) in view.documents.items()}
        windows = [w for w in store_windows(view, lm.tokenizer, tokens) if not names or label_of[w.doc_id] in names]
        label_idx = [names.index(label_of[w.doc_id]) for w in windows] if names else None
    elif names:
        docs = docs[: max(1, tokens // context)]
        windows, label_idx = prompt_windows(lm.tokenizer, docs, context), [names.index(d.label) for d in docs]
    else:
        windows, _ = split_windows(lm.tokenizer, corpus=corpus, tokens=tokens, context=context)
    report = lens_report(lm, windows, label_idx, ids, names, chosen, components, trained, random_baseline, memories,
                         batch_size, not as_json)
    files = write_report(report, out)
    emit({"out": out, "files": files, **report.to_dict()}, as_json, _class_text(report, files))


def _class_text(report, files: dict) -> str:
    t = report.trained
    lines = [f"class identifiability ({t.mode}, |C| = {t.n_classes:,}, {t.tokens:,} tokens in {t.inputs:,} inputs)",
             f"  {'site':<28} {'mean s':>7} {'top-1 %':>8} {'inputs %':>9} {'rises %':>8}"
             + (f" {'random top-1 %':>15}" if report.random else "")]
    rand = {s.site: s for s in report.random.sites} if report.random else {}
    for s in t.sites:
        r = rand.get(s.site)
        lines.append(f"  {s.site:<28} {s.mean_score:7.3f} {s.identifiable_pct:8.1f} {s.inputs_pct:9.1f} "
                     f"{'' if s.change_rate_pct is None else f'{s.change_rate_pct:.1f}':>8}"
                     + (f" {r.identifiable_pct:15.2f}" if r else ""))
    if report.memories:
        lines.append("MLP memories: agreement of each token's 10 most activated memories with its class: "
                     + ", ".join(f"L{L} {a:.1%}" for L, a in zip(report.memories.layers, report.memories.agreement)))
    lines.append(f"wrote {len(files)} files to {files['json'].rsplit('/', 1)[0]}")
    return "\n".join(lines)
