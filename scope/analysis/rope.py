"""RoPE frequency analyses: per-frequency query/key usage, head types, and p-RoPE at inference.

Rotary position encodings rotate each 2-D chunk k of a query or key by the angle
``position · g_k`` with ``g_k = base^(−2k/d_head)`` (radians per token; k = 0 is the highest
frequency). Rotation preserves each chunk's norm, so the mean ‖q^(k)‖ and ‖k^(k)‖ over tokens say
how much each frequency is used whatever the position. Gemma lays chunks out "rotate-half":
chunk k is the pair of dimensions (k, k + d_head/2); the original RoPE interleaves them
(2k, 2k + 1). Local (sliding-window) and global layers of Gemma 2/3 use different bases, so every
figure keeps them apart.

Source: Barbero et al., "Round and Round We Go! What makes Rotary Positional Encodings useful?"
(ICLR 2025, arXiv 2410.06205): §4 (Gemma 7B uses the lowest frequencies most in q and k), §5
(diagonal and previous-token heads are built from the highest frequencies), §6 and Table 2
(p-RoPE: rotate only the highest fraction p of frequencies). See docs/methods/rope.md.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm
from transformer_lens.model_bridge.exceptions import StopAtLayerException

from scope.data import Window, pad_token_id
from scope.errors import ScopeError
from scope.hooks import check_hooks
from scope.models import LoadedModel, ModelFacts
from scope.store.reader import ActivationStore
from scope.store.windows import padded_batches

Layout = Literal["half", "interleaved"]
Where = Literal["local", "global", "all"]
Drop = Literal["lowest", "highest"]
HEAD_TYPES = ("diagonal", "previous", "first")
# A head is of a type when, on average over query positions >= 2, at least this much of its
# attention goes to that key: a majority for "first" (sink heads put nearly everything on BOS),
# less for diagonal and previous-token heads, which also spend mass on the sink.
THRESHOLDS = {"diagonal": 0.3, "previous": 0.3, "first": 0.5}
_HF_TYPE = {"local": "sliding_attention", "global": "full_attention"}
_STORE_HOOK = re.compile(r"^blocks\.(\d+)\.attn\.hook_(rot_q|rot_k|v|q|k)$")


# --- frequencies ------------------------------------------------------------------------------
def inv_freq_from_facts(facts: ModelFacts, kind: str) -> torch.Tensor:
    """g_k = base^(−2k/d_head) for a layer type, divided by a linear RoPE-scaling factor if any."""
    half = facts.d_head // 2
    g = facts.rope_base[kind] ** (-torch.arange(half, dtype=torch.float64) * 2 / facts.d_head)
    scaling = facts.rope_scaling.get(kind) or {}
    if scaling.get("rope_type", "linear") == "linear" and "factor" in scaling:
        g = g / float(scaling["factor"])
    return g


def rotary_inv_freq(model: LoadedModel, kind: str) -> torch.Tensor:
    """The inverse frequencies (rad/token) the model's own rotary module uses for a layer type."""
    rotary = getattr(model.hf_model.model, "rotary_emb", None) if hasattr(model.hf_model, "model") else None
    for name in (f"{_HF_TYPE[kind]}_inv_freq", "inv_freq"):
        buf = getattr(rotary, name, None) if rotary is not None else None
        if isinstance(buf, torch.Tensor):
            return buf.detach().double().cpu()
    return inv_freq_from_facts(model.facts, kind)  # a model without a rotary module of that layout


