"""A short KL + MSE fine-tune of a trained SAE with its reconstruction spliced into the model.

An SAE trained on stored activations minimises the reconstruction error, but it is judged by how much the
model's next-token predictions change when its reconstruction replaces the activation (delta loss). The
fine-tune trains on that directly for a few steps: each step runs the model clean, then again with the SAE
spliced in at its hook, and descends

    loss = KL(p_clean ‖ p_spliced) + α · FVU(x̂, x)

over the batch's predicted positions, where FVU is the batch's squared error over its variance. By default
(``train: decoder``) only W_dec and b_dec move (where the encoder subtracts b_dec from its input, b_enc takes
up each step of b_dec so that the pre-activations stay put): the codes, hence every latent's firing pattern and
the L0, stay as trained (up to float rounding), so a fine-tuned SAE compares with another at the same L0. ``train: all`` moves the
encoder too (a JumpReLU's thresholds stay fixed; L0 may drift and is reported). With ``threshold_lr`` a JumpReLU's
thresholds θ train as well, through training's kernel pseudo-derivatives (Rajamanoharan et al. 2024, arXiv
2407.14435), and Gemma Scope 2's quadratic penalty λ (L0/target_l0 − 1)² holds the L0 (it moves θ alone).

α balances the two terms' scales: unless set, it is fixed at the first step so that α · FVU equals the KL
there (both measured before any update). Positions the evaluation leaves alone are left alone here too:
BOS unless the store kept it, and padding. Only SAEs are fine-tuned (a transcoder writes another hook).

Sources: Karvonen 2025, "Revisiting End-To-End Sparse Autoencoder Training: A Short Finetune Is All You
Need" (arXiv 2503.17272): a KL + MSE phase over the last few percent of training narrows the CE gap of
TopK and ReLU SAEs by 20-50 %, and several fine-tunes (KL, LoRA, linear adapters) give similar,
non-additive gains; Braun et al. 2024, "Identifying Functionally Important Features with End-to-End
Sparse Dictionary Learning" (arXiv 2405.12241): training SAEs on the KL of the spliced model. The balancing
rule for α and the decoder-only default are scope's choices. See docs/methods/jumprelu.md.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import save_file
from tqdm.auto import tqdm

from scope.data import pad_token_id
from scope.dictionaries.base import Dictionary
from scope.dictionaries.jumprelu import quadratic_l0_penalty
from scope.errors import ScopeError
from scope.files import read_json, read_safetensors
from scope.hooks import check_hooks
from scope.models import VOCAB_SLICE, LoadedModel, frozen_weights, log_softmax_
from scope.store import ActivationStore
from scope.store.fs import replace_folder
from scope.store.windows import padded_batches, store_windows
from scope.training.logging import METRICS

CHECKPOINT = "finetune-checkpoint"
SAVED = "sae"


class FinetuneSettings(BaseModel):
    """How long and how hard to fine-tune; the defaults suit a 4k-16k SAE on Gemma 3 270M on a CPU."""

    # inf passes gt=0, and an infinite lr fine-tunes to NaN weights without a word
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    tokens: int = Field(32_768, gt=0, description="LM tokens (context-window positions) to fine-tune on")
    batch_windows: int = Field(4, gt=0, description="context windows per step")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate, decayed linearly to 0 over the run")
    train: Literal["decoder", "all"] = Field("decoder", description="decoder: W_dec and b_dec only (codes and L0 "
                                                                   "unchanged); all: the encoder as well")
    mse_weight: float | None = Field(None, ge=0, description="α on the FVU term (default: KL / FVU at step 0)")
    held_out: float = Field(0.1, gt=0, lt=1, description="the store's held-out fraction: its documents are never used")
    seed: int = 0
    checkpoint_every: int = Field(10, gt=0, description="steps between checkpoints")
    threshold_lr: float = Field(0.0, ge=0, description="a JumpReLU's thresholds θ: their Adam learning rate through "
                                "training's pseudo-derivatives, with an L0 penalty (0: θ fixed); needs train=all")
    target_l0: float | None = Field(None, gt=0, description="the L0 that penalty holds (default: the SAE's "
                                    "target_l0, else its L0 at the first step)")
    l0_coeff: float = Field(10.0, ge=0, description="λ of that penalty, λ (L0/target_l0 − 1)²")

    @model_validator(mode="after")
    def _thresholds_with_encoder(self) -> "FinetuneSettings":
        if self.threshold_lr and self.train != "all":
            raise ValueError(f"threshold_lr {self.threshold_lr:g} trains the thresholds with the encoder, so it "
                             f"needs train 'all'; got train {self.train!r}")
        penalty_set = self.target_l0 is not None or self.l0_coeff != type(self).model_fields["l0_coeff"].default
        if penalty_set and not self.threshold_lr:
            raise ValueError("target_l0 and l0_coeff shape the L0 penalty of a threshold fine-tune; set "
                             "threshold_lr above 0 (e.g. 1e-4, with train 'all') or leave them out")
        return self


# Settings added after the first fine-tunes: left out of the fingerprint at their defaults, so that those resume
ADDED_SETTINGS = ("threshold_lr", "target_l0", "l0_coeff")


@dataclass
class FinetuneResult:
    """What a fine-tune did: its length, α, and the batch KL and FVU at its start and end."""

    path: str
    steps: int
    tokens: int
    mse_weight: float
    kl_start: float
    kl_end: float
    fvu_start: float
    fvu_end: float
    l0_start: float
    l0_end: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fingerprint(sae: Dictionary, settings: FinetuneSettings, store: ActivationStore) -> str:
    """Identifies a fine-tune: the starting weights, the settings and the store (a resume must match all three)."""
    at_default = {k for k in ADDED_SETTINGS if getattr(settings, k) == FinetuneSettings.model_fields[k].default}
    h = hashlib.sha256(settings.model_dump_json(exclude=at_default).encode()
                       + store.manifest.config.model_dump_json().encode())
    for k, v in sorted(sae.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def trained_parameters(sae: Dictionary, train: str) -> list[torch.nn.Parameter]:
    """The parameters a fine-tune moves at its learning rate: the decoder alone, or every one but a JumpReLU's
    thresholds (which, if they move, have their own)."""
    named = dict(sae.named_parameters())
    if train == "decoder":
        return [named[k] for k in ("W_dec", "b_dec") if k in named]
    return [p for k, p in named.items() if "threshold" not in k]


def _target_l0(sae: Dictionary, s: FinetuneSettings) -> float | None:
    """The L0 a threshold fine-tune holds: the settings', else the SAE's own target (None: its L0 at step 0)."""
    return s.target_l0 or getattr(sae.cfg, "target_l0", None)


def _param_groups(sae: Dictionary, s: FinetuneSettings) -> list[dict]:
    groups = [{"params": trained_parameters(sae, s.train), "base_lr": s.lr}]
    if s.threshold_lr:
        if not hasattr(sae, "trainable_codes"):
            raise ScopeError(f"threshold_lr {s.threshold_lr} trains a JumpReLU's thresholds; this SAE is "
                             f"{sae.cfg.kind}, which has none: leave threshold_lr at 0")
        target = _target_l0(sae, s)
        if target is not None and not 0 < target < sae.cfg.d_sae:
            raise ScopeError(f"target_l0 {target:g} is not a reachable L0 for an SAE of d_sae {sae.cfg.d_sae}: "
                             f"pass one in (0, {sae.cfg.d_sae})")
        groups.append({"params": [sae.trained_threshold()], "base_lr": s.threshold_lr})
    return [{**g, "lr": g["base_lr"]} for g in groups]


@torch.no_grad()
def unfold_input_scale(sae: Dictionary) -> None:
    """Give a saved SAE (scale folded into its weights) an input scale that makes its decoder rows about unit norm.

    Adam moves every weight by about ``lr`` per step whatever its size, and a saved SAE's weights are in the raw
    residual stream's units (decoder rows of norm ~3,600 on Gemma 3 270M's layer 6), so a learning rate picked in
    training's units would not move them. The outputs do not change; saving folds the scale back in."""
    if float(sae.input_scale) != 1.0:
        return  # already in training units
    c = 1.0 / sae.W_dec.norm(dim=1).median().clamp_min(1e-12)
    sae.W_enc.div_(c)
    sae.W_dec.mul_(c)
    sae.b_dec.mul_(c)
    sae.input_scale.fill_(c)


