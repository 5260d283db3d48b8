"""Bringing dictionaries in and out: Gemma Scope releases, the SAELens folder layout, the Hugging Face hub.

Formats (all store ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``):

- Gemma Scope (Lieberum et al. 2024, "Gemma Scope", arXiv 2408.05147; Gemma 2 SAEs): one ``params.npz`` per
  SAE with ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``, at ``layer_L/width_W/average_l0_N/`` in repos
  ``google/gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att}``. JumpReLU: f = z ⊙ H(z − θ), z = x W_enc + b_enc.
- Gemma Scope 2 (Gemma 3 SAEs, repos ``google/gemma-scope-2-{270m,1b,4b,12b,27b}-{pt,it}``): one folder per SAE,
  e.g. ``resid_post/layer_12_width_16k_l0_medium/``, holding ``params.safetensors`` with lower-case ``w_enc``,
  ``w_dec`` plus ``b_enc``, ``b_dec``, ``threshold`` (same shapes and maths as above) and, optionally, a
  ``config.json`` with ``architecture: "jump_relu"``, ``model_name`` and ``hf_hook_point_in`` (an HF module path
  such as ``model.layers.12.output``). This is the layout SAELens 6.x's ``gemma_3`` loader reads; transcoders and
  CLTs (``hf_hook_point_out``, ``affine_skip_connection``) are refused: they do not reconstruct their input.
- SAELens 6.x: ``cfg.json`` (``architecture`` jumprelu/standard/topk, ``d_in``, ``d_sae``, ``dtype``, ``device``,
  ``apply_b_dec_to_input``, ``normalize_activations``, ``metadata`` with ``hook_name``/``model_name``) plus
  ``sae_weights.safetensors``. Kind mapping: jumprelu ↔ jumprelu, relu ↔ standard, topk (exact) ↔ topk;
  topk (batch) exports as jumprelu with its one inference threshold on every latent, as SAELens saves BatchTopK.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from scope.dictionaries.base import CONFIG, WEIGHTS, Dictionary, build
from scope.dictionaries.base import load as load_scope
from scope.dictionaries.jumprelu import JumpReLU
from scope.errors import ScopeError

SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SPARSITY = "sparsity.safetensors"
# The cfg.json layout written here is SAELens 6's; SAELens reads configs without a version >= 6 as legacy ones.
SAELENS_LAYOUT_VERSION = "6.0.0"
GEMMA_SCOPE_NPZ = "params.npz"
GEMMA_SCOPE_2_WEIGHTS = "params.safetensors"
GEMMA_SCOPE_2_CONFIG = "config.json"
_SAE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")
_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# --- shared --------------------------------------------------------------------------------------
def _assemble(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], source: str,
              input_scale: float = 1.0) -> Dictionary:
    """A dictionary built from ``cfg`` whose saved-form tensors are replaced by ``tensors``."""
    d = build(cfg)
    # Start from the kind's own saved form, so buffers a foreign format lacks (TopK counters) keep defaults.
    full = d.saved_tensors(fold=False)
    required = (*_SAE_KEYS, "threshold") if cfg["kind"] == "jumprelu" else _SAE_KEYS
    missing = [k for k in required if k not in tensors]
    if missing:
        raise ScopeError(f"{source}: tensors {missing} are missing for a {cfg['kind']} dictionary; "
                         f"found {sorted(tensors)}")
    extra = sorted(set(tensors) - set(full))
    if extra:
        raise ScopeError(f"{source}: unexpected tensors {extra} for a {cfg['kind']} dictionary; "
                         f"expected {sorted(full)}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(full[name].shape):
            raise ScopeError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                             f"{tuple(full[name].shape)} for d_in={cfg['d_in']}, d_sae={cfg['d_sae']}")
        full[name] = t.to(full[name].dtype)
    full["input_scale"] = torch.tensor(float(input_scale))
    d.load_state_dict(d.import_state(full))
    return d


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a hub call raises for a bad id, no access or no network (the HTTP client differs across versions)."""
    from huggingface_hub import errors

    found: list[type[BaseException]] = [OSError, errors.HfHubHTTPError, errors.HFValidationError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


# --- Gemma Scope -----------------------------------------------------------------------------------
_GS1_REPO = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)")
_GS2_REPO = re.compile(r"gemma-scope-2-(\d+[mb])-(pt|it)")
_GS2_HF_HOOKS = {  # HF module paths in Gemma Scope 2's config.json -> TransformerLens bridge hook names
    r"model\.layers\.(\d+)\.output$": "blocks.{}.hook_resid_post",
    r"model\.layers\.(\d+)\.self_attn\.o_proj\.input$": "blocks.{}.attn.hook_z",
    r"model\.layers\.(\d+)\.post_feedforward_layernorm\.output$": "blocks.{}.hook_mlp_out",
}


