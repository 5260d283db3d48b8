"""Transcoders (issue 18): the Gemma Scope 2 import defects, the transcoder kind, training, evaluation, interop.

Gemma Scope 2 folders are written here in the release's own form: ``<site>/layer_L_width_16k_l0_small[_affine]/``
holding ``params.safetensors`` (lower-case ``w_enc``, ``w_dec``, ``b_enc``, ``b_dec``, ``threshold`` and, for the
affine transcoders, ``affine_skip_connection``) and a ``config.json`` with ``type``, ``affine_connection``,
``hf_hook_point_in``/``hf_hook_point_out``, ``architecture``, ``model_name``, ``width`` and ``l0``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from scope.cli import app
from scope.dictionaries import Transcoder, build, load
from scope.dictionaries.interop import load_any, load_gemma_scope
from scope.errors import ScopeError

D, M = 16, 48
runner = CliRunner()


def gs2_arrays(seed: int = 0, d_in: int = D, d_sae: int = M, d_out: int = D, skip: bool = False) -> dict[str, torch.Tensor]:
    """Gemma Scope 2 tensors, spelt as the release spells them."""
    g = torch.Generator().manual_seed(seed)
    a = {"w_enc": torch.randn(d_in, d_sae, generator=g) * 0.5, "w_dec": torch.randn(d_sae, d_out, generator=g) * 0.5,
         "b_enc": torch.randn(d_sae, generator=g) * 0.1, "b_dec": torch.randn(d_out, generator=g),
         "threshold": torch.rand(d_sae, generator=g) * 0.6 + 0.05}
    if skip:
        a["affine_skip_connection"] = torch.randn(d_in, d_out, generator=g) * 0.3
    return a


def write_gs2(root: Path, site: str, layer: int, kind: str, seed: int = 0, affine: bool = False,
              model: str = "google/gemma-3-270m") -> tuple[Path, dict[str, torch.Tensor]]:
    """One Gemma Scope 2 folder in the release's layout and config.json form."""
    folder = root / site / f"layer_{layer}_width_16k_l0_small{'_affine' if affine else ''}"
    folder.mkdir(parents=True)
    a = gs2_arrays(seed, skip=affine)
    save_file(a, str(folder / "params.safetensors"))
    hf_in = {"resid_post": f"model.layers.{layer}.output",
             "mlp_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
             "attn_out": f"model.layers.{layer}.self_attn.o_proj.input",
             "transcoder": f"model.layers.{layer}.pre_feedforward_layernorm.output"}[site]
    hf_out = f"model.layers.{layer}.post_feedforward_layernorm.output" if kind == "transcoder" else hf_in
    (folder / "config.json").write_text(json.dumps({
        "hf_hook_point_in": hf_in, "hf_hook_point_out": hf_out, "width": M, "model_name": model,
        "architecture": "jump_relu", "l0": 20, "affine_connection": affine, "type": kind}))
    return folder, a


def hand_codes(a: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Gemma Scope 2's reference encoder: relu(pre)·1[pre > θ], pre = x w_enc + b_enc."""
    pre = x @ a["w_enc"] + a["b_enc"]
    return torch.relu(pre) * (pre > a["threshold"])


def hand_output(a: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ŷ = f w_dec + b_dec (+ x · affine_skip_connection), as the Gemma Scope 2 tutorial computes it."""
    y = hand_codes(a, x) @ a["w_dec"] + a["b_dec"]
    return y + x @ a["affine_skip_connection"] if "affine_skip_connection" in a else y


def xs(n: int = 32, d: int = D, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2


# --- 1. the two defects of the Gemma Scope 2 import -------------------------------------------------------
@pytest.mark.parametrize("site,hook", [("resid_post", "blocks.6.hook_resid_post"),
                                       ("mlp_out", "blocks.6.hook_mlp_out")])
def test_gemma_scope_2_sae_config_is_not_a_transcoder(tmp_path, site, hook):
    """The release's SAE configs say type 'sae', affine_connection false and hf_hook_point_out == _in."""
    folder, a = write_gs2(tmp_path / "gemma-scope-2-270m-pt", site, 6, "sae")
    sae = load_gemma_scope(folder)
    assert sae.kind == "jumprelu" and sae.cfg.hook == hook and sae.cfg.model == "google/gemma-3-270m"
    x = xs()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), hand_codes(a, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), hand_output(a, x), rtol=1e-5, atol=1e-5)


