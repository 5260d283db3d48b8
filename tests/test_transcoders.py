"""Transcoders (issue 18): the Gemma Scope 2 import defects, the transcoder kind, training, evaluation, interop.

Gemma Scope 2 folders are written here in the release's own form: ``<site>/layer_L_width_16k_l0_small[_affine]/``
holding ``params.safetensors`` (lower-case ``w_enc``, ``w_dec``, ``b_enc``, ``b_dec``, ``threshold`` and, for the
affine transcoders, ``affine_skip_connection``) and a ``config.json`` with ``type``, ``affine_connection``,
``hf_hook_point_in``/``hf_hook_point_out``, ``architecture``, ``model_name``, ``width`` and ``l0``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from scope.cli import app
from scope.dictionaries.interop import load_any, load_gemma_scope
from scope.errors import ScopeError

D, M = 16, 48
runner = CliRunner()


def gs2_arrays(seed: int = 0, d_in: int = D, d_sae: int = M, d_out: int = D, skip: bool = False) -> dict[str, torch.Tensor]:
    """Gemma Scope 2 tensors, spelt as the release spells them."""
    g = torch.Generator().manual_seed(seed)
    a = {"w_enc": torch.randn(d_in, d_sae, generator=g) * 0.5, "w_dec": torch.randn(d_sae, d_out, generator=g) * 0.5,
         "b_enc": torch.randn(d_sae, generator=g) * 0.1, "b_dec": torch.randn(d_out, generator=g),
         "threshold": torch.rand(d_sae, generator=g) * 0.6 + 0.05}
    if skip:
        a["affine_skip_connection"] = torch.randn(d_in, d_out, generator=g) * 0.3
    return a


def write_gs2(root: Path, site: str, layer: int, kind: str, seed: int = 0, affine: bool = False,
              model: str = "google/gemma-3-270m") -> tuple[Path, dict[str, torch.Tensor]]:
    """One Gemma Scope 2 folder in the release's layout and config.json form."""
    folder = root / site / f"layer_{layer}_width_16k_l0_small{'_affine' if affine else ''}"
    folder.mkdir(parents=True)
    a = gs2_arrays(seed, skip=affine)
    save_file(a, str(folder / "params.safetensors"))
    hf_in = {"resid_post": f"model.layers.{layer}.output",
             "mlp_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
             "attn_out": f"model.layers.{layer}.self_attn.o_proj.input",
             "transcoder": f"model.layers.{layer}.pre_feedforward_layernorm.output"}[site]
    hf_out = f"model.layers.{layer}.post_feedforward_layernorm.output" if kind == "transcoder" else hf_in
    (folder / "config.json").write_text(json.dumps({
        "hf_hook_point_in": hf_in, "hf_hook_point_out": hf_out, "width": M, "model_name": model,
        "architecture": "jump_relu", "l0": 20, "affine_connection": affine, "type": kind}))
    return folder, a


def hand_codes(a: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Gemma Scope 2's reference encoder: relu(pre)·1[pre > θ], pre = x w_enc + b_enc."""
    pre = x @ a["w_enc"] + a["b_enc"]
    return torch.relu(pre) * (pre > a["threshold"])


def hand_output(a: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ŷ = f w_dec + b_dec (+ x · affine_skip_connection), as the Gemma Scope 2 tutorial computes it."""
    y = hand_codes(a, x) @ a["w_dec"] + a["b_dec"]
    return y + x @ a["affine_skip_connection"] if "affine_skip_connection" in a else y


def xs(n: int = 32, d: int = D, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2


# --- 1. the two defects of the Gemma Scope 2 import -------------------------------------------------------
@pytest.mark.parametrize("site,hook", [("resid_post", "blocks.6.hook_resid_post"),
                                       ("mlp_out", "blocks.6.hook_mlp_out")])
def test_gemma_scope_2_sae_config_is_not_a_transcoder(tmp_path, site, hook):
    """The release's SAE configs say type 'sae', affine_connection false and hf_hook_point_out == _in."""
    folder, a = write_gs2(tmp_path / "gemma-scope-2-270m-pt", site, 6, "sae")
    sae = load_gemma_scope(folder)
    assert sae.kind == "jumprelu" and sae.cfg.hook == hook and sae.cfg.model == "google/gemma-3-270m"
    x = xs()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), hand_codes(a, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), hand_output(a, x), rtol=1e-5, atol=1e-5)


def test_import_local_release_folder_with_sub_path(tmp_path):
    """`scope import gemma-scope LOCAL_FOLDER SUBPATH` reads the folder like a hub repo with a path."""
    root = tmp_path / "gemma-scope-2-270m-pt"
    write_gs2(root, "resid_post", 6, "sae", seed=2)
    result = runner.invoke(app, ["import", "gemma-scope", str(root), "resid_post/layer_6_width_16k_l0_small",
                                 "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["hook"] == "blocks.6.hook_resid_post" and info["model"] == "google/gemma-3-270m"
    assert load_gemma_scope(root, "resid_post/layer_6_width_16k_l0_small").cfg == load_any(tmp_path / "out").cfg
    bad = runner.invoke(app, ["import", "gemma-scope", str(root), "resid_post/layer_7_width_16k_l0_small",
                              "--out", str(tmp_path / "out2")])
    assert bad.exit_code == 2 and "layer_7_width_16k_l0_small" in bad.output and "Traceback" not in bad.output
    with pytest.raises(ScopeError, match="has no 'nope'"):
        load_gemma_scope(root, "nope")
