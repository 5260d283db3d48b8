"""Steering: interventions, concept data, the RePS loss, DiffMean from a store, scoring, training, CLI.

Behaviour on a real model is tested on the bundled Gemma 3 270M (``gemma``, ``small_store``); a
tiny random Gemma 3 checkpoint written here serves the hand computation of the RePS loss, resume
and the KV-cache check, where exact arithmetic matters more than realism.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from scope.cli import app
from scope.errors import ScopeError
from scope.models import load_model
from scope.steering import (ConceptData, ConceptExample, EvalPrompt, SteerConfig, build_concept, harmonic_mean,
                            load_jsonl, load_vector, null_out, phi_null, reps_loss, steering)
from scope.steering.diffmean import diffmean, diffmean_stats
from scope.steering.generate import RowSteer, generate
from scope.steering.interventions import row_interventions
from scope.steering.reps import Tokenized, _step_loss, reference_logprobs, train_vector

HOOK = "blocks.6.hook_resid_post"
VOCAB = 64


# --- a tiny random Gemma 3 --------------------------------------------------------------------
def _word_tokenizer():
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, num_hidden_layers=3, sliding_window=4,
                              query_pre_attn_scalar=16, max_position_embeddings=64, initializer_range=0.2,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    Gemma3ForCausalLM(config).save_pretrained(folder)
    _word_tokenizer().save_pretrained(folder)
    return load_model(str(folder), device="cpu")


def _words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


# --- interventions ------------------------------------------------------------------------------
def test_null_out_removes_exactly_the_positive_component():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(3, 7, 16, generator=g) * 5, torch.randn(16, generator=g)
    for b in (0.0, 1.5, -2.0):
        out = phi_null(h, w, b)
        proj, new = h @ w, out @ w
        # along w the projection is clamped at −b; where it was already below −b nothing changes
        assert torch.allclose(new, torch.minimum(proj, torch.tensor(-b)), atol=1e-4)
        unit = w / w.norm()
        orth = h - (h @ unit)[..., None] * unit
        assert torch.allclose(out - (out @ unit)[..., None] * unit, orth, atol=1e-4)
        below = proj + b <= 0
        assert torch.equal(out[below], h[below])


@pytest.mark.real_model
def test_alpha_zero_leaves_logits_unchanged_and_hooks_come_off(gemma):
    ids = gemma.tokenizer("The match ended in a draw after extra time", return_tensors="pt").input_ids
    w = torch.randn(gemma.facts.d_model) * 300
    with torch.no_grad():
        clean = gemma.bridge(ids)
        with steering(gemma, HOOK, w, 0.0):
            zero = gemma.bridge(ids)
        with row_interventions(gemma, HOOK, w, torch.tensor(0.0), torch.zeros(1), torch.zeros(1, dtype=torch.bool)):
            zero_rows = gemma.bridge(ids)
        with steering(gemma, HOOK, w, 0.5):
            steered = gemma.bridge(ids)
        after = gemma.bridge(ids)
    assert torch.equal(zero, clean) and torch.equal(zero_rows, clean) and torch.equal(after, clean)
    assert (steered - clean).abs().max() > 1.0


@pytest.mark.real_model
def test_interventions_compose_and_start_position(gemma):
    from scope.hooks import capture

    ids = gemma.tokenizer("Shares fell sharply on the stock market today", return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(1)
    w1, w2 = torch.randn(640, generator=g) * 50, torch.randn(640, generator=g) * 50
    base = capture(gemma, ids, [HOOK])[HOOK]
    with steering(gemma, HOOK, w1, 1.0), steering(gemma, HOOK, w2, 2.0):
        both = capture(gemma, ids, [HOOK])[HOOK]
    assert torch.allclose(both, base + w1 + 2 * w2, atol=1e-2)
    with steering(gemma, HOOK, w1, 1.0, start=4):
        late = capture(gemma, ids, [HOOK])[HOOK]
    assert torch.equal(late[:, :4], base[:, :4])
    assert torch.allclose(late[:, 4:], base[:, 4:] + w1, atol=1e-2)
    b = 10.0
    with null_out(gemma, HOOK, w1, b):
        nulled = capture(gemma, ids, [HOOK])[HOOK]
    assert torch.allclose(nulled @ w1, torch.minimum(base @ w1, torch.tensor(-b)), rtol=1e-4, atol=1.0)


def test_steering_checks_its_vector(tiny):
    with pytest.raises(ScopeError, match="shape"):
        with steering(tiny, "blocks.1.hook_resid_post", torch.ones(5), 1.0):
            pass
    with pytest.raises(ScopeError, match="zero vector"):
        with null_out(tiny, "blocks.1.hook_resid_post", torch.zeros(32)):
            pass
    with pytest.raises(ScopeError, match="unknown hook point"):
        with steering(tiny, "blocks.9.hook_resid_post", torch.ones(32), 1.0):
            pass
    with pytest.raises(ScopeError, match="NaN"):
        with steering(tiny, "blocks.1.hook_resid_post", torch.full((32,), float("nan")), 1.0):
            pass


@pytest.mark.parametrize("temperature,alpha,message", [
    (float("nan"), 1.0, "need a finite temperature >= 0 and top_k > 0, got nan"),
    (float("inf"), 1.0, "need a finite temperature >= 0 and top_k > 0, got inf"),
    (0.7, float("nan"), "steering factor α nan is not a finite number"),
    (0.7, float("-inf"), "steering factor α -inf is not a finite number"),
])
def test_generation_refuses_a_temperature_or_factor_that_is_not_finite(tiny, temperature, alpha, message):
    rows = RowSteer("blocks.1.hook_resid_post", torch.ones(32), 0.0, torch.tensor([alpha]), torch.tensor([False]))
    with pytest.raises(ScopeError, match=re.escape(message)):
        generate(tiny, ["a"], max_new_tokens=2, temperature=temperature, rows=rows)


def test_cached_generation_matches_a_full_forward_and_steering_holds_through_it(tiny):
    """Greedy decoding with the KV cache equals argmax over full forwards, with and without steering."""
    hook, w = "blocks.1.hook_resid_post", torch.randn(32, generator=torch.Generator().manual_seed(3)) * 3
    prompt = _words([5, 9, 11, 20, 7])

    def by_hand(alpha: float) -> list[int]:
        ids = torch.tensor([[2, 5, 9, 11, 20, 7]])
        with torch.no_grad(), steering(tiny, hook, w, alpha):
            for _ in range(6):
                ids = torch.cat([ids, tiny.hf_model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
        return ids[0, 6:].tolist()

    for alpha in (0.0, 1.0):
        with steering(tiny, hook, w, alpha):
            text = generate(tiny, [prompt], max_new_tokens=6, temperature=0)[0]
        assert tiny.tokenizer(text, add_special_tokens=False)["input_ids"] == by_hand(alpha)
    rows = RowSteer(hook, w, 0.0, torch.tensor([0.0, 1.0]), torch.tensor([False, False]))
    assert [tiny.tokenizer(t, add_special_tokens=False)["input_ids"] for t in
            generate(tiny, [prompt, prompt], max_new_tokens=6, temperature=0, rows=rows)] == [by_hand(0.0), by_hand(1.0)]


# --- the RePS loss ------------------------------------------------------------------------------
def test_reps_loss_formula_on_numbers():
    # one example: ref log p(y|x) = -10, log p(y^c|x) = -16 -> β⁺ = 6, β⁻ = max(-6, 1) = 1
    args = [torch.tensor([v]) for v in (-8.0, -12.0, -9.0, -20.0, -10.0, -16.0, 4, 5)]
    d_pos = 6 / 5 * -8.0 - (-12.0) / 4
    d_neg = 1 / 4 * -9.0 - (-20.0) / 5
    expected = -math.log(1 / (1 + math.exp(-d_pos))) - math.log(1 / (1 + math.exp(-d_neg)))
    assert reps_loss(*args).item() == pytest.approx(expected, rel=1e-6)


def test_reps_loss_matches_a_hand_computation_on_a_tiny_model(tiny):
    """scope's batched, hooked RePS loss equals one computed row by row with plain torch hooks."""
    layer = 1
    t = Tokenized(x=[[5, 6, 7], [8, 9]], y=[[10, 11], [12, 13, 14]], yc=[[20, 21, 22], [23]])
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(32, generator=g) * 2, torch.tensor(0.7)
    alpha = torch.tensor([0.5, 2.0])
    cfg = SteerConfig(concept="x:y", layer=layer, method="reps")
    ref = reference_logprobs(tiny, t)
    got = _step_loss(tiny, cfg, t, [0, 1], alpha, ref, w, b)

    block = tiny.hf_model.model.layers[layer]

    def logp(x, y, edit=None) -> float:
        def fwd_hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h = edit(h)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handle = block.register_forward_hook(fwd_hook) if edit else None
        try:
            with torch.no_grad():
                ids = torch.tensor([[2, *x, *y]])
                lp = tiny.hf_model(ids).logits[0].double().log_softmax(-1)
        finally:
            if handle:
                handle.remove()
        return sum(float(lp[len(x) + i, tok]) for i, tok in enumerate(y))

    losses = []
    for i in range(2):
        x, y, yc, a = t.x[i], t.y[i], t.yc[i], float(alpha[i])
        steer = lambda h: h + a * w  # noqa: E731
        null = lambda h: h - torch.relu(h @ w + b)[..., None] / (w @ w) * w  # noqa: E731
        r_y, r_yc = logp(x, y), logp(x, yc)
        assert r_y == pytest.approx(float(ref[0][i]), abs=1e-4) and r_yc == pytest.approx(float(ref[1][i]), abs=1e-4)
        beta_p, beta_m = max(r_y - r_yc, 1.0), max(r_yc - r_y, 1.0)
        d_pos = beta_p / len(yc) * logp(x, yc, steer) - logp(x, y, steer) / len(y)
        d_neg = beta_m / len(y) * logp(x, y, null) - logp(x, yc, null) / len(yc)
        losses.append(math.log1p(math.exp(-d_pos)) + math.log1p(math.exp(-d_neg)))
    assert float(got.detach()) == pytest.approx(sum(losses) / 2, rel=1e-4)


