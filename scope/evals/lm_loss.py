"""Language-model loss with a dictionary's reconstruction spliced in at its hook.

The model runs three times on the same held-out context windows: clean, with the hook's
activation replaced by sae(x) ("spliced"), and with it replaced by zeros ("zero-ablated").
From the next-token cross-entropies come delta loss = CE_spliced − CE_clean and
CE loss recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean), plus the mean per-token
KL(clean ‖ spliced). Position 0 (BOS) is left unchanged by default: stores exclude BOS, so the
dictionary never saw it, and its huge norm would dominate the error. The spliced run is
:func:`scope.analysis.splice.spliced`, the splice a notebook uses for feature analysis. A transcoder's
output replaces the activation of the hook it writes (for an MLP transcoder: the MLP's output, with the
MLP's input left alone), and the zero-ablated run zeroes that hook: the MLP ablated.

Sources: Lieberum et al. 2024, "Gemma Scope" (arXiv 2408.05147): delta loss, the increase in
next-token loss when the SAE's reconstruction replaces the activation, as the fidelity measure;
Bricken et al. 2023, "Towards Monosemanticity": loss recovered against a zero-ablation baseline.
See docs/methods/evaluation.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from scope.analysis.splice import check_width, splice_hook, spliced, writes_elsewhere
from scope.data import Window, pad_token_id
from scope.dictionaries.base import Dictionary
from scope.errors import ScopeError
from scope.evals.reconstruction import resolve_hook
from scope.hooks import check_hooks
from scope.models import VOCAB_SLICE, LoadedModel, log_softmax_
from scope.store.reader import ActivationStore
from scope.store.windows import padded_batches, store_windows

Mode = Literal["spliced", "zero"]


@dataclass
class LMLossMetrics:
    """Next-token cross-entropy (nats per token) clean, spliced and zero-ablated, and their ratios."""

    hook: str
    windows: int
    tokens: int  # predicted positions (a target token that is not padding)
    clean_ce: float
    spliced_ce: float
    zero_ce: float
    delta_loss: float  # spliced − clean
    ce_loss_recovered: float  # (zero − spliced) / (zero − clean)
    kl: float  # mean over predicted positions of KL(p_clean ‖ p_spliced)
    splice_bos: bool
    output_hook: str | None = None  # the hook replaced and zero-ablated, where it differs from ``hook`` (transcoders)
    delta_loss_se: float = float("nan")  # standard error of delta_loss, windows as the sampling unit
    window_tokens: list[int] = field(default_factory=list)  # predicted positions per window, in evaluation order
    window_delta: list[float] = field(default_factory=list)  # Σ (spliced − clean) NLL per window: paired comparisons

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ratio_se(sums: Sequence[float], tokens: Sequence[int]) -> float:
    """Standard error of Σ sums / Σ tokens with the windows as independent draws (the delta method for a ratio).

    Tokens within a window are correlated (one document, one context), so a per-token standard error would
    be too small; across windows the per-window excess d_i − R·n_i has mean zero, and
    var(R) ≈ Σ (d_i − R·n_i)² / (W (W − 1) n̄²)."""
    w = len(sums)
    if w < 2 or w != len(tokens):
        return float("nan")
    d, n = torch.tensor(sums, dtype=torch.float64), torch.tensor(tokens, dtype=torch.float64)
    ratio = d.sum() / n.sum()
    return float(((d - ratio * n).pow(2).sum() / (w * (w - 1))).sqrt() / n.mean())


def paired_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[float, float]:
    """(delta loss of ``b`` − delta loss of ``a``, its standard error) from two evaluations on the same windows.

    Both dictionaries see the same tokens, so most of each one's sampling noise cancels in the difference:
    its standard error is far below either delta loss's own. ``a`` and ``b`` are ``LMLossMetrics.to_dict()``
    outputs; they must carry per-window sums over the same windows (the same held-out view and LM tokens).
    """
    if not a.get("window_tokens") or a.get("window_tokens") != b.get("window_tokens"):
        raise ScopeError("paired_difference needs two LM-loss evaluations with per-window sums over the same "
                         "windows (the same held-out documents and lm_tokens); evaluate both again with this scope")
    diff = [y - x for x, y in zip(a["window_delta"], b["window_delta"])]
    return sum(diff) / sum(a["window_tokens"]), ratio_se(diff, a["window_tokens"])


def _replacement(sae: Dictionary, mode: Mode, splice_bos: bool) -> Callable[..., torch.Tensor]:
    """A forward hook that swaps the activation ``[batch, pos, ...]`` for sae(x) (the splice's own) or zeros."""
    if mode == "spliced":
        return splice_hook(sae, splice_bos=splice_bos)

    def hook_fn(x: torch.Tensor, *, hook: Any) -> torch.Tensor:
        flat = x.reshape(*x.shape[:2], -1)
        check_width(flat, sae, hook, output=writes_elsewhere(sae))
        new = torch.zeros_like(flat)
        if not splice_bos:
            new[:, 0] = flat[:, 0]
        return new.reshape(x.shape)

    return hook_fn


def written_hook(sae: Dictionary, hook: str) -> str:
    """The hook a dictionary read at ``hook`` replaces: a transcoder's output hook, else ``hook`` itself."""
    return sae.output_hook if writes_elsewhere(sae) else hook


def _log_probs(model: LoadedModel, toks: torch.Tensor, mask: torch.Tensor,
               hooks: list[tuple[str, Callable[..., torch.Tensor]]]) -> torch.Tensor:
    """Float32 log-probabilities ``[batch, pos, vocab]``, normalised in place to keep one copy."""
    with model.bridge.hooks(fwd_hooks=hooks):
        logits = model.bridge(toks, attention_mask=mask)
    return log_softmax_(logits.float().contiguous())


def _nll_rows(lp: torch.Tensor, toks: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Σ −log p(next token) over each window's kept positions, in float64: ``[batch]``."""
    nll = -lp[:, :-1].gather(-1, toks[:, 1:, None]).squeeze(-1)
    return torch.where(keep, nll.double(), 0.0).sum(-1).cpu()  # where, not a product: nothing from a pad leaks in


def _kl_sum(lp_p: torch.Tensor, lp_q: torch.Tensor, keep: torch.Tensor) -> float:
    """Σ KL(p ‖ q) over the kept positions, a few positions at a time to keep the temporaries in cache."""
    total = 0.0
    for r in range(lp_p.shape[0]):
        slices = zip(lp_p[r, :-1].split(VOCAB_SLICE), lp_q[r, :-1].split(VOCAB_SLICE))
        per_position = torch.cat([(p.exp() * (p - q)).sum(-1) for p, q in slices])
        total += float(torch.where(keep[r], per_position.double(), 0.0).sum())
    return total


@torch.inference_mode()
def lm_losses_on_windows(
    saes: Mapping[str, Dictionary],
    model: LoadedModel,
    windows: Sequence[Window],
    hook: str,
    batch_size: int = 4,
    splice_bos: bool = False,
    progress: bool = True,
) -> dict[str, LMLossMetrics]:
    """Clean, spliced and zero-ablated next-token CE and KL(clean ‖ spliced) for several SAEs at one hook.

    The clean and zero-ablated runs do not depend on the SAE, so a sweep of n dictionaries costs
    n + 2 forward passes per batch instead of 3n. Memory: one batch's log-probabilities for two
    runs at a time (``2 · batch · context · vocab`` floats; 262,144 vocab ⇒ 2 MiB per position),
    whatever the number of windows. The SAEs are moved (in place) to the model's device.
    """
    if batch_size <= 0:
        raise ScopeError(f"batch size must be positive, got {batch_size}")
    if not windows:
        raise ScopeError("no context windows to evaluate the language-model loss on")
    if not saes:
        raise ScopeError("no dictionaries to evaluate the language-model loss of")
    first = next(iter(saes.values()))
    written = {written_hook(s, hook) for s in saes.values()}
    if len(written) != 1:
        raise ScopeError(f"dictionaries read at {hook} but write different hooks {sorted(written)}; evaluate the "
                         "SAEs and the transcoders of a hook in separate calls")
    out_hook = written.pop()
    check_hooks(model, list(dict.fromkeys([hook, out_hook])))
    for sae in saes.values():
        sae.to(model.device)
    pad_id = pad_token_id(model.tokenizer)
    zero = [(out_hook, _replacement(first, "zero", splice_bos))]
    n = clean = zeroed = 0.0
    spliced_nll = dict.fromkeys(saes, 0.0)
    window_tokens: list[int] = []
    window_delta: dict[str, list[float]] = {name: [] for name in saes}
    kl = dict.fromkeys(saes, 0.0)
    bar = tqdm(total=sum(len(w.tokens) for w in windows), desc="lm loss", unit="tok", disable=not progress,
               dynamic_ncols=True)
    for toks, mask in padded_batches(windows, batch_size, pad_id):
        toks, mask = toks.to(model.device), mask.to(model.device)
        # Right padding: a target is real iff its own position is; earlier positions never see pads.
        keep = mask[:, 1:].bool()
        n += float(keep.sum())
        window_tokens += keep.sum(-1).tolist()
        lp_clean = _log_probs(model, toks, mask, [])
        clean_rows = _nll_rows(lp_clean, toks, keep)
        clean += float(clean_rows.sum())
        for name, sae in saes.items():
            with spliced(model, {hook: sae}, splice_bos=splice_bos, record=False):
                lp = _log_probs(model, toks, mask, [])
            rows = _nll_rows(lp, toks, keep)
            spliced_nll[name] += float(rows.sum())
            window_delta[name] += (rows - clean_rows).tolist()
            kl[name] += _kl_sum(lp_clean, lp, keep)
            del lp  # free each spliced copy before the next is made
        del lp_clean
        lp = _log_probs(model, toks, mask, zero)
        zeroed += float(_nll_rows(lp, toks, keep).sum())
        del lp
        bar.update(int(mask.sum()))
    bar.close()
    ce_c, ce_z = clean / n, zeroed / n
    return {name: LMLossMetrics(
        hook=hook, windows=len(windows), tokens=int(n), clean_ce=ce_c, spliced_ce=spliced_nll[name] / n,
        zero_ce=ce_z, delta_loss=spliced_nll[name] / n - ce_c,
        ce_loss_recovered=(ce_z - spliced_nll[name] / n) / (ce_z - ce_c) if ce_z != ce_c else float("nan"),
        kl=kl[name] / n, splice_bos=splice_bos, output_hook=None if out_hook == hook else out_hook,
        delta_loss_se=ratio_se(window_delta[name], window_tokens), window_tokens=window_tokens,
        window_delta=window_delta[name])
        for name in saes}


def lm_loss_on_windows(sae: Dictionary, model: LoadedModel, windows: Sequence[Window], hook: str,
                       batch_size: int = 4, splice_bos: bool = False, progress: bool = True) -> LMLossMetrics:
    """:func:`lm_losses_on_windows` for one SAE."""
    return lm_losses_on_windows({"sae": sae}, model, windows, hook, batch_size, splice_bos, progress)["sae"]


def spliced_lm_losses(
    saes: Mapping[str, Dictionary],
    model: LoadedModel,
    store: ActivationStore,
    hook: str | None = None,
    max_tokens: int = 4096,
    batch_size: int = 4,
    splice_bos: bool | None = None,
    progress: bool = True,
) -> dict[str, LMLossMetrics]:
    """Spliced-in LM loss of SAEs on the documents of a store view (typically its held-out split).

    SAEs at different hooks are run hook by hook. ``splice_bos`` defaults to whether the store kept
    BOS rows (then the dictionaries saw BOS).
    """
    if max_tokens < 2:
        raise ScopeError(f"the language-model loss needs at least 2 tokens, got max_tokens={max_tokens}")
    by_hook: dict[tuple[str, str], dict[str, Dictionary]] = {}  # by (hook read, hook written)
    for name, sae in saes.items():
        h = resolve_hook(sae, store, hook)
        by_hook.setdefault((h, written_hook(sae, h)), {})[name] = sae
    cfg = store.manifest.config
    if cfg.model != model.spec:
        warnings.warn(f"store {store.url!r} was captured from {cfg.model!r}; evaluating on {model.spec!r}",
                      stacklevel=2)
    if splice_bos is None:
        splice_bos = "bos" not in cfg.excluded
    windows = store_windows(store, model.tokenizer, max_tokens)
    out: dict[str, LMLossMetrics] = {}
    for (h, _), group in by_hook.items():
        out.update(lm_losses_on_windows(group, model, windows, h, batch_size=batch_size, splice_bos=splice_bos,
                                        progress=progress))
    return {name: out[name] for name in saes}


def spliced_lm_loss(sae: Dictionary, model: LoadedModel, store: ActivationStore, hook: str | None = None,
                    max_tokens: int = 4096, batch_size: int = 4, splice_bos: bool | None = None,
                    progress: bool = True) -> LMLossMetrics:
    """:func:`spliced_lm_losses` for one SAE."""
    return spliced_lm_losses({"sae": sae}, model, store, hook, max_tokens, batch_size, splice_bos, progress)["sae"]
