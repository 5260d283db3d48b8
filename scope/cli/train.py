"""Training and evaluating dictionaries: ``scope train``, ``scope quickstart``, ``scope eval``, ``scope finetune``.

The top-level commands here are plain functions; scope/cli/__init__.py adds them to ``scope``.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from scope.cli.common import DeviceOpt, JsonOpt, emit, friendly
from scope.errors import ScopeError


@friendly
def train(
    config: Annotated[str, typer.Argument(help="A YAML config, e.g. sae_configs/gemma-3-270m-res-l6-jumprelu-16k.yaml.")],
    out: Annotated[str, typer.Option(help="Run folder: dictionaries, metrics.jsonl, checkpoint (resumed if present).")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key, e.g. trainer.lr=1e-4 (repeatable).")] = None,
    fork_from: Annotated[Optional[str], typer.Option(
        help="Start from this run folder's checkpoint instead of step 0 (same rows and schedule up to it; the "
             "config differences are listed). A later run of the same command resumes --out as usual.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the dictionaries of a config on its activation store (capturing the store first if needed)."""
    from scope.store.capture import init_distributed
    from scope.training import ensure_store, last_metrics, load_config
    from scope.training import train as run_training
    from scope.training.fork import FORKED_FROM

    init_distributed()
    cfg = load_config(config, set_ or [])
    ensure_store(cfg)
    t0 = time.time()
    saved = run_training(cfg, out, fork_from=fork_from)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    last = last_metrics(out)
    result = {"out": out, "seconds": round(time.time() - t0, 1),
              "dictionaries": {name: {"path": str(p), **{k.split("/", 1)[1]: v for k, v in last.items()
                                                        if k.startswith(name + "/")}} for name, p in saved.items()}}
    forked = Path(out) / FORKED_FROM
    if fork_from and forked.exists():
        result["forked_from"] = json.loads(forked.read_text())
    lines = [f"{n}: L0 {d.get('l0', float('nan')):.1f}, FVU {d.get('fvu', float('nan')):.3f} -> {d['path']}"
             for n, d in result["dictionaries"].items()]
    emit(result, as_json, "\n".join(lines))


@friendly
def quickstart(
    out: Annotated[str, typer.Option(help="Folder for everything the quickstart writes.")] = "scope-out",
    tokens: Annotated[int, typer.Option(help="Tokens of text to capture.")] = 100_000,
    corpus: Annotated[str, typer.Option(help="Bundled corpus.")] = "wiki",
    d_sae: Annotated[int, typer.Option(help="Latents of the JumpReLU SAE.")] = 2048,
    train_tokens: Annotated[int, typer.Option(help="Training length in token-steps.")] = 600_000,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 1024,
    lm_tokens: Annotated[int, typer.Option(help="Held-out tokens for the spliced-in LM loss.")] = 1024,
    dashboard_features: Annotated[str, typer.Option(help="Features whose dashboards are published (START:STOP).")] = "0:100",
    dashboard_rows: Annotated[int, typer.Option(help="Store rows the dashboard pass reads.")] = 50_000,
    as_json: JsonOpt = False,
) -> None:
    """The main job on the bundled Gemma 3 270M: capture layer 6, train a JumpReLU SAE, evaluate it, publish
    its feature dashboards."""
    from scope.quickstart import check_dashboard_input, run_quickstart

    check_dashboard_input(dashboard_features, d_sae, dashboard_rows, rows_name="--dashboard-rows")
    done = run_quickstart(out, tokens=tokens, corpus=corpus, d_sae=d_sae, train_tokens=train_tokens,
                          batch_size=batch_size, lm_tokens=lm_tokens, dashboard_features=dashboard_features,
                          dashboard_rows=dashboard_rows, log=lambda line: typer.echo(line, err=True))
    metrics, lm = done.metrics, done.metrics.get("lm") or {}
    summary = (f"quickstart done in {done.seconds:.0f} s\n  store: {done.store} ({done.held_out_documents} "
               f"held-out documents)\n  SAE:   {done.sae}\n  L0 {metrics['l0']:.1f}, FVU {metrics['fvu']:.3f}, "
               f"dead {metrics['dead_fraction']:.1%}")
    if lm:
        summary += (f", CE clean {lm['clean_ce']:.3f} -> spliced {lm['spliced_ce']:.3f} "
                    f"(delta {lm['delta_loss']:.3f} nats, {lm['ce_loss_recovered']:.1%} recovered)")
    summary += f"\n  dashboards: {done.dashboard}"
    emit(done.to_dict(), as_json, summary)