def test_only_the_steering_parameters_train_and_a_run_folder_keeps_its_config(tiny, tmp_path):
    data = _tiny_concept()
    cfg = SteerConfig(model="tiny", concept="tiny", layer=1, method="reps", n_train=4, epochs=3, batch_size=2,
                      lr=0.05, factors=[0.5, 1.0])
    before = {k: v.clone() for k, v in tiny.hf_model.state_dict().items()}
    vec = train_vector(tiny, data, cfg, tmp_path / "run", progress=False)
    assert all(torch.equal(v, tiny.hf_model.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in tiny.hf_model.parameters())  # restored after training
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert vec.method == "reps" and vec.info["steps"] == 6 and vec.w.norm() > 0
    saved = load_vector(tmp_path / "run")
    assert torch.equal(saved.w, vec.w) and saved.b == pytest.approx(vec.b)
    with pytest.raises(ScopeError, match="different config"):
        train_vector(tiny, data, cfg.model_copy(update={"lr": 0.1}), tmp_path / "run", progress=False)


def test_resume_from_a_mid_run_checkpoint(tiny, tmp_path):
    data = _tiny_concept()
    cfg = SteerConfig(model="tiny", concept="tiny", layer=1, method="lm", n_train=4, epochs=5, batch_size=2,
                      lr=0.05, factors=[1.0])
    full = train_vector(tiny, data, cfg, tmp_path / "full", progress=False)
    part = tmp_path / "part"
    # the same run, killed during step 6 (after the checkpoint at step 5)
    import scope.steering.reps as reps

    calls = {"n": 0}
    real = reps._step_loss

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    reps._step_loss = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            train_vector(tiny, data, cfg, part, progress=False)
    finally:
        reps._step_loss = real
    assert json.loads((part / "checkpoint" / "state.json").read_text())["step"] == 5
    resumed = train_vector(tiny, data, cfg, part, progress=False)
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    assert torch.allclose(resumed.w, full.w, atol=1e-6)


def _tiny_concept() -> ConceptData:
    ex = [ConceptExample("tiny", _words([5 + i, 6]), _words([10, 11 + i, 12]), _words([40, 41, 42 + i]))
          for i in range(4)]
    prompts = [EvalPrompt(_words([7, 8 + i]), _words([13, 14])) for i in range(4)]
    return ConceptData("tiny", ex, prompts, positives=[_words([40, 41])] * 4, negatives=[_words([10, 11])] * 4,
                       source="test")


# --- concept data ------------------------------------------------------------------------------
def test_jsonl_concepts_and_their_errors(tmp_path):
    rows = [{"concept": "cats", "instruction": f"Tell me about day {i}.", "response": f"It rained on day {i}.",
             "steered_response": f"My cat slept all of day {i}."} for i in range(40)]
    rows.append({"concept": "cats", "instruction": "Describe your cat.", "suppress": True})
    path = tmp_path / "cats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_jsonl(path)
    assert data.concept == "cats" and [p.instruction for p in data.suppress_prompts] == ["Describe your cat."]
    assert len(data.train) + len(data.steer_prompts) + len(data.positives) == 40
    assert {e.instruction for e in data.train}.isdisjoint(p.instruction for p in data.steer_prompts)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"concept": "cats", "instruction": "x", "response": "y"}) + "\n")
    with pytest.raises(ScopeError, match="steered_response"):
        load_jsonl(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ScopeError, match="not valid JSON"):
        load_jsonl(bad)
    bad.write_text("\n")
    with pytest.raises(ScopeError, match="no examples"):
        load_jsonl(bad)
    with pytest.raises(ScopeError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")
    rows = [dict(r, steered_response="  ") for r in rows[:40]]
    bad.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ScopeError, match="empty response"):
        load_jsonl(bad)