def test_import_local_release_folder_with_sub_path(tmp_path):
    """`scope import gemma-scope LOCAL_FOLDER SUBPATH` reads the folder like a hub repo with a path."""
    root = tmp_path / "gemma-scope-2-270m-pt"
    write_gs2(root, "resid_post", 6, "sae", seed=2)
    result = runner.invoke(app, ["import", "gemma-scope", str(root), "resid_post/layer_6_width_16k_l0_small",
                                 "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["hook"] == "blocks.6.hook_resid_post" and info["model"] == "google/gemma-3-270m"
    assert load_gemma_scope(root, "resid_post/layer_6_width_16k_l0_small").cfg == load_any(tmp_path / "out").cfg
    bad = runner.invoke(app, ["import", "gemma-scope", str(root), "resid_post/layer_7_width_16k_l0_small",
                              "--out", str(tmp_path / "out2")])
    assert bad.exit_code == 2 and "layer_7_width_16k_l0_small" in bad.output and "Traceback" not in bad.output
    with pytest.raises(ScopeError, match="has no 'nope'"):
        load_gemma_scope(root, "nope")


# --- 2. the transcoder kind ---------------------------------------------------------------------------------
def random_transcoder(activation: str = "jumprelu", skip: bool = True, seed: int = 0, d_out: int = 12,
                      c_in: float = 0.4, c_out: float = 3.0, **fields) -> Transcoder:
    d = build({"kind": "transcoder", "activation": activation, "d_in": D, "d_out": d_out, "d_sae": M, "skip": skip,
               "hook": "blocks.6.ln2.hook_out", "output_hook": "blocks.6.hook_mlp_out", **fields})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in d.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name == "b_enc" else 0.5))
        if activation == "jumprelu":
            d.threshold.copy_(torch.rand(M, generator=g) * 0.3 + 0.05)
        if activation == "batchtopk":
            d.threshold.fill_(0.3)  # the one inference threshold
        d.input_scale.fill_(c_in)
        d.output_scale.fill_(c_out)
    return d


@pytest.mark.parametrize("activation,fields", [("jumprelu", {}), ("topk", {"k": 5}), ("batchtopk", {"k": 5})])
def test_transcoder_equations_by_hand(activation, fields):
    """ŷ = (f W_dec + b_dec + c_in·x W_skip)/c_out with f = act(c_in·x W_enc + b_enc); decode omits the skip."""
    d = random_transcoder(activation, **fields).eval()
    assert isinstance(d, Transcoder) and d.kind == "transcoder" and not d.cfg.apply_b_dec_to_input
    x = xs()
    with torch.no_grad():
        pre = 0.4 * x @ d.W_enc + d.b_enc
        f = d.activation(pre)
        if activation == "jumprelu":
            torch.testing.assert_close(f, pre * (pre > d.threshold))
        elif activation == "batchtopk":
            torch.testing.assert_close(f, torch.relu(pre) * (pre > 0.3))
        else:
            assert ((f != 0).sum(-1) <= 5).all()
        want = (f @ d.W_dec + d.b_dec + 0.4 * x @ d.W_skip) / 3.0
        codes, y = d.reconstruct(x)
        torch.testing.assert_close(codes, f)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d.decode(f) + d.skip(x), want, rtol=1e-5, atol=1e-5)
    assert d.output_hook == "blocks.6.hook_mlp_out" and d.cfg.hook == "blocks.6.ln2.hook_out"


