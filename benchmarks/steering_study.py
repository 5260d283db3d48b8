"""RePS vs DiffMean vs the LM objective on Gemma 3 270M: steering and suppression, offline scores.

For each concept (AxBench-shaped data built from the labelled bundled corpora) and each method,
the vector is trained (RePS, LM) or computed from an activation store (DiffMean), then scored with
the AxBench protocol (scope.steering.evaluate): α chosen on half of the steering prompts, scores
reported on the other half; suppression by null-out on in-concept prompts. Every piece is saved
under --out and reused when the script is run again (a killed run resumes), and the table is
written as markdown (--markdown) beside the paper's Gemma-2-2B figures.

    python benchmarks/steering_study.py --out runs/steering-study --markdown runs/steering-study/table.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from scope.analysis.output import write_results
from scope.models import load_model
from scope.steering.concepts import parse_concept
from scope.steering.evaluate import alpha_figure, evaluate_vector, result_from_dict
from scope.steering.interventions import resid_hook
from scope.steering.pipeline import concept_data, make_vector, scorer_for
from scope.steering.reps import SteerConfig

# RePS (arXiv 2505.20809), its AxBench steering table: AxBench steering scores (harmonic mean, 0–2) of rank-1 steering
# vectors on Gemma-2-2B at layer 10.
PAPER = {"reps": 0.756, "lm": 0.663, "diffmean": 0.297}
METHODS = ("reps", "lm", "diffmean")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/steering-study")
    ap.add_argument("--concepts", default="bbc:sport,bbc:tech,bbc:entertainment,wiki:Mathematics")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--n-train", type=int, default=24)
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--response-tokens", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--alphas", default="0,0.25,0.5,1")
    ap.add_argument("--store-tokens", type=int, default=40_000)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--summarise", action="store_true", help="only tabulate the evaluations already saved in --out")
    args = ap.parse_args()

    out = Path(args.out)
    if args.summarise:
        found = [out / c.replace(":", "_") / m / "eval.json" for c in args.concepts.split(",")
                 for m in args.methods.split(",")]
        results = [result_from_dict(json.loads(f.read_text())) for f in found if f.is_file()]
        return report(results, args, out, {}, 0.0)
    alphas = [float(a) for a in args.alphas.split(",")]
    model = load_model("gemma-3-270m", dtype=args.dtype)
    t0 = time.time()
    results, timings = [], {}
    for concept in args.concepts.split(","):
        corpus, _ = parse_concept(concept)
        base = SteerConfig(concept=concept, layer=args.layer, n_train=args.n_train, n_eval=args.n_eval,
                           response_tokens=args.response_tokens, epochs=args.epochs, batch_size=args.batch_size,
                           lr=args.lr, dtype=args.dtype)
        data = concept_data(model, base)
        t = time.time()
        scorer = scorer_for(model, data, out / concept.replace(":", "_") / "scorer")
        timings[f"{concept}/scorer"] = round(time.time() - t, 1)
        for method in args.methods.split(","):
            folder = out / concept.replace(":", "_") / method
            done = folder / "eval.json"
            if done.is_file():
                results.append(result_from_dict(json.loads(done.read_text())))
                continue
            store = str(out / "stores" / f"{corpus}-l{args.layer}") if method == "diffmean" else None
            cfg = base.model_copy(update={"method": method, "store": store})
            if store and not (Path(store) / "manifest.json").is_file():
                from scope.data import open_source
                from scope.store.capture import capture_store

                capture_store(model, open_source(corpus), [resid_hook(args.layer)], store, args.store_tokens, context=64)
            t = time.time()
            vec = make_vector(model, data, cfg, folder)
            timings[f"{concept}/{method}/vector"] = round(time.time() - t, 1)
            t = time.time()
            r = evaluate_vector(model, vec, data, scorer, alphas=alphas, max_new_tokens=args.new_tokens)
            timings[f"{concept}/{method}/eval"] = round(time.time() - t, 1)
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps({**r.to_dict(), "vector": vec.meta(), "probe": scorer.fit.__dict__}, indent=1))
            tmp.replace(done)
            results.append(r)
    report(results, args, out, timings, time.time() - t0)


def report(results, args, out: Path, timings: dict, seconds: float) -> None:
    """Write steering_study.json, the score-vs-α figure and the markdown table; print the table (or JSON)."""
    summary = summarise(results, args)
    summary["timings_s"] = timings
    summary["seconds"] = round(seconds, 1)
    figures = {"score_vs_alpha": alpha_figure(results, "Gemma 3 270M: steering score vs α (all prompts)")}
    write_results(str(out), "steering_study.json", summary, figures)
    table = markdown(summary)
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(json.dumps(summary, indent=1) if args.json else table)


def _hm2(a: float, b: float) -> float:
    return 0.0 if a <= 0 or b <= 0 else 2 / (1 / a + 1 / b)


def summarise(results, args) -> dict:
    """Per (concept, method) rows, per-method means, and mean ratings per α (all prompts) per method."""
    rows = []
    for r in results:
        # Secondary: α chosen on the selection half by the harmonic mean of the mean concept and
        # fluency ratings alone (how far a method steers while staying fluent, relevance aside).
        cf = int(np.argmax([_hm2(x.concept, x.fluency) for x in r.select]))
        rows.append({"concept": r.concept, "method": r.method, "best_alpha": r.best_alpha,
                     "steer": r.steer.__dict__, "unsteered": r.unsteered.__dict__,
                     "concept_fluency_alpha": r.alphas[cf], "concept_fluency": r.report[cf].__dict__,
                     "suppress": r.suppress.__dict__ if r.suppress else None,
                     "unsuppressed": r.unsuppressed.__dict__ if r.unsuppressed else None})
    means, curves = {}, {}
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]

        def avg(part: str, key: str) -> float | None:
            vals = [r[part][key] for r in mine if r[part]]
            return float(np.mean(vals)) if vals else None

        means[m] = {f"{part}_{key}": avg(part, key) for part in ("steer", "unsteered", "concept_fluency", "suppress",
                                                                  "unsuppressed")
                    for key in ("harmonic", "concept", "relevance", "fluency")}
        mine_r = [r for r in results if r.method == m]
        curves[m] = {"alphas": mine_r[0].alphas, **{
            key: [float(np.mean([(getattr(x.select[i], key) * x.select[i].n + getattr(x.report[i], key) * x.report[i].n)
                                 / (x.select[i].n + x.report[i].n) for x in mine_r]))
                  for i in range(len(mine_r[0].alphas))] for key in ("concept", "relevance", "fluency", "harmonic")}}
    return {"model": "gemma-3-270m", "layer": args.layer, "dtype": args.dtype, "rows": rows, "means": means,
            "curves": curves, "paper_gemma2_2b_l10": PAPER,
            "sizes": {"n_train": args.n_train, "n_eval": args.n_eval, "response_tokens": args.response_tokens,
                      "new_tokens": args.new_tokens, "epochs": args.epochs, "batch_size": args.batch_size,
                      "lr": args.lr, "alphas": args.alphas, "store_tokens": args.store_tokens}}


def markdown(s: dict) -> str:
    f = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    lines = ["Steering (AxBench protocol: α* by the harmonic mean on half the prompts, reported on the other half) "
             "and suppression (null-out on in-concept prompts; concept rating flipped):", "",
             "| concept | method | α* | HM at α* | HM at α=0 | concept α*/0 | relevance α*/0 | fluency α*/0 "
             "| α by concept·fluency | concept there | fluency there | suppress HM | no-intervention HM "
             "| concept absent, suppressed/not |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in s["rows"]:
        st, un, cf, sp, us = r["steer"], r["unsteered"], r["concept_fluency"], r["suppress"], r["unsuppressed"]
        lines.append(
            f"| {r['concept']} | {r['method']} | {r['best_alpha']:g} | {f(st['harmonic'])} | {f(un['harmonic'])} | "
            f"{f(st['concept'])}/{f(un['concept'])} | {f(st['relevance'])}/{f(un['relevance'])} | "
            f"{f(st['fluency'])}/{f(un['fluency'])} | {r['concept_fluency_alpha']:g} | {f(cf['concept'])} | "
            f"{f(cf['fluency'])} | {f(sp and sp['harmonic'])} | {f(us and us['harmonic'])} | "
            f"{f(sp and sp['concept'])}/{f(us and us['concept'])} |")
    lines += ["", "Means over concepts, beside the paper's AxBench steering score on Gemma-2-2B, layer 10:", "",
              "| method | steering HM (α*) | HM at α=0 | concept at the concept·fluency α | fluency there "
              "| concept at α=0 | fluency at α=0 | suppress HM | no-intervention HM | paper, Gemma-2-2B L10 |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m, v in s["means"].items():
        lines.append(f"| {m} | {f(v['steer_harmonic'])} | {f(v['unsteered_harmonic'])} | "
                     f"{f(v['concept_fluency_concept'])} | {f(v['concept_fluency_fluency'])} | "
                     f"{f(v['unsteered_concept'])} | {f(v['unsteered_fluency'])} | {f(v['suppress_harmonic'])} | "
                     f"{f(v['unsuppressed_harmonic'])} | {f(s['paper_gemma2_2b_l10'].get(m))} |")
    lines += ["", "Mean ratings per α over all prompts and concepts (concept / relevance / fluency / HM):", "",
              "| method | " + " | ".join(f"α={a:g}" for a in next(iter(s["curves"].values()))["alphas"]) + " |",
              "| --- |" + " ---: |" * len(next(iter(s["curves"].values()))["alphas"])]
    for m, c in s["curves"].items():
        cells = [f"{c['concept'][i]:.2f} / {c['relevance'][i]:.2f} / {c['fluency'][i]:.2f} / {c['harmonic'][i]:.2f}"
                 for i in range(len(c["alphas"]))]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
