"""Gemma Scope 2's training terms and the Matryoshka loss, against values computed by hand; epochs over a store."""

from __future__ import annotations

import pytest
import torch
import yaml

from scope.dictionaries import build, load
from scope.dictionaries.jumprelu import rectangle
from scope.errors import ScopeError
from scope.store import ActivationStore
from scope.training import load_config, train
from scope.training.trainer import training_batches

from test_store import synthetic_store

EPS = 0.05


def _jumprelu(**cfg):
    torch.manual_seed(0)
    # θ = 2 on unit-variance pre-activations: about 2 % of the pairs are active, so the sparse kernels run
    d = build({"kind": "jumprelu", "d_in": 16, "d_sae": 256, "bandwidth": EPS, "threshold_init": 2.0, **cfg})
    with torch.no_grad():
        d.b_enc.normal_(0, 0.2)
    return d


def _penalty_and_theta_grad(d, x: torch.Tensor, coeff: float, sparse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss with the given λ minus the loss with λ = 0, and the same difference of θ's gradient."""
    out = []
    for lam in (coeff, 0.0):
        d.zero_grad()
        parts = d.loss(x, lam, sparse=sparse)
        assert (parts.codes is None) == sparse, "the path under test ran"
        parts.loss.backward()
        out.append((parts.loss.detach(), d.threshold.grad.clone()))
    return out[0][0] - out[1][0], out[0][1] - out[1][1]


@pytest.mark.parametrize("sparse", [False, True])
def test_quadratic_l0_penalty_is_the_squared_relative_distance_from_the_target(sparse):
    d = _jumprelu(sparsity_loss="quadratic", target_l0=2.0)
    x = torch.randn(128, 16)
    z = d.pre_acts(x).detach()
    theta = d.threshold.detach()
    l0 = (z > theta).float().sum(-1).mean()
    assert float(l0) > 4, "the batch is away from the target, so the penalty is not vacuous"
    penalty, grad = _penalty_and_theta_grad(d, x, 0.7, sparse)
    torch.testing.assert_close(penalty, 0.7 * (l0 / 2 - 1) ** 2, rtol=1e-5, atol=1e-6)
    # d/dθᵢ λ(L0/T − 1)² = λ·2(L0/T − 1)/T · dL0/dθᵢ, with dL0/dθᵢ = −(1/(εB)) Σ_b K((z_bi − θᵢ)/ε)
    dl0 = -rectangle((z - theta) / EPS).sum(0) / (EPS * x.shape[0])
    torch.testing.assert_close(grad, 0.7 * 2 * (l0 / 2 - 1) / 2 * dl0, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_frequency_penalty_acts_only_on_latents_firing_above_the_limit(sparse):
    d = _jumprelu(freq_coeff=3.0, freq_max=0.2)
    with torch.no_grad():
        d.threshold[:8] = 0.01  # these fire on about half the rows
    x = torch.randn(128, 16)
    z = d.pre_acts(x).detach()
    theta = d.threshold.detach()
    p = (z > theta).float().mean(0)
    over = torch.relu(p - 0.2)
    assert (over > 0).sum() >= 5 and (over == 0).sum() >= 200, "some latents above the limit, most below"
    # The frequency penalty is in the loss at any λ; compare against a copy without it.
    plain = _jumprelu()
    plain.load_state_dict(d.state_dict())
    with_pen, without = d.loss(x, 0.1, sparse=sparse), plain.loss(x, 0.1, sparse=sparse)
    assert (with_pen.codes is None) == sparse, "the path under test ran"
    torch.testing.assert_close(with_pen.loss - without.loss, 3.0 * over.pow(2).sum(), rtol=1e-5, atol=1e-6)
    with_pen.loss.backward()
    without.loss.backward()
    grad = d.threshold.grad - plain.threshold.grad
    dp = -rectangle((z - theta) / EPS).sum(0) / (EPS * x.shape[0])
    torch.testing.assert_close(grad, 3.0 * 2 * over * dp, rtol=1e-4, atol=1e-6)
    assert (grad[over == 0] == 0).all()


@pytest.mark.parametrize("sparse", [False, True])
def test_jumprelu_auxk_reconstructs_the_residual_from_dead_latents_only(sparse):
    d = _jumprelu(aux_coeff=0.25, aux_k=3)
    x = torch.randn(64, 16)
    dead = torch.zeros(256, dtype=torch.bool)
    dead[::4] = True
    parts = d.loss(x, 0.0, sparse=sparse, dead=dead)
    assert (parts.codes is None) == sparse, "the path under test ran"
    # by hand: the residual of the main reconstruction, rebuilt from each row's top 3 ReLU'd dead pre-activations
    z = d.pre_acts(x).detach()
    f = z * (z > d.threshold.detach())
    err = x * d.input_scale - (f @ d.W_dec.detach() + d.b_dec.detach())
    zd = torch.relu(z).masked_fill(~dead, 0)
    top = torch.zeros_like(zd).scatter(-1, zd.topk(3, dim=-1).indices, zd.topk(3, dim=-1).values)
    want = (err - top @ d.W_dec.detach()).pow(2).sum(-1).mean() / (err - err.mean(0)).pow(2).sum(-1).mean()
    torch.testing.assert_close(parts.aux, want, rtol=1e-4, atol=1e-6)
    without = d.loss(x, 0.0, sparse=sparse, dead=None)
    assert without.aux is None
    torch.testing.assert_close(parts.loss - without.loss, 0.25 * want, rtol=1e-4, atol=1e-6)
    d.zero_grad()
    (parts.loss - without.loss).backward()
    moved = d.W_dec.grad.abs().sum(1) > 0
    assert moved.any() and not moved[~dead].any(), "only dead latents' decoder columns learn from AuxK"
    assert d.b_dec.grad is None or not d.b_dec.grad.any(), "AuxK leaves b_dec alone (a shift moves every latent)"


@pytest.mark.parametrize("sparse", [False, True])
def test_topk_aux_b_dec_decides_whether_auxk_moves_b_dec(sparse):
    # Gao et al.'s AuxK reaches b_dec through the centred encoder input; aux_b_dec: false keeps it to the dead
    # latents' own parameters, as a JumpReLU's AuxK, with the same loss value.
    torch.manual_seed(0)
    x = torch.randn(64, 16) * 2
    auxes, grads = [], []
    for through in (True, False):
        torch.manual_seed(1)
        d = build({"kind": "topk", "d_in": 16, "d_sae": 256, "k": 4, "dead_after_tokens": 0, "aux_k": 3,
                   "aux_b_dec": through})
        with torch.no_grad():
            d.b_dec.normal_(0, 0.3)
        d.tokens_since_fired.fill_(1)  # every latent not firing in this batch is dead
        parts = d.loss(x, sparse=sparse)
        assert parts.aux is not None and (parts.codes is None) == sparse, "AuxK ran on the path under test"
        parts.aux.backward()
        auxes.append(parts.aux.detach())
        grads.append((d.b_dec.grad, d.W_enc.grad))
    torch.testing.assert_close(auxes[0], auxes[1])
    (b_through, w_through), (b_not, w_not) = grads
    assert b_through is not None and b_through.abs().sum() > 0, "Gao et al.'s AuxK moves b_dec"
    assert b_not is None or not b_not.any(), "aux_b_dec: false leaves b_dec alone"
    torch.testing.assert_close(w_not, w_through, msg="the encoder's AuxK gradient is the same either way")


def test_aux_b_dec_on_a_jumprelu_is_refused_with_its_name(tmp_path):
    cfg = {"store": str(tmp_path), "trainer": {"total_tokens": 100},
           "dictionaries": [{"kind": "jumprelu", "d_sae": 64, "sparsity_coeff": 1.0, "aux_b_dec": False}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ScopeError, match="aux_b_dec False is read only by topk dictionaries, and this one is kind jumprelu.*remove aux_b_dec"):
        load_config(path)


@pytest.mark.parametrize("sparse", [False, True])
def test_jumprelu_b_dec_learns_only_as_the_decoder_bias(sparse):
    # A shift of b_dec moves every pre-activation against fixed θ, so the penalties must not reach it
    # through the centred encoder input; it gets exactly the gradient of the reconstruction's bias term.
    d = _jumprelu(apply_b_dec_to_input=True, sparsity_loss="quadratic", target_l0=2.0, freq_coeff=3.0,
                  freq_max=0.01)
    with torch.no_grad():
        d.b_dec.normal_(0, 0.3)
    x = torch.randn(128, 16)
    parts = d.loss(x, 5.0, sparse=sparse)
    assert (parts.codes is None) == sparse, "the path under test ran"
    parts.loss.backward()
    assert d.threshold.grad.abs().sum() > 0 and d.W_enc.grad.abs().sum() > 0, "the penalties are live"
    xs = x * d.input_scale
    z = (xs - d.b_dec.detach()) @ d.W_enc.detach() + d.b_enc.detach()
    f = z * (z > d.threshold.detach())
    b = d.b_dec.detach().clone().requires_grad_(True)
    (xs - (f @ d.W_dec.detach() + b)).pow(2).sum(-1).mean().backward()
    torch.testing.assert_close(d.b_dec.grad, b.grad, rtol=1e-4, atol=1e-6)


def _prefix_losses_by_hand(d, x: torch.Tensor, codes: torch.Tensor, widths: list[int]) -> torch.Tensor:
    xs = x * d.input_scale
    return sum((xs - (codes[:, :m] @ d.W_dec[:m] + d.b_dec)).pow(2).sum(-1).mean() for m in widths)


@pytest.mark.parametrize("kind,extra", [("jumprelu", {"threshold_init": 2.0}),
                                        ("topk", {"k": 6, "selection": "batch", "dead_after_tokens": 10**9})])
@pytest.mark.parametrize("sparse", [False, True])
def test_matryoshka_loss_is_the_sum_of_the_prefix_losses(kind, extra, sparse):
    torch.manual_seed(1)
    widths = [16, 96, 256]
    d = build({"kind": kind, "d_in": 16, "d_sae": 256, "matryoshka_widths": widths[:2], **extra})
    with torch.no_grad():
        d.b_dec.normal_(0, 0.1)
        d.input_scale.fill_(0.5)
    x = torch.randn(96, 16) * 2
    plain = build({**d.cfg.model_dump(), "matryoshka_widths": None})
    plain.load_state_dict(d.state_dict())
    codes = plain.loss(x, 0.0, sparse=False).codes
    assert all((codes[:, a:b] != 0).any() for a, b in ((0, 16), (16, 96), (96, 256))), "every bucket is used"
    parts = d.loss(x, 0.0, sparse=sparse)
    assert (parts.codes is None) == sparse, "the path under test ran"
    torch.testing.assert_close(parts.loss, _prefix_losses_by_hand(d, x, codes, widths), rtol=1e-5, atol=1e-6)
    full = (x * 0.5 - (codes @ d.W_dec + d.b_dec)).pow(2).sum(-1).mean()
    torch.testing.assert_close(parts.mse, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_parts", [1, 3])
def test_the_written_out_reconstruction_backward_is_autograds(n_parts):
    from scope.dictionaries.matryoshka import _nested
    torch.manual_seed(3)
    leaves = [torch.randn(40, 8, dtype=torch.float64, requires_grad=True) for _ in range(n_parts + 1)]
    b_dec = torch.randn(8, dtype=torch.float64, requires_grad=True)
    xs, parts = leaves[0], leaves[1:]
    rec = _nested(xs, parts, b_dec)
    (rec.loss + 0.5 * rec.mse).backward()  # both outputs carry a gradient
    got = [t.grad.clone() for t in (xs, b_dec, *parts)]
    for t in (xs, b_dec, *parts):
        t.grad = None
    recon, errs = b_dec, []
    for part in parts:
        recon = recon + part
        errs.append((xs - recon).pow(2).sum(-1).mean())
    (sum(errs) + 0.5 * errs[-1]).backward()
    torch.testing.assert_close(rec.loss, sum(errs))
    torch.testing.assert_close(rec.err, xs - recon)
    assert not rec.err.requires_grad
    for g, t in zip(got, (xs, b_dec, *parts)):
        torch.testing.assert_close(g, t.grad)


def test_matryoshka_sparse_and_plain_gradients_agree():
    torch.manual_seed(2)
    d = build({"kind": "jumprelu", "d_in": 16, "d_sae": 128, "threshold_init": 2.0, "bandwidth": 0.05,
               "matryoshka_widths": [16, 48], "sparsity_loss": "quadratic", "target_l0": 5, "freq_coeff": 1.0,
               "freq_max": 0.01})
    x = torch.randn(64, 16)
    grads = []
    for sparse in (False, True):
        d.zero_grad()
        parts = d.loss(x, 0.3, sparse=sparse)
        assert (parts.codes is None) == sparse, "the path under test ran"
        parts.loss.backward()
        grads.append((parts.loss.detach(), {k: p.grad.clone() for k, p in d.named_parameters()}))
    assert grads[0][1]["threshold"].abs().sum() > 0
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)
    for k in grads[0][1]:
        torch.testing.assert_close(grads[1][1][k], grads[0][1][k], rtol=1e-5, atol=1e-6 * grads[0][1][k].abs().max())


def test_matryoshka_batchtopk_saves_as_a_jumprelu_with_the_same_inference_codes(tmp_path):
    torch.manual_seed(3)
    d = build({"kind": "topk", "d_in": 16, "d_sae": 64, "k": 4, "selection": "batch", "matryoshka_widths": [8, 32]})
    for _ in range(20):  # the inference threshold is a running estimate from training batches
        d.loss(torch.randn(32, 16), sparse=True)
    d.eval()
    assert float(d.threshold) > 0
    d.as_jumprelu().save(tmp_path / "jr")
    jr = load(tmp_path / "jr")
    assert jr.kind == "jumprelu" and jr.cfg.matryoshka_widths == [8, 32]
    x = torch.randn(500, 16) * 2
    assert torch.equal(jr.encode(x), d.encode(x)) and (d.encode(x) > 0).any()
    torch.testing.assert_close(jr(x), d(x))
    with pytest.raises(ValueError, match="one threshold"):
        build({"kind": "topk", "d_in": 16, "d_sae": 64, "k": 4}).as_jumprelu()


@pytest.mark.parametrize("sparse", [False, True])
def test_jumprelu_batchtopk_phase_trains_as_batchtopk_then_hands_over_to_its_own_thresholds(sparse):
    d = _jumprelu(sparsity_loss="quadratic", target_l0=3.0, batchtopk_steps=2, apply_b_dec_to_input=True)
    with torch.no_grad():
        d.b_dec.normal_(0, 0.3)
    x = torch.randn(64, 16)
    # by hand: the batch's 3·64 largest positive pre-activations of the centred input, and their reconstruction
    pre = ((x * d.input_scale - d.b_dec) @ d.W_enc + d.b_enc).detach()
    flat = pre.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(3 * 64).indices] = True
    keep &= flat > 0
    codes = (flat * keep).reshape(pre.shape)
    mse = (x * d.input_scale - codes @ d.W_dec - d.b_dec).pow(2).sum(-1).mean()
    d.zero_grad()
    parts = d.loss(x, 0.7, sparse=sparse, step=0)
    parts.loss.backward()
    torch.testing.assert_close(parts.loss.detach(), mse, rtol=1e-5, atol=1e-6)  # no sparsity term in the phase
    assert float(parts.l0) == pytest.approx(keep.sum().item() / 64)
    assert d.threshold.grad is None or not d.threshold.grad.any(), "θ is set, not trained, in the phase"
    smallest = float(flat[keep].min())
    assert torch.allclose(d.threshold.detach(), torch.full((256,), smallest)), "the first step sets the shared θ"
    x2 = torch.randn(64, 16)
    pre2 = ((x2 * d.input_scale - d.b_dec) @ d.W_enc + d.b_enc).detach().reshape(-1)
    d.loss(x2, 0.7, sparse=sparse, step=1)
    smallest2 = float(pre2[pre2.topk(3 * 64).indices].min())
    assert float(d.threshold[7].detach()) == pytest.approx(0.99 * smallest + 0.01 * smallest2, rel=1e-5), "a running mean"
    # from batchtopk_steps on: the JumpReLU's own loss, with θ trained per latent
    d.zero_grad()
    after = d.loss(x, 0.7, sparse=sparse, step=2)
    after.loss.backward()
    torch.testing.assert_close(after.loss.detach(), d.loss(x, 0.7, sparse=sparse).loss.detach())
    assert d.threshold.grad is not None and d.threshold.grad.any()


@pytest.mark.parametrize("bad,message", [
    ({"kind": "jumprelu", "sparsity_coeff": 1.0, "sparsity_loss": "quadratic"}, "needs a `target_l0`"),
    ({"kind": "jumprelu", "sparsity_coeff": 1.0, "matryoshka_widths": [32, 16]}, "must increase strictly"),
    ({"kind": "jumprelu", "sparsity_coeff": 1.0, "matryoshka_widths": [16, 128]}, "must increase strictly"),
    ({"kind": "icfl", "matryoshka_widths": [16]}, "matryoshka_widths \\[16\\] is read only by jumprelu and topk"),
    ({"kind": "jumprelu", "sparsity_coeff": 1.0, "batchtopk_steps": 10}, "batchtopk_steps 10 needs a target_l0"),
    ({"kind": "topk", "k": 8, "batchtopk_steps": 10}, "batchtopk_steps 10 is read only by jumprelu dictionaries"),
    ({"kind": "topk", "k": 8, "row_cap": 32}, "row_cap 32 caps a BatchTopK selection"),
    ({"kind": "jumprelu", "sparsity_coeff": 1.0, "target_l0": 8, "row_cap": 32}, "needs kind jumprelu with batchtopk"),
    ({"kind": "topk", "k": 8, "selection": "batch", "row_cap": 4}, "row_cap 4 is below k = 8"),
    ({"kind": "jumprelu", "sparsity_coeff": 1.0, "target_l0": 8, "batchtopk_steps": 5, "row_cap": 4},
     "use a row_cap of at least 8"),
    ({"kind": "topk", "k": 8, "resample_every": 100},
     "resample_every 100 is shorter than trainer.dead_window_steps 1000.*at least 1000"),
    ({"kind": "icfl", "resample_every": 1000}, "needs kind jumprelu, topk or relu \\(this one is icfl\\)"),
    ({"kind": "topk", "k": 8, "resample_until": 50}, "resample_until 50 needs resample_every"),
    ({"kind": "jumprelu", "sparsity_coeff": 1.0, "handover_revive": 0.01}, "handover_revive 0.01 acts when the "
     "BatchTopK phase ends; set batchtopk_steps"),
    ({"kind": "topk", "k": 8, "handover_revive": 0.01}, "handover_revive 0.01 is read only by jumprelu"),
    ({"kind": "batchtopk", "k": 8, "selection": "exact"}, "kind batchtopk selects over the batch.*got 'exact'"),
    ({"kind": "matryoshka_batchtopk", "k": 8}, "kind matryoshka_batchtopk needs matryoshka_widths"),
])
def test_bad_recipe_options_are_clear_errors(bad, message):
    with pytest.raises(ScopeError, match=message):
        load_config(data={"store": "s", "trainer": {"total_tokens": 1000}, "dictionaries": [{"d_sae": 64, **bad}]})


@pytest.mark.parametrize("kind,extra", [("batchtopk", {}), ("matryoshka_batchtopk", {"matryoshka_widths": [16, 64]})])
def test_saelens_batchtopk_kind_names_read_as_topk_with_a_batch_selection(kind, extra):
    spec = load_config(data={"store": "s", "trainer": {"total_tokens": 1000},
                             "dictionaries": [{"kind": kind, "d_sae": 64, "k": 8, **extra}]}).dictionaries[0]
    assert (spec.kind, spec.selection, spec.matryoshka_widths) == ("topk", "batch", extra.get("matryoshka_widths"))


# --- epochs -----------------------------------------------------------------------------------------------

def test_a_run_of_two_and_a_half_epochs_sees_every_row_two_or_three_times(tmp_path):
    url = str(tmp_path / "store")
    data = synthetic_store(url, [700, 555, 900], width=8, docs_per_shard=20)
    view = ActivationStore(url).split(0.1, seed=0)[0]
    train_rows = len(view)
    batch = 128
    steps = int(2.5 * train_rows) // batch
    cfg = load_config(data={"store": url, "trainer": {"total_tokens": steps * batch, "batch_size": batch,
                                                      "buffer_rows": 512},
                            "dictionaries": [{"kind": "topk", "d_sae": 16, "k": 2}]})
    key = {tuple(r.tolist()): 0 for r in data["x"][:, :2]}
    stream = training_batches(view, cfg, ["x"], median=1.0)
    first_epoch = []
    for step in range(steps):
        (x,) = next(stream)
        assert x.shape[0] == batch, "every batch is full, across epoch boundaries too"
        for r in x[:, :2].tolist():
            key[tuple(r)] += 1
        if step < train_rows // batch:
            first_epoch.append(x)
    counts = torch.tensor([c for c in key.values() if c])
    assert len(counts) == train_rows, "every training row was seen"
    assert set(counts.tolist()) <= {2, 3} and (counts == 3).sum() == steps * batch - 2 * train_rows
    again = training_batches(view, cfg, ["x"], median=1.0)
    assert all(torch.equal(next(again)[0], x) for x in first_epoch), "the order is fixed by the seed"


# --- on the real model ------------------------------------------------------------------------------------

@pytest.mark.real_model
def test_each_new_option_trains_on_the_real_model(small_store, tmp_path):
    hook = "blocks.6.hook_resid_post"
    jr = {"kind": "jumprelu", "d_sae": 512, "apply_b_dec_to_input": True, "bandwidth": 0.01}
    cfg = load_config(data={
        "store": small_store.url, "hook": hook,
        "trainer": {"total_tokens": 256 * 40, "batch_size": 256, "lr": 3e-3, "lr_warmup_steps": 2,
                    "sparsity_warmup_steps": 5, "log_every": 1, "checkpoint_every": 100, "buffer_rows": 1024,
                    "norm_estimate_rows": 2000},
        "dictionaries": [
            {"name": "quadratic", **jr, "sparsity_coeff": 1.0, "sparsity_loss": "quadratic", "target_l0": 30},
            {"name": "step", **jr, "sparsity_coeff": 1e-3, "init_l0": 60},
            {"name": "step-freq", **jr, "sparsity_coeff": 1e-3, "init_l0": 60, "freq_coeff": 10.0, "freq_max": 0.02},
            {"name": "matryoshka", **jr, "sparsity_coeff": 1.0, "sparsity_loss": "quadratic", "target_l0": 30,
             "matryoshka_widths": [64, 256]},
            {"name": "matryoshka-batchtopk", "kind": "topk", "d_sae": 512, "k": 30, "selection": "batch",
             "matryoshka_widths": [64, 256]},
            {"name": "batchtopk-phase", **jr, "sparsity_coeff": 1.0, "sparsity_loss": "quadratic", "target_l0": 30,
             "batchtopk_steps": 20},
            {"name": "batchtopk-phase-capped", **jr, "sparsity_coeff": 1.0, "sparsity_loss": "quadratic",
             "target_l0": 30, "batchtopk_steps": 20, "row_cap": 120}]})
    saved = train(cfg, tmp_path / "run", progress=False)
    rows = [yaml.safe_load(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for name in saved:
        fvu = [r[f"{name}/fvu"] for r in rows]
        assert fvu[-1] < 0.7 * fvu[0], (name, fvu)
    for name in ("quadratic", "matryoshka"):
        l0 = [r[f"{name}/l0"] for r in rows]
        assert l0[0] > 90 and abs(l0[-1] - 30) < 0.2 * abs(l0[0] - 30), (name, l0)
    for name in ("batchtopk-phase", "batchtopk-phase-capped"):
        l0 = [r[f"{name}/l0"] for r in rows]
        assert all(abs(v - 30) < 1 for v in l0[:20]), (name, "BatchTopK for 20 steps", l0)
        assert abs(l0[-1] - 30) < 10, (name, "then a JumpReLU near its target from the shared threshold", l0)
    assert load(saved["matryoshka-batchtopk"]).kind == "jumprelu"
    rows_seen = torch.cat(list(small_store.batches(hook, batch_size=1000, shuffle=False)))

    def excess(name: str) -> float:
        fired = (load(saved[name]).encode(rows_seen) > 0).float().mean(0)
        return float(torch.relu(fired - 0.02).sum())

    assert excess("step-freq") < 0.5 * excess("step"), "less firing mass above freq_max"


def test_a_row_cap_takes_the_batch_top_from_each_rows_own_top_and_no_more():
    from scope.dictionaries.topk import batch_top_indices, batch_top_pairs

    g = torch.Generator().manual_seed(6)
    # two outlier rows that the uncapped selection would give most of the batch's top
    pre = torch.cat([torch.randn(62, 512, generator=g), 9.0 + torch.rand(2, 512, generator=g)])
    uncapped = batch_top_indices(pre, 4) // 512
    assert torch.bincount(uncapped, minlength=64)[-2:].min() > 16, "the case the cap is for"
    vals, cols = pre.topk(16, dim=-1)  # by hand: each row's own 16 largest, then the batch's 4·64 largest of those
    best = vals.reshape(-1).topk(4 * 64).indices
    want = ((best // 16) * 512 + cols.reshape(-1)[best]).sort().values
    got = batch_top_indices(pre, 4, row_cap=16).sort().values
    assert torch.equal(got, want)
    assert torch.bincount(got // 512, minlength=64).max() == 16
    rows, cols2 = batch_top_pairs(pre, 4, row_cap=16)
    assert torch.equal(rows * 512 + cols2, want[pre.reshape(-1)[want] > 0])
    for bad in ({"kind": "topk", "k": 4, "row_cap": 6}, {"kind": "topk", "k": 4, "selection": "batch", "row_cap": 3},
                {"kind": "jumprelu", "target_l0": 4, "row_cap": 6}):
        with pytest.raises(ScopeError, match="row_cap"):  # the Python API refuses what the config check refuses
            build({"d_in": 16, "d_sae": 64, **bad})
    d = build({"kind": "topk", "d_in": 16, "d_sae": 64, "k": 4, "selection": "batch", "row_cap": 6})
    x = torch.cat([torch.randn(30, 16), 40 * torch.randn(2, 16)])
    assert int((d.loss(x, sparse=False).codes > 0).sum(-1).max()) <= 6


def test_batch_top_selection_equals_one_topk_over_the_batch():
    from scope.dictionaries.topk import batch_top_indices

    g = torch.Generator().manual_seed(5)
    for pre in (torch.randn(64, 512, generator=g),  # rows that hold many of the batch's top (no ties: their order is free)
                torch.cat([torch.randn(62, 512, generator=g), 9.0 + torch.rand(2, 512, generator=g)])):
        want = pre.reshape(-1).topk(4 * 64).indices.sort().values
        assert torch.equal(batch_top_indices(pre, 4).sort().values, want)


# --- resampling dead latents ------------------------------------------------------------------------------

def _stepped_topk(seed: int = 0):
    """A TopK SAE after one Adam step, so that the optimiser holds state for every weight."""
    torch.manual_seed(seed)
    sae = build({"kind": "topk", "d_in": 16, "d_sae": 64, "k": 4})
    sae.input_scale.fill_(0.5)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.0, 0.999))
    sae.loss(torch.randn(256, 16), 0.0, sparse=False).loss.backward()
    opt.step()
    opt.zero_grad()
    return sae, opt


def test_a_dead_latent_is_resampled_towards_the_worst_reconstructed_row_and_nothing_else_moves():
    from scope.training.resample import resample_dead

    sae, opt = _stepped_topk()
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    x[17] *= 1000  # its squared error is ~10⁶ times any other row's: drawn with probability ~0.9997
    dead = torch.zeros(64, dtype=torch.bool)
    dead[5] = True
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items() if k != "step"} for p in sae.parameters()}
    live_dec_norm = sae.W_dec[~dead].norm(dim=1).mean()
    assert resample_dead(sae, opt, x, dead, torch.Generator().manual_seed(0)) == 1

    u = x[17] * 0.5 - sae.b_dec.detach()
    cos = torch.nn.functional.cosine_similarity
    w_dec, w_enc = sae.W_dec.detach()[5], sae.W_enc.detach()[:, 5]
    assert float(cos(w_dec, u, dim=0)) > 0.9999 and float(cos(w_enc, u, dim=0)) > 0.9999
    torch.testing.assert_close(sae.W_dec[5].norm(), live_dec_norm)
    after = sae.state_dict()
    assert torch.equal(after["W_enc"][:, ~dead], before["W_enc"][:, ~dead])
    assert torch.equal(after["W_dec"][~dead], before["W_dec"][~dead])
    assert torch.equal(after["b_enc"][~dead], before["b_enc"][~dead]) and torch.equal(after["b_dec"], before["b_dec"])
    for p in (sae.W_enc, sae.W_dec, sae.b_enc):
        live = (slice(None), ~dead) if p is sae.W_enc else (~dead,)
        new = (slice(None), dead) if p is sae.W_enc else (dead,)
        old = state[id(p)]
        assert torch.equal(opt.state[p]["exp_avg_sq"][live], old["exp_avg_sq"][live])
        assert not opt.state[p]["exp_avg"][new].any(), "the new weights' first moment is reset"
        typical = old["exp_avg_sq"][live].mean(1, keepdim=True) if p is sae.W_enc else old["exp_avg_sq"][live].mean(0)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"][new], typical.expand_as(opt.state[p]["exp_avg_sq"][new]))


def test_a_resampled_latent_starts_as_a_typical_latent_of_the_batch():
    from scope.training.resample import resample_dead

    sae, opt = _stepped_topk()
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(2))
    codes = sae.encode(x)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:16] = True
    fired = codes[:, ~dead][codes[:, ~dead] != 0]
    lo, mid = torch.quantile(fired, torch.tensor([0.05, 0.5])).tolist()
    kth = round(float((codes != 0).float().mean()) * 512)  # rows a latent fires on, on average
    twin, twin_opt = _stepped_topk()
    assert resample_dead(sae, opt, x, dead, torch.Generator().manual_seed(3), limit=6) == 6
    assert resample_dead(twin, twin_opt, x, dead, torch.Generator().manual_seed(3), limit=6) == 6
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), twin.state_dict().values())), "seeded"
    moved = (sae.W_dec != _stepped_topk()[0].W_dec).any(1)
    assert int(moved.sum()) == 6 and not moved[16:].any(), "only `limit` of the dead latents, and only dead ones"
    top = sae.pre_acts(x)[:, moved].detach().topk(kth + 1, dim=0).values
    torch.testing.assert_close(top[0], torch.full((6,), mid), rtol=1e-4, atol=1e-5)  # its best row: the median code
    torch.testing.assert_close(top[-1], torch.full((6,), lo), rtol=1e-4, atol=1e-5)  # at lo on ~kth rows