@pytest.mark.parametrize("activation,fields", [("jumprelu", {}), ("topk", {"k": 5})])
def test_both_scales_fold_and_unfold(tmp_path, activation, fields):
    """Saving folds c_in and c_out into the weights (W_enc·c_in, W_dec/c_out, b_dec/c_out, W_skip·c_in/c_out)
    without changing the outputs; putting the scales back (unfolding) changes nothing either."""
    d = random_transcoder(activation, **fields).eval()
    x = xs()
    with torch.no_grad():
        want = d(x)
        sd = d.saved_tensors(fold=True)
        torch.testing.assert_close(sd["W_enc"], d.W_enc * 0.4)
        torch.testing.assert_close(sd["W_dec"], d.W_dec / 3.0)
        torch.testing.assert_close(sd["b_dec"], d.b_dec / 3.0)
        torch.testing.assert_close(sd["W_skip"], d.W_skip * 0.4 / 3.0)
        assert float(sd["input_scale"]) == float(sd["output_scale"]) == 1.0
        back = load(d.save(tmp_path / "tc"))
        assert type(back) is type(d) and back.cfg == d.cfg
        torch.testing.assert_close(back(x), want, rtol=1e-5, atol=1e-5)
        d.fold_input_scale()
        assert float(d.input_scale) == float(d.output_scale) == 1.0
        torch.testing.assert_close(d(x), want, rtol=1e-5, atol=1e-5)
        # unfold: new scales (0.5, 7) with the weights divided back out give the same map
        for name, f in (("W_enc", 1 / 0.5), ("W_dec", 7.0), ("b_dec", 7.0), ("W_skip", 7.0 / 0.5)):
            getattr(d, name).mul_(f)
        d.input_scale.fill_(0.5)
        d.output_scale.fill_(7.0)
        torch.testing.assert_close(d(x), want, rtol=1e-4, atol=1e-4)
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["hook"] == "blocks.6.ln2.hook_out" and cfg["output_hook"] == "blocks.6.hook_mlp_out"
    assert cfg["kind"] == "transcoder" and cfg["activation"] == activation and cfg["skip"] is True


