"""Importing a SAELens activation cache: rows, tokens and windows come through exactly; bad caches are named."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from scope.cli import app
from scope.data import open_source, take_windows
from scope.errors import ScopeError
from scope.hooks import capture
from scope.store import ActivationStore
from scope.store.saelens_cache import import_saelens_cache
from scope.store.windows import store_windows

HOOK = "blocks.6.hook_resid_post"


def write_saelens_cache(folder, acts: np.ndarray, tokens: np.ndarray, with_tokens: bool = True) -> None:
    """The layout SAELens's CacheActivationsRunner saves: one row per sequence, Array2D activations."""
    n, context, d = acts.shape
    features = {HOOK: datasets.Array2D(shape=(context, d), dtype="float32")}
    data = {HOOK: acts}
    if with_tokens:
        features["token_ids"] = datasets.Sequence(datasets.Value("int32"), length=context)
        data["token_ids"] = tokens
    datasets.Dataset.from_dict(data, features=datasets.Features(features)).save_to_disk(str(folder))


@pytest.fixture(scope="module")
def real_sequences(gemma):
    """Layer-6 activations of the real model over 6 BBC windows of 24 tokens (BOS first, as SAELens prepends it)."""
    windows = take_windows(gemma.tokenizer, open_source("bbc").documents()[:20], context=24)
    windows = [w for w in windows if len(w.tokens) == 24][:6]
    toks = torch.tensor([w.tokens for w in windows])
    acts = capture(gemma, toks, [HOOK])[HOOK]
    return acts.numpy().astype(np.float32), toks.numpy().astype(np.int32)


@pytest.mark.real_model
def test_import_keeps_every_row_token_and_window(real_sequences, tmp_path, gemma):
    acts, toks = real_sequences
    write_saelens_cache(tmp_path / "cache", acts, toks)
    import_saelens_cache(tmp_path / "cache", str(tmp_path / "store"), model="gemma-3-270m", shard_bytes=40_000,
                         progress=False)
    store = ActivationStore(str(tmp_path / "store"))
    assert len(store.manifest.shards) > 1 and len(store) == acts.shape[0] * acts.shape[1]
    rows = list(store.rows(HOOK, batch_size=1000, shuffle=False))
    x = torch.cat([b.acts[HOOK] for b in rows])
    assert torch.equal(x, torch.from_numpy(acts.reshape(-1, acts.shape[-1])))
    assert torch.equal(torch.cat([b.token_id for b in rows]), torch.from_numpy(toks.reshape(-1)))
    assert torch.cat([b.doc_id for b in rows]).tolist() == [d for d in range(6) for _ in range(24)]
    # The store rebuilds its windows from its own token ids, so the spliced LM loss can run on it.
    windows = store_windows(store, gemma.tokenizer)
    assert [w.tokens for w in windows] == [tuple(t) for t in toks.tolist()]
    held = store.select([0, 3])
    assert [w.doc_id for w in store_windows(held, gemma.tokenizer, max_tokens=30)] == [0, 3]
    # Importing again into the same folder is a no-op; another folder with content is refused.
    import_saelens_cache(tmp_path / "cache", str(tmp_path / "store"), model="gemma-3-270m", shard_bytes=40_000,
                         progress=False)
    with pytest.raises(ScopeError, match="holds a different store"):
        import_saelens_cache(tmp_path / "cache", str(tmp_path / "store"), model="gemma-2-2b", shard_bytes=40_000,
                             progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ScopeError, match="not empty"):
        import_saelens_cache(tmp_path / "cache", str(tmp_path / "other"), model="gemma-3-270m", progress=False)


def test_cli_imports_and_bad_caches_are_named(tmp_path):
    acts = np.random.default_rng(0).normal(size=(3, 8, 16)).astype(np.float32)
    toks = np.arange(24, dtype=np.int32).reshape(3, 8)
    write_saelens_cache(tmp_path / "cache", acts, toks)
    (tmp_path / "cache" / "cache_activations_runner_cfg.json").write_text(json.dumps({"model_name": "gpt2", "hook_name": HOOK}))
    result = CliRunner().invoke(app, ["store", "import-saelens", str(tmp_path / "cache"), "--out", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output[result.output.index("{"):])
    assert info["rows"] == 24 and info["model"] == "gpt2" and info["hooks"][HOOK]["width"] == 16

    write_saelens_cache(tmp_path / "notok", acts, toks, with_tokens=False)
    with pytest.raises(ScopeError, match="no token_ids"):
        import_saelens_cache(tmp_path / "notok", str(tmp_path / "s2"), model="gpt2", progress=False)
    with pytest.raises(ScopeError, match="is not a SAELens activation cache"):
        import_saelens_cache(tmp_path / "missing", str(tmp_path / "s3"), model="gpt2", progress=False)
    write_saelens_cache(tmp_path / "plain", acts, toks)
    with pytest.raises(ScopeError, match="does not say which model"):
        import_saelens_cache(tmp_path / "plain", str(tmp_path / "s4"), progress=False)
    bad = CliRunner().invoke(app, ["store", "import-saelens", str(tmp_path / "cache"), "--out", str(tmp_path / "s5"),
                                   "--hook", "blocks.0.hook_resid_pre"])
    assert bad.exit_code == 2 and "has no column 'blocks.0.hook_resid_pre'" in bad.output