def chunk_norms(x: torch.Tensor, layout: Layout = "half") -> torch.Tensor:
    """Per-chunk L2 norms ``[..., d/2]`` of vectors ``[..., d]`` in the given RoPE layout."""
    d = x.shape[-1]
    if d % 2:
        raise ScopeError(f"RoPE chunks need an even head dimension, got {d}")
    if layout == "half":
        a, b = x[..., : d // 2], x[..., d // 2 :]
    elif layout == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        raise ScopeError(f"unknown RoPE layout {layout!r}; use 'half' (Gemma, Llama) or 'interleaved' (GPT-J)")
    return torch.sqrt(a.float() ** 2 + b.float() ** 2)


def band_shares(profile: torch.Tensor, bands: int = 4) -> torch.Tensor:
    """Share of a per-frequency profile ``[..., K]`` in each of ``bands`` equal bands, highest first."""
    parts = profile.double().tensor_split(bands, dim=-1)
    sums = torch.stack([p.sum(-1) for p in parts], -1)
    return sums / sums.sum(-1, keepdim=True).clamp_min(1e-30)


# --- accumulation -----------------------------------------------------------------------------
@dataclass
class _Sums:
    """Running sums of per-chunk norms ``[layer, head, K]`` and of the rows behind them."""

    n_layers: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: int = 0

    def add(self, tensor: str, layer_slot: int, x: torch.Tensor, layout: Layout = "half") -> None:
        norms = chunk_norms(x, layout).double().sum(0)  # x: [rows, heads, d_head]
        if tensor not in self.sums:
            self.sums[tensor] = torch.zeros(self.n_layers, *norms.shape, dtype=torch.float64)
        self.sums[tensor][layer_slot] += norms.cpu()


@dataclass
class FrequencyUsage:
    """Mean per-frequency chunk norms of q, k and v per layer and head, with the frequency axes."""

    model: str
    layers: list[int]
    layer_types: list[str]
    inv_freq: dict[str, list[float]]  # radians per token, keyed by layer type
    q: torch.Tensor  # [layers, query heads, d_head/2]
    k: torch.Tensor  # [layers, kv heads, d_head/2]
    v: torch.Tensor  # [layers, kv heads, d_head/2]; no rotation: the control
    tokens: int
    source: str  # "model" or the store the rows came from
    layout: Layout = "half"

    def band_shares(self, tensor: str = "q", bands: int = 4) -> torch.Tensor:
        """Share of each tensor's per-frequency norm in ``bands`` bands (highest frequency first)."""
        return band_shares(getattr(self, tensor), bands)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("q", "k", "v")}
        for t in ("q", "k", "v"):
            out[t] = getattr(self, t).tolist()
            out[f"{t}_band_shares"] = self.band_shares(t).mean(1).tolist()  # per layer, mean over heads
        return out


@dataclass
class HeadScores:
    """Mean attention on self, on the previous token and on the first token per layer and head."""

    layers: list[int]
    scores: dict[str, torch.Tensor]  # type -> [layers, heads]
    queries: int
    thresholds: dict[str, float] = field(default_factory=lambda: dict(THRESHOLDS))

    def classify(self) -> list[dict[str, Any]]:
        """Every (layer, head) whose score passes a type's threshold, highest score first."""
        found = []
        for kind in HEAD_TYPES:
            s = self.scores[kind]
            for li, h in (s >= self.thresholds[kind]).nonzero().tolist():
                found.append({"layer": self.layers[li], "head": h, "type": kind, "score": float(s[li, h])})
        return sorted(found, key=lambda r: (r["type"], -r["score"]))

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "queries": self.queries, "thresholds": self.thresholds,
                "scores": {k: v.tolist() for k, v in self.scores.items()}, "heads": self.classify()}


