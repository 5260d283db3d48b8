"""Capturing activation stores and inspecting them: ``scope hooks``, ``scope cache``, ``scope store ...``.

The top-level commands here are plain functions; scope/cli/__init__.py adds them to ``scope``.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Optional

import typer

from scope.cli.common import DeviceOpt, JsonOpt, ModelDtypeOpt, ModelOpt, emit, friendly
from scope.errors import ScopeError

store_app = typer.Typer(help="Inspect and check activation stores.", no_args_is_help=True)


@friendly
def hooks(model: ModelOpt = "gemma-3-270m", contains: Annotated[str, typer.Option(help="Only names containing this.")] = "",
          as_json: JsonOpt = False) -> None:
    """List the model's hook points."""
    from scope.hooks import hook_names
    from scope.models import load_model

    names = hook_names(load_model(model), contains)
    emit({"model": model, "hooks": names}, as_json, "\n".join(names))


@friendly
def cache(
    out: Annotated[str, typer.Option(help="Store folder or fsspec URL (created; resumed if interrupted).")],
    model: ModelOpt = "gemma-3-270m",
    hooks: Annotated[str, typer.Option(help="Comma-separated hook points.")] = "blocks.6.hook_resid_post",
    corpus: Annotated[str, typer.Option(help="wiki, bbc, tweets, a local .jsonl/.parquet/.csv/.txt file, or hf:NAME[:SPLIT].")] = "wiki",
    tokens: Annotated[int, typer.Option(help="Rows (token positions) to store.")] = 200_000,
    context: Annotated[int, typer.Option(help="Context window length, BOS included.")] = 128,
    dtype: Annotated[str, typer.Option(help="Store dtype: float32, bfloat16 or float16.")] = "float32",
    model_dtype: ModelDtypeOpt = None,
    device: DeviceOpt = None,
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
    emit(info, as_json, _describe(info))


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
    emit(info, as_json, _describe(info))


@store_app.command("verify")
@friendly
def store_verify(path: str, as_json: JsonOpt = False) -> None:
    """Check every shard's checksum; a corrupted shard is named."""
    from scope.store import ActivationStore

    store = ActivationStore(path)
    store.verify_all()
    emit({"url": path, "shards": len(store.manifest.shards), "ok": True}, as_json,
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
    emit(info, as_json, _describe(info))
