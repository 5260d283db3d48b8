"""The main job on the bundled Gemma 3 270M: capture layer 6, train a JumpReLU SAE, evaluate it, publish its
feature dashboards. ``scope quickstart`` runs it; so can a notebook or a script::

    from scope.quickstart import run_quickstart
    result = run_quickstart("scope-out", tokens=20_000, train_tokens=100_000)
    result.metrics["fvu"], result.dashboard

Every step resumes: a killed run re-run with the same arguments continues the capture where it stopped and
the training from its last checkpoint.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scope.dashboards import StatsConfig, parse_features, publish
from scope.data import open_source
from scope.dictionaries import load
from scope.errors import ScopeError
from scope.evals import evaluate
from scope.models import load_model
from scope.store import ActivationStore
from scope.store.capture import capture_store
from scope.training import TrainConfig, TrainerSettings, load_config, train
from scope.training.trainer import dead_window_for

MODEL = "gemma-3-270m"
HOOK = "blocks.6.hook_resid_post"

# Gemma Scope 2's quadratic L0 penalty towards L0 60 and its frequency penalty, on the short-run JumpReLU recipe
# of docs/methods/jumprelu.md (centred encoder input, θ started at the target L0, ε 0.01), with AuxK and the
# pre-activation loss against dead latents. Chosen at this budget by benchmarks/quickstart_recipe.py
# (2026-12-03): against the tanh-penalty recipe before it, ~3x fewer dead latents and 0.4 nats less delta loss.
# 2,048 latents rather than 4,096 (2026-12-04, quad-aux8-2k): 600k token-steps leave a wider SAE with many latents
# that fire too rarely to show on the held-out rows (9 % against 16 % never firing there, at the same CE recovered).
# The first fifth of the steps train as BatchTopK (k = 60), with ε 0.002 (2026-12-05, quad-aux8-2k-btk20): the same CE
# recovered and slightly fewer dead latents in half the training time, since ε 0.01 took in so many pre-activations
# that most steps ran the dense path. Longer BatchTopK phases, which win at 10M token-steps, lose CE at this budget.
QUICKSTART_LR = 1e-3
QUICKSTART_SPARSITY = 0.5
QUICKSTART_TARGET_L0 = 60
QUICKSTART_BATCHTOPK_FRACTION = 0.2
QUICKSTART_JUMPRELU = {"apply_b_dec_to_input": True, "init_l0": QUICKSTART_TARGET_L0, "sparsity_loss": "quadratic",
                       "target_l0": QUICKSTART_TARGET_L0, "freq_coeff": 1.0, "freq_max": 0.1, "bandwidth": 0.002}
QUICKSTART_REVIVAL = {"pre_act_coeff": 1e-5, "aux_coeff": 1 / 8}  # the dead-latent losses, when the run is long enough
# The latents that never fire on the held-out rows mostly fire on fewer than ~1 row in 10,000: alive to the trainer's
# default dead frequency (1e-5), so the losses above never reach them. Counting a latent dead below 1e-4 of the dead
# window's rows (the window stays the ~100k rows, about one pass over the store, that the default frequency needs)
# leaves fewer of them silent at the same CE recovered (2026-12-05, session 10, quad-aux8-2k-btk20-dead1e-4).
QUICKSTART_DEAD_FREQUENCY = 1e-4


@dataclass
class QuickstartResult:
    """Where the quickstart wrote its store, SAE and dashboards, and the SAE's held-out metrics."""

    out: str
    store: str
    sae: str
    metrics: dict[str, Any]  # scope.evals.evaluate's dict: L0, FVU, dead latents, "lm" (spliced-in LM loss)
    dashboard: str  # the site's index.html
    seconds: float
    held_out_documents: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``scope quickstart --json``."""
        return {"out": self.out, "store": self.store, "sae": self.sae, "metrics": self.metrics,
                "dashboard": self.dashboard, "seconds": self.seconds}


def check_dashboard_input(features: str, d_sae: int, rows: int, rows_name: str = "dashboard_rows") -> None:
    """Refuse dashboard input that would otherwise fail only after the capture and the training."""
    parse_features(features, d_sae)
    if rows <= 0:
        raise ScopeError(f"{rows_name} must be positive, got {rows}")


def quickstart_config(store: str, *, d_sae: int, train_tokens: int, batch_size: int) -> TrainConfig:
    """The training config of the quickstart's JumpReLU SAE (the recipe above) on ``store``."""
    steps = train_tokens // batch_size
    window = dead_window_for(batch_size, steps, TrainerSettings.model_fields["dead_frequency"].default)
    recipe = (QUICKSTART_JUMPRELU | (QUICKSTART_REVIVAL if window else {})  # too short a run: they could not act
              | {"batchtopk_steps": int(steps * QUICKSTART_BATCHTOPK_FRACTION)})
    return load_config(data={
        "store": store, "hook": HOOK,
        "trainer": {"total_tokens": train_tokens, "batch_size": batch_size, "lr": QUICKSTART_LR,
                    "lr_warmup_steps": 10, "sparsity_warmup_steps": max(1, steps // 4),
                    "log_every": 10, "checkpoint_every": 50,
                    **({"dead_window_steps": window, "dead_frequency": QUICKSTART_DEAD_FREQUENCY} if window else {})},
        "dictionaries": [{"name": "jumprelu", "kind": "jumprelu", "d_sae": d_sae,
                          "sparsity_coeff": QUICKSTART_SPARSITY, **recipe}]})


def run_quickstart(
    out: str | Path = "scope-out",
    *,
    tokens: int = 100_000,
    corpus: str = "wiki",
    d_sae: int = 2048,
    train_tokens: int = 600_000,
    # Small batches: within a few CPU minutes, more updates beat bigger batches (measured: 4x the
    # steps at batch 1,024 gave FVU 0.165 and 77 % CE recovered, against 0.33 and 53 % at 4,096).
    batch_size: int = 1024,
    lm_tokens: int = 1024,
    dashboard_features: str = "0:100",
    dashboard_rows: int = 50_000,
    log: Callable[[str], None] | None = None,
) -> QuickstartResult:
    """Capture, train, evaluate and publish into ``out`` (store/, sae/, dashboard/); ``log`` gets each step's line."""
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    check_dashboard_input(dashboard_features, d_sae, dashboard_rows)
    t0 = time.time()
    model = load_model(MODEL)
    store_dir = str(Path(out) / "store")
    say(f"[1/4] capturing {tokens:,} tokens of {corpus} at {HOOK} -> {store_dir}")
    capture_store(model, open_source(corpus), [HOOK], store_dir, tokens, context=128)
    say(f"[2/4] training a JumpReLU SAE with {d_sae:,} latents for {train_tokens:,} token-steps")
    cfg = quickstart_config(store_dir, d_sae=d_sae, train_tokens=train_tokens, batch_size=batch_size)
    sae_dir = train(cfg, Path(out) / "sae")["jumprelu"]
    say(f"[3/4] evaluating on held-out documents ({lm_tokens:,} tokens for the LM loss)")
    held_out = ActivationStore(store_dir).split(0.1, seed=0)[1]
    metrics = evaluate(load(sae_dir), held_out, model=model, lm_tokens=lm_tokens, name="jumprelu", progress=True)
    site = str(Path(out) / "dashboard")
    say(f"[4/4] publishing the dashboards of features {dashboard_features} over {dashboard_rows:,} rows -> {site}")
    dash = publish(sae_dir, store_dir, site, dashboard_features, model=model, overwrite=True,
                   cfg=StatsConfig(max_rows=dashboard_rows), name="quickstart JumpReLU SAE")
    return QuickstartResult(out=str(out), store=store_dir, sae=str(sae_dir), metrics=metrics, dashboard=dash.index,
                            seconds=round(time.time() - t0, 1), held_out_documents=len(held_out.documents))
