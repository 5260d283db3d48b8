"""Interop: Gemma Scope params, the SAELens folder layout (checked against real SAELens), the hub.

SAELens needs transformer-lens < 4 and scope needs >= 4, so the SAELens checks run SAELens in its own virtual
environment (benchmarks/saelens_venv.sh builds it) through tests/saelens_side.py, and skip when it is absent.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file, save_file

from scope.dictionaries import Dictionary, build, load
from scope.dictionaries.interop import (dictionary_layout, from_saelens, load_any, load_gemma_scope, pull_from_hub,
                                        push_to_hub, to_saelens)
from scope.errors import ScopeError

D_IN, D_SAE = 16, 48
HOOK, MODEL = "blocks.6.hook_resid_post", "gemma-3-270m"
SIDE = Path(__file__).with_name("saelens_side.py")


def gemma_scope_arrays(seed: int = 0, d_in: int = D_IN, d_sae: int = D_SAE) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32) * 0.5,
            "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32) * 0.5,
            "b_enc": rng.normal(size=d_sae).astype(np.float32) * 0.1,
            "b_dec": rng.normal(size=d_in).astype(np.float32),
            "threshold": rng.uniform(0.05, 0.8, size=d_sae).astype(np.float32)}


def hand_jumprelu(a: dict[str, np.ndarray], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pre = x W_enc + b_enc; f = pre·(pre > θ); x̂ = f W_dec + b_dec (Lieberum et al. 2024)."""
    t = {k: torch.from_numpy(v) for k, v in a.items()}
    pre = x @ t["W_enc"] + t["b_enc"]
    f = pre * (pre > t["threshold"])
    return f, f @ t["W_dec"] + t["b_dec"]


def random_dictionary(kind: str, seed: int = 0, input_scale: float = 1.0, **fields) -> Dictionary:
    """A dictionary with untied random weights, non-zero biases and (JumpReLU) random thresholds."""
    d = build({"kind": kind, "d_in": D_IN, "d_sae": D_SAE, "hook": HOOK, "model": MODEL, **fields})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            p = getattr(d, name)
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name == "b_enc" else 0.5))
        if kind == "jumprelu":
            d.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.5 + 0.05)
        if fields.get("selection") == "batch":
            d.threshold.fill_(0.3)
        d.input_scale.fill_(input_scale)
    return d


def fixed_input(n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


# --- (a) Gemma Scope ----------------------------------------------------------------------------------
def test_gemma_scope_npz_equals_hand_jumprelu(tmp_path):
    a = gemma_scope_arrays()
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_20" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **a)
    sae = load_gemma_scope(folder / "params.npz")
    x = fixed_input()
    f, x_hat = hand_jumprelu(a, x)
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), f, atol=1e-6)
        assert torch.allclose(sae.decode(f), x_hat, atol=1e-6)
        assert torch.allclose(sae(x), x_hat, atol=1e-6)
    assert (sae.cfg.kind, sae.cfg.d_in, sae.cfg.d_sae) == ("jumprelu", D_IN, D_SAE)
    assert sae.cfg.hook == "blocks.20.hook_resid_post" and sae.cfg.model == "google/gemma-2-2b"
    assert not sae.cfg.apply_b_dec_to_input
    assert load_any(folder).cfg == sae.cfg  # a folder works as well as the file


def test_gemma_scope_2_safetensors_folder(tmp_path):
    a = gemma_scope_arrays(seed=3)
    folder = tmp_path / "my_sae"  # a name that says nothing: hook and model come from config.json
    folder.mkdir()
    tensors = {k.replace("W_", "w_"): torch.from_numpy(v) for k, v in a.items()}  # Gemma Scope 2 spells w_enc
    save_file(tensors, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt",
                                                    "hf_hook_point_in": "model.layers.12.output"}))
    sae = load_gemma_scope(folder)
    x = fixed_input()
    f, x_hat = hand_jumprelu(a, x)
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), f, atol=1e-6) and torch.allclose(sae(x), x_hat, atol=1e-6)
    assert sae.cfg.hook == "blocks.12.hook_resid_post" and sae.cfg.model == "google/gemma-3-270m"


def test_gemma_scope_embedding_sae_reads_scaled_embeddings(tmp_path):
    """Gemma Scope embedding SAEs saw embeddings before the sqrt(d_model) scale that hook_embed includes."""
    a = gemma_scope_arrays(seed=4)
    folder = tmp_path / "gemma-scope-2b-pt-res" / "embedding" / "width_4k" / "average_l0_6"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **a)
    sae = load_gemma_scope(folder)
    assert sae.cfg.hook == "hook_embed"
    x = fixed_input()
    f, x_hat = hand_jumprelu(a, x)
    with torch.no_grad():
        assert torch.allclose(sae.encode(x * math.sqrt(D_IN)), f, atol=1e-5)
        assert torch.allclose(sae(x * math.sqrt(D_IN)), x_hat * math.sqrt(D_IN), atol=1e-4)