def load_gemma_scope(source: str | Path, path_in_repo: str | None = None, *, revision: str | None = None,
                     hook: str | None = None, model: str | None = None,
                     device: str | torch.device | None = None) -> JumpReLU:
    """A Gemma Scope ``params.npz`` or Gemma Scope 2 ``params.safetensors`` SAE, from disk or the hub.

    ``source`` is a local file or folder, a hub repo id with ``path_in_repo`` (a folder or a file in it), or
    ``hf://<owner>/<repo>/<path>``. Hook and model are read from the repo id, the path and Gemma Scope 2's
    ``config.json`` when they are recognisable (``hook``/``model`` override): res SAEs read
    ``blocks.L.hook_resid_post``, mlp ``blocks.L.hook_mlp_out``, att ``blocks.L.attn.hook_z``.
    """
    weights, config, ref = _locate_gemma_scope(source, path_in_repo, revision)
    tensors = _read_gemma_scope(weights)
    raw_cfg = json.loads(config.read_text()) if config is not None else {}
    found_hook, found_model = _gemma_scope_provenance(ref, raw_cfg)
    hook, model = hook or found_hook, model or found_model
    d_in, d_sae = tensors["W_enc"].shape
    cfg = {"kind": "jumprelu", "d_in": int(d_in), "d_sae": int(d_sae), "hook": hook, "model": model}
    # Gemma Scope's embedding SAEs were trained on the embeddings before Gemma's sqrt(d_model) scale, while
    # hook_embed includes it (SAELens makes the same correction); an input scale undoes it exactly, b_dec too.
    scale = 1 / math.sqrt(d_in) if hook == "hook_embed" and _GS1_REPO.search(ref) else 1.0
    sae = _assemble(cfg, tensors, str(weights), input_scale=scale)
    return sae.to(device) if device is not None else sae


def _locate_gemma_scope(source: str | Path, path_in_repo: str | None,
                        revision: str | None) -> tuple[Path, Path | None, str]:
    """(weights file, optional config.json, text naming the SAE for provenance) for any accepted source."""
    text = str(source)
    if path_in_repo is None and Path(text).exists():
        weights, config = _local_gemma_scope(Path(text))
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
    except _hub_errors() as err:
        failure = err
    at = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    raise ScopeError(f"could not fetch {at!r} from the Hugging Face hub ({_short(failure)}). Offline or without "
                     f"access? Download it where the hub is reachable and pass the local path, e.g. "
                     f"load_gemma_scope('/path/to/{filename.rpartition('/')[2]}')") from failure


