"""The SAELens folder layout, read (6.x and older) and written (6.x).

SAELens 6.x: ``cfg.json`` (``architecture`` jumprelu/standard/topk, ``d_in``, ``d_sae``, ``dtype``, ``device``,
``apply_b_dec_to_input``, ``normalize_activations``, ``metadata`` with ``hook_name``/``model_name``) plus
``sae_weights.safetensors``. Kind mapping: jumprelu ↔ jumprelu, relu ↔ standard, topk (exact) ↔ topk;
topk (batch) exports as jumprelu with its one inference threshold on every latent, as SAELens saves BatchTopK.
Transcoders (``d_out`` and ``metadata.hook_name_out`` beside ``hook_name``): a JumpReLU (or BatchTopK) transcoder
↔ ``jumprelu_transcoder``, with a skip connection ↔ ``jumprelu_skip_transcoder``; SAELens's ReLU ``transcoder`` and
``skip_transcoder`` import as JumpReLU transcoders with θ = 0 (the same map). SAELens keeps ``W_skip`` as
``[d_out, d_in]`` and adds x · W_skipᵀ; scope keeps it ``[d_in, d_out]``, so it is transposed both ways.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from scope.dictionaries.base import Dictionary
from scope.dictionaries.interop.tensors import SAE_KEYS, assemble, relu_threshold
from scope.dictionaries.transcoder import JumpReLUTranscoderConfig
from scope.errors import ScopeError

SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SPARSITY = "sparsity.safetensors"
# The cfg.json layout written here is SAELens 6's; SAELens reads configs without a version >= 6 as legacy ones.
SAELENS_LAYOUT_VERSION = "6.0.0"
_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def to_saelens(sae: Dictionary, folder: str | Path) -> Path:
    """Write ``sae`` in the SAELens 6.x layout (``cfg.json`` + ``sae_weights.safetensors``), input scale folded."""
    arch, fields, tensors = _saelens_form(sae)
    cfg = {
        "architecture": arch, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
        "dtype": _DTYPES.get(sae.W_enc.dtype, "float32"), "device": "cpu",
        "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
        **({"d_out": sae.cfg.d_out} if sae.kind == "transcoder" else {}),
        # scope folds its one input scale into the weights, so SAELens needs no normalisation of its own
        "normalize_activations": "none", **fields,
        # SAELens feeds hook_z SAEs [..., heads, d_head] and flattens them itself; scope's take [..., heads·d_head]
        "reshape_activations": "hook_z" if (sae.cfg.hook or "").endswith("hook_z") else "none",
        "metadata": {
            "sae_lens_version": SAELENS_LAYOUT_VERSION, "sae_lens_training_version": None,
            "model_name": sae.cfg.model, "hook_name": sae.cfg.hook, "hook_head_index": None,
            **({"hook_name_out": sae.output_hook} if sae.kind == "transcoder" else {}),
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
    tensors = {k: sd[k] for k in SAE_KEYS}
    kind, selection = sae.kind, getattr(sae.cfg, "selection", None)
    if kind == "transcoder" and sae.cfg.activation in ("jumprelu", "batchtopk"):
        theta = sd["threshold"].float().expand(sae.cfg.d_sae).clone()  # BatchTopK: its one inference threshold
        skip = {"W_skip": sd["W_skip"].T.contiguous()} if sae.cfg.skip else {}
        return f"jumprelu{'_skip' if sae.cfg.skip else ''}_transcoder", {}, {**tensors, "threshold": theta, **skip}
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
    if kind == "transcoder":
        what = f"{sae.cfg.activation} transcoder"
    raise ScopeError(f"a {what} dictionary has no SAELens counterpart; these convert: jumprelu, relu (-> standard), "
                     f"topk with selection 'exact' (-> topk) or 'batch' (-> jumprelu), and jumprelu or batchtopk "
                     f"transcoders (-> jumprelu_transcoder, jumprelu_skip_transcoder)")


def from_saelens(folder: str | Path, device: str | torch.device | None = None) -> Dictionary:
    """A scope dictionary from a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``, 6.x or older)."""
    folder = Path(folder)
    if not (folder / SAELENS_CONFIG).exists() or not (folder / SAELENS_WEIGHTS).exists():
        raise ScopeError(f"{str(folder)!r} is not a SAELens folder (needs {SAELENS_CONFIG} and {SAELENS_WEIGHTS})")
    raw = json.loads((folder / SAELENS_CONFIG).read_text())
    tensors = load_file(str(folder / SAELENS_WEIGHTS))
    _drop_unit_scaling_factor(tensors, folder)
    cfg, tensors = _scope_form(raw, tensors, folder)
    sae = assemble(cfg, tensors, str(folder), input_scale=_saelens_input_scale(raw, folder))
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
    if arch in _TRANSCODERS:
        return _scope_transcoder(raw, meta, arch, base, tensors, folder)
    if arch == "jumprelu":
        kind, fields = "jumprelu", {}
        if "threshold" not in tensors:
            raise ScopeError(f"{folder}: jumprelu weights lack 'threshold'; found {sorted(tensors)}")
        tensors = {**tensors, "threshold": relu_threshold(tensors["threshold"])}
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
                         f"jumprelu, standard (-> relu), topk, {', '.join(_TRANSCODERS)}")
    cfg = {**_scope_only_fields(meta, kind), **base, **fields, "kind": kind}
    return cfg, tensors


_TRANSCODERS = ("jumprelu_transcoder", "jumprelu_skip_transcoder", "transcoder", "skip_transcoder")


def _scope_transcoder(raw: dict[str, Any], meta: dict[str, Any], arch: str, base: dict[str, Any],
                      tensors: dict[str, torch.Tensor], folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A SAELens transcoder as a scope JumpReLU transcoder (a ReLU one is JumpReLU with θ = 0)."""
    skip = "skip" in arch
    if skip != ("W_skip" in tensors):
        raise ScopeError(f"{folder}: architecture {arch!r} {'needs' if skip else 'has no'} W_skip; found {sorted(tensors)}")
    tensors = dict(tensors)
    if arch.startswith("jumprelu"):
        if "threshold" not in tensors:
            raise ScopeError(f"{folder}: {arch} weights lack 'threshold'; found {sorted(tensors)}")
        tensors["threshold"] = relu_threshold(tensors["threshold"])
    else:
        tensors["threshold"] = torch.zeros(int(raw["d_sae"]))
    if skip:
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()  # SAELens [d_out, d_in] -> scope [d_in, d_out]
    out_hook = meta.get("hook_name_out") or raw.get("hook_name_out")
    d_out = int(raw.get("d_out") or tensors["W_dec"].shape[1])
    if base["apply_b_dec_to_input"] and "apply_b_dec_to_input" in raw:
        raise ScopeError(f"{folder}: a transcoder with apply_b_dec_to_input true has no scope counterpart (its b_dec "
                         f"lives at the output site)")
    # a BatchTopK transcoder's scope-only fields (aux_k, ...) do not belong to the JumpReLU transcoder it exported as
    own = {k: v for k, v in _scope_only_fields(meta, "transcoder").items() if k in JumpReLUTranscoderConfig.model_fields}
    cfg = {**own, **base, "apply_b_dec_to_input": False, "kind": "transcoder",
           "activation": "jumprelu", "d_out": d_out, "skip": skip, "output_hook": out_hook}
    return cfg, tensors


def _scope_only_fields(meta: dict[str, Any], kind: str) -> dict[str, Any]:
    """Training fields a scope export left in metadata.scope_config (SAELens has no place for them)."""
    saved = meta.get("scope_config")
    if not isinstance(saved, dict) or saved.get("kind") != kind:
        return {}
    owned = {"kind", "d_in", "d_sae", "apply_b_dec_to_input", "hook", "model", "k", "selection", "activation",
             "d_out", "skip", "output_hook"}
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
