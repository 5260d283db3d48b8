"""KL + MSE fine-tune of a quality study's final SAEs: delta loss before and after, paired, at the same L0.

Takes the final dictionaries of a run of ``benchmarks/sae_quality.py`` (its config and ``--out``), fine-tunes
each on the store's training documents with its reconstruction spliced into the model
(:func:`scope.training.finetune.finetune`; decoder only by default, so codes and L0 do not change), once per
learning rate, and scores the results on the study's held-out documents with the study's evaluation cache, so
"before" is the study's own figure and every comparison is paired on the same windows. Prints a table of
delta loss before and after with the paired change, and the paired gap between the first two SAEs named
(before and after); writes it with a plotly figure of delta loss before and after.

Run:  python benchmarks/sae_finetune.py --config sae_configs/gemma-3-270m-res-l6-quality-10m-16k.yaml
          --out runs/quality-10m-16k --names jumprelu-btk80-eps2e-3,topk-clip [--lrs 1e-4,3e-4]
          [--tokens 16384] [--lm-tokens 16384] [--train decoder] [--threshold-lr 0] [--figures docs/figures]
          [--no-eval] [--json]
Each fine-tune lives in ``OUT/finetune/NAME+ftLR`` (``-all`` added with ``--train all``, ``-thLR`` to a JumpReLU's
with ``--threshold-lr``, ``-TOKENStok`` with a ``--tokens`` other than 16384) and resumes after a kill (re-run the
same command).
``--names NAME --lrs LR --no-eval`` runs one fine-tune, so that two can run side by side (one
single-threaded process per core); the evaluation then finds them all.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import plotly.graph_objects as go
from sae_quality import PARTS, dictionaries_by_step
from sweep import EVALS, evaluate_cached, plus_minus, prepare_outputs, run_study, sweep_parser

from scope.analysis.output import write_results
from scope.dictionaries import load
from scope.dictionaries.base import CONFIG
from scope.files import read_json
from scope.evals.lm_loss import paired_difference
from scope.store import ActivationStore
from scope.store.windows import load_store_model
from scope.training import load_config
from scope.training.finetune import SAVED, FinetuneSettings, finetune

FINETUNES = "finetune"


DEFAULT_TOKENS = 16384


def tuned_name(name: str, lr: float, train: str = "decoder", tokens: int = DEFAULT_TOKENS,
               threshold_lr: float = 0.0) -> str:
    """``NAME+ftLR[-TRAIN][-thLR][-TOKENStok]``: each fine-tune's settings get their own folder and evaluation entry."""
    return (f"{name}+ft{lr:g}" + ("" if train == "decoder" else f"-{train}")
            + (f"-th{threshold_lr:g}" if threshold_lr else "")
            + ("" if tokens == DEFAULT_TOKENS else f"-{tokens}tok"))


def own_settings(settings: FinetuneSettings, sae_path: Path) -> FinetuneSettings:
    """The settings for one SAE: ``--threshold-lr`` applies to JumpReLUs only (the others have no thresholds)."""
    if settings.threshold_lr and read_json(sae_path / CONFIG)["kind"] != "jumprelu":
        return settings.model_copy(update={"threshold_lr": 0.0})
    return settings


def run_finetunes(out: Path, store: ActivationStore, finals: dict[str, Path], per_sae: dict[str, FinetuneSettings],
                  by_lr: dict[float, dict[str, str]]) -> dict[str, Path]:
    """Fine-tune (or resume) each final dictionary at each learning rate; return the fine-tuned folders by name."""
    model = None
    done = {}
    for name, path in finals.items():
        for lr, names in by_lr.items():
            folder = out / FINETUNES / names[name]
            print(f"fine-tuning {name} at lr {lr:g} -> {folder}", file=sys.stderr, flush=True)  # stdout: --json
            model = model or load_store_model(store)
            # finetune() resumes the folder or finds it finished, and refuses one that holds other settings
            finetune(load(path), model, store, folder, per_sae[name].model_copy(update={"lr": lr}))
            done[names[name]] = folder / SAVED
    return done


def rows(cache: dict, final: dict[str, str], tuned: dict[float, dict[str, str]]) -> list[dict]:
    """One row per fine-tuned SAE: L0, delta loss before and after, and the paired change."""
    out = []
    for name, key in final.items():
        before = cache[key]
        for lr, names in tuned.items():
            after = cache.get(names[name])
            if after is None:
                continue
            change, se = paired_difference(before["lm"], after["lm"])
            out.append({"name": name, "lr": lr, "l0_before": before["l0"], "l0_after": after["l0"],
                        "fvu_before": before["fvu"], "fvu_after": after["fvu"],
                        "delta_before": before["lm"]["delta_loss"], "delta_before_se": before["lm"]["delta_loss_se"],
                        "delta_after": after["lm"]["delta_loss"], "delta_after_se": after["lm"]["delta_loss_se"],
                        "change": change, "change_se": se, "recovered_after": after["lm"]["ce_loss_recovered"],
                        "kl_before": before["lm"]["kl"], "kl_after": after["lm"]["kl"]})
    return out


