"""Evaluation: reconstruction metrics with known answers, spliced-in LM loss on the real model, `scope eval`."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from scope.cli import app
from scope.dictionaries import build
from scope.errors import ScopeError
from scope.evals import (evaluate, frontier_figure, lm_loss_on_windows, lm_losses_on_windows, reconstruction_metrics,
                         spliced_lm_loss, store_windows, write_frontier)
from scope.evals.lm_loss import _kl_sum, _log_probs, _replacement, paired_difference, ratio_se
from scope.store import ActivationStore
from scope.store.fs import StoreFS
from scope.store.manifest import Manifest, SourceInfo, StoreConfig, write_documents, write_manifest
from scope.store.shards import write_shard

HOOK = "blocks.6.hook_resid_post"


def write_store(url: str, x: torch.Tensor, shard_rows: int = 70) -> ActivationStore:
    """A store holding exactly the rows ``x`` (several shards, 10 rows per document)."""
    fs = StoreFS(url)
    infos, doc_rows = [], {}
    for i, a in enumerate(range(0, len(x), shard_rows)):
        n = min(shard_rows, len(x) - a)
        doc = (a + torch.arange(n)) // 10
        cols = {"x": x[a : a + n].contiguous(), "token_id": torch.zeros(n, dtype=torch.int32), "doc_id": doc,
                "position": torch.arange(n, dtype=torch.int32)}
        for d in doc.tolist():
            doc_rows[d] = (None, doc_rows.get(d, (None, 0))[1] + 1)
        infos.append(write_shard(fs, i, cols, first_window=i, n_windows=1, rank=0))
    cfg = StoreConfig(model="synthetic", model_revision=None, model_dtype="float32", hooks={"x": [x.shape[1]]},
                      dtype="float32", source=SourceInfo(spec="synthetic", fingerprint="0"), seed=0, context=64,
                      excluded=["bos"], shard_rows=shard_rows)
    write_documents(fs, doc_rows)
    write_manifest(fs, Manifest(config=cfg, tokens_requested=len(x), complete=True, shards=infos))
    return ActivationStore(url)


def identity_sae(d_in: int, kind: str = "relu", hook: str | None = "x"):
    """relu(x) − relu(−x) = x: a dictionary with d_sae = 2·d_in that reconstructs exactly."""
    extra = {"threshold_init": 1e-30} if kind == "jumprelu" else {}
    sae = build({"kind": kind, "d_in": d_in, "d_sae": 2 * d_in, "hook": hook, **extra})
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.fixture
def gaussian(tmp_path):
    """300 rows of width 8 with a large mean (as Gemma's residual stream has), in 5 shards."""
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0)) * 3 + torch.linspace(-50, 400, 8)
    return x, write_store(str(tmp_path / "s"), x)


@pytest.mark.parametrize("kind", ["relu", "jumprelu"])
def test_identity_dictionary_has_fvu_zero_and_fires_every_coordinate(gaussian, kind):
    x, store = gaussian
    m = reconstruction_metrics(identity_sae(8, kind), store, batch_size=64)
    assert m.rows == 300 and m.hook == "x"
    assert m.fvu < 1e-12 and m.fvu_uncentred < 1e-12 and m.mse < 1e-12
    assert m.cosine == pytest.approx(1.0, abs=1e-9)
    # Each coordinate is either positive or negative: exactly one of its two latents fires.
    assert m.l0 == pytest.approx(8.0)
    expected = torch.cat([(x > 0).float().mean(0), (x < 0).float().mean(0)])
    assert torch.allclose(m.firing_frequency, expected)
    assert m.dead == int((expected == 0).sum()) and m.dense == int((expected > 0.1).sum())


def test_streamed_fvu_equals_the_formula_on_all_rows_at_once(gaussian):
    x, store = gaussian
    sae = build({"kind": "relu", "d_in": 8, "d_sae": 32, "hook": "x"})
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0) * 0.9)  # near the mean, so both FVUs are informative
        x_hat = sae(x).double()
    xd = x.double()
    err = (xd - x_hat).pow(2).sum()
    m = reconstruction_metrics(sae, store, batch_size=64)  # 5 shards, uneven batches
    assert m.fvu == pytest.approx(float(err / (xd - xd.mean(0)).pow(2).sum()), rel=1e-9)
    assert m.fvu_uncentred == pytest.approx(float(err / xd.pow(2).sum()), rel=1e-9)
    assert m.mse == pytest.approx(float(err / x.numel()), rel=1e-9)
    cos = torch.nn.functional.cosine_similarity(xd, x_hat, dim=-1).mean()
    assert m.cosine == pytest.approx(float(cos), rel=1e-9)
    assert m.fvu_uncentred < m.fvu  # the mean-heavy data flatters the uncentred variant


