"""Hooks and text sources, on the real Gemma 3 270M and the bundled corpora."""

from __future__ import annotations

import json

import pytest
import torch

from scope.data import BUNDLED_CORPORA, iter_windows, open_source
from scope.errors import ScopeError
from scope.hooks import capture, check_hooks, hook_layer, hook_names

pytestmark = pytest.mark.real_model
PROMPT = "The Eiffel Tower is located in the city of"


def test_eiffel_tower_is_in_paris(gemma):
    ids = gemma.tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids[0, 0] == gemma.tokenizer.bos_token_id
    with torch.no_grad():
        logits = gemma.bridge(ids)
    assert gemma.tokenizer.decode(logits[0, -1].argmax()) == " Paris"


def test_captured_residual_stream_equals_hugging_face_hidden_states(gemma):
    ids = gemma.tokenizer([PROMPT, "Sparse autoencoders find features."], return_tensors="pt", padding=True)
    hooks = [f"blocks.{i}.hook_resid_post" for i in (0, 6, 17)]
    got = capture(gemma, ids.input_ids, hooks, attention_mask=ids.attention_mask)
    last_block = {}
    handle = gemma.hf_model.model.layers[17].register_forward_hook(
        lambda mod, args, out: last_block.setdefault("x", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            hs = gemma.hf_model(**ids, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    # hidden_states[i + 1] is block i's output, except that the last entry is after the final norm,
    # so block 17 is compared with a forward hook on the layer itself. Tolerance: 1e-5 of the scale.
    for i, want in ((0, hs[1]), (6, hs[7]), (17, last_block["x"])):
        x = got[f"blocks.{i}.hook_resid_post"]
        assert (x - want).abs().max() <= 1e-5 * want.abs().max(), i


def test_capture_stops_after_the_deepest_hook(gemma):
    calls = {"layer7": 0, "lm_head": 0}
    h1 = gemma.hf_model.model.layers[7].register_forward_hook(lambda *a: calls.__setitem__("layer7", calls["layer7"] + 1))
    h2 = gemma.hf_model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1))
    try:
        ids = gemma.tokenizer(PROMPT, return_tensors="pt").input_ids
        got = capture(gemma, ids, ["blocks.6.hook_resid_post", "blocks.3.hook_mlp_out"])
        assert calls == {"layer7": 0, "lm_head": 0}
        capture(gemma, ids, ["blocks.17.hook_resid_post"])
        assert calls["lm_head"] == 0, "the unembedding never runs for block hooks"
    finally:
        h1.remove()
        h2.remove()
    assert set(got) == {"blocks.6.hook_resid_post", "blocks.3.hook_mlp_out"}


def test_per_head_hooks(gemma):
    ids = gemma.tokenizer(PROMPT, return_tensors="pt").input_ids
    t = ids.shape[1]
    got = capture(gemma, ids, ["blocks.5.attn.hook_q", "blocks.5.attn.hook_k", "blocks.5.attn.hook_v",
                               "blocks.5.attn.hook_pattern", "blocks.5.attn.hook_rot_q"])
    assert got["blocks.5.attn.hook_q"].shape == (1, t, 4, 256)
    assert got["blocks.5.attn.hook_k"].shape == (1, t, 1, 256)
    assert got["blocks.5.attn.hook_v"].shape == (1, t, 1, 256)
    pattern = got["blocks.5.attn.hook_pattern"]
    assert pattern.shape == (1, 4, t, t)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(1, 4, t))
    assert pattern.triu(1).abs().max() == 0, "causal"
    # RoPE rotates pairs, so it keeps the norm of every query vector (before QK-norm there is none).
    assert not torch.allclose(got["blocks.5.attn.hook_q"], got["blocks.5.attn.hook_rot_q"])


def test_bad_hook_name_lists_the_closest_valid_names(gemma):
    with pytest.raises(ScopeError, match=r"blocks\.6\.hook_resid_pots.*closest valid names: blocks\.6\.hook_resid_post"):
        check_hooks(gemma, ["blocks.6.hook_resid_pots"])
    with pytest.raises(ScopeError, match=r"blocks\.18\.hook_resid_post.*blocks\.17"):
        check_hooks(gemma, ["blocks.18.hook_resid_post"])
    names = hook_names(gemma)
    assert "blocks.6.hook_resid_post" in names and "blocks.0.attn.hook_rot_k" in names
    assert hook_layer("blocks.12.attn.hook_q", 18) == 12 and hook_layer("hook_embed", 18) == -1
    assert hook_names(gemma, "attn.hook_rot_k") == [f"blocks.{i}.attn.hook_rot_k" for i in range(18)]
    # A filter that matches nothing is a typo, not an empty model: it names the part it meant.
    with pytest.raises(ScopeError, match=r"no hook point of gemma-3-270m contains 'resid_pots'; closest name parts: "
                                         r"hook_resid_post; drop --contains to list all"):
        hook_names(gemma, "resid_pots")


# --- text sources --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,label_name,labels,min_docs", [
    ("wiki", "topic", 12, 10_000), ("bbc", "category", 5, 2_225), ("tweets", "sentiment", 2, 30_000)])
def test_bundled_corpora(name, label_name, labels, min_docs):
    src = open_source(name)
    docs = src.documents(seed=None)
    assert src.label_name == label_name and len(docs) >= min_docs
    assert len({d.label for d in docs}) >= labels
    assert [d.doc_id for d in docs] == list(range(len(docs)))
    assert docs == sorted(src.documents(seed=3), key=lambda d: d.doc_id)


def test_windows_start_with_bos_and_keep_documents_apart(gemma):
    docs = open_source("bbc").documents(seed=0)[:3]
    windows = list(iter_windows(gemma.tokenizer, docs, context=64))
    bos = gemma.tokenizer.bos_token_id
    assert all(w.tokens[0] == bos and 2 <= len(w.tokens) <= 64 for w in windows)
    for d in docs:
        mine = [w for w in windows if w.doc_id == d.doc_id]
        joined = [t for w in mine for t in w.tokens[1:]]
        assert joined == gemma.tokenizer(d.text, add_special_tokens=False).input_ids
        assert [w.start for w in mine] == list(range(0, len(joined), 63))


def test_local_jsonl_source_through_datasets(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document {i}", "label": i % 2}) for i in range(5)))
    src = open_source(str(path))
    docs = src.documents(seed=None)
    assert [d.text for d in docs] == [f"document {i}" for i in range(5)] and docs[1].label == "1"
    with pytest.raises(ScopeError, match="no column 'body'"):
        open_source(str(path), text_column="body")


def test_unknown_corpus_is_a_clear_error():
    with pytest.raises(ScopeError, match=r"unknown corpus 'wikipedia'.*bbc.*tweets.*wiki"):
        open_source("wikipedia")
    assert set(BUNDLED_CORPORA) == {"wiki", "bbc", "tweets"}
