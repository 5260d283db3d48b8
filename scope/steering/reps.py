"""RePS: reference-free, bidirectional preference training of a rank-1 steering vector; and the LM baseline.

Source: Wu et al. 2025, "Improved Representation Steering for Language Models" (arXiv 2505.20809),
its training objective (the Δ⁺/Δ⁻ likelihood differences and β weights). For a triple (x, y, y^c), with log p summed over response tokens and |y| the
response length:

- weights from the frozen, unsteered model p (the only use of a reference model):
  β⁺ = max(log p(y|x) − log p(y^c|x), 1) and β⁻ = max(log p(y^c|x) − log p(y|x), 1);
- positive (steering) preference, with α⁺ drawn per example from a factor set:
  Δ⁺ = (β⁺/|y^c|) log p_Φ(y^c|x; α⁺) − (1/|y|) log p_Φ(y|x; α⁺);
- negative (null-out) preference:
  Δ⁻ = (β⁻/|y|) log p_Φ(y|x; null) − (1/|y^c|) log p_Φ(y^c|x; null);
- L = −log σ(Δ⁺) − log σ(Δ⁻), minimised over the steering parameters (w, b) only.

The baseline "LM objective" (the supervised steering vector of AxBench and of RePS's comparison) maximises
(1/|y^c|) log p_Φ(y^c|x; α⁺) with the same factor sampling; it has no null-out term, so its b is
left at the centred value below (c = 0).

Parametrisation (ours): w = r·u and b = r²·c − μ·w with u, c trained, r the layer's centred RMS
norm and μ the layer's mean activation over the training tokens. The scale makes Adam's step size
mean the same at any layer and in any model; the −μ·w offset starts null-out at "remove what lies
above the mean along w" rather than "remove the whole positive projection", which on Gemma
(whose residual stream carries a large constant offset) would delete the offset itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from scope.errors import ScopeError, validation_summary
from scope.files import read_json
from scope.models import LoadedModel, frozen_weights
from scope.steering.concepts import ConceptData, ConceptExample
from scope.steering.interventions import resid_hook, row_interventions
from scope.steering.likelihood import pack, response_logprob
from scope.data import pad_token_id
from scope.steering.vector import SteeringVector
from scope.store.fs import replace_folder

CHECKPOINT = "checkpoint"
CONFIG = "steer_config.json"
METRICS = "metrics.jsonl"


class SteerConfig(BaseModel):
    """How a steering vector is made; a run folder holds one config and refuses another."""

    # inf passes gt=0, and an infinite lr trains a NaN vector without a word
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = "gemma-3-270m"
    concept: str
    layer: int = 6
    method: Literal["reps", "lm", "diffmean", "feature"] = "reps"
    n_train: int = Field(32, gt=0)
    n_eval: int = Field(16, gt=1)
    response_tokens: int = Field(32, gt=0)
    epochs: int = Field(3, gt=0)
    batch_size: int = Field(4, gt=0)
    lr: float = Field(0.01, gt=0)
    factors: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    init_norm: float = Field(0.1, gt=0)  # ‖u‖ at the start, in units of the layer scale r
    seed: int = 0
    dtype: str | None = None
    store: str | None = None  # DiffMean's activation store
    max_rows: int | None = Field(None, gt=0)  # DiffMean: rows read from the store (default all)
    sae: str | None = None  # a feature vector's dictionary folder (scope steer from-feature)
    feature: int | None = None  # and its feature

    @field_validator("factors")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if not v or any(not math.isfinite(a) or a <= 0 for a in v):
            raise ValueError(f"factors must be positive numbers, got {v}")
        return v

    @model_validator(mode="after")
    def _store_only_where_read(self) -> "SteerConfig":
        # RePS and the LM objective train on generated text and never open a store: a store or max_rows given to
        # them would be saved in the run's config as if it had shaped the vector.
        if self.method in ("reps", "lm"):
            for key in ("store", "max_rows"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} {getattr(self, key)!r} is read only by the diffmean and feature methods, "
                                     f"and this one is {self.method!r}, which would ignore it; leave {key} "
                                     f"(--{key.replace('_', '-')}) out")
        return self

    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


def reps_loss(steer_yc: torch.Tensor, steer_y: torch.Tensor, null_y: torch.Tensor, null_yc: torch.Tensor,
              ref_y: torch.Tensor, ref_yc: torch.Tensor, len_y: torch.Tensor, len_yc: torch.Tensor) -> torch.Tensor:
    """Per-example RePS loss −log σ(Δ⁺) − log σ(Δ⁻) (arXiv 2505.20809) from summed log-probs."""
    beta_pos = (ref_y - ref_yc).clamp_min(1.0)
    beta_neg = (ref_yc - ref_y).clamp_min(1.0)
    len_y, len_yc = len_y.to(steer_y.dtype), len_yc.to(steer_y.dtype)
    delta_pos = beta_pos / len_yc * steer_yc - steer_y / len_y
    delta_neg = beta_neg / len_y * null_y - null_yc / len_yc
    return -torch.nn.functional.logsigmoid(delta_pos) - torch.nn.functional.logsigmoid(delta_neg)


def lm_loss(steer_yc: torch.Tensor, len_yc: torch.Tensor) -> torch.Tensor:
    """Per-example LM-objective loss −(1/|y^c|) log p_Φ(y^c|x; α⁺)."""
    return -steer_yc / len_yc.to(steer_yc.dtype)


@dataclass
class Tokenized:
    x: list[list[int]]
    y: list[list[int]]
    yc: list[list[int]]


def tokenize(model: LoadedModel, examples: list[ConceptExample]) -> Tokenized:
    tok = model.tokenizer

    def ids(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False)["input_ids"]

    t = Tokenized(ids([e.instruction for e in examples]), ids([e.response for e in examples]),
                  ids([e.steered_response for e in examples]))
    if any(not r for r in t.y + t.yc):
        raise ScopeError("a training response tokenises to nothing; every y and y^c needs text")
    return t


@torch.no_grad()
def reference_logprobs(model: LoadedModel, t: Tokenized, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y|x) and log p(y^c|x) under the frozen, unsteered model (for β⁺ and β⁻)."""
    bos, pad = model.tokenizer.bos_token_id, pad_token_id(model.tokenizer)
    out = []
    for ys in (t.y, t.yc):
        parts = [response_logprob(model, pack(bos, pad, t.x[a : a + batch_size], ys[a : a + batch_size])).float().cpu()
                 for a in range(0, len(ys), batch_size)]
        out.append(torch.cat(parts))
    return out[0], out[1]