def _read_gemma_scope(path: Path) -> dict[str, torch.Tensor]:
    """The five JumpReLU tensors of a params.npz / params.safetensors, renamed to scope's W_enc/W_dec."""
    if path.suffix == ".npz":
        with np.load(path) as data:  # allow_pickle stays False: arrays only
            raw = {k: torch.from_numpy(np.asarray(data[k], dtype=np.float32)) for k in data.files}
    else:
        raw = load_file(str(path))
    if "affine_skip_connection" in raw:
        raise ScopeError(f"{str(path)!r} is a skip transcoder (affine_skip_connection); scope dictionaries "
                         f"reconstruct their input, so only Gemma Scope SAEs convert")
    sd = {("W_" + k[2:] if k.startswith("w_") else k): v.float() for k, v in raw.items()}
    expected = (*_SAE_KEYS, "threshold")
    if sorted(sd) != sorted(expected):
        raise ScopeError(f"{str(path)!r} has tensors {sorted(raw)}; a Gemma Scope SAE has {list(expected)} "
                         f"(Gemma Scope 2 spells w_enc, w_dec)")
    sd["threshold"] = _relu_threshold(sd["threshold"])  # Gemma Scope's reference code also applies relu
    if sd["W_enc"].ndim != 2:
        raise ScopeError(f"{str(path)!r}: W_enc has shape {tuple(sd['W_enc'].shape)}, expected [d_in, d_sae]")
    return sd


def _gemma_scope_provenance(ref: str, raw_cfg: dict[str, Any]) -> tuple[str | None, str | None]:
    """(hook, model) read from a Gemma Scope repo id/path and Gemma Scope 2's config.json, where recognisable."""
    _refuse_transcoders(ref, raw_cfg)
    layer = re.search(r"layer_(\d+)", ref)
    if m := _GS1_REPO.search(ref):
        size, variant, site = m.groups()
        model = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
        if site == "res" and "embedding" in ref:
            return "hook_embed", model
        sites = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}
        return (f"blocks.{layer.group(1)}.{sites[site]}" if layer else None), model
    model = _gemma_3_model(ref, raw_cfg)
    hf_hook = str(raw_cfg.get("hf_hook_point_in") or "")
    for pattern, name in _GS2_HF_HOOKS.items():
        if h := re.search(pattern, hf_hook):
            return name.format(h.group(1)), model
    sites = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "attn.hook_z"}
    site = next((s for s in sites if s in ref), None)
    return (f"blocks.{layer.group(1)}.{sites[site]}" if layer and site else None), model


def _refuse_transcoders(ref: str, raw_cfg: dict[str, Any]) -> None:
    """Transcoders map one site to another; as dictionaries they would be silently wrong."""
    arch = raw_cfg.get("architecture", "jump_relu")
    if arch != "jump_relu":
        raise ScopeError(f"Gemma Scope config architecture {arch!r} is not supported; only 'jump_relu' SAEs convert")
    # Only the part after a recognised Gemma Scope repo name is looked at, so a local folder name cannot trip it.
    repo = _GS1_REPO.search(ref) or _GS2_REPO.search(ref)
    inside = ref[repo.end():].lower().split("/") if repo else []
    named = (repo and repo.group(0).endswith("transcoders")) or any(
        part.startswith(("transcoder", "clt")) for part in inside)
    if named or raw_cfg.get("hf_hook_point_out") or "affine_connection" in raw_cfg:
        raise ScopeError(f"{ref!r} is a transcoder (it writes a different site than it reads); only Gemma Scope "
                         f"SAEs (res, mlp, att / resid_post, mlp_out, attn_out) convert to scope dictionaries")


def _gemma_3_model(ref: str, raw_cfg: dict[str, Any]) -> str | None:
    """The Gemma 3 HF id of a Gemma Scope 2 SAE (google/gemma-3-270m has no -pt suffix on the hub)."""
    if m := _GS2_REPO.search(ref):
        size, variant = m.groups()
    elif m := re.search(r"gemma-(?:v)?3-(\d+[mb])-(pt|it)", str(raw_cfg.get("model_name", ""))):
        size, variant = m.groups()
    else:
        return None
    return f"google/gemma-3-{size}" + ("" if (size, variant) == ("270m", "pt") else f"-{variant}")


