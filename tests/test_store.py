"""The activation store: exact round trips, resume, corruption, splits, shuffling, memory bounds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scope.data import open_source
from scope.errors import ScopeError
from scope.store import ActivationStore, capture_store
from scope.store.fs import StoreFS
from scope.store.manifest import Manifest, SourceInfo, StoreConfig, write_documents, write_manifest
from scope.store.shards import write_shard

HOOK = "blocks.6.hook_resid_post"


def synthetic_store(url: str, rows_per_shard: list[int], width: int = 16, dtype=torch.float32, seed: int = 0,
                    docs_per_shard: int = 4, hooks: tuple[str, ...] = ("x",)) -> dict[str, torch.Tensor]:
    """Write a store with scope's own writer from known random data; return the data written."""
    fs = StoreFS(url)
    g = torch.Generator().manual_seed(seed)
    infos, parts, doc_rows, first_doc = [], [], {}, 0
    for i, n in enumerate(rows_per_shard):
        cols = {
            **{h: (torch.randn(n, width, generator=g) * 100).to(dtype) for h in hooks},
            "token_id": torch.randint(0, 1000, (n,), generator=g, dtype=torch.int32),
            "doc_id": first_doc + torch.arange(n, dtype=torch.int64) * docs_per_shard // n,
            "position": torch.arange(n, dtype=torch.int32) % 64,
        }
        first_doc += docs_per_shard
        for d in cols["doc_id"].tolist():
            lab, c = doc_rows.get(d, (f"label{d % 3}", 0))
            doc_rows[d] = (lab, c + 1)
        infos.append(write_shard(fs, i, cols, first_window=i, n_windows=1, rank=0))
        parts.append(cols)
    cfg = StoreConfig(model="synthetic", model_revision=None, model_dtype="float32", hooks={h: [width] for h in hooks},
                      dtype=str(dtype).removeprefix("torch."), source=SourceInfo(spec="synthetic", fingerprint="0"),
                      seed=0, context=64, excluded=["bos"], shard_rows=max(rows_per_shard))
    write_documents(fs, doc_rows)
    write_manifest(fs, Manifest(config=cfg, tokens_requested=sum(rows_per_shard), complete=True, shards=infos))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_synthetic_round_trip_is_bit_exact(tmp_path, dtype):
    data = synthetic_store(str(tmp_path / "s"), [100, 37, 250], dtype=dtype)
    store = ActivationStore(str(tmp_path / "s"))
    got = list(store.rows("x", batch_size=64, shuffle=False))
    x = torch.cat([b.acts["x"] for b in got])
    assert x.dtype == dtype
    assert torch.equal(x.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       data["x"].view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert torch.equal(torch.cat([b.doc_id for b in got]), data["doc_id"])
    assert torch.equal(torch.cat([b.token_id for b in got]), data["token_id"])


def test_shuffled_reads_are_a_seeded_permutation_in_bounded_batches(tmp_path):
    data = synthetic_store(str(tmp_path / "s"), [300, 300, 300, 101])
    store = ActivationStore(str(tmp_path / "s"))
    read = lambda seed: torch.cat(list(store.batches("x", batch_size=50, buffer_rows=200, seed=seed)))
    a, b, c = read(0), read(0), read(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == data["x"].shape and not torch.equal(a, data["x"])
    # Every row exactly once: sort rows lexicographically by their first column (random floats, distinct).
    assert torch.equal(a[a[:, 0].argsort()], data["x"][data["x"][:, 0].argsort()])
    # Rows from different shards are mixed within a batch.
    first = next(store.rows("x", batch_size=50, buffer_rows=200, seed=0))
    assert len(set((first.doc_id // 4).tolist())) > 1


def test_fsspec_memory_url_round_trip():
    data = synthetic_store("memory://scope-test/store", [40, 60])
    store = ActivationStore("memory://scope-test/store")
    x = torch.cat(list(store.batches("x", batch_size=32, shuffle=False)))
    assert torch.equal(x, data["x"])
    assert store.info()["rows"] == 100


@pytest.mark.parametrize("where", ["local", "memory"])
def test_take_reads_rows_by_their_place_in_the_view_in_the_order_asked(tmp_path, where):
    url = str(tmp_path / "s") if where == "local" else "memory://scope-test/take"
    data = synthetic_store(url, [50, 0, 73, 40], docs_per_shard=5)
    store = ActivationStore(url)
    idx = [162, 0, 5, 5, 49, 50, 51, 122, 123]
    got = store.take(idx, "x")
    assert torch.equal(got.acts["x"], data["x"][idx]) and torch.equal(got.doc_id, data["doc_id"][idx])
    meta = store.take(idx, hooks=[])
    assert meta.acts == {} and torch.equal(meta.token_id, data["token_id"][idx])
    view = store.select([1, 6, 7, 14])  # a document view numbers its own rows in store order
    keep = torch.isin(data["doc_id"], torch.tensor([1, 6, 7, 14]))
    ordered = torch.cat([b.acts["x"] for b in view.rows("x", batch_size=16, shuffle=False)])
    assert torch.equal(ordered, data["x"][keep])
    pick = [len(view) - 1, 0, 3, len(view) // 2]
    assert torch.equal(view.take(pick, "x").acts["x"], ordered[pick])
    with pytest.raises(ScopeError, match="row index out of range.*163 rows"):
        store.take([163])
    assert len(store.take([], "x").doc_id) == 0


def test_split_by_document_and_label_filter(tmp_path):
    synthetic_store(str(tmp_path / "s"), [200, 200, 200], docs_per_shard=20)
    store = ActivationStore(str(tmp_path / "s"))
    train, test = store.split(held_out=0.25, seed=0)
    assert set(train.documents).isdisjoint(test.documents)
    assert set(train.documents) | set(test.documents) == set(store.documents)
    assert len(train) + len(test) == len(store) == 600
    test_docs = torch.cat([b.doc_id for b in test.rows("x", batch_size=64)])
    assert set(test_docs.tolist()) == set(test.documents) and len(test_docs) == len(test)
    only = store.where("label1")
    docs = torch.cat([b.doc_id for b in only.rows("x", batch_size=64)])
    assert docs.numel() == len(only) > 0 and all(d % 3 == 1 for d in docs.tolist())
    with pytest.raises(ScopeError, match="nolabel"):
        store.where("nolabel")


def test_corrupted_shard_is_named(tmp_path):
    synthetic_store(str(tmp_path / "s"), [50, 50, 50])
    shard = tmp_path / "s" / "shards" / "000001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    store = ActivationStore(str(tmp_path / "s"))
    with pytest.raises(ScopeError, match=r"000001\.safetensors.*checksum"):
        list(store.batches("x", batch_size=10, shuffle=False))
    with pytest.raises(ScopeError, match=r"000001\.safetensors"):
        store.verify_all()


def test_wrong_hook_and_not_a_store(tmp_path):
    synthetic_store(str(tmp_path / "s"), [10])
    with pytest.raises(ScopeError, match="has no hook 'y'.*'x'"):
        list(ActivationStore(str(tmp_path / "s")).batches("y"))
    with pytest.raises(ScopeError, match="not a scope activation store"):
        ActivationStore(str(tmp_path))


_RSS_SCRIPT = r"""
import sys, torch
from scope.store import ActivationStore
def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
store = ActivationStore(sys.argv[1])
base, peak, rows = anon_kb(), 0, 0
for x in store.batches("x", batch_size=1024, buffer_rows=8192, seed=0):
    rows += x.shape[0]
    peak = max(peak, anon_kb() - base)
print(rows, peak)
"""


def test_reading_a_store_far_larger_than_the_buffer_stays_in_bounded_memory(tmp_path):
    width, per_shard, shards = 1024, 16384, 6  # 6 x 64 MiB = 384 MiB store, 32 MiB buffer
    synthetic_store(str(tmp_path / "s"), [per_shard] * shards, width=width)
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "s")], capture_output=True,
                         text=True, check=True)
    rows, peak_kb = map(int, out.stdout.split())
    store_mb = per_shard * shards * width * 4 / 2**20
    assert rows == per_shard * shards
    # The buffer holds 8,192 rows (32 MiB); shuffling copies it about twice. The whole store is 384 MiB.
    assert peak_kb / 1024 < 160 < store_mb, (peak_kb / 1024, store_mb)


# --- on the real model --------------------------------------------------------------------------

@pytest.mark.real_model
def test_real_store_holds_what_the_model_computes(gemma, small_store):
    info = small_store.info()
    assert info["rows"] == 3000 and info["hooks"][HOOK]["width"] == 640
    assert info["hooks"]["blocks.2.attn.hook_k"]["shape"] == [1, 256]
    assert set(info["labels"]) <= {"business", "entertainment", "politics", "sports", "tech"}
    rows = list(small_store.rows([HOOK], batch_size=512, shuffle=False))
    tok = torch.cat([b.token_id for b in rows])
    pos = torch.cat([b.position for b in rows])
    acts = torch.cat([b.acts[HOOK] for b in rows])
    assert (pos > 0).all(), "BOS positions are excluded by default"
    assert (tok != gemma.tokenizer.bos_token_id).all()
    # Recompute the first window on its own, with plain Hugging Face, and compare.
    n = int((pos[1:] > pos[:-1]).long().cumprod(0).sum()) + 1  # rows of the first window
    ids = torch.cat([torch.tensor([gemma.tokenizer.bos_token_id]), tok[:n].long()])[None]
    with torch.no_grad():
        hs = gemma.hf_model(ids, output_hidden_states=True).hidden_states[7][0, 1:]
    torch.testing.assert_close(acts[:n], hs, atol=2e-2, rtol=1e-4)
    # Bit-exact round trip against the raw shard file.
    shard0 = load_file(Path(small_store.url) / "shards" / "000000.safetensors")
    assert torch.equal(acts[: len(shard0[HOOK])], shard0[HOOK])


@pytest.mark.real_model
def test_capture_into_memory_url_and_append(gemma):
    url = "memory://scope-test/real"
    capture_store(gemma, open_source("wiki"), [HOOK], url, tokens=300, context=32, shard_bytes=64 * 1024,
                  progress=False)
    first = ActivationStore(url)
    before = torch.cat(list(first.batches(HOOK, shuffle=False)))
    capture_store(gemma, open_source("wiki"), [HOOK], url, tokens=500, context=32, shard_bytes=64 * 1024,
                  progress=False)
    grown = ActivationStore(url)
    after = torch.cat(list(grown.batches(HOOK, shuffle=False)))
    assert len(grown) == 500 and torch.equal(after[:300], before)
    with pytest.raises(ScopeError, match="different configuration.*context"):
        capture_store(gemma, open_source("wiki"), [HOOK], url, tokens=500, context=64, progress=False)
    with pytest.raises(ScopeError, match="only grows"):
        capture_store(gemma, open_source("wiki"), [HOOK], url, tokens=100, context=32, shard_bytes=64 * 1024,
                      progress=False)


def _cache_cmd(out: Path, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "scope", "cache", "--out", str(out), "--tokens", "2400", "--corpus", "tweets",
            "--context", "48", "--shard-mb", "1", "--batch-size", "8", *extra]


def _shard_crcs(out: Path) -> list[tuple[str, int, str]]:
    return [(s["name"], s["rows"], s["crc32"]) for s in json.loads((out / "manifest.json").read_text())["shards"]]


@pytest.mark.real_model
def test_killed_capture_resumes_to_an_identical_store(tmp_path):
    # ~400 rows per shard (1 MiB / 2.5 KiB) -> 6 shards; kill once the second shard is written.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cache_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (killed / "shards" / "000001.json").exists():
        assert proc.poll() is None and time.time() < deadline, "capture ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not json.loads((killed / "manifest.json").read_text())["complete"]
    with pytest.raises(ScopeError, match="incomplete"):
        ActivationStore(str(killed))
    subprocess.run(_cache_cmd(killed), env=env, check=True, capture_output=True)
    clean = tmp_path / "clean"
    subprocess.run(_cache_cmd(clean), env=env, check=True, capture_output=True)
    assert _shard_crcs(killed) == _shard_crcs(clean) and len(_shard_crcs(clean)) >= 5
    for s in _shard_crcs(clean):
        assert (killed / s[0]).read_bytes() == (clean / s[0]).read_bytes()
    assert (killed / "documents.jsonl").read_text() == (clean / "documents.jsonl").read_text()


def test_plan_cuts_windows_only_at_the_token_budget(tmp_path):
    from scope.data import Window
    from scope.store.capture import _plan

    windows = [Window(i, 0, tuple([2] + [5] * (10 + i % 7))) for i in range(200)]
    plans = [s for s, _ in _plan(iter(windows), 1000, 100, {2}, StoreFS(str(tmp_path / "none")))]
    assert sum(s.rows for s in plans) == 1000 and all(s.rows >= 100 for s in plans[:-1])
    cut = [(s.index, j) for s in plans for j, (w, k) in enumerate(zip(s.windows, s.keep)) if len(k) < len(w.tokens) - 1]
    assert cut == [(plans[-1].index, len(plans[-1].windows) - 1)], "only the very last window may be cut"