def test_outputting_the_mean_gives_fvu_one_and_zero_gives_uncentred_fvu_one(gaussian):
    x, store = gaussian
    sae = build({"kind": "relu", "d_in": 8, "d_sae": 16, "hook": "x"})
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)  # no latent ever fires
        sae.b_dec.copy_(x.double().mean(0).float())
    m = reconstruction_metrics(sae, store, batch_size=64)
    assert m.fvu == pytest.approx(1.0, abs=1e-6)
    assert m.l0 == 0 and m.dead == 16 and m.dead_fraction == 1.0 and m.dense == 0
    with torch.no_grad():
        sae.b_dec.zero_()
    m = reconstruction_metrics(sae, store, batch_size=64)
    assert m.fvu_uncentred == pytest.approx(1.0, abs=1e-12) and m.cosine == 0.0


def test_firing_frequency_dead_and_dense_counts(tmp_path):
    n = 200
    x = torch.zeros(n, 4)
    x[:, 0] = 1.0  # fires on every row
    x[:10, 1] = 1.0  # 5% of rows
    x[:, 2] = -1.0  # never fires (ReLU)
    x[100:140, 3] = 2.0  # 20% of rows
    store = write_store(str(tmp_path / "s"), x)
    sae = build({"kind": "relu", "d_in": 4, "d_sae": 4, "hook": "x"})
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
    m = reconstruction_metrics(sae, store, batch_size=32)
    assert m.firing_frequency.tolist() == pytest.approx([1.0, 0.05, 0.0, 0.2])
    assert m.l0 == pytest.approx(1.25)
    assert (m.dead, m.dense) == (1, 2) and m.dead_fraction == 0.25 and m.dense_fraction == 0.5
    assert reconstruction_metrics(sae, store, dense_threshold=0.5).dense == 1
    d = m.to_dict()
    assert "firing_frequency" not in d and len(m.to_dict(frequencies=True)["firing_frequency"]) == 4
    json.dumps(d)


def test_max_rows_caps_the_rows_and_empty_views_are_refused(gaussian):
    _, store = gaussian
    assert reconstruction_metrics(identity_sae(8), store, max_rows=100, batch_size=64).rows == 100
    with pytest.raises(ScopeError, match="no rows"):
        reconstruction_metrics(identity_sae(8), store.select([]))


def test_width_mismatch_names_both_widths(gaussian):
    _, store = gaussian
    sae = build({"kind": "topk", "d_in": 2304, "d_sae": 16, "k": 4, "hook": "x"})
    with pytest.raises(ScopeError, match=r"the SAE reads width d_in 2304, but hook 'x' of store .* has width 8; pass a store"):
        reconstruction_metrics(sae, store)
    with pytest.raises(ScopeError, match="has no hook 'blocks.6.hook_resid_post'"):
        reconstruction_metrics(identity_sae(8, hook=HOOK), store)


# --- the real model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def held_out(small_store) -> ActivationStore:
    """A held-out half of the small store's documents (a few whole documents)."""
    test = small_store.split(0.5, seed=0)[1]
    assert test.documents, "the split must hold out at least one document"
    return test


@pytest.mark.real_model
def test_rebuilt_windows_are_the_stored_rows(gemma, held_out):
    windows = store_windows(held_out, gemma.tokenizer)
    assert {w.doc_id for w in windows} == set(held_out.documents)
    rows = list(held_out.rows(HOOK, batch_size=10_000, shuffle=False))
    tokens = torch.cat([b.token_id for b in rows]).tolist()
    position = torch.cat([b.position for b in rows]).tolist()
    doc = torch.cat([b.doc_id for b in rows]).tolist()
    # Stored rows come window by window (BOS excluded, so each window's rows restart at position 1);
    # the capture may keep only a prefix of a window, so compare each stored run with its window.
    runs: list[tuple[int, list[int]]] = []
    for t, p, d in zip(tokens, position, doc):
        if p == 1 or not runs:
            runs.append((d, []))
        runs[-1][1].append(t)
    assert 0 < len(runs) <= len(windows)  # the store may end mid-document
    for (d, toks), w in zip(runs, windows):
        assert d == w.doc_id and toks == list(w.tokens[1 : 1 + len(toks)])
    capped = store_windows(held_out, gemma.tokenizer, max_tokens=100)
    assert sum(len(w.tokens) for w in capped) == 100 and all(w.tokens[0] == gemma.tokenizer.bos_token_id for w in capped)


