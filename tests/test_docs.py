"""The docs site builds offline with warnings as errors, and its CLI reference matches the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from scope.cli.reference import cli_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strictly_offline(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    pages = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("*.html")}
    assert {"index.html", "cli.html", "quickstart.html", "guides/saelens.html", "methods/jumprelu.html"} <= pages
    index = (tmp_path / "site" / "index.html").read_text()
    assert "fonts.googleapis.com" not in index, "the site must not load remote fonts"


def test_cli_reference_is_generated_from_the_cli():
    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == cli_markdown(), "run `python -m scope.cli.reference > docs/cli.md` and commit the result"
    for command in ("scope cache", "scope train", "scope eval", "scope store import-saelens", "scope analyze rope"):
        assert f"`{command}`" in committed
