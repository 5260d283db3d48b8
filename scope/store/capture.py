"""Capturing activations of a model over a text source into a store, resumably and on many ranks.

The shard plan is a pure function of the configuration: windows come in a fixed (seeded)
document order and are grouped greedily into shards of about ``shard_rows`` rows, the last one
cut at exactly ``tokens`` rows. Hence a killed capture re-run with the same arguments recomputes
only the shards without a sidecar (or whose crc32 no longer matches it) and ends with a store
identical to an uninterrupted run, a larger ``tokens`` appends shards after the existing ones, and
under ``torchrun`` rank r takes shards r, r + N, r + 2N, … of the same plan and rank 0 writes the
one manifest. One capture at a time holds a folder's lock file.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

import scope
from scope.data import Document, TextSource, Window, iter_windows, pad_token_id
from scope.errors import ScopeError
from scope.hooks import capture, check_hooks, is_pairwise
from scope.models import LoadedModel
from scope.store.fs import StoreFS
from scope.store.manifest import (Manifest, SourceInfo, StoreConfig, read_manifest, row_bytes, write_documents,
                                  write_manifest)
from scope.store.shards import read_sidecar, shard_intact, write_shard

STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EXCLUDABLE = ("bos", "eos", "pad")


@dataclass
class _PlannedShard:
    index: int
    first_window: int
    windows: list[Window] = field(default_factory=list)
    keep: list[list[int]] = field(default_factory=list)  # kept positions per window (exclusions, row budget)
    rows: int = 0

    def add(self, window: Window, keep: list[int]) -> None:
        self.windows.append(window)
        self.keep.append(keep)
        self.rows += len(keep)


def _excluded_ids(tokenizer, excluded: Sequence[str]) -> set[int]:
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    return {ids[k] for k in excluded if ids[k] is not None}


def _plan(windows: Iterator[Window], tokens: int, shard_rows: int, drop: set[int],
          fs: StoreFS) -> Iterator[tuple[_PlannedShard, object]]:
    """Yield (shard plan, completed sidecar or None) in order until ``tokens`` rows are planned."""
    rows = index = window_no = 0
    windows = iter(windows)
    while rows < tokens:
        done = read_sidecar(fs, index)
        if done is not None and not shard_intact(fs, done):  # kept shards are checked, a bad one recomputed
            print(f"scope: shard {index} of {fs.url()} failed its checksum; computing it again", flush=True)
            done = None
        # Windows are cut only by the token budget (or a completed shard's record), never at a shard
        # boundary: a shard may end up to one window over ``shard_rows``.
        limit = done.rows if done is not None else tokens - rows
        target = done.rows if done is not None else min(shard_rows, limit)
        shard = _PlannedShard(index, window_no)
        while shard.rows < target and (done is None or len(shard.windows) < done.n_windows):
            w = next(windows, None)
            if w is None:
                break
            shard.add(w, [i for i, t in enumerate(w.tokens) if t not in drop][: limit - shard.rows])
            window_no += 1
        if not shard.windows:
            return
        if done is not None and (done.first_window != shard.first_window or done.n_windows != len(shard.windows)):
            raise ScopeError(f"shard {index} on disk does not match the capture plan; the store folder was "
                             "changed by hand or by another scope version; capture into a new folder")
        rows += shard.rows
        index += 1
        yield shard, done
        if len(shard.windows) and shard.rows < target:  # the source ran out of text
            return


def _run_shard(model: LoadedModel, shard: _PlannedShard, hooks: list[str], shapes: dict[str, list[int]],
               dtype: torch.dtype, batch_size: int, pad_id: int, bar: tqdm | None) -> dict[str, torch.Tensor]:
    """Forward the shard's windows (batched by similar length) and gather the kept rows in window order."""
    offsets = [0]
    for keep in shard.keep:
        offsets.append(offsets[-1] + len(keep))
    cols = {h: torch.empty((shard.rows, *shapes[h]), dtype=dtype) for h in hooks}
    order = sorted(range(len(shard.windows)), key=lambda i: len(shard.windows[i].tokens))
    for a in range(0, len(order), batch_size):
        idx = order[a : a + batch_size]
        length = max(len(shard.windows[i].tokens) for i in idx)
        toks = torch.full((len(idx), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for r, i in enumerate(idx):
            t = shard.windows[i].tokens
            toks[r, : len(t)] = torch.tensor(t)
            mask[r, : len(t)] = 1
        acts = capture(model, toks, hooks, attention_mask=mask)
        # One gather per hook and batch: (batch row, position) pairs to their rows in the shard.
        src_r = torch.tensor([r for r, i in enumerate(idx) for _ in shard.keep[i]])
        src_p = torch.tensor([p for i in idx for p in shard.keep[i]])
        dest = torch.tensor([offsets[i] + j for i in idx for j in range(len(shard.keep[i]))])
        for h in hooks:
            cols[h][dest] = acts[h][src_r.to(acts[h].device), src_p.to(acts[h].device)].to(dtype).cpu()
        if bar is not None:
            bar.update(len(dest))
    if dtype == torch.float16:
        for h, x in cols.items():
            if not torch.isfinite(x).all():
                raise ScopeError(f"activations of {h} overflow float16 (|x| > 65504; Gemma's residual stream "
                                 "has massive activations); capture with --dtype bfloat16 or float32")
    cols["token_id"] = torch.tensor([w.tokens[k] for w, ks in zip(shard.windows, shard.keep) for k in ks], dtype=torch.int32)
    cols["doc_id"] = torch.tensor([w.doc_id for w, ks in zip(shard.windows, shard.keep) for _ in ks], dtype=torch.int64)
    cols["position"] = torch.tensor([k for ks in shard.keep for k in ks], dtype=torch.int32)
    return cols


def row_shapes(model: LoadedModel, hooks: Sequence[str]) -> dict[str, list[int]]:
    """Per-row shape of each hook, from a two-token probe forward."""
    bad = [h for h in hooks if is_pairwise(h)]
    if bad:
        raise ScopeError(f"{bad} are per query-key pair, not per token, so a store cannot hold them; capture "
                         "them with scope.hooks.capture, or store q/k (blocks.L.attn.hook_q/hook_k) instead")
    probe = torch.tensor([[model.tokenizer.bos_token_id, model.tokenizer.bos_token_id]])
    acts = capture(model, probe, hooks)
    return {h: list(acts[h].shape[2:]) for h in hooks}


def capture_store(
    model: LoadedModel,
    source: TextSource,
    hooks: Sequence[str] | str,
    out: str,
    tokens: int,
    context: int = 128,
    dtype: str = "float32",
    batch_size: int = 32,
    seed: int = 0,
    excluded: Sequence[str] = ("bos", "eos", "pad"),
    shard_bytes: int = 128 << 20,
    progress: bool = True,
) -> Manifest:
    """Capture ``tokens`` rows of the given hooks into the store at ``out`` (resuming or appending)."""
    if not isinstance(tokens, int) or tokens <= 0:
        raise ScopeError(f"--tokens must be a positive whole number, got {tokens!r}")
    if dtype not in STORE_DTYPES:
        raise ScopeError(f"unknown store dtype {dtype!r}; use one of {sorted(STORE_DTYPES)}")
    if batch_size <= 0:
        raise ScopeError(f"batch size must be positive, got {batch_size}")
    bad = [e for e in excluded if e not in _EXCLUDABLE]
    if bad:
        raise ScopeError(f"cannot exclude {bad}; excludable token kinds are {list(_EXCLUDABLE)}")
    hooks = check_hooks(model, hooks)
    shapes = row_shapes(model, hooks)
    config = StoreConfig(
        model=model.spec, model_revision=model.facts.revision, model_dtype=str(model.dtype).removeprefix("torch."),
        hooks=shapes, dtype=dtype,
        source=SourceInfo(spec=source.spec, fingerprint=source.fingerprint, label_name=source.label_name),
        seed=seed, context=context, excluded=sorted(excluded),
        shard_rows=max(1, shard_bytes // row_bytes(shapes, dtype)),
    )
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    docs = source.documents(seed)  # a bad corpus fails here, before the folder is touched
    fs = StoreFS(out)
    with capture_lock(fs, rank):
        _claim(fs, config, tokens, rank, world)
        return _capture(model, fs, config, docs, tokens, batch_size, progress, rank, world)


def _capture(model: LoadedModel, fs: StoreFS, config: StoreConfig, docs: list[Document], tokens: int,
             batch_size: int, progress: bool, rank: int, world: int) -> Manifest:
    """The capture itself, into a folder already claimed: plan, forward, write, then the manifest."""
    hooks, shapes, context, dtype = list(config.hooks), config.hooks, config.context, config.dtype
    labels = {d.doc_id: d.label for d in docs}
    drop = _excluded_ids(model.tokenizer, config.excluded)
    pad_id = pad_token_id(model.tokenizer)
    already = sum(info.rows for info in (read_sidecar(fs, i) for i in range(len(fs.listdir("shards")))) if info)
    bar = tqdm(total=max(0, tokens - already) // world, desc=f"capture rank {rank}" if world > 1 else "capture",
               unit="tok", disable=not progress, position=rank, dynamic_ncols=True)
    doc_rows: dict[int, tuple[str | None, int]] = {}
    n_shards = 0
    # The plan streams: windows are tokenised as needed and dropped once their shard is written.
    with ThreadPoolExecutor(max_workers=1) as pool:  # the write of shard i overlaps the forward of shard i+1
        pending: Future | None = None
        for shard, done in _plan(iter_windows(model.tokenizer, docs, context), tokens, config.shard_rows, drop, fs):
            n_shards += 1
            for w, keep in zip(shard.windows, shard.keep):
                lab, n = doc_rows.get(w.doc_id, (labels[w.doc_id], 0))
                doc_rows[w.doc_id] = (lab, n + len(keep))
            if done is None and shard.index % world == rank:
                cols = _run_shard(model, shard, hooks, shapes, STORE_DTYPES[dtype], batch_size, pad_id, bar)
                if pending is not None:  # at most one shard waits to be written: memory stays bounded
                    pending.result()
                pending = pool.submit(write_shard, fs, shard.index, cols, shard.first_window, len(shard.windows), rank)
        if pending is not None:
            pending.result()
    bar.close()
    if world > 1:
        dist.barrier()
    manifest = read_manifest(fs)
    if rank == 0:
        infos = [read_sidecar(fs, i) for i in range(n_shards)]
        missing = [i for i, info in enumerate(infos) if info is None]
        if missing:
            raise ScopeError(f"shard(s) {missing} are missing after capture; re-run the same command to finish them")
        write_documents(fs, doc_rows)
        manifest = Manifest(config=config, tokens_requested=tokens, complete=True, shards=infos,
                            world_size=world, scope_version=scope.__version__)
        write_manifest(fs, manifest)
    if world > 1:
        dist.barrier()
        manifest = read_manifest(fs)
    if manifest.rows < tokens and rank == 0:
        print(f"scope: the source ran out after {manifest.rows} of {tokens} requested tokens", flush=True)
    return manifest


def _claim(fs: StoreFS, config: StoreConfig, tokens: int, rank: int, world: int) -> None:
    """Refuse a folder made with another configuration; otherwise mark it as ours (incomplete)."""
    existing = read_manifest(fs)
    if existing is None and fs.exists() and [p for p in fs.listdir() if not p.startswith(".")]:
        raise ScopeError(f"output folder {fs.url()!r} exists and is not a scope store; choose an empty or new folder")
    if existing is not None and not existing.complete and not existing.shards and not [
            n for n in fs.listdir("shards") if n.endswith(".json")]:
        existing = None  # a capture that failed before its first shard left only its manifest: take the folder over
    if existing is not None:
        diff = existing.config.differences(config)
        if diff:
            raise ScopeError(f"output folder {fs.url()!r} holds a store made with a different configuration "
                             f"({'; '.join(diff)}); it is never overwritten: choose another --out")
        if existing.complete and tokens < existing.tokens_requested:
            raise ScopeError(f"store {fs.url()!r} already holds {existing.rows} tokens (asked for {tokens}); "
                             "a store only grows: ask for at least as many tokens, or use a new --out")
    if world > 1:
        dist.barrier()  # every rank has checked before rank 0 rewrites the manifest
    if rank == 0:
        fs.makedirs("shards")
        old = existing.shards if existing is not None else []
        write_manifest(fs, Manifest(config=config, tokens_requested=tokens, complete=False, shards=old,
                                    world_size=world, scope_version=scope.__version__))
    if world > 1:
        dist.barrier()


LOCK = ".scope-cache.lock"
LOCK_OWNER = ".scope-cache.owner"


@contextmanager
def capture_lock(fs: StoreFS, rank: int = 0) -> Iterator[None]:
    """Hold a store folder's lock for one capture; if another process holds it, refuse at once and name it.

    Rank 0 takes it for all ranks of a torchrun capture. Remote (fsspec) folders offer no file lock, so
    only local folders are locked.
    """
    if rank != 0 or not fs.is_local:
        yield
        return
    fs.makedirs()
    lock = FileLock(fs.path(LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ScopeError(f"store folder {fs.url()!r} is being written by another capture ({_lock_owner(fs)}); "
                         "wait for it to finish, or stop it and re-run this command to resume") from None
    try:
        # The lock file is the library's; who holds it goes beside it, for the message above.
        fs.write_atomic(LOCK_OWNER, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        yield
    finally:
        fs.remove(LOCK_OWNER)
        lock.release()


def _lock_owner(fs: StoreFS) -> str:
    try:
        owner = json.loads(fs.read_bytes(LOCK_OWNER))
        return f"process {owner['pid']} on {owner['host']}, since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written it yet
        return "a process that has just started"


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed() -> None:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPUs)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        # Left to the interpreter's teardown, gloo's threads can outlive the group and abort the process
        # ("terminate called without an active exception") after the work is done: tear it down first.
        atexit.register(_leave_group)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
