"""SAE quality on the real model: JumpReLU, TopK and their variants of one width, on the same rows, over training.

Trains every dictionary of a sweep config in one pass over its store (capturing the store first if
it is missing), with snapshots along the way when the config sets ``trainer.snapshot_every``. Each
snapshot and the final dictionaries are evaluated on the store's held-out documents — L0, FVU, dead
latents and the language-model loss with the SAE spliced in (16,384 LM tokens by default: 4,096 is
too noisy to rank SAEs 0.05 nats apart) — in one pass that shares the clean and zero-ablated forward
passes, and cached, so a re-run evaluates only what is new. Writes the final table (Markdown, JSON)
and two plotly figures: delta loss against token-steps, and delta loss against L0 at the end.

Run:  python benchmarks/sae_quality.py [--config sae_configs/gemma-3-270m-res-l6-quality-10m-4k.yaml]
          [--out runs/quality-10m] [--lm-tokens 16384] [--curve-lm-tokens N] [--markdown PATH] [--figures DIR] [--no-train] [--json]
          [--only NAME,NAME --no-eval [--fork-from RUN]] [--eval-store STORE]
The run folder resumes after a kill (re-run the same command). ``--no-train`` evaluates the snapshots
that exist so far without training further (a study split across sessions can report where it is).
``--only`` trains just the named dictionaries, in ``OUT/parts/NAME+NAME``, so that a study can run as one
single-threaded process per core (on 2 cores that beats one process with 2 threads: the sparse kernels
scale less well than the matmuls); the evaluation then finds every part's dictionaries:

    OMP_NUM_THREADS=1 python benchmarks/sae_quality.py --only jumprelu-quadratic,topk --no-eval &
    OMP_NUM_THREADS=1 python benchmarks/sae_quality.py --only batchtopk-matryoshka,... --no-eval &
    wait; python benchmarks/sae_quality.py --no-train --figures docs/figures

The table gives each SAE's delta-loss lead over a reference, paired on the same held-out windows (the bar of
the studies is a lead over TopK): ``--paired-against NAME``, by default the config's first per-row TopK.

``--eval-store STORE`` scores on another store's held-out documents instead of the config's: SAEs trained on a
bigger store, scored on the documents a smaller store's study held out, compare with that study's SAEs on the same
text. Its evaluations, table and figures go in ``OUT/on-<store folder name>/``, apart from the run's own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import plotly.graph_objects as go
from sweep import EVALS, evaluate_cached, plus_minus, prepare_outputs, run_study, sweep_parser, train_sweep

from scope.analysis.output import write_results
from scope.errors import ScopeError
from scope.evals.lm_loss import paired_difference
from scope.store import ActivationStore
from scope.training import TrainConfig, load_config
from scope.training.trainer import SNAPSHOTS



def with_leads(results: list[dict], reference: str | None) -> list[dict]:
    """Each result with ``lead``: the ``reference`` dictionary's delta loss minus its own, paired on the same windows,
    with its standard error; none for the reference itself and where ``paired_difference`` cannot pair the two
    (no LM loss, or evaluations over other windows: another ``--lm-tokens``, or cached by an older scope)."""
    ref = next((r for r in results if r["name"].rsplit("@", 1)[0] == reference), None)
    out = []
    for r in results:
        lead = None
        if ref is not None and r is not ref and r.get("lm") and ref.get("lm"):
            try:
                diff, se = paired_difference(r["lm"], ref["lm"])
                lead = {"against": reference, "nats": diff, "se": se}
            except ScopeError:
                pass
        out.append({**r, "lead": lead})
    return out


def table(results: list[dict], store: str, tokens: int, reference: str | None) -> str:
    """The results (from ``with_leads``) as a Markdown table, with each one's lead over ``reference`` if named."""
    lead_head = f" {reference} − this (paired) |" if reference else ""
    lines = [f"Store `{store}` ({tokens:,} training token-steps); held-out documents; LM loss over the held-out text.",
             "", "| SAE | kind | latents | L0 | FVU | dead | CE clean | CE spliced | delta loss | CE recovered | KL |"
             + lead_head,
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if reference else "")]
    for r in results:
        lm, lead = r["lm"] or {}, r.get("lead")
        cell = (f" {lead['nats']:+.3f}{plus_minus(lead['se'])} |" if lead else " — |") if reference else ""
        lines.append(f"| {r['name'].rsplit('@', 1)[0]} | {r['kind']} | {r['d_sae']:,} | {r['l0']:.1f} | {r['fvu']:.3f} | "
                     f"{r['dead_fraction']:.1%} | {lm.get('clean_ce', float('nan')):.3f} | "
                     f"{lm.get('spliced_ce', float('nan')):.3f} | {lm.get('delta_loss', float('nan')):.3f}{plus_minus(lm.get('delta_loss_se'))} | "
                     f"{lm.get('ce_loss_recovered', float('nan')):.1%} | {lm.get('kl', float('nan')):.3f} |" + cell)
    return "\n".join(lines)


