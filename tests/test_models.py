"""Model loading: tiny random Gemma 1/2/3 folders and a tiny GGUF written here, the facts read
from their configs, bridge logits against the Hugging Face model, and the error paths.

Logits are compared in float32 with ``atol=1e-4`` (the random weights are drawn with
``initializer_range=0.2`` so the logits have a standard deviation of order 1, not 0.01, and the
tolerance is meaningful). Inputs are longer than every sliding window, so local attention matters.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import scope.models as models
from scope.errors import ScopeError
from scope.models import load_model, read_facts

ATOL = 1e-4
VOCAB = 512
SEQ = 16  # longer than every sliding window below


def _tokenizer(vocab_size: int):
    """A word-level tokenizer whose vocabulary has exactly ``vocab_size`` entries."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16,
               max_position_embeddings=128, initializer_range=0.2)

# name -> (config class, model class, config kwargs, expected facts)
CHECKPOINTS = {
    "gemma1": (
        "GemmaConfig", "GemmaForCausalLM",
        dict(_COMMON, num_hidden_layers=2, num_key_value_heads=1,
             rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
        dict(architecture="GemmaForCausalLM", n_layers=2, n_kv_heads=1, layer_types=("global", "global"),
             sliding_window=None, rope_base={"local": 5000.0, "global": 5000.0}, final_logit_softcap=None),
    ),
    "gemma2": (
        "Gemma2Config", "Gemma2ForCausalLM",
        dict(_COMMON, num_hidden_layers=4, num_key_value_heads=2, sliding_window=4, query_pre_attn_scalar=16,
             final_logit_softcapping=3.0, attn_logit_softcapping=5.0,
             rope_parameters={"rope_type": "default", "rope_theta": 2000.0}),
        dict(architecture="Gemma2ForCausalLM", n_layers=4, n_kv_heads=2,
             layer_types=("local", "global", "local", "global"),
             sliding_window=4, rope_base={"local": 2000.0, "global": 2000.0}, final_logit_softcap=3.0),
    ),
    "gemma3": (
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        dict(_COMMON, num_hidden_layers=5, num_key_value_heads=2, sliding_window=4, query_pre_attn_scalar=16,
             layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                          "full_attention"],
             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                              "full_attention": {"rope_type": "default", "rope_theta": 20000.0}}),
        dict(architecture="Gemma3ForCausalLM", n_layers=5, n_kv_heads=2,
             layer_types=("local", "global", "local", "local", "global"),
             sliding_window=4, rope_base={"local": 100.0, "global": 20000.0}, final_logit_softcap=None),
    ),
}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    """(folder, expected facts, loaded model) for one tiny random checkpoint, built and loaded once."""
    import transformers

    config_cls, model_cls, kwargs, expected = CHECKPOINTS[request.param]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    _tokenizer(VOCAB).save_pretrained(folder)
    return folder, expected, load_model(str(folder), device="cpu")


def _input_ids(vocab_size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (2, SEQ), generator=g)


def test_folder_facts(checkpoint):
    folder, expected, lm = checkpoint
    f = lm.facts
    assert (f.d_model, f.n_heads, f.d_head, f.d_mlp, f.d_vocab) == (64, 4, 16, 128, VOCAB)
    for key, value in expected.items():
        assert getattr(f, key) == value, key
    assert f.model_id == str(folder) and f.revision is None
    assert [f.rope_base_of(i) for i in range(f.n_layers)] == [expected["rope_base"][t] for t in f.layer_types]
    assert lm.dtype == torch.float32 and lm.device == torch.device("cpu")
    assert lm.tokenizer.bos_token_id == 2 and len(lm.tokenizer) == VOCAB
    assert lm.hf_model.config._attn_implementation == "eager"
    assert lm.bridge.cfg.n_layers == f.n_layers


def test_folder_logits_match_hf(checkpoint):
    from transformers import AutoModelForCausalLM

    folder, expected, lm = checkpoint
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    ids = _input_ids(VOCAB)
    with torch.no_grad():
        want = hf(ids).logits
        got = lm.bridge(ids)
    assert got.shape == (2, SEQ, VOCAB)
    assert want.std() > 0.5  # the tolerance below is small next to the logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    if expected["final_logit_softcap"] is not None:
        assert got.abs().max() < expected["final_logit_softcap"]


# ---- read_facts on in-memory configs --------------------------------------------------------


