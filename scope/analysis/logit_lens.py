"""The logit lens for Gemma: class-embedding projections of every block, from the model or a store.

Two kinds of class: the next token (|C| = the vocabulary; the logit lens proper) or a label set,
where each document's label is mapped to a label word and the class embeddings are the
unembedding rows of those words' first tokens, read through a prompt template ("…\\nTopic:").
See :mod:`scope.analysis.class_embedding` for the metrics and their source.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from scope.analysis.class_embedding import (ClassSpace, DirectionClasses, Identifiability, direction_classes,
                                            memory_agreement, score_sites)
from scope.data import Document, Window, pad_token_id
from scope.errors import ScopeError
from scope.hooks import capture, check_hooks
from scope.models import LoadedModel
from scope.store.reader import ActivationStore
from scope.store.windows import padded_batches

TEMPLATE = "{text}\nTopic:"
Batch = tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor | None]


def gemma_class_space(model: LoadedModel, class_ids: Sequence[int] | None = None,
                      names: Sequence[str] | None = None) -> ClassSpace:
    """The final norm and unembedding of a Gemma bridge (all tokens, or only ``class_ids``), with its soft-cap."""
    weight = model.hf_model.get_output_embeddings().weight.detach()
    if class_ids is not None:
        weight = weight[torch.as_tensor(list(class_ids), device=weight.device)]
    norm = model.bridge.ln_final
    return ClassSpace(norm=lambda h: norm(h), embedding=weight, softcap=model.facts.final_logit_softcap,
                      classes=list(names) if names is not None else None)


def label_word_ids(tokenizer, labels: Sequence[str], words: dict[str, str] | None = None) -> tuple[list[int], list[str]]:
    """First token id of each label's word (" " + the label's first word, lower-cased, unless ``words`` maps it)."""
    words = words or {}
    chosen = [words.get(lab, lab.replace("_", " ").split()[0].lower()) for lab in labels]
    ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in chosen]
    seen: dict[int, str] = {}
    for lab, i in zip(labels, ids):
        if i in seen:
            raise ScopeError(f"labels {seen[i]!r} and {lab!r} map to the same first token "
                             f"{tokenizer.decode([i])!r}; give them distinct words (label_words={{...}})")
        seen[i] = lab
    return ids, chosen


def residual_sites(model: LoadedModel, layers: Sequence[int] | None = None,
                   components: bool = False) -> tuple[list[str], list[str]]:
    """(all sites, the residual chain): the embedding, each block's output and optionally its attn/MLP outputs."""
    n = model.facts.n_layers
    layers = list(range(n)) if layers is None else sorted(set(layers))
    if any(not 0 <= L < n for L in layers):
        raise ScopeError(f"layers {layers} out of range; {model.spec} has layers 0 … {n - 1}")
    chain = ["blocks.0.hook_resid_pre"] + [f"blocks.{L}.hook_resid_post" for L in layers]
    extra = [f"blocks.{L}.{h}" for L in layers for h in ("hook_attn_out", "hook_mlp_out")] if components else []
    return chain + extra, chain


def prompt_windows(tokenizer, documents: Sequence[Document], context: int,
                   template: str = TEMPLATE) -> list[Window]:
    """One window per document: BOS, the text cut to fit, then the template's tail, which is always kept."""
    if "{text}" not in template:
        raise ScopeError(f"the prompt template must contain '{{text}}', got {template!r}")
    head, tail = template.split("{text}", 1)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"] if head else []
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    room = context - 1 - len(head_ids) - len(tail_ids)
    if room < 1:
        raise ScopeError(f"context {context} leaves no room for text after the template {template!r}")
    out = []
    for d in documents:
        body = tokenizer(d.text, add_special_tokens=False)["input_ids"][:room]
        out.append(Window(d.doc_id, 0, (tokenizer.bos_token_id, *head_ids, *body, *tail_ids)))
    return out


def model_batches(model: LoadedModel, windows: Sequence[Window], sites: Sequence[str],
                  labels: Sequence[int] | None = None, batch_size: int = 4, progress: bool = True) -> Iterator[Batch]:
    """Representations at every site for the windows' tokens, with targets (next token, or the window's
    label index when ``labels`` is given), window indices and the readout (last-position) mask.

    Position 0 (BOS) is never scored; in next-token mode neither is the last position (no target).
    """
    check_hooks(model, sites)
    pad_id = pad_token_id(model.tokenizer)
    bar = tqdm(total=sum(len(w.tokens) for w in windows), desc="class projection", unit="tok", disable=not progress,
               dynamic_ncols=True)
    for start, (toks, mask) in zip(range(0, len(windows), batch_size), padded_batches(windows, batch_size, pad_id)):
        acts = capture(model, toks, sites, attention_mask=mask)
        keep = mask.bool().clone()
        keep[:, 0] = False
        lengths = mask.sum(1)
        last = torch.zeros_like(keep)
        last[torch.arange(len(toks)), lengths - 1] = True
        if labels is None:
            keep[torch.arange(len(toks)), lengths - 1] = False
            target = torch.roll(toks, -1, 1)[keep]
            readout = None
        else:
            lab = torch.tensor([labels[start + r] for r in range(len(toks))])
            target = lab[:, None].expand_as(toks)[keep]
            readout = last[keep]
        ids = (torch.arange(start, start + len(toks))[:, None].expand_as(toks))[keep]
        reps = {s: acts[s][keep.to(acts[s].device)].float() for s in sites}
        yield reps, target, ids, readout
        bar.update(int(mask.sum()))
    bar.close()


