"""Bad files and folders as a new user meets them: each is one line naming it, exit status 2, no traceback,
and advice that works when followed."""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

import scope.models
from scope.cli import app
from scope.dictionaries import build
from scope.store import ActivationStore

from test_store import synthetic_store

runner = CliRunner()
HOOK = "blocks.6.hook_resid_post"
PUBLISH = importlib.import_module("scope.dashboards.publish")  # the package exports a function of that name


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The one error line of a failed command (exit status 2, no traceback)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "store"
    synthetic_store(str(path), [200, 200, 200], width=16, docs_per_shard=20)
    return path


@pytest.fixture
def sae_dir(tmp_path) -> Path:
    sae = build({"kind": "relu", "d_in": 16, "d_sae": 8, "hook": "x"})
    with torch.no_grad():
        sae.b_enc.fill_(-50.0)
    return sae.save(tmp_path / "sae")


def fake_model():
    """What publish needs of a model when it shows no logit effects: a tokenizer that names token ids."""
    return SimpleNamespace(tokenizer=SimpleNamespace(batch_decode=lambda ids: [f"t{i[0]}" for i in ids]))


# --- dictionaries, checkpoints, manifests, corpora, model files ---------------------------------------
@pytest.mark.parametrize("damage,message", [
    ("garbage weights", r"weights\.safetensors is not a readable safetensors file \(.*header too large"),
    ("truncated weights", r"weights\.safetensors is not a readable safetensors file \(.*incomplete metadata"),
    ("cfg not JSON", r"cfg\.json is not valid JSON"),
])
@pytest.mark.parametrize("command", ["eval", "dashboard publish"])
def test_a_damaged_dictionary_names_its_file(store, sae_dir, tmp_path, damage, message, command):
    weights, cfg = sae_dir / "weights.safetensors", sae_dir / "cfg.json"
    if damage == "garbage weights":
        weights.write_bytes(os.urandom(4096))
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-64])  # the header whole, the data cut short
    else:
        cfg.write_text('{"kind": "relu", "d_in": 16,')
    args = (["eval", "--no-lm"] if command == "eval" else ["dashboard", "publish", "--out", tmp_path / "site"])
    line = error_line(run(*args, "--sae", sae_dir, "--store", store))
    assert re.search(message, line) and str(sae_dir) in line, line
    assert "save the dictionary again" in line


def _train_cfg(store: Path, tmp_path: Path) -> Path:
    cfg = {"store": str(store), "trainer": {"total_tokens": 256 * 6, "batch_size": 256, "lr_warmup_steps": 1,
                                           "sparsity_warmup_steps": 1, "log_every": 2, "checkpoint_every": 2,
                                           "norm_estimate_rows": 500, "buffer_rows": 512},
           "dictionaries": [{"name": "r", "kind": "relu", "d_sae": 32, "sparsity_coeff": 0.01}]}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("file,content,message", [
    ("state.safetensors", b"\x00" * 7, "is not a readable safetensors file"),
    ("state.safetensors", None, "is not a readable safetensors file"),  # truncated
    ("state.json", b"{\"step\": 6, ", "is not valid JSON"),
    ("state.json", b"[1, 2]", "is not a scope training checkpoint"),
])
def test_a_damaged_checkpoint_names_its_file_and_restarting_works(store, tmp_path, file, content, message):
    cfg, out = _train_cfg(store, tmp_path), tmp_path / "run"
    assert run("train", cfg, "--out", out).exit_code == 0
    bad = out / "checkpoint" / file
    bad.write_bytes(content if content is not None else bad.read_bytes()[:100])
    line = error_line(run("train", cfg, "--out", out))
    assert str(bad) in line and message in line, line
    # The advice: delete the checkpoint folder to train from the start.
    assert f"delete the folder {out / 'checkpoint'} to train from the start" in line
    shutil.rmtree(out / "checkpoint")
    assert run("train", cfg, "--out", out).exit_code == 0


