"""The study scripts' shared flags: where they write is checked before any training or scoring starts."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from sweep import prepare_outputs  # noqa: E402

from scope.errors import ScopeError  # noqa: E402


def test_prepare_outputs_creates_the_folders(tmp_path):
    args = argparse.Namespace(figures=str(tmp_path / "a" / "figs"), markdown=str(tmp_path / "b" / "c" / "table.md"))
    prepare_outputs(args)
    assert (tmp_path / "a" / "figs").is_dir() and (tmp_path / "b" / "c").is_dir()
    assert not (tmp_path / "b" / "c" / "table.md").exists()


@pytest.mark.parametrize("flag,target,message", [
    ("--figures", "file", r"--figures '.*afile' is a file; give the folder"),
    ("--figures", "file/sub", r"--figures '.*afile/sub': cannot create the folder"),
    ("--markdown", "dir", r"--markdown '.*' is a folder; give the file"),
])
def test_prepare_outputs_refuses_unwritable_paths(tmp_path, flag, target, message):
    (tmp_path / "afile").write_text("x")
    path = {"file": tmp_path / "afile", "file/sub": tmp_path / "afile" / "sub", "dir": tmp_path}[target]
    args = argparse.Namespace(**{"figures": None, "markdown": None, flag[2:]: str(path)})
    with pytest.raises(ScopeError, match=message):
        prepare_outputs(args)


def test_sae_quality_refuses_a_figures_file_before_any_work(tmp_path):
    """Before this check the study trained and scored for hours, then died on the copy with a traceback."""
    (tmp_path / "afile").write_text("x")
    config = BENCHMARKS.parent / "sae_configs" / "gemma-3-270m-res-l6-quality-20m-4k-b1024.yaml"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "sae_quality.py"), "--config", str(config), "--out",
                           str(tmp_path / "run"), "--no-train", "--figures", str(tmp_path / "afile")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "is a file" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()
