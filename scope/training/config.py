"""Training configs: YAML files in sae_configs/, validated by pydantic, overridable with ``--set``.

A config names its input store, the hook to read, the trainer settings (with the length of
training in ``trainer.total_tokens``) and one or more dictionaries, all trained from one pass over
the data. Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from scope.dictionaries.matryoshka import prefix_ends
from scope.dictionaries.whitening import WhiteningSpec
from scope.errors import ScopeError, first_line, validation_summary


class _Strict(BaseModel):
    # inf passes every gt/ge bound, and an infinite lr or λ trains to NaN weights that are saved without a word.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Adam's decay rates: torch refuses anything outside [0, 1) only once the optimizer is built, mid-run.
Beta = Annotated[float, Field(ge=0, lt=1)]


# SAELens's architecture names for a BatchTopK SAE, accepted as `kind` and read as kind topk, selection batch.
_BATCHTOPK_KINDS = ("batchtopk", "matryoshka_batchtopk")


class DictSpec(_Strict):
    """One dictionary to train. ``d_in`` defaults to the store's width."""

    name: str | None = None
    kind: Literal["jumprelu", "relu", "topk", "icfl", "transcoder"]
    activation: Literal["jumprelu", "topk", "batchtopk"] = Field(
        "jumprelu", description="transcoder: the activation (topk and batchtopk take `k`)")
    skip: bool = Field(False, description="transcoder: add an affine skip connection x_in W_skip (a skip transcoder)")
    d_sae: int = Field(gt=0)
    d_in: int | None = Field(None, gt=0)
    sparsity_coeff: float = Field(0.0, ge=0, description="λ: L0 weight (jumprelu) or L1 weight (relu)")
    k: int | None = Field(None, gt=0, description="active latents per row (topk)")
    selection: Literal["exact", "batch", "statistical"] = "exact"
    bandwidth: float = Field(0.001, gt=0)
    threshold_init: float = Field(0.001, gt=0)
    init_l0: float | None = Field(None, gt=0, description="jumprelu: set θ from pre-activation quantiles so L0 starts here")
    sparsity_loss: Literal["step", "tanh", "quadratic"] = Field(
        "step", description="jumprelu: λ‖f‖₀ (Gemma Scope), λΣtanh(c·f) (Anthropic) or λ(L0/target_l0 − 1)² (Gemma Scope 2)")
    tanh_scale: float = Field(4.0, gt=0, description="jumprelu: c of the tanh sparsity loss")
    target_l0: float | None = Field(None, gt=0, description="jumprelu: the L0 the quadratic sparsity loss pulls towards")
    pre_act_coeff: float = Field(0.0, ge=0, description="jumprelu: λ_P of the pre-activation loss on dead latents")
    pre_act_on: Literal["all", "threshold"] = Field(
        "all", description="jumprelu: what the pre-activation loss moves: θ, W_enc and b_enc of dead latents, or θ alone")
    batchtopk_steps: int = Field(
        0, ge=0, description="jumprelu: train the first N steps as BatchTopK with k = target_l0, θ tracking its "
                             "inference threshold; then each θᵢ trains on its own (0: off)")
    handover_revive: float | None = Field(
        None, gt=0, le=1, description="jumprelu with batchtopk_steps: when the BatchTopK phase ends, lift each dead "
                                      "latent's encoder bias so that it fires on about this fraction of the batch's "
                                      "rows (None: off)")
    row_cap: int | None = Field(
        None, gt=0, description="jumprelu with batchtopk_steps, topk with selection batch: no row of a BatchTopK step "
                                "keeps more than this many latents (at least k or target_l0; default: no cap)")
    freq_coeff: float = Field(0.0, ge=0, description="jumprelu: λ_f of the penalty on latents firing above freq_max")
    freq_max: float = Field(0.1, gt=0, le=1, description="jumprelu: firing fraction above which the frequency penalty acts")
    matryoshka_widths: list[int] | None = Field(
        None, description="jumprelu, topk: nested prefixes of the latents that must each reconstruct x (Matryoshka)")
    aux_k: int | None = Field(None, gt=0, description="topk, jumprelu: dead latents per row in the AuxK loss (default d_in // 2)")
    aux_coeff: float | None = Field(
        None, ge=0, description="topk, jumprelu: weight of the AuxK loss on dead latents (default 1/32 for topk, 0 for jumprelu)")
    aux_b_dec: bool = Field(
        True, description="topk: AuxK's gradient reaches b_dec through the centred encoder input (Gao et al., SAELens); "
                          "false: only the dead latents' encoder and decoder move, as in a JumpReLU's AuxK")
    dead_after_tokens: int = Field(1_000_000, gt=0, description="topk: rows without firing after which AuxK counts a latent dead")
    resample_every: int | None = Field(
        None, gt=0, description="jumprelu, topk, relu: every N steps point the dead latents at badly reconstructed "
                                "rows (Bricken et al. 2023; None: off)")
    resample_until: int | None = Field(
        None, ge=0, description="no resampling after this step (default: the step the learning rate starts to decay)")
    iterations: int = Field(20, gt=0, description="J: matching-pursuit iterations (icfl)")
    atoms_per_iteration: int = Field(5, gt=0, description="L: atoms picked and fitted per iteration (icfl)")
    atom_selection: Literal["signed", "absolute"] = Field("signed", description="rank atoms by ⟨d, r⟩ or |⟨d, r⟩| (icfl)")
    redraw_every: int = Field(100, ge=0, description="steps between re-draws of near-duplicate atoms (icfl)")
    redraw_cos: float = Field(0.9, gt=0, le=1, description="cosine similarity that makes two atoms duplicates (icfl)")
    whitening: WhiteningSpec | None = Field(None, description="PCA-whiten inputs against a control set first")
    lr: float | None = Field(None, gt=0, description="overrides trainer.lr for this dictionary")
    threshold_lr: float | None = Field(
        None, gt=0, description="jumprelu: θ's own learning rate (default: the dictionary's lr); scaled by the schedule")
    adam_betas: tuple[Beta, Beta] | None = Field(None, description="overrides trainer.adam_betas for this dictionary")
    max_grad_norm: float | None = Field(None, gt=0, description="overrides trainer.max_grad_norm for this dictionary")
    lazy_adam: bool = Field(
        False, description="a latent that gets no gradient in a step keeps its Adam second moment (needs β1 = 0; "
                           "scope/training/lazy_adam.py): a rarely firing latent moves ~lr when it fires, not lr/√p")
    apply_b_dec_to_input: bool | None = Field(None, description="subtract b_dec before encoding (default: per kind)")

    @model_validator(mode="before")
    @classmethod
    def _saelens_kind_names(cls, data: Any) -> Any:
        # SAELens names BatchTopK SAEs as architectures of their own; here they are TopK with a batch selection.
        if not isinstance(data, dict) or data.get("kind") not in _BATCHTOPK_KINDS:
            return data
        kind = data["kind"]
        if data.get("selection", "batch") != "batch":
            raise ValueError(f"kind {kind} selects over the batch, so its selection can only be batch "
                             f"(got {data['selection']!r}); use kind: topk for selection {data['selection']}")
        if kind == "matryoshka_batchtopk" and not data.get("matryoshka_widths"):
            raise ValueError("kind matryoshka_batchtopk needs matryoshka_widths, the nested prefix widths, "
                             "e.g. [128, 512, 2048] for d_sae 4096")
        return {**data, "kind": "topk", "selection": "batch"}

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, name: str | None) -> str | None:
        # The name is the dictionary's folder under --out and the prefix of its metrics ("NAME/l0"): a slash
        # would nest it and hide its metrics, and "." or ".." would write it beside or above the run.
        if name is not None and (name in (".", "..") or "/" in name or "\\" in name):
            raise ValueError("a dictionary name is its folder under --out, so it needs a single folder name "
                             "without / or \\ and other than . or .., e.g. jumprelu-16k")
        return name

    def revives(self) -> bool:
        """Whether this JumpReLU's loss needs the trainer's dead mask (pre-activation or AuxK loss)."""
        return self.family() == "jumprelu" and bool(self.pre_act_coeff or self.aux_coeff)

    def family(self) -> str:
        """The kind whose training fields apply: a transcoder's activation (batchtopk trains as topk), else the kind."""
        if self.kind != "transcoder":
            return self.kind
        return "topk" if self.activation == "batchtopk" else self.activation

    def label(self) -> str:
        if self.name:
            return self.name
        detail = {"topk": f"k{self.k}", "icfl": f"j{self.iterations}x{self.atoms_per_iteration}"}.get(
            self.family(), f"l{self.sparsity_coeff:g}")
        kind = f"{'skip-' if self.skip else ''}transcoder-{self.activation}" if self.kind == "transcoder" else self.kind
        return f"{kind}-{self.d_sae}-{detail}" + ("-white" if self.whitening else "")


