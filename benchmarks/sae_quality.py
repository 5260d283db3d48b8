"""SAE quality on the real model: JumpReLU vs TopK of the same width on the same tokens.

Trains every dictionary of a sweep config in one pass over its store (capturing the store first if
it is missing), evaluates each on the store's held-out documents — L0, FVU, dead latents and the
language-model loss with the SAE spliced in — and writes the table as Markdown and JSON.

Run:  python benchmarks/sae_quality.py [--config sae_configs/gemma-3-270m-res-l6-sweep-4k.yaml]
                                       [--out runs/quality] [--lm-tokens 4096] [--markdown PATH] [--json]
The run folder resumes after a kill (re-run the same command).
"""

from __future__ import annotations

import json
from pathlib import Path

from sweep import sweep_parser, train_sweep

from scope.dictionaries import load
from scope.evals import evaluate_many, load_store_model


def table(results: list[dict], store: str, tokens: int) -> str:
    """The results as a Markdown table."""
    lines = [f"Store `{store}` ({tokens:,} training token-steps); held-out documents; LM loss over the held-out text.",
             "", "| SAE | kind | latents | L0 | FVU | dead | CE clean | CE spliced | delta loss | CE recovered | KL |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lm = r["lm"] or {}
        lines.append(f"| {r['name']} | {r['kind']} | {r['d_sae']:,} | {r['l0']:.1f} | {r['fvu']:.3f} | "
                     f"{r['dead_fraction']:.1%} | {lm.get('clean_ce', float('nan')):.3f} | "
                     f"{lm.get('spliced_ce', float('nan')):.3f} | {lm.get('delta_loss', float('nan')):.3f} | "
                     f"{lm.get('ce_loss_recovered', float('nan')):.1%} | {lm.get('kl', float('nan')):.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = sweep_parser(__doc__.splitlines()[0], "sae_configs/gemma-3-270m-res-l6-sweep-4k.yaml", "runs/quality")
    ap.add_argument("--lm-tokens", type=int, default=4096)
    args = ap.parse_args()

    cfg, saved, test = train_sweep(args)
    model = load_store_model(test)
    results = evaluate_many({name: load(path) for name, path in saved.items()}, test, model=model,
                            lm_tokens=args.lm_tokens)
    (Path(args.out) / "quality.json").write_text(json.dumps(results, indent=2))
    md = table(results, cfg.store, cfg.trainer.total_tokens)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    print(json.dumps(results, indent=2) if args.json else md)


if __name__ == "__main__":
    main()