def store_batches(store: ActivationStore, sites: Sequence[str], labels: dict[str, int] | None = None,
                  max_rows: int | None = None, batch_size: int = 4096) -> tuple[Iterator[Batch], int]:
    """Batches from a store's rows in order: next-token targets from the following row of the same
    window (rows without one are skipped), or each row's document label. Returns them and the input count."""
    for s in sites:
        store.check_hook(s)
    docs = store.documents
    index = {d: i for i, d in enumerate(sorted(docs))}
    label_of = {d: labels[lab] for d, (lab, _) in docs.items() if labels is not None and lab in labels}

    def gen() -> Iterator[Batch]:
        seen = 0
        for b in store.rows(list(sites), batch_size=batch_size, shuffle=False, dtype=torch.float32):
            if labels is None:
                # The target of row i is row i+1's token when that row is the next position of the same document.
                nxt = (b.doc_id[1:] == b.doc_id[:-1]) & (b.position[1:] == b.position[:-1] + 1)
                keep = torch.cat([nxt, torch.zeros(1, dtype=torch.bool)])
            else:
                keep = torch.tensor([int(d) in label_of for d in b.doc_id.tolist()], dtype=torch.bool)
            if max_rows is not None:
                keep &= torch.cumsum(keep.long(), 0) <= max(0, max_rows - seen)
            if labels is None:
                target = torch.roll(b.token_id.long(), -1)[keep]
            else:
                target = torch.tensor([label_of[int(d)] for d in b.doc_id[keep].tolist()], dtype=torch.long)
            seen += int(keep.sum())
            ids = torch.tensor([index[int(d)] for d in b.doc_id[keep].tolist()], dtype=torch.long)
            yield {s: b.acts[s][keep].reshape(int(keep.sum()), -1) for s in sites}, target, ids, None
            if max_rows is not None and seen >= max_rows:
                return

    return gen(), len(index)


def lens_identifiability(model: LoadedModel, windows: Sequence[Window], labels: Sequence[int] | None = None,
                         space: ClassSpace | None = None, layers: Sequence[int] | None = None,
                         components: bool = False, batch_size: int = 4, progress: bool = True) -> Identifiability:
    """Identifiability of the next token (or of each window's label) at every block of the model."""
    if not windows:
        raise ScopeError("no text to project: the corpus or store gave no windows")
    if labels is not None and len(labels) != len(windows):
        raise ScopeError(f"{len(labels)} labels for {len(windows)} windows")
    space = space or gemma_class_space(model)
    sites, chain = residual_sites(model, layers, components)
    batches = model_batches(model, windows, sites, labels, batch_size, progress)
    return score_sites(space, batches, sites, chain, len(windows), "next-token" if labels is None else "labels")


@torch.no_grad()
def mlp_value_vectors(model: LoadedModel, layer: int) -> torch.Tensor:
    """The MLP's value vectors ``[d_mlp, d_model]``: the columns of its output (down) projection."""
    mlp = model.hf_model.model.layers[layer].mlp
    down = getattr(mlp, "down_proj", None)
    if down is None:
        raise ScopeError(f"layer {layer} of {model.spec} has no MLP down_proj to read value vectors from")
    return down.weight.detach().T


@torch.no_grad()
def attention_value_vectors(model: LoadedModel, layer: int) -> torch.Tensor:
    """The attention output projection's columns ``[heads · d_head, d_model]`` as value vectors."""
    return model.hf_model.model.layers[layer].self_attn.o_proj.weight.detach().T


@dataclass
class MemoryReport:
    """Per layer: the MLP value vectors' top classes and their agreement with the tokens' true classes."""

    layers: list[int]
    agreement: list[float]
    top_classes: dict[int, DirectionClasses]


def mlp_memories(model: LoadedModel, windows: Sequence[Window], space: ClassSpace, layers: Sequence[int],
                 labels: Sequence[int] | None = None, k: int = 10, class_top: int = 5,
                 batch_size: int = 4) -> MemoryReport:
    """Top classes of every MLP value vector and the agreement rate of each token's ``k`` most
    activated memories (by a_i·‖v_i‖) with its true class (among a memory's ``class_top`` classes)."""
    values = {L: mlp_value_vectors(model, L) for L in layers}
    tops = {L: direction_classes(space, v, k=class_top) for L, v in values.items()}
    norms = {L: v.norm(dim=1).cpu() for L, v in values.items()}
    sites = [f"blocks.{L}.mlp.hook_post" for L in layers]
    hits = {L: 0.0 for L in layers}
    n = 0
    for reps, target, _, _ in model_batches(model, windows, sites, labels, batch_size, progress=False):
        for L, s in zip(layers, sites):
            hits[L] += memory_agreement(reps[s].cpu(), tops[L].top_ids, target, norms[L], k) * len(target)
        n += len(target)
    return MemoryReport(list(layers), [hits[L] / max(n, 1) for L in layers], tops)


def feature_tokens(model: LoadedModel, decoder: torch.Tensor, k: int = 10,
                   features: Sequence[int] | None = None, bins: int = 0) -> list[dict]:
    """Top and bottom tokens of dictionary features: decoder rows ``[d_sae, d_model]`` through the
    final norm onto the unembedding (the logit effects a feature dashboard shows); with ``bins``, also a
    histogram of the effect over the whole vocabulary."""
    if decoder.ndim != 2 or decoder.shape[1] != model.facts.d_model:
        raise ScopeError(f"decoder of shape {tuple(decoder.shape)} does not fit {model.spec} "
                         f"(d_model {model.facts.d_model}); pass W_dec [d_sae, d_model]")
    idx = list(range(decoder.shape[0])) if features is None else list(features)
    found = direction_classes(gemma_class_space(model), decoder[idx].detach(), k=k, bins=bins)

    def names(ids: list[int]) -> list[str]:
        return [model.tokenizer.decode([i]) for i in ids]

    return [{"feature": f, **found.named(i, names)} for i, f in enumerate(idx)]