class TrainerSettings(_Strict):
    total_tokens: int = Field(gt=0, description="token-steps to train; more than the store's rows reads it for several epochs")
    batch_size: int = Field(4096, gt=0)
    lr: float = Field(7e-5, gt=0)
    adam_betas: tuple[Beta, Beta] = (0.0, 0.999)
    lr_warmup_steps: int = Field(1000, ge=0)
    lr_decay_start: float = Field(0.8, ge=0, le=1, description="fraction of training after which lr decays linearly to 0")
    sparsity_warmup_steps: int = Field(10_000, ge=0, description="λ rises linearly from 0 over these steps")
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    sparse_kernels: bool = Field(True, description="gradients only at active codes (same values; see dictionaries/sparse.py)")
    device: str | None = None
    checkpoint_every: int = Field(1000, gt=0)
    snapshot_every: int | None = Field(
        None, gt=0, description="also save every dictionary to out/snapshots/step-N/NAME every this many steps")
    log_every: int = Field(50, gt=0)
    held_out: float = Field(0.1, gt=0, lt=1, description="fraction of documents kept out of training")
    buffer_rows: int = Field(1 << 18, gt=0)
    norm_estimate_rows: int = Field(100_000, gt=0)
    b_dec_init: Literal["mean", "zeros"] = Field(
        "mean", description="start b_dec at the data mean: Gemma's residual stream has channels with huge means")
    dead_window_steps: int = Field(1000, gt=0, description="dead latents: firing frequency over this many last steps")
    dead_frequency: float = Field(1e-5, ge=0, le=1, description="a latent firing on fewer than this fraction of rows is dead")
    max_grad_norm: float | None = Field(
        None, gt=0, description="clip each dictionary's gradient to this global norm before the Adam step (off by "
                                "default); a JumpReLU's trained thresholds are left out of the norm and the clip")
    max_norm_ratio: float | None = Field(
        None, gt=0, description="skip rows whose norm exceeds this multiple of the median norm (outlier tokens)")