def test_read_facts_gemma2_config():
    from transformers import Gemma2Config

    config = Gemma2Config(num_hidden_layers=6, architectures=["Gemma2ForCausalLM"])
    f = read_facts(config, model_id="some/gemma2", revision="abc")
    assert (f.model_id, f.revision, f.architecture) == ("some/gemma2", "abc", "Gemma2ForCausalLM")
    assert (f.n_layers, f.d_model, f.n_heads, f.n_kv_heads, f.d_head, f.d_mlp, f.d_vocab) == (
        6, 2304, 8, 4, 256, 9216, 256000)
    assert f.layer_types == ("local", "global") * 3
    assert f.sliding_window == 4096
    assert f.rope_base == {"local": 10000.0, "global": 10000.0}
    assert f.rope_scaling == {"local": None, "global": None}
    assert f.final_logit_softcap == 30.0


def test_read_facts_gemma3_multimodal_config_uses_text_config():
    from transformers import Gemma3Config, Gemma3TextConfig

    text = Gemma3TextConfig(
        num_hidden_layers=12, hidden_size=2560, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        intermediate_size=10240, vocab_size=262208, sliding_window=1024,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
    )
    config = Gemma3Config(text_config=text.to_dict(), architectures=["Gemma3ForConditionalGeneration"])
    f = read_facts(config, model_id="google/gemma-3-4b-pt")
    assert f.architecture == "Gemma3ForConditionalGeneration"
    assert (f.n_layers, f.d_model, f.n_heads, f.n_kv_heads, f.d_head, f.d_mlp, f.d_vocab) == (
        12, 2560, 8, 4, 256, 10240, 262208)
    assert [i for i, t in enumerate(f.layer_types) if t == "global"] == [5, 11]
    assert f.sliding_window == 1024
    assert f.rope_base == {"local": 10000.0, "global": 1000000.0}
    assert f.rope_scaling == {"local": None, "global": {"rope_type": "linear", "factor": 8.0}}
    assert f.rope_base_of(5) == 1e6 and f.rope_base_of(4) == 1e4
    assert f.final_logit_softcap is None


def test_read_facts_old_config_layouts():
    """Configs written by transformers 4.5x have no ``layer_types`` / ``rope_parameters``."""
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                intermediate_size=128, vocab_size=VOCAB, sliding_window=8)
    g2 = SimpleNamespace(model_type="gemma2", num_hidden_layers=4, rope_theta=10000.0, rope_scaling=None,
                         final_logit_softcapping=30.0, **base)
    f = read_facts(g2, model_id="old-gemma2")
    assert f.layer_types == ("local", "global", "local", "global")
    assert f.rope_base == {"local": 10000.0, "global": 10000.0}
    assert f.sliding_window == 8 and f.final_logit_softcap == 30.0

    g3 = SimpleNamespace(model_type="gemma3_text", num_hidden_layers=12, rope_theta=1e6, rope_local_base_freq=1e4,
                         rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window_pattern=6, **base)
    f = read_facts(g3, model_id="old-gemma3")
    assert [i for i, t in enumerate(f.layer_types) if t == "global"] == [5, 11]
    assert f.rope_base == {"local": 1e4, "global": 1e6}
    assert f.rope_scaling == {"local": None, "global": {"rope_type": "linear", "factor": 8.0}}


@pytest.mark.real_model
def test_real_gemma3_270m_facts(gemma):
    f = gemma.facts
    assert f.architecture == "Gemma3ForCausalLM"
    assert (f.n_layers, f.d_model, f.n_heads, f.n_kv_heads, f.d_head, f.d_mlp, f.d_vocab) == (
        18, 640, 4, 1, 256, 2048, 262144)
    assert f.sliding_window == 512
    assert [i for i, t in enumerate(f.layer_types) if t == "global"] == [5, 11, 17]
    assert f.rope_base == {"local": 1e4, "global": 1e6}
    assert f.revision and f.revision.startswith("gguf-sha256:")
    assert gemma.bridge.cfg.n_layers == 18


# ---- error paths ------------------------------------------------------------------------------


def test_unknown_spec_names_it_and_the_accepted_forms():
    with pytest.raises(ScopeError) as err:
        load_model("not-a-model", device="cpu")
    msg = str(err.value)
    assert "'not-a-model'" in msg and "gemma-3-270m" in msg and ".gguf" in msg


def test_missing_gguf_file(tmp_path):
    path = str(tmp_path / "missing.gguf")
    with pytest.raises(ScopeError, match="does not exist") as err:
        load_model(path, device="cpu")
    assert path in str(err.value)


