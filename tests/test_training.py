"""Dictionaries and their training: pseudo-derivatives, invariants, fold, resume, DDP, configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from scope.dictionaries import build, load
from scope.dictionaries.jumprelu import JumpReLUFn, StepFn
from scope.dictionaries import cpu_kernels
from scope.dictionaries.sparse import SEARCH_GROUP, _at_or_above_zero, encode_pairs
from scope.dictionaries.topk import statistical_threshold
from scope.errors import ScopeError
from scope.training.trainer import _clipped, dead_window_for
from scope.training import load_config, train

from test_store import synthetic_store

EPS = 0.05


def smoothed_step(z: torch.Tensor, theta: float) -> torch.Tensor:
    """H(z − θ) convolved with the rectangle kernel of width ε: a ramp from θ − ε/2 to θ + ε/2."""
    return ((z - theta) / EPS + 0.5).clamp(0, 1)


def test_step_pseudo_derivative_is_the_derivative_of_the_smoothed_step():
    z = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    for theta0 in (0.1, 0.3, -0.2):
        theta = torch.full((1,), theta0, dtype=torch.float64, requires_grad=True)
        StepFn.apply(z[:, None], theta, EPS).sum().backward()
        h = 1e-4
        fd = (smoothed_step(z, theta0 + h).sum() - smoothed_step(z, theta0 - h).sum()) / (2 * h)
        torch.testing.assert_close(theta.grad[0], fd, rtol=2e-3, atol=0)


def test_jumprelu_pseudo_derivative_matches_the_smoothed_jumprelu():
    # d/dθ Σ z·H_ε(z − θ) = −(1/ε) Σ z·K((z − θ)/ε); the STE uses θ in place of z inside the window,
    # so the two agree to O(ε/θ).
    z = torch.linspace(0, 2, 40001, dtype=torch.float64)
    theta0 = 1.0
    theta = torch.full((1,), theta0, dtype=torch.float64, requires_grad=True)
    JumpReLUFn.apply(z[:, None], theta, EPS).sum().backward()
    h = 1e-4
    fd = ((z * smoothed_step(z, theta0 + h)).sum() - (z * smoothed_step(z, theta0 - h)).sum()) / (2 * h)
    torch.testing.assert_close(theta.grad[0], fd, rtol=EPS, atol=0)
    # The forward pass is the exact JumpReLU, and gradients in z pass only where z > θ.
    z2 = torch.tensor([[0.5, 1.5]], dtype=torch.float64, requires_grad=True)
    out = JumpReLUFn.apply(z2, torch.ones(2, dtype=torch.float64), EPS)
    out.sum().backward()
    assert out.tolist() == [[0.0, 1.5]] and z2.grad.tolist() == [[0.0, 1.0]]


def test_statistical_topk_threshold_keeps_about_k_of_gaussian_pre_activations():
    pre = torch.randn(64, 16384, generator=torch.Generator().manual_seed(0))
    kept = (pre > statistical_threshold(pre, 64)).sum(-1).float()
    assert 50 < kept.mean() < 80


def test_sparse_path_handles_batches_with_no_active_latent_and_falls_back_when_dense():
    d = build({"kind": "jumprelu", "d_in": 16, "d_sae": 64})
    with torch.no_grad():
        d.threshold.fill_(100.0)
    parts = d.loss(torch.randn(4, 16), 0.1)
    parts.loss.backward()
    assert float(parts.l0) == 0 and not parts.fired.any() and parts.codes is None
    with torch.no_grad():
        d.threshold.fill_(1e-6)
    assert d.loss(torch.randn(4, 16), 0.1).codes is not None, "about half the latents fire: the plain path runs"


def test_topk_and_batchtopk_select_k_per_row_or_per_batch():
    x = torch.randn(8, 16)
    for selection, check in (("exact", lambda f: ((f > 0).sum(-1) <= 4).all()),
                             ("batch", lambda f: (f > 0).sum() <= 4 * 8)):
        d = build({"kind": "topk", "d_in": 16, "d_sae": 64, "k": 4, "selection": selection})
        parts = d.loss(x, sparse=False)
        assert check(parts.codes)


@pytest.mark.parametrize("width", [SEARCH_GROUP * 8, SEARCH_GROUP * 8 + 3])
def test_the_grouped_search_finds_exactly_the_entries_at_or_above_zero(width):
    torch.manual_seed(0)
    block = torch.randn(37, width) - 2.0
    block[3] = -1.0  # a row with nothing
    block[5, :40] = 1.0  # a dense row: whole groups at once
    block[7, 11] = 0.0  # exactly zero counts (z ≥ floor)
    block[8, width - 1] = -0.0
    want = (block.view(-1) >= 0).nonzero().squeeze(1)
    got = _at_or_above_zero(block)
    assert 7 * width + 11 in got.tolist() and 8 * width + width - 1 in got.tolist()
    assert torch.equal(got, want)  # the same indices, ascending (row-major)


@pytest.fixture(params=["compiled", "compiled-blocked", "torch"])
def kernels(request, monkeypatch):
    """Run a test with the compiled CPU kernels (numba), again with them cut into cache blocks of 5 rows or
    latents whatever the density (and the encoder into tiles of 64 rows and 40 latents), and once with torch's
    kernels alone."""
    if request.param == "torch":
        monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    if request.param == "compiled-blocked":
        monkeypatch.setattr(cpu_kernels, "_BLOCK_BYTES", 4 * 32 * 5)  # 5 rows of the tests' d_in 32
        monkeypatch.setattr(cpu_kernels, "_MIN_PAIRS_PER_BLOCK", 0)
        monkeypatch.setattr(cpu_kernels, "TILE_ROWS", 64)
        monkeypatch.setattr(cpu_kernels, "TILE_COLS", 40)  # not a multiple of 16: each tile ends with odd columns
    return request.param


def test_the_pair_loops_block_for_the_cache_only_where_blocks_stay_dense():
    # Batch 4,096 at d_in 640 and L0 64: 4,096 latents give 8 pairs per (512-row block, latent), 16,384 give 2.
    pairs = 64 * 4096
    assert cpu_kernels._block(pairs, 4096, 4096, 640, 4096) == 512
    assert cpu_kernels._block(pairs, 4096, 16384, 640, 4096) == 4096
    assert cpu_kernels._block(pairs, 256, 4096, 640, 256) == 256, "a batch smaller than one block is one block"


def test_the_compiled_cpu_kernels_are_on_where_numba_is_installed():
    if os.environ.get("SCOPE_CPU_KERNELS") == "0":
        pytest.skip("SCOPE_CPU_KERNELS=0 turns them off on purpose")
    assert cpu_kernels.ENABLED, "numba is a dependency: without it every CPU step falls back to torch's kernels"
    assert cpu_kernels.usable(torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert not cpu_kernels.usable(torch.zeros(2, dtype=torch.float64))


def test_importing_the_dictionaries_leaves_numba_for_the_first_cpu_step():
    code = "import sys, scope.dictionaries, scope.cli; assert 'numba' not in sys.modules, 'numba imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_compiled_search_regrows_its_buffer_and_stops_at_the_limit():
    torch.manual_seed(2)
    block, shifted, floor = torch.randn(50, 37), torch.randn(37) * 0.1, torch.rand(37)
    block[4, 5] = shifted[5]  # equal: z == floor is a pair
    block[6, 7] = block[6, 36] = float("nan")  # never a pair, inside a 16-column group and in the odd tail
    r, c = (block >= shifted).nonzero().unbind(1)
    out = cpu_kernels.PairBuffer(3)  # far too small: the search grows it and redoes the block
    assert cpu_kernels.search(block, shifted, floor, 100, out, None)
    rows, cols, vals = out.tensors()
    assert torch.equal(rows, r + 100) and torch.equal(cols, c)
    torch.testing.assert_close(vals, (block - shifted + floor)[r, c])
    assert not cpu_kernels.search(block, shifted, floor, 0, cpu_kernels.PairBuffer(len(r)), len(r) - 1)


def test_encode_pairs_gives_the_dense_pairs_and_pre_activations(kernels):
    torch.manual_seed(1)
    xin, W, b = torch.randn(600, 24), torch.randn(24, SEARCH_GROUP * 8), torch.randn(SEARCH_GROUP * 8) * 0.1
    z = xin @ W + b
    floor = z.quantile(0.97, dim=0)  # about 4 % of each column, some rows with none
    ids = torch.tensor([50, 2, SEARCH_GROUP * 8 - 1])  # not ascending: the columns come back in this order
    enc = encode_pairs(xin, W, b, floor, column_ids=ids)
    r, c = (z >= floor).nonzero().unbind(1)
    assert torch.equal(enc.rows, r) and torch.equal(enc.cols, c)
    torch.testing.assert_close(enc.values, z[r, c])
    torch.testing.assert_close(enc.columns, z[:, ids])
    assert encode_pairs(xin, W, b, floor, max_pairs=len(r) - 1) is None


@pytest.mark.parametrize("cfg", [
    {"kind": "jumprelu", "bandwidth": 0.05, "threshold_init": 2.0},
    {"kind": "jumprelu", "bandwidth": 0.05, "threshold_init": 2.0, "apply_b_dec_to_input": True},
    {"kind": "jumprelu", "bandwidth": 0.05, "threshold_init": 2.0, "sparsity_loss": "tanh", "pre_act_coeff": 0.01},
    {"kind": "jumprelu", "bandwidth": 0.05, "threshold_init": 2.0, "apply_b_dec_to_input": True, "aux_coeff": 0.1,
     "matryoshka_widths": [64]},
    {"kind": "topk", "k": 8}, {"kind": "topk", "k": 8, "selection": "batch"},
    {"kind": "topk", "k": 8, "selection": "statistical"}, {"kind": "topk", "k": 8, "dead_after_tokens": 0},
    {"kind": "topk", "k": 8, "dead_after_tokens": 0, "aux_b_dec": False}])
def test_sparse_kernels_give_the_plain_path_loss_and_gradients(cfg, kernels):
    torch.manual_seed(0)
    d = build({"d_in": 32, "d_sae": 256, **cfg})
    with torch.no_grad():
        d.input_scale.fill_(0.5)
        d.b_enc.normal_(0, 0.05)
        d.b_dec.normal_(0, 0.1)
    # JumpReLU: more rows than one block of its sparse encoder (sparse.BLOCK_ROWS), and a part block. TopK: few
    # enough rows that with dead_after_tokens=0 some latents do not fire in the batch and AuxK has dead latents.
    x = torch.randn(600 if cfg["kind"] == "jumprelu" else 64, 32) * 2
    results = []
    for sparse in (False, True):
        d.zero_grad()
        if cfg["kind"] == "topk":
            d.tokens_since_fired.fill_(1)  # with dead_after_tokens=0 every latent not firing now is dead: AuxK runs
        dead = torch.arange(256) % 3 == 0 if cfg.get("pre_act_coeff") or cfg.get("aux_coeff") else None
        parts = d.loss(x, 0.3, sparse=sparse, **({"dead": dead} if dead is not None else {}))
        parts.loss.backward()
        results.append((parts, {k: p.grad.clone() for k, p in d.named_parameters()}))
    (plain, g_plain), (fast, g_fast) = results
    assert fast.codes is None, "the sparse kernels ran (few enough active pairs)"
    assert float(plain.l0) > 0, "some latents are active, so the comparison is not vacuous"
    torch.testing.assert_close(fast.loss, plain.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(fast.fired, plain.fired) and float(fast.l0) == float(plain.l0)
    if cfg.get("dead_after_tokens") == 0 or cfg.get("aux_coeff"):
        assert plain.aux is not None and fast.aux is not None
    for k in g_plain:
        torch.testing.assert_close(g_fast[k], g_plain[k], rtol=1e-5, atol=1e-6 * g_plain[k].abs().max())


def test_tanh_sparsity_is_anthropics_smooth_l0_and_quantile_init_hits_the_target_l0():
    torch.manual_seed(0)
    d = build({"kind": "jumprelu", "d_in": 16, "d_sae": 200, "sparsity_loss": "tanh", "tanh_scale": 3.0,
               "apply_b_dec_to_input": True})
    x = torch.randn(2000, 16)
    d.init_thresholds(x, l0=20)
    f = d.encode(x)
    assert abs(float((f > 0).sum(-1).float().mean()) - 20) < 0.5, "every latent fires on ~10% of the sample"
    assert ((f > 0).float().mean(0) - 0.1).abs().max() < 0.01
    parts = d.loss(x[:64], 0.5, sparse=False)
    f64 = d.encode(x[:64])
    mse = (x[:64] - d.decode(f64)).pow(2).sum(-1).mean()
    want = mse + 0.5 * torch.tanh(3.0 * f64 * d.W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(parts.loss, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="init L0"):
        d.init_thresholds(x, l0=200)


def test_pre_activation_loss_pulls_only_dead_latents_towards_firing():
    torch.manual_seed(0)
    d = build({"kind": "jumprelu", "d_in": 16, "d_sae": 64, "pre_act_coeff": 1.0, "threshold_init": 0.5})
    with torch.no_grad():
        d.threshold[:8] = 100.0  # these never fire
    x = torch.randn(256, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:8] = True
    base = d.loss(x, 0.0, sparse=False).loss
    with_pre = d.loss(x, 0.0, sparse=False, dead=dead)
    gap = torch.relu(100.0 - d.pre_acts(x)[:, :8]).sum(-1).mean()  # decoder rows are unit norm
    torch.testing.assert_close(with_pre.loss - base, gap, rtol=1e-5, atol=1e-4)
    d.zero_grad()
    with_pre.loss.backward()
    assert (d.threshold.grad[:8] > 0).all(), "the loss falls as the dead latents' thresholds come down"
    d.zero_grad()
    base.backward()
    assert (d.threshold.grad[:8] == 0).all() and (d.W_enc.grad[:, :8] == 0).all()


def test_pre_activation_loss_on_the_threshold_alone_leaves_the_encoder_to_the_other_losses():
    torch.manual_seed(0)
    grads = {}
    for on in ("all", "threshold"):
        d = build({"kind": "jumprelu", "d_in": 16, "d_sae": 64, "pre_act_coeff": 1.0, "threshold_init": 0.5,
                   "pre_act_on": on})
        with torch.no_grad():
            d.threshold[:8] = 100.0
        dead = torch.arange(64) < 8
        x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
        d.zero_grad()
        d.loss(x, 0.0, sparse=False, dead=dead).loss.backward()
        grads[on] = (d.threshold.grad[:8].clone(), d.W_enc.grad[:, :8].abs().sum(), d.b_enc.grad[:8].abs().sum())
    torch.testing.assert_close(grads["threshold"][0], grads["all"][0])  # θ is pulled down as before
    assert grads["all"][1] > 0 and grads["all"][2] > 0, "Anthropic's form lifts the dead latents' encoders too"
    assert grads["threshold"][1] == 0 and grads["threshold"][2] == 0


@pytest.mark.parametrize("kind,extra", [("jumprelu", {}), ("topk", {"k": 8}), ("relu", {})])
def test_fold_input_scale_gives_identical_outputs_and_save_load_round_trips(tmp_path, kind, extra):
    d = build({"kind": kind, "d_in": 16, "d_sae": 48, **extra})
    with torch.no_grad():
        d.b_enc.normal_(0, 0.1)
        d.b_dec.normal_()
        d.input_scale.fill_(0.013)
    x = torch.randn(32, 16) * 70
    before_codes, before = d.encode(x), d(x)
    d.save(tmp_path / "d")
    loaded = load(tmp_path / "d")
    assert float(loaded.input_scale) == 1.0
    torch.testing.assert_close(loaded.encode(x), before_codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded(x), before, rtol=1e-5, atol=1e-4)
    d.fold_input_scale()
    torch.testing.assert_close(d(x), before, rtol=1e-5, atol=1e-4)


def test_decoder_rows_stay_unit_norm_and_parallel_gradient_is_removed():
    d = build({"kind": "jumprelu", "d_in": 16, "d_sae": 32})
    opt = torch.optim.Adam(d.parameters(), lr=1e-2, betas=(0.0, 0.999))
    for _ in range(5):
        parts = d.loss(torch.randn(64, 16), 0.1)
        parts.loss.backward()
        d.remove_parallel_decoder_grad()
        parallel = (d.W_dec.grad * d.W_dec).sum(1)
        assert parallel.abs().max() < 1e-6
        opt.step()
        opt.zero_grad()
        d.project()
        torch.testing.assert_close(d.W_dec.norm(dim=1), torch.ones(32))
    assert (d.threshold > 0).all()


# --- the training loop on a synthetic store -------------------------------------------------------

def _cfg(store: str, steps: int = 12, **trainer) -> dict:
    return {"store": store, "trainer": {"total_tokens": 256 * steps, "batch_size": 256, "lr": 3e-3,
                                        "lr_warmup_steps": 2, "sparsity_warmup_steps": 4, "log_every": 2,
                                        "checkpoint_every": 4, "norm_estimate_rows": 1000, "buffer_rows": 1024,
                                        **trainer},
            "dictionaries": [{"kind": "jumprelu", "d_sae": 64, "sparsity_coeff": 0.01},
                             {"kind": "topk", "d_sae": 64, "k": 4}]}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("synth") / "store")
    synthetic_store(url, [1500, 1500, 1500], width=16, docs_per_shard=30)
    return url


def test_training_lowers_fvu_and_writes_logs(synth, tmp_path):
    saved = train(load_config(data=_cfg(synth, steps=30)), tmp_path / "run", progress=False)
    rows = [yaml.safe_load(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for name in saved:
        fvu = [r[f"{name}/fvu"] for r in rows]
        assert fvu[-1] < 0.8 * fvu[0], (name, fvu)
    assert rows[-1]["topk-64-k4/l0"] <= 4
    assert load(saved["jumprelu-64-l0.01"]).cfg.hook == "x"


def test_max_grad_norm_clips_the_gradient_and_the_log_has_its_norm(synth, tmp_path):
    free = train(load_config(data=_cfg(synth, steps=12)), tmp_path / "free", progress=False)
    # A norm far below Adam's ε leaves updates of about lr·g/ε, so the clipped run hardly moves from its
    # (identical, same seed) initialisation while the free run trains.
    held = train(load_config(data=_cfg(synth, steps=12, max_grad_norm=1e-12)), tmp_path / "held", progress=False)
    rows = [yaml.safe_load(line) for line in (tmp_path / "free" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["topk-64-k4/grad_norm"] > 0 for r in rows)
    fvu = lambda run: [yaml.safe_load(line)["topk-64-k4/fvu"]
                       for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert fvu("free")[-1] < 0.8 * fvu("free")[0]
    assert fvu("held")[-1] > 0.95 * fvu("held")[0]
    assert set(free) == set(held)
    # The dictionary's own max_grad_norm holds that dictionary alone.
    cfg = _cfg(synth, steps=12)
    cfg["dictionaries"][1]["max_grad_norm"] = 1e-12
    train(load_config(data=cfg), tmp_path / "own", progress=False)
    rows = [yaml.safe_load(line) for line in (tmp_path / "own" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["topk-64-k4/fvu"] > 0.95 * rows[0]["topk-64-k4/fvu"]
    assert rows[-1]["jumprelu-64-l0.01/fvu"] < 0.8 * rows[0]["jumprelu-64-l0.01/fvu"]


def test_max_grad_norm_leaves_a_jumprelus_thresholds_out():
    sae = build({"kind": "jumprelu", "d_in": 8, "d_sae": 16, "threshold_init": 0.1})
    for p in sae.parameters():
        p.grad = torch.ones_like(p)
    sae.threshold.grad.fill_(1e3)  # θ's pseudo-gradient is ~1/ε times the others'
    clipped = _clipped(sae)
    assert all(p is not sae.threshold for p in clipped) and len(clipped) == len(list(sae.parameters())) - 1
    norm = torch.nn.utils.clip_grad_norm_(clipped, 1.0)
    assert float(norm) == pytest.approx(sum(p.numel() for p in clipped) ** 0.5)  # the norm without θ's
    assert torch.all(sae.threshold.grad == 1e3) and float(sae.W_enc.grad.norm()) < 1.0


def test_a_run_saved_before_a_new_config_field_still_resumes(synth, tmp_path):
    cfg = load_config(data=_cfg(synth, steps=4))
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    # What a run saved by an older scope looks like: no max_grad_norm in its config, another config hash.
    copy = out / "train_config.yaml"
    saved = yaml.safe_load(copy.read_text())
    del saved["trainer"]["max_grad_norm"]
    copy.write_text(yaml.safe_dump(saved, sort_keys=False))
    state = out / "checkpoint" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "config_hash": "0" * 16}))
    assert set(train(cfg, out, progress=False)) == {"jumprelu-64-l0.01", "topk-64-k4"}
    copy.write_text(yaml.safe_dump(saved, sort_keys=False))
    state.write_text(json.dumps({**json.loads(state.read_text()), "config_hash": "0" * 16}))
    with pytest.raises(ScopeError, match="different config"):
        train(load_config(data=_cfg(synth, steps=4, lr=1e-3)), out, progress=False)


def _run(cfg: dict, out: Path) -> subprocess.Popen:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.Popen([sys.executable, "-m", "scope", "train", str(path), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def test_killed_training_resumes_to_the_same_weights(synth, tmp_path):
    # 40 steps of 256 rows is 2.5 epochs of the ~4,000 training rows: the kill and the resume cross epochs.
    # A 5-step dead window (1,280 rows) and a dead frequency of 1 % let the AuxK, resampling (steps 10, 20, 30) and
    # the hand-over's revival (step 20) act in so short a run; "rs" also trains with lazy Adam.
    cfg = _cfg(synth, steps=40, checkpoint_every=8, dead_window_steps=5, dead_frequency=1e-2)
    cfg["dictionaries"] += [
        {"name": "rs", "kind": "topk", "d_sae": 1024, "k": 4, "resample_every": 10, "lazy_adam": True},
        {"name": "gs2", "kind": "jumprelu", "d_sae": 64, "sparsity_coeff": 1.0, "sparsity_loss": "quadratic",
         "target_l0": 8, "freq_coeff": 1.0, "freq_max": 0.05, "matryoshka_widths": [8, 32]},
        {"name": "mbtk", "kind": "topk", "d_sae": 64, "k": 4, "selection": "batch", "matryoshka_widths": [8, 32]},
        {"name": "btk", "kind": "jumprelu", "d_sae": 512, "sparsity_coeff": 1.0, "sparsity_loss": "quadratic",
         "target_l0": 4, "batchtopk_steps": 20, "aux_coeff": 0.125,
         "handover_revive": 0.01}]  # BatchTopK phase, then JumpReLU from thresholds lowered for the dead latents
    killed = tmp_path / "killed"
    proc = _run(cfg, killed)
    deadline = time.time() + 300
    while not (killed / "checkpoint" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "jumprelu-64-l0.01").exists(), "killed before the end"
    assert _run(cfg, killed).wait() == 0
    assert _run(cfg, tmp_path / "clean").wait() == 0
    logged = [json.loads(line) for line in (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("rs/resampled", 0) for r in logged) > 0, "the run resampled after the resume"
    assert [(r["step"], r["btk/revived"] > 0) for r in logged if "btk/revived" in r] == [(20, True)]
    for name in ("jumprelu-64-l0.01", "topk-64-k4", "gs2", "mbtk", "btk", "rs"):
        a = load_file(str(killed / name / "weights.safetensors"))
        b = load_file(str(tmp_path / "clean" / name / "weights.safetensors"))
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(synth, tmp_path):
    # JumpReLUs: every term is a batch mean. "rs" resamples its dead latents (steps 5 and 10) from the batch
    # gathered from both processes; a rank that drew other rows would leave rank 0's weights off the 1-process run.
    cfg = _cfg(synth, steps=10, dead_window_steps=2, dead_frequency=1e-3)
    cfg["dictionaries"] = [cfg["dictionaries"][0],
                           {"name": "rs", "kind": "jumprelu", "d_sae": 1024, "sparsity_coeff": 0.01, "threshold_init": 0.7,
                            "resample_every": 5, "resample_until": 10}]
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29544",
                          "-m", "scope", "train", str(path), "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "scope", "train", str(path), "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    resampled = [{r["step"]: r["rs/resampled"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").open())
                  if "rs/resampled" in r} for run in ("one", "two")]
    # Step 5 is not a logging step (log_every 2): a resampling step is logged all the same.
    assert set(resampled[0]) == {5, 10} and sum(resampled[0].values()) > 0 and resampled[0] == resampled[1]
    for name in ("jumprelu-64-l0.01", "rs"):
        a = load_file(str(tmp_path / "one" / name / "weights.safetensors"))
        b = load_file(str(tmp_path / "two" / name / "weights.safetensors"))
        # Gradients are summed in a different order across processes: equal to float32 round-off.
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{name}.{k}")
        fresh = build({"kind": "jumprelu", "d_in": 16, "d_sae": a["W_dec"].shape[0]}).W_dec
        assert a["W_dec"].shape == fresh.shape and not torch.equal(a["W_dec"], fresh), f"{name} trained"


# --- configs ------------------------------------------------------------------------------------

def test_shipped_configs_validate():
    root = Path(__file__).resolve().parents[1] / "sae_configs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"gemma-3-270m-res-l6-jumprelu-4k.yaml", "gemma-3-270m-res-l6-jumprelu-16k.yaml",
            "gemma-3-270m-res-l6-topk-16k.yaml", "gemma-3-270m-res-l6-stattopk-16k.yaml"} <= set(names)
    for p in [*root.glob("*.yaml"), *(root.parent / "benchmarks" / "jumprelu_ablations").glob("*.yaml")]:
        load_config(p)


@pytest.mark.parametrize("change,message", [
    (lambda c: c["trainer"].update(lrr=1), r"unknown key 'trainer\.lrr'; valid keys there: .*batch_size.*lr"),
    (lambda c: c.update(stor="x"), r"unknown key 'stor'; valid keys there: .*store"),
    (lambda c: c["dictionaries"][0].update(kind="gated"), r"dictionaries\.0\.kind"),
    (lambda c: c["dictionaries"][1].pop("k"), r"topk but sets no `k`"),
    (lambda c: c["trainer"].update(total_tokens=0), r"trainer\.total_tokens"),
    (lambda c: c["trainer"].update(adam_betas=[1.5, 0.999]), r"trainer\.adam_betas\.0: .*less than 1 \(got 1\.5\)"),
    (lambda c: c["dictionaries"][0].update(adam_betas=[0, -0.1]), r"dictionaries\.0\.adam_betas\.1: .*(got -0\.1)"),
    (lambda c: c["dictionaries"][1].update(dead_after_tokens=-5), r"dictionaries\.1\.dead_after_tokens: .*(got -5)"),
    (lambda c: c["dictionaries"][0].update(d_in=0), r"dictionaries\.0\.d_in: .*(got 0)"),
    # an option of another kind would be ignored: a TopK with target_l0, a JumpReLU with k
    (lambda c: c["dictionaries"][1].update(target_l0=50),
     r"target_l0 50 is read only by jumprelu dictionaries, and this one is kind topk.*remove target_l0"),
    (lambda c: c["dictionaries"][0].update(k=32), r"k 32 is read only by topk dictionaries.*kind jumprelu"),
    (lambda c: c["dictionaries"][1].update(sparsity_coeff=0.5), r"sparsity_coeff 0\.5 is read only by jumprelu and relu"),
    (lambda c: c["dictionaries"][1].update(threshold_lr=1e-4), r"'topk-64-k4': threshold_lr 0\.0001 is read only by jumprelu"),
    (lambda c: c["dictionaries"][1].update(init_l0=30), r"init_l0 30 is read only by jumprelu dictionaries"),
])
def test_bad_configs_are_clear_errors(change, message):
    cfg = _cfg("somewhere")
    change(cfg)
    with pytest.raises(ScopeError, match=message):
        load_config(data=cfg)


def test_pre_act_loss_with_a_dead_window_longer_than_the_run_warns(synth, tmp_path):
    cfg = _cfg(synth, steps=4)
    cfg["dictionaries"][0]["pre_act_coeff"] = 1e-5
    with pytest.warns(UserWarning, match=r"dead window of 1000 steps \(the whole run\)"):
        train(load_config(data=cfg), tmp_path / "long", progress=False)
    cfg["trainer"]["dead_window_steps"] = 1
    with pytest.warns(UserWarning, match=r"fewer than the 1/dead_frequency rows.*too short"):
        train(load_config(data=cfg), tmp_path / "few", progress=False)
    cfg["trainer"]["dead_window_steps"], cfg["trainer"]["dead_frequency"] = 2, 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train(load_config(data=cfg), tmp_path / "short", progress=False)
    assert dead_window_for(1024, 585, 1e-5) == 98 and dead_window_for(4096, 488, 1e-5) == 48
    assert dead_window_for(512, 60, 1e-5) is None


def test_set_overrides_and_width_mismatch(synth, tmp_path):
    cfg = load_config(data=_cfg(synth), overrides=["trainer.lr=1e-4", "dictionaries.0.d_sae=128"])
    assert cfg.trainer.lr == 1e-4 and cfg.dictionaries[0].d_sae == 128
    with pytest.raises(ScopeError, match="index '5' is out of range"):
        load_config(data=_cfg(synth), overrides=["dictionaries.5=1"])
    with pytest.raises(ScopeError, match="KEY=VALUE"):
        load_config(data=_cfg(synth), overrides=["trainer.lr"])
    bad = load_config(data=_cfg(synth), overrides=["dictionaries.0.d_in=640"])
    with pytest.raises(ScopeError, match="width 16, but dictionary 'jumprelu-64-l0.01' expects d_in=640"):
        train(bad, tmp_path / "run", progress=False)


@pytest.mark.parametrize("window", [1, 7, 58, 98, 250])
def test_the_firing_record_always_holds_the_whole_dead_window(window):
    from scope.training.config import DictSpec
    from scope.training.trainer import DEAD_BLOCKS, Trained, block_steps_for, dead_window_for

    batch, frequency = 1024, 1e-5
    if window == 98:
        assert dead_window_for(batch, 585, frequency) == 98, "the quickstart's window"
    d_sae = 8
    run = Trained(DictSpec(kind="jumprelu", d_sae=d_sae), None, None,
                  torch.zeros(DEAD_BLOCKS + 1, d_sae, dtype=torch.long), torch.zeros(DEAD_BLOCKS + 1, dtype=torch.long))
    counts = torch.zeros(d_sae, dtype=torch.long)
    counts[0] = 5
    for step in range(3 * window + 20):
        run.record(counts, batch, step, block_steps_for(window))
        if step + 1 >= window:
            assert int(run.fire_rows.sum()) >= window * batch, (step, int(run.fire_rows.sum()))
            if window * batch * frequency >= 1:
                mask = run.dead_mask(frequency)
                assert mask is not None and not mask[0] and mask[1:].all()


def test_threshold_lr_gives_jumprelu_thresholds_their_own_learning_rate(synth, tmp_path):
    # With Adam's β1 = 0 a parameter moves by about its learning rate per step whatever its gradient, so after the
    # same steps from the same θ (threshold_init, no init_l0) the largest move of θ scales with θ's learning rate.
    def theta_move(threshold_lr):
        cfg = _cfg(synth, steps=3)
        cfg["dictionaries"] = [{"kind": "jumprelu", "d_sae": 64, "sparsity_coeff": 0.01, "threshold_lr": threshold_lr}]
        saved = train(load_config(data=cfg), tmp_path / f"run-{threshold_lr}", progress=False)
        sae = load(saved["jumprelu-64-l0.01"])
        return (sae.threshold - sae.cfg.threshold_init).abs().max().item()

    own, shared = theta_move(3e-5), theta_move(None)
    assert shared > 1e-3, "θ trains at the dictionary's lr (3e-3) by default"
    assert 0.5 < (own / shared) / (3e-5 / 3e-3) < 2, (own, shared)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_training_keeps_freed_memory_so_a_steps_temporaries_do_not_fault_in_again():
    # 64 MiB temporaries, as a step's: without the setting glibc returns each to the kernel and the next faults in
    # 16,384 pages. The first few settle first: an aligned request does not fit the chunk just freed, so the heap
    # grows once or twice before freed chunks are reused (one round alone faulted in about half of the runs).
    code = """if True:
        import resource, sys, torch
        from scope.training.trainer import reuse_freed_memory
        if sys.argv[1] == "on":
            assert reuse_freed_memory()
        for _ in range(3):
            torch.ones(2**24).sum()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            torch.ones(2**24).sum()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
    for _ in range(3):  # heap layouts differ from run to run (address randomisation)
        faults = {m: int(subprocess.run([sys.executable, "-c", code, m], check=True, capture_output=True,
                                        text=True).stdout) for m in ("on", "off")}
        assert faults["off"] > 30_000, f"the check sees the faults it is meant to prevent: {faults}"
        assert faults["on"] < 1_000, faults