def test_skip_transcoder_with_zero_encoder_is_the_least_squares_fit():
    """W_enc = 0 leaves only ŷ = b_dec + x W_skip: with the least-squares fit in W_skip and b_dec it reproduces
    the linear fit, and the training loss is stationary there (its gradient in W_skip and b_dec is 0)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(400, D, generator=g, dtype=torch.float64) * 3
    y = x @ torch.randn(D, 12, generator=g, dtype=torch.float64) + torch.randn(400, 12, generator=g,
                                                                               dtype=torch.float64) + 2.0
    design = torch.cat([x, torch.ones(400, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(design, y).solution
    W, b = sol[:-1], sol[-1]
    c_in, c_out = 0.25, 0.1
    d = build({"kind": "transcoder", "d_in": D, "d_out": 12, "d_sae": M, "skip": True}).double()
    with torch.no_grad():
        d.W_enc.zero_()
        d.b_enc.zero_()
        d.input_scale.fill_(c_in)
        d.output_scale.fill_(c_out)
        d.W_skip.copy_(W * c_out / c_in)  # training units: c_in·x ↦ c_out·y
        d.b_dec.copy_(b * c_out)
    fit = design @ sol
    with torch.no_grad():
        codes, y_hat = d.reconstruct(x)
    assert not codes.any()
    torch.testing.assert_close(y_hat, fit)
    parts = d.loss(x, sparsity_coeff=0.1, sparse=False, target=y)
    parts.loss.backward()
    assert float(d.W_skip.grad.abs().max()) < 1e-9 and float(d.b_dec.grad.abs().max()) < 1e-9
    fvu = float(((y - fit) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    assert float(parts.mse.detach()) * 400 / c_out**2 == pytest.approx(float(((y - fit) ** 2).sum()))
    assert 0 < fvu < 1


def test_bad_transcoder_configs_name_the_value():
    with pytest.raises(ScopeError, match="unknown transcoder activation 'relu'.*jumprelu.*topk.*batchtopk"):
        build({"kind": "transcoder", "activation": "relu", "d_in": D, "d_out": D, "d_sae": M})
    with pytest.raises(ScopeError, match="apply_b_dec_to_input must be false"):
        build({"kind": "transcoder", "activation": "topk", "k": 3, "d_in": D, "d_out": D, "d_sae": M,
               "apply_b_dec_to_input": True})
    with pytest.raises(ScopeError, match="selection 'exact' contradicts"):
        build({"kind": "transcoder", "activation": "batchtopk", "k": 3, "selection": "exact", "d_in": D, "d_out": D,
               "d_sae": M})
    with pytest.raises(ValueError, match="target=y"):
        random_transcoder().loss(xs(), 0.1)


# --- 3. stores and training ------------------------------------------------------------------------------
IN_HOOK, OUT_HOOK = "blocks.6.ln2.hook_out", "blocks.6.hook_mlp_out"  # Gemma 3's MLP input and output (bridge)


def tc_config(store: str, steps: int = 10, dictionaries: list | None = None, **top) -> dict:
    return {"store": store, "input_hook": "x", "output_hook": "y", **top,
            "trainer": {"total_tokens": 256 * steps, "batch_size": 256, "lr": 3e-3, "lr_warmup_steps": 2,
                        "sparsity_warmup_steps": 4, "log_every": 2, "checkpoint_every": 1000,
                        "norm_estimate_rows": 1000, "buffer_rows": 1024},
            "dictionaries": dictionaries or [{"kind": "transcoder", "d_sae": 64, "sparsity_coeff": 0.01}]}


@pytest.fixture(scope="module")
def two_hook_store(tmp_path_factory) -> str:
    from test_store import synthetic_store

    url = str(tmp_path_factory.mktemp("tc") / "store")
    synthetic_store(url, [1200, 1200], width=D, docs_per_shard=30, hooks=("x", "y"))
    return url


@pytest.mark.parametrize("top,message", [
    ({"output_hook": "blocks.6.hook_mlp_out"}, r"output_hook 'blocks\.6\.hook_mlp_out' is not in store .* holds \['x', 'y'\]"),
    ({"input_hook": "z"}, r"input_hook 'z' is not in store .* holds \['x', 'y'\]"),
])
def test_store_and_config_hooks_disagree(two_hook_store, tmp_path, top, message):
    from scope.training import load_config, train

    with pytest.raises(ScopeError, match=message):
        train(load_config(data=tc_config(two_hook_store, **top)), tmp_path / "run", progress=False)
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(tc_config(two_hook_store, **top)))
    result = runner.invoke(app, ["train", str(path), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 2 and "is not in store" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("change,message", [
    (lambda c: c.pop("output_hook"), r"are transcoders but the config sets no `output_hook`"),
    (lambda c: c["dictionaries"].append({"kind": "jumprelu", "d_sae": 64, "sparsity_coeff": 0.01}),
     r"`output_hook` 'y' is for transcoders, but dictionaries \['jumprelu-64-l0.01'\] are not"),
    (lambda c: c["dictionaries"][0].update(activation="batchtopk"), r"is batchtopk but sets no `k`"),
    (lambda c: c["dictionaries"][0].update(activation="gated"), r"dictionaries\.0\.activation"),
    (lambda c: c.update(hook="q"), r"`hook` 'q' and `input_hook` 'x' disagree"),
])
def test_bad_transcoder_training_configs(change, message):
    from scope.training import load_config

    cfg = tc_config("somewhere")
    change(cfg)
    with pytest.raises(ScopeError, match=message):
        load_config(data=cfg)


def test_transcoder_training_on_a_two_hook_store(two_hook_store, tmp_path):
    """y is a fixed linear map of x plus noise: a skip transcoder learns it, and the saved scales are folded."""
    from scope.training import load_config, train

    dicts = [{"kind": "transcoder", "d_sae": 64, "sparsity_coeff": 0.01, "skip": True},
             {"kind": "transcoder", "activation": "batchtopk", "d_sae": 64, "k": 4}]
    saved = train(load_config(data=tc_config(two_hook_store, steps=20, dictionaries=dicts)), tmp_path / "run",
                  progress=False)
    assert set(saved) == {"skip-transcoder-jumprelu-64-l0.01", "transcoder-batchtopk-64-k4"}
    for folder in saved.values():
        d = load(folder)
        assert d.kind == "transcoder" and d.cfg.hook == "x" and d.output_hook == "y"
        assert float(d.input_scale) == float(d.output_scale) == 1.0
    assert load(saved["transcoder-batchtopk-64-k4"]).cfg.activation == "jumprelu"  # saved as it infers
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(f"{n}/fvu" in rows[-1] for n in saved)


@pytest.fixture(scope="module")
def mlp_store(gemma, tmp_path_factory):
    """A tiny store of Gemma 3 270M's layer-6 MLP input and output, both hooks in every row."""
    from scope.data import open_source
    from scope.store import ActivationStore, capture_store

    url = str(tmp_path_factory.mktemp("mlp") / "store")
    capture_store(gemma, open_source("bbc"), [IN_HOOK, OUT_HOOK], url, tokens=4000, context=64, progress=False)
    return ActivationStore(url)