# --- SAELens ---------------------------------------------------------------------------------------
def to_saelens(sae: Dictionary, folder: str | Path) -> Path:
    """Write ``sae`` in the SAELens 6.x layout (``cfg.json`` + ``sae_weights.safetensors``), input scale folded."""
    arch, fields, tensors = _saelens_form(sae)
    cfg = {
        "architecture": arch, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
        "dtype": _DTYPES.get(sae.W_enc.dtype, "float32"), "device": "cpu",
        "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
        # scope folds its one input scale into the weights, so SAELens needs no normalisation of its own
        "normalize_activations": "none", **fields,
        # SAELens feeds hook_z SAEs [..., heads, d_head] and flattens them itself; scope's take [..., heads·d_head]
        "reshape_activations": "hook_z" if (sae.cfg.hook or "").endswith("hook_z") else "none",
        "metadata": {
            "sae_lens_version": SAELENS_LAYOUT_VERSION, "sae_lens_training_version": None,
            "model_name": sae.cfg.model, "hook_name": sae.cfg.hook, "hook_head_index": None,
            "prepend_bos": True,  # Gemma is always run with BOS, as scope captures it
            "scope_config": sae.cfg.model_dump(),  # scope-only fields (bandwidth, aux_k, ...) come back on import
        },
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{SAELENS_WEIGHTS}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(folder / SAELENS_WEIGHTS)
    (folder / f".{SAELENS_CONFIG}.tmp").write_text(json.dumps(cfg, indent=2))
    (folder / f".{SAELENS_CONFIG}.tmp").replace(folder / SAELENS_CONFIG)
    return folder


def _saelens_form(sae: Dictionary) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(architecture, extra cfg fields, tensors) of ``sae`` as SAELens stores it."""
    if sae.whitening is not None:
        raise ScopeError("a whitened dictionary has no SAELens counterpart (SAELens has no input whitening); "
                         "export a dictionary trained without `whitening:`")
    sd = sae.saved_tensors(fold=True)
    tensors = {k: sd[k] for k in _SAE_KEYS}
    kind, selection = sae.kind, getattr(sae.cfg, "selection", None)
    if kind == "jumprelu":
        return "jumprelu", {}, {**tensors, "threshold": sd["threshold"]}
    if kind == "relu":
        return "standard", {}, tensors
    if kind == "topk" and selection == "exact":
        return "topk", {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}, tensors
    if kind == "topk" and selection == "batch":
        # BatchTopK infers with one threshold on relu(z); SAELens saves BatchTopK SAEs as jumprelu the same way
        theta = sd["threshold"].float().expand(sae.cfg.d_sae).clone()
        return "jumprelu", {}, {**tensors, "threshold": theta}
    what = f"{kind} (selection {selection!r})" if selection else repr(kind)
    raise ScopeError(f"a {what} dictionary has no SAELens counterpart; these convert: jumprelu, relu (-> standard), "
                     f"topk with selection 'exact' (-> topk) or 'batch' (-> jumprelu)")


def from_saelens(folder: str | Path, device: str | torch.device | None = None) -> Dictionary:
    """A scope dictionary from a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``, 6.x or older)."""
    folder = Path(folder)
    if not (folder / SAELENS_CONFIG).exists() or not (folder / SAELENS_WEIGHTS).exists():
        raise ScopeError(f"{str(folder)!r} is not a SAELens folder (needs {SAELENS_CONFIG} and {SAELENS_WEIGHTS})")
    raw = json.loads((folder / SAELENS_CONFIG).read_text())
    tensors = load_file(str(folder / SAELENS_WEIGHTS))
    _drop_unit_scaling_factor(tensors, folder)
    cfg, tensors = _scope_form(raw, tensors, folder)
    sae = _assemble(cfg, tensors, str(folder), input_scale=_saelens_input_scale(raw, folder))
    return sae.to(device) if device is not None else sae


def _scope_form(raw: dict[str, Any], tensors: dict[str, torch.Tensor],
                folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(scope cfg, tensors in scope's saved form) for a SAELens cfg.json and its weights."""
    meta = raw.get("metadata") or {}
    arch = raw.get("architecture") or ("topk" if raw.get("activation_fn") == "topk" else "standard")
    base = {"d_in": int(raw["d_in"]), "d_sae": int(raw["d_sae"]),
            "apply_b_dec_to_input": bool(raw.get("apply_b_dec_to_input", True)),
            "hook": meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point"),
            "model": meta.get("model_name") or raw.get("model_name")}
    if arch == "jumprelu":
        kind, fields = "jumprelu", {}
        if "threshold" not in tensors:
            raise ScopeError(f"{folder}: jumprelu weights lack 'threshold'; found {sorted(tensors)}")
        tensors = {**tensors, "threshold": _relu_threshold(tensors["threshold"])}
    elif arch == "standard":
        kind, fields = "relu", {}
    elif arch == "topk":
        kind = "topk"
        k = raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k")
        fields = {"k": int(k), "selection": "exact"}
        if raw.get("rescale_acts_by_decoder_norm"):
            tensors = _fold_decoder_norm(tensors)
    else:
        raise ScopeError(f"{folder}: SAELens architecture {arch!r} has no scope counterpart; these convert: "
                         f"jumprelu, standard (-> relu), topk")
    cfg = {**_scope_only_fields(meta, kind), **base, **fields, "kind": kind}
    return cfg, tensors


