"""Throughput of scope's capture and store-read paths against bare baselines, in one run.

1. Capture: tokens/s of ``capture_store`` end to end (tokenising, forwards, gathering the kept
   rows, writing shards and manifest) versus the bare early-stopped bridge forward
   ``bridge(tokens, attention_mask=mask, stop_at_layer=L + 1, return_type=None)`` under
   ``torch.inference_mode`` over the very same padded batches: capture_store's own shard plan
   of the same windows, sorted by length within each shard, same batch size. Target >= 0.9.
2. Read: bytes/s of ``ActivationStore.batches(hook, shuffle=True)`` versus plain sequential
   reads (16 MiB blocks) of every shard file, both from a warm page cache (every file is read
   once before anything is timed). Pass 1 includes scope's per-shard crc32 check; pass 2 is a
   second epoch on the same ActivationStore (shards already verified). The store read is a
   synthetic one of ``--read-mb`` MiB written with scope's own writer, shaped like the captured
   one (``--read-mb 0`` reads the captured store itself). Target >= 0.8.

Timings are the best of ``--repeat`` runs (read) and ``--capture-repeat`` runs (capture). On a
shared CPU, ``--threads 1`` gives steadier numbers (torch's OpenMP threads stall when a core is busy).

Run:  python benchmarks/capture.py [--json] [--tokens N] [--read-mb MB] [--model-dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from math import prod
from pathlib import Path

import torch

import scope
from scope.data import iter_windows, open_source
from scope.models import load_model
from scope.store import ActivationStore, Manifest, capture_store
from scope.store.capture import STORE_DTYPES, _excluded_ids, _plan, row_shapes
from scope.store.fs import StoreFS
from scope.store.manifest import write_manifest
from scope.store.shards import write_shard

CAPTURE_TARGET, READ_TARGET = 0.9, 0.8


def planned_batches(model, source, out: str, tokens: int, context: int, batch_size: int, shard_rows: int):
    """The padded (tokens, mask) batches capture_store will forward into ``out``, and the rows it keeps."""
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    windows = iter_windows(tok, source.documents(0), context)
    batches, rows = [], 0
    for shard, _ in _plan(windows, tokens, shard_rows, _excluded_ids(tok, ("bos", "eos", "pad")), StoreFS(out)):
        rows += shard.rows
        ws = sorted(shard.windows, key=lambda w: len(w.tokens))
        for a in range(0, len(ws), batch_size):
            group = ws[a : a + batch_size]
            toks = torch.full((len(group), max(len(w.tokens) for w in group)), pad, dtype=torch.long)
            mask = torch.zeros_like(toks)
            for r, w in enumerate(group):
                toks[r, : len(w.tokens)] = torch.tensor(w.tokens)
                mask[r, : len(w.tokens)] = 1
            batches.append((toks, mask))
    return batches, rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def bare_forward(model, batches, stop: int) -> None:
    for toks, mask in batches:
        model.bridge(toks.to(model.device), attention_mask=mask.to(model.device), stop_at_layer=stop, return_type=None)
    sync(model.device)


def synthetic_store(path: str, like: Manifest, mb: int, shard_mb: int = 128) -> None:
    """A store with ``like``'s hooks and dtype, about ``mb`` MiB of random rows, written by scope's writer."""
    cfg = like.config
    dtype = STORE_DTYPES[cfg.dtype]
    row_bytes = sum(prod(s) for s in cfg.hooks.values()) * dtype.itemsize + 16
    total, per_shard = (mb << 20) // row_bytes, (shard_mb << 20) // row_bytes
    fs, infos, g = StoreFS(path), [], torch.Generator().manual_seed(0)
    for i, a in enumerate(range(0, total, per_shard)):
        n = min(per_shard, total - a)
        cols = {h: torch.randn(n, *s, generator=g).to(dtype) for h, s in cfg.hooks.items()}
        cols |= {"token_id": torch.randint(0, 262144, (n,), generator=g, dtype=torch.int32),
                 "doc_id": torch.arange(a, a + n) // 100, "position": (torch.arange(n) % 127 + 1).int()}
        infos.append(write_shard(fs, i, cols, first_window=a // 100, n_windows=n // 100, rank=0))
    write_manifest(fs, Manifest(config=cfg.model_copy(update={"shard_rows": per_shard}), tokens_requested=total,
                                complete=True, shards=infos, scope_version=scope.__version__))


def plain_read(files: list[Path], block: int = 16 << 20) -> int:
    n = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(block):
                n += len(chunk)
    return n


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench_capture(args, model, source, tmp: str) -> tuple[dict, Manifest]:
    layer = int(args.hook.split(".")[1])
    row_bytes = prod(row_shapes(model, [args.hook])[args.hook]) * 4 + 16  # float32 rows, as capture_store sizes shards
    batches, rows = planned_batches(model, source, f"{tmp}/captured-0", args.tokens, args.context,
                                    args.batch_size, max(1, (128 << 20) // row_bytes))
    bare_forward(model, batches[-1:], layer + 1)  # warm-up on the longest batch
    t_bare, t_scope = [], []
    for r in range(args.capture_repeat):
        t_bare.append(timed(bare_forward, model, batches, layer + 1)[0])
        t, manifest = timed(lambda: capture_store(model, source, [args.hook], f"{tmp}/captured-{r}", args.tokens,
                                                  context=args.context, dtype="float32",
                                                  batch_size=args.batch_size, progress=False))
        t_scope.append(t)
        assert manifest.rows == rows, (manifest.rows, rows)
    tb, ts = min(t_bare), min(t_scope)
    return {"tokens": rows, "forwarded_tokens": sum(t.numel() for t, _ in batches), "batches": len(batches),
            "batch_size": args.batch_size, "context": args.context, "bare_s": tb, "scope_s": ts,
            "bare_tok_s": rows / tb, "scope_tok_s": rows / ts, "ratio": tb / ts, "target": CAPTURE_TARGET,
            "ok": tb / ts >= CAPTURE_TARGET}, manifest


def bench_read(args, store_dir: str) -> dict:
    files = [Path(store_dir) / s.name for s in ActivationStore(store_dir).manifest.shards]
    nbytes = plain_read(files)  # warm the page cache, so every timed read below is served from memory
    kw = dict(batch_size=args.read_batch, shuffle=True, buffer_rows=args.buffer_rows)
    t_plain, t_p1, t_p2, t_seq = [], [], [], []
    for _ in range(args.repeat):
        t_plain.append(timed(plain_read, files)[0])
        store = ActivationStore(store_dir)  # a fresh store verifies each shard on first read (pass 1)
        for times in (t_p1, t_p2):
            t, n = timed(lambda: sum(x.shape[0] for x in store.batches(args.hook, **kw)))
            assert n == len(store), (n, len(store))
            times.append(t)
        # The same bytes in store order through the same API (fresh batch tensors, no shuffling).
        t_seq.append(timed(lambda: sum(x.shape[0] for x in store.batches(args.hook, **{**kw, "shuffle": False})))[0])
    tp, t1, t2, ts = min(t_plain), min(t_p1), min(t_p2), min(t_seq)
    return {"bytes": nbytes, "shards": len(files), "rows": len(store), "batch_size": args.read_batch,
            "buffer_rows": args.buffer_rows, "page_cache": "warm for both (every file read once before timing)",
            "plain_mb_s": nbytes / tp / 1e6, "pass1_mb_s": nbytes / t1 / 1e6, "pass2_mb_s": nbytes / t2 / 1e6,
            "ratio_pass1": tp / t1, "ratio_pass2": tp / t2, "target": READ_TARGET,
            "sequential_batches_mb_s": nbytes / ts / 1e6, "ratio_pass2_vs_sequential_batches": ts / t2,
            "ok_pass1": tp / t1 >= READ_TARGET, "ok_pass2": tp / t2 >= READ_TARGET}


def run(args) -> dict:
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=args.model_dtype, device=args.device)
    res = {"model": args.model, "model_dtype": args.model_dtype, "device": str(model.device),
           "torch_threads": torch.get_num_threads(), "hook": args.hook, "corpus": args.corpus}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="scope-bench-") as tmp:
        res["capture"], manifest = bench_capture(args, model, open_source(args.corpus), tmp)
        res["peak_rss_mb_capture"] = peak_rss_mb()
        store_dir = f"{tmp}/captured-0"
        if args.read_mb > 0:
            store_dir = f"{tmp}/synthetic"
            synthetic_store(store_dir, manifest, args.read_mb)
        res["read"] = bench_read(args, store_dir)
        res["read"]["store"] = "synthetic" if args.read_mb > 0 else "captured"
    res["peak_rss_mb"] = peak_rss_mb()
    res["runtime_s"] = time.perf_counter() - t0
    return res


def report(r: dict) -> str:
    c, d = r["capture"], r["read"]
    ok = lambda x: "PASS" if x else "FAIL"  # noqa: E731
    return "\n".join([
        f"scope benchmark: {r['model']} ({r['model_dtype']}) on {r['device']}, {r['torch_threads']} torch threads",
        f"capture {r['hook']} from {r['corpus']}: {c['tokens']:,} tokens ({c['forwarded_tokens']:,} forwarded with "
        f"BOS and padding), {c['batches']} batches of <= {c['batch_size']} windows, context {c['context']}",
        f"  bare bridge forward (early-stopped)  {c['bare_tok_s']:10,.0f} tok/s  {c['bare_s']:7.2f} s",
        f"  scope capture_store (end to end)     {c['scope_tok_s']:10,.0f} tok/s  {c['scope_s']:7.2f} s",
        f"  ratio {c['ratio']:.3f}  (target >= {c['target']})  {ok(c['ok'])}",
        f"read {d['store']} store: {d['bytes'] / 2**20:,.0f} MiB in {d['shards']} shards, {d['rows']:,} rows, "
        f"batch {d['batch_size']}, buffer {d['buffer_rows']:,} rows",
        f"  page cache {d['page_cache']}",
        f"  sequential file reads (16 MiB)       {d['plain_mb_s']:10,.0f} MB/s",
        f"  batches() pass 1 (crc32 check)       {d['pass1_mb_s']:10,.0f} MB/s  ratio {d['ratio_pass1']:.3f}"
        f"  (target >= {d['target']})  {ok(d['ok_pass1'])}",
        f"  batches() pass 2 (verified)          {d['pass2_mb_s']:10,.0f} MB/s  ratio {d['ratio_pass2']:.3f}"
        f"  (target >= {d['target']})  {ok(d['ok_pass2'])}",
        f"  batches(shuffle=False), same API     {d['sequential_batches_mb_s']:10,.0f} MB/s  shuffled/ordered "
        f"{d['ratio_pass2_vs_sequential_batches']:.3f}",
        f"peak RSS {r['peak_rss_mb']:,.0f} MiB (after capture {r['peak_rss_mb_capture']:,.0f} MiB); "
        f"runtime {r['runtime_s']:.0f} s (from model load)",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--hook", default="blocks.6.hook_resid_post")
    p.add_argument("--corpus", default="wiki")
    p.add_argument("--tokens", type=int, default=40_000, help="tokens captured (and forwarded bare)")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--capture-repeat", type=int, default=1, help="capture timings: best of N")
    p.add_argument("--read-mb", type=int, default=512, help="synthetic store size to read; 0: the captured store")
    p.add_argument("--read-batch", type=int, default=4096)
    p.add_argument("--buffer-rows", type=int, default=1 << 16)
    p.add_argument("--repeat", type=int, default=3, help="read timings: best of N")
    p.add_argument("--workdir", default=None, help="folder for the temporary stores (default: system temp)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