@torch.no_grad()
def layer_stats(model: LoadedModel, t: Tokenized, layer: int) -> tuple[float, torch.Tensor]:
    """(r, μ): centred RMS norm sqrt(E‖h − μ‖²) and mean μ of the residual after ``layer`` over the training tokens."""
    rows = [x + y for x, y in zip(t.x, t.y)] + [x + yc for x, yc in zip(t.x, t.yc)]
    from scope.hooks import capture

    hook = resid_hook(layer)
    acts = []
    for a in range(0, len(rows), 8):
        p = pack(model.tokenizer.bos_token_id, pad_token_id(model.tokenizer), [[] for _ in rows[a : a + 8]], rows[a : a + 8])
        h = capture(model, p.tokens, [hook], attention_mask=p.mask)[hook].float().cpu()
        keep = p.mask.bool().clone()
        keep[:, 0] = False
        acts.append(h[keep])
    h = torch.cat(acts).double()
    mu = h.mean(0)
    return float(((h - mu) ** 2).sum(-1).mean().sqrt()), mu.float()


def _step_loss(model: LoadedModel, cfg: SteerConfig, t: Tokenized, idx: list[int], alpha: torch.Tensor,
               ref: tuple[torch.Tensor, torch.Tensor], w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    bos, pad = model.tokenizer.bos_token_id, pad_token_id(model.tokenizer)
    hook = resid_hook(cfg.layer)
    x = [t.x[i] for i in idx]
    y, yc = [t.y[i] for i in idx], [t.yc[i] for i in idx]
    len_y = torch.tensor([len(r) for r in y], device=model.device)
    len_yc = torch.tensor([len(r) for r in yc], device=model.device)
    n = len(idx)
    if cfg.method == "lm":
        with row_interventions(model, hook, w, b, alpha, torch.zeros(n, dtype=torch.bool)):
            lp = response_logprob(model, pack(bos, pad, x, yc))
        return lm_loss(lp, len_yc).mean()
    # Rows: steered y^c, steered y, nulled y, nulled y^c — one forward for all four.
    p = pack(bos, pad, x * 4, yc + y + y + yc)
    alphas = torch.cat([alpha, alpha, torch.zeros(2 * n)])
    null = torch.tensor([False] * (2 * n) + [True] * (2 * n))
    with row_interventions(model, hook, w, b, alphas, null):
        lp = response_logprob(model, p)
    s_yc, s_y, n_y, n_yc = lp.split(n)
    ref_y, ref_yc = (r[idx].to(lp.device) for r in ref)
    return reps_loss(s_yc, s_y, n_y, n_yc, ref_y, ref_yc, len_y, len_yc).mean()


def _save_checkpoint(out: Path, cfg: SteerConfig, u: torch.Tensor, c: torch.Tensor, opt: torch.optim.Optimizer,
                     step: int) -> None:
    tensors = {"u": u.detach().cpu().contiguous(), "c": c.detach().cpu().reshape(1).contiguous()}
    for name, p in (("u", u), ("c", c)):
        for key, val in opt.state.get(p, {}).items():
            tensors[f"adam/{name}/{key}"] = torch.as_tensor(val).detach().cpu().reshape(-1).contiguous()

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "config": cfg.digest()}))

    replace_folder(out, CHECKPOINT, fill)


def _load_checkpoint(out: Path, u: torch.Tensor, c: torch.Tensor, opt: torch.optim.Optimizer) -> int:
    folder = out / CHECKPOINT
    if not (folder / "state.json").is_file():
        return 0
    t = load_file(str(folder / "state.safetensors"))
    with torch.no_grad():
        u.copy_(t["u"])
        c.copy_(t["c"].reshape(c.shape))
    for name, p in (("u", u), ("c", c)):
        state = {k.rsplit("/", 1)[1]: (v.reshape(p.shape) if not k.endswith("/step") else v.reshape(()))
                 for k, v in t.items() if k.startswith(f"adam/{name}/")}
        if state:
            opt.state[p] = state
    return int(json.loads((folder / "state.json").read_text())["step"])


