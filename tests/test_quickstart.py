"""The README's main job, at tiny sizes: capture, train a JumpReLU SAE, evaluate it, publish its dashboards."""

import json

import pytest
from typer.testing import CliRunner

from scope.cli import app


@pytest.mark.real_model
def test_quickstart_writes_store_sae_and_metrics(gemma, tmp_path):
    out = tmp_path / "qs"
    result = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--tokens", "4000", "--d-sae", "512",
                                      "--train-tokens", "30720", "--batch-size", "512", "--lm-tokens", "128",
                                      "--dashboard-features", "0:16", "--dashboard-rows", "2000", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert json.loads((out / "store" / "manifest.json").read_text())["complete"]
    assert (out / "sae" / "jumprelu" / "weights.safetensors").exists()
    assert (out / "sae" / "metrics.jsonl").exists()
    rows = [json.loads(line) for line in (out / "sae" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["jumprelu/fvu"] < 0.7 * rows[0]["jumprelu/fvu"], "training lowers FVU on the real model"
    from scope.quickstart import QUICKSTART_TARGET_L0
    # θ starts at the target's quantile and the quadratic penalty holds L0 there while FVU falls.
    assert abs(rows[-1]["jumprelu/l0"] / QUICKSTART_TARGET_L0 - 1) < 0.5, [r["jumprelu/l0"] for r in rows]
    m = report["metrics"]
    assert 0 < m["l0"] < 512 and 0 <= m["fvu"] < 1 and m["d_sae"] == 512
    lm = m["lm"]
    assert lm["zero_ce"] > lm["spliced_ce"] and lm["clean_ce"] > 0
    index = out / "dashboard" / "index.html"
    assert report["dashboard"] == str(index) and index.exists()
    assert index.read_text().count('class="feature-row"') == 16
    assert (out / "dashboard" / "features" / "000015.html").exists()


def test_the_command_runs_the_library_with_its_defaults():
    import inspect

    import typer

    from scope.quickstart import run_quickstart

    command = typer.main.get_command(app).commands["quickstart"]
    flags = {p.name: p.default for p in command.params if p.name != "as_json"}
    library = {n: p.default for n, p in inspect.signature(run_quickstart).parameters.items() if n != "log"}
    assert flags == library


def test_the_quickstart_recipe_counts_rare_latents_as_dead_only_when_its_window_can_see_them():
    from scope.quickstart import QUICKSTART_DEAD_FREQUENCY, quickstart_config

    t = quickstart_config("store", d_sae=2048, train_tokens=600_000, batch_size=1024).trainer
    # The default run: the revival losses reach latents firing below 1e-4 of a ~100k-row window.
    assert t.dead_frequency == QUICKSTART_DEAD_FREQUENCY == 1e-4
    assert t.dead_window_steps == 98 and t.dead_window_steps * t.batch_size * t.dead_frequency >= 10
    # A run too short for any dead window keeps the trainer's defaults rather than a window that could not act.
    short = quickstart_config("store", d_sae=512, train_tokens=30_720, batch_size=512).trainer
    assert "dead_frequency" not in short.model_fields_set and short.dead_frequency == 1e-5