def reference_name(requested: str | None, cfg: TrainConfig) -> str | None:
    """The dictionary the table's leads are measured against: ``requested``, else the config's first (per-row) TopK."""
    names = [d.label() for d in cfg.dictionaries]
    if requested is None:
        return next((d.label() for d in cfg.dictionaries if d.kind == "topk" and d.selection == "exact"), None)
    if requested not in names:
        raise ScopeError(f"--paired-against {requested!r} is not a dictionary of this config (it has: {', '.join(names)})")
    return requested


PARTS = "parts"


def dictionaries_by_step(out: Path, names: list[str], total_steps: int) -> dict[int, dict[str, Path]]:
    """Saved dictionaries per training step (snapshots, and the final ones once trained), in ``out`` and its parts."""
    found: dict[int, dict[str, Path]] = {}
    for run in [out, *sorted((out / PARTS).glob("*"))]:
        for folder in sorted((run / SNAPSHOTS).glob("step-*")):
            saved = {n: folder / n for n in names if (folder / n / "cfg.json").exists()}
            found.setdefault(int(folder.name.split("-")[1]), {}).update(saved)
        final = {n: run / n for n in names if (run / n / "cfg.json").exists()}
        if final:
            found.setdefault(total_steps, {}).update(final)
    return found


def evaluate_new(cache: Path, found: dict[int, dict[str, Path]], held_out: ActivationStore, lm_tokens: int,
                 curve_lm_tokens: int, final_step: int) -> dict:
    """Evaluate every (step, dictionary) not in the JSON ``cache``: the final dictionaries with ``lm_tokens``, the
    snapshots along the way with ``curve_lm_tokens``; return the whole cache."""
    def named(steps):
        return {f"{n}@{s}": p for s in steps for n, p in found[s].items()}
    evaluate_cached(cache, named([s for s in found if s != final_step]), held_out, curve_lm_tokens)
    return evaluate_cached(cache, named([s for s in found if s == final_step]), held_out, lm_tokens)


def scoring_store(eval_store: str | None, cfg: TrainConfig, held_out: float, out: Path) -> tuple[ActivationStore, str, Path]:
    """(held-out view, store URL, folder for the evaluations and results): the config's store and ``out``, or
    ``eval_store`` and ``out/on-<its folder name>``, refused unless it holds the dictionaries' hook, at the same
    width, from the same model (another model's activations would give numbers that mean nothing)."""
    if eval_store is None:
        return ActivationStore(cfg.store).split(held_out, seed=0)[1], cfg.store, out
    store, trained_on = ActivationStore(eval_store), ActivationStore(cfg.store)
    hook = cfg.input_hook or cfg.hook or next(iter(trained_on.hooks))
    store.check_hook(hook)
    ours, theirs = trained_on.manifest.config.model, store.manifest.config.model
    if theirs != ours or store.width(hook) != trained_on.width(hook):
        raise ScopeError(f"--eval-store {eval_store}: it holds {hook} of {theirs!r} ({store.width(hook)} wide), and "
                         f"the dictionaries were trained on {hook} of {ours!r} ({trained_on.width(hook)} wide) in "
                         f"{cfg.store}; name a store captured from {ours!r}")
    return store.split(held_out, seed=0)[1], eval_store, out / f"on-{Path(eval_store.rstrip('/')).name}"


def figures(cache: dict, names: list[str], batch_size: int, final_step: int) -> dict[str, go.Figure]:
    """Delta loss against token-steps (one line per dictionary) and against L0 at the last evaluated step."""
    curve, frontier = go.Figure(), go.Figure()
    for name in names:
        points = sorted((int(k.rsplit("@", 1)[1]), v) for k, v in cache.items() if k.rsplit("@", 1)[0] == name)
        points = [(s, v) for s, v in points if v.get("lm")]
        if not points:
            continue
        curve.add_trace(go.Scatter(x=[s * batch_size for s, _ in points], y=[v["lm"]["delta_loss"] for _, v in points],
                                   mode="lines+markers", name=name,
                                   customdata=[[v["l0"], v["dead_fraction"]] for _, v in points],
                                   hovertemplate="%{x:,} token-steps<br>delta %{y:.3f} nats<br>L0 %{customdata[0]:.1f}"
                                                 "<br>dead %{customdata[1]:.1%}"))
        step, last = points[-1]
        frontier.add_trace(go.Scatter(x=[last["l0"]], y=[last["lm"]["delta_loss"]], mode="markers+text", name=name,
                                      text=[name], textposition="top center",
                                      hovertemplate=f"{step * batch_size:,} token-steps<br>L0 %{{x:.1f}}<br>"
                                                    "delta %{y:.3f} nats"))
    curve.update_layout(title="Delta loss on held-out documents against training token-steps",
                        xaxis_title="token-steps", yaxis_title="delta loss (nats)", margin={"t": 80})
    frontier.update_layout(title=f"Delta loss against L0 ({final_step * batch_size:,} token-steps or the last snapshot)",
                           xaxis_title="L0", yaxis_title="delta loss (nats)", showlegend=False, margin={"t": 80})
    return {"sae_quality_curve": curve, "sae_quality_l0": frontier}