@torch.no_grad()
def _keep_encoder(sae: Dictionary, b_dec_before: torch.Tensor) -> None:
    """Undo a b_dec step's effect on an encoder that subtracts b_dec from its input: z = (x − b_dec) W_enc + b_enc
    stays the same when b_enc takes up (b_dec_new − b_dec_old) W_enc, so the codes do not move."""
    sae.b_enc.add_((sae.b_dec - b_dec_before) @ sae.W_enc)


def _logits(model: LoadedModel, toks: torch.Tensor, mask: torch.Tensor,
            hooks: list[tuple[str, Callable[..., torch.Tensor]]]) -> torch.Tensor:
    with model.bridge.hooks(fwd_hooks=hooks):
        return model.bridge(toks, attention_mask=mask).float()


class _KLToClean(torch.autograd.Function):
    """Σₖ wₖ KL(p_k ‖ softmax(zₖ)) over predicted positions k, computed and differentiated a few at a time.

    The gradient with respect to the logits is wₖ (softmax(zₖ) − p_k), since p_k sums to one.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, lp_clean: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for z, lp, w in zip(*(t.split(VOCAB_SLICE) for t in (logits, lp_clean, weight))):
            total += ((lp.exp() * (lp - z.log_softmax(-1))).sum(-1).double() * w).sum()
        ctx.save_for_backward(logits, lp_clean, weight)
        return total.float()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, lp_clean, weight = ctx.saved_tensors
        out = torch.empty_like(logits)
        for g, z, lp, w in zip(*(t.split(VOCAB_SLICE) for t in (out, logits, lp_clean, weight))):
            torch.mul(z.softmax(-1) - lp.exp(), (w * grad)[:, None], out=g)
        return out, None, None


def _mean_kl(logits: torch.Tensor, lp_clean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean KL(clean ‖ spliced) over the kept predicted positions (``keep``: ``[batch, pos − 1]``)."""
    # Every position, the last of each window at weight 0: [batch · pos, vocab] is then a view, not a copy.
    weight = torch.nn.functional.pad(keep / keep.sum(), (0, 1)).reshape(-1).to(logits.dtype)
    vocab = logits.shape[-1]
    return _KLToClean.apply(logits.reshape(-1, vocab), lp_clean.reshape(-1, vocab), weight)


