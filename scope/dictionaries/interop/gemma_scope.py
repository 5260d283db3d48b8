"""Gemma Scope releases: Gemma Scope 1's ``params.npz`` and Gemma Scope 2's folders, from disk or the hub.

- Gemma Scope (Lieberum et al. 2024, "Gemma Scope", arXiv 2408.05147; Gemma 2 SAEs): one ``params.npz`` per
  SAE with ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``, at ``layer_L/width_W/average_l0_N/`` in repos
  ``google/gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att}``. JumpReLU: f = z ⊙ H(z − θ), z = x W_enc + b_enc.
- Gemma Scope 2 (Gemma 3 SAEs, repos ``google/gemma-scope-2-{270m,1b,4b,12b,27b}-{pt,it}``): one folder per SAE,
  e.g. ``resid_post/layer_12_width_16k_l0_medium/``, holding ``params.safetensors`` with lower-case ``w_enc``,
  ``w_dec`` plus ``b_enc``, ``b_dec``, ``threshold`` (same shapes and maths as above) and, optionally, a
  ``config.json`` with ``architecture: "jump_relu"``, ``model_name``, ``hf_hook_point_in`` and ``hf_hook_point_out``
  (HF module paths such as ``model.layers.12.output``), ``type`` (sae or transcoder) and ``affine_connection``.
  This is the layout SAELens 6.x's ``gemma_3`` loader reads.
- Gemma Scope 2 transcoders (``transcoder/layer_L_width_W_l0_X[_affine]/``, ``type: "transcoder"``) read
  ``model.layers.L.pre_feedforward_layernorm.output`` and write ``model.layers.L.post_feedforward_layernorm.output``:
  the bridge's ``blocks.L.ln2.hook_out`` and ``blocks.L.hook_mlp_out``. The ``_affine`` ones add
  ``affine_skip_connection [d_in, d_out]``, applied as x_in · W (scope's ``W_skip`` layout). They load as scope
  transcoders (dictionaries/transcoder.py). Cross-layer transcoders (``clt``) and Gemma Scope 1's transcoders are
  refused.
- Gemma Scope 2's ``attn_out`` SAEs read ``model.layers.L.self_attn.o_proj.input``, the heads' concatenated
  outputs before the output projection: the bridge's ``blocks.L.attn.hook_z`` (flattened to heads · d_head),
  not ``blocks.L.hook_attn_out`` (after o_proj, d_model wide).
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scope.dictionaries.interop.hub import hub_errors, short_error
from scope.dictionaries.interop.tensors import SAE_KEYS, assemble, relu_threshold, scope_names
from scope.dictionaries.base import Dictionary
from scope.errors import ScopeError
from scope.files import read_safetensors

GEMMA_SCOPE_NPZ = "params.npz"
GEMMA_SCOPE_2_WEIGHTS = "params.safetensors"
GEMMA_SCOPE_2_CONFIG = "config.json"
_GS1_REPO = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)")
_GS2_REPO = re.compile(r"gemma-scope-2-(\d+[mb])-(pt|it)")
_GS2_HF_HOOKS = {  # HF module paths in Gemma Scope 2's config.json -> TransformerLens bridge hook names
    r"model\.layers\.(\d+)\.output$": "blocks.{}.hook_resid_post",
    r"model\.layers\.(\d+)\.self_attn\.o_proj\.input$": "blocks.{}.attn.hook_z",
    r"model\.layers\.(\d+)\.post_feedforward_layernorm\.output$": "blocks.{}.hook_mlp_out",
    r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.output$": "blocks.{}.ln2.hook_out",
}
_GS2_SITES = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "attn.hook_z",
              "transcoder": "ln2.hook_out"}  # folder name -> hook read, when config.json does not say


def load_gemma_scope(source: str | Path, path_in_repo: str | None = None, *, revision: str | None = None,
                     hook: str | None = None, model: str | None = None,
                     output_hook: str | None = None, device: str | torch.device | None = None) -> Dictionary:
    """A Gemma Scope ``params.npz`` or Gemma Scope 2 ``params.safetensors`` SAE or transcoder, from disk or the hub.

    ``source`` is a local file or folder (a local folder may take a ``path_in_repo`` inside it, like a repo), a hub
    repo id with ``path_in_repo`` (a folder or a file in it), or
    ``hf://<owner>/<repo>/<path>``. Hook and model are read from the repo id, the path and Gemma Scope 2's
    ``config.json`` when they are recognisable (``hook``/``model`` override): res SAEs read
    ``blocks.L.hook_resid_post``, mlp ``blocks.L.hook_mlp_out``, att ``blocks.L.attn.hook_z``; Gemma Scope 2
    transcoders read ``blocks.L.ln2.hook_out`` and write ``blocks.L.hook_mlp_out`` (``output_hook`` overrides).
    """
    weights, config, ref = _locate_gemma_scope(source, path_in_repo, revision)
    tensors = _read_gemma_scope(weights)
    raw_cfg = json.loads(config.read_text()) if config is not None else {}
    transcoder = _is_transcoder(ref, raw_cfg, tensors)
    found_hook, found_out, found_model = _gemma_scope_provenance(ref, raw_cfg, transcoder)
    hook, model = hook or found_hook, model or found_model
    d_in, d_sae = tensors["W_enc"].shape
    cfg = {"kind": "jumprelu", "d_in": int(d_in), "d_sae": int(d_sae), "hook": hook, "model": model}
    if transcoder:
        cfg.update(kind="transcoder", activation="jumprelu", d_out=int(tensors["W_dec"].shape[1]),
                   skip="W_skip" in tensors, output_hook=output_hook or found_out)
    # Gemma Scope's embedding SAEs were trained on the embeddings before Gemma's sqrt(d_model) scale, while
    # hook_embed includes it (SAELens makes the same correction); an input scale undoes it exactly, b_dec too.
    scale = 1 / math.sqrt(d_in) if hook == "hook_embed" and _GS1_REPO.search(ref) else 1.0
    sae = assemble(cfg, tensors, str(weights), input_scale=scale)
    return sae.to(device) if device is not None else sae


def _locate_gemma_scope(source: str | Path, path_in_repo: str | None,
                        revision: str | None) -> tuple[Path, Path | None, str]:
    """(weights file, optional config.json, text naming the SAE for provenance) for any accepted source."""
    text = str(source)
    if Path(text).exists():  # a local folder with a sub-path works like a repo with a path in it
        sub = (path_in_repo or "").strip("/")
        path = Path(text) / sub if sub else Path(text)
        if not path.exists():
            raise ScopeError(f"local folder {text!r} has no {sub!r}; give a path inside it such as "
                             f"'resid_post/layer_6_width_16k_l0_small', or the weights file itself")
        weights, config = _local_gemma_scope(path)
        return weights, config, str(weights.absolute())  # not resolve(): hub-cache files are symlinks to blobs
    if path_in_repo is None and text.startswith("hf://"):
        parts = text.removeprefix("hf://").strip("/").split("/")
        if len(parts) < 3:
            raise ScopeError(f"hub reference {text!r} needs hf://<owner>/<repo>/<path in repo>")
        text, path_in_repo = "/".join(parts[:2]), "/".join(parts[2:])
    if path_in_repo is None:
        raise ScopeError(f"{text!r} is neither an existing path nor a hub reference; pass a local params.npz or "
                         f"folder, or a repo id and path, e.g. load_gemma_scope('google/gemma-scope-2b-pt-res', "
                         f"'layer_20/width_16k/average_l0_71')")
    weights, config = _hub_gemma_scope(text, path_in_repo.strip("/"), revision)
    return weights, config, f"{text}/{path_in_repo}"


def _local_gemma_scope(path: Path) -> tuple[Path, Path | None]:
    """The weights file (and Gemma Scope 2 config.json, if beside it) of a local file or folder."""
    if path.is_dir():
        named = [path / n for n in (GEMMA_SCOPE_NPZ, GEMMA_SCOPE_2_WEIGHTS) if (path / n).exists()]
        if not named:
            raise ScopeError(f"{str(path)!r} holds neither {GEMMA_SCOPE_NPZ} (Gemma Scope) nor "
                             f"{GEMMA_SCOPE_2_WEIGHTS} (Gemma Scope 2)")
        path = named[0]
    if path.suffix not in (".npz", ".safetensors"):
        raise ScopeError(f"{str(path)!r} is not a Gemma Scope file: expected a .npz (Gemma Scope) or "
                         f".safetensors (Gemma Scope 2)")
    config = path.parent / GEMMA_SCOPE_2_CONFIG
    return path, config if path.suffix == ".safetensors" and config.exists() else None


def _hub_gemma_scope(repo_id: str, path_in_repo: str, revision: str | None) -> tuple[Path, Path | None]:
    """Download one Gemma Scope SAE (and Gemma Scope 2's optional config.json) with hf_hub_download."""
    if path_in_repo.endswith((".npz", ".safetensors")):
        filename = path_in_repo
    else:
        name = GEMMA_SCOPE_2_WEIGHTS if _GS2_REPO.search(repo_id) else GEMMA_SCOPE_NPZ
        filename = f"{path_in_repo}/{name}"
    weights = _download(repo_id, filename, revision)
    if not filename.endswith(".safetensors"):
        return weights, None
    folder = filename.rpartition("/")[0]
    return weights, _download(repo_id, f"{folder}/{GEMMA_SCOPE_2_CONFIG}".lstrip("/"), revision, optional=True)


def _download(repo_id: str, filename: str, revision: str | None, optional: bool = False) -> Path | None:
    """One file from the hub (cached by huggingface_hub); a ScopeError that says what to do when it fails."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except EntryNotFoundError as err:  # includes "offline and not in the cache"
        if optional:
            return None
        failure: BaseException = err
    except hub_errors() as err:
        failure = err
    at = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    raise ScopeError(f"could not fetch {at!r} from the Hugging Face hub ({short_error(failure)}). Offline or without "
                     f"access? Download it where the hub is reachable and pass the local path, e.g. "
                     f"load_gemma_scope('/path/to/{filename.rpartition('/')[2]}')") from failure


def _read_gemma_scope(path: Path) -> dict[str, torch.Tensor]:
    """The five JumpReLU tensors of a params.npz / params.safetensors, renamed to scope's W_enc/W_dec."""
    if path.suffix == ".npz":
        try:
            with np.load(path) as data:  # allow_pickle stays False: arrays only
                raw = {k: torch.from_numpy(np.asarray(data[k], dtype=np.float32)) for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # numpy takes a non-zip file for a pickle
            raise ScopeError(f"{str(path)!r} is not a readable .npz file (a zip archive of arrays); it is truncated "
                             "or not a Gemma Scope params.npz; download it again") from None
    else:
        raw = read_safetensors(path, "download params.safetensors again")
    sd = {("W_skip" if k == "affine_skip_connection" else k): v.float() for k, v in scope_names(raw).items()}
    expected = (*SAE_KEYS, "threshold")
    if sorted(k for k in sd if k != "W_skip") != sorted(expected):
        raise ScopeError(f"{str(path)!r} has tensors {sorted(raw)}; a Gemma Scope SAE has {list(expected)} "
                         f"(Gemma Scope 2 spells w_enc, w_dec; its skip transcoders add affine_skip_connection)")
    sd["threshold"] = relu_threshold(sd["threshold"])  # Gemma Scope's reference code also applies relu
    if sd["W_enc"].ndim != 2:
        raise ScopeError(f"{str(path)!r}: W_enc has shape {tuple(sd['W_enc'].shape)}, expected [d_in, d_sae]")
    return sd


def _gemma_scope_provenance(ref: str, raw_cfg: dict[str, Any],
                            transcoder: bool) -> tuple[str | None, str | None, str | None]:
    """(hook read, hook written by a transcoder, model) from a Gemma Scope repo id/path and Gemma Scope 2's
    config.json, where recognisable."""
    layer = re.search(r"layer_(\d+)", ref)
    if m := _GS1_REPO.search(ref):
        size, variant, site = m.groups()
        model = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
        if site == "res" and "embedding" in ref:
            return "hook_embed", None, model
        sites = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}
        return (f"blocks.{layer.group(1)}.{sites[site]}" if layer else None), None, model
    model = _gemma_3_model(ref, raw_cfg)
    hook_in = _gs2_hook(raw_cfg, "hf_hook_point_in", layer)
    hook_out = _gs2_hook(raw_cfg, "hf_hook_point_out", layer) if transcoder else None
    if hook_in is None:
        tail = "/".join(ref.split("/")[-3:-1])  # e.g. resid_post/layer_6_width_16k_l0_small (not the local path)
        site = next((s for s in _GS2_SITES if s in tail), None)
        hook_in = f"blocks.{layer.group(1)}.{_GS2_SITES[site]}" if layer and site else None
    if transcoder and hook_out is None and layer:
        hook_out = f"blocks.{layer.group(1)}.hook_mlp_out"
    return hook_in, hook_out, model


def _gs2_hook(raw_cfg: dict[str, Any], key: str, layer: re.Match | None) -> str | None:
    """The bridge hook of a Gemma Scope 2 config's HF module path; an unknown path is an error naming the known."""
    hf = str(raw_cfg.get(key) or "")
    if not hf:
        return None
    for pattern, name in _GS2_HF_HOOKS.items():
        if m := re.search(pattern, hf):
            if layer and layer.group(1) != m.group(1):
                raise ScopeError(f"config.json {key} {hf!r} is at layer {m.group(1)}, but the folder says "
                                 f"layer_{layer.group(1)}; the folder and its config disagree")
            return name.format(m.group(1))
    known = ", ".join(p.replace("\\", "").replace("(d+)", "L").rstrip("$") for p in _GS2_HF_HOOKS)
    raise ScopeError(f"config.json {key} {hf!r} is not a module scope maps to a hook; known: {known} (or pass "
                     f"hook= / output_hook=)")


def _is_transcoder(ref: str, raw_cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a Gemma Scope folder holds a transcoder (Gemma Scope 2's load as one; others are refused)."""
    arch = raw_cfg.get("architecture", "jump_relu")
    if arch != "jump_relu":
        raise ScopeError(f"Gemma Scope config architecture {arch!r} is not supported; only 'jump_relu' SAEs and "
                         f"transcoders convert")
    # Only the part after a recognised Gemma Scope repo name is looked at, so a local folder name cannot trip it.
    repo = _GS1_REPO.search(ref) or _GS2_REPO.search(ref)
    inside = ref[repo.end():].lower().split("/") if repo else ref.lower().split("/")[-3:-1]
    if any(part.startswith("clt") for part in inside):
        raise ScopeError(f"{ref!r} is a cross-layer transcoder (it writes every later layer); scope converts Gemma "
                         f"Scope SAEs and single-layer transcoders only")
    if repo and repo.group(0).endswith("transcoders"):
        raise ScopeError(f"{ref!r} is a Gemma Scope 1 transcoder; scope converts Gemma Scope 1 SAEs (res, mlp, "
                         f"att) and Gemma Scope 2 SAEs and transcoders")
    named = any(part.startswith("transcoder") for part in inside)
    return named or is_transcoder_config(raw_cfg) or "W_skip" in tensors


def is_transcoder_config(raw_cfg: dict[str, Any]) -> bool:
    """Whether a Gemma Scope 2 config.json describes a transcoder: its ``type`` says so, its affine skip
    connection is on, or it writes a different site than it reads. Gemma Scope 2's SAE configs carry
    ``"type": "sae"``, ``"affine_connection": false`` and ``hf_hook_point_out`` equal to ``hf_hook_point_in``."""
    hook_in, hook_out = raw_cfg.get("hf_hook_point_in"), raw_cfg.get("hf_hook_point_out")
    return (raw_cfg.get("type") == "transcoder" or raw_cfg.get("affine_connection") is True
            or bool(hook_out and hook_out != hook_in))


def _gemma_3_model(ref: str, raw_cfg: dict[str, Any]) -> str | None:
    """The Gemma 3 HF id of a Gemma Scope 2 SAE (google/gemma-3-270m has no -pt suffix on the hub)."""
    if m := _GS2_REPO.search(ref):
        size, variant = m.groups()
    elif m := re.search(r"gemma-(?:v)?3-(\d+[mb])-(pt|it)", str(raw_cfg.get("model_name", ""))):
        size, variant = m.groups()
    else:
        return None
    return f"google/gemma-3-{size}" + ("" if (size, variant) == ("270m", "pt") else f"-{variant}")