@pytest.mark.real_model
def test_corpus_concept_builder(gemma):
    data = build_concept("bbc:sport", gemma.tokenizer, n_train=6, n_eval=4, response_tokens=12, n_classifier=8)
    assert data.concept == "bbc:sports"  # 'sport' resolves to the corpus label 'sports'
    assert len(data.train) == 6 and len(data.steer_prompts) == len(data.suppress_prompts) == 4
    e = data.train[0]
    assert e.instruction.startswith("Write a short paragraph about ") and e.response and e.steered_response
    n = len(gemma.tokenizer(e.steered_response, add_special_tokens=False)["input_ids"])
    assert 8 <= n <= 14
    assert {p.instruction for p in data.steer_prompts}.isdisjoint(x.instruction for x in data.train)
    with pytest.raises(ScopeError, match="labels are"):
        build_concept("bbc:cooking", gemma.tokenizer)
    with pytest.raises(ScopeError, match="CORPUS:LABEL"):
        build_concept("sport", gemma.tokenizer)
    with pytest.raises(ScopeError, match="needed"):
        build_concept("bbc:sport", gemma.tokenizer, n_train=5000)


# --- DiffMean -----------------------------------------------------------------------------------
@pytest.mark.real_model
def test_diffmean_from_the_store_equals_a_direct_computation(small_store):
    w, info = diffmean(small_store, HOOK, "bbc:sport")
    assert info["label"] == "sports"
    xs, docs = [], []
    for b in small_store.rows([HOOK], batch_size=1024, shuffle=False):
        xs.append(b.acts[HOOK].double())
        docs.append(b.doc_id)
    x, doc = torch.cat(xs), torch.cat(docs)
    labels = small_store.labels
    is_in = torch.tensor([labels[int(d)] == "sports" for d in doc])
    d = x[is_in].mean(0) - x[~is_in].mean(0)
    scale = float(((x - x.mean(0)) ** 2).sum(1).mean().sqrt())
    assert info["scale"] == pytest.approx(scale, rel=1e-6)
    assert torch.allclose(w.double(), d / d.norm() * scale, rtol=1e-5, atol=1e-3)
    assert info["b"] == pytest.approx(-float(x.mean(0) @ w.double()), rel=1e-5)
    stats = diffmean_stats(small_store, HOOK, "sports")
    assert stats["rows_in"] == int(is_in.sum()) and stats["rows_out"] == int((~is_in).sum())
    with pytest.raises(ScopeError, match="labels are"):
        diffmean(small_store, HOOK, "bbc:cooking")
    with pytest.raises(ScopeError, match="holds 'bbc'"):
        diffmean(small_store, HOOK, "wiki:People")
    with pytest.raises(ScopeError, match="no hook"):
        diffmean(small_store, "blocks.9.hook_resid_post", "bbc:sport")