@pytest.fixture(scope="module")
def trained(mlp_store, tmp_path_factory):
    """A transcoder and a skip transcoder trained for 120 steps of 256 rows on the tiny store."""
    from scope.training import load_config, train

    cfg = tc_config(mlp_store.url, steps=120, input_hook=IN_HOOK, output_hook=OUT_HOOK,
                    dictionaries=[{"kind": "transcoder", "d_sae": 512, "sparsity_coeff": 0.003, "init_l0": 32},
                                  {"kind": "transcoder", "d_sae": 512, "sparsity_coeff": 0.003, "init_l0": 32,
                                   "skip": True}])
    cfg["trainer"].update(lr=2e-3, log_every=10, lr_warmup_steps=10, sparsity_warmup_steps=50)
    out = tmp_path_factory.mktemp("run") / "run"
    saved = train(load_config(data=cfg), out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return saved, rows


@pytest.mark.real_model
def test_real_model_transcoder_run_lowers_output_fvu(mlp_store, trained):
    """On the real model's layer-6 MLP, a short run's output FVU falls, for both kinds."""
    from scope.evals import reconstruction_metrics

    assert mlp_store.hooks == {IN_HOOK: (640,), OUT_HOOK: (640,)}
    saved, rows = trained
    for name in saved:
        fvu = [r[f"{name}/fvu"] for r in rows]
        assert fvu[-1] < 0.7 * fvu[0], (name, fvu)
    held_out = mlp_store.split(0.1, seed=0)[1]
    for folder in saved.values():
        m = reconstruction_metrics(load(folder), held_out)
        assert m.hook == OUT_HOOK and m.input_hook == IN_HOOK and 0 < m.fvu < 1 and m.l0 > 0


# --- 4. evaluation ---------------------------------------------------------------------------------------
def linear_skip_transcoder(store, d_sae: int = 64) -> Transcoder:
    """A skip transcoder with W_enc = 0 whose W_skip, b_dec are the least-squares fit of the MLP's output on its
    input over the store: the best affine stand-in for the MLP."""
    b = next(store.rows([IN_HOOK, OUT_HOOK], batch_size=len(store), shuffle=False, dtype=torch.float64))
    x, y = b.acts[IN_HOOK], b.acts[OUT_HOOK]
    sol = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1), y).solution
    d = build({"kind": "transcoder", "d_in": 640, "d_out": 640, "d_sae": d_sae, "skip": True, "hook": IN_HOOK,
               "output_hook": OUT_HOOK, "model": "gemma-3-270m"})
    with torch.no_grad():
        d.W_enc.zero_()
        d.b_enc.fill_(-1.0)
        d.W_skip.copy_(sol[:-1].float())
        d.b_dec.copy_(sol[-1].float())
    return d