def head_scores(pattern: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Summed diagonal, previous-token and first-token attention ``[3, heads]`` over queries >= 2.

    ``pattern`` is ``[batch, head, query, key]``; queries 0 and 1 are skipped because there the
    first token is also the query itself or its predecessor. Returns the sums and the query count.
    """
    b, h, n, _ = pattern.shape
    if n < 3:
        return torch.zeros(3, h, dtype=torch.float64), 0
    valid = torch.ones(b, n, dtype=torch.bool, device=pattern.device) if mask is None else mask.bool()
    valid = valid.clone()
    valid[:, :2] = False
    idx = torch.arange(n, device=pattern.device)
    diag = pattern[:, :, idx, idx]
    prev = torch.cat([torch.zeros_like(diag[..., :1]), pattern[:, :, idx[1:], idx[:-1]]], -1)
    first = pattern[:, :, :, 0]
    w = valid[:, None, :].to(pattern.dtype)
    sums = torch.stack([(s * w).sum((0, 2)) for s in (diag, prev, first)]).double().cpu()
    return sums, int(valid.sum())


# --- one pass over the model ------------------------------------------------------------------
def rope_hooks(model: LoadedModel, layers: Sequence[int] | None = None, patterns: bool = False) -> list[str]:
    """The hook points the analysis reads: post-RoPE q and k, v, and optionally attention patterns."""
    layers = _layers(model, layers)
    kinds = ["hook_rot_q", "hook_rot_k", "hook_v"] + (["hook_pattern"] if patterns else [])
    return [f"blocks.{L}.attn.{k}" for L in layers for k in kinds]


def _layers(model: LoadedModel, layers: Sequence[int] | None) -> list[int]:
    n = model.facts.n_layers
    layers = list(range(n)) if layers is None else sorted(set(int(L) for L in layers))
    bad = [L for L in layers if not 0 <= L < n]
    if bad or not layers:
        raise ScopeError(f"layer(s) {bad or layers} out of range; {model.spec} has layers 0 … {n - 1}")
    return layers


@torch.inference_mode()
def analyze_windows(
    model: LoadedModel,
    windows: Sequence[Window],
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    frequencies: bool = True,
    heads: bool = True,
    progress: bool = True,
) -> tuple[FrequencyUsage | None, HeadScores | None]:
    """Frequency usage and head scores from forward passes over text, stopped after the last layer.

    Position 0 (BOS) and padding are left out of the frequency means: the store leaves BOS out
    too, and its q/k are unlike any other token's.
    """
    if not windows:
        raise ScopeError("no text to analyse: the corpus or store gave no context windows")
    layers = _layers(model, layers)
    slot = {L: i for i, L in enumerate(layers)}
    names = check_hooks(model, rope_hooks(model, layers, patterns=heads))
    if not frequencies:
        names = [n for n in names if n.endswith("hook_pattern")]
    sums, scores, queries = _Sums(len(layers)), torch.zeros(3, len(layers), model.facts.n_heads, dtype=torch.float64), 0
    state: dict[str, Any] = {}

    def make(name: str):
        # Bound per name: the bridge reports aliased names (blocks.L.attn.v.hook_out) on the hook.
        L, kind = int(name.split(".")[1]), name.rsplit(".", 1)[-1]

        def hook_fn(x: torch.Tensor, *, hook: Any) -> torch.Tensor:
            if kind == "hook_pattern":
                s, q = head_scores(x.float(), state["mask"])
                scores[:, slot[L]] += s
                state["queries"] = q
            else:
                tensor = {"hook_rot_q": "q", "hook_rot_k": "k", "hook_v": "v"}[kind]
                sums.add(tensor, slot[L], x[state["keep"]])
            state["fired"] += 1
            if state["fired"] == len(names):
                raise StopAtLayerException(x)
            return x

        return hook_fn

    pad_id = pad_token_id(model.tokenizer)
    bar = tqdm(total=sum(len(w.tokens) for w in windows), desc="rope analysis", unit="tok",
               disable=not progress, dynamic_ncols=True)
    with model.bridge.hooks(fwd_hooks=[(n, make(n)) for n in names]):
        for toks, mask in padded_batches(windows, batch_size, pad_id):
            toks, mask = toks.to(model.device), mask.to(model.device)
            keep = mask.bool().clone()
            keep[:, 0] = False
            state.update(mask=mask, keep=keep, fired=0, queries=0)
            model.bridge(toks, attention_mask=mask, return_type=None)  # the bridge catches the early stop
            sums.rows += int(keep.sum())
            queries += state["queries"]
            bar.update(int(mask.sum()))
    bar.close()
    usage = _usage(model, layers, sums, "model") if frequencies else None
    hs = HeadScores(layers, {k: scores[i] / max(queries, 1) for i, k in enumerate(HEAD_TYPES)}, queries) if heads else None
    return usage, hs


def _usage(model: LoadedModel, layers: list[int], sums: _Sums, source: str) -> FrequencyUsage:
    if sums.rows == 0:
        raise ScopeError("no token positions to average over (every window held only BOS?)")
    kinds = sorted({model.facts.layer_types[L] for L in layers})
    return FrequencyUsage(
        model=model.spec, layers=layers, layer_types=[model.facts.layer_types[L] for L in layers],
        inv_freq={k: rotary_inv_freq(model, k).tolist() for k in kinds},
        q=(sums.sums["q"] / sums.rows).float(), k=(sums.sums["k"] / sums.rows).float(),
        v=(sums.sums["v"] / sums.rows).float(), tokens=sums.rows, source=source,
    )


def store_rope_hooks(store: ActivationStore) -> dict[int, dict[str, str]]:
    """Per layer, the store's hooks that hold q, k and v (post-RoPE q/k preferred)."""
    found: dict[int, dict[str, str]] = {}
    for name in store.hooks:
        m = _STORE_HOOK.match(name)
        if m:
            tensor = m.group(2).removeprefix("rot_")
            if m.group(2).startswith("rot_") or tensor not in found.get(int(m.group(1)), {}):
                found.setdefault(int(m.group(1)), {})[tensor] = name
    return {L: h for L, h in sorted(found.items()) if set(h) == {"q", "k", "v"}}


def frequency_usage_from_store(model: LoadedModel, store: ActivationStore, max_rows: int | None = None,
                               batch_size: int = 4096, progress: bool = True) -> FrequencyUsage:
    """Frequency usage from q/k/v rows already in a store (captured with :func:`rope_hooks`)."""
    per_layer = store_rope_hooks(store)
    if not per_layer:
        raise ScopeError(f"store {store.url!r} holds no per-head q, k and v of any layer (it has "
                         f"{sorted(store.hooks)}); capture them with `scope cache --hooks "
                         f"{','.join(rope_hooks(model, [0]))},…` or analyse with --corpus instead")
    layers = list(per_layer)
    slot = {L: i for i, L in enumerate(layers)}
    names = [h for L in layers for h in per_layer[L].values()]
    d_head = model.facts.d_head
    sums = _Sums(len(layers))
    total = len(store) if max_rows is None else min(len(store), max_rows)
    bar = tqdm(total=total, desc="rope from store", unit="row", disable=not progress, dynamic_ncols=True)
    for batch in store.rows(names, batch_size=batch_size, shuffle=False, dtype=torch.float32):
        take = min(len(batch.token_id), total - sums.rows)
        for L in layers:
            for tensor, name in per_layer[L].items():
                x = batch.acts[name][:take].reshape(take, -1, d_head)
                sums.add(tensor, slot[L], x)
        sums.rows += take
        bar.update(take)
        if sums.rows >= total:
            break
    bar.close()
    return _usage(model, layers, sums, store.url)


# --- p-RoPE -----------------------------------------------------------------------------------
def dropped_chunks(n_chunks: int, p: float, drop: Drop = "lowest") -> torch.Tensor:
    """Chunk indices given zero rotation when only a fraction ``p`` of frequencies keeps rotating.

    ``drop="lowest"`` is the paper's p-RoPE (keep the highest frequencies, k < round(p·K));
    ``drop="highest"`` is the reversed variant (keep the lowest).
    """
    if not 0.0 <= p <= 1.0:
        raise ScopeError(f"p-RoPE fraction p must lie in [0, 1], got {p}")
    if drop not in ("lowest", "highest"):
        raise ScopeError(f"unknown p-RoPE variant drop={drop!r}; use 'lowest' (p-RoPE) or 'highest' (reversed)")
    keep = round(p * n_chunks)
    return torch.arange(keep, n_chunks) if drop == "lowest" else torch.arange(0, n_chunks - keep)


def _layers_of(facts: ModelFacts, where: Where) -> list[int]:
    if where not in ("local", "global", "all"):
        raise ScopeError(f"unknown layer set {where!r} for p-RoPE; use 'local', 'global' or 'all'")
    return [L for L, t in enumerate(facts.layer_types) if where == "all" or t == where]


@contextlib.contextmanager
def p_rope(model: LoadedModel, p: float, where: Where = "all", drop: Drop = "lowest") -> Iterator[list[int]]:
    """Within the block, rotate only a fraction ``p`` of RoPE frequencies in the chosen layers.

    Hooks on each attention layer's cos/sin (``blocks.L.attn.hook_cos|hook_sin``, the values the
    model's own rotary module produced) set the dropped chunks to cos = 1, sin = 0: zero
    rotation, and attention itself runs unchanged. Yields the affected layers.
    """
    layers = _layers_of(model.facts, where)
    half = model.facts.d_head // 2
    chunks = dropped_chunks(half, p, drop)
    dims = torch.cat([chunks, chunks + half])  # rotate-half: chunk k is dimensions k and k + d/2

    def cos_fn(x: torch.Tensor, *, hook: Any) -> torch.Tensor:
        x = x.clone()
        x[..., dims.to(x.device)] = 1.0
        return x

    def sin_fn(x: torch.Tensor, *, hook: Any) -> torch.Tensor:
        x = x.clone()
        x[..., dims.to(x.device)] = 0.0
        return x

    hooks = [(f"blocks.{L}.attn.hook_{t}", fn) for L in layers for t, fn in (("cos", cos_fn), ("sin", sin_fn))]
    check_hooks(model, [h for h, _ in hooks] or ["blocks.0.attn.hook_cos"])
    if not len(chunks) or not layers:
        yield layers
        return
    with model.bridge.hooks(fwd_hooks=hooks):
        yield layers


@torch.inference_mode()
def next_token_loss(model: LoadedModel, windows: Sequence[Window], batch_size: int = 2) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats) over the windows and the number of predicted tokens."""
    pad_id = pad_token_id(model.tokenizer)
    total, n = 0.0, 0
    for toks, mask in padded_batches(windows, batch_size, pad_id):
        toks, mask = toks.to(model.device), mask.to(model.device)
        logits = model.bridge(toks, attention_mask=mask)
        keep = mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), toks[:, 1:][keep], reduction="sum")
        total += float(nll)
        n += int(keep.sum())
    return total / max(n, 1), n


@dataclass
class PRopeResult:
    """Held-out cross-entropy of one p-RoPE setting and its change against unmodified RoPE."""

    p: float
    where: str
    drop: str
    ce: float
    delta: float


def p_rope_sweep(
    model: LoadedModel,
    windows: Sequence[Window],
    ps: Sequence[float] = (1.0, 0.75, 0.5, 0.25, 0.0),
    wheres: Sequence[Where] = ("local", "global", "all"),
    drops: Sequence[Drop] = ("lowest", "highest"),
    batch_size: int = 2,
    progress: bool = True,
) -> tuple[float, list[PRopeResult]]:
    """Held-out CE for every (p, layer set, variant); settings that are the same model run once."""
    base, _ = next_token_loss(model, windows, batch_size)
    settings = []
    for where in wheres:
        if not _layers_of(model.facts, where):
            continue
        for p in ps:
            for drop in drops:
                key = (p, where, "-" if p in (0.0, 1.0) else drop)
                if key not in [s[:3] for s in settings]:
                    settings.append((*key, drop))
    results = []
    for p, where, label, drop in tqdm(settings, desc="p-RoPE", disable=not progress, dynamic_ncols=True):
        if p == 1.0:
            ce = base
        else:
            with p_rope(model, p, where, drop):
                ce, _ = next_token_loss(model, windows, batch_size)
        results.append(PRopeResult(p=p, where=where, drop=label, ce=ce, delta=ce - base))
    return base, results
