"""Recipes at the quickstart's budget: which JumpReLU options give the fewest dead latents and the most CE recovered.

Captures the quickstart's store (100k tokens of wiki at layer 6, 128-token windows) once, then trains each
variant with ``scope.quickstart.quickstart_config`` (4,096 latents, 600k token-steps at batch 1,024) with its
dictionary and trainer options replaced, and evaluates it as the quickstart does (held-out documents, LM loss
over ``--lm-tokens``). Every variant has its own run folder, so a killed run resumes and a re-run only trains
and evaluates what is new. The table puts each variant's training wall time beside its quality.

Run:  OMP_NUM_THREADS=1 python benchmarks/quickstart_recipe.py [--out runs/quickstart-recipe] [--only A,B]
          [--lm-tokens 2048] [--no-eval] [--markdown PATH] [--json]
A variant whose dictionary is saved is not trained again; delete its folder to retrain it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from sweep import EVALS, evaluate_cached, prepare_outputs, run_study, timed_train, training_time

from scope.data import open_source
from scope.models import load_model
from scope.quickstart import HOOK, MODEL, quickstart_config
from scope.store import ActivationStore
from scope.store.capture import capture_store
from scope.training import TrainerSettings, load_config

@dataclass(frozen=True)
class Variant:
    """Dictionary and trainer options laid over quickstart_config's, and the size of the store it trains on."""

    label: str
    dictionary: dict = field(default_factory=dict)
    trainer: dict = field(default_factory=dict)
    tokens: int = 100_000  # the quickstart's store


QUADRATIC = {"sparsity_loss": "quadratic", "target_l0": 60, "init_l0": 60, "sparsity_coeff": 0.5,
             "freq_coeff": 1.0, "freq_max": 0.1, "pre_act_coeff": 1e-5, "bandwidth": 0.01, "batchtopk_steps": 0}
TRAIN_TOKENS, BATCH = 600_000, 1024  # the quickstart's budget