def test_a_manifest_that_is_not_json_says_so(store):
    (store / "manifest.json").write_text("{ not json")
    for args in (["store", "info", store], ["store", "verify", store]):
        line = error_line(run(*args))
        assert f"{store / 'manifest.json'} is not valid JSON" in line and "validation error" not in line


@pytest.mark.parametrize("name,content,message", [
    ("empty.jsonl", "", "text file '{path}' is empty"),
    ("blank.jsonl", "\n  \n", "text file '{path}' is empty"),
    ("empty.txt", "", "text file '{path}' is empty"),
    ("empty.csv", "", "text file '{path}' is empty"),
])
def test_an_empty_corpus_file_says_it_is_empty(tmp_path, name, content, message):
    corpus = tmp_path / name
    corpus.write_text(content)
    line = error_line(run("cache", "--out", tmp_path / "s", "--corpus", corpus, "--tokens", "10"))
    assert message.format(path=corpus) in line, line
    assert not (tmp_path / "s").exists()


def test_a_gguf_file_of_random_bytes_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("SCOPE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(os.urandom(5000))
    line = error_line(run("hooks", "--model", bad))
    assert f"GGUF file '{bad}' could not be read as a model" in line and "magic" in line, line


# --- output folders ---------------------------------------------------------------------------------
def test_publish_refuses_a_store_as_its_out_folder(store, sae_dir):
    before = sorted(p.name for p in store.iterdir())
    line = error_line(run("dashboard", "publish", "--sae", sae_dir, "--store", store, "--out", store))
    assert f"--out '{store}' is a non-empty folder that is not a scope dashboard site" in line
    assert sorted(p.name for p in store.iterdir()) == before


def test_train_refuses_a_folder_that_is_not_a_run(store, tmp_path):
    cfg = _train_cfg(store, tmp_path)
    before = sorted(p.name for p in store.iterdir())
    line = error_line(run("train", cfg, "--out", store))
    assert f"--out '{store}' is a non-empty folder that is not a training run" in line
    assert sorted(p.name for p in store.iterdir()) == before
    (tmp_path / "empty").mkdir()
    assert run("train", cfg, "--out", tmp_path / "empty").exit_code == 0  # an empty folder is fine
    assert run("train", cfg, "--out", tmp_path / "empty").exit_code == 0  # and so is its own run, again
    other = yaml.safe_load(cfg.read_text())
    other["dictionaries"][0]["d_sae"] = 16
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    shutil.rmtree(tmp_path / "empty" / "checkpoint")  # no checkpoint: the config copy still tells the runs apart
    line = error_line(run("train", tmp_path / "other.yaml", "--out", tmp_path / "empty"))
    assert "holds a run with a different config" in line


def _site(store: Path, sae_dir: Path, out: Path, monkeypatch, *extra) -> object:
    monkeypatch.setattr(PUBLISH, "load_store_model", lambda *a, **k: fake_model())
    return run("dashboard", "publish", "--sae", sae_dir, "--store", store, "--out", out, "--logits", "0",
               "--features", "0:4", *extra)


def test_a_foreign_site_index_fails_before_the_pass(store, sae_dir, tmp_path, monkeypatch):
    site = tmp_path / "site"
    assert _site(store, sae_dir, site, monkeypatch).exit_code == 0
    (site / "data" / "index.json").write_text("<html>not an index</html>")
    monkeypatch.setattr(PUBLISH, "feature_stats", lambda *a, **k: pytest.fail("the pass ran before the check"))
    line = error_line(_site(store, sae_dir, site, monkeypatch))
    assert f"{site / 'data' / 'index.json'} is not valid JSON" in line, line
    monkeypatch.undo()  # the advice works: --overwrite starts the site afresh
    assert _site(store, sae_dir, site, monkeypatch, "--overwrite").exit_code == 0
    assert json.loads((site / "data" / "index.json").read_text())["features"]


def test_a_hook_other_than_the_dictionarys_own_needs_force(tmp_path, monkeypatch):
    store = tmp_path / "two"
    synthetic_store(str(store), [200, 200], width=16, hooks=("x", "y"))
    own = build({"kind": "relu", "d_in": 16, "d_sae": 8, "hook": "x"}).save(tmp_path / "own")
    line = error_line(_site(store, own, tmp_path / "a", monkeypatch, "--hook", "y"))
    assert "--hook y is not the dictionary's own hook x" in line and "--force-hook" in line, line
    assert not (tmp_path / "a").exists()
    assert _site(store, own, tmp_path / "a", monkeypatch, "--hook", "y", "--force-hook").exit_code == 0
    assert json.loads((tmp_path / "a" / "site.json").read_text())["hook"] == "y"
    # A dictionary whose own hook the store lacks: the advice names what to pass, and passing it works.
    elsewhere = build({"kind": "relu", "d_in": 16, "d_sae": 8, "hook": "z"}).save(tmp_path / "elsewhere")
    line = error_line(_site(store, elsewhere, tmp_path / "b", monkeypatch))
    assert "pass one of them: --hook x --force-hook or --hook y --force-hook" in line, line
    advice = shlex.split(line.rsplit("pass one of them: ", 1)[1].split(" or ")[1])
    assert _site(store, elsewhere, tmp_path / "b", monkeypatch, *advice).exit_code == 0


# --- the store on the real model -------------------------------------------------------------------
@pytest.fixture
def real_cli(gemma, monkeypatch):
    """The CLI with the session's model: `scope cache` loads nothing again."""
    monkeypatch.setattr(scope.models, "load_model", lambda *a, **k: gemma)
    return run


@pytest.fixture(scope="module")
def cached(gemma, tmp_path_factory) -> Path:
    """A store made by `scope cache`: 1,000 tweet tokens in three shards of ~400 rows."""
    out = tmp_path_factory.mktemp("cached") / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scope.models, "load_model", lambda *a, **k: gemma)
        result = run("cache", "--out", out, "--tokens", "1000", "--corpus", "tweets", "--context", "32",
                     "--shard-mb", "1")
    assert result.exit_code == 0, result.output
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 3
    return out