def _relu_threshold(theta: torch.Tensor) -> torch.Tensor:
    """θ for scope's z·1[z > θ] that reproduces relu(z)·1[z > θ] (SAELens, Gemma Scope) exactly: max(θ, 0)."""
    # They differ only for θ < 0, where the ReLU form is plain ReLU, i.e. θ = 0 (SAELens initialises θ to 0).
    return theta.float().clamp_min(0.0)


def _scope_only_fields(meta: dict[str, Any], kind: str) -> dict[str, Any]:
    """Training fields a scope export left in metadata.scope_config (SAELens has no place for them)."""
    saved = meta.get("scope_config")
    if not isinstance(saved, dict) or saved.get("kind") != kind:
        return {}
    owned = {"kind", "d_in", "d_sae", "apply_b_dec_to_input", "hook", "model", "k", "selection"}
    return {k: v for k, v in saved.items() if k not in owned}


def _fold_decoder_norm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAELens TopK with rescale_acts_by_decoder_norm ranks z·‖W_dec,i‖ and decodes f/‖W_dec,i‖: fold both."""
    n = tensors["W_dec"].norm(dim=-1)
    return {**tensors, "W_enc": tensors["W_enc"] * n, "b_enc": tensors["b_enc"] * n,
            "W_dec": tensors["W_dec"] / n[:, None]}


def _drop_unit_scaling_factor(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Old SAELens files may carry an all-ones 'scaling_factor' (a no-op); any other value is refused."""
    s = tensors.pop("scaling_factor", None)
    if s is not None and not torch.allclose(s, torch.ones_like(s)):
        raise ScopeError(f"{folder}: a finetuning 'scaling_factor' other than 1 is not supported")


def _saelens_input_scale(raw: dict[str, Any], folder: Path) -> float:
    """scope's input scale for a SAELens normalize_activations setting; per-token normalisations are refused."""
    norm = raw.get("normalize_activations", "none")
    norm = {None: "none", False: "none", True: "expected_average_only_in"}.get(norm, norm)
    if norm == "none":
        return 1.0
    if norm == "expected_average_only_in":
        # SAELens's load_from_disk runs these unscaled; from_pretrained folds a norm_scaling_factor if the cfg has one
        return float(raw.get("norm_scaling_factor") or 1.0)
    raise ScopeError(f"{folder}: normalize_activations {norm!r} has no scope counterpart (scope uses one fixed "
                     f"input scale); 'none' and 'expected_average_only_in' convert")


