"""Every notebook runs top to bottom on the bundled model at tiny sizes, and is committed without outputs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.real_model
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("SCOPE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("SCOPE_NOTEBOOK_OUT", str(tmp_path))
    nb = nbformat.read(str(path), as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_notebooks_match_their_builder(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "notebooks" / "build.py"), str(tmp_path)], check=True)
    built = {p.name: p.read_text() for p in tmp_path.glob("*.ipynb")}
    assert built == {p.name: p.read_text() for p in NOTEBOOKS}, "run notebooks/build.py and commit the result"
