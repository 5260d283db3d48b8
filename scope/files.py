"""Reading the JSON and safetensors files scope writes, with a ScopeError that names a bad one.

A file that is missing, truncated or not what its name says is the most common bad input after a
typo; every reader of such a file goes through here, so each error names the file and says what
to do, instead of a decoder's message about byte offsets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from scope.errors import ScopeError, first_line


def _then(advice: str) -> str:
    return f"; {advice}" if advice else ""


def parse_json(data: bytes | str, name: str, advice: str = "") -> Any:
    """The JSON value in ``data`` (the bytes of file ``name``), or a ScopeError naming the file."""
    try:
        return json.loads(data)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError alike
        raise ScopeError(f"{name} is not valid JSON ({first_line(err)}){_then(advice)}") from None


def read_json(path: str | Path, advice: str = "") -> Any:
    """The JSON value in a local file, or a ScopeError naming the file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ScopeError(f"{path} does not exist{_then(advice)}") from None
    return parse_json(data, str(path), advice)


def read_safetensors(path: str | Path, advice: str = "", device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a local safetensors file, or a ScopeError naming a missing, truncated or foreign file."""
    try:
        return load_file(str(path), device=device)
    except FileNotFoundError:
        raise ScopeError(f"{path} does not exist{_then(advice)}") from None
    except SafetensorError as err:
        raise ScopeError(f"{path} is not a readable safetensors file ({first_line(err)}); it is truncated or "
                         f"corrupted{_then(advice)}") from None
