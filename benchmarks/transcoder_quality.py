"""Transcoders on the real model: a transcoder and a skip transcoder of layer 6's MLP against a residual SAE.

Trains the dictionaries of ``sae_configs/gemma-3-270m-transcoders-l6-2m-4k.yaml`` (a JumpReLU transcoder and a
skip transcoder, 4,096 latents, 2M token-steps, the quadratic target-L0 recipe) on the store that also holds the
residual stream, and evaluates them on its held-out documents beside the residual SAE of the same width, L0
target, recipe and budget (``benchmarks/saelens_quality.py``'s scope dictionary, trained on the same rows): L0,
dead latents, FVU of what each one reconstructs, and the language-model loss with the MLP's output replaced by
the transcoder's (or the residual stream by the SAE's) over 16,384 LM tokens by default.

Delta loss (spliced CE − clean CE) is what each replacement costs the model; replacing one MLP's output is a
smaller intervention than replacing the residual stream, so it does not rank a transcoder against the SAE. CE
recovered is not comparable across the rows either: its zero-ablation baseline is the MLP's output for a
transcoder and the whole residual stream for the SAE.

Run:  python benchmarks/transcoder_quality.py [--out runs/transcoder-quality] [--sae-run runs/saelens-quality]
          [--lm-tokens 16384] [--no-eval] [--markdown PATH] [--json]
The residual SAE's row is read from SAE_RUN/evals.json when that run evaluated it on the same number of LM
tokens; otherwise the SAE in SAE_RUN/scope/ is evaluated here. The run folder resumes after a kill.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from sweep import EVALS, evaluate_cached, run_study, sweep_parser, timed_train

from scope.store import ActivationStore
from scope.training import ensure_store, load_config


def table(rows: list[dict], tokens: int, lm_tokens: int) -> str:
    """The comparison as a Markdown table."""
    lines = [f"{tokens:,} token-steps each on the same rows; held-out documents, {lm_tokens:,} LM tokens.", "",
             "| dictionary | reads → writes | L0 | dead | FVU | clean CE | spliced CE | delta loss | KL | "
             "zero-ablated CE | CE recovered |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lm = r["lm"] or {}
        read = r.get("input_hook") or r["hook"]  # the metrics' hook is the one reconstructed
        sites = read + (f" → {r['hook']}" if read != r["hook"] else "")
        lines.append(f"| {r['name']} | {sites} | {r['l0']:.1f} | {r['dead_fraction']:.1%} | {r['fvu']:.3f} | "
                     f"{lm.get('clean_ce', float('nan')):.3f} | {lm.get('spliced_ce', float('nan')):.3f} | "
                     f"{lm.get('delta_loss', float('nan')):.3f} | {lm.get('kl', float('nan')):.3f} | "
                     f"{lm.get('zero_ce', float('nan')):.3f} | {lm.get('ce_loss_recovered', float('nan')):.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = sweep_parser(__doc__.splitlines()[0], "sae_configs/gemma-3-270m-transcoders-l6-2m-4k.yaml",
                      "runs/transcoder-quality")
    ap.add_argument("--lm-tokens", type=int, default=16384)
    ap.add_argument("--sae-run", default="runs/saelens-quality", help="benchmarks/saelens_quality.py's run folder")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-eval", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.config, args.overrides)
    ensure_store(cfg)
    out = Path(args.out)
    saved = timed_train(cfg, out)
    if args.no_eval:
        return

    held_out = ActivationStore(cfg.store).split(args.held_out, seed=0)[1]
    cache = evaluate_cached(out / EVALS, saved, held_out, args.lm_tokens)
    rows = [cache[n] for n in saved]
    sae_run = Path(args.sae_run)
    sae_cache = json.loads((sae_run / EVALS).read_text()) if (sae_run / EVALS).exists() else {}
    if sae_cache.get("scope", {}).get("lm_tokens") == args.lm_tokens:
        sae_row = sae_cache["scope"]
    else:
        folders = [p.parent for p in sorted((sae_run / "scope").glob("*/cfg.json"))]
        if not folders:
            raise SystemExit(f"no residual SAE in {sae_run}/scope: train it first with "
                             f"`python benchmarks/saelens_quality.py --only scope --no-eval --out {sae_run}`")
        sae_row = evaluate_cached(out / EVALS, {"residual-sae": folders[0]}, held_out, args.lm_tokens)["residual-sae"]
    rows.append({**sae_row, "name": "residual SAE (" + Path(sae_row["name"]).name + ")"})
    tc = {r["name"]: r for r in rows}
    skip, plain = tc.get("skip-transcoder"), tc.get("transcoder")
    summary = {}
    if skip and plain and skip["lm"] and plain["lm"]:
        summary = {"skip_lower_fvu": skip["fvu"] < plain["fvu"],
                   "skip_lower_delta": skip["lm"]["delta_loss"] < plain["lm"]["delta_loss"],
                   "fvu": {"transcoder": plain["fvu"], "skip-transcoder": skip["fvu"]},
                   "delta_loss": {r["name"]: (r["lm"] or {}).get("delta_loss") for r in rows}}
    result = {"config": args.config, "token_steps": cfg.trainer.total_tokens, "lm_tokens": args.lm_tokens,
              "results": rows, "summary": summary}
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    md = table(rows, cfg.trainer.total_tokens, args.lm_tokens)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    print(json.dumps(result, indent=1) if args.json else md + "\n\n" + json.dumps(summary, indent=1))


if __name__ == "__main__":
    run_study(main)