def _train_with_short_dead_window(store, tmp_path, steps: int, dictionaries: list[dict]):
    """Train on the real model's layer 6 with a 10-step dead window: (saved, logged rows, name -> (dead, FVU) on
    the store's rows)."""
    hook = "blocks.6.hook_resid_post"
    cfg = load_config(data={
        "store": store.url, "hook": hook,
        "trainer": {"total_tokens": 256 * steps, "batch_size": 256, "lr": 3e-3, "lr_warmup_steps": 2, "log_every": 10,
                    "checkpoint_every": 100, "buffer_rows": 1024, "norm_estimate_rows": 2000,
                    "dead_window_steps": 10, "dead_frequency": 1e-3},
        "dictionaries": dictionaries})
    saved = train(cfg, tmp_path / "run", progress=False)
    rows = [yaml.safe_load(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    x = torch.cat(list(store.batches(hook, batch_size=1000, shuffle=False)))

    def dead_and_fvu(name: str) -> tuple[int, float]:
        sae = load(saved[name])
        codes, rec = sae.encode(x), sae(x)
        return int(((codes != 0).sum(0) == 0).sum()), float((rec - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

    return saved, rows, dead_and_fvu


@pytest.mark.real_model
def test_resampling_leaves_fewer_dead_latents_on_the_real_model(small_store, tmp_path):
    topk = {"kind": "topk", "d_sae": 2048, "k": 16}
    saved, rows, dead_and_fvu = _train_with_short_dead_window(
        small_store, tmp_path, 60, [{"name": "plain", **topk}, {"name": "resampled", **topk, "resample_every": 10}])
    counts = [r["resampled/resampled"] for r in rows if "resampled/resampled" in r]
    assert counts and max(counts) > 0 and "plain/resampled" not in rows[-1]
    assert [r["step"] for r in rows if "resampled/resampled" in r] == [10, 20, 30, 40], "up to the decay at step 48"
    (dead_plain, fvu_plain), (dead_rs, fvu_rs) = dead_and_fvu("plain"), dead_and_fvu("resampled")
    # Measured: 4 × 64 latents resampled (a quarter of the batch each time), 111 fewer dead (1,248 against 1,359
    # of 2,048) and FVU 0.180 against 0.189 on the store's rows.
    assert dead_plain - dead_rs > 0.25 * sum(counts), (dead_rs, dead_plain, counts)
    assert fvu_rs < fvu_plain, (fvu_rs, fvu_plain)


def test_a_dead_latent_is_lifted_to_fire_on_rate_of_the_rows_and_nothing_else_moves():
    from scope.training.resample import lift_dead_latents

    d = _jumprelu(target_l0=3.0, batchtopk_steps=2)
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        d.threshold[:8] = 50.0  # far above every pre-activation: never fires
        d.b_enc[7] = -100.0  # every pre-activation negative, as for the dead latents of the 4k study's hand-over
    dead = torch.zeros(256, dtype=torch.bool)
    dead[:8] = True
    opt = torch.optim.Adam(d.parameters())
    d.loss(x, 0.5, sparse=False).loss.backward()
    opt.step()  # so that the optimiser holds state for every weight
    opt.zero_grad()
    before = {k: v.clone() for k, v in d.state_dict().items()}
    sq = opt.state[d.W_enc]["exp_avg_sq"].clone()
    assert lift_dead_latents(d, opt, x, dead, rate=4 / 512) == 8
    fires = (d.encode(x) != 0).sum(0)
    assert fires[:8].tolist() == [4] * 8, "each fires on round(rate · rows) rows of the batch"
    after = d.state_dict()
    assert torch.equal(after["threshold"], before["threshold"]), "θ stays; the encoder bias moves"
    assert (after["b_enc"][:8] > before["b_enc"][:8]).all() and torch.equal(after["b_enc"][8:], before["b_enc"][8:])
    assert all(torch.equal(after[k], before[k]) for k in ("W_enc", "W_dec", "b_dec"))
    # A revived latent's first Adam steps are typical ones: its second moment is the live latents' mean.
    new_sq = opt.state[d.W_enc]["exp_avg_sq"]
    torch.testing.assert_close(new_sq[:, :8], sq[:, 8:].mean(1, keepdim=True).expand(16, 8))
    assert torch.equal(new_sq[:, 8:], sq[:, 8:]) and not opt.state[d.W_enc]["exp_avg"][:, :8].any()


@pytest.mark.real_model
def test_a_handover_revive_leaves_fewer_dead_latents_on_the_real_model(small_store, tmp_path):
    jr = {"kind": "jumprelu", "d_sae": 1024, "sparsity_coeff": 1.0, "sparsity_loss": "quadratic", "target_l0": 16,
          "apply_b_dec_to_input": True, "bandwidth": 0.01, "batchtopk_steps": 40}
    saved, rows, dead_and_fvu = _train_with_short_dead_window(
        small_store, tmp_path, 80, [{"name": "plain", **jr}, {"name": "revived", **jr, "handover_revive": 0.004}])
    revived = {r["step"]: r["revived/revived"] for r in rows if "revived/revived" in r}
    assert list(revived) == [40] and revived[40] > 0 and not any("plain/revived" in r for r in rows)
    (dead_plain, fvu_plain), (dead_rv, fvu_rv) = dead_and_fvu("plain"), dead_and_fvu("revived")
    # Measured: 706 of 1,024 latents revived at step 40; 257 dead on the store's rows against 659, FVU 0.180 against
    # 0.175. Without the revived latents' Adam second moment set to the live mean, their first steps blew the run
    # up (L0 16 -> 196, FVU 70) and it ended with more dead latents than the plain run.
    assert dead_plain - dead_rv > 0.25 * revived[40], (dead_rv, dead_plain, revived)
    assert fvu_rv < 1.05 * fvu_plain, (fvu_rv, fvu_plain)


def test_identical_rows_at_the_top_do_not_blow_up_a_resampled_latent():
    from scope.training.resample import resample_dead

    sae, opt = _stepped_topk()
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(4))
    x[:40] = 30 * x[0]  # as the first position of every window: the same row many times, and the worst reconstructed
    codes = sae.encode(x)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[7] = True
    fired = codes[:, ~dead][codes[:, ~dead] != 0]
    mid = float(fired.median())
    assert resample_dead(sae, opt, x, dead, torch.Generator().manual_seed(0)) == 1
    new = sae.pre_acts(x)[:, 7].detach()
    assert float(torch.nn.functional.cosine_similarity(sae.W_dec.detach()[7], x[0] * 0.5 - sae.b_dec.detach(), dim=0)) > 0.9999
    assert float(new.max()) <= mid * (1 + 1e-4), "no code on the batch above the live median"
    assert float(new[:40].min()) > 0, "it fires on the repeated row"
    enc = sae.W_enc.detach()
    assert float(enc[:, 7].norm()) < float(enc[:, ~dead].norm(dim=0).max()), "an encoder scale like the live ones'"


def test_lazy_adam_keeps_the_second_moment_of_a_latent_without_gradient():
    from scope.training.lazy_adam import hold_idle
    from scope.training.trainer import adam

    torch.manual_seed(0)
    sae = build({"kind": "jumprelu", "d_in": 8, "d_sae": 6})
    plain = adam(sae.parameters(), 1e-2, (0.0, 0.999))
    for _ in range(3):
        sum(p.sum() for p in sae.parameters()).backward()
        plain.step()
        plain.zero_grad()
    axes = {id(p): a for p, a in sae.latent_params()}
    before = {id(p): (p.detach().clone(), plain.state[p]["exp_avg_sq"].clone()) for p in sae.parameters()}
    for p in sae.parameters():  # latent 2 gets no gradient this step, the others a gradient of 1
        p.grad = torch.ones_like(p)
        if id(p) in axes:
            p.grad.movedim(axes[id(p)], 0)[2] = 0
    restore = hold_idle(sae, plain)
    plain.step()
    restore()
    for p, axis in sae.latent_params():
        w0, v0 = (t.movedim(axis, 0) for t in before[id(p)])
        w, v = p.detach().movedim(axis, 0), plain.state[p]["exp_avg_sq"].movedim(axis, 0)
        assert torch.equal(w[2], w0[2])
        torch.testing.assert_close(v[2], v0[2], rtol=1e-6, atol=0)  # plain Adam: 0.999 of it
        torch.testing.assert_close(v[0], 0.999 * v0[0] + 0.001, rtol=1e-6, atol=0)
        assert not torch.equal(w[0], w0[0])
    b_dec_v = plain.state[sae.b_dec]["exp_avg_sq"]
    torch.testing.assert_close(b_dec_v, 0.999 * before[id(sae.b_dec)][1] + 0.001)  # not a latent parameter


def test_lazy_adam_needs_beta1_zero():
    cfg = {"store": "somewhere", "trainer": {"total_tokens": 4096, "adam_betas": [0.9, 0.999]},
           "dictionaries": [{"kind": "topk", "d_sae": 64, "k": 4, "lazy_adam": True}]}
    with pytest.raises(ScopeError, match=r"lazy_adam needs Adam's β1 = 0 \(adam_betas \[0\.9, 0\.999\]\)"):
        load_config(data=cfg)
    cfg["trainer"]["adam_betas"] = [0.0, 0.999]
    load_config(data=cfg)