# --- any folder ------------------------------------------------------------------------------------
def load_any(source: str | Path, device: str | torch.device | None = None) -> Dictionary:
    """A dictionary from any layout scope reads: its own folder, SAELens, Gemma Scope (npz) or Gemma Scope 2."""
    path = Path(source)
    layout = dictionary_layout(path)
    if layout == "scope":
        return load_scope(path, device=device)
    if layout == "saelens":
        return from_saelens(path, device=device)
    return load_gemma_scope(path, device=device)


def dictionary_layout(path: Path) -> str:
    """'scope', 'saelens' or 'gemma-scope' for a dictionary folder or file; ScopeError for anything else."""
    if path.is_dir() and (path / WEIGHTS).exists() and (path / CONFIG).exists():
        return "scope"
    if path.is_dir() and (path / SAELENS_WEIGHTS).exists() and (path / SAELENS_CONFIG).exists():
        return "saelens"
    if (path.is_file() and path.suffix in (".npz", ".safetensors")) or (path.is_dir() and any(
            (path / n).exists() for n in (GEMMA_SCOPE_NPZ, GEMMA_SCOPE_2_WEIGHTS))):
        return "gemma-scope"
    raise ScopeError(f"{str(path)!r} is not a dictionary: expected a folder with {CONFIG} + {WEIGHTS} (scope), "
                     f"{SAELENS_CONFIG} + {SAELENS_WEIGHTS} (SAELens), or {GEMMA_SCOPE_NPZ} / "
                     f"{GEMMA_SCOPE_2_WEIGHTS} (Gemma Scope)")


def _dictionary_files(folder: Path) -> list[str]:
    """The files of a scope or SAELens dictionary folder that belong on the hub."""
    has = {n for n in (CONFIG, WEIGHTS, SAELENS_WEIGHTS) if (folder / n).is_file()}
    layout = "scope" if {CONFIG, WEIGHTS} <= has else "saelens" if {SAELENS_CONFIG, SAELENS_WEIGHTS} <= has else None
    if layout is None:
        raise ScopeError(f"{str(folder)!r} is not a scope or SAELens dictionary folder (needs {CONFIG} with "
                         f"{WEIGHTS} or {SAELENS_WEIGHTS}); save it with Dictionary.save or to_saelens first")
    names = [CONFIG, WEIGHTS] if layout == "scope" else [SAELENS_CONFIG, SAELENS_WEIGHTS, SAELENS_SPARSITY]
    return [n for n in [*names, "README.md"] if (folder / n).exists()]


# --- Hugging Face hub ------------------------------------------------------------------------------
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
    except _hub_errors() as err:
        raise ScopeError(f"could not push {str(folder)!r} to hub repo {where!r} ({_short(err)}); check the repo id, "
                         f"that a write token is set (token= or `hf auth login`) and that the hub is reachable"
                         ) from err
    return str(getattr(info, "commit_url", info))


def pull_from_hub(repo_id: str, path_in_repo: str | None = None, revision: str | None = None, *,
                  token: str | None = None, cache_dir: str | Path | None = None,
                  local_files_only: bool = False) -> Path:
    """Download one dictionary folder of a hub repo into the hub cache; returns its local folder."""
    from huggingface_hub import snapshot_download

    sub = (path_in_repo or "").strip("/")
    try:
        root = snapshot_download(repo_id, revision=revision, allow_patterns=[f"{sub}/*"] if sub else None,
                                 token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    except _hub_errors() as err:
        at = f"{repo_id}/{sub}" + (f"@{revision}" if revision else "")
        raise ScopeError(f"could not pull {at!r} from the Hugging Face hub ({_short(err)}); check the repo id, "
                         f"revision and access, or that it is in the hub cache when offline") from err
    folder = Path(root) / sub
    if not folder.is_dir():
        raise ScopeError(f"hub repo {repo_id!r} has no folder {sub!r}")
    _dictionary_files(folder)
    return folder