@pytest.mark.real_model
def test_eval_of_transcoders_splices_the_mlp_output(gemma, mlp_store, trained):
    """LM loss with the MLP's output replaced: a zero decoder is exactly the zero-ablated MLP, the linear fit
    recovers part of the loss, the MLP's input is left alone; evaluate() reports both hooks."""
    from scope.analysis.splice import spliced
    from scope.evals import evaluate_many
    from scope.hooks import capture

    zero = build({"kind": "transcoder", "d_in": 640, "d_out": 640, "d_sae": 64, "hook": IN_HOOK,
                  "output_hook": OUT_HOOK, "model": "gemma-3-270m"})
    with torch.no_grad():
        zero.W_dec.zero_()
    saes = {"zero": zero, "linear": linear_skip_transcoder(mlp_store),
            **{n: load(f) for n, f in trained[0].items()}}
    held_out = mlp_store.split(0.1, seed=0)[1]
    results = {r["name"]: r for r in evaluate_many(saes, held_out, model=gemma, lm_tokens=256, progress=False)}
    for r in results.values():
        lm = r["lm"]
        assert r["hook"] == OUT_HOOK and r["input_hook"] == IN_HOOK and r["output_hook"] == OUT_HOOK
        assert lm["hook"] == IN_HOOK and lm["output_hook"] == OUT_HOOK and lm["zero_ce"] > lm["clean_ce"]
    z = results["zero"]["lm"]
    assert z["spliced_ce"] == pytest.approx(z["zero_ce"], abs=1e-4) and z["ce_loss_recovered"] == pytest.approx(0, abs=1e-3)
    assert 0 < results["linear"]["lm"]["ce_loss_recovered"] < 1 and results["linear"]["l0"] == 0
    toks = torch.tensor([[gemma.tokenizer.bos_token_id, *gemma.tokenizer("The Eiffel Tower is in Paris")["input_ids"][1:]]])
    clean = capture(gemma, toks, [IN_HOOK, OUT_HOOK])
    with spliced(gemma, saes["linear"]) as sp:
        inside = capture(gemma, toks, [IN_HOOK, OUT_HOOK])
    torch.testing.assert_close(inside[IN_HOOK], clean[IN_HOOK])  # the MLP's input is read, not changed
    want = saes["linear"](clean[IN_HOOK][0])[1:]
    torch.testing.assert_close(inside[OUT_HOOK][0, 1:], want, rtol=1e-4, atol=1e-3)  # BOS kept
    assert sp.acts[IN_HOOK].shape == (1, toks.shape[1], 64)
    with spliced(gemma, saes["linear"], error_term=True):
        kept = capture(gemma, toks, [OUT_HOOK])
    torch.testing.assert_close(kept[OUT_HOOK], clean[OUT_HOOK])