@friendly
def eval_(
    sae: Annotated[list[str], typer.Option(help="Dictionary folder (repeat --sae for a sweep).")],
    store: Annotated[str, typer.Option(help="Activation store folder or fsspec URL.")],
    held_out: Annotated[float, typer.Option(help="Fraction of documents held out (split by document, seed 0).")] = 0.1,
    lm_tokens: Annotated[int, typer.Option(help="Tokens of held-out text for the spliced-in LM loss.")] = 4096,
    no_lm: Annotated[bool, typer.Option("--no-lm", help="Skip the language-model loss (no model is loaded).")] = False,
    max_rows: Annotated[Optional[int], typer.Option(help="Cap on held-out rows for the reconstruction metrics.")] = None,
    device: DeviceOpt = None,
    html: Annotated[Optional[str], typer.Option(help="Write the L0-vs-FVU frontier of the SAEs to this HTML file.")] = None,
    labels: Annotated[Optional[list[str]], typer.Option(
        help="Also score feature selectivity and a label probe over documents with these labels "
             "(globs such as 'wiki:*'; repeat for more).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """L0, FVU, cosine, dead/dense latents and spliced-in LM loss of SAEs on a store's held-out documents.

    A transcoder is scored on the hook it writes (the store needs both of its hooks) and spliced in there;
    the zero-ablated baseline zeroes that hook (for an MLP transcoder: the MLP ablated)."""
    from scope.dictionaries.interop import load_any
    from scope.evals import evaluate_many, load_store_model, write_frontier
    from scope.models import default_device
    from scope.store import ActivationStore

    if lm_tokens < 0:
        raise ScopeError(f"--lm-tokens must be 0 or positive, got {lm_tokens}")
    test = ActivationStore(store).split(held_out, seed=0)[1]
    if not test.documents:
        raise ScopeError(f"the held-out split of {store} ({held_out:.0%} of its {len(ActivationStore(store).documents)} "
                         "documents) is empty; raise --held-out or capture more tokens")
    dev = default_device(device)
    saes: dict[str, object] = {}
    for p in sae:  # named by folder; the same name twice gets the path instead
        saes[Path(p).name if Path(p).name not in saes else p] = load_any(p, device=dev)
    tokens = 0 if no_lm else lm_tokens
    model = load_store_model(test, device=dev) if tokens else None  # one model for the whole sweep
    results = evaluate_many(saes, test, model=model, lm_tokens=tokens, max_rows=max_rows, device=dev,
                            progress=not as_json)
    if labels:
        from scope.evals.selectivity import selectivity_metrics

        labelled = test.where(labels)
        for r, d in zip(results, saes.values()):
            r["selectivity"] = selectivity_metrics(d, labelled, max_rows=max_rows or 200_000).to_dict()
    if html:
        write_frontier(results, html)
    out = {"store": store, "held_out": held_out, "documents": len(test.documents), "rows": len(test),
           "html": html, "results": results}
    emit(out, as_json, _eval_table(out))


@friendly
def finetune(
    sae: Annotated[str, typer.Argument(help="A trained SAE's folder (scope's own; SAELens and Gemma Scope folders too).")],
    store: Annotated[str, typer.Option(help="Activation store the SAE was trained on: its training documents are used.")],
    out: Annotated[str, typer.Option(help="Folder for the fine-tuned SAE (OUT/sae), metrics.jsonl and the checkpoint.")],
    tokens: Annotated[int, typer.Option(help="LM tokens to fine-tune on.")] = 32_768,
    lr: Annotated[float, typer.Option(help="Adam learning rate, decayed linearly to 0.")] = 1e-4,
    batch_windows: Annotated[int, typer.Option(help="Context windows per step.")] = 4,
    train_: Annotated[str, typer.Option("--train", help="decoder (codes and L0 unchanged) or all (the encoder too).")] = "decoder",
    mse_weight: Annotated[Optional[float], typer.Option(help="Weight of the FVU term (default: KL/FVU at the first step).")] = None,
    threshold_lr: Annotated[float, typer.Option(help="With --train all: a JumpReLU's thresholds train too, at this "
                                                     "learning rate, an L0 penalty holding its L0 (0: fixed).")] = 0.0,
    target_l0: Annotated[Optional[float], typer.Option(help="The L0 that penalty holds (default: the SAE's target_l0, "
                                                            "else its L0 at the first step).")] = None,
    l0_coeff: Annotated[float, typer.Option(help="λ of that penalty, λ (L0/target − 1)².")] = 10.0,
    held_out: Annotated[float, typer.Option(help="Fraction of documents held out (split by document, seed 0).")] = 0.1,
    lm_tokens: Annotated[int, typer.Option(help="Held-out tokens to score the SAE before and after on (0: skip).")] = 4096,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune a trained SAE on KL(clean ‖ spliced) + FVU with its reconstruction spliced into the model, then
    score it before and after on held-out documents (delta loss, paired). A killed run resumes from OUT."""
    import copy

    from pydantic import ValidationError

    from scope.dictionaries.interop import load_any
    from scope.evals import spliced_lm_losses
    from scope.evals.lm_loss import paired_difference
    from scope.models import default_device
    from scope.store import ActivationStore
    from scope.store.windows import load_store_model
    from scope.training.finetune import FinetuneSettings, finetune as run_finetune

    try:
        settings = FinetuneSettings(tokens=tokens, lr=lr, batch_windows=batch_windows, train=train_,
                                    mse_weight=mse_weight, held_out=held_out, threshold_lr=threshold_lr,
                                    target_l0=target_l0, l0_coeff=l0_coeff)
    except ValidationError as err:
        bad = err.errors()[0]
        if not bad["loc"]:  # a check across settings: its message names them, spelled here as flags
            msg = bad["msg"].removeprefix("Value error, ")
            for name in FinetuneSettings.model_fields:
                msg = re.sub(rf"\b{name}\b", "--" + name.replace("_", "-"), msg)
            raise ScopeError(msg) from None
        raise ScopeError(f"--{str(bad['loc'][0]).replace('_', '-')}: {bad['msg']} (got {bad.get('input')!r})") from None
    if lm_tokens < 0 or lm_tokens == 1:
        raise ScopeError(f"--lm-tokens must be 0 (skip) or at least 2, got {lm_tokens}")
    dev = default_device(device)
    before = load_any(sae, device=dev)
    st = ActivationStore(store)
    test = st.split(held_out, seed=0)[1]
    if lm_tokens and not test.documents:  # refuse before the fine-tune runs, not after
        raise ScopeError(f"the held-out split of {store} ({held_out:.0%} of its {len(st.documents)} documents) is "
                         "empty, so nothing would score the fine-tune; raise --held-out or pass --lm-tokens 0")
    model = load_store_model(st, device=dev)
    done = run_finetune(copy.deepcopy(before), model, st, out, settings, progress=not as_json)
    result: dict = {"sae": sae, "store": store, "out": out, **done.to_dict()}
    human = (f"fine-tuned {done.steps} steps on {done.tokens:,} tokens (α {done.mse_weight:.3g}): batch KL "
             f"{done.kl_start:.3f} -> {done.kl_end:.3f}, FVU {done.fvu_start:.3f} -> {done.fvu_end:.3f}, "
             f"L0 {done.l0_start:.1f} -> {done.l0_end:.1f}\n  -> {done.path}")
    if lm_tokens:
        from scope.dictionaries import load

        lm = spliced_lm_losses({"before": before, "after": load(done.path, device=dev)}, model, test,
                               max_tokens=lm_tokens, progress=not as_json)
        diff, se = paired_difference(lm["before"].to_dict(), lm["after"].to_dict())
        result["held_out"] = {k: {f: getattr(v, f) for f in ("tokens", "delta_loss", "delta_loss_se",
                                                                "ce_loss_recovered", "kl")} for k, v in lm.items()}
        result["held_out"]["change"] = {"delta_loss": diff, "se": se}
        human += (f"\n  held-out ({lm['before'].tokens:,} tokens): delta loss {lm['before'].delta_loss:.3f} -> "
                  f"{lm['after'].delta_loss:.3f} nats ({diff:+.3f} ± {se:.3f} paired), CE recovered "
                  f"{lm['before'].ce_loss_recovered:.1%} -> {lm['after'].ce_loss_recovered:.1%}")
    emit(result, as_json, human)


def _eval_table(out: dict) -> str:
    head = f"{'sae':<24} {'kind':<10} {'d_sae':>7} {'L0':>8} {'FVU':>7} {'cos':>6} {'dead':>6} {'dense':>6}"
    head += f" {'CE clean':>8} {'spliced':>8} {'ΔCE':>7} {'±se':>6} {'rec':>6} {'KL':>7}"
    lines = [f"held-out: {out['documents']} documents, {out['rows']:,} rows of {out['store']}", head]
    for r in out["results"]:
        line = (f"{r['name'][:24]:<24} {r['kind']:<10} {r['d_sae']:>7} {r['l0']:>8.1f} {r['fvu']:>7.4f} "
                f"{r['cosine']:>6.3f} {r['dead_fraction']:>6.1%} {r['dense_fraction']:>6.1%}")
        lm = r["lm"]
        if lm:
            line += (f" {lm['clean_ce']:>8.3f} {lm['spliced_ce']:>8.3f} {lm['delta_loss']:>7.3f} "
                     f"{lm['delta_loss_se']:>6.3f} {lm['ce_loss_recovered']:>6.3f} {lm['kl']:>7.4f}")
        lines.append(line)
    for r in out["results"]:
        sel = r.get("selectivity")
        if sel:
            probe = sel["probe"]
            lines.append(f"{r['name']}: selectivity over {sel['rows']:,} labelled rows; dead (<1e-5) "
                         f"{sel['dead_fraction']:.1%}; mean best max-selectivity {sel['mean_max_selectivity']:.3f}; "
                         f"probe balanced accuracy {probe.get('original', float('nan')):.3f} original vs "
                         f"{probe.get('reconstructed', float('nan')):.3f} reconstructed (chance {probe['chance']:.3f})")
            for lab in sel["labels"]:
                a = lab["above"]
                lines.append(f"  {lab['label']:<28} rows {lab['rows']:>7,}  features with max-sel >0.5: "
                             f"{a['maximum>0.5']:>4}  >0.2: {a['maximum>0.2']:>4}  avg-sel >0.5: {a['average>0.5']:>4}"
                             f"  >0.2: {a['average>0.2']:>4}")
    if out["html"]:
        lines.append(f"frontier written to {out['html']}")
    return "\n".join(lines)