def test_gemma_scope_bad_inputs_name_the_problem(tmp_path):
    a = gemma_scope_arrays()
    np.savez(tmp_path / "params.npz", **{k: v for k, v in a.items() if k != "threshold"})
    with pytest.raises(ScopeError, match="threshold"):
        load_gemma_scope(tmp_path / "params.npz")
    tc = tmp_path / "tc"
    tc.mkdir()
    save_file({k.replace("W_", "w_"): torch.from_numpy(v) for k, v in a.items()}, str(tc / "params.safetensors"))
    layer = "model.layers.3"
    (tc / "config.json").write_text(json.dumps({"architecture": "jump_relu",
                                                "hf_hook_point_in": f"{layer}.pre_feedforward_layernorm.output",
                                                "hf_hook_point_out": f"{layer}.post_feedforward_layernorm.output"}))
    assert load_gemma_scope(tc).kind == "transcoder"  # loads as one (tests/test_transcoders.py checks the maths)
    clt = tmp_path / "gemma-scope-2-270m-pt" / "clt" / "layer_3_width_16k_l0_small"
    shutil.copytree(tc, clt)
    with pytest.raises(ScopeError, match="cross-layer transcoder"):
        load_gemma_scope(clt)
    with pytest.raises(ScopeError, match="neither an existing path nor a hub reference"):
        load_gemma_scope("google/gemma-scope-2b-pt-res")
    with pytest.raises(ScopeError, match="not a dictionary"):
        load_any(tmp_path / "nothing-here")


def _fake_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], sha: str = "a" * 40) -> None:
    """Lay files out as huggingface_hub's cache does after a download (refs/main -> snapshots/<sha>/...)."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    for rel, src in files.items():
        (root / "snapshots" / sha / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / "snapshots" / sha / rel)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(sha)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """huggingface_hub in offline mode with an empty cache of its own; returns the cache folder."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_gemma_scope_hub_reference_offline(tmp_path, offline_hub):
    """The hub path is real hf_hub_download: a cached file loads offline; an uncached one is a clear ScopeError."""
    a = gemma_scope_arrays(seed=5)
    np.savez(tmp_path / "params.npz", **a)
    repo, path = "google/gemma-scope-2b-pt-mlp", "layer_3/width_16k/average_l0_50"
    _fake_hub_cache(offline_hub, repo, {f"{path}/params.npz": tmp_path / "params.npz"})
    sae = load_gemma_scope(repo, path)
    assert sae.cfg.hook == "blocks.3.hook_mlp_out" and sae.cfg.model == "google/gemma-2-2b"
    x = fixed_input()
    with torch.no_grad():
        assert torch.allclose(sae(x), hand_jumprelu(a, x)[1], atol=1e-6)
    assert load_gemma_scope(f"hf://{repo}/{path}").cfg == sae.cfg
    with pytest.raises(ScopeError, match=r"could not fetch 'google/gemma-scope-2b-pt-res/layer_20/.*params\.npz'"):
        load_gemma_scope("google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71")


# --- (b) SAELens layout round trip ------------------------------------------------------------------
KINDS = {"jumprelu": {}, "relu": {}, "topk": {"k": 6}}