def test_the_compiled_pair_loops_give_zeros_for_an_empty_batch_or_no_pairs():
    none, no_vals = torch.zeros(0, dtype=torch.long), torch.zeros(0)
    for rows in (0, 3):
        grad_W_enc, col_sums = cpu_kernels.transpose_times(none, none, no_vals, 8, torch.randn(rows, 4))
        assert grad_W_enc.shape == (4, 8) and not grad_W_enc.any() and not col_sums.any()
        assert cpu_kernels.decode(none, none, no_vals, torch.randn(8, 4), rows).equal(torch.zeros(rows, 4))
        grad_vals, grad_W_dec = cpu_kernels.decode_backward(none, none, no_vals, torch.randn(8, 4),
                                                            torch.randn(rows, 4))
        assert grad_vals.shape == (0,) and not grad_W_dec.any()


# --- forking a run from another's checkpoint ------------------------------------------------------------------

def _fork_cfgs(synth: str) -> tuple[dict, dict]:
    """A 16-step parent and a 40-step child that differs only from step 20 on (its hand-over revives dead latents).
    No lr decay (lr_decay_start 1), so the two schedules agree up to the fork whatever the lengths."""
    btk = {"kind": "jumprelu", "d_sae": 512, "sparsity_coeff": 1.0, "sparsity_loss": "quadratic", "target_l0": 4,
           "batchtopk_steps": 20, "aux_coeff": 0.125}
    parent = _cfg(synth, steps=16, checkpoint_every=8, snapshot_every=8, lr_decay_start=1.0, dead_window_steps=5,
                  dead_frequency=1e-2)
    parent["dictionaries"] = [{"name": "btk", **btk}]
    child = _cfg(synth, steps=40, checkpoint_every=8, snapshot_every=8, lr_decay_start=1.0, dead_window_steps=5,
                 dead_frequency=1e-2)
    child["dictionaries"] = [{"name": "btk-revive", **btk, "handover_revive": 0.01}]
    return parent, child


