"""Moving dictionary folders (scope's or SAELens's layout) to and from the Hugging Face hub.

Also the hub's failure modes, which the Gemma Scope downloads share: a bad id, no access and no network
all become a ScopeError that says what to do.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from scope.dictionaries.base import CONFIG, WEIGHTS
from scope.dictionaries.interop.saelens import SAELENS_CONFIG, SAELENS_SPARSITY, SAELENS_WEIGHTS
from scope.errors import ScopeError


def hub_errors() -> tuple[type[BaseException], ...]:
    """What a hub call raises for a bad id, no access or no network (the HTTP client differs across versions)."""
    from huggingface_hub import errors

    found: list[type[BaseException]] = [OSError, errors.HfHubHTTPError, errors.HFValidationError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def short_error(err: BaseException) -> str:
    """The error's type and first line, for a one-line message."""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def push_to_hub(sae_folder: str | Path, repo_id: str, path_in_repo: str | None = None, token: str | None = None,
                *, private: bool | None = None, commit_message: str | None = None) -> str:
    """Upload a scope or SAELens dictionary folder to a hub model repo (created if absent); returns the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(sae_folder)
    files = _dictionary_files(folder)
    api = HfApi(token=token)
    where = f"{repo_id}/{path_in_repo or ''}".rstrip("/")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, path_in_repo=path_in_repo,
                                 allow_patterns=files, commit_message=commit_message or f"Upload dictionary to {where}")
    except hub_errors() as err:
        raise ScopeError(f"could not push {str(folder)!r} to hub repo {where!r} ({short_error(err)}); check the repo "
                         f"id, that a write token is set (token= or `hf auth login`) and that the hub is reachable"
                         ) from err
    return str(getattr(info, "commit_url", info))


def pull_from_hub(repo_id: str, path_in_repo: str | None = None, revision: str | None = None, *,
                  token: str | None = None, cache_dir: str | Path | None = None,
                  local_files_only: bool = False) -> Path:
    """Download one dictionary folder of a hub repo into the hub cache; returns its local folder."""
    from huggingface_hub import snapshot_download

    sub = (path_in_repo or "").strip("/")
    local = Path(repo_id) / sub
    if local.exists() or repo_id.startswith(("/", "./", "../", "~")):
        # The hub's own error ("Repo id must be in the form ...") would not say that a local folder needs no pull.
        if local.is_dir():
            _dictionary_files(local)  # a folder in another layout is named with what it lacks
        raise ScopeError(f"{str(local)!r} is a local path, not a hub repo id (OWNER/NAME); a local dictionary "
                         "folder needs no pull: pass the folder itself, e.g. to --sae")
    try:
        root = snapshot_download(repo_id, revision=revision, allow_patterns=[f"{sub}/*"] if sub else None,
                                 token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    except hub_errors() as err:
        at = f"{repo_id}/{sub}" + (f"@{revision}" if revision else "")
        raise ScopeError(f"could not pull {at!r} from the Hugging Face hub ({short_error(err)}); check the repo id, "
                         f"revision and access, or that it is in the hub cache when offline") from err
    folder = Path(root) / sub
    if not folder.is_dir():
        raise ScopeError(f"hub repo {repo_id!r} has no folder {sub!r}")
    _dictionary_files(folder)
    return folder


def _dictionary_files(folder: Path) -> list[str]:
    """The files of a scope or SAELens dictionary folder that belong on the hub."""
    has = {n for n in (CONFIG, WEIGHTS, SAELENS_WEIGHTS) if (folder / n).is_file()}
    layout = "scope" if {CONFIG, WEIGHTS} <= has else "saelens" if {SAELENS_CONFIG, SAELENS_WEIGHTS} <= has else None
    if layout is None:
        raise ScopeError(f"{str(folder)!r} is not a scope or SAELens dictionary folder (needs {CONFIG} with "
                         f"{WEIGHTS} or {SAELENS_WEIGHTS}); save it with Dictionary.save or to_saelens first")
    names = [CONFIG, WEIGHTS] if layout == "scope" else [SAELENS_CONFIG, SAELENS_WEIGHTS, SAELENS_SPARSITY]
    return [n for n in [*names, "README.md"] if (folder / n).exists()]