# --- scoring -------------------------------------------------------------------------------------
def test_harmonic_mean_is_zero_when_any_rating_is_zero():
    hm = harmonic_mean(np.array([2.0, 1.0, 0.0]), np.array([2.0, 2.0, 2.0]), np.array([2.0, 0.5, 1.0]))
    assert hm[0] == pytest.approx(2.0) and hm[1] == pytest.approx(3 / (1 + 0.5 + 2)) and hm[2] == 0.0


def test_judge_prompts_and_parsing():
    import httpx

    from scope.steering.judge import Judge

    seen = []

    def reply(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body["messages"][0]["content"])
        score = {0: "Rating: [[2]]", 1: "so... Rating: [[1]]", 2: "no rating here"}[(len(seen) - 1) % 3]
        return httpx.Response(200, json={"choices": [{"message": {"content": score}}]})

    judge = Judge(url="http://judge.local/v1", model="m", transport=httpx.MockTransport(reply))
    s = judge.rate("football", ["Write about trains."], ["The striker scored twice."])
    assert "football" in seen[0] and "Write about trains." in seen[1] and "The striker" in seen[2]
    assert (s["concept"][0], s["relevance"][0], s["fluency"][0], s["harmonic"][0]) == (2.0, 1.0, 0.0, 0.0)
    assert Judge.from_env(None) is None or Judge.from_env(None).url  # off unless a URL is configured