# --- 5. interop: Gemma Scope 2 transcoders and attention SAEs, SAELens transcoder layouts -----------------
@pytest.mark.parametrize("affine", [False, True])
def test_gemma_scope_2_transcoder_folder_loads_onto_the_mlp_hooks(tmp_path, affine):
    """transcoder/layer_6_width_16k_l0_small[_affine]/ in the release's form: hooks from config.json's HF module
    paths, the maths by hand (relu(pre)·1[pre > θ], f w_dec + b_dec + x · affine_skip_connection)."""
    root = tmp_path / "gemma-scope-2-270m-pt"
    folder, a = write_gs2(root, "transcoder", 6, "transcoder", seed=7, affine=affine)
    tc = load_gemma_scope(root, f"transcoder/{folder.name}")
    assert isinstance(tc, Transcoder) and tc.cfg.activation == "jumprelu" and tc.cfg.skip is affine
    assert tc.cfg.hook == IN_HOOK and tc.output_hook == OUT_HOOK and tc.cfg.model == "google/gemma-3-270m"
    x = xs()
    with torch.no_grad():
        torch.testing.assert_close(tc.encode(x), hand_codes(a, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tc(x), hand_output(a, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tc.decode(hand_codes(a, x)), hand_codes(a, x) @ a["w_dec"] + a["b_dec"])
    assert load_any(folder).cfg == tc.cfg
    result = runner.invoke(app, ["import", "gemma-scope", str(folder), "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["kind"] == "transcoder"
    back = load(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(back(x), hand_output(a, x), rtol=1e-5, atol=1e-5)


def test_gemma_scope_2_attention_sae_reads_hook_z_and_bad_hook_points(tmp_path):
    """attn_out's native point is o_proj's input, the bridge's attn.hook_z (not hook_attn_out)."""
    root = tmp_path / "gemma-scope-2-270m-pt"
    folder, _ = write_gs2(root, "attn_out", 5, "sae")
    assert load_gemma_scope(folder).cfg.hook == "blocks.5.attn.hook_z"
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "hf_hook_point_in": "model.layers.5.mlp.down_proj.input",
                                                    "hf_hook_point_out": "model.layers.5.mlp.down_proj.input"}))
    with pytest.raises(ScopeError, match=r"'model\.layers\.5\.mlp\.down_proj\.input' is not a module .*"
                                         r"pre_feedforward_layernorm"):
        load_gemma_scope(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "hf_hook_point_in": "model.layers.9.self_attn.o_proj.input"}))
    with pytest.raises(ScopeError, match="layer 9, but the folder says layer_5"):
        load_gemma_scope(folder)


@pytest.mark.real_model
def test_gemma_scope_2_hook_points_are_the_models_modules(gemma):
    """The hooks a Gemma Scope 2 config maps to carry exactly what its HF module paths name."""
    layer = gemma.bridge.blocks[6]._original_component
    got = {}

    def keep(name, take_input):
        def fn(mod, inp, out):
            got[name] = (inp[0] if take_input else out).detach()
        return fn

    handles = [layer.pre_feedforward_layernorm.register_forward_hook(keep("pre_ff", False)),
               layer.post_feedforward_layernorm.register_forward_hook(keep("post_ff", False)),
               layer.self_attn.o_proj.register_forward_hook(keep("o_proj_in", True))]
    from scope.hooks import capture

    try:
        toks = gemma.tokenizer("The Eiffel Tower is in Paris.", return_tensors="pt")["input_ids"]
        # hook_resid_post too, so the early stop comes after the HF modules' own forward hooks have run
        acts = capture(gemma, toks, [IN_HOOK, OUT_HOOK, "blocks.6.attn.hook_z", "blocks.6.hook_resid_post"])
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(acts[IN_HOOK], got["pre_ff"])
    torch.testing.assert_close(acts[OUT_HOOK], got["post_ff"])
    torch.testing.assert_close(acts["blocks.6.attn.hook_z"].flatten(-2), got["o_proj_in"])


@pytest.mark.parametrize("activation,skip,arch", [("jumprelu", False, "jumprelu_transcoder"),
                                                  ("jumprelu", True, "jumprelu_skip_transcoder"),
                                                  ("batchtopk", True, "jumprelu_skip_transcoder")])