def test_a_forked_run_ends_with_the_weights_of_the_same_config_trained_from_scratch(synth, tmp_path):
    parent, child = _fork_cfgs(synth)
    train(load_config(data=parent), tmp_path / "parent", progress=False)
    forked = train(load_config(data=child), tmp_path / "forked", progress=False, fork_from=tmp_path / "parent")
    scratch = train(load_config(data=child), tmp_path / "scratch", progress=False)
    a = load_file(str(forked["btk-revive"] / "weights.safetensors"))
    b = load_file(str(scratch["btk-revive"] / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "forked" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "btk-revive/l0" in r]
    assert steps == [r["step"] for r in map(json.loads, (tmp_path / "scratch" / "metrics.jsonl").open())]
    assert not any(k.startswith("btk/") for r in rows for k in r), "the parent's rows are renamed"
    assert any(r.get("btk-revive/revived", 0) > 0 for r in rows), "the revival at step 20 ran in the fork"
    # Snapshot 8 is the parent's (its step 16 is its end, saved as its final dictionary, not a snapshot); 24, 32 its own.
    snaps = sorted(p.parent.name for p in (tmp_path / "forked" / "snapshots").glob("step-*/btk-revive"))
    assert snaps == ["step-0000008", "step-0000024", "step-0000032"]
    for snap in snaps:
        a, b = (load_file(str(tmp_path / run / "snapshots" / snap / "btk-revive" / "weights.safetensors"))
                for run in ("forked", "scratch"))
        assert all(torch.equal(a[k], b[k]) for k in a), snap
    meta = json.loads((tmp_path / "forked" / "forked_from.json").read_text())
    assert meta["step"] == 16 and meta["names"] == {"btk-revive": "btk"}
    assert "dictionaries[btk-revive].handover_revive: None -> 0.01" in meta["differences"]
    assert "trainer.total_tokens: 4096 -> 10240" in meta["differences"]


@pytest.mark.parametrize("change,message", [
    ({"trainer.batch_size": 128}, "trainer.batch_size differs \\(256 there, 128 here\\)"),
    ({"trainer.lr": 1e-3}, "another learning rate or sparsity coefficient at step 1"),
    ({"trainer.sparsity_warmup_steps": 6}, "sparsity coefficient at step 2"),
    ({"dictionaries.0.batchtopk_steps": 12}, "leaves its BatchTopK phase at step 12 \\(handover_revive 0.01\\), the "
     "parent's 'btk' at 20"),
    ({"dictionaries.0.batchtopk_steps": 16}, "at step 16 .* at or before the fork"),
    ({"trainer.total_tokens": 256 * 16}, "this config trains 16 steps, so nothing is left after step 16"),
])
def test_a_fork_that_would_not_equal_its_config_from_scratch_is_refused(synth, tmp_path, change, message):
    parent, child = _fork_cfgs(synth)
    train(load_config(data=parent), tmp_path / "parent", progress=False)
    (key, value), = change.items()
    where = child
    *path, last = key.split(".")
    for part in path:
        where = where[int(part)] if part.isdigit() else where[part]
    where[last] = value
    with pytest.raises(ScopeError, match=message):
        train(load_config(data=child), tmp_path / "forked", progress=False, fork_from=tmp_path / "parent")


def test_fork_from_a_folder_that_is_not_a_run_is_one_clear_line(synth, tmp_path):
    from typer.testing import CliRunner

    from scope.cli import app

    _, child = _fork_cfgs(synth)
    path = tmp_path / "child.yaml"
    path.write_text(yaml.safe_dump(child))
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "o"), "--fork-from", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "is not a training run with a checkpoint" in res.output
    assert "Traceback" not in res.output