def _shards(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((store / "shards").iterdir())}


def _followed(line: str) -> list[str]:
    """The `scope cache ...` command an error line advises, as arguments of the scope command."""
    found = re.search(r"re-run `(scope cache [^`]+)` to recompute it", line)
    assert found, line
    return shlex.split(found.group(1))[1:]


@pytest.mark.real_model
def test_a_deleted_shard_is_named_and_the_advice_recomputes_it(cached, real_cli, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(cached, store)
    want = _shards(store)
    (store / "shards" / "000001.safetensors").unlink()
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"store": str(store), "hook": HOOK, "trainer": {"total_tokens": 512, "batch_size": 256},
                                   "dictionaries": [{"kind": "relu", "d_sae": 64, "sparsity_coeff": 0.01}]}))
    lines = [error_line(real_cli("store", "verify", store)),
             error_line(real_cli("train", cfg, "--out", tmp_path / "run"))]
    for line in lines:
        assert f"shard 1 ({store / 'shards' / '000001.safetensors'}) is missing; re-run `scope cache" in line, line
    assert lines[0] == lines[1]
    result = real_cli(*_followed(lines[0]))
    assert result.exit_code == 0, result.output
    assert real_cli("store", "verify", store).exit_code == 0
    assert _shards(store) == want, "the shard computed again is the very one deleted"


