"""Writes the notebooks in this folder from their cells below (outputs stripped), so diffs stay readable.

Run ``python notebooks/build.py`` after editing a notebook's cells here. Every notebook reads
``SCOPE_NOTEBOOK_SMALL=1`` (set by the test suite) to run at tiny sizes.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

SIZES = '''import os
SMALL = os.environ.get("SCOPE_NOTEBOOK_SMALL") == "1"  # the test suite runs every notebook at tiny sizes
OUT = os.environ.get("SCOPE_NOTEBOOK_OUT", "notebook-out")'''

NOTEBOOKS = {
    "01_capture_and_store.ipynb": [
        new_markdown_cell("# Capture activations into a store\n\nLoad the bundled Gemma 3 270M, look at its "
                          "architecture facts and hook points, capture two hooks in one early-stopped forward "
                          "pass, then write an activation store and read it back shuffled."),
        new_code_cell(SIZES),
        new_code_cell("from scope.models import load_model\nfrom scope.hooks import capture, hook_names\n\n"
                      "model = load_model('gemma-3-270m')\nmodel.facts"),
        new_code_cell("[n for n in hook_names(model) if n.startswith('blocks.6.')][:12]"),
        new_code_cell("ids = model.tokenizer('The Eiffel Tower is located in the city of', return_tensors='pt').input_ids\n"
                      "acts = capture(model, ids, ['blocks.6.hook_resid_post', 'blocks.5.attn.hook_q'])\n"
                      "{k: tuple(v.shape) for k, v in acts.items()}"),
        new_code_cell("from scope.data import open_source\nfrom scope.store import ActivationStore, capture_store\n\n"
                      "store_dir = f'{OUT}/bbc-l6'\n"
                      "capture_store(model, open_source('bbc'), ['blocks.6.hook_resid_post'], store_dir,\n"
                      "              tokens=2_000 if SMALL else 100_000, context=128)\n"
                      "store = ActivationStore(store_dir)\nstore.info()"),
        new_code_cell("train, held_out = store.split(held_out=0.2)\nx = next(train.batches('blocks.6.hook_resid_post', "
                      "batch_size=256))\nnorms = x.norm(dim=-1)\n"
                      "print(len(train), len(held_out), x.shape, f'mean norm {norms.mean():.0f}, max {norms.max():.0f}')"),
    ],
    "02_train_jumprelu_sae.ipynb": [
        new_markdown_cell("# Train a JumpReLU SAE (the Gemma Scope recipe)\n\nCapture layer-6 residual activations "
                          "of the bundled Gemma 3 270M, train a JumpReLU SAE and a TopK SAE of the same width in one "
                          "pass, evaluate both on held-out documents (FVU, L0, and the language-model loss with the "
                          "SAE spliced in), and plot the L0–FVU frontier. See `docs/methods/jumprelu.md`."),
        new_code_cell(SIZES),
        new_code_cell("from scope.data import open_source\nfrom scope.models import load_model\n"
                      "from scope.store import ActivationStore, capture_store\n\n"
                      "model = load_model('gemma-3-270m')\nstore_dir = f'{OUT}/wiki-l6'\n"
                      "capture_store(model, open_source('wiki'), ['blocks.6.hook_resid_post'], store_dir,\n"
                      "              tokens=4_000 if SMALL else 300_000)\nActivationStore(store_dir).info()['rows']"),
        new_code_cell("from scope.training import load_config, train\n\n"
                      "cfg = load_config(data={\n    'store': store_dir,\n"
                      "    'trainer': {'total_tokens': 20_480 if SMALL else 2_000_000, 'batch_size': 512 if SMALL else 4096,\n"
                      "                'lr': 1e-3, 'lr_warmup_steps': 10, 'sparsity_warmup_steps': 20 if SMALL else 100,\n"
                      "                'log_every': 5},\n"
                      "    'dictionaries': [\n"
                      "        {'name': 'jumprelu', 'kind': 'jumprelu', 'd_sae': 512 if SMALL else 4096, 'sparsity_coeff': 4e-4},\n"
                      "        {'name': 'topk', 'kind': 'topk', 'd_sae': 512 if SMALL else 4096, 'k': 32}]})\n"
                      "saved = train(cfg, f'{OUT}/run')\nsaved"),
        new_code_cell("import json\nimport plotly.express as px\n\n"
                      "rows = [json.loads(l) for l in open(f'{OUT}/run/metrics.jsonl')]\n"
                      "px.line(x=[r['tokens'] for r in rows], y=[r['jumprelu/fvu'] for r in rows],\n"
                      "        labels={'x': 'training tokens', 'y': 'FVU (training batch)'}, title='JumpReLU training')"),
        new_code_cell("from scope.dictionaries import load\nfrom scope.evals import evaluate, frontier_figure\n\n"
                      "held_out = ActivationStore(store_dir).split(0.1)[1]\n"
                      "results = [evaluate(load(path), held_out, model=model, lm_tokens=128 if SMALL else 4096, name=name)\n"
                      "           for name, path in saved.items()]\n"
                      "for r in results:\n"
                      "    print(r['name'], f\"L0 {r['l0']:.1f} FVU {r['fvu']:.3f} delta loss {r['lm']['delta_loss']:.3f}\")"),
        new_code_cell("frontier_figure(results)"),
    ],
}


def main(folder: Path = Path(__file__).parent) -> None:
    for name, cells in NOTEBOOKS.items():
        for i, cell in enumerate(cells):
            cell.id = f"{name.split('_')[0]}-{i:02d}"  # stable ids: rebuilding gives the same file
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                "language": "python"}})
        nbformat.write(nb, str(folder / name))


if __name__ == "__main__":
    import sys

    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
