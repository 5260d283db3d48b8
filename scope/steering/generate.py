"""Sampling continuations of prompts, in batches, with whatever steering hooks are active.

Generation runs through transformers' ``generate`` on the model inside the bridge (its blocks are
the bridge's, so hooks fire at every decoding step) with a KV cache and left padding. The
sampling seed is fixed per batch, so two runs that differ only in the intervention draw the same
random numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from scope.data import pad_token_id
from scope.errors import ScopeError
from scope.models import LoadedModel
from scope.steering.interventions import row_interventions


@dataclass
class RowSteer:
    """One intervention per prompt: Φ_null where ``null[i]``, else h + ``alpha[i]``·w (α = 0: unchanged)."""

    hook: str
    w: torch.Tensor
    b: float
    alpha: torch.Tensor  # [prompts]
    null: torch.Tensor  # [prompts] bool


def check_sampling(max_new_tokens: int, temperature: float, batch_size: int, top_k: int = 50) -> None:
    """Refuse sampling settings that :func:`generate` cannot use (callers check before loading a model)."""
    if max_new_tokens <= 0 or batch_size <= 0:
        raise ScopeError(f"max_new_tokens and batch_size must be positive, got {max_new_tokens} and {batch_size}")
    if not 0 <= temperature < math.inf or top_k <= 0:  # written so that NaN fails too
        raise ScopeError(f"need a finite temperature >= 0 and top_k > 0, got {temperature} and {top_k}")


@torch.no_grad()
def generate(model: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 32, temperature: float = 0.7,
             top_k: int = 50, seed: int = 0, batch_size: int = 16, rows: RowSteer | None = None,
             progress=None) -> list[str]:
    """The sampled continuation (prompt excluded) of each prompt; temperature 0 is greedy.

    Sampling keeps the ``top_k`` most likely tokens (top-k needs a partial selection over the
    262k-token vocabulary per step; nucleus sampling would need a full sort, several times slower
    on a CPU).

    ``rows`` steers each prompt its own way (many steering factors in one batch: decoding on a CPU
    is bound by reading the weights, so a bigger batch costs little more per step).
    """
    check_sampling(max_new_tokens, temperature, batch_size, top_k)
    if rows is not None and not torch.isfinite(rows.alpha).all():  # sampling would fail deep inside transformers
        bad = rows.alpha[~torch.isfinite(rows.alpha)][0].item()
        raise ScopeError(f"steering factor α {bad} is not a finite number; use a finite one such as 1")
    if not prompts:
        raise ScopeError("no prompts to generate from")
    if rows is not None and not len(rows.alpha) == len(rows.null) == len(prompts):
        raise ScopeError(f"need one steering setting per prompt, got {len(rows.alpha)} for {len(prompts)} prompts")
    tok = model.tokenizer
    pad = pad_token_id(tok)
    out: list[str] = []
    for a in range(0, len(prompts), batch_size):
        ids = tok(list(prompts[a : a + batch_size]), add_special_tokens=False)["input_ids"]
        length = max(len(i) for i in ids) + 1
        tokens = torch.full((len(ids), length), pad, dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for r, row in enumerate(ids):  # left padding: every row's last prompt token is at the same place
            tokens[r, length - len(row) - 1 :] = torch.tensor([tok.bos_token_id, *row])
            mask[r, length - len(row) - 1 :] = 1
        torch.manual_seed(seed + a)
        sample = {"do_sample": True, "temperature": temperature, "top_k": top_k} if temperature > 0 else {"do_sample": False}
        ctx = nullcontext() if rows is None else row_interventions(
            model, rows.hook, rows.w.to(model.device), torch.tensor(rows.b, device=model.device),
            rows.alpha[a : a + batch_size], rows.null[a : a + batch_size])
        with ctx:
            seqs = model.hf_model.generate(input_ids=tokens.to(model.device), attention_mask=mask.to(model.device),
                                           max_new_tokens=max_new_tokens, pad_token_id=pad, **sample)
        out += [tok.decode(s[length:], skip_special_tokens=True) for s in seqs]
        if progress is not None:
            progress.update(len(ids))
    return out