@pytest.mark.parametrize("kind", KINDS)
def test_saelens_round_trip_is_exact(tmp_path, kind):
    """scope -> SAELens folder -> scope gives bit for bit what scope's own save -> load gives."""
    sae = random_dictionary(kind, input_scale=0.37, **KINDS[kind])
    via_scope = load(sae.save(tmp_path / "scope"))
    via_saelens = from_saelens(to_saelens(sae, tmp_path / "saelens"))
    assert via_saelens.cfg == via_scope.cfg
    a, b = via_scope.state_dict(), via_saelens.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = fixed_input()
    with torch.no_grad():
        assert torch.allclose(via_saelens(x), sae(x), atol=1e-5)
    # a second trip changes nothing
    again = load_file(str(to_saelens(via_saelens, tmp_path / "again") / "sae_weights.safetensors"))
    first = load_file(str(tmp_path / "saelens" / "sae_weights.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_saelens_cfg_json_fields(tmp_path):
    cfg = json.loads((to_saelens(random_dictionary("topk", k=6), tmp_path) / "cfg.json").read_text())
    assert {k: cfg[k] for k in ("architecture", "d_in", "d_sae", "k", "dtype", "normalize_activations",
                                "apply_b_dec_to_input")} == {
        "architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": 6, "dtype": "float32",
        "normalize_activations": "none", "apply_b_dec_to_input": True}
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["metadata"]["model_name"] == MODEL
    assert dictionary_layout(tmp_path) == "saelens"
    z = random_dictionary("relu")
    z.cfg.hook = "blocks.5.attn.hook_z"
    cfg = json.loads((to_saelens(z, tmp_path / "z") / "cfg.json").read_text())
    assert cfg["reshape_activations"] == "hook_z" and from_saelens(tmp_path / "z").cfg.hook == z.cfg.hook


def test_saelens_kinds_without_counterpart(tmp_path):
    with pytest.raises(ScopeError, match="'statistical'.*these convert"):
        to_saelens(random_dictionary("topk", k=6, selection="statistical"), tmp_path / "s")
    folder = to_saelens(random_dictionary("relu"), tmp_path / "g")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(ScopeError, match="'gated' has no scope counterpart"):
        from_saelens(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(ScopeError, match="'layer_norm'"):
        from_saelens(folder)


# --- (c) against SAELens itself, in its own virtual environment -----------------------------------------
def _saelens_python() -> str | None:
    """$SCOPE_SAELENS_PYTHON, else /work/saelens-venv's python, if sae_lens is importable there."""
    py = os.environ.get("SCOPE_SAELENS_PYTHON") or "/work/saelens-venv/bin/python"
    if not Path(py).exists():
        return None
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('sae_lens') is None)"
    return py if subprocess.run([py, "-c", probe], capture_output=True).returncode == 0 else None


SCOPE_EXPORTS = {"jumprelu": ("jumprelu", {}), "relu": ("relu", {}), "topk": ("topk", {"k": 6}),
                 "topk-batch": ("topk", {"k": 6, "selection": "batch"})}
SAELENS_MADE = {
    "jumprelu": {"arch": "jumprelu", "apply_b_dec_to_input": False},
    "jumprelu-nonpositive-thresholds": {"arch": "jumprelu", "apply_b_dec_to_input": True,
                                        "nonpositive_thresholds": 16},
    "standard": {"arch": "standard", "apply_b_dec_to_input": True},
    "topk": {"arch": "topk", "apply_b_dec_to_input": True, "fields": {"k": 6}},
    "topk-rescaled": {"arch": "topk", "apply_b_dec_to_input": False,
                      "fields": {"k": 6, "rescale_acts_by_decoder_norm": True}},
}


@pytest.fixture(scope="module")
def saelens_run(tmp_path_factory):
    """One SAELens subprocess: it loads scope's exports and makes + saves its own SAEs; returns all outputs."""
    py = _saelens_python()
    if py is None:
        pytest.skip("no SAELens environment: run benchmarks/saelens_venv.sh, or set SCOPE_SAELENS_PYTHON to a "
                    "python with sae-lens installed")
    root = tmp_path_factory.mktemp("saelens")
    save_file({"x": fixed_input()}, str(root / "x.safetensors"))
    exported, jobs = {}, []
    for i, (name, (kind, fields)) in enumerate(SCOPE_EXPORTS.items()):
        exported[name] = random_dictionary(kind, seed=10 + i, input_scale=0.37, **fields)
        to_saelens(exported[name], root / f"scope-{name}")
        jobs.append({"op": "load", "name": f"scope-{name}", "folder": str(root / f"scope-{name}")})
    for i, (name, spec) in enumerate(SAELENS_MADE.items()):
        jobs.append({"op": "make", "name": f"saelens-{name}", "folder": str(root / f"saelens-{name}"), "seed": 20 + i,
                     "d_in": D_IN, "d_sae": D_SAE, "hook": HOOK, "model": MODEL, **spec})
    for job in jobs:
        job.update(x=str(root / "x.safetensors"), out=str(root / f"{job['name']}.out.safetensors"))
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([py, str(SIDE), str(root / "jobs.json")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = {r["name"]: r for r in map(json.loads, proc.stdout.strip().splitlines()[-len(jobs):])}
    outs = {j["name"]: load_file(j["out"]) for j in jobs}
    return {"root": root, "exported": exported, "info": info, "outs": outs}


@pytest.mark.parametrize("name", SCOPE_EXPORTS)
def test_saelens_opens_scope_exports(saelens_run, name):
    """SAELens's SAE.load_from_disk reads scope's export and encodes/decodes as scope does."""
    sae = saelens_run["exported"][name]
    info, out = saelens_run["info"][f"scope-{name}"], saelens_run["outs"][f"scope-{name}"]
    expected_arch = {"relu": "standard", "topk-batch": "jumprelu"}.get(name, name)
    assert info["architecture"] == expected_arch and info["hook_name"] == HOOK and info["model_name"] == MODEL
    x = fixed_input()
    with torch.no_grad():
        codes = sae.encode(x)
        assert torch.allclose(out["codes"], codes, atol=1e-5)
        assert torch.allclose(out["recon"], sae.decode(codes), atol=1e-5)
        assert torch.allclose(out["forward"], sae(x), atol=1e-5)


@pytest.mark.parametrize("name", SAELENS_MADE)
def test_scope_opens_saelens_saves(saelens_run, name):
    """scope's from_saelens reads a folder SAELens wrote with save_model and gives SAELens's outputs."""
    out = saelens_run["outs"][f"saelens-{name}"]
    sae = from_saelens(saelens_run["root"] / f"saelens-{name}")
    assert sae.cfg.hook == HOOK and sae.cfg.model == MODEL
    assert sae.cfg.apply_b_dec_to_input == SAELENS_MADE[name]["apply_b_dec_to_input"]
    x = fixed_input()
    with torch.no_grad():
        codes = sae.encode(x)
        assert torch.allclose(codes, out["codes"], atol=1e-5)
        assert torch.allclose(sae.decode(codes), out["recon"], atol=1e-5)
        assert torch.allclose(sae(x), out["forward"], atol=1e-5)
    assert (codes > 0).sum(-1).float().mean() > 0  # the comparison is not trivially between zeros


# --- (d) the hub -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["scope", "saelens"])
def test_push_then_pull_offline(tmp_path, offline_hub, monkeypatch, layout):
    """push_to_hub's calls, and a pull through the real snapshot_download, with no hub server.

    Exercised: which HfApi calls push_to_hub makes and with what arguments (repo id, folder, path in repo, the
    allow_patterns that pick the dictionary's files, filtered here by huggingface_hub's own filter_repo_objects);
    pull_from_hub through the real snapshot_download resolving refs/main -> snapshot in the hub cache
    (local_files_only), then opening the folder. Not exercised: HTTP, authentication, LFS/xet upload, the
    server-side commit, an actual download. A fake create_repo/upload_folder stands in for the server and writes
    the "uploaded" files where a later download would put them.
    """
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, allow_patterns=None, **kw):
        calls.append(("upload_folder", repo_id, {"path_in_repo": path_in_repo, "allow_patterns": allow_patterns}))
        names = [p.name for p in Path(folder_path).iterdir()]
        picked = list(filter_repo_objects(names, allow_patterns=allow_patterns))
        prefix = f"{path_in_repo}/" if path_in_repo else ""
        _fake_hub_cache(offline_hub, repo_id, {prefix + n: Path(folder_path) / n for n in picked})
        return huggingface_hub.CommitInfo(commit_url=f"https://hf.co/{repo_id}/commit/{'a' * 40}", commit_message="",
                                          commit_description="", oid="a" * 40)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    sae = random_dictionary("jumprelu", input_scale=0.5)
    folder = sae.save(tmp_path / "out") if layout == "scope" else to_saelens(sae, tmp_path / "out")
    (folder / "notes.txt").write_text("not part of the dictionary")
    url = push_to_hub(folder, "me/saes", "res/l6", token="hf_x")
    assert url.endswith("a" * 40)
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"] and calls[0][1] == "me/saes"
    assert calls[1][2]["path_in_repo"] == "res/l6" and "notes.txt" not in calls[1][2]["allow_patterns"]
    pulled = pull_from_hub("me/saes", "res/l6", local_files_only=True)
    assert sorted(p.name for p in pulled.iterdir()) == sorted(calls[1][2]["allow_patterns"])
    x = fixed_input()
    with torch.no_grad():
        assert torch.allclose(load_any(pulled)(x), sae(x), atol=1e-5)


def test_hub_failures_are_scope_errors(tmp_path, offline_hub):
    """Offline (HF_HUB_OFFLINE), push and an uncached pull fail with a ScopeError naming the repo."""
    folder = random_dictionary("relu").save(tmp_path / "d")
    with pytest.raises(ScopeError, match="could not push .* 'me/saes/x'"):
        push_to_hub(folder, "me/saes", "x")
    with pytest.raises(ScopeError, match="could not pull 'me/saes/x'"):
        pull_from_hub("me/saes", "x")
    with pytest.raises(ScopeError, match="not a scope or SAELens dictionary folder"):
        push_to_hub(tmp_path, "me/saes")
