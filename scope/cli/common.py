"""What every command module shares: the option types, the error wrapper, number lists and the output."""

from __future__ import annotations

import errno
import functools
import json
import math
from typing import Annotated, Optional

import typer

from scope.errors import ScopeError

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
ModelOpt = Annotated[str, typer.Option(help="gemma-3-270m (bundled), a Hugging Face id, a local folder or a .gguf file.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1… (default: cuda when present).")]
ModelDtypeOpt = Annotated[Optional[str], typer.Option(help="Model dtype (default float32).")]
SaeModelOpt = Annotated[Optional[str], typer.Option("--model", help="Model (default: the one the dictionary names, "
                                                                    "else gemma-3-270m).")]


_PATH_ERRORS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


def friendly(fn):
    """Print a ScopeError as one clear line (no traceback) and exit with status 2.

    Ctrl-C and a full disk are what a newcomer meets most often mid-run; both say what to do next,
    since every long command (capture, training) resumes when re-run with the same arguments.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ScopeError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: nothing written so far is lost; re-run the same command to resume", err=True)
            raise typer.Exit(130) from None
        except OSError as err:
            if err.errno == errno.ENOSPC:
                typer.echo(f"error: no space left on the device while writing {err.filename or 'output'}; free "
                           "some space (or choose another --out) and re-run the same command to resume", err=True)
                raise typer.Exit(2) from None
            # Inputs are checked by name where they are read; what reaches here is most often an output path
            # the user gave that cannot be made (under /proc, a file in the way, no permission).
            if err.filename is None or err.errno not in _PATH_ERRORS:
                raise
            typer.echo(f"error: cannot create or open {str(err.filename)!r}: {err.strerror}; pass a path in a "
                       "folder that exists and that you can write to", err=True)
            raise typer.Exit(2) from None

    return wrapper


def emit(result: dict, as_json: bool, human: str) -> None:
    """Print ``result`` as JSON with ``--json``, else the human-readable text."""
    typer.echo(json.dumps(result, indent=2) if as_json else human)


def floats(text: str, name: str) -> list[float]:
    """The numbers of a comma-separated option; a ScopeError naming the option ``name`` otherwise."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ScopeError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):  # float() reads "nan" and "inf" without complaint
        raise ScopeError(f"{name} must be finite numbers, got {text!r}")
    return values


def ints(text: str, name: str) -> list[int]:
    """The whole numbers of a comma-separated option (layers): 1.5 is refused, not read as 1."""
    values = floats(text, name)
    if any(v != int(v) for v in values):
        raise ScopeError(f"{name} must be comma-separated whole numbers, got {text!r}")
    return [int(v) for v in values]
