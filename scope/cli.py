"""The ``scope`` command. Every command that computes figures prints them as JSON with ``--json``."""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from scope.errors import ScopeError

app = typer.Typer(help="scope: mechanistic interpretability for Gemma-family models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
store_app = typer.Typer(help="Inspect and check activation stores.", no_args_is_help=True)
app.add_typer(store_app, name="store")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
ModelOpt = Annotated[str, typer.Option(help="gemma-3-270m (bundled), a Hugging Face id, a local folder or a .gguf file.")]


def friendly(fn):
    """Print a ScopeError as one clear line (no traceback) and exit with status 2.

    Ctrl-C and a full disk are what a newcomer meets most often mid-run; both say what to do next,
    since every long command (capture, training) resumes when re-run with the same arguments.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ScopeError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: nothing written so far is lost; re-run the same command to resume", err=True)
            raise typer.Exit(130) from None
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            typer.echo(f"error: no space left on the device while writing {err.filename or 'output'}; free some "
                       "space (or choose another --out) and re-run the same command to resume", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _emit(result: dict, as_json: bool, human: str) -> None:
    typer.echo(json.dumps(result, indent=2) if as_json else human)


@app.command()
@friendly
def hooks(model: ModelOpt = "gemma-3-270m", contains: Annotated[str, typer.Option(help="Only names containing this.")] = "",
          as_json: JsonOpt = False) -> None:
    """List the model's hook points."""
    from scope.hooks import hook_names
    from scope.models import load_model

    names = [n for n in hook_names(load_model(model)) if contains in n]
    _emit({"model": model, "hooks": names}, as_json, "\n".join(names))


@app.command()
@friendly
def cache(
    out: Annotated[str, typer.Option(help="Store folder or fsspec URL (created; resumed if interrupted).")],
    model: ModelOpt = "gemma-3-270m",
    hooks: Annotated[str, typer.Option(help="Comma-separated hook points.")] = "blocks.6.hook_resid_post",
    corpus: Annotated[str, typer.Option(help="wiki, bbc, tweets, a local .jsonl/.parquet/.csv/.txt file, or hf:NAME[:SPLIT].")] = "wiki",
    tokens: Annotated[int, typer.Option(help="Rows (token positions) to store.")] = 200_000,
    context: Annotated[int, typer.Option(help="Context window length, BOS included.")] = 128,
    dtype: Annotated[str, typer.Option(help="Store dtype: float32, bfloat16 or float16.")] = "float32",
    model_dtype: Annotated[Optional[str], typer.Option(help="Model dtype (default float32).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1… (default: cuda when present).")] = None,
    batch_size: Annotated[int, typer.Option(help="Context windows per forward pass.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the document order.")] = 0,
    include_bos: Annotated[bool, typer.Option(help="Keep BOS positions in the store.")] = False,
    shard_mb: Annotated[int, typer.Option(help="Approximate shard size in MiB.")] = 128,
    text_column: Annotated[str, typer.Option(help="Text column of a datasets source.")] = "text",
    label_column: Annotated[str, typer.Option(help="Label column of a datasets source.")] = "label",
    as_json: JsonOpt = False,
) -> None:
    """Capture activations of a model over a corpus into an activation store."""
    from scope.data import open_source
    from scope.models import load_model
    from scope.store import ActivationStore
    from scope.store.capture import capture_store, init_distributed

    if tokens <= 0:
        raise ScopeError(f"--tokens must be positive, got {tokens}")
    init_distributed()
    source = open_source(corpus, text_column=text_column, label_column=label_column)
    if device is None and "LOCAL_RANK" in os.environ:
        import torch

        device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu"
    m = load_model(model, dtype=model_dtype, device=device)
    excluded = ("eos", "pad") if include_bos else ("bos", "eos", "pad")
    t0 = time.time()
    capture_store(m, source, hooks.split(","), out, tokens, context=context, dtype=dtype,
                             batch_size=batch_size, seed=seed, excluded=excluded, shard_bytes=shard_mb << 20)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    info = ActivationStore(out, verify=False).info()
    info["seconds"] = round(time.time() - t0, 1)
    _emit(info, as_json, _describe(info))


def _describe(info: dict) -> str:
    hooks = ", ".join(f"{h} {v['shape']}" for h, v in info["hooks"].items())
    return (f"store {info['url']}: {info['rows']:,} rows from {info['documents']:,} documents of {info['corpus']} "
            f"({info['label_name'] or 'no'} labels), model {info['model']} ({info['model_dtype']}), "
            f"hooks {hooks}, dtype {info['dtype']}, {info['shards']} shard(s), {info['bytes'] / 2**20:.1f} MiB")


@store_app.command("info")
@friendly
def store_info(path: str, as_json: JsonOpt = False) -> None:
    """Rows, hooks, widths, dtype and corpus of a store."""
    from scope.store import ActivationStore

    info = ActivationStore(path, verify=False).info()
    _emit(info, as_json, _describe(info))


@store_app.command("verify")
@friendly
def store_verify(path: str, as_json: JsonOpt = False) -> None:
    """Check every shard's checksum; a corrupted shard is named."""
    from scope.store import ActivationStore

    store = ActivationStore(path)
    store.verify_all()
    _emit({"url": path, "shards": len(store.manifest.shards), "ok": True}, as_json,
          f"all {len(store.manifest.shards)} shard(s) of {path} match their checksums")


@store_app.command("import-saelens")
@friendly
def store_import_saelens(
    cache: Annotated[str, typer.Argument(help="A SAELens activation cache (the folder CacheActivationsRunner writes).")],
    out: Annotated[str, typer.Option(help="New store folder or fsspec URL.")],
    model: Annotated[Optional[str], typer.Option(help="Model the activations came from (default: the cache's config).")] = None,
    hook: Annotated[Optional[str], typer.Option(help="Hook column, when the cache holds several.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Convert a SAELens activation cache into a scope store (one document per sequence)."""
    from scope.store import ActivationStore
    from scope.store.saelens_cache import import_saelens_cache

    import_saelens_cache(cache, out, model=model, hook=hook, progress=not as_json)
    info = ActivationStore(out, verify=False).info()
    _emit(info, as_json, _describe(info))


@app.command()
@friendly
def train(
    config: Annotated[str, typer.Argument(help="A YAML config, e.g. sae_configs/gemma-3-270m-res-l6-jumprelu-16k.yaml.")],
    out: Annotated[str, typer.Option(help="Run folder: dictionaries, metrics.jsonl, checkpoint (resumed if present).")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key, e.g. trainer.lr=1e-4 (repeatable).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the dictionaries of a config on its activation store (capturing the store first if needed)."""
    from scope.store.capture import init_distributed
    from scope.training import ensure_store, last_metrics, load_config
    from scope.training import train as run_training

    init_distributed()
    cfg = load_config(config, set_ or [])
    ensure_store(cfg)
    t0 = time.time()
    saved = run_training(cfg, out)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    last = last_metrics(out)
    result = {"out": out, "seconds": round(time.time() - t0, 1),
              "dictionaries": {name: {"path": str(p), **{k.split("/", 1)[1]: v for k, v in last.items()
                                                        if k.startswith(name + "/")}} for name, p in saved.items()}}
    lines = [f"{n}: L0 {d.get('l0', float('nan')):.1f}, FVU {d.get('fvu', float('nan')):.3f} -> {d['path']}"
             for n, d in result["dictionaries"].items()]
    _emit(result, as_json, "\n".join(lines))


@app.command()
@friendly
def quickstart(
    out: Annotated[str, typer.Option(help="Folder for everything the quickstart writes.")] = "scope-out",
    tokens: Annotated[int, typer.Option(help="Tokens of text to capture.")] = 100_000,
    corpus: Annotated[str, typer.Option(help="Bundled corpus.")] = "wiki",
    d_sae: Annotated[int, typer.Option(help="Latents of the JumpReLU SAE.")] = 4096,
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
    _emit(done.to_dict(), as_json, summary)


@app.command("eval")
@friendly
def eval_(
    sae: Annotated[list[str], typer.Option(help="Dictionary folder (repeat --sae for a sweep).")],
    store: Annotated[str, typer.Option(help="Activation store folder or fsspec URL.")],
    held_out: Annotated[float, typer.Option(help="Fraction of documents held out (split by document, seed 0).")] = 0.1,
    lm_tokens: Annotated[int, typer.Option(help="Tokens of held-out text for the spliced-in LM loss.")] = 4096,
    no_lm: Annotated[bool, typer.Option("--no-lm", help="Skip the language-model loss (no model is loaded).")] = False,
    max_rows: Annotated[Optional[int], typer.Option(help="Cap on held-out rows for the reconstruction metrics.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1… (default: cuda when present).")] = None,
    html: Annotated[Optional[str], typer.Option(help="Write the L0-vs-FVU frontier of the SAEs to this HTML file.")] = None,
    labels: Annotated[Optional[list[str]], typer.Option(
        help="Also score feature selectivity and a label probe over documents with these labels "
             "(globs such as 'wiki:*'; repeat for more).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """L0, FVU, cosine, dead/dense latents and spliced-in LM loss of SAEs on a store's held-out documents."""
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
    _emit(out, as_json, _eval_table(out))


def _eval_table(out: dict) -> str:
    head = f"{'sae':<24} {'kind':<9} {'d_sae':>7} {'L0':>8} {'FVU':>7} {'cos':>6} {'dead':>6} {'dense':>6}"
    head += f" {'CE clean':>8} {'spliced':>8} {'ΔCE':>7} {'rec':>6} {'KL':>7}"
    lines = [f"held-out: {out['documents']} documents, {out['rows']:,} rows of {out['store']}", head]
    for r in out["results"]:
        line = (f"{r['name'][:24]:<24} {r['kind']:<9} {r['d_sae']:>7} {r['l0']:>8.1f} {r['fvu']:>7.4f} "
                f"{r['cosine']:>6.3f} {r['dead_fraction']:>6.1%} {r['dense_fraction']:>6.1%}")
        lm = r["lm"]
        if lm:
            line += (f" {lm['clean_ce']:>8.3f} {lm['spliced_ce']:>8.3f} {lm['delta_loss']:>7.3f} "
                     f"{lm['ce_loss_recovered']:>6.3f} {lm['kl']:>7.4f}")
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


import_app = typer.Typer(help="Bring dictionaries from other tools into scope's layout.", no_args_is_help=True)
export_app = typer.Typer(help="Write scope dictionaries in other tools' layouts.", no_args_is_help=True)
app.add_typer(import_app, name="import")
app.add_typer(export_app, name="export")


@import_app.command("gemma-scope")
@friendly
def import_gemma_scope(
    source: Annotated[str, typer.Argument(help="params.npz, a Gemma Scope 2 folder, or a hub repo such as google/gemma-scope-2b-pt-res.")],
    path_in_repo: Annotated[Optional[str], typer.Argument(help="With a hub repo: e.g. layer_20/width_16k/average_l0_71/params.npz.")] = None,
    out: Annotated[str, typer.Option(help="scope dictionary folder to write.")] = "",
    revision: Annotated[Optional[str], typer.Option()] = None,
    hook: Annotated[Optional[str], typer.Option(help="Hook the SAE reads, when it cannot be inferred.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model the SAE belongs to, when it cannot be inferred.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Import a Gemma Scope (or Gemma Scope 2) JumpReLU SAE."""
    from scope.dictionaries.interop import load_gemma_scope

    if not out:
        raise ScopeError("--out is required: the folder to write the scope dictionary to")
    sae = load_gemma_scope(source, path_in_repo, revision=revision, hook=hook, model=model)
    _saved(sae, sae.save(out), as_json)


@import_app.command("saelens")
@friendly
def import_saelens(folder: str, out: Annotated[str, typer.Option(help="scope dictionary folder to write.")],
                   as_json: JsonOpt = False) -> None:
    """Import a SAELens folder (cfg.json + sae_weights.safetensors)."""
    from scope.dictionaries.interop import from_saelens

    sae = from_saelens(folder)
    _saved(sae, sae.save(out), as_json)


@export_app.command("saelens")
@friendly
def export_saelens(sae: str, out: str, as_json: JsonOpt = False) -> None:
    """Write a dictionary in the SAELens layout, so SAE.load_from_disk opens it."""
    from scope.dictionaries.interop import load_any, to_saelens

    d = load_any(sae)
    _saved(d, to_saelens(d, out), as_json)


def _saved(sae, path, as_json: bool) -> None:
    info = {"path": str(path), "kind": sae.kind, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "hook": sae.cfg.hook,
            "model": sae.cfg.model}
    _emit(info, as_json, f"wrote {sae.kind} dictionary {sae.cfg.d_in}x{sae.cfg.d_sae} (hook {sae.cfg.hook}) to {path}")


@app.command()
@friendly
def push(folder: str, repo_id: str,
         path_in_repo: Annotated[Optional[str], typer.Option(help="Subfolder in the repo (default: the root).")] = None,
         private: Annotated[bool, typer.Option(help="Create the repo as private.")] = False,
         as_json: JsonOpt = False) -> None:
    """Upload a dictionary folder to a Hugging Face hub repo (token from HF_TOKEN or `hf auth login`)."""
    from scope.dictionaries.interop import push_to_hub

    url = push_to_hub(folder, repo_id, path_in_repo, private=private)
    _emit({"url": url}, as_json, f"pushed {folder} to {url}")


@app.command()
@friendly
def pull(repo_id: str, path_in_repo: Annotated[Optional[str], typer.Argument()] = None,
         revision: Annotated[Optional[str], typer.Option()] = None, as_json: JsonOpt = False) -> None:
    """Download a dictionary folder from a Hugging Face hub repo; prints the local folder."""
    from scope.dictionaries.interop import pull_from_hub

    path = pull_from_hub(repo_id, path_in_repo, revision)
    _emit({"path": str(path)}, as_json, str(path))


from scope.cli_analyze import analyze_app  # noqa: E402 (needs friendly, _emit and the option types above)

app.add_typer(analyze_app, name="analyze")
import scope.cli_dashboard  # noqa: E402,F401 (registers `scope dashboard`)

from scope.cli_steer import steer_app  # noqa: E402 (as above)

app.add_typer(steer_app, name="steer")


def main() -> None:  # pragma: no cover - console entry for `python -m scope`
    app(prog_name="scope")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
