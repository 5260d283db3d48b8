"""Class-embedding projections: the score on hand-made logits, a small ViT against its random
initialisation, and the logit lens on the real Gemma 3 270M (from the model and from a store)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from scope.analysis.class_embedding import ClassSpace, direction_classes, identifiability, memory_agreement, score_sites
from scope.analysis.logit_lens import (feature_tokens, gemma_class_space, label_word_ids, lens_identifiability,
                                       prompt_windows, store_batches)
from scope.analysis.vision import digits, train_tiny_vit, vit_identifiability
from scope.cli import app
from scope.data import Document, open_source, take_windows
from scope.errors import ScopeError
from scope.hooks import capture
from scope.models import random_init
from scope.store import ActivationStore, capture_store


def test_identifiability_on_hand_made_logits_with_ties():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0],   # target 0 on top
                           [1.0, 1.0, 1.0, 1.0],   # all tied: r = 3/2
                           [0.0, 5.0, 5.0, 1.0],   # tied with one other on top: r = 1/2
                           [4.0, 3.0, 2.0, 1.0]])  # target last: r = 3
    s = identifiability(logits, torch.tensor([0, 2, 1, 3]))
    torch.testing.assert_close(s, torch.tensor([1.0, 1 - 1.5 / 4, 1 - 0.5 / 4, 1 - 3 / 4], dtype=torch.float64))


def test_site_metrics_count_identifiable_tokens_inputs_and_rises():
    space = ClassSpace(norm=lambda h: h, embedding=torch.eye(3))
    # Two inputs of two tokens; site "a" then "b" on the residual chain.
    a = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    b = torch.tensor([[2.0, 0, 0], [1, 0, 0], [3, 0, 1], [0, 1, 0]])
    target = torch.tensor([0, 1, 2, 2])
    ids = torch.tensor([0, 0, 1, 1])
    res = score_sites(space, [({"a": a, "b": b}, target, ids, None)], ["a", "b"], ["a", "b"], 2, "test")
    sa, sb = res.sites
    assert sa.identifiable_pct == 75.0 and sa.inputs_pct == 100.0 and sa.change_rate_pct is None
    assert sa.mean_score == pytest.approx((3 + 0.5) / 4)  # token 3: one class above, one tied → s = 1 − 1.5/3
    assert sb.identifiable_pct == 25.0 and sb.inputs_pct == 50.0  # input 1 has no identifiable token left
    assert sb.change_rate_pct == 25.0  # only token 0's true logit rose (1 → 2)
    assert sb.mean_score == pytest.approx((1 + 0.5 + 2 / 3 + 0.5) / 4)


def test_direction_classes_and_memory_agreement():
    space = ClassSpace(norm=lambda h: h, embedding=torch.eye(4), bias=torch.full((4,), 100.0))
    dirs = torch.tensor([[0.0, 3, 1, -2], [5.0, 0, 0, 1]])
    found = direction_classes(space, dirs, k=2)
    assert found.top_ids.tolist() == [[1, 2], [0, 3]] and found.bottom_ids.tolist() == [[3, 0], [1, 2]]
    # Token 0's most activated memory (1) puts class 0 first; token 1's (0) does not put class 3 first.
    acts = torch.tensor([[0.1, 2.0], [3.0, 0.5]])
    assert memory_agreement(acts, found.top_ids[:, :1], torch.tensor([0, 3]), k=1) == 0.5
    with pytest.raises(ScopeError, match="width 3"):
        space.logits(torch.zeros(2, 3))


def test_tiny_vit_is_more_identifiable_than_its_random_initialisation():
    xtr, ytr, xte, yte = digits(seed=0)
    vit, untrained = train_tiny_vit(xtr, ytr, epochs=20, d=32, depth=3, heads=4)
    parts = vit.parts()
    # The projection of the class token after the last block is the classifier's own output.
    torch.testing.assert_close(parts.class_space().logits(parts.representations(xte[:16])[-1])[:, 0], vit(xte[:16]))
    accuracy = float((vit(xte).argmax(1) == yte).float().mean())
    assert accuracy > 0.8
    trained, rand = vit_identifiability(parts, xte, yte), vit_identifiability(untrained.parts(), xte, yte)
    assert trained.sites[-1].identifiable_pct > rand.sites[-1].identifiable_pct + 15
    assert trained.sites[-1].mean_score > trained.sites[0].mean_score
    assert trained.inputs == len(yte) and trained.sites[-1].inputs_pct > 80


@pytest.mark.real_model
def test_projection_at_the_last_layer_is_the_models_logits(gemma):
    ids = gemma.tokenizer("The Eiffel Tower is in the city of", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = gemma.bridge(ids)
    h = capture(gemma, ids, [f"blocks.{gemma.facts.n_layers - 1}.hook_resid_post"])
    projected = gemma_class_space(gemma).logits(next(iter(h.values())))
    torch.testing.assert_close(projected, logits, rtol=1e-5, atol=1e-4)


@pytest.mark.real_model
def test_gemma_last_layer_is_far_more_identifiable_than_layer_0_and_random_init(gemma):
    windows = take_windows(gemma.tokenizer, open_source("wiki").documents(0)[:10], 48, 200)
    trained = lens_identifiability(gemma, windows, layers=[0, 17], progress=False)
    by_site = {s.site: s for s in trained.sites}
    last, first = by_site["blocks.17.hook_resid_post"], by_site["blocks.0.hook_resid_post"]
    assert last.identifiable_pct > 20 and last.identifiable_pct > first.identifiable_pct + 15
    assert last.mean_score > 0.95 > first.mean_score
    rand = random_init(gemma, seed=0)
    baseline = lens_identifiability(rand, windows, layers=[0, 17], progress=False)
    assert {s.site: s for s in baseline.sites}["blocks.17.hook_resid_post"].identifiable_pct < 1.0
    assert trained.n_classes == gemma.facts.d_vocab
    assert trained.tokens == sum(len(w.tokens) - 2 for w in windows)  # neither BOS nor the last position


@pytest.mark.real_model
def test_store_rows_give_the_same_scores_as_the_model(gemma, tmp_path):
    out = tmp_path / "l17"
    capture_store(gemma, open_source("wiki"), ["blocks.17.hook_resid_post"], str(out), tokens=120, context=48,
                  progress=False)
    store = ActivationStore(str(out))
    batches, n_inputs = store_batches(store, ["blocks.17.hook_resid_post"])
    site = "blocks.17.hook_resid_post"
    from_store = score_sites(gemma_class_space(gemma), batches, [site], [site], n_inputs, "next-token")
    # The same 120 non-BOS positions, through the model: windows cut where the store's rows end.
    kept, rows = [], 0
    for w in take_windows(gemma.tokenizer, open_source("wiki").documents(0)[:10], 48):
        n = min(len(w.tokens) - 1, 120 - rows)
        if n <= 0:
            break
        kept.append(type(w)(w.doc_id, w.start, w.tokens[: n + 1]))
        rows += n
    from_model = lens_identifiability(gemma, kept, layers=[17], progress=False)
    m = {s.site: s for s in from_model.sites}[site]
    assert from_store.tokens == from_model.tokens
    assert from_store.sites[0].mean_score == pytest.approx(m.mean_score, abs=1e-6)
    assert from_store.sites[0].identifiable_pct == pytest.approx(m.identifiable_pct)


@pytest.mark.real_model
def test_label_words_prompts_and_feature_tokens(gemma):
    ids, words = label_word_ids(gemma.tokenizer, ["sports", "business_news"])
    assert words == ["sports", "business"] and len(set(ids)) == 2
    with pytest.raises(ScopeError, match="same first token"):
        label_word_ids(gemma.tokenizer, ["sport", "sports"], {"sport": "sports"})
    w = prompt_windows(gemma.tokenizer, [Document(0, "word " * 500, "sports")], 40)[0]
    assert len(w.tokens) == 40 and gemma.tokenizer.decode(w.tokens[-3:]).endswith("Topic:")
    # A decoder row equal to a token's unembedding direction ranks that token first.
    E = gemma.hf_model.get_output_embeddings().weight.detach()
    paris = gemma.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    rows = feature_tokens(gemma, E[[paris]] / gemma.bridge.ln_final._original_component.weight.add(1)[None], k=3)
    assert rows[0]["top"][0][0] == " Paris"
    with pytest.raises(ScopeError, match="does not fit"):
        feature_tokens(gemma, torch.zeros(3, 7))


@pytest.mark.real_model
def test_analyze_class_embedding_cli_with_labels(tmp_path):
    out = tmp_path / "ce"
    res = CliRunner().invoke(app, ["analyze", "class-embedding", "--labels", "bbc", "--tokens", "256", "--context", "64",
                                   "--layers", "0,17", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert result["classes"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert result["trained"]["n_classes"] == 5 and result["random"]["n_classes"] == 5
    assert (out / "identifiability_by_layer.html").exists() and (out / "token_heatmap.html").exists()
    assert json.loads((out / "class_embedding.json").read_text())["trained"] == result["trained"]
    res = CliRunner().invoke(app, ["analyze", "class-embedding", "--labels", "bbc", "--corpus", "wiki", "--out", str(out)])
    assert res.exit_code == 2 and "--labels bbc names the classes" in res.output


@pytest.mark.real_model
def test_analyze_class_embedding_cli_from_a_store(small_store, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["analyze", "class-embedding", "--store", small_store.url, "--labels", "bbc", "--tokens", "500",
                              "--no-random-baseline", "--out", str(tmp_path / "s"), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert [s["site"] for s in result["trained"]["sites"]] == ["blocks.6.hook_resid_post"]
    assert result["trained"]["tokens"] == 500 and result["trained"]["n_classes"] == 5 and result["random"] is None
    res = runner.invoke(app, ["analyze", "class-embedding", "--store", small_store.url, "--tokens", "300",
                              "--no-random-baseline", "--out", str(tmp_path / "n"), "--json"])
    assert res.exit_code == 0, res.output
    nxt = json.loads(res.output)["trained"]
    assert nxt["mode"] == "next-token" and 0 < nxt["tokens"] <= 300 and nxt["sites"][0]["mean_score"] > 0.6


@pytest.mark.real_model
def test_component_sites_and_attention_value_vectors(gemma):
    from scope.analysis.logit_lens import attention_value_vectors, mlp_value_vectors

    windows = take_windows(gemma.tokenizer, open_source("wiki").documents(0)[:3], 32, 40)
    res = lens_identifiability(gemma, windows, layers=[17], components=True, progress=False)
    sites = {s.site: s for s in res.sites}
    assert set(sites) == {"blocks.0.hook_resid_pre", "blocks.17.hook_resid_post", "blocks.17.hook_attn_out",
                          "blocks.17.hook_mlp_out"}
    assert sites["blocks.17.hook_attn_out"].change_rate_pct is None  # only the residual chain has a change rate
    assert sites["blocks.17.hook_resid_post"].change_rate_pct is not None
    f = gemma.facts
    assert attention_value_vectors(gemma, 3).shape == (f.n_heads * f.d_head, f.d_model)
    assert mlp_value_vectors(gemma, 3).shape == (f.d_mlp, f.d_model)