def table(results: list[dict], gaps: list[dict], lm_tokens: int, settings: FinetuneSettings) -> str:
    thresholds = f", JumpReLU thresholds at lr {settings.threshold_lr:g}" if settings.threshold_lr else ""
    lines = [f"Fine-tune: {settings.tokens:,} LM tokens, train {settings.train}{thresholds}; held-out delta loss over "
             f"{lm_tokens:,} LM tokens (paired on the same windows).", "",
             "| SAE | lr | L0 | FVU before → after | delta loss before | after | change (paired) | CE recovered after | KL after |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['name']} | {r['lr']:g} | {r['l0_after']:.1f} | {r['fvu_before']:.3f} → {r['fvu_after']:.3f} | "
                     f"{r['delta_before']:.3f}{plus_minus(r['delta_before_se'])} | "
                     f"{r['delta_after']:.3f}{plus_minus(r['delta_after_se'])} | "
                     f"{r['change']:+.3f}{plus_minus(r['change_se'])} | {r['recovered_after']:.1%} | {r['kl_after']:.3f} |")
    for g in gaps:
        lines.append(f"\n{g['b']} − {g['a']} ({g['when']}): {g['gap']:+.3f}{plus_minus(g['se'])} nats (paired)")
    return "\n".join(lines)


def figure(results: list[dict], settings: FinetuneSettings) -> go.Figure:
    fig = go.Figure()
    labels = [f"{r['name']} (lr {r['lr']:g})" for r in results]
    for when in ("before", "after"):
        fig.add_bar(name=when, x=labels, y=[r[f"delta_{when}"] for r in results],
                    error_y={"type": "data", "array": [r[f"delta_{when}_se"] for r in results]})
    fig.update_layout(title=f"Delta loss on held-out documents before and after the KL + MSE fine-tune "
                            f"({settings.tokens:,} LM tokens, train {settings.train}"
                            + (f", thresholds at lr {settings.threshold_lr:g})" if settings.threshold_lr else ")"),
                      yaxis_title="delta loss (nats)", barmode="group")
    return fig


def main() -> None:
    ap = sweep_parser(__doc__.splitlines()[0], "sae_configs/gemma-3-270m-res-l6-quality-10m-16k.yaml",
                      "runs/quality-10m-16k")
    ap.add_argument("--names", required=True, help="final dictionaries of the study to fine-tune (comma-separated)")
    ap.add_argument("--lrs", default="1e-4", help="learning rates (comma-separated)")
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="LM tokens per fine-tune")
    ap.add_argument("--train", default="decoder", choices=["decoder", "all"])
    ap.add_argument("--threshold-lr", type=float, default=0.0,
                    help="with --train all: the JumpReLUs' thresholds train at this learning rate, their L0 held by a "
                         "penalty (the other SAEs fine-tune without it)")
    ap.add_argument("--lm-tokens", type=int, default=16384)
    ap.add_argument("--figures", default=None, help="also copy the figure's HTML into this folder (e.g. docs/figures)")
    ap.add_argument("--no-eval", action="store_true", help="fine-tune, then stop (runs side by side)")
    args = ap.parse_args()
    prepare_outputs(args)

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    names = args.names.split(",")
    lrs = [float(v) for v in args.lrs.split(",")]
    total_steps = cfg.trainer.total_tokens // cfg.trainer.batch_size
    finals = dictionaries_by_step(out, names, total_steps).get(total_steps, {})
    missing = [n for n in names if n not in finals]
    if missing:
        raise SystemExit(f"--names: no final dictionary {', '.join(missing)} in {out} or {out / PARTS} (train them "
                         f"with benchmarks/sae_quality.py --config {args.config} --out {out} first)")
    store = ActivationStore(cfg.store)
    try:
        settings = FinetuneSettings(tokens=args.tokens, train=args.train, held_out=args.held_out,
                                    threshold_lr=args.threshold_lr)
    except ValueError as err:
        raise SystemExit(f"bad fine-tune settings: {err}") from None
    per_sae = {name: own_settings(settings, path) for name, path in finals.items()}
    by_lr = {lr: {n: tuned_name(n, lr, s.train, s.tokens, s.threshold_lr) for n, s in per_sae.items()} for lr in lrs}
    tuned = run_finetunes(out, store, finals, per_sae, by_lr)
    if args.no_eval:
        return
    held_out = store.split(args.held_out, seed=0)[1]
    final = {n: f"{n}@{total_steps}" for n in names}
    cache = evaluate_cached(out / EVALS, {**{final[n]: finals[n] for n in names}, **tuned}, held_out, args.lm_tokens)
    results = rows(cache, final, by_lr)
    gaps = []
    if len(names) >= 2:
        a, b = names[:2]
        gap, se = paired_difference(cache[final[a]]["lm"], cache[final[b]]["lm"])
        gaps.append({"a": a, "b": b, "when": "before", "gap": gap, "se": se})
        for lr in lrs:
            ta, tb = by_lr[lr][a], by_lr[lr][b]
            if ta in cache and tb in cache:
                gap, se = paired_difference(cache[ta]["lm"], cache[tb]["lm"])
                gaps.append({"a": ta, "b": tb, "when": f"both fine-tuned at lr {lr:g}", "gap": gap, "se": se})
    written = write_results(str(out), "finetune.json", {"settings": settings.model_dump(), "lrs": lrs,
                                                        "results": results, "gaps": gaps},
                            {"sae_finetune": figure(results, settings)})
    if args.figures:
        shutil.copy(written["sae_finetune"], Path(args.figures) / "sae_finetune.html")
    md = table(results, gaps, args.lm_tokens, settings)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    print(json.dumps({"results": results, "gaps": gaps}, indent=2) if args.json else md)


if __name__ == "__main__":
    run_study(main)
