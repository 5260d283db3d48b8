"""The sae-dashboard side of benchmarks/dashboard.py; runs under the sae-dashboard venv's python.

Reads one JSON job from argv: the SAELens folder of the dictionary, the local float safetensors folder
of Gemma 3 270M, the token windows (a safetensors file), and optionally a cache folder of the model's
activations that sae-dashboard reads instead of running the model. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def main(job: dict) -> dict:
    from sae_lens import SAE, HookedSAETransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner

    import sae_dashboard
    import sae_lens

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(job["model_dir"], torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    # No weight processing: the SAE was trained on the unprocessed residual stream (as scope's bridge gives it).
    model = HookedSAETransformer.from_pretrained_no_processing("google/gemma-3-270m", hf_model=hf, tokenizer=tok,
                                                               device="cpu", dtype=torch.float32)
    sae = SAE.load_from_disk(job["sae_dir"], device="cpu")
    load_s = time.perf_counter() - t
    tokens = load_file(job["tokens"])["tokens"].long()
    features = job["features"]
    run_s = html_s = html_mb = 0.0
    checks = {}
    # One HTML file per chunk of features: a single file for thousands of features does not fit in memory
    # (256 features gave 217 MB of HTML at 7.4 GB peak RSS).
    for a in range(0, len(features), job["chunk"]):
        chunk = features[a : a + job["chunk"]]
        cfg = SaeVisConfig(hook_point=job["hook"], features=chunk, minibatch_size_features=job["feature_batch"],
                           minibatch_size_tokens=job["token_batch"], device="cpu", dtype="float32",
                           ignore_tokens=set(job["ignore_tokens"]),
                           cache_dir=Path(job["cache_dir"]) if job["cache_dir"] else None)
        t = time.perf_counter()
        data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
        run_s += time.perf_counter() - t
        t = time.perf_counter()
        html = f"{job['html']}-{a // job['chunk']:03d}.html"
        save_feature_centric_vis(sae_vis_data=data, filename=html)
        html_s += time.perf_counter() - t
        html_mb += Path(html).stat().st_size / 2**20
        for f in set(job["check"]) & set(chunk):
            fd = data.feature_data_dict[f]
            m = re.search(r"DENSITY = ([\d.]+)%", fd.acts_histogram_data.title or "")
            top = fd.sequence_data.seq_group_data[0].seq_data
            checks[str(f)] = {"density": float(m.group(1)) / 100 if m else None,
                              "max": max((max(s.feat_acts) for s in top if s.feat_acts), default=0.0)}
        Path(html).unlink()  # only the time and size are kept
        del data
    return {"library": "sae-dashboard", "version": sae_dashboard.__version__ if hasattr(sae_dashboard, "__version__")
            else "?", "sae_lens": sae_lens.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_s": load_s, "run_s": run_s, "html_s": html_s, "seconds": run_s + html_s, "html_mb": html_mb,
            "chunk": job["chunk"], "checks": checks,
            "peak_rss_mb": _hwm_mb()}


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
