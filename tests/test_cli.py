"""The scope command: clear errors for bad input, store info as JSON, and torchrun capture."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from scope.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


@pytest.mark.parametrize("args,message", [
    (["--tokens", "0"], "--tokens must be positive, got 0"),
    (["--tokens", "-5"], "--tokens must be positive, got -5"),
    (["--corpus", "nope"], "unknown corpus 'nope'"),
    (["--model", "not-a-model"], "unknown model 'not-a-model'"),
    (["--model", "missing.gguf"], "GGUF file 'missing.gguf' does not exist"),
])
def test_cache_bad_input_is_one_clear_line(tmp_path, args, message):
    result = run("cache", "--out", str(tmp_path / "s"), *args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_store_info_on_a_non_store(tmp_path):
    result = run("store", "info", str(tmp_path))
    assert result.exit_code == 2 and "not a scope activation store" in result.output


@pytest.mark.real_model
def test_cache_refuses_bad_hook_and_existing_folder(gemma, tmp_path):
    result = run("cache", "--out", str(tmp_path / "s"), "--hooks", "blocks.6.hook_resid", "--tokens", "10")
    assert result.exit_code == 2 and "unknown hook point 'blocks.6.hook_resid'" in result.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    result = run("cache", "--out", str(tmp_path / "other"), "--tokens", "10")
    assert result.exit_code == 2 and "not a scope store" in result.output
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.real_model
def test_cache_then_store_info_json(gemma, tmp_path):
    out = str(tmp_path / "s")
    result = run("cache", "--out", out, "--tokens", "200", "--corpus", "wiki", "--context", "32", "--json")
    assert result.exit_code == 0, result.output
    result = run("store", "info", out, "--json")
    info = json.loads(result.output)
    assert info["rows"] == 200 and info["corpus"] == "wiki" and info["dtype"] == "float32"
    assert info["hooks"] == {"blocks.6.hook_resid_post": {"shape": [640], "width": 640}}
    assert run("store", "verify", out).exit_code == 0


def _cache(out, launcher):
    args = ["-m", "scope", "cache", "--out", str(out), "--tokens", "1500", "--corpus", "bbc", "--context", "40",
            "--shard-mb", "1", "--batch-size", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, *args], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.real_model
def test_torchrun_two_processes_write_one_store_equal_to_one_process(tmp_path):
    two = _cache(tmp_path / "two", ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"])
    assert two.returncode == 0, two.stderr[-3000:]
    one = _cache(tmp_path / "one", [])
    assert one.returncode == 0, one.stderr[-3000:]
    m2 = json.loads((tmp_path / "two" / "manifest.json").read_text())
    m1 = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert m2["complete"] and m2["world_size"] == 2 and {s["rank"] for s in m2["shards"]} == {0, 1}
    assert sum(s["rows"] for s in m2["shards"]) == 1500
    assert [(s["name"], s["rows"]) for s in m2["shards"]] == [(s["name"], s["rows"]) for s in m1["shards"]]
    # Same documents in the same shards; values agree to float32 round-off (per-process thread counts differ).
    assert (tmp_path / "two" / "documents.jsonl").read_text() == (tmp_path / "one" / "documents.jsonl").read_text()
    from scope.store import ActivationStore
    import torch
    a = torch.cat(list(ActivationStore(str(tmp_path / "one")).batches("blocks.6.hook_resid_post", shuffle=False)))
    b = torch.cat(list(ActivationStore(str(tmp_path / "two")).batches("blocks.6.hook_resid_post", shuffle=False)))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-2)


def test_import_gemma_scope_export_saelens_and_back(tmp_path):
    import numpy as np
    import torch

    from scope.dictionaries import load

    g = np.random.default_rng(0)
    d, m = 8, 32
    arrays = {"W_enc": g.normal(size=(d, m)), "W_dec": g.normal(size=(m, d)), "b_enc": g.normal(size=m) * 0.1,
              "b_dec": g.normal(size=d), "threshold": np.abs(g.normal(size=m)) * 0.1}
    np.savez(tmp_path / "params.npz", **{k: v.astype(np.float32) for k, v in arrays.items()})
    assert run("import", "gemma-scope", str(tmp_path / "params.npz"), "--out", str(tmp_path / "gs"),
               "--hook", "blocks.3.hook_resid_post").exit_code == 0
    assert run("export", "saelens", str(tmp_path / "gs"), str(tmp_path / "sl")).exit_code == 0
    result = run("import", "saelens", str(tmp_path / "sl"), "--out", str(tmp_path / "back"), "--json")
    assert result.exit_code == 0 and json.loads(result.output)["kind"] == "jumprelu"
    x = torch.from_numpy(g.normal(size=(16, d)).astype(np.float32))
    pre = x @ torch.from_numpy(arrays["W_enc"]).float() + torch.from_numpy(arrays["b_enc"]).float()
    f = pre * (pre > torch.from_numpy(arrays["threshold"]).float())
    want = f @ torch.from_numpy(arrays["W_dec"]).float() + torch.from_numpy(arrays["b_dec"]).float()
    torch.testing.assert_close(load(tmp_path / "back")(x), want, rtol=1e-5, atol=1e-5)
    bad = run("import", "saelens", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"))
    assert bad.exit_code == 2 and "nothing" in bad.output


@pytest.mark.parametrize("raised,message,code", [
    (KeyboardInterrupt(), "interrupted: nothing written so far is lost; re-run the same command to resume", 130),
    (OSError(28, "No space left on device", "/full/disk/shard"), "no space left on the device while writing /full/disk/shard", 2),
])
def test_interrupt_and_full_disk_say_what_to_do(tmp_path, monkeypatch, raised, message, code):
    import scope.data

    def boom(*args, **kwargs):
        raise raised

    monkeypatch.setattr(scope.data, "open_source", boom)
    result = run("cache", "--out", str(tmp_path / "s"), "--tokens", "10")
    assert result.exit_code == code and message in result.output and "Traceback" not in result.output
