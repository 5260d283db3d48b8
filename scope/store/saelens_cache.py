"""Importing a SAELens activation cache (the ``datasets`` folder ``CacheActivationsRunner`` writes) as a store.

A SAELens cache holds one row per sequence: a column named after the hook point with an
``Array2D [context, d_in]`` of activations and, usually, ``token_ids [context]``. Each sequence
becomes one document of the store (SAELens keeps no document labels), each position one row, and
no position is excluded, so the store's own token ids rebuild its context windows exactly
(:func:`scope.store.windows.store_windows`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import scope
from scope.errors import ScopeError, first_line
from scope.files import read_json
from scope.store.fs import StoreFS
from scope.store.manifest import (SAELENS_PREFIX, Manifest, SourceInfo, StoreConfig, read_manifest, row_bytes,
                                   write_documents, write_manifest)
from scope.store.shards import write_shard

RUNNER_CONFIG = "cache_activations_runner_cfg.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def import_saelens_cache(cache: str | Path, out: str, model: str | None = None, hook: str | None = None,
                         shard_bytes: int = 128 << 20, progress: bool = True) -> Manifest:
    """Convert the SAELens activation cache at ``cache`` into a scope store at ``out``."""
    import datasets

    cache = Path(cache)
    try:
        ds = datasets.load_from_disk(str(cache))
    except (FileNotFoundError, ValueError) as err:
        raise ScopeError(f"{str(cache)!r} is not a SAELens activation cache (a `datasets` folder saved with "
                         f"save_to_disk): {first_line(err)}") from err
    runner = read_json(cache / RUNNER_CONFIG) if (cache / RUNNER_CONFIG).exists() else {}
    hook = hook or runner.get("hook_name") or _only_hook(ds.column_names, cache)
    if hook not in ds.column_names:
        raise ScopeError(f"SAELens cache {str(cache)!r} has no column {hook!r}; its columns are {ds.column_names}")
    if "token_ids" not in ds.column_names:
        raise ScopeError(f"SAELens cache {str(cache)!r} has no token_ids column; a store needs the token of every "
                         "row (re-cache with a SAELens version that saves token_ids)")
    model = model or runner.get("model_name")
    if not model:
        raise ScopeError(f"SAELens cache {str(cache)!r} does not say which model it came from; pass --model")
    feature = ds.features[hook]
    context, d_in = feature.shape
    dtype = feature.dtype if feature.dtype in _DTYPES else "float32"
    config = StoreConfig(
        model=model, model_revision=runner.get("model_revision"), model_dtype=str(runner.get("dtype", "float32")),
        hooks={hook: [d_in]}, dtype=dtype,
        source=SourceInfo(spec=f"{SAELENS_PREFIX}{cache.resolve()}", fingerprint=ds._fingerprint, label_name=None),
        seed=0, context=context, excluded=[], shard_rows=max(1, shard_bytes // row_bytes({hook: [d_in]}, dtype)),
    )
    fs = StoreFS(out)
    existing = read_manifest(fs)
    if existing is not None and existing.complete:
        if existing.config == config:
            return existing  # the same import again: nothing to do
        raise ScopeError(f"output folder {fs.url()!r} holds a different store ({'; '.join(existing.config.differences(config))}); "
                         "import into a new folder")
    if fs.exists() and [p for p in fs.listdir() if not p.startswith(".")]:
        raise ScopeError(f"output folder {fs.url()!r} is not empty; import into a new folder")
    fs.makedirs("shards")
    per_shard = max(1, config.shard_rows // context)
    infos = []
    view = ds.with_format("numpy", columns=[hook, "token_ids"])
    bar = tqdm(total=len(ds) * context, desc="import", unit="tok", disable=not progress, dynamic_ncols=True)
    for index, first in enumerate(range(0, len(ds), per_shard)):
        part = view[first : first + per_shard]
        acts, toks = np.asarray(part[hook]), np.asarray(part["token_ids"])
        n = acts.shape[0]
        cols = {hook: torch.from_numpy(acts.reshape(n * context, d_in)).to(_DTYPES[dtype]),
                "token_id": torch.from_numpy(toks.reshape(-1).astype(np.int32)),
                "doc_id": torch.arange(first, first + n, dtype=torch.int64).repeat_interleave(context),
                "position": torch.arange(context, dtype=torch.int32).repeat(n)}
        infos.append(write_shard(fs, index, cols, first, n, rank=0))
        bar.update(n * context)
    bar.close()
    write_documents(fs, {d: (None, context) for d in range(len(ds))})
    manifest = Manifest(config=config, tokens_requested=len(ds) * context, complete=True, shards=infos,
                        scope_version=scope.__version__)
    write_manifest(fs, manifest)
    return manifest


def _only_hook(columns: list[str], cache: Path) -> str:
    hooks = [c for c in columns if c != "token_ids"]
    if len(hooks) != 1:
        raise ScopeError(f"SAELens cache {str(cache)!r} has columns {columns}; pass the hook column with --hook")
    return hooks[0]