def _only(args, names: list[str]) -> list[dict]:
    """The config's dictionary specs with these names, refusing a name it does not have."""
    specs = {d.label(): d for d in load_config(args.config).dictionaries}
    missing = [n for n in names if n not in specs]
    if missing:
        raise SystemExit(f"--only: {', '.join(missing)} not in {args.config} (it has: {', '.join(specs)})")
    return [specs[n].model_dump(exclude_defaults=True) for n in names]


def main() -> None:
    ap = sweep_parser(__doc__.splitlines()[0], "sae_configs/gemma-3-270m-res-l6-quality-10m-4k.yaml",
                      "runs/quality-10m")
    ap.add_argument("--lm-tokens", type=int, default=16384)
    ap.add_argument("--curve-lm-tokens", type=int, default=None,
                    help="LM tokens for the snapshots along the way (default: --lm-tokens; fewer is cheaper, noisier)")
    ap.add_argument("--figures", default=None, help="also copy the figures' HTML into this folder (e.g. docs/figures)")
    ap.add_argument("--no-train", action="store_true", help="evaluate the snapshots so far; do not train")
    ap.add_argument("--only", default=None, help="train only these dictionaries (comma-separated), in OUT/parts/")
    ap.add_argument("--no-eval", action="store_true", help="train, then stop (parts run side by side)")
    ap.add_argument("--fork-from", default=None,
                    help="with --only NAME: start from this run folder's checkpoint (e.g. a copy of another part's "
                         "checkpoint taken before NAME's config differs from it; scope/training/fork.py)")
    ap.add_argument("--eval-store", default=None,
                    help="score on this store's held-out documents instead (results in OUT/on-<its folder name>/)")
    ap.add_argument("--paired-against", default=None,
                    help="the table gives each SAE's lead over this dictionary, paired on the same windows "
                         "(default: the config's first per-row TopK)")
    args = ap.parse_args()
    prepare_outputs(args)

    out = Path(args.out)
    if args.fork_from and not args.only:
        raise SystemExit("--fork-from starts one part from another run's checkpoint; name the part with --only NAME")
    if args.only:
        args.overrides.append("dictionaries=" + json.dumps(_only(args, args.only.split(","))))
        args.out = str(out / PARTS / args.only.replace(",", "+"))
    if args.no_train:
        cfg = load_config(args.config, args.overrides)
    else:
        cfg, _, _ = train_sweep(args)
    if args.no_eval:
        return
    if args.only:
        cfg = load_config(args.config)
    reference = reference_name(args.paired_against, cfg)
    held_out, store, scored = scoring_store(args.eval_store, cfg, args.held_out, out)
    names = [d.label() for d in cfg.dictionaries]
    total_steps = cfg.trainer.total_tokens // cfg.trainer.batch_size
    scored.mkdir(parents=True, exist_ok=True)
    cache = evaluate_new(scored / EVALS, dictionaries_by_step(out, names, total_steps), held_out, args.lm_tokens,
                         args.curve_lm_tokens or args.lm_tokens, total_steps)
    # The cache also holds what other scripts scored on the same windows (benchmarks/sae_finetune.py: NAME+ftLR).
    study = {k: v for k, v in cache.items() if "@" in k}
    last = max((int(k.rsplit("@", 1)[1]) for k in study), default=0)
    final = with_leads([study[f"{n}@{last}"] for n in names if f"{n}@{last}" in study], reference)
    written = write_results(str(scored), "quality.json", {"final_step": last, "results": final, "all": study},
                            figures(study, names, cfg.trainer.batch_size, last))
    if args.figures:
        for name in ("sae_quality_curve", "sae_quality_l0"):
            shutil.copy(written[name], Path(args.figures) / f"{name}.html")
    md = table(final, store, last * cfg.trainer.batch_size, reference)
    if store != cfg.store:
        md = f"Trained on `{cfg.store}`. " + md
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    print(json.dumps(final, indent=2) if args.json else md)


if __name__ == "__main__":
    run_study(main)