def test_folder_without_config(tmp_path):
    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ScopeError, match="config.json") as err:
        load_model(str(folder), device="cpu")
    assert str(folder) in str(err.value)


def test_unknown_dtype(tmp_path):
    with pytest.raises(ScopeError, match="'int8'"):
        load_model(str(tmp_path), dtype="int8", device="cpu")


def test_hub_id_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import; this is what a process started with it sees.
    # Without it the client would retry the (unreachable) network for ~30 s before failing.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-scope-test-cache")  # never find a cached copy
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", "/nonexistent-scope-test-cache")
    with pytest.raises(ScopeError) as err:
        load_model("google/gemma-2-2b", device="cpu")
    msg = str(err.value)
    assert "google/gemma-2-2b" in msg
    assert "download" in msg and "local folder" in msg


# ---- GGUF ---------------------------------------------------------------------------------------

GGUF_LAYERS = 6  # transformers gives a GGUF Gemma 3 the default pattern: layer 5 is global


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A float32 Gemma 3 GGUF written with ``gguf.GGUFWriter`` from a random HF model; (path, HF model)."""
    import gguf
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    from transformers.modeling_gguf_pytorch_utils import Gemma2TensorProcessor, get_gguf_hf_weights_map

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [chr(c) for c in range(97, 123)] + ["\u2581"]
    tokens += ["\u2581" + chr(c) for c in range(97, 123)]
    tokens += [f"<unused{i}>" for i in range(len(tokens), 256)]
    # Only what a GGUF can say: query_pre_attn_scalar, the local RoPE base and the layer pattern
    # are transformers' defaults on the way back in, so the reference model uses them too.
    config = Gemma3TextConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=GGUF_LAYERS,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=4,
        max_position_embeddings=128, initializer_range=0.2,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 50000.0}},
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    to_gguf = {hf: g for g, hf in get_gguf_hf_weights_map(model, Gemma2TensorProcessor()).items()}

    path = tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_name("tiny gemma3")
    w.add_context_length(128)
    w.add_block_count(GGUF_LAYERS)
    w.add_feed_forward_length(128)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(1)
    w.add_key_length(16)
    w.add_value_length(16)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(50000.0)
    w.add_sliding_window(4)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([3, 3, 3, 2] + [1] * (len(tokens) - 4))  # control, control, control, unknown, normal...
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_unk_token_id(3)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding
            continue
        array = tensor.detach().float().numpy()
        if "norm.weight" in to_gguf[name]:  # llama.cpp stores Gemma's RMSNorm scale as 1 + w
            array = array + 1
        w.add_tensor(to_gguf[name], array.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, model


def test_gguf_loads_and_conversion_is_cached(tiny_gguf, tmp_path, monkeypatch):
    path, reference = tiny_gguf
    monkeypatch.setenv("SCOPE_CACHE", str(tmp_path / "cache"))
    calls = []
    convert = models._convert_gguf
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: (calls.append(a), convert(*a))[1])

    lm = load_model(str(path), device="cpu")
    assert len(calls) == 1
    (target,) = (tmp_path / "cache" / "models").iterdir()
    assert target.name.startswith("tiny-gemma3-") and (target / "config.json").exists()
    f = lm.facts
    assert f.revision == f"gguf:{target.name.rsplit('-', 1)[-1]}" and f.model_id == str(path)
    assert (f.n_layers, f.d_model, f.n_heads, f.n_kv_heads, f.d_head, f.d_mlp, f.d_vocab) == (
        GGUF_LAYERS, 64, 4, 1, 16, 128, 256)
    assert f.layer_types == ("local",) * 5 + ("global",)
    assert f.sliding_window == 4 and f.rope_base == {"local": 10000.0, "global": 50000.0}
    assert lm.tokenizer.convert_ids_to_tokens(lm.tokenizer("ab c").input_ids) == ["<bos>", "a", "b", "\u2581c"]

    ids = _input_ids(256)
    with torch.no_grad():
        want = reference(ids).logits
        got = lm.bridge(ids)
    assert want.std() > 0.5
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)

    # Second load: served from the cache, nothing rewritten, no stray temporary folders.
    weights = target / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = load_model(str(path), device="cpu")
    assert len(calls) == 1
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [target.name]
    assert weights.stat().st_mtime_ns == stamp
    assert again.facts == f
    with torch.no_grad():
        torch.testing.assert_close(again.bridge(ids), got, atol=0, rtol=0)

    # A changed file is a different cache entry, converted afresh.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    load_model(str(path), device="cpu")
    assert len(calls) == 2
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2