@pytest.mark.real_model
def test_perfect_dictionary_recovers_all_loss_and_zero_ablation_hurts(gemma, held_out):
    # 100 tokens = a full window of 64 and one cut to 36, batched together: the short one is padded.
    m = spliced_lm_loss(identity_sae(640, "relu", HOOK), gemma, held_out, max_tokens=100, batch_size=2,
                        progress=False)
    assert m.windows == 2 and m.tokens == 63 + 35  # every token but BOS is a next-token target
    # Clean CE equals Hugging Face's own loss on each window alone (no padding, no hooks).
    windows = store_windows(held_out, gemma.tokenizer, max_tokens=100)
    with torch.inference_mode():
        nll = sum(gemma.hf_model(torch.tensor([w.tokens]), labels=torch.tensor([w.tokens])).loss * (len(w.tokens) - 1)
                  for w in windows)
    assert m.clean_ce == pytest.approx(float(nll) / m.tokens, rel=1e-4)
    assert 1.0 < m.clean_ce < 8.0
    assert abs(m.spliced_ce - m.clean_ce) < 1e-4 and abs(m.delta_loss) < 1e-4
    assert m.ce_loss_recovered == pytest.approx(1.0, abs=1e-4)
    assert abs(m.kl) < 1e-5
    assert m.zero_ce > m.clean_ce + 2.0 and not m.splice_bos


def test_the_splice_hook_leaves_bos_alone_unless_asked():
    sae = identity_sae(4, "relu", HOOK)
    with torch.no_grad():
        sae.W_dec.mul_(0.5)
    x = torch.randn(2, 5, 4)
    hook = type("Hook", (), {"name": HOOK})()
    kept = _replacement(sae, "spliced", splice_bos=False)(x, hook=hook)
    assert torch.equal(kept[:, 0], x[:, 0]) and torch.allclose(kept[:, 1:], x[:, 1:] / 2)
    assert torch.allclose(_replacement(sae, "spliced", splice_bos=True)(x, hook=hook), x / 2)
    zero = _replacement(sae, "zero", splice_bos=False)(x, hook=hook)
    assert torch.equal(zero[:, 0], x[:, 0]) and not zero[:, 1:].any()
    q = torch.randn(2, 5, 2, 2)  # per-head hooks are flattened to [batch, pos, heads · d_head]
    assert _replacement(sae, "spliced", splice_bos=False)(q, hook=hook).shape == q.shape
    with pytest.raises(ScopeError, match="has width 3 but the SAE expects 4"):
        _replacement(sae, "zero", splice_bos=False)(torch.zeros(1, 2, 3), hook=hook)


@pytest.mark.real_model
def test_a_bad_dictionary_loses_loss(gemma, held_out):
    windows = store_windows(held_out, gemma.tokenizer, max_tokens=64)
    sae = identity_sae(640, "relu", HOOK)
    with torch.no_grad():
        sae.W_dec.mul_(0.5)  # halves the residual stream after position 0
    m = lm_loss_on_windows(sae, gemma, windows, HOOK, progress=False)
    assert m.windows == 1 and m.tokens == 63
    assert m.delta_loss > 0.05 and m.kl > 0.01 and m.ce_loss_recovered < 1 and m.zero_ce > m.spliced_ce