def batchtopk_variant(percent: int, d_sae: int = 2048, train_tokens: int = TRAIN_TOKENS,
                      tokens: int = 100_000) -> Variant:
    """quad-aux8 trained as BatchTopK for the first ``percent`` % of its steps, at ε 0.002."""
    longer = train_tokens != TRAIN_TOKENS
    label = f"quadratic, AuxK 1/8, {d_sae:,} latents, BatchTopK for {percent} %" + (
        f", {train_tokens / 1e6:g}M token-steps" if longer else "") + (
        f", {tokens // 1000}k-token store" if tokens != 100_000 else "")
    return Variant(label, QUADRATIC | {"aux_coeff": 1 / 8, "d_sae": d_sae, "bandwidth": 0.002,
                                       "batchtopk_steps": round(train_tokens // BATCH * percent / 100)},
                   {"total_tokens": train_tokens} if longer else {}, tokens)


def slow_theta(v: Variant) -> Variant:
    """The variant with θ on its own learning rate, 5e-5 (the 10M recipe's)."""
    return replace(v, label=v.label + ", θ lr 5e-5", dictionary=v.dictionary | {"threshold_lr": 5e-5})


def with_trainer(v: Variant, label: str, **trainer) -> Variant:
    """The variant with these trainer options laid over its own, ``label`` added to its label."""
    return replace(v, label=f"{v.label}, {label}", trainer=v.trainer | trainer)


# tanh-old is the recipe the quickstart shipped until 2026-12-03; the rest are the quadratic-penalty candidates
# (each spells out its options, so a later change to the quickstart's own recipe does not change them).
VARIANTS = {
    "tanh-old": Variant("tanh λ 2e-4 (old quickstart)", {
        "sparsity_loss": "tanh", "tanh_scale": 100, "sparsity_coeff": 2e-4, "init_l0": 64, "target_l0": None,
        "freq_coeff": 0.0, "aux_coeff": 0.0, "pre_act_coeff": 1e-5, "bandwidth": 0.01, "batchtopk_steps": 0}),
    "quad-aux8": Variant("quadratic, AuxK 1/8", QUADRATIC | {"aux_coeff": 1 / 8}),
    "quad-aux8-dead1e-4": Variant("quadratic, AuxK 1/8, dead < 1e-4", QUADRATIC | {"aux_coeff": 1 / 8},
                                  {"dead_frequency": 1e-4}),
    "quad-aux8-dead3e-4": Variant("quadratic, AuxK 1/8, dead < 3e-4", QUADRATIC | {"aux_coeff": 1 / 8},
                                  {"dead_frequency": 3e-4}),
    "quad-aux2-dead3e-4": Variant("quadratic, AuxK 1/2, dead < 3e-4", QUADRATIC | {"aux_coeff": 1 / 2},
                                  {"dead_frequency": 3e-4}),
    "quad-aux32": Variant("quadratic, AuxK 1/32", QUADRATIC | {"aux_coeff": 1 / 32}),
    "quad-aux32-2k": Variant("quadratic, AuxK 1/32, 2,048 latents", QUADRATIC | {"aux_coeff": 1 / 32, "d_sae": 2048}),
    "quad-aux8-2k": Variant("quadratic, AuxK 1/8, 2,048 latents", QUADRATIC | {"aux_coeff": 1 / 8, "d_sae": 2048}),
    # The 10M study's fix for dead latents (2026-12-05): train as BatchTopK (k = target_l0) for the first part of
    # the steps, then as a JumpReLU; ε 0.002 fits the thresholds that phase leaves.
    **{f"quad-aux8-2k-btk{pct}": batchtopk_variant(pct) for pct in (80, 50, 35, 20)},
    "quad-aux8-2k-btk20-1m2": batchtopk_variant(20, train_tokens=1_200_000),
    # Twice the budget on twice the text (2026-12-05): the 1.2M run above lost latents to 12 epochs of 100k rows.
    **{f"quad-aux8-2k-btk{pct}-1m2-200k": batchtopk_variant(pct, train_tokens=1_200_000, tokens=200_000)
       for pct in (20, 50)},
    # θ on its own learning rate (the 10M recipe's 5e-5; the quickstart's θ moves at lr 1e-3, ~10 % of θ a step):
    # does it stop the late loss of latents the longer runs show?
    "quad-aux8-2k-btk20-thlr": slow_theta(batchtopk_variant(20)),
    "quad-aux8-2k-btk20-1m2-thlr": slow_theta(batchtopk_variant(20, train_tokens=1_200_000)),
    "quad-aux8-btk80": batchtopk_variant(80, d_sae=4096),
    # The quickstart's latents that never fire on the held-out rows fire on fewer than ~1e-4 of rows, 10x below the
    # trainer's default dead frequency (1e-5), so AuxK and the pre-activation loss never see them (2026-12-05,
    # session 10): count a latent dead below 1e-4 or 3e-4 of the window's rows instead.
    **{f"quad-aux8-2k-btk20-dead{f}": with_trainer(batchtopk_variant(20), f"dead < {f}", dead_frequency=float(f))
       for f in ("1e-4", "3e-4")},
    # The same two recipes from another seed (the run-to-run spread of the dead fraction is about a point).
    "quad-aux8-2k-btk20-seed1": with_trainer(batchtopk_variant(20), "seed 1", seed=1),
    "quad-aux8-2k-btk20-dead1e-4-seed1": with_trainer(batchtopk_variant(20), "dead < 1e-4, seed 1",
                                                      dead_frequency=1e-4, seed=1),
    "quad-aux32-200k": Variant("quadratic, AuxK 1/32, 200k-token store", QUADRATIC | {"aux_coeff": 1 / 32},
                               tokens=200_000),
}
TOKENS = Variant("").tokens


def store_path(out: Path, tokens: int) -> str:
    """The folder of the wiki store with ``tokens`` tokens."""
    return str(out / ("store" if tokens == TOKENS else f"store-{tokens // 1000}k"))


def variant_config(store: str, name: str):
    """quickstart_config with the variant's options laid over it."""
    v = VARIANTS[name]
    data = quickstart_config(store, d_sae=4096, train_tokens=TRAIN_TOKENS, batch_size=BATCH).model_dump(exclude_unset=True)
    data["dictionaries"][0].update(v.dictionary)
    # A variant without its own dead frequency keeps the trainer's default, not the quickstart's.
    data["trainer"].update({"dead_frequency": TrainerSettings.model_fields["dead_frequency"].default} | v.trainer)
    return load_config(data=data)


def table(rows: list[dict]) -> str:
    """The results as a Markdown table."""
    lines = ["| variant | recipe | L0 | dead | FVU | delta loss | CE recovered | training |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lm, wall = r["lm"], r["wall_s"]
        lines.append(f"| {r['variant']} | {r['label']} | {r['l0']:.1f} | {r['dead_fraction']:.1%} | {r['fvu']:.3f} | "
                     f"{lm['delta_loss']:.3f} | {lm['ce_loss_recovered']:.1%} | "
                     f"{'resumed' if wall is None else f'{wall:.0f} s'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/quickstart-recipe")
    ap.add_argument("--only", default=None, help=f"comma-separated variants (default: all): {', '.join(VARIANTS)}")
    ap.add_argument("--lm-tokens", type=int, default=2048)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    prepare_outputs(args)
    names = list(VARIANTS) if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--only: unknown variant {unknown[0]!r}; the variants are: {', '.join(VARIANTS)}")
    out = Path(args.out)
    model = load_model(MODEL)
    for tokens in sorted({VARIANTS[n].tokens for n in names} | {TOKENS}):  # resumes; a no-op once captured
        capture_store(model, open_source("wiki"), [HOOK], store_path(out, tokens), tokens, context=128)
    runs = {}
    for name in names:
        cfg = variant_config(store_path(out, VARIANTS[name].tokens), name)
        done = out / name / "jumprelu"  # a finished variant is not trained again (nor checked against new fields)
        runs[name] = (cfg, done if (done / "cfg.json").exists() else timed_train(cfg, out / name)["jumprelu"])
    if args.no_eval:
        return
    # Every variant is scored on the quickstart store's held-out documents. The split hashes each document's
    # id, and a bigger store starts with the same documents, so they are held out of its training rows too.
    held_out = ActivationStore(store_path(out, TOKENS)).split(0.1, seed=0)[1]
    cache = evaluate_cached(out / EVALS, {n: p for n, (_, p) in runs.items()}, held_out, args.lm_tokens)
    rows = [{**cache[n], "variant": n, "label": VARIANTS[n].label, **training_time(cfg, out / n)}
            for n, (cfg, _) in runs.items()]
    if args.markdown:
        Path(args.markdown).write_text(table(rows) + "\n")
    print(json.dumps(rows, indent=1) if args.json else table(rows))


if __name__ == "__main__":
    run_study(main)