class LoggingSettings(_Strict):
    tensorboard: bool = False
    wandb_project: str | None = None


class CaptureSpec(_Strict):
    """How to build the store when it does not exist yet (``scope cache`` with these arguments)."""

    model: str = "gemma-3-270m"
    hooks: list[str]
    corpus: str = "wiki"
    tokens: int = Field(gt=0)
    context: int = Field(128, gt=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    model_dtype: Literal["float32", "bfloat16"] = "float32"
    batch_size: int = Field(32, gt=0)


class TrainConfig(_Strict):
    store: str
    hook: str | None = None
    input_hook: str | None = Field(None, description="the hook dictionaries read (`hook` is the same thing)")
    output_hook: str | None = Field(None, description="transcoders: the hook they reconstruct, e.g. blocks.6.hook_mlp_out")
    capture: CaptureSpec | None = None
    trainer: TrainerSettings
    dictionaries: list[DictSpec] = Field(min_length=1)
    logging: LoggingSettings = LoggingSettings()

    def check(self) -> "TrainConfig":
        names = [d.label() for d in self.dictionaries]
        if len(set(names)) != len(names):
            raise ScopeError(f"dictionary names repeat: {names}; give each a distinct `name`")
        if self.hook and self.input_hook and self.hook != self.input_hook:
            raise ScopeError(f"`hook` {self.hook!r} and `input_hook` {self.input_hook!r} disagree; they name the same "
                             "thing (the hook dictionaries read), so set one")
        self._check_transcoders()
        for d in self.dictionaries:
            if d.family() == "topk" and d.k is None:
                raise ScopeError(f"dictionary {d.label()!r} is {d.activation if d.kind == 'transcoder' else 'topk'} "
                                 "but sets no `k`")
            if d.k is not None and d.k > d.d_sae:
                raise ScopeError(f"dictionary {d.label()!r}: k {d.k} is more than its d_sae {d.d_sae} latents; use a "
                                 f"k of at most {d.d_sae}")
            if d.family() in ("jumprelu", "relu") and d.sparsity_coeff == 0:
                raise ScopeError(f"dictionary {d.label()!r} ({d.kind}) needs a positive `sparsity_coeff` (λ)")
            _check_fields_apply(d)  # after what is missing, before the checks of values that it makes moot
            if d.sparsity_loss == "quadratic" and not (d.target_l0 and d.target_l0 < d.d_sae):
                raise ScopeError(f"dictionary {d.label()!r}: sparsity_loss quadratic needs a `target_l0` below "
                                 f"d_sae ({d.d_sae})")
            if d.batchtopk_steps and not (d.target_l0 and d.target_l0 < d.d_sae):
                raise ScopeError(f"dictionary {d.label()!r}: batchtopk_steps {d.batchtopk_steps} needs a target_l0 "
                                 f"below d_sae ({d.d_sae}): it is the k of the BatchTopK phase")
            if d.handover_revive is not None and not d.batchtopk_steps:
                raise ScopeError(f"dictionary {d.label()!r}: handover_revive {d.handover_revive:g} acts when the "
                                 "BatchTopK phase ends; set batchtopk_steps (e.g. 90 % of the run's steps) or remove "
                                 "handover_revive")
            if d.row_cap is not None:
                batch = d.batchtopk_steps if d.family() == "jumprelu" else (
                    d.family() == "topk" and (d.selection == "batch" or d.activation == "batchtopk"))
                k = d.target_l0 if d.family() == "jumprelu" else d.k
                if not batch:
                    raise ScopeError(f"dictionary {d.label()!r}: row_cap {d.row_cap} caps a BatchTopK selection; it "
                                     "needs kind jumprelu with batchtopk_steps or kind topk with selection batch")
                if k is not None and d.row_cap < k:
                    raise ScopeError(f"dictionary {d.label()!r}: row_cap {d.row_cap} is below k = {k:g}, so the batch "
                                     f"could not keep k latents per row on average; use a row_cap of at least {k:g}")
            if d.matryoshka_widths is not None:
                try:  # the dictionaries' own rule, checked before anything is built
                    prefix_ends(d.matryoshka_widths, d.d_sae)
                except ValueError as err:
                    raise ScopeError(f"dictionary {d.label()!r}: {err}, e.g. [{d.d_sae // 16}, {d.d_sae // 4}]") from None
            if d.resample_every is not None:
                if d.kind not in ("jumprelu", "topk", "relu"):
                    raise ScopeError(f"dictionary {d.label()!r}: resample_every resamples an SAE's dead latents; it "
                                     f"needs kind jumprelu, topk or relu (this one is {d.kind})")
                if d.resample_every < self.trainer.dead_window_steps:
                    raise ScopeError(f"dictionary {d.label()!r}: resample_every {d.resample_every} is shorter than "
                                     f"trainer.dead_window_steps {self.trainer.dead_window_steps}, so a latent just "
                                     "resampled would still count as dead at the next resampling; use a "
                                     f"resample_every of at least {self.trainer.dead_window_steps}")
            elif d.resample_until is not None:
                raise ScopeError(f"dictionary {d.label()!r}: resample_until {d.resample_until} needs resample_every")
            if d.lazy_adam and (d.adam_betas or self.trainer.adam_betas)[0] != 0:
                raise ScopeError(f"dictionary {d.label()!r}: lazy_adam needs Adam's β1 = 0 (adam_betas "
                                 f"{list(d.adam_betas or self.trainer.adam_betas)}), where a latent without gradient "
                                 "does not move; set adam_betas: [0.0, 0.999] or remove lazy_adam")
            if d.init_l0 is not None and d.init_l0 >= d.d_sae:
                raise ScopeError(f"dictionary {d.label()!r}: init_l0 {d.init_l0:g} needs a value below d_sae ({d.d_sae})")
        return self

    def _check_transcoders(self) -> None:
        """Transcoders need an output hook, and an output hook is for transcoders only."""
        tc = [d.label() for d in self.dictionaries if d.kind == "transcoder"]
        others = [d.label() for d in self.dictionaries if d.kind != "transcoder"]
        if tc and not self.output_hook:
            raise ScopeError(f"dictionaries {tc} are transcoders but the config sets no `output_hook` (the hook they "
                             "reconstruct, e.g. blocks.6.hook_mlp_out with input_hook blocks.6.ln2.hook_out)")
        if self.output_hook and others:
            raise ScopeError(f"`output_hook` {self.output_hook!r} is for transcoders, but dictionaries {others} are "
                             f"not (kind: transcoder); train them in a config without output_hook")
        for d in self.dictionaries:
            if d.kind == "transcoder" and d.whitening is not None:
                raise ScopeError(f"dictionary {d.label()!r}: a transcoder does not whiten its input; drop `whitening`")
            if d.kind != "transcoder" and (d.skip or d.activation != "jumprelu"):
                raise ScopeError(f"dictionary {d.label()!r}: `skip` and `activation` are transcoder fields; "
                                 f"use kind: transcoder")


# The dictionary families that read each kind-specific field; another family would ignore it silently.
_JUMPRELU, _TOPK = ("jumprelu",), ("topk",)
_FIELD_FAMILIES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(["bandwidth", "threshold_init", "sparsity_loss", "tanh_scale", "target_l0", "pre_act_coeff",
                     "pre_act_on", "freq_coeff", "freq_max", "threshold_lr", "init_l0", "batchtopk_steps",
                     "handover_revive"], _JUMPRELU),
    **dict.fromkeys(["k", "selection", "dead_after_tokens", "aux_b_dec"], _TOPK),
    **dict.fromkeys(["aux_k", "aux_coeff", "matryoshka_widths"], _JUMPRELU + _TOPK),
    "sparsity_coeff": ("jumprelu", "relu"),
    **dict.fromkeys(["iterations", "atoms_per_iteration", "atom_selection", "redraw_every", "redraw_cos"], ("icfl",)),
}


