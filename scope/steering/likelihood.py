"""log p(y | x) of responses under the model (with whatever hooks are active), summed per row.

The unembedding (262k × 640 for Gemma 3 270M) is most of a forward pass, so it is applied only at
the positions that predict a response token: the final-norm hidden states come from the model's
body (``hf_model.model``, whose blocks are the bridge's, so its hooks fire), the rows that predict
response tokens are gathered, and only those go through ``lm_head`` (and Gemma 2's final logit
soft-cap, where the config has one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from scope.data import pad_token_id
from scope.errors import ScopeError
from scope.models import LoadedModel


@dataclass
class Packed:
    """BOS + prompt + response per row, right-padded; ``target[i, t]`` marks t+1 as a response token."""

    tokens: torch.Tensor  # [batch, pos]
    mask: torch.Tensor  # [batch, pos] attention mask
    target: torch.Tensor  # [batch, pos - 1] bool

    @property
    def lengths(self) -> torch.Tensor:
        """Response tokens per row, |y|."""
        return self.target.sum(-1)


def pack(bos: int, pad: int, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> Packed:
    """Rows of BOS + prompt + response, right-padded (causal attention never sees the padding)."""
    if len(prompts) != len(responses) or not prompts:
        raise ScopeError(f"need as many prompts as responses (and at least one), got {len(prompts)} and {len(responses)}")
    if any(len(r) == 0 for r in responses):
        raise ScopeError("a response has no tokens; log p(y|x) needs at least one response token")
    rows = [[bos, *p, *r] for p, r in zip(prompts, responses)]
    length = max(len(r) for r in rows)
    tokens = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    target = torch.zeros((len(rows), length - 1), dtype=torch.bool)
    for i, (row, p, r) in enumerate(zip(rows, prompts, responses)):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        target[i, len(p) : len(p) + len(r)] = True  # position t predicts token t+1
    return Packed(tokens, mask, target)


def pack_texts(model: LoadedModel, prompts: Sequence[str], responses: Sequence[str]) -> Packed:
    """:func:`pack` for strings, tokenised without special tokens (BOS is added once)."""
    tok = model.tokenizer
    p_ids = tok(list(prompts), add_special_tokens=False)["input_ids"] if any(prompts) else [[] for _ in prompts]
    r_ids = tok(list(responses), add_special_tokens=False)["input_ids"]
    return pack(tok.bos_token_id, pad_token_id(tok), p_ids, r_ids)


def response_logprob(model: LoadedModel, packed: Packed) -> torch.Tensor:
    """Σ_t log p(y_t | x, y_<t) per row, differentiable through any active hooks."""
    hf = model.hf_model
    tokens, mask = packed.tokens.to(model.device), packed.mask.to(model.device)
    target = packed.target.to(model.device)
    hidden = hf.model(input_ids=tokens, attention_mask=mask, use_cache=False).last_hidden_state
    rows, cols = target.nonzero(as_tuple=True)
    logits = hf.lm_head(hidden[rows, cols]).float()
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    # logit of the target minus logsumexp: leaner than a full log_softmax over the vocabulary
    lp = logits.gather(-1, tokens[rows, cols + 1].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return torch.zeros(tokens.shape[0], device=lp.device, dtype=lp.dtype).index_add(0, rows, lp)