@pytest.mark.real_model
def test_a_corrupted_shard_is_recomputed_by_the_advice_and_by_a_plain_rerun(cached, real_cli, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(cached, store)
    want = _shards(store)
    shard = store / "shards" / "000002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    line = error_line(real_cli("store", "verify", store))
    assert line.startswith(f"error: shard {shard} failed its checksum") and "delete" not in line.lower(), line
    # Following the advice, with nothing deleted: the re-run checks the shards it keeps.
    result = real_cli(*_followed(line))
    assert result.exit_code == 0 and "shard 2 of" in result.output and "computing it again" in result.output
    assert real_cli("store", "verify", store).exit_code == 0 and _shards(store) == want
    # The old advice still holds too: delete it, then the same command captures it again.
    shard.unlink()
    line = error_line(real_cli("store", "verify", store))
    assert real_cli(*_followed(line)).exit_code == 0 and _shards(store) == want


@pytest.mark.real_model
def test_a_bad_corpus_row_is_named_and_leaves_no_folder(real_cli, tmp_path):
    for text, shown in (("null", "None"), (None, "None"), ("3", "3")):
        corpus = tmp_path / "corpus.jsonl"
        rows = [{"text": "Paris is the capital of France."}, {"text": "Rome is in Italy."}, {"id": 3}]
        if text is not None:
            rows[2]["text"] = json.loads(text)
        corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
        line = error_line(real_cli("cache", "--out", tmp_path / "s", "--corpus", corpus, "--tokens", "20"))
        assert f"row 3 of dataset '{corpus}' (counting from 1) has no text in column 'text' (found {shown})" in line
        assert not (tmp_path / "s").exists(), "a capture that fails on its corpus writes nothing"
    corpus.write_text("".join(json.dumps({"text": f"Document {i} is about cities."}) + "\n" for i in range(20)))
    assert real_cli("cache", "--out", tmp_path / "s", "--corpus", corpus, "--tokens", "20").exit_code == 0


@pytest.mark.real_model
def test_a_folder_left_by_a_capture_that_wrote_no_shard_is_taken_over(cached, real_cli, tmp_path):
    from scope.store.fs import StoreFS
    from scope.store.manifest import Manifest, write_manifest

    # What an earlier capture left when it failed before its first shard: an incomplete manifest of
    # another configuration (here: another corpus and context) and an empty shards folder.
    other = ActivationStore(str(cached)).manifest
    out = tmp_path / "s"
    (out / "shards").mkdir(parents=True)
    config = other.config.model_copy(update={"context": 64})
    write_manifest(StoreFS(str(out)), Manifest(config=config, tokens_requested=50, complete=False))
    result = real_cli("cache", "--out", out, "--tokens", "100", "--corpus", "bbc", "--context", "32")
    assert result.exit_code == 0, result.output
    info = ActivationStore(str(out)).info()
    assert info["corpus"] == "bbc" and info["context"] == 32 and info["rows"] == 100
    # A folder that holds a shard is never taken over.
    line = error_line(real_cli("cache", "--out", out, "--tokens", "100", "--corpus", "wiki", "--context", "32"))
    assert "holds a store made with a different configuration" in line


_HOLD = """
import sys, time
from scope.store.capture import capture_lock
from scope.store.fs import StoreFS
with capture_lock(StoreFS(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.real_model
def test_a_second_capture_into_the_same_folder_is_refused_and_names_the_holder(real_cli, tmp_path):
    out = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = error_line(real_cli("cache", "--out", out, "--tokens", "50", "--corpus", "wiki", "--context", "32"))
        assert f"store folder '{out}' is being written by another capture (process {holder.pid} on " in line, line
        assert not (out / "manifest.json").exists(), "the refused capture wrote nothing"
    finally:
        holder.kill()  # as kill -9: the lock goes with its process, so it never needs clearing by hand
        holder.wait()
    result = real_cli("cache", "--out", out, "--tokens", "50", "--corpus", "wiki", "--context", "32")
    assert result.exit_code == 0, result.output
    assert ActivationStore(str(out)).info()["rows"] == 50


# --- values a new user mistypes: devices, overrides, configs, output paths --------------------------
@pytest.mark.parametrize("device,message", [
    ("cudax", "device 'cudax' is not a device name; this machine has cpu"),
    ("cuda:99", "device 'cuda:99' is not on this machine, which has cpu"),
])
def test_a_device_the_machine_lacks_is_named(store, sae_dir, tmp_path, device, message):
    line = error_line(run("eval", "--no-lm", "--sae", sae_dir, "--store", store, "--device", device))
    assert message in line, line
    line = error_line(run("train", _train_cfg(store, tmp_path), "--out", tmp_path / "run",
                          "--set", f"trainer.device={device}"))
    assert f"trainer.device: {message}" in line, line
    assert not (tmp_path / "run").exists()
    assert run("eval", "--no-lm", "--sae", sae_dir, "--store", store, "--device", "cpu").exit_code == 0


@pytest.mark.parametrize("override,message", [
    ("trainer.lr=inf", "trainer.lr: Input should be a finite number (got 'inf')"),
    ("dictionaries.0.sparsity_coeff=.inf", "dictionaries.0.sparsity_coeff: Input should be a finite number"),
    ("dictionaries.0.name=a/b", "dictionaries.0.name: a dictionary name is its folder under --out, so it needs a "
                                "single folder name without / or \\ and other than . or .., e.g. jumprelu-16k (got 'a/b')"),
    ("dictionaries.0.name=..", "(got '..')"),
    ("trainer.adam_betas=[0.9", "--set trainer.adam_betas: the value '[0.9' is not valid YAML (expected ',' or ']', "
                                "but got '<stream end>' at line 1, column 5); write it as YAML, e.g. "
                                "trainer.adam_betas=[0.9, 0.999]"),
])
def test_a_bad_override_is_refused_before_anything_is_written(store, tmp_path, override, message):
    line = error_line(run("train", _train_cfg(store, tmp_path), "--out", tmp_path / "run", "--set", override))
    assert message in line, line
    assert not (tmp_path / "run").exists() and not (tmp_path / "b").exists()
    if "YAML" in message:  # the advice: the value written as YAML
        assert run("train", _train_cfg(store, tmp_path), "--out", tmp_path / "run",
                   "--set", "trainer.adam_betas=[0.9, 0.999]").exit_code == 0


def test_a_k_above_d_sae_is_refused_by_the_config(store, tmp_path):
    line = error_line(run("train", _train_cfg(store, tmp_path), "--out", tmp_path / "run", "--set",
                          "dictionaries.0.kind=topk", "--set", "dictionaries.0.sparsity_coeff=0",
                          "--set", "dictionaries.0.k=100"))
    assert "dictionary 'r': k 100 is more than its d_sae 32 latents; use a k of at most 32" in line, line


@pytest.mark.parametrize("text,message", [
    ("store: [\n", "is not valid YAML: expected the node content, but found '<stream end>' at line 2, column 1"),
    ("store: x\n  trainer: 3\n", "is not valid YAML: mapping values are not allowed here at line 2, column 10"),
    ("- 1\n- 2\n", "holds a YAML list, not a mapping of keys (store:, trainer:, dictionaries:)"),
])
def test_a_config_file_that_is_not_a_mapping_is_one_line(tmp_path, text, message):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(text)
    line = error_line(run("train", cfg, "--out", tmp_path / "run"))
    assert f"config file '{cfg}' {message}" in line, line
    line = error_line(run("train", tmp_path, "--out", tmp_path / "run"))
    assert f"config file '{tmp_path}' is a folder; pass a YAML file" in line, line


@pytest.mark.parametrize("kind,change,message", [
    ("topk", {"k": 0}, "k: Input should be greater than 0 (got 0)"),
    ("topk", {"k": 100}, "k 100 is more than the dictionary's 8 latents (d_sae); use a k of at most 8"),
    ("relu", {"d_sae": -8}, "d_sae: Input should be greater than 0 (got -8)"),
    ("relu", {"d_in": None}, "missing key 'd_in'"),
    ("relu", {"extra": 1}, "unknown key 'extra'"),
])
def test_a_dictionary_config_with_a_bad_value_is_one_line(store, tmp_path, kind, change, message):
    extra = {"k": 2} if kind == "topk" else {}
    folder = build({"kind": kind, "d_in": 16, "d_sae": 8, "hook": "x", **extra}).save(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in change.items():
        cfg.pop(key) if value is None else cfg.__setitem__(key, value)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    result = run("eval", "--no-lm", "--sae", folder, "--store", store)
    line = error_line(result)
    assert f"{folder / 'cfg.json'}: bad {kind} dictionary config: {message}" in line, line
    assert "pydantic" not in result.output and "validation error" not in result.output


@pytest.mark.parametrize("command", ["train", "eval --html", "export saelens"])
def test_an_output_path_that_cannot_be_made_is_named(store, sae_dir, tmp_path, command):
    bad = "/proc/scope-probe"
    args = {"train": ["train", _train_cfg(store, tmp_path), "--out", bad],
            "eval --html": ["eval", "--no-lm", "--sae", sae_dir, "--store", store, "--html", f"{bad}/f.html"],
            "export saelens": ["export", "saelens", sae_dir, bad]}[command]
    line = error_line(run(*args))
    assert f"cannot create or open '{bad}'" in line and "pass a path in a folder that exists" in line, line


# --- store side tables ----------------------------------------------------------------------------------
@pytest.mark.parametrize("damage,message", [
    ("missing", "documents.jsonl is missing, so the store's documents and labels are unknown"),
    ('{"doc_id": 0}', "line 1 of {docs} is not a document record {{\"doc_id\": ..., \"label\": ..., \"rows\": ...}}: "
                      "missing key 'label'; missing key 'rows'"),
    ('{"doc_id": "first", "label": null, "rows": 3}', "doc_id: Input should be a valid integer"),
])
def test_a_damaged_document_table_is_named(store, sae_dir, damage, message):
    docs = store / "documents.jsonl"
    if damage == "missing":
        docs.unlink()
    else:
        docs.write_text(damage + "\n")
    for args in (["store", "info", store], ["eval", "--no-lm", "--sae", sae_dir, "--store", store]):
        line = error_line(run(*args))
        assert message.format(docs=docs) in line, line
        assert "raise --held-out" not in line


def test_a_manifest_with_a_bad_field_names_the_field(store):
    manifest = json.loads((store / "manifest.json").read_text())
    del manifest["config"]["hooks"]
    manifest["shards"][0]["rows"] = "many"
    (store / "manifest.json").write_text(json.dumps(manifest))
    line = error_line(run("store", "info", store))
    assert (f"{store / 'manifest.json'} is not a valid scope store manifest: missing key 'config.hooks'; "
            "shards.0.rows: Input should be a valid integer, unable to parse string as an integer (got 'many')") in line


# --- steering run folders ------------------------------------------------------------------------------
@pytest.fixture
def steer_run(tmp_path) -> Path:
    from scope.steering import SteerConfig
    from scope.steering.vector import SteeringVector

    folder = SteeringVector(w=torch.ones(16), b=0.0, hook="blocks.1.hook_resid_post", model="tiny", concept="tiny",
                            method="reps", scale=1.0).save(tmp_path / "steer")
    (folder / "steer_config.json").write_text(SteerConfig(model="tiny", concept="tiny", layer=1).model_dump_json())
    return folder


@pytest.mark.parametrize("file,content,message", [
    ("steer_config.json", "{", "steer_config.json is not valid JSON"),
    ("steer_config.json", '{"model": 3}', "steer_config.json is not a readable steering config (model: Input should "
                                          "be a valid string (got 3); missing key 'concept')"),
    ("vector.json", "[]", "vector.json is not a steering vector's description (it needs the keys hook, model, "
                          "concept, method, scale)"),
    ("vector.safetensors", None, "vector.safetensors is not a readable safetensors file"),
])
def test_a_damaged_steering_run_is_named(steer_run, file, content, message):
    path = steer_run / file
    path.write_text(content) if content is not None else path.write_bytes(path.read_bytes()[:40])
    line = error_line(run("steer", "generate", steer_run, "--prompt", "hi"))
    assert f"{steer_run}/{message}" in line, line
    assert "make the run again into a new folder" in line or "make the vector again into a new folder" in line


def test_steering_factors_that_are_not_finite_are_refused_before_the_model_loads(steer_run, monkeypatch):
    monkeypatch.setattr(scope.models, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    line = error_line(run("steer", "eval", steer_run, "--alphas", "0,nan"))
    assert "--alphas must be finite numbers, got '0,nan'" in line, line
    line = error_line(run("steer", "eval", steer_run, "--temperature", "nan"))
    assert "need a finite temperature >= 0 and top_k > 0, got nan" in line, line
    line = error_line(run("steer", "eval", steer_run, "--new-tokens", "0"))
    assert "max_new_tokens and batch_size must be positive, got 0 and 128" in line, line


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "bad steering config: lr: Input should be greater than 0 (got -1.0)"),
    (["--lr", "inf"], "bad steering config: lr: Input should be a finite number (got inf)"),
    (["--method", "diffmean", "--max-rows", "0"], "bad steering config: max_rows: Input should be greater than 0 (got 0)"),
    (["--max-rows", "500"], "max_rows 500 is read only by the diffmean and feature methods, and this one is 'reps', "
                            "which would ignore it; leave max_rows (--max-rows) out"),
    (["--method", "lm", "--store", "somewhere"], "store 'somewhere' is read only by the diffmean and feature methods"),
])
def test_a_bad_steering_flag_is_named_before_the_model_loads(tmp_path, monkeypatch, flags, message):
    monkeypatch.setattr(scope.models, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    line = error_line(run("steer", "train", "--concept", "bbc:sport", "--out", tmp_path / "run", *flags))
    assert message in line, line
    assert not (tmp_path / "run").exists()


# --- interop and analysis flags ------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--mse-weight", "inf"), ("--lr", "nan")])
def test_finetune_refuses_a_number_that_is_not_finite(store, sae_dir, tmp_path, flag, value):
    line = error_line(run("finetune", sae_dir, "--store", store, "--out", tmp_path / "ft", flag, value))
    assert f"{flag}: Input should be a finite number (got {float(value)!r})" in line, line
    assert not (tmp_path / "ft").exists()


def test_a_dictionary_is_not_saved_into_an_activation_store(store, sae_dir, tmp_path):
    saelens = tmp_path / "saelens"
    assert run("export", "saelens", sae_dir, saelens).exit_code == 0
    before = sorted(p.name for p in store.iterdir())
    line = error_line(run("import", "saelens", saelens, "--out", store))
    assert f"'{store}' holds an activation store; save the dictionary in a folder of its own" in line, line
    assert sorted(p.name for p in store.iterdir()) == before


def test_pull_of_a_local_path_says_it_needs_no_pull(store, sae_dir, tmp_path):
    line = error_line(run("pull", store))
    assert f"'{store}' is not a scope or SAELens dictionary folder (needs cfg.json with weights.safetensors" in line
    line = error_line(run("pull", sae_dir))
    assert f"'{sae_dir}' is a local path, not a hub repo id (OWNER/NAME); a local dictionary folder needs no pull" in line
    assert "Hugging Face hub" not in line
    assert run("eval", "--no-lm", "--sae", sae_dir, "--store", store).exit_code == 0  # the advice: pass it itself


@pytest.mark.parametrize("content", [os.urandom(300), b""])
def test_a_params_npz_that_is_not_a_zip_of_arrays_is_named(tmp_path, content):
    bad = tmp_path / "params.npz"
    bad.write_bytes(content)
    line = error_line(run("import", "gemma-scope", bad, "--out", tmp_path / "out"))
    assert f"'{bad}' is not a readable .npz file (a zip archive of arrays)" in line and "allow_pickle" not in line


@pytest.mark.parametrize("command", ["rope", "class-embedding"])
def test_layers_that_are_not_whole_numbers_are_refused(tmp_path, monkeypatch, command):
    monkeypatch.setattr(scope.models, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    line = error_line(run("analyze", command, "--out", tmp_path / "a", "--corpus", "wiki", "--layers", "1.5"))
    assert "--layers must be comma-separated whole numbers, got '1.5'" in line, line
