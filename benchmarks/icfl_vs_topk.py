"""ICFL vs TopK, with and without PCA whitening, on Gemma 3 270M activations with document labels.

Tests the claims of Donhauser et al. 2025 (arXiv 2412.16247) on a language model: ICFL leaves far
fewer dead features than a TopK SAE of the same width and k = J·L (their Table 1: 55 vs 7,640 of
8,192 without PCA), and whitening against a control set raises feature selectivity. Trains the
four dictionaries of a config in one pass over the store, then on the held-out documents reports
per dictionary: FVU, cosine, L0, dead features (training: active on < 1e-5 of the rows of the last
window of steps; held-out: the same frequency over the evaluated rows), and for each label family
(wiki topics, BBC categories) the number of features above 0.5 / 0.2 maximum and average
selectivity and the balanced accuracy of a label probe on original vs reconstructed activations.

Run:  python benchmarks/icfl_vs_topk.py [--config sae_configs/icfl-vs-topk-gemma-3-270m-res-l6-2k.yaml]
                                        [--out runs/icfl-vs-topk] [--rows 100000] [--figures DIR]
                                        [--markdown PATH] [--json]
The run folder resumes after a kill (re-run the same command).
"""

from __future__ import annotations

import json
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from sweep import prepare_outputs, run_study, sweep_parser, train_sweep

from scope.dictionaries import load
from scope.errors import ScopeError
from scope.evals import reconstruction_metrics
from scope.evals.selectivity import selectivity_metrics
from scope.store import ActivationStore

FAMILIES = {"wiki topics": "wiki:*", "BBC categories": "bbc:*"}


def family_selectivity(sae, test: ActivationStore, pattern: str, rows: int) -> dict | None:
    """Selectivity over one label family, or None when the held-out split has fewer than 2 of its labels."""
    try:
        return selectivity_metrics(sae, test.where(pattern), max_rows=rows).to_dict()
    except ScopeError as err:
        print(f"skipping {pattern}: {err}")
        return None


def last_logged(out: Path, name: str) -> dict[str, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = next(r for r in reversed(rows) if f"{name}/dead" in r)
    return {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith(f"{name}/")}


def table(results: list[dict]) -> str:
    lines = ["| dictionary | latents | L0 | FVU | cosine | dead (training window) | dead (held-out) | "
             + " | ".join(f"{f}: max-sel >0.5 / >0.2, avg-sel >0.5 / >0.2 | {f}: probe x / x̂" for f in FAMILIES) + " |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---: | ---:" for _ in FAMILIES) + " |"]
    for r in results:
        cells = [r["name"], f"{r['d_sae']:,}", f"{r['l0']:.1f}", f"{r['fvu']:.3f}", f"{r['cosine']:.3f}",
                 f"{r['train_dead']:.1%}", f"{r['heldout_dead']:.1%}"]
        for fam in FAMILIES:
            s = r["selectivity"][fam]
            if s is None:
                cells += ["n/a", "n/a"]
                continue
            tot = {k: sum(lab["above"][k] for lab in s["labels"]) for k in s["labels"][0]["above"]}
            cells.append(f"{tot['maximum>0.5']} / {tot['maximum>0.2']}, {tot['average>0.5']} / {tot['average>0.2']}")
            p = s["probe"]
            cells.append(f"{p.get('original', float('nan')):.3f} / {p.get('reconstructed', float('nan')):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figures(results: list[dict], folder: Path) -> list[Path]:
    """Dead features per dictionary, and features above 0.2 maximum selectivity per label."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [r["name"] for r in results]
    dead = go.Figure([go.Bar(name="training window", x=names, y=[r["train_dead"] for r in results]),
                      go.Bar(name="held-out", x=names, y=[r["heldout_dead"] for r in results])])
    dead.update_layout(title="Dead features (active on < 1e-5 of rows)", yaxis_tickformat=".0%", barmode="group")
    fig = make_subplots(rows=1, cols=len(FAMILIES), subplot_titles=list(FAMILIES))
    for col, fam in enumerate(FAMILIES, start=1):
        for r in results:
            if r["selectivity"][fam] is None:
                continue
            labs = r["selectivity"][fam]["labels"]
            fig.add_trace(go.Bar(name=r["name"], x=[lab["label"].split(":", 1)[-1] for lab in labs],
                                 y=[lab["above"]["maximum>0.2"] for lab in labs], legendgroup=r["name"],
                                 showlegend=col == 1), row=1, col=col)
    fig.update_layout(title="Features with maximum selectivity > 0.2, per label", barmode="group")
    paths = [folder / "icfl_dead_features.html", folder / "icfl_selectivity.html"]
    for f, p in zip((dead, fig), paths):
        f.write_html(p, include_plotlyjs="directory")  # one plotly.min.js beside the figures: works offline
    return paths


def main() -> None:
    ap = sweep_parser(__doc__.splitlines()[0], "sae_configs/icfl-vs-topk-gemma-3-270m-res-l6-2k.yaml",
                      "runs/icfl-vs-topk")
    ap.add_argument("--rows", type=int, default=100_000, help="held-out rows to score")
    ap.add_argument("--figures", default=None, help="write the plotly figures (HTML) into this folder")
    args = ap.parse_args()
    prepare_outputs(args)

    _, saved, test = train_sweep(args)
    out = Path(args.out)
    results = []
    for name, path in saved.items():
        sae = load(path)
        rec = reconstruction_metrics(sae, test, max_rows=args.rows)
        sel = {fam: family_selectivity(sae, test, pattern, args.rows) for fam, pattern in FAMILIES.items()}
        results.append({"name": name, "kind": sae.kind, "d_sae": sae.cfg.d_sae, "l0": rec.l0, "fvu": rec.fvu,
                        "cosine": rec.cosine, "train_dead": last_logged(out, name)["dead"],
                        "heldout_dead": float((rec.firing_frequency < 1e-5).float().mean()), "selectivity": sel})
    (out / "icfl_vs_topk.json").write_text(json.dumps(results, indent=2))
    md = table(results)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    if args.figures:
        figures(results, Path(args.figures))
    print(json.dumps(results, indent=2) if args.json else md)


if __name__ == "__main__":
    run_study(main)
