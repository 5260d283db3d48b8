"""RoPE analyses: frequency chunks in both layouts, the frequency axis, p-RoPE and head scoring,
on synthetic tensors and on the real Gemma 3 270M."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from scope.analysis.rope import (analyze_windows, band_shares, chunk_norms, dropped_chunks, frequency_usage_from_store,
                                 head_scores, inv_freq_from_facts, p_rope, rope_hooks, rotary_inv_freq)
from scope.cli import app
from scope.data import open_source, take_windows
from scope.errors import ScopeError
from scope.store import ActivationStore, capture_store


def _in_band(n: int, d: int, band: range, layout: str) -> torch.Tensor:
    """Random vectors whose energy lies only in the RoPE chunks of ``band`` for the given layout."""
    x = torch.zeros(n, 2, d)
    g = torch.randn(n, 2, len(band), 2)
    ks = torch.tensor(list(band))
    if layout == "half":
        x[..., ks], x[..., ks + d // 2] = g[..., 0], g[..., 1]
    else:
        x[..., 2 * ks], x[..., 2 * ks + 1] = g[..., 0], g[..., 1]
    return x


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_chunk_norms_find_a_known_frequency_band(layout):
    d = 64
    band = range(8, 16)  # the second quarter of 32 chunks
    x = _in_band(500, d, band, layout)
    profile = chunk_norms(x, layout).mean(0)
    assert profile.shape == (2, d // 2)
    assert set(profile.mean(0).nonzero().flatten().tolist()) == set(band)
    shares = band_shares(profile.mean(0), 4)
    assert shares[1] == pytest.approx(1.0) and shares.sum() == pytest.approx(1.0)
    # Read in the other layout, the same vectors spread over other chunks: the layout matters.
    other = chunk_norms(x, "interleaved" if layout == "half" else "half").mean((0, 1))
    assert band_shares(other, 4)[1] < 0.9
    # Rotation by any angle per chunk leaves every chunk norm unchanged.
    theta = torch.rand(d // 2) * 6.28
    cos, sin = theta.cos(), theta.sin()
    if layout == "half":
        a, b = x[..., : d // 2], x[..., d // 2 :]
        rot = torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
    else:
        a, b = x[..., 0::2], x[..., 1::2]
        rot = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
    torch.testing.assert_close(chunk_norms(rot, layout), chunk_norms(x, layout))


def test_bad_layout_and_odd_width_are_clear_errors():
    with pytest.raises(ScopeError, match="layout 'neox'"):
        chunk_norms(torch.zeros(2, 8), "neox")
    with pytest.raises(ScopeError, match="even head dimension"):
        chunk_norms(torch.zeros(2, 7))


def test_head_scores_on_hand_built_patterns():
    n = 6
    eye = torch.eye(n)
    prev = torch.zeros(n, n)
    prev[0, 0] = 1
    prev[torch.arange(1, n), torch.arange(n - 1)] = 1
    first = torch.zeros(n, n)
    first[:, 0] = 1
    half = 0.5 * eye + 0.5 * first
    pattern = torch.stack([eye, prev, first, half])[None]  # [batch 1, 4 heads, query, key]
    sums, queries = head_scores(pattern)
    assert queries == n - 2  # queries 0 and 1 are skipped
    scores = sums / queries
    torch.testing.assert_close(scores, torch.tensor([[1.0, 0, 0, 0.5], [0, 1, 0, 0], [0, 0, 1, 0.5]], dtype=torch.float64))
    # Padded queries do not count: mask the last two positions of a second window.
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, -2:] = 0
    sums, queries = head_scores(torch.cat([pattern, pattern]), mask)
    assert queries == 2 * (n - 2) - 2
    torch.testing.assert_close(sums[0, 0], torch.tensor(float(queries), dtype=torch.float64))


def test_dropped_chunks_keep_the_highest_or_the_lowest_fraction():
    assert dropped_chunks(128, 1.0).numel() == 0
    assert dropped_chunks(128, 0.0).tolist() == list(range(128))
    assert dropped_chunks(128, 0.75).tolist() == list(range(96, 128))  # p-RoPE: lowest frequencies stop
    assert dropped_chunks(128, 0.75, "highest").tolist() == list(range(0, 32))
    with pytest.raises(ScopeError, match="p must lie in"):
        dropped_chunks(128, 1.5)
    with pytest.raises(ScopeError, match="drop='middle'"):
        dropped_chunks(128, 0.5, "middle")


@pytest.mark.real_model
def test_frequency_axis_is_the_models_own(gemma):
    rotary = gemma.bridge.rotary_emb._original_component
    for kind, buf in (("local", rotary.sliding_attention_inv_freq), ("global", rotary.full_attention_inv_freq)):
        assert torch.equal(rotary_inv_freq(gemma, kind), buf.double())  # read from the module, not recomputed
        torch.testing.assert_close(inv_freq_from_facts(gemma.facts, kind), buf.double(), rtol=1e-6, atol=0)
    assert rotary_inv_freq(gemma, "global")[-1] < rotary_inv_freq(gemma, "local")[-1]  # base 1e6 vs 1e4


@pytest.mark.real_model
def test_p_rope_one_is_exact_and_zero_is_nope(gemma):
    toks = torch.tensor([take_windows(gemma.tokenizer, open_source("wiki").documents(0)[:3], 48)[0].tokens])
    with torch.inference_mode():
        clean = gemma.bridge(toks)
        with p_rope(gemma, 1.0):
            same = gemma.bridge(toks)
        with p_rope(gemma, 0.0) as layers:
            zero = gemma.bridge(toks)
        # NoPE, independently: every layer attends with its normed q/k taken before the rotation.
        saved: dict[str, torch.Tensor] = {}

        def keep(name):
            def fn(x, *, hook):
                saved[name] = x.transpose(1, 2)  # hook_q_normed is [batch, head, pos, d]
                return x
            return fn

        def use(name):
            def fn(x, *, hook):
                return saved[name]
            return fn

        hooks = []
        for L in range(gemma.facts.n_layers):
            for t in ("q", "k"):
                hooks += [(f"blocks.{L}.attn.hook_{t}_normed", keep(f"{L}{t}")), (f"blocks.{L}.attn.hook_rot_{t}", use(f"{L}{t}"))]
        with gemma.bridge.hooks(fwd_hooks=hooks):
            nope = gemma.bridge(toks)
        after = gemma.bridge(toks)
    assert layers == list(range(gemma.facts.n_layers))
    assert torch.equal(same, clean)
    torch.testing.assert_close(zero, nope, rtol=1e-4, atol=1e-3)
    assert (zero - clean).abs().max() > 1.0  # the ablation does change the model
    assert torch.equal(after, clean)  # the hooks are gone after the block
    with p_rope(gemma, 0.0, where="global") as layers:
        assert layers == [5, 11, 17]


@pytest.mark.real_model
def test_store_rows_and_forward_passes_give_the_same_frequency_usage(gemma, tmp_path):
    docs = open_source("bbc").documents(0)[:6]
    out = tmp_path / "qkv"
    capture_store(gemma, open_source("bbc"), rope_hooks(gemma, [0, 5]), str(out), tokens=300, context=64, progress=False)
    store = ActivationStore(str(out))
    windows = take_windows(gemma.tokenizer, docs, 64, None)
    seen = set(store.documents)
    windows = [w for w in windows if w.doc_id in seen]
    # The store's 300 rows are the first 300 non-BOS positions of those windows.
    from_store = frequency_usage_from_store(gemma, store, progress=False)
    kept, rows = [], 0
    for w in windows:
        if rows >= 300:
            break
        n = min(len(w.tokens) - 1, 300 - rows)
        kept.append(type(w)(w.doc_id, w.start, w.tokens[: n + 1]))
        rows += n
    from_model, heads = analyze_windows(gemma, kept, layers=[0, 5], batch_size=4, heads=False, progress=False)
    assert heads is None and from_store.tokens == from_model.tokens == 300
    assert from_store.layers == [0, 5] and from_store.layer_types == ["local", "global"]
    for t in ("q", "k", "v"):
        torch.testing.assert_close(getattr(from_store, t), getattr(from_model, t), rtol=1e-4, atol=1e-5)
    assert from_store.q.shape == (2, 4, 128) and from_store.k.shape == (2, 1, 128)


@pytest.mark.real_model
def test_store_without_qk_is_a_clear_error(gemma, small_store):
    with pytest.raises(ScopeError, match="holds no per-head q, k and v"):
        frequency_usage_from_store(gemma, small_store, progress=False)


@pytest.mark.real_model
def test_analyze_rope_cli_on_the_real_model(tmp_path):
    out = tmp_path / "rope"
    res = CliRunner().invoke(app, ["analyze", "rope", "--corpus", "wiki", "--tokens", "600", "--eval-tokens", "120",
                                   "--context", "64", "--p", "1,0.5,0", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    saved = json.loads((out / "rope.json").read_text())
    assert saved["summary"] == result["summary"]
    for name in ("q_usage", "k_usage", "v_usage", "head_types", "p_rope"):
        assert (out / f"{name}.html").stat().st_size > 1000
    assert (out / "plotly.min.js").exists()
    s = result["summary"]
    # Keys of global layers put most of their norm in the lowest frequencies; v (never rotated) does not.
    assert s["global"]["k"][-1] > 0.4 and max(s["global"]["v"]) < 0.35
    usage = result["frequency_usage"]
    assert len(usage["inv_freq"]["local"]) == 128 and usage["inv_freq"]["global"][0] == 1.0
    pr = {(r["p"], r["where"], r["drop"]): r["delta"] for r in result["p_rope"]}
    assert pr[(1.0, "all", "-")] == 0.0
    # Dropping all rotation costs more than dropping the lowest half of the frequencies.
    assert pr[(0.0, "all", "-")] > pr[(0.5, "all", "lowest")] + 0.3
    assert pr[(0.5, "all", "highest")] > pr[(0.5, "all", "lowest")]
    assert result["head_scores"]["heads"], "some head passes a type threshold on real text"


def test_analyze_rope_cli_rejects_bad_input(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["analyze", "rope", "--out", str(tmp_path), "--p", "1,half"])
    assert res.exit_code == 2 and "--p must be comma-separated numbers" in res.output
    res = runner.invoke(app, ["analyze", "rope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "exactly one of --store DIR or --corpus NAME" in res.output