@pytest.mark.real_model
def test_a_sweep_shares_the_clean_and_zero_runs_and_gives_each_sae_its_own_numbers(gemma, held_out):
    windows = store_windows(held_out, gemma.tokenizer, max_tokens=128)
    good, bad = identity_sae(640, "relu", HOOK), identity_sae(640, "relu", HOOK)
    with torch.no_grad():
        bad.W_dec.mul_(0.5)
    both = lm_losses_on_windows({"good": good, "bad": bad}, gemma, windows, HOOK, progress=False)
    alone = lm_loss_on_windows(bad, gemma, windows, HOOK, progress=False)
    assert list(both) == ["good", "bad"]
    numbers = lambda m: {k: v for k, v in m.to_dict().items() if isinstance(v, float)}
    assert numbers(both["bad"]) == pytest.approx(numbers(alone), rel=1e-6)
    assert abs(both["good"].delta_loss) < 1e-4 and both["bad"].delta_loss > 0.05
    assert both["good"].clean_ce == both["bad"].clean_ce and both["good"].zero_ce == both["bad"].zero_ce
    # Per-window sums: they add up to the totals, and a paired difference of the two is the delta losses' difference.
    bad_d = both["bad"].to_dict()
    assert len(bad_d["window_tokens"]) == 2 and sum(bad_d["window_tokens"]) == both["bad"].tokens
    assert sum(bad_d["window_delta"]) / both["bad"].tokens == pytest.approx(both["bad"].delta_loss, rel=1e-9)
    assert 0 < both["bad"].delta_loss_se < both["bad"].delta_loss
    diff, se = paired_difference(both["good"].to_dict(), bad_d)
    assert diff == pytest.approx(both["bad"].delta_loss - both["good"].delta_loss, rel=1e-9) and se > 0


def test_log_probs_and_kl_slice_by_slice_equal_the_whole_batch_formulas():
    # Sizes that do not divide into the slices; padded positions (keep False) must not count.
    torch.manual_seed(0)
    logits = torch.randn(3, 11, 50) * 4
    other = logits + torch.randn(3, 11, 50)

    class _Bridge:
        def __init__(self, out):
            self.out = out

        def hooks(self, fwd_hooks):
            return contextlib.nullcontext()

        def __call__(self, toks, attention_mask):
            return self.out.clone()

    class _Model:
        bridge = _Bridge(logits)

    toks = torch.zeros(3, 11, dtype=torch.long)
    lp = _log_probs(_Model(), toks, toks, [])
    torch.testing.assert_close(lp, logits.log_softmax(-1))
    lq = other.log_softmax(-1)
    keep = torch.ones(3, 10, dtype=torch.bool)
    keep[1, 6:] = False
    keep[2, :] = False
    p = lp[:, :-1][keep]
    expected = float((p.exp() * (p - lq[:, :-1][keep])).sum())
    assert _kl_sum(lp, lq, keep) == pytest.approx(expected, rel=1e-6)


def test_the_delta_loss_standard_error_and_the_paired_difference_by_hand():
    # R = 12/60 = 0.2; d − R·n = (−1, 0, −1, 2); var = 6 / (4 · 3) / 15²
    assert ratio_se([1.0, 2.0, 3.0, 6.0], [10, 10, 20, 20]) == pytest.approx(0.5 ** 0.5 / 15)
    assert math.isnan(ratio_se([1.0], [10]))
    a = {"window_tokens": [10, 10, 20, 20], "window_delta": [2.0, 2.0, 4.0, 4.0]}
    b = {"window_tokens": [10, 10, 20, 20], "window_delta": [3.0, 4.0, 7.0, 10.0]}
    diff, se = paired_difference(a, b)
    assert diff == pytest.approx(12 / 60) and se == pytest.approx(0.5 ** 0.5 / 15)
    with pytest.raises(ScopeError, match="same windows"):
        paired_difference(a, {**b, "window_tokens": [10, 10, 20, 21]})
    with pytest.raises(ScopeError, match="per-window sums"):
        paired_difference({"delta_loss": 0.3}, b)  # an evaluation cached before per-window sums existed


def test_frontier_has_one_trace_per_kind_on_a_log_axis(tmp_path):
    results = [{"name": n, "kind": k, "d_sae": 16, "l0": l0, "fvu": f, "lm": None}
               for n, k, l0, f in [("a", "relu", 50.0, 0.1), ("b", "relu", 5.0, 0.4), ("c", "topk", 20.0, 0.2)]]
    results[0]["lm"] = {"delta_loss": 0.12}
    fig = frontier_figure(results)
    assert fig.layout.xaxis.type == "log" and [t.name for t in fig.data] == ["relu", "topk"]
    relu = fig.data[0]
    assert list(relu.x) == [5.0, 50.0] and list(relu.y) == [0.4, 0.1] and list(relu.text) == ["b", "a"]
    assert "delta loss 0.1200" in relu.hovertext[1]
    path = write_frontier(results, tmp_path / "f" / "frontier.html")
    assert path.exists() and "topk" in path.read_text()


