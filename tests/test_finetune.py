"""The KL + MSE fine-tune of a trained SAE spliced into the real Gemma 3 270M (scope/training/finetune.py)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from scope.cli import app
from scope.dictionaries import load
from scope.errors import ScopeError
from scope.evals import lm_loss_on_windows
from scope.training import load_config, train
from scope.training import finetune as finetune_module
from scope.training.finetune import FinetuneSettings, _mean_kl, _windows, finetune, unfold_input_scale

HOOK = "blocks.6.hook_resid_post"
pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def trained(small_store, tmp_path_factory) -> dict[str, str]:
    """A JumpReLU and a TopK SAE trained briefly on the real store (folders)."""
    out = tmp_path_factory.mktemp("ft-train")
    cfg = load_config(data={
        "store": small_store.url, "hook": HOOK,
        "trainer": {"total_tokens": 256 * 30, "batch_size": 256, "lr": 3e-3, "lr_warmup_steps": 2,
                    "log_every": 10, "checkpoint_every": 100, "buffer_rows": 1024, "norm_estimate_rows": 2000},
        "dictionaries": [{"name": "jr", "kind": "jumprelu", "d_sae": 256, "sparsity_coeff": 1.0,
                          "sparsity_loss": "quadratic", "target_l0": 20, "init_l0": 20, "bandwidth": 0.01},
                         {"name": "topk", "kind": "topk", "d_sae": 256, "k": 16}]})
    return {k: str(v) for k, v in train(cfg, out, progress=False).items()}


SMALL = dict(tokens=512, batch_windows=2, lr=3e-4, checkpoint_every=2)


def test_decoder_finetune_lowers_the_spliced_kl_and_leaves_the_codes_alone(gemma, small_store, trained, tmp_path):
    settings = FinetuneSettings(**SMALL)
    before = load(trained["topk"])
    windows = _windows(small_store, gemma, settings)
    kl_before = lm_loss_on_windows(before, gemma, windows, HOOK, progress=False).kl
    result = finetune(load(trained["topk"]), gemma, small_store, tmp_path / "ft", settings, progress=False)
    after = load(result.path)
    kl_after = lm_loss_on_windows(after, gemma, windows, HOOK, progress=False).kl
    assert kl_after < 0.95 * kl_before, (kl_before, kl_after)  # 0.87x when written
    x = next(small_store.batches(HOOK, batch_size=512))
    with torch.no_grad():
        codes_before, codes_after = before.encode(x), after.encode(x)  # the encoder, hence every code, is untouched
    flips = (codes_before != 0) != (codes_after != 0)  # float rounding may flip a near-tie, nothing more
    assert flips.sum() <= 2, int(flips.sum())
    same = ~flips.any(-1)
    torch.testing.assert_close(codes_after[same], codes_before[same], rtol=1e-4,
                               atol=1e-4 * float(codes_before.abs().max()))
    torch.testing.assert_close(after.W_enc, before.W_enc, rtol=1e-6, atol=0)
    assert (after.b_dec - before.b_dec).norm() > 1e-4 * before.b_dec.norm()  # b_dec moved, b_enc took it up
    assert (after.W_dec - before.W_dec).norm() > 1e-3 * before.W_dec.norm()
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, result.steps + 1))
    # α is fixed at the first step so that α · FVU equals the KL there
    assert result.mse_weight * rows[0]["fvu"] == pytest.approx(rows[0]["kl"], rel=1e-5)
    assert result.l0_start == rows[0]["l0"] and result.l0_end == rows[-1]["l0"]


def test_unfolding_the_input_scale_keeps_the_outputs_and_makes_decoder_rows_unit(trained):
    sae = load(trained["jr"])
    x = torch.randn(8, 640) * 3000  # the raw residual stream's scale
    with torch.no_grad():
        y = sae(x)
        unfold_input_scale(sae)
    assert float(sae.W_dec.detach().norm(dim=1).median()) == pytest.approx(1.0, rel=1e-5)
    assert float(sae.input_scale) != 1.0
    with torch.no_grad():
        torch.testing.assert_close(sae(x), y, rtol=1e-4, atol=1e-2)


def test_all_parameters_move_the_encoder_but_not_a_jumprelus_thresholds(gemma, small_store, trained, tmp_path):
    before = load(trained["jr"])
    result = finetune(load(trained["jr"]), gemma, small_store, tmp_path / "ft",
                      FinetuneSettings(**SMALL, train="all"), progress=False)
    after = load(result.path)
    assert (after.W_enc - before.W_enc).norm() > 1e-3 * before.W_enc.norm()
    torch.testing.assert_close(after.threshold, before.threshold, rtol=1e-6, atol=0)


def test_trainable_codes_give_the_thresholds_traininglike_pseudo_derivatives():
    from scope.dictionaries.jumprelu import JumpReLU, JumpReLUConfig

    sae = JumpReLU(JumpReLUConfig(d_in=4, d_sae=3, bandwidth=0.2))
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([0.5, 1.0, 2.0]))
    pre = torch.tensor([[0.45, 1.05, 3.0], [0.7, 0.95, 1.0]])
    codes, l0 = sae.trainable_codes(pre)
    torch.testing.assert_close(codes, torch.tensor([[0.0, 1.05, 3.0], [0.7, 0.0, 0.0]]))
    assert float(l0) == 1.5  # 3 active of 2 rows
    (codes.sum() + 10 * l0).backward()
    # Inside the kernel window |z − θ| ≤ ε/2: −θ/ε per row from the code, −10/(ε·rows) from the mean L0;
    # latent 0 has one row there, latent 1 two, latent 2 none.
    eps = 0.2
    expected = torch.tensor([-(0.5 / eps) - 10 / eps / 2, 2 * (-(1.0 / eps) - 10 / eps / 2), 0.0])
    torch.testing.assert_close(sae.threshold.grad, expected)


def test_threshold_finetune_moves_the_thresholds_and_its_penalty_pulls_l0_to_the_target(gemma, small_store, trained,
                                                                                       tmp_path):
    before = load(trained["jr"])
    x = next(small_store.batches(HOOK, batch_size=512))
    with torch.no_grad():
        l0_before = float((before.encode(x) != 0).sum(-1).float().mean())
    ends = {}
    for target in (0.5 * l0_before, 2 * l0_before):
        settings = FinetuneSettings(**{**SMALL, "tokens": 1024}, train="all", threshold_lr=3e-3, target_l0=target,
                                    l0_coeff=100.0)
        result = finetune(load(trained["jr"]), gemma, small_store, tmp_path / f"ft{target:g}", settings,
                          progress=False)
        after = load(result.path)
        with torch.no_grad():
            ends[target] = float((after.encode(x) != 0).sum(-1).float().mean())
        moved = (after.threshold - before.threshold).abs()
        assert float(moved.max()) > 1e-3, float(moved.max())
        rows = [json.loads(line) for line in (tmp_path / f"ft{target:g}" / "metrics.jsonl").read_text().splitlines()]
        assert all("threshold_mean" in r for r in rows)
    low, high = sorted(ends)
    assert ends[low] < l0_before < ends[high], (l0_before, ends)
    with pytest.raises(ValueError, match="needs train 'all'"):
        FinetuneSettings(**SMALL, threshold_lr=1e-5)
    with pytest.raises(ScopeError, match="target_l0 300 is not a reachable L0"):
        finetune(load(trained["jr"]), gemma, small_store, tmp_path / "far",
                 FinetuneSettings(**SMALL, train="all", threshold_lr=1e-5, target_l0=300), progress=False)
    with pytest.raises(ScopeError, match="topk, which has none"):
        finetune(load(trained["topk"]), gemma, small_store, tmp_path / "topk",
                 FinetuneSettings(**SMALL, train="all", threshold_lr=1e-5), progress=False)


def test_a_killed_finetune_resumes_to_the_same_weights(gemma, small_store, trained, tmp_path, monkeypatch):
    settings = FinetuneSettings(**SMALL)
    whole = finetune(load(trained["jr"]), gemma, small_store, tmp_path / "whole", settings, progress=False)
    real, calls = finetune_module._step_loss, [0]

    def dies_at_step_4(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt  # killed after the checkpoint of step 2 and the logged step 3
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "_step_loss", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        finetune(load(trained["jr"]), gemma, small_store, tmp_path / "split", settings, progress=False)
    monkeypatch.setattr(finetune_module, "_step_loss", real)
    resumed = finetune(load(trained["jr"]), gemma, small_store, tmp_path / "split", settings, progress=False)
    a, b = load(whole.path), load(resumed.path)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, whole.steps + 1))
    with pytest.raises(ScopeError, match="another SAE, store or settings"):
        finetune(load(trained["jr"]), gemma, small_store, tmp_path / "split",
                 FinetuneSettings(**{**SMALL, "lr": 1e-3}), progress=False)


def test_finetune_refuses_a_busy_folder_and_more_tokens_than_the_store_holds(gemma, small_store, trained, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ScopeError, match="not empty"):
        finetune(load(trained["topk"]), gemma, small_store, tmp_path / "busy", FinetuneSettings(**SMALL),
                 progress=False)
    with pytest.raises(ScopeError, match="tokens=1,000,000"):
        finetune(load(trained["topk"]), gemma, small_store, tmp_path / "big",
                 FinetuneSettings(**{**SMALL, "tokens": 1_000_000}), progress=False)


def test_scope_finetune_cli_reports_the_paired_change_and_rejects_bad_flags(small_store, trained, tmp_path):
    result = CliRunner().invoke(app, ["finetune", trained["topk"], "--store", small_store.url, "--out",
                                      str(tmp_path / "ft"), "--tokens", "256", "--batch-windows", "2", "--lr", "3e-4",
                                      "--held-out", "0.5", "--lm-tokens", "128", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    change = out["held_out"]["change"]
    assert change["delta_loss"] == pytest.approx(
        out["held_out"]["after"]["delta_loss"] - out["held_out"]["before"]["delta_loss"], abs=1e-9)
    assert load(out["path"]).cfg.d_sae == 256
    bad = CliRunner().invoke(app, ["finetune", trained["topk"], "--store", small_store.url, "--out",
                                   str(tmp_path / "x"), "--train", "encoder"])
    assert bad.exit_code == 2 and "--train" in bad.output and "decoder" in bad.output, bad.output
    no_encoder = CliRunner().invoke(app, ["finetune", trained["jr"], "--store", small_store.url, "--out",
                                          str(tmp_path / "z"), "--threshold-lr", "1e-5"])
    assert no_encoder.exit_code == 2 and "needs --train 'all'" in no_encoder.output, no_encoder.output
    no_thresholds = CliRunner().invoke(app, ["finetune", trained["jr"], "--store", small_store.url, "--out",
                                             str(tmp_path / "v"), "--train", "all", "--target-l0", "20"])
    assert no_thresholds.exit_code == 2 and "--threshold-lr above 0" in no_thresholds.output, no_thresholds.output
    for flag, value in (("--threshold-lr", "-1"), ("--target-l0", "0"), ("--l0-coeff", "nan")):
        bad = CliRunner().invoke(app, ["finetune", trained["jr"], "--store", small_store.url, "--out",
                                       str(tmp_path / "w"), "--train", "all", flag, value])
        assert bad.exit_code == 2 and flag in bad.output and value in bad.output, bad.output
    empty = CliRunner().invoke(app, ["finetune", trained["topk"], "--store", small_store.url, "--out",
                                     str(tmp_path / "y"), "--held-out", "0.01"])
    assert empty.exit_code == 2 and "--lm-tokens 0" in empty.output and not (tmp_path / "y").exists(), empty.output


def test_the_slice_by_slice_kl_and_its_gradient_equal_autograds_whole_batch_kl():
    # Slices that do not divide the positions, and padded positions (keep False) that must get no gradient.
    torch.manual_seed(0)
    logits = (torch.randn(3, 9, 37) * 3).requires_grad_()
    lp_clean = (torch.randn(3, 9, 37) * 2).log_softmax(-1)
    keep = torch.ones(3, 8, dtype=torch.bool)
    keep[1, 5:] = False
    keep[2, :2] = False
    per_position = torch.nn.functional.kl_div(logits.log_softmax(-1)[:, :-1], lp_clean[:, :-1], log_target=True,
                                              reduction="none").sum(-1)
    expected = per_position[keep].sum() / keep.sum()
    (want,) = torch.autograd.grad(2.5 * expected, logits)
    got_kl = _mean_kl(logits, lp_clean, keep)
    (got,) = torch.autograd.grad(2.5 * got_kl, logits)
    torch.testing.assert_close(got_kl, expected)
    torch.testing.assert_close(got, want)
    assert got[1, 5:].abs().sum() == 0 and got[2, :2].abs().sum() == 0 and got[:, -1].abs().sum() == 0

