"""ICFL, PCA whitening against a control set, and the selectivity metrics."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from scope.cli import app
from scope.data import open_source
from scope.dictionaries import build, load, matching_pursuit
from scope.dictionaries.whitening import fit_whitening
from scope.errors import ScopeError
from scope.evals.selectivity import selectivity_from_counts, selectivity_metrics
from scope.store import ActivationStore
from scope.store.capture import capture_store
from scope.training import load_config, train


def unit_atoms(m: int, d: int, seed: int) -> torch.Tensor:
    w = torch.randn(m, d, generator=torch.Generator().manual_seed(seed))
    return w / w.norm(dim=1, keepdim=True)


def sparse_data(atoms: torch.Tensor, n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(n, atoms.shape[0])
    idx = torch.rand(n, atoms.shape[0], generator=g).topk(k, dim=1).indices
    z.scatter_(1, idx, torch.rand(n, k, generator=g) * 2 + 0.5)
    return z @ atoms


@pytest.mark.parametrize("signed", [True, False])
def test_matching_pursuit_residual_falls_every_iteration_and_is_batched(signed):
    atoms = unit_atoms(256, 48, 0)
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    norms: list[torch.Tensor] = []
    z = matching_pursuit(x, atoms, iterations=6, per_iteration=3, signed=signed, residual_norms=norms)
    steps = torch.stack([x.norm(dim=-1), *norms])
    assert (steps[1:] < steps[:-1]).all(), "every round of fitting must shrink every row's residual"
    assert ((z != 0).sum(-1) <= 18).all()
    torch.testing.assert_close((x - z @ atoms).norm(dim=-1), norms[-1], atol=1e-4, rtol=1e-4)
    # Vectorised over the batch: a row's codes do not depend on the other rows.
    one = matching_pursuit(x[5:6], atoms, iterations=6, per_iteration=3, signed=signed)
    torch.testing.assert_close(one[0], z[5], atol=1e-5, rtol=1e-4)
    if signed:  # a row made of one atom with a positive weight is coded by that atom alone
        exact = matching_pursuit(2.5 * atoms[7:8], atoms, iterations=1, per_iteration=1, signed=True)
        assert exact.nonzero().tolist() == [[0, 7]] and abs(float(exact[0, 7]) - 2.5) < 1e-5


def test_icfl_recovers_the_atoms_of_a_known_sparse_dictionary():
    truth = unit_atoms(48, 32, 0)
    sae = build({"kind": "icfl", "d_in": 32, "d_sae": 48, "iterations": 3, "atoms_per_iteration": 1,
                 "redraw_every": 50})
    sae.reset_parameters(seed=1)
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=5e-3, betas=(0.9, 0.999))
    first = None
    for step in range(800):
        parts = sae.loss(sparse_data(truth, 256, 3, seed=step))
        parts.loss.backward()
        sae.remove_parallel_decoder_grad()
        opt.step()
        opt.zero_grad()
        sae.project()
        sae.after_step(step + 1)
        first = first if first is not None else float(parts.mse.detach())
    best = (truth @ sae.W_dec.detach().T).max(1).values
    assert float((best > 0.9).float().mean()) >= 0.8, f"matched cosines: {best.sort().values.tolist()}"
    assert float(parts.mse.detach()) < 0.2 * first
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)


def test_near_duplicate_atoms_are_redrawn():
    sae = build({"kind": "icfl", "d_in": 16, "d_sae": 32, "redraw_cos": 0.9})
    sae.reset_parameters(seed=0)
    with torch.no_grad():
        sae.W_dec[5] = sae.W_dec[3]
        sae.W_dec[9] = -sae.W_dec[3]  # anti-parallel is not a duplicate
    before = sae.W_dec.detach().clone()
    assert sae.redraw_duplicates(torch.randn(8, 16), seed=0) == 1
    changed = (sae.W_dec != before).any(1).nonzero().squeeze(-1).tolist()
    assert changed == [5]
    assert float(sae.W_dec[5].detach() @ sae.W_dec[3].detach()) < 0.9 and abs(float(sae.W_dec[5].detach().norm()) - 1) < 1e-5


def test_whitening_gives_identity_covariance_on_the_control_set_and_inverts_exactly():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=g, dtype=torch.float64)
    control = (torch.randn(5000, 12, generator=g, dtype=torch.float64) @ mix + 30).float()
    control[:, 2] *= 1000  # a massive channel, as Gemma's residual stream has
    w = fit_whitening(control, eps=0.0, unit_norm=False)
    u, _ = w(control)
    torch.testing.assert_close(u.double().mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(torch.cov(u.double().T), torch.eye(12, dtype=torch.float64), atol=2e-3, rtol=0)
    w = fit_whitening([control[:2500], control[2500:]], eps=0.0)  # streaming gives the same transform
    x = torch.randn(100, 12, generator=g) * 50
    unit, norms = w(x)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(100))
    torch.testing.assert_close(w.inverse(unit, norms), x, atol=1e-2, rtol=1e-4)
    with pytest.raises(ScopeError, match="at least 2"):
        fit_whitening(control[:1])


def test_a_whitened_dictionary_saves_loads_and_reconstructs_in_raw_units(tmp_path):
    control = torch.randn(2000, 16) * torch.linspace(1, 100, 16) + 7
    for kind, extra in (("icfl", {"iterations": 4, "atoms_per_iteration": 2}), ("topk", {"k": 4})):
        sae = build({"kind": kind, "d_in": 16, "d_sae": 64, "whitening": {"control": ["a"]}, **extra})
        sae.whitening.load_state_dict(fit_whitening(control).state_dict())
        x = control[:50]
        codes, x_hat = sae.reconstruct(x)
        u, norms = sae.prepare(x)
        torch.testing.assert_close(x_hat, sae.whitening.inverse(sae.decode_prepared(codes), norms))
        again = load(sae.save(tmp_path / kind))
        torch.testing.assert_close(again.reconstruct(x)[1], x_hat)
        assert again.whitening is not None and again.cfg.whitening.control == ["a"]
    from scope.dictionaries.interop import to_saelens
    with pytest.raises(ScopeError, match="whitened dictionary has no SAELens counterpart"):
        to_saelens(again, tmp_path / "sl")


def test_selectivity_on_a_hand_built_example():
    # 3 labels with 100, 200, 100 rows; feature 0 fires only on label 0, feature 1 everywhere at 50 %,
    # feature 2 on 60 % of label 1 and 40 % of label 2.
    counts = torch.tensor([[100, 50, 0], [0, 100, 120], [0, 50, 40]])
    rows = torch.tensor([100, 200, 100])
    average, maximum = selectivity_from_counts(counts, rows)
    torch.testing.assert_close(average[0, 0], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(maximum[0, 0], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(average[:, 1], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(maximum[:, 1], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(average[1, 2], torch.tensor(0.6 - 40 / 200, dtype=torch.float64))
    torch.testing.assert_close(maximum[1, 2], torch.tensor(0.6 - 0.4, dtype=torch.float64))
    torch.testing.assert_close(maximum[2, 2], torch.tensor(0.4 - 0.6, dtype=torch.float64))


@pytest.fixture(scope="module")
def wiki_store(gemma, tmp_path_factory) -> ActivationStore:
    """8,000 rows of short labelled Wikipedia summaries (many documents, 12 topics) at layer 6."""
    out = tmp_path_factory.mktemp("store") / "wiki"
    capture_store(gemma, open_source("wiki"), ["blocks.6.hook_resid_post"], str(out), tokens=8000, context=64,
                  progress=False)
    return ActivationStore(str(out))


def icfl_config(store: str, control: str) -> dict:
    return {"store": store, "hook": "blocks.6.hook_resid_post",
            "trainer": {"total_tokens": 40 * 256, "batch_size": 256, "lr": 2e-3, "lr_warmup_steps": 5,
                        "checkpoint_every": 1000, "log_every": 5, "norm_estimate_rows": 2000,
                        "dead_window_steps": 20},
            "dictionaries": [
                {"name": "icfl", "kind": "icfl", "d_sae": 512, "iterations": 4, "atoms_per_iteration": 4,
                 "redraw_every": 10},
                {"name": "icfl-white", "kind": "icfl", "d_sae": 512, "iterations": 4, "atoms_per_iteration": 4,
                 "whitening": {"control": [control], "rows": 2000}},
                {"name": "topk", "kind": "topk", "d_sae": 512, "k": 16}]}


def test_icfl_on_the_real_model_trains_evaluates_and_scores_selectivity(wiki_store, tmp_path):
    labels = sorted({lab for lab, _ in wiki_store.documents.values()})
    control = labels[: len(labels) // 2]  # several topics: more control rows than dimensions
    data = icfl_config(wiki_store.url, "")
    data["dictionaries"][1]["whitening"]["control"] = control
    cfg = load_config(data=data)
    saved = train(cfg, tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for name in ("icfl", "icfl-white", "topk"):
        assert log[-1][f"{name}/fvu"] < 0.9 * log[0][f"{name}/fvu"], f"{name}: FVU must fall"
    assert log[-1]["icfl/l0"] <= 16 and 0 <= log[-1]["icfl/dead"] <= 1
    white = load(saved["icfl-white"])
    assert white.whitening is not None and white.kind == "icfl"
    # The control rows it was fitted on come out white: zero mean and identity covariance.
    train_view = wiki_store.split(0.1, seed=0)[0].where(control)
    rows = torch.cat(list(train_view.batches("blocks.6.hook_resid_post", batch_size=512, shuffle=False)))[:2000]
    u = ((rows - white.whitening.mean) @ white.whitening.P.T).double()
    assert float(u.mean(0).abs().max()) < 1e-2
    torch.testing.assert_close(torch.cov(u.T), torch.eye(u.shape[1], dtype=torch.float64), atol=2e-2, rtol=0)

    test = wiki_store.split(0.3, seed=0)[1]
    m = selectivity_metrics(load(saved["icfl"]), test, max_rows=2000, probe_rows=2000)
    assert m.rows > 0 and 0 < m.cosine <= 1 and {lab.label for lab in m.labels} <= set(labels)
    assert m.probe["original"] > m.probe["chance"], "layer-6 activations must carry the BBC category"

    result = CliRunner().invoke(app, ["eval", "--sae", str(saved["icfl-white"]), "--store", wiki_store.url,
                                      "--no-lm", "--held-out", "0.3", "--labels", "*", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)["results"][0]
    assert out["kind"] == "icfl" and out["selectivity"]["labels"] and 0 < out["fvu"] < 1.5


def test_bad_icfl_and_whitening_configs_give_clear_errors(wiki_store, tmp_path):
    data = icfl_config(wiki_store.url, "no-such-topic")
    with pytest.raises(ScopeError, match="'no-such-topic' matches no document"):
        train(load_config(data=data), tmp_path / "a", progress=False)
    data["dictionaries"][0]["atom_selection"] = "biggest"
    with pytest.raises(ScopeError, match="atom_selection"):
        load_config(data=data)
    data["dictionaries"][0].pop("atom_selection")
    data["dictionaries"][1]["whitening"]["controls"] = ["x"]
    with pytest.raises(ScopeError, match="unknown key 'dictionaries.1.whitening.controls'.*control"):
        load_config(data=data)


def test_the_shipped_icfl_config_trains_from_the_cli(wiki_store, tmp_path):
    labels = sorted({lab for lab, _ in wiki_store.documents.values()})
    control = "[" + ",".join(f"'{lab}'" for lab in labels[:6]) + "]"
    small = [f"dictionaries.{i}.d_sae=128" for i in range(4)] + [
        "dictionaries.0.iterations=2", "dictionaries.1.iterations=2", f"store={wiki_store.url}",
        "trainer.total_tokens=2048", "trainer.batch_size=512", "trainer.norm_estimate_rows=2000",
        f"dictionaries.1.whitening.control={control}", f"dictionaries.3.whitening.control={control}"]
    args = ["train", "sae_configs/icfl-vs-topk-gemma-3-270m-res-l6-2k.yaml", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args + [a for s in small for a in ("--set", s)] + ["--json"])
    assert result.exit_code == 0, result.output
    for name in ("icfl", "icfl-white", "topk", "topk-white"):
        sae = load(tmp_path / "run" / name)
        assert sae.cfg.d_sae == 128 and (sae.whitening is not None) == name.endswith("white")