# --- the command ---------------------------------------------------------------------------------

def random_sae(folder, width: int, seed: int) -> str:
    sae = build({"kind": "jumprelu", "d_in": 640, "d_sae": width, "hook": HOOK, "model": "gemma-3-270m"})
    sae.reset_parameters(seed)
    return str(sae.save(folder))


@pytest.mark.real_model
def test_scope_eval_json_end_to_end(gemma, small_store, tmp_path, monkeypatch):
    import scope.store.windows as windows

    loaded = []

    def reuse_fixture(spec, dtype=None, device=None, revision=None):  # the session model; no second load
        loaded.append((spec, dtype))
        return gemma

    monkeypatch.setattr(windows, "load_model", reuse_fixture)
    result = CliRunner().invoke(app, ["eval", "--sae", random_sae(tmp_path / "sae128", 128, 0),
                                      "--store", small_store.url, "--held-out", "0.5", "--lm-tokens", "64",
                                      "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert loaded == [("gemma-3-270m", "float32")]  # the store's model, in the store's model dtype
    held_out = small_store.split(0.5)[1]
    assert out["documents"] == len(held_out.documents) > 0 and out["rows"] == len(held_out) > 0
    (r,) = out["results"]
    assert r["name"] == "sae128" and r["kind"] == "jumprelu" and r["d_sae"] == 128 and r["hook"] == HOOK
    assert r["rows"] == out["rows"] and 0 < r["l0"] <= 128 and r["fvu"] > 0 and -1 <= r["cosine"] <= 1
    assert 0 <= r["dead_fraction"] <= 1 and 0 <= r["dense_fraction"] <= 1 and r["dense_threshold"] == 0.1
    lm = r["lm"]
    assert lm["windows"] == 1 and lm["tokens"] == 63 and not lm["splice_bos"]
    assert 1.0 < lm["clean_ce"] < lm["spliced_ce"] and lm["delta_loss"] > 0 and lm["kl"] > 0
    assert lm["delta_loss"] == pytest.approx(lm["spliced_ce"] - lm["clean_ce"])
    assert lm["ce_loss_recovered"] == pytest.approx((lm["zero_ce"] - lm["spliced_ce"]) / (lm["zero_ce"] - lm["clean_ce"]))


@pytest.mark.real_model
def test_scope_eval_errors_are_one_line(small_store, tmp_path):
    build({"kind": "relu", "d_in": 2304, "d_sae": 16, "hook": HOOK}).save(tmp_path / "wide")
    result = CliRunner().invoke(app, ["eval", "--sae", str(tmp_path / "wide"), "--store", small_store.url,
                                      "--held-out", "0.5", "--no-lm"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (f"the SAE reads width d_in 2304, but hook {HOOK!r} of store {small_store.url!r} has width 640"
            in " ".join(result.output.split()))
    result = CliRunner().invoke(app, ["eval", "--sae", str(tmp_path / "wide"), "--store", small_store.url,
                                      "--held-out", "0.01", "--no-lm"])
    assert result.exit_code == 2 and "held-out split" in result.output and "is empty" in result.output


@pytest.mark.real_model
def test_evaluate_without_lm_and_a_sweep_as_a_table_and_frontier(small_store, tmp_path):
    sae = identity_sae(640, "relu", HOOK)
    r = evaluate(sae, small_store.split(0.5)[1], lm_tokens=0, name="identity")
    assert r["lm"] is None and r["fvu"] < 1e-10 and r["name"] == "identity"
    html = tmp_path / "frontier.html"
    result = CliRunner().invoke(app, ["eval", "--sae", str(sae.save(tmp_path / "identity")),
                                      "--sae", random_sae(tmp_path / "random", 512, 1), "--store", small_store.url,
                                      "--held-out", "0.5", "--no-lm", "--html", str(html)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("held-out: ") and "FVU" in lines[1]
    assert lines[2].split()[:4] == ["identity", "relu", "1280", "640.0"] and lines[2].split()[4] == "0.0000"
    assert lines[3].split()[:3] == ["random", "jumprelu", "512"]
    assert html.exists() and "identity" in html.read_text() and "random" in html.read_text()