def _step_loss(sae: Dictionary, model: LoadedModel, hook: str, toks: torch.Tensor, mask: torch.Tensor,
               splice_bos: bool, train: str, thresholds: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean KL over predicted positions, the batch's FVU, L0) of one batch; the first two carry gradients, and
    with ``thresholds`` the codes and the L0 carry θ's pseudo-derivatives (JumpReLU.trainable_codes)."""
    keep = mask[:, 1:].bool()  # a target is real iff its own position is (right padding)
    spliced = mask.bool().clone()
    if not splice_bos:
        spliced[:, 0] = False
    with torch.no_grad():
        lp_clean = log_softmax_(_logits(model, toks, mask, []))
    seen: dict[str, torch.Tensor] = {}

    def replace(act: torch.Tensor, *, hook: Any) -> torch.Tensor:
        flat = act.reshape(*act.shape[:2], -1)
        x = flat[spliced]
        l0 = None
        if train == "decoder":
            with torch.no_grad():
                u, norms = sae.prepare(x)
                codes = sae.encode_prepared(u)
            x_hat = sae.decode_with_input(codes, x, norms)
        elif thresholds:
            u, norms = sae.prepare(x)
            codes, l0 = sae.trainable_codes(sae.pre_acts(u))
            x_hat = sae.decode_with_input(codes, x, norms)
        else:
            codes, x_hat = sae.reconstruct(x)
        if l0 is None:
            l0 = (codes.detach() != 0).sum(-1).float().mean()
        seen.update(x=x, x_hat=x_hat, l0=l0)
        out = flat.clone()
        out[spliced] = x_hat.to(flat.dtype)
        return out.reshape(act.shape)

    kl = _mean_kl(_logits(model, toks, mask, [(hook, replace)]), lp_clean, keep)
    x, x_hat = seen["x"].float(), seen["x_hat"].float()
    fvu = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    return kl, fvu, seen["l0"]


def _windows(store: ActivationStore, model: LoadedModel, settings: FinetuneSettings) -> list:
    """The training documents' context windows in a seeded order, as many as the fine-tune needs."""
    train_view = store.split(settings.held_out, seed=0)[0]
    windows = store_windows(train_view, model.tokenizer)
    random.Random(settings.seed).shuffle(windows)
    out, total = [], 0
    for w in windows:
        if total >= settings.tokens:
            break
        out.append(w)
        total += len(w.tokens)
    if total < settings.tokens:
        raise ScopeError(f"the training documents of store {store.url!r} hold {total:,} tokens; the fine-tune asks for "
                         f"tokens={settings.tokens:,}: lower it or capture a larger store")
    return out


def finetune(sae: Dictionary, model: LoadedModel, store: ActivationStore, out: str | Path,
             settings: FinetuneSettings | None = None, progress: bool = True) -> FinetuneResult:
    """KL + MSE fine-tune of an SAE spliced in at its hook, on the store's training documents; resumes from ``out``.

    Writes ``out/sae/`` (the fine-tuned dictionary), ``out/metrics.jsonl`` and ``out/finetune.json``."""
    s = settings or FinetuneSettings()
    out = Path(out)
    if sae.output_hook != sae.cfg.hook:
        raise ScopeError(f"{sae.cfg.kind} dictionaries read {sae.cfg.hook} but write {sae.output_hook}: the fine-tune "
                         "takes SAEs only (a transcoder's KL fine-tune is not implemented)")
    hook = sae.cfg.hook
    if hook not in store.manifest.config.hooks:
        raise ScopeError(f"the SAE reads {hook}, which store {store.url!r} did not capture; it has "
                         f"{sorted(store.manifest.config.hooks)}")
    if store.width(hook) != sae.cfg.d_in:
        raise ScopeError(f"the SAE takes {sae.cfg.d_in}-wide inputs at {hook}, and store {store.url!r} holds it "
                         f"{store.width(hook)} wide: fine-tune on the store the SAE was trained on")
    check_hooks(model, [hook])
    splice_bos = "bos" not in store.manifest.config.excluded
    sae.to(model.device)
    unfold_input_scale(sae)
    opt = torch.optim.Adam(_param_groups(sae, s))
    windows = _windows(store, model, s)
    steps = -(-len(windows) // s.batch_windows)
    key = _fingerprint(sae, s, store)
    state = {"step": 0, "mse_weight": s.mse_weight, "start": None, "key": key,
             "target_l0": _target_l0(sae, s)}
    if (out / CHECKPOINT / "state.json").exists():
        state = _resume(out, key, sae, opt)
    elif out.exists() and any(out.iterdir()):
        raise ScopeError(f"{out} is not empty and holds no fine-tune checkpoint; pass an empty or new folder")
    else:
        _checkpoint(out, state, sae, opt)  # from here on a killed run resumes, even before its first checkpoint
    _truncate_log(out / METRICS, state["step"])
    batches = list(padded_batches(windows, s.batch_windows, pad_token_id(model.tokenizer)))
    last = state.get("last")
    bar = tqdm(total=steps, initial=state["step"], desc="finetune", unit="step", disable=not progress,
               dynamic_ncols=True)
    with frozen_weights(model), (out / METRICS).open("a") as log:
        for step in range(state["step"], steps):
            toks, mask = (t.to(model.device) for t in batches[step])
            kl, fvu, l0_grad = _step_loss(sae, model, hook, toks, mask, splice_bos, s.train, bool(s.threshold_lr))
            l0 = l0_grad.item()
            if state["mse_weight"] is None:
                state["mse_weight"] = float(kl.detach() / fvu.detach().clamp_min(1e-12))
            if state["start"] is None:
                state["start"] = {"kl": kl.item(), "fvu": fvu.item(), "l0": l0}
            if state.get("target_l0") is None:
                state["target_l0"] = l0
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * (1 - step / steps)
            opt.zero_grad(set_to_none=True)
            loss = kl + state["mse_weight"] * fvu
            if s.threshold_lr:  # θ alone gets this gradient (the step's pseudo-derivative has none in z)
                loss = loss + s.l0_coeff * quadratic_l0_penalty(l0_grad, state["target_l0"])
            loss.backward()
            b_dec = sae.b_dec.detach().clone()
            opt.step()
            if s.threshold_lr:
                with torch.no_grad():
                    sae.trained_threshold().clamp_(min=1e-6)  # as in training (JumpReLU.project)
            if s.train == "decoder" and sae.cfg.apply_b_dec_to_input:
                _keep_encoder(sae, b_dec)
            last = {"step": step + 1, "kl": kl.item(), "fvu": fvu.item(), "l0": l0, "lr": opt.param_groups[0]["lr"]}
            if s.threshold_lr:
                last["threshold_mean"] = sae.trained_threshold().mean().item()
            log.write(json.dumps(last) + "\n")
            log.flush()
            state.update(step=step + 1, last=last)
            bar.update(1)
            bar.set_postfix(kl=f"{last['kl']:.3f}", fvu=f"{last['fvu']:.3f}")
            if (step + 1) % s.checkpoint_every == 0 and step + 1 < steps:
                _checkpoint(out, state, sae, opt)
    bar.close()
    path = sae.save(out / SAVED)
    result = FinetuneResult(
        path=str(path), steps=steps, tokens=sum(len(w.tokens) for w in windows), mse_weight=state["mse_weight"],
        kl_start=state["start"]["kl"], kl_end=last["kl"], fvu_start=state["start"]["fvu"], fvu_end=last["fvu"],
        l0_start=state["start"]["l0"], l0_end=last["l0"])
    (out / "finetune.json").write_text(json.dumps({"settings": s.model_dump(), **result.to_dict()}, indent=1))
    _checkpoint(out, state, sae, opt)  # a rerun of the same command finds it finished
    return result


def _checkpoint(out: Path, state: dict, sae: Dictionary, opt: torch.optim.Optimizer) -> None:
    """The SAE, Adam's moments and the loop's state, replaced atomically."""
    tensors = {f"sae/{k}": v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    names = {id(p): k for k, p in sae.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            tensors[f"adam/{names[id(p)]}/{k}"] = torch.as_tensor(v).detach().cpu().contiguous()

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state))

    replace_folder(out, CHECKPOINT, fill)


def _truncate_log(path: Path, step: int) -> None:
    """Drop the log rows of steps after the checkpoint (a killed run logged them, its resume repeats them)."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in rows))


def _resume(out: Path, key: str, sae: Dictionary, opt: torch.optim.Optimizer) -> dict:
    """Load the checkpoint of the same fine-tune (same starting SAE, settings and store) into ``sae`` and ``opt``."""
    folder = out / CHECKPOINT
    advice = f"delete {out} to start the fine-tune again"
    state = read_json(folder / "state.json", advice)
    if state.get("key") != key:
        raise ScopeError(f"{out} holds a fine-tune of another SAE, store or settings; pass a new folder, or {advice}")
    tensors = read_safetensors(folder / "state.safetensors", advice)
    dev = next(sae.parameters()).device
    sae.load_state_dict({k[4:]: v.to(dev) for k, v in tensors.items() if k.startswith("sae/")})
    params = dict(sae.named_parameters())
    for key_, v in tensors.items():
        if key_.startswith("adam/"):
            name, moment = key_[5:].rsplit("/", 1)
            opt.state[params[name]][moment] = v.to(dev)
    return state
