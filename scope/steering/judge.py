"""Optional LLM judge through any OpenAI-compatible chat endpoint (off unless configured).

AxBench (arXiv 2501.17148, its steering evaluation and judge-prompt appendix) rates each steered response with three judge
prompts, each answered with a score in {0, 1, 2}: whether the concept is present, whether the
response addresses the instruction, and whether it is fluent. The prompts below ask the same
three questions in our own words and ask for the answer as ``Rating: [[N]]``. Nothing is sent
anywhere unless a URL is given (``--judge-url`` or ``SCOPE_JUDGE_URL``); the key comes from
``SCOPE_JUDGE_API_KEY`` or ``OPENAI_API_KEY``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scope.errors import ScopeError
from scope.steering.scoring import harmonic_mean

PROMPTS = {
    "concept": (
        "You are grading a piece of text for one property only.\n"
        "Property: the text is clearly about, or clearly brings in, this concept: {concept}\n\n"
        "Text:\n{response}\n\n"
        "Give 0 if the concept does not appear at all, 1 if it appears only faintly or in passing, "
        "and 2 if it is plainly present. Think briefly, then end with the line: Rating: [[N]]"),
    "relevance": (
        "You are grading whether a response deals with the request it was given.\n"
        "Request:\n{instruction}\n\nResponse:\n{response}\n\n"
        "Give 0 if the response has nothing to do with the request, 1 if it touches on it but drifts away, "
        "and 2 if it addresses the request. Ignore style and grammar. Think briefly, then end with the line: "
        "Rating: [[N]]"),
    "fluency": (
        "You are grading only how well-formed a piece of text is, not what it says.\n"
        "Text:\n{response}\n\n"
        "Give 0 if it is broken, repetitive or incoherent, 1 if it is understandable but awkward, "
        "and 2 if it reads as natural language. Think briefly, then end with the line: Rating: [[N]]"),
}
_RATING = re.compile(r"Rating:\s*\[\[\s*([0-2](?:\.\d+)?)\s*\]\]")


@dataclass
class Judge:
    """Ratings from a chat model at ``url`` (an OpenAI-compatible ``/chat/completions`` base URL)."""

    url: str
    model: str = "gpt-4o-mini"
    api_key: str | None = None
    timeout: float = 60.0
    transport: object | None = None  # an httpx transport (tests pass a mock)

    @classmethod
    def from_env(cls, url: str | None = None, model: str | None = None) -> "Judge | None":
        """A judge if a URL is given here or in SCOPE_JUDGE_URL, else None (the default: no judge)."""
        url = url or os.environ.get("SCOPE_JUDGE_URL")
        if not url:
            return None
        key = os.environ.get("SCOPE_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        return cls(url=url, model=model or os.environ.get("SCOPE_JUDGE_MODEL", "gpt-4o-mini"), api_key=key)

    def _ask(self, client, prompt: str) -> float:
        import httpx

        try:
            r = client.post(f"{self.url.rstrip('/')}/chat/completions",
                            json={"model": self.model, "temperature": 0,
                                  "messages": [{"role": "user", "content": prompt}]})
            r.raise_for_status()
            text = r.json()["choices"][0]["message"]["content"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as err:
            raise ScopeError(f"judge at {self.url} failed: {err}") from None
        m = _RATING.findall(text)
        return float(m[-1]) if m else 0.0  # an unparseable answer counts as a failed rating

    def rate(self, concept: str, instructions: Sequence[str], responses: Sequence[str],
             suppress: bool = False) -> dict[str, np.ndarray]:
        """Concept, relevance and fluency ratings (0–2) and their harmonic mean, per response."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        out = {k: [] for k in PROMPTS}
        with httpx.Client(timeout=self.timeout, headers=headers, transport=self.transport) as client:
            for inst, resp in zip(instructions, responses):
                for kind, template in PROMPTS.items():
                    out[kind].append(self._ask(client, template.format(concept=concept, instruction=inst,
                                                                       response=resp)))
        s = {k: np.array(v) for k, v in out.items()}
        if suppress:
            s["concept"] = 2 - s["concept"]
        s["harmonic"] = harmonic_mean(s["concept"], s["relevance"], s["fluency"])
        return s
