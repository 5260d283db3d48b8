"""Concept data in the AxBench shape: (concept, instruction x, response y, concept-steered response y^c).

AxBench (Wu et al. 2025, arXiv 2501.17148, its concept datasets) pairs each instruction x with an ordinary response y
and a response y^c that brings in the concept; RePS (arXiv 2505.20809, the training data of its objective) trains on exactly
these triples. Two sources here:

- a JSON-lines file, one object per line with ``concept``, ``instruction``, ``response`` and
  ``steered_response`` (optionally ``"suppress": true`` on rows whose instruction should elicit
  the concept: those become the suppression prompts);
- a labelled corpus, ``CORPUS:LABEL`` such as ``bbc:sport`` or ``wiki:Mathematics``. Documents
  there are "Title\\n\\nBody". The instruction is "Write a short paragraph about {title}." for an
  out-of-concept document, y is the start of that document's body (a genuine answer), and y^c is the
  start of an in-concept document's body: both continue the same prompt, one with the concept.

Documents are split by a stable hash of their id into three disjoint pools: training triples, the
texts the concept classifier (the offline judge) learns from, and the evaluation prompts. Steering
prompts ask about out-of-concept titles; suppression prompts ask about in-concept titles.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scope.data import Document, doc_bucket, open_source
from scope.errors import ScopeError

INSTRUCTION = "Write a short paragraph about {title}.\n\n"
_FIELDS = ("concept", "instruction", "response", "steered_response")
# Fractions of documents (by stable hash) for training, the classifier, and evaluation.
_POOLS = (0.5, 0.8)


@dataclass(frozen=True)
class ConceptExample:
    concept: str
    instruction: str  # x
    response: str  # y: follows x without the concept
    steered_response: str  # y^c: follows x with the concept


@dataclass(frozen=True)
class EvalPrompt:
    instruction: str
    reference: str | None = None  # a genuine answer, when one is known (calibrates relevance)


@dataclass
class ConceptData:
    """Everything one concept needs: training triples, classifier texts and evaluation prompts."""

    concept: str
    train: list[ConceptExample]
    steer_prompts: list[EvalPrompt]
    suppress_prompts: list[EvalPrompt] = field(default_factory=list)
    positives: list[str] = field(default_factory=list)  # in-concept texts for the classifier
    negatives: list[str] = field(default_factory=list)  # out-of-concept texts for the classifier
    source: str = ""

    def summary(self) -> dict:
        return {"concept": self.concept, "source": self.source, "train": len(self.train),
                "steer_prompts": len(self.steer_prompts), "suppress_prompts": len(self.suppress_prompts),
                "classifier_texts": {"positive": len(self.positives), "negative": len(self.negatives)}}

    def to_jsonl(self, path: str | Path) -> None:
        """Write the training triples as JSON lines (the format :func:`load_jsonl` reads)."""
        rows = [json.dumps(asdict(e)) for e in self.train]
        rows += [json.dumps({"concept": self.concept, "instruction": p.instruction, "response": p.reference or "",
                             "steered_response": "", "suppress": True}) for p in self.suppress_prompts]
        Path(path).write_text("\n".join(rows) + "\n", encoding="utf-8")


def pool_of(doc_id: int, seed: int = 0) -> int:
    """Which pool a corpus document falls in: 0 training triples, 1 classifier texts, 2 evaluation prompts."""
    b = doc_bucket(doc_id, seed + 101)
    return 0 if b < _POOLS[0] else 1 if b < _POOLS[1] else 2


def _check(data: ConceptData) -> ConceptData:
    if not data.train:
        raise ScopeError(f"concept {data.concept!r} from {data.source} has no training examples")
    if not data.steer_prompts:
        raise ScopeError(f"concept {data.concept!r} from {data.source} has no evaluation prompts; give it more data")
    for e in data.train:
        if not e.steered_response.strip() or not e.response.strip():
            raise ScopeError(f"concept {data.concept!r}: an example has an empty response or steered response "
                             f"(instruction {e.instruction[:60]!r})")
    return data


def load_jsonl(path: str | Path, concept: str | None = None, seed: int = 0) -> ConceptData:
    """Concept triples from a JSON-lines file; rows are split into training, classifier and evaluation."""
    p = Path(path)
    if not p.is_file():
        raise ScopeError(f"concept file {str(path)!r} does not exist")
    rows: list[dict] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ScopeError(f"{path}:{n} is not valid JSON ({err.msg})") from None
        missing = [k for k in _FIELDS if not isinstance(row.get(k), str)]
        if missing and not row.get("suppress"):
            raise ScopeError(f"{path}:{n} lacks the string field(s) {missing}; each line needs {list(_FIELDS)}")
        rows.append(row)
    names = sorted({r["concept"] for r in rows})
    if concept is None and len(names) == 1:
        concept = names[0]
    if concept is None or concept not in names:
        raise ScopeError(f"{path} holds concepts {names or 'none'}; choose one of them" if names
                         else f"{path} holds no examples")
    rows = [r for r in rows if r["concept"] == concept]
    suppress = [EvalPrompt(r["instruction"]) for r in rows if r.get("suppress")]
    triples = [r for r in rows if not r.get("suppress")]
    train, classifier, evaluation = [], [], []
    for i, r in enumerate(triples):
        b = doc_bucket(i, seed)
        (train if b < _POOLS[0] else classifier if b < _POOLS[1] else evaluation).append(r)
    data = ConceptData(
        concept=concept, source=str(path), suppress_prompts=suppress,
        train=[ConceptExample(concept, r["instruction"], r["response"], r["steered_response"]) for r in train],
        steer_prompts=[EvalPrompt(r["instruction"], r["response"]) for r in evaluation],
        positives=[r["steered_response"] for r in classifier], negatives=[r["response"] for r in classifier])
    return _check(data)


def title_and_body(text: str) -> tuple[str, str]:
    """A document's first line as its title, the rest as its body (the bundled corpora are laid out so)."""
    head, sep, rest = text.strip().partition("\n")
    if not sep or not rest.strip():
        words = text.split()
        return " ".join(words[:8]), text.strip()
    return head.strip().rstrip("."), rest.strip()


