"""Dictionaries in other tools' layouts and on the hub: ``scope import ...``, ``scope export ...``, ``scope push``,
``scope pull``.

The top-level commands here are plain functions; scope/cli/__init__.py adds them to ``scope``.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from scope.cli.common import JsonOpt, emit, friendly
from scope.errors import ScopeError

import_app = typer.Typer(help="Bring dictionaries from other tools into scope's layout.", no_args_is_help=True)
export_app = typer.Typer(help="Write scope dictionaries in other tools' layouts.", no_args_is_help=True)


@import_app.command("gemma-scope")
@friendly
def import_gemma_scope(
    source: Annotated[str, typer.Argument(help="params.npz, a Gemma Scope 2 folder, a local copy of a release, or a hub repo such as google/gemma-scope-2b-pt-res.")],
    path_in_repo: Annotated[Optional[str], typer.Argument(help="With a hub repo or a local folder: the SAE inside it, e.g. layer_20/width_16k/average_l0_71 or resid_post/layer_6_width_16k_l0_small.")] = None,
    out: Annotated[str, typer.Option(help="scope dictionary folder to write.")] = "",
    revision: Annotated[Optional[str], typer.Option()] = None,
    hook: Annotated[Optional[str], typer.Option(help="Hook the SAE reads, when it cannot be inferred.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model the SAE belongs to, when it cannot be inferred.")] = None,
    output_hook: Annotated[Optional[str], typer.Option(help="Transcoders: the hook written, when it cannot be inferred.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Import a Gemma Scope (or Gemma Scope 2) JumpReLU SAE or Gemma Scope 2 transcoder."""
    from scope.dictionaries.interop import load_gemma_scope

    if not out:
        raise ScopeError("--out is required: the folder to write the scope dictionary to")
    sae = load_gemma_scope(source, path_in_repo, revision=revision, hook=hook, model=model, output_hook=output_hook)
    _saved(sae, sae.save(out), as_json)


@import_app.command("saelens")
@friendly
def import_saelens(folder: str, out: Annotated[str, typer.Option(help="scope dictionary folder to write.")],
                   as_json: JsonOpt = False) -> None:
    """Import a SAELens folder (cfg.json + sae_weights.safetensors)."""
    from scope.dictionaries.interop import from_saelens

    sae = from_saelens(folder)
    _saved(sae, sae.save(out), as_json)


@export_app.command("saelens")
@friendly
def export_saelens(sae: str, out: str, as_json: JsonOpt = False) -> None:
    """Write a dictionary in the SAELens layout, so SAE.load_from_disk opens it."""
    from scope.dictionaries.interop import load_any, to_saelens

    d = load_any(sae)
    _saved(d, to_saelens(d, out), as_json)


def _saved(sae, path, as_json: bool) -> None:
    info = {"path": str(path), "kind": sae.kind, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "hook": sae.cfg.hook,
            "model": sae.cfg.model, **({"output_hook": sae.output_hook} if sae.kind == "transcoder" else {})}
    emit(info, as_json, f"wrote {sae.kind} dictionary {sae.cfg.d_in}x{sae.cfg.d_sae} (hook {sae.cfg.hook}) to {path}")


@friendly
def push(folder: str, repo_id: str,
         path_in_repo: Annotated[Optional[str], typer.Option(help="Subfolder in the repo (default: the root).")] = None,
         private: Annotated[bool, typer.Option(help="Create the repo as private.")] = False,
         as_json: JsonOpt = False) -> None:
    """Upload a dictionary folder to a Hugging Face hub repo (token from HF_TOKEN or `hf auth login`)."""
    from scope.dictionaries.interop import push_to_hub

    url = push_to_hub(folder, repo_id, path_in_repo, private=private)
    emit({"url": url}, as_json, f"pushed {folder} to {url}")


@friendly
def pull(repo_id: str, path_in_repo: Annotated[Optional[str], typer.Argument()] = None,
         revision: Annotated[Optional[str], typer.Option()] = None, as_json: JsonOpt = False) -> None:
    """Download a dictionary folder from a Hugging Face hub repo; prints the local folder."""
    from scope.dictionaries.interop import pull_from_hub

    path = pull_from_hub(repo_id, path_in_repo, revision)
    emit({"path": str(path)}, as_json, str(path))