# --- a short real training raises the concept score ------------------------------------------------
@pytest.mark.real_model
def test_short_reps_training_raises_the_concept_score_on_held_out_prompts(gemma, tmp_path):
    from scope.steering import evaluate_vector, fit_scorer

    data = build_concept("bbc:sport", gemma.tokenizer, n_train=8, n_eval=6, response_tokens=12, n_classifier=32,
                         text_tokens=16)
    cfg = SteerConfig(concept="bbc:sport", method="reps", n_train=8, epochs=2, batch_size=2, lr=0.02)
    vec = train_vector(gemma, data, cfg, tmp_path / "run", progress=False)
    assert load_vector(tmp_path / "run").w.shape == (640,)
    scorer = fit_scorer(gemma, data)
    assert scorer.fit.cv_accuracy > 0.8  # the offline judge of the concept works at all
    r = evaluate_vector(gemma, vec, data, scorer, alphas=[0.5], max_new_tokens=16, progress=False,
                        suppression=False)
    steered = [(s.concept * s.n + q.concept * q.n) / (s.n + q.n) for s, q in zip(r.select, r.report)]
    assert r.alphas == [0.0, 0.5]
    assert steered[1] > steered[0] + 0.3, steered  # concept rating (0–2) on prompts never trained on


# --- CLI -------------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_cli_train_generate_eval_and_errors(small_store, tmp_path):
    runner = CliRunner()
    out = tmp_path / "dm"
    args = ["steer", "train", "--concept", "bbc:sport", "--method", "diffmean", "--store", small_store.url,
            "--layer", "6", "--out", str(out), "--n-train", "4", "--n-eval", "4", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    meta = json.loads(r.output)["vector"]
    assert meta["method"] == "diffmean" and meta["norm_over_scale"] == pytest.approx(1.0, rel=1e-4)
    again = runner.invoke(app, args)  # a finished run folder is reused
    assert again.exit_code == 0 and json.loads(again.output)["vector"]["norm"] == meta["norm"]
    r = runner.invoke(app, args[:-1] + ["--seed", "1"])
    assert r.exit_code == 2 and "different config" in r.output
    r = runner.invoke(app, ["steer", "generate", str(out), "--prompt", "Write a short paragraph about trains.\n\n",
                            "--alpha", "0", "--alpha", "0.5", "--new-tokens", "8", "--json"])
    assert r.exit_code == 0, r.output
    gens = json.loads(r.output)["generations"]
    assert [g["alpha"] for g in gens] == [0.0, 0.5] and all(g["text"] for g in gens)
    r = runner.invoke(app, ["steer", "eval", str(out), "--alphas", "0.25", "--new-tokens", "6",
                            "--classifier-texts", "16", "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output)
    assert ev["alphas"] == [0.0, 0.25] and 0 <= ev["steer"]["harmonic"] <= 2 and ev["suppress"] is not None
    assert (out / "eval.json").is_file() and (out / "score_vs_alpha.html").is_file()
    for bad, msg in ((["steer", "eval", str(tmp_path)], "not a steering run folder"),
                     (["steer", "train", "--concept", "bbc:sport", "--method", "sae", "--out", str(tmp_path / "x")],
                      "--method must be"),
                     (["steer", "train", "--concept", "bbc:sport", "--factors", "1,-2", "--out", str(tmp_path / "y")],
                      "factors")):
        r = runner.invoke(app, bad)
        assert r.exit_code == 2 and msg in r.output, r.output