def test_saelens_transcoder_export_round_trip(tmp_path, activation, skip, arch):
    from safetensors.torch import load_file

    from scope.dictionaries.interop import from_saelens, to_saelens

    d = random_transcoder(activation, skip=skip, **({"k": 5} if activation == "batchtopk" else {})).eval()
    folder = to_saelens(d, tmp_path / "sl")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["d_out"] == 12 and not cfg["apply_b_dec_to_input"]
    assert cfg["metadata"]["hook_name"] == IN_HOOK and cfg["metadata"]["hook_name_out"] == OUT_HOOK
    w = load_file(str(folder / "sae_weights.safetensors"))
    if skip:
        assert w["W_skip"].shape == (12, D)  # SAELens: [d_out, d_in], x · W_skipᵀ
        torch.testing.assert_close(w["W_skip"], (d.W_skip * 0.4 / 3.0).T)
    back = from_saelens(folder)
    assert back.kind == "transcoder" and back.cfg.skip is skip and back.output_hook == OUT_HOOK
    x = xs()
    with torch.no_grad():
        torch.testing.assert_close(back(x), d(x), rtol=1e-5, atol=1e-5)
        # SAELens's maths on the exported tensors: relu(z)·1[z > θ], f W_dec + b_dec + x W_skipᵀ
        pre = x @ w["W_enc"] + w["b_enc"]
        f = torch.relu(pre) * (pre > w["threshold"])
        y = f @ w["W_dec"] + w["b_dec"] + (x @ w["W_skip"].T if skip else 0)
        torch.testing.assert_close(y, d(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ScopeError, match="topk transcoder dictionary has no SAELens counterpart"):
        to_saelens(random_transcoder("topk", k=5), tmp_path / "no")


def test_saelens_itself_opens_the_transcoder_exports(tmp_path):
    """In the SAELens environment (skipped without it): SAE.load_from_disk reads the exports, same outputs."""
    import os
    import subprocess

    from safetensors.torch import load_file

    from scope.dictionaries.interop import to_saelens
    from test_interop import SIDE, _saelens_python

    py = _saelens_python()
    if py is None:
        pytest.skip("no SAELens environment: run benchmarks/saelens_venv.sh, or set SCOPE_SAELENS_PYTHON")
    x = xs()
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    made = {f"skip-{skip}": random_transcoder(skip=skip, seed=int(skip)).eval() for skip in (False, True)}
    jobs = []
    for name, d in made.items():
        to_saelens(d, tmp_path / name)
        jobs.append({"op": "load", "name": name, "folder": str(tmp_path / name), "x": str(tmp_path / "x.safetensors"),
                     "out": str(tmp_path / f"{name}.out.safetensors")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([py, str(SIDE), str(tmp_path / "jobs.json")], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name, d in made.items():
        out = load_file(str(tmp_path / f"{name}.out.safetensors"))
        with torch.no_grad():
            torch.testing.assert_close(out["codes"], d.encode(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out["forward"], d(x), rtol=1e-5, atol=1e-5)


# --- 6. dashboards and feature analysis --------------------------------------------------------------------
@pytest.mark.real_model
def test_dashboards_and_feature_analysis_of_a_transcoder(gemma, mlp_store, trained, tmp_path):
    """Features fire on the input site (stats from blocks.6.ln2.hook_out), logit effects come from the output
    directions (rows of W_dec at hook_mlp_out); prompt features and attribution run through the two-hook splice."""
    from scope.analysis.attribution import attribute
    from scope.analysis.features import prompt_features
    from scope.dashboards.publish import decoder_directions, publish

    tc = load(trained[0]["skip-transcoder-jumprelu-512-l0.003"])
    torch.testing.assert_close(decoder_directions(tc, [3, 7]), tc.W_dec[[3, 7]].float())  # the skip term cancels
    done = publish(tc, mlp_store, str(tmp_path / "site"), features=[0, 1, 2, 3], model=gemma, logits=5,
                   progress=False)
    assert done.features == [0, 1, 2, 3] and Path(done.index).exists()
    meta = json.loads((tmp_path / "site" / "site.json").read_text())
    assert meta["hook"] == IN_HOOK
    pf = prompt_features(gemma, tc, "The Eiffel Tower is in Paris", k=3)
    assert pf.hook == IN_HOOK and pf.acts.shape[-1] == 512 and any(t.features for t in pf.tokens)
    att = attribute(gemma, tc, "The Eiffel Tower is in", " Paris")
    assert att.hook == IN_HOOK and att.patching.shape == att.acts.shape and torch.isfinite(att.patching).all()