def read_config(folder: str | Path, advice: str = "make the run again into a new folder with `scope steer train`"
                ) -> SteerConfig:
    """The config of a steering run folder, or a ScopeError naming its file and what is wrong with it."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise ScopeError(f"{str(folder)!r} is not a steering run folder (no {CONFIG}); make one with `scope steer train`")
    data = read_json(path, advice)
    try:
        return SteerConfig.model_validate(data)
    except ValidationError as err:
        raise ScopeError(f"{path} is not a readable steering config ({validation_summary(err)}); {advice}") from None


def claim_run(out: str | Path, cfg: SteerConfig) -> Path:
    """Create the run folder with ``steer_config.json``, or check that it holds the same config."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG
    if path.exists():
        # Compared as configs, so a folder written before a field existed takes that field's default.
        old = read_config(out, "choose another --out").model_dump()
        if old != cfg.model_dump():
            diff = sorted(k for k in set(old) | set(cfg.model_dump()) if old.get(k) != cfg.model_dump().get(k))
            raise ScopeError(f"{str(out)!r} holds a steering run with a different config (differs in {diff}); "
                             "use the same flags to resume, or choose another --out")
    else:
        tmp = out / f".{CONFIG}.tmp"
        tmp.write_text(cfg.model_dump_json(indent=1))
        tmp.replace(path)
    return out


def train_vector(model: LoadedModel, data: ConceptData, cfg: SteerConfig, out: str | Path | None = None,
                 progress: bool = True) -> SteeringVector:
    """Train a rank-1 steering vector with RePS or the LM objective; resumes from ``out`` if it holds a checkpoint."""
    if cfg.method not in ("reps", "lm"):
        raise ScopeError(f"train_vector trains 'reps' or 'lm' vectors, not {cfg.method!r} (DiffMean is computed)")
    if not 0 <= cfg.layer < model.facts.n_layers:
        raise ScopeError(f"layer {cfg.layer} is outside 0..{model.facts.n_layers - 1} of {model.spec}")
    examples = data.train[: cfg.n_train]
    t = tokenize(model, examples)
    ref = reference_logprobs(model, t)
    r, mu = layer_stats(model, t, cfg.layer)
    mu = mu.to(model.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    u = torch.nn.Parameter(torch.randn(model.facts.d_model, generator=gen) * cfg.init_norm / math.sqrt(model.facts.d_model))
    c = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.Adam([u, c], lr=cfg.lr)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    folder = claim_run(out, cfg) if out is not None else None
    start = _load_checkpoint(folder, u, c, opt) if folder is not None else 0
    bar = tqdm(total=total, initial=start, desc=f"{cfg.method} {data.concept} L{cfg.layer}", unit="step",
               disable=not progress, dynamic_ncols=True)
    t0, last = time.time(), {}
    with frozen_weights(model):
        for step in range(start, total):
            epoch, k = divmod(step, steps_per_epoch)
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed + 1000 * epoch)).tolist()
            idx = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
            rng = random.Random(cfg.seed * 7919 + step)
            alpha = torch.tensor([rng.choice(cfg.factors) for _ in idx], dtype=torch.float32)
            w = (r * u).to(model.device)
            b = (r * r * c).to(model.device) - mu @ w  # centred: at c = 0 only what lies above the mean is nulled
            loss = _step_loss(model, cfg, t, idx, alpha, ref, w, b)
            opt.zero_grad()
            loss.backward()
            opt.step()
            last = {"step": step + 1, "loss": float(loss.detach()), "norm_over_scale": float(u.detach().norm()),
                    "b_over_scale2": float(c.detach()), "seconds": round(time.time() - t0, 1)}
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.3f}", norm=f"{last['norm_over_scale']:.2f}")
            if folder is not None:
                with (folder / METRICS).open("a") as f:
                    f.write(json.dumps(last) + "\n")
                if (step + 1) % 5 == 0 or step + 1 == total:
                    _save_checkpoint(folder, cfg, u, c, opt, step + 1)
    bar.close()
    if not last and folder is not None and (folder / METRICS).is_file():  # resumed a finished run
        lines = (folder / METRICS).read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    w_final = (r * u.detach()).float()
    b_val = float((r * r * c.detach() if cfg.method == "reps" else 0.0) - mu.cpu() @ w_final)
    beta_pos = (ref[0] - ref[1]).clamp_min(1.0)
    vec = SteeringVector(w=w_final, b=b_val, hook=resid_hook(cfg.layer), model=model.spec,
                         concept=data.concept, method=cfg.method, scale=r, factors=list(cfg.factors),
                         info={"steps": total, "examples": len(examples), "final": last,
                               "mean_beta_pos": float(beta_pos.mean())})
    if folder is not None:
        vec.save(folder)
    return vec