def resolve_label(label: str, labels: Sequence[str], corpus: str) -> str:
    """The corpus label a concept names: exact, else the one equal up to case and a plural 's'."""
    if label in labels:
        return label
    norm = label.lower().rstrip("s")
    hits = [lab for lab in labels if lab.lower().rstrip("s") == norm]
    if len(hits) == 1:
        return hits[0]
    raise ScopeError(f"corpus {corpus!r} has no label {label!r}; its labels are {sorted(labels)}")


def parse_concept(spec: str) -> tuple[str, str]:
    """``CORPUS:LABEL`` → (corpus, label)."""
    corpus, sep, label = spec.partition(":")
    if not sep or not corpus or not label:
        raise ScopeError(f"concept {spec!r} must be CORPUS:LABEL (e.g. bbc:sport, wiki:Mathematics) or a .jsonl file")
    return corpus, label


def _clip(tokenizer, text: str, n_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids).strip()


def build_concept(spec: str, tokenizer, n_train: int = 32, n_eval: int = 16, response_tokens: int = 32,
                  n_classifier: int = 64, text_tokens: int = 32, seed: int = 0) -> ConceptData:
    """AxBench-shaped data for ``CORPUS:LABEL`` from a labelled corpus (see the module docstring).

    Training responses are ``response_tokens`` long; classifier texts and the reference answers of
    evaluation prompts are ``text_tokens`` long, like the generations they are compared with.
    """
    corpus, label = parse_concept(spec)
    if min(n_train, n_eval, response_tokens, n_classifier) <= 0:
        raise ScopeError(f"n_train, n_eval, response_tokens and n_classifier must be positive, got "
                         f"{n_train}, {n_eval}, {response_tokens}, {n_classifier}")
    source = open_source(corpus)
    docs = [d for d in source.documents(seed) if d.label is not None and d.text.strip()]
    labels = sorted({d.label for d in docs})
    if len(labels) < 2:
        raise ScopeError(f"corpus {corpus!r} needs documents of at least two labels to build a concept; "
                         f"it has {labels or 'no labels'}")
    label = resolve_label(label, labels, corpus)
    pools: dict[tuple[int, bool], list[Document]] = {(k, c): [] for k in range(3) for c in (True, False)}
    for d in docs:
        pools[(pool_of(d.doc_id, seed), d.label == label)].append(d)
    need = {(0, True): n_train, (0, False): n_train, (2, True): n_eval, (2, False): n_eval}
    for (k, inside), n in need.items():
        if len(pools[(k, inside)]) < n:
            raise ScopeError(f"concept {spec!r}: only {len(pools[(k, inside)])} {'in' if inside else 'out-of'}-concept "
                             f"documents in the {('training', 'classifier', 'evaluation')[k]} pool, {n} needed; "
                             "ask for fewer examples")
    rng = random.Random(seed)
    concept = f"{corpus}:{label}"
    train = []
    for out_doc, in_doc in zip(pools[(0, False)][:n_train], pools[(0, True)][:n_train]):
        title, body = title_and_body(out_doc.text)
        train.append(ConceptExample(concept, INSTRUCTION.format(title=title), _clip(tokenizer, body, response_tokens),
                                    _clip(tokenizer, title_and_body(in_doc.text)[1], response_tokens)))
    rng.shuffle(train)

    def prompts(group: list[Document]) -> list[EvalPrompt]:
        out = []
        for d in group[:n_eval]:
            title, body = title_and_body(d.text)
            out.append(EvalPrompt(INSTRUCTION.format(title=title), _clip(tokenizer, body, text_tokens)))
        return out

    half = n_classifier // 2
    positives = [_clip(tokenizer, title_and_body(d.text)[1], text_tokens) for d in pools[(1, True)][:half]]
    negatives = [_clip(tokenizer, title_and_body(d.text)[1], text_tokens) for d in pools[(1, False)][:half]]
    data = ConceptData(concept=concept, train=train, steer_prompts=prompts(pools[(2, False)]),
                       suppress_prompts=prompts(pools[(2, True)]), positives=positives, negatives=negatives,
                       source=f"{corpus} (fingerprint {source.fingerprint})")
    return _check(data)


def load_concept(spec: str, tokenizer, **kwargs) -> ConceptData:
    """A concept from a ``.jsonl`` file or a ``CORPUS:LABEL`` of a labelled corpus."""
    if spec.endswith(".jsonl") or Path(spec).is_file():
        return load_jsonl(spec, seed=kwargs.get("seed", 0))
    return build_concept(spec, tokenizer, **kwargs)