def _check_fields_apply(d: DictSpec) -> None:
    """Refuse a field set away from its default on a dictionary whose kind never reads it.

    Tested on values, not on the keys given: a run's saved config holds every field at its default.
    """
    for field, families in _FIELD_FAMILIES.items():
        value = getattr(d, field)
        if d.family() in families or value == DictSpec.model_fields[field].default:
            continue
        kind = f"a {d.kind} with activation {d.activation}" if d.kind == "transcoder" else f"kind {d.kind}"
        shown = f"{value:g}" if isinstance(value, float) else repr(value)
        raise ScopeError(f"dictionary {d.label()!r}: {field} {shown} is read only by {' and '.join(families)} "
                         f"dictionaries, and this one is {kind}, which would ignore it; remove {field}")


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys of the (nested) model at a validation-error location."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            break
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        inner = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if inner is None:
            break
        model = inner
    return sorted(model.model_fields)


def _explain(err: ValidationError, source: str) -> ScopeError:
    keys = validation_summary(err, lambda loc: _fields_at(TrainConfig, loc))
    return ScopeError(f"invalid training config {source}: {keys}")


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: what is wrong and where (PyYAML's own message spans several lines)."""
    problem = getattr(err, "problem", None) or first_line(err)
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML; list items by index)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ScopeError(f"--set needs KEY=VALUE (e.g. trainer.lr=1e-4), got {item!r}")
        node: Any = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node[int(part)] if isinstance(node, list) and part.isdigit() and int(part) < len(node) else \
                node.get(part) if isinstance(node, dict) else None
            if nxt is None:
                if isinstance(node, dict):
                    nxt = node.setdefault(part, {})
                else:
                    raise ScopeError(f"--set {key}: {'.'.join(parts[: i + 1])!r} does not exist in the config")
            node = nxt
        last = parts[-1]
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ScopeError(f"--set {key}: the value {raw!r} is not valid YAML ({_yaml_problem(err)}); write it "
                             "as YAML, e.g. trainer.adam_betas=[0.9, 0.999]") from None
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ScopeError(f"--set {key}: index {last!r} is out of range (the list has {len(node)} items)")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (), data: dict | None = None) -> TrainConfig:
    """Read a YAML config (or a dict), apply ``--set`` overrides, validate."""
    if data is None:
        p = Path(path)
        if p.is_dir():
            raise ScopeError(f"config file {str(p)!r} is a folder; pass a YAML file, e.g. one in sae_configs/")
        if not p.is_file():
            raise ScopeError(f"config file {str(p)!r} does not exist; the shipped ones are in sae_configs/")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ScopeError(f"config file {str(p)!r} is not valid YAML: {_yaml_problem(err)}") from None
        if not isinstance(data, dict):
            raise ScopeError(f"config file {str(p)!r} holds a YAML {type(data).__name__}, not a mapping of keys "
                             "(store:, trainer:, dictionaries:); see the ones in sae_configs/")
    data = apply_overrides(data, list(overrides))
    try:
        return TrainConfig.model_validate(data).check()
    except ValidationError as err:
        raise _explain(err, str(path or "")) from None
