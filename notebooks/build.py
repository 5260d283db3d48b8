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
    "03_icfl_vs_topk.ipynb": [
        new_markdown_cell("# ICFL vs TopK, with and without PCA whitening\n\nIterative codebook feature learning "
                          "(Donhauser et al. 2025) codes each activation by batched matching pursuit over a learned "
                          "codebook. Here it is trained beside a TopK SAE with the same width and k = J·L on "
                          "labelled Wikipedia summaries, each once on raw activations and once PCA-whitened against "
                          "a control set of topics; then dead features, feature selectivity per topic and a topic "
                          "probe on original vs reconstructed activations. See `docs/methods/icfl.md`."),
        new_code_cell(SIZES),
        new_code_cell("from scope.data import open_source\nfrom scope.models import load_model\n"
                      "from scope.store import ActivationStore, capture_store\n\n"
                      "model = load_model('gemma-3-270m')\nstore_dir = f'{OUT}/wiki-l6'\n"
                      "capture_store(model, open_source('wiki'), ['blocks.6.hook_resid_post'], store_dir,\n"
                      "              tokens=6_000 if SMALL else 300_000, context=64)\nstore = ActivationStore(store_dir)\n"
                      "topics = sorted({label for label, _ in store.documents.values()})\ntopics"),
        new_code_cell("from scope.training import load_config, train\n\n"
                      "M, J, L = (256, 4, 4) if SMALL else (2048, 8, 4)\n"
                      "white = {'control': topics[: len(topics) // 2], 'rows': 50_000}  # half the topics as control\n"
                      "cfg = load_config(data={\n    'store': store_dir,\n"
                      "    'trainer': {'total_tokens': 10_240 if SMALL else 1_000_000, 'batch_size': 512 if SMALL else 2048,\n"
                      "                'lr': 5e-4, 'adam_betas': [0.9, 0.999], 'lr_warmup_steps': 5,\n"
                      "                'log_every': 5, 'dead_window_steps': 200},\n"
                      "    'dictionaries': [\n"
                      "        {'name': 'icfl', 'kind': 'icfl', 'd_sae': M, 'iterations': J, 'atoms_per_iteration': L},\n"
                      "        {'name': 'icfl-white', 'kind': 'icfl', 'd_sae': M, 'iterations': J, 'atoms_per_iteration': L,\n"
                      "         'whitening': white},\n"
                      "        {'name': 'topk', 'kind': 'topk', 'd_sae': M, 'k': J * L},\n"
                      "        {'name': 'topk-white', 'kind': 'topk', 'd_sae': M, 'k': J * L, 'whitening': white}]})\n"
                      "saved = train(cfg, f'{OUT}/run')"),
        new_code_cell("from scope.dictionaries import load\nfrom scope.evals import reconstruction_metrics\n"
                      "from scope.evals.selectivity import selectivity_metrics\n\n"
                      "held_out = store.split(0.2)[1]\nrows = []\nfor name, path in saved.items():\n"
                      "    sae = load(path)\n    rec = reconstruction_metrics(sae, held_out)\n"
                      "    sel = selectivity_metrics(sae, held_out)\n"
                      "    above = sum(lab.above['maximum>0.2'] for lab in sel.labels)\n"
                      "    rows.append({'dictionary': name, 'L0': rec.l0, 'FVU': rec.fvu, 'dead': sel.dead_fraction,\n"
                      "                 'features max-sel > 0.2': above, 'probe x': sel.probe.get('original'),\n"
                      "                 'probe x_hat': sel.probe.get('reconstructed')})\nrows"),
        new_code_cell("import plotly.express as px\n\n"
                      "px.bar(rows, x='dictionary', y='dead', title='Dead features on held-out documents (< 1e-5 of rows)')"),
    ],
    "04_rope_frequencies.ipynb": [
        new_markdown_cell("# RoPE frequencies in Gemma 3 270M\n\nWhich rotary frequencies do queries and keys use, "
                          "which heads attend to themselves, their predecessor or the first token, and what does "
                          "rotating only some frequencies (p-RoPE) cost at inference? After Barbero et al., *Round "
                          "and Round We Go!* (ICLR 2025). Local (sliding-window, base 1e4) and global (base 1e6) "
                          "layers are kept apart. See `docs/methods/rope.md`."),
        new_code_cell(SIZES),
        new_code_cell("from scope.models import load_model\nfrom scope.analysis.rope import rotary_inv_freq\n\n"
                      "model = load_model('gemma-3-270m')\n"
                      "print(model.facts.layer_types, model.facts.rope_base)\n"
                      "g = {kind: rotary_inv_freq(model, kind) for kind in ('local', 'global')}\n"
                      "{kind: (f'{v[0]:.3g}', f'{v[-1]:.3g}') for kind, v in g.items()}  # rad/token, highest and lowest"),
        new_code_cell("from scope.store.windows import split_windows\n\n"
                      "windows, held_out = split_windows(model.tokenizer, corpus='wiki', tokens=600 if SMALL else 16_384,\n"
                      "                                  heldout_tokens=120 if SMALL else 4096, context=64 if SMALL else 256)\n"
                      "len(windows), len(held_out)"),
        new_code_cell("from scope.analysis.rope_report import rope_report\n\n"
                      "report = rope_report(model, windows, held_out, ps=(1, 0.5, 0) if SMALL else (1, 0.75, 0.5, 0.25, 0))\n"
                      "report.summary()"),
        new_code_cell("from scope.analysis.rope_report import usage_figure\n\nusage_figure(report.usage, 'q')"),
        new_code_cell("usage_figure(report.usage, 'k')"),
        new_code_cell("usage_figure(report.usage, 'v')  # the control: values are never rotated"),
        new_code_cell("from scope.analysis.rope_report import heads_figure\n\n"
                      "print([(h['layer'], h['head'], h['type'], round(h['score'], 2)) for h in report.heads.classify()][:10])\n"
                      "heads_figure(report)"),
        new_code_cell("from scope.analysis.rope_report import p_rope_figure\n\np_rope_figure(report)"),
        new_code_cell("from scope.analysis.rope_report import write_report\n\nwrite_report(report, f'{OUT}/rope')"),
    ],
    "05_class_embedding_projections.ipynb": [
        new_markdown_cell("# Class-embedding projections: a ViT and the logit lens on Gemma\n\nSend every intermediate "
                          "representation through the final norm onto the class embeddings and ask: is the true class "
                          "on top? (Vilas, Schaumlöffel and Roig, NeurIPS 2023; for language models, the logit lens.) "
                          "First a small ViT trained here on scikit-learn's digits against its random initialisation, "
                          "then Gemma 3 270M for the next token and for BBC topic labels. See "
                          "`docs/methods/class_embedding.md`."),
        new_code_cell(SIZES),
        new_code_cell("from scope.analysis.vision import digits, train_tiny_vit, vit_identifiability\n"
                      "from scope.analysis.class_embedding_report import ClassEmbeddingReport, layers_figure\n\n"
                      "xtr, ytr, xte, yte = digits()\n"
                      "vit, untrained = train_tiny_vit(xtr, ytr, epochs=10 if SMALL else 40, d=32 if SMALL else 64)\n"
                      "print('test accuracy', float((vit(xte).argmax(1) == yte).float().mean()))\n"
                      "vit_report = ClassEmbeddingReport(trained=vit_identifiability(vit.parts(), xte, yte),\n"
                      "                                  random=vit_identifiability(untrained.parts(), xte, yte))\n"
                      "layers_figure(vit_report, 'Tiny ViT on digits: identifiability of the image class per block')"),
        new_code_cell("from scope.models import load_model, random_init\nfrom scope.data import open_source, take_windows\n"
                      "from scope.analysis.logit_lens import lens_identifiability\n\n"
                      "model = load_model('gemma-3-270m')\n"
                      "layers = [0, 6, 12, 17] if SMALL else None\n"
                      "windows = take_windows(model.tokenizer, open_source('wiki').documents(0)[:50], 64, 200 if SMALL else 4096)\n"
                      "lens = ClassEmbeddingReport(trained=lens_identifiability(model, windows, layers=layers),\n"
                      "                            random=lens_identifiability(random_init(model), windows, layers=layers))\n"
                      "layers_figure(lens)"),
        new_code_cell("from scope.analysis.logit_lens import gemma_class_space, label_word_ids, prompt_windows\n\n"
                      "docs = open_source('bbc').documents(0)[: 8 if SMALL else 200]\n"
                      "names = sorted({d.label for d in open_source('bbc').documents(0)})\n"
                      "ids, words = label_word_ids(model.tokenizer, names)\n"
                      "topic_space = gemma_class_space(model, ids, names)\n"
                      "prompts = prompt_windows(model.tokenizer, docs, 96)\n"
                      "topics = lens_identifiability(model, prompts, [names.index(d.label) for d in docs], topic_space, layers)\n"
                      "# mean s at the last prompt position ('Topic:') per layer; 0.5 is chance\n"
                      "dict(zip([s.site for s in topics.sites], [round(r, 3) for r in topics.readout]))"),
        new_code_cell("from scope.analysis.class_embedding_report import heatmap_figure, token_heatmap\n"
                      "from scope.analysis.logit_lens import residual_sites\n\n"
                      "chain = residual_sites(model, layers)[1]\n"
                      "heatmap_figure(token_heatmap(model, gemma_class_space(model), windows[0], chain))"),
        new_code_cell("from scope.analysis.class_embedding import direction_classes\n"
                      "from scope.analysis.logit_lens import mlp_value_vectors\n\n"
                      "# Key-value memories: the tokens each of the last MLP's first value vectors promotes most\n"
                      "found = direction_classes(gemma_class_space(model), mlp_value_vectors(model, 17)[:5], k=5)\n"
                      "[found.named(i, lambda ids: [model.tokenizer.decode([t]) for t in ids])['top'] for i in range(5)]"),
    ],
    "06_reps_steering.ipynb": [
        new_markdown_cell("# RePS steering vectors, DiffMean and suppression\n\nBuild AxBench-shaped concept data "
                          "(instruction x, response y, concept-steered response y^c) for BBC *sport* from the bundled "
                          "corpus, compute the DiffMean direction from an activation store, train a rank-1 steering "
                          "vector with RePS (Wu et al. 2025, arXiv 2505.20809), steer and suppress generations on the "
                          "bundled Gemma 3 270M, and score them offline: a concept probe, the unsteered model's "
                          "perplexity and instruction relevance, each in [0, 2], combined by harmonic mean. "
                          "See `docs/methods/reps.md`."),
        new_code_cell(SIZES),
        new_code_cell("from scope.models import load_model\nfrom scope.steering import build_concept, resid_hook\n\n"
                      "model = load_model('gemma-3-270m')\nLAYER = 6\n"
                      "data = build_concept('bbc:sport', model.tokenizer, n_train=4 if SMALL else 32, n_eval=4 if SMALL else 16,\n"
                      "                     response_tokens=12 if SMALL else 32, n_classifier=16 if SMALL else 64,\n"
                      "                     text_tokens=16 if SMALL else 32)\n"
                      "print(data.summary())\ndata.train[0]"),
        new_code_cell("from scope.data import open_source\nfrom scope.store import ActivationStore, capture_store\n"
                      "from scope.steering import diffmean\n\n"
                      "store_dir = f'{OUT}/bbc-l6'\n"
                      "capture_store(model, open_source('bbc'), [resid_hook(LAYER)], store_dir, tokens=2_000 if SMALL else 60_000,\n"
                      "              context=64)\n"
                      "w_dm, info = diffmean(ActivationStore(store_dir), resid_hook(LAYER), 'bbc:sport')\n"
                      "info  # rows in and out of the concept, the layer scale r (w has norm r), the null-out threshold b"),
        new_code_cell("from scope.steering import SteerConfig, SteeringVector, train_vector\n\n"
                      "cfg = SteerConfig(concept='bbc:sport', layer=LAYER, method='reps', n_train=len(data.train),\n"
                      "                  epochs=1 if SMALL else 3, batch_size=2 if SMALL else 4)\n"
                      "reps = train_vector(model, data, cfg, f'{OUT}/reps-sport')  # resumes if interrupted\n"
                      "dm = SteeringVector(w=w_dm, b=info['b'], hook=resid_hook(LAYER), model=model.spec, concept=data.concept,\n"
                      "                    method='diffmean', scale=info['scale'])\n"
                      "reps.meta()"),
        new_code_cell("from scope.steering import generate, null_out, steering\n\n"
                      "prompt = data.steer_prompts[0].instruction\nprint(repr(prompt))\n"
                      "for alpha in (0.0, 0.25, 0.5):\n"
                      "    with steering(model, reps.hook, reps.w, alpha):  # a context manager; α = 0 adds no hook at all\n"
                      "        print(f'α = {alpha}:', generate(model, [prompt], max_new_tokens=12 if SMALL else 48)[0])"),
        new_code_cell("sport_prompt = data.suppress_prompts[0].instruction\nprint(repr(sport_prompt))\n"
                      "print('as is:     ', generate(model, [sport_prompt], max_new_tokens=12 if SMALL else 48)[0])\n"
                      "with null_out(model, reps.hook, reps.w, reps.b):  # Φ(h) = h − ReLU(h·w + b)/‖w‖² · w\n"
                      "    print('nulled out:', generate(model, [sport_prompt], max_new_tokens=12 if SMALL else 48)[0])"),
        new_code_cell("from scope.steering import alpha_figure, evaluate_vector, fit_scorer\n\n"
                      "scorer = fit_scorer(model, data)\nprint(scorer.fit, scorer.cal, sep='\\n')\n"
                      "results = [evaluate_vector(model, v, data, scorer, alphas=(0.25, 0.5) if SMALL else (0.125, 0.25, 0.5, 0.75, 1),\n"
                      "                           max_new_tokens=8 if SMALL else 32) for v in (reps, dm)]\n"
                      "for r in results:\n"
                      "    print(r.method, 'α* =', r.best_alpha, 'steer', r.steer, '\\n   unsteered', r.unsteered,\n"
                      "          '\\n   suppress', r.suppress, '\\n   no intervention', r.unsuppressed)"),
        new_code_cell("alpha_figure(results)"),
    ],
    "07_publish_dashboard.ipynb": [
        new_markdown_cell("# Publish feature dashboards\n\nTrain a JumpReLU SAE on layer-6 residual activations of the "
                          "bundled Gemma 3 270M, then compute every chosen feature's dashboard from the activation "
                          "store in one pass (top activations with their context, samples from quantile intervals, "
                          "an exact histogram, firing density, logit effects, correlated features), publish them as "
                          "a static site that opens from `file://` with no network, and export them in Neuronpedia's "
                          "upload format. See `docs/dashboards.md`."),
        new_code_cell(SIZES),
        new_code_cell("from scope.data import open_source\nfrom scope.models import load_model\n"
                      "from scope.store import ActivationStore, capture_store\nfrom scope.training import load_config, train\n\n"
                      "model = load_model('gemma-3-270m')\nstore_dir = f'{OUT}/wiki-l6'\n"
                      "capture_store(model, open_source('wiki'), ['blocks.6.hook_resid_post'], store_dir,\n"
                      "              tokens=4_000 if SMALL else 200_000)\n"
                      "cfg = load_config(data={'store': store_dir, 'trainer': {'total_tokens': 20_480 if SMALL else 1_000_000,\n"
                      "    'batch_size': 512 if SMALL else 1024, 'lr': 1e-3, 'lr_warmup_steps': 10,\n"
                      "    'sparsity_warmup_steps': 20 if SMALL else 200, 'log_every': 10},\n"
                      "    'dictionaries': [{'name': 'jumprelu', 'kind': 'jumprelu', 'd_sae': 512 if SMALL else 4096,\n"
                      "                      'sparsity_coeff': 5e-4}]})\n"
                      "sae_dir = train(cfg, f'{OUT}/run')['jumprelu']"),
        new_code_cell("from scope.dashboards import StatsConfig, feature_stats\nfrom scope.dictionaries import load\n\n"
                      "# The statistics alone, for a few features: one streaming pass over the store\n"
                      "stats = feature_stats(load(sae_dir), ActivationStore(store_dir), '0:8', cfg=StatsConfig(top_k=5))\n"
                      "busiest = max(stats, key=lambda s: s.count)\n"
                      "print(f'feature {busiest.feature}: fires on {busiest.density:.2%} of {busiest.rows:,} rows, max {busiest.max:.3g}')\n"
                      "[(e.value, model.tokenizer.decode(e.tokens)) for e in busiest.top]"),
        new_code_cell("from scope.dashboards import publish\n\n"
                      "site = f'{OUT}/dashboard'\n"
                      "done = publish(sae_dir, store_dir, site, '0:32' if SMALL else '0:500', model=model,\n"
                      "               name='Gemma 3 270M L6 JumpReLU', neuronpedia=f'{OUT}/neuronpedia')\n"
                      "print(f'open {done.index} in a browser ({len(done.features)} features, {done.seconds:.0f} s)')"),
        new_code_cell("import json\nimport plotly.graph_objects as go\nfrom scope.dashboards.site import histogram_figure, read_feature\n\n"
                      "rec = read_feature(site, busiest.feature)  # the data behind a feature's page\n"
                      "print('promotes', [t for t, _ in rec['logits']['top'][:5]], '| correlated', rec['correlated'][:3])\n"
                      "go.Figure(histogram_figure(rec))"),
        new_code_cell("# Publishing more features into the same site adds their pages and keeps the index whole\n"
                      "more = publish(sae_dir, store_dir, site, '32:40' if SMALL else '500:520', model=model,\n"
                      "               name='Gemma 3 270M L6 JumpReLU', progress=False)\n"
                      "batch = json.load(open(done.neuronpedia[0]))\n"
                      "more.site_features, batch['model_id'], batch['layer'], sorted(batch['features'][0])[:8]"),
    ],
    "08_gemma_scope_saes.ipynb": [
        new_markdown_cell("# Load Gemma Scope SAEs\n\nGemma Scope (Lieberum et al. 2024) ships its JumpReLU SAEs for "
                          "Gemma 2 as one `params.npz` per SAE (`W_enc [d, M]`, `W_dec [M, d]`, `b_enc`, `b_dec`, "
                          "`threshold`); Gemma Scope 2 ships Gemma 3 SAEs as `params.safetensors` folders. scope "
                          "reads both into its own JumpReLU dictionary, so every scope method — evaluation with the "
                          "SAE spliced in, dashboards, steering — works on them.\n\nOffline, this notebook writes a "
                          "`params.npz` in exactly Gemma Scope's layout from an SAE trained here on the bundled "
                          "Gemma 3 270M and loads it as you would a downloaded one. With network access "
                          "(`SCOPE_ONLINE=1`) it also loads the real Gemma Scope 2 release for Gemma 3 270M. "
                          "See `docs/methods/interop.md`."),
        new_code_cell(SIZES + "\nONLINE = os.environ.get('SCOPE_ONLINE') == '1'  # the hub cells need network access"),
        new_code_cell("from scope.data import open_source\nfrom scope.models import load_model\n"
                      "from scope.store import ActivationStore, capture_store\nfrom scope.training import load_config, train\n\n"
                      "model = load_model('gemma-3-270m')\nstore_dir = f'{OUT}/bbc-l6'\n"
                      "capture_store(model, open_source('bbc'), ['blocks.6.hook_resid_post'], store_dir,\n"
                      "              tokens=4_000 if SMALL else 200_000)\n"
                      "cfg = load_config(data={'store': store_dir, 'trainer': {\n"
                      "    'total_tokens': 20_480 if SMALL else 1_000_000, 'batch_size': 512 if SMALL else 2048, 'lr': 1e-3,\n"
                      "    'lr_warmup_steps': 5, 'sparsity_warmup_steps': 10 if SMALL else 100, 'log_every': 10},\n"
                      "    'dictionaries': [{'name': 'jumprelu', 'kind': 'jumprelu', 'd_sae': 512 if SMALL else 4096,\n"
                      "                      'sparsity_coeff': 5e-4}]})\nsaved = train(cfg, f'{OUT}/run')"),
        new_markdown_cell("## A `params.npz` on disk\n\nThe file a Gemma Scope download gives you, here written from "
                          "the SAE just trained (the input scale is already folded into the saved weights)."),
        new_code_cell("import numpy as np\nfrom scope.dictionaries import load\n\n"
                      "weights = load(saved['jumprelu']).saved_tensors()\n"
                      "np.savez(f'{OUT}/params.npz', **{k: weights[k].numpy() for k in ('W_enc', 'W_dec', 'b_enc', 'b_dec', 'threshold')})\n"
                      "{k: v.shape for k, v in np.load(f'{OUT}/params.npz').items()}"),
        new_code_cell("from scope.dictionaries.interop import load_gemma_scope\n\n"
                      "sae = load_gemma_scope(f'{OUT}/params.npz', hook='blocks.6.hook_resid_post', model='gemma-3-270m')\n"
                      "sae.cfg"),
        new_code_cell("import torch\n\n# The Gemma Scope maths by hand: f = z * (z > threshold), z = x W_enc + b_enc\n"
                      "p = np.load(f'{OUT}/params.npz')\n"
                      "x = next(ActivationStore(store_dir).batches('blocks.6.hook_resid_post', batch_size=64))\n"
                      "z = x.numpy() @ p['W_enc'] + p['b_enc']\nf = z * (z > p['threshold'])\n"
                      "gap = float(np.abs(sae.encode(x).detach().numpy() - f).max())\n"
                      "assert gap < 1e-3, gap  # scope's encode is Gemma Scope's JumpReLU\n"
                      "print('max difference to scope encode:', gap)\n"
                      "print('L0 on this batch:', float((f > 0).sum(1).mean()))"),
        new_code_cell("from scope.evals import evaluate\n\n"
                      "held_out = ActivationStore(store_dir).split(0.1)[1]\n"
                      "m = evaluate(sae, held_out, model=model, lm_tokens=128 if SMALL else 4096, name='gemma-scope-layout')\n"
                      "{k: m[k] for k in ('l0', 'fvu', 'dead_fraction')} | {k: m['lm'][k] for k in ('clean_ce', 'spliced_ce', 'delta_loss')}"),
        new_markdown_cell("## The real release (needs network access)\n\nGemma Scope 2 covers Gemma 3 270M; the same "
                          "call takes a Gemma Scope 1 repo such as `google/gemma-scope-2b-pt-res` with "
                          "`layer_20/width_16k/average_l0_71` for Gemma 2 2B (`load_model('google/gemma-2-2b')`)."),
        new_code_cell("if ONLINE:\n    from scope.hooks import capture\n\n"
                      "    real = load_gemma_scope('google/gemma-scope-2-270m-pt', 'resid_post/layer_12_width_16k_l0_medium')\n"
                      "    ids = model.tokenizer('The Eiffel Tower is in Paris.', return_tensors='pt').input_ids\n"
                      "    acts = capture(model, ids, [real.cfg.hook])[real.cfg.hook][0, 1:]\n"
                      "    print(real.cfg.hook, real.cfg.d_sae, 'latents; L0 per token', (real.encode(acts) > 0).sum(-1).tolist())\n"
                      "else:\n    print('offline: set SCOPE_ONLINE=1 to load google/gemma-scope-2-270m-pt from the hub')"),
    ],
    "09_feature_analysis.ipynb": [
        new_markdown_cell("# Feature analysis: an SAE spliced into the model\n\nThe Gemma Scope tutorial's workflow on the "
                          "bundled Gemma 3 270M: splice an SAE into the model, see which features fire on which token "
                          "of *The Eiffel Tower is located in the city of*, open the top feature's dashboard, ablate it "
                          "and watch ` Paris` move, find the features that drive ` Paris` (attribution patching and "
                          "direct logit attribution, checked against exact ablations), and steer with a feature's "
                          "decoder direction. SAELens users know the splice as `HookedSAETransformer.run_with_saes`; "
                          "here it is the context manager `spliced(model, saes)`.\n\nOffline, the SAE is a JumpReLU "
                          "trained here on BBC text at layer 6; with network access (`SCOPE_ONLINE=1`) the last cell "
                          "also runs the prompt through the real Gemma Scope 2 release. See "
                          "`docs/methods/feature_analysis.md`."),
        new_code_cell(SIZES + "\nONLINE = os.environ.get('SCOPE_ONLINE') == '1'  # the hub cell needs network access\n"
                      "PROMPT = 'The Eiffel Tower is located in the city of'\nHOOK = 'blocks.6.hook_resid_post'"),
        new_code_cell("from scope.data import open_source\nfrom scope.dictionaries import load\nfrom scope.models import load_model\n"
                      "from scope.store import ActivationStore, capture_store\nfrom scope.training import load_config, train\n\n"
                      "model = load_model('gemma-3-270m')\nstore_dir = f'{OUT}/bbc-l6'\n"
                      "capture_store(model, open_source('bbc'), [HOOK], store_dir, tokens=4_000 if SMALL else 200_000)\n"
                      "cfg = load_config(data={'store': store_dir, 'trainer': {\n"
                      "    'total_tokens': 20_480 if SMALL else 1_000_000, 'batch_size': 512 if SMALL else 2048, 'lr': 1e-3,\n"
                      "    'lr_warmup_steps': 5, 'sparsity_warmup_steps': 10 if SMALL else 100, 'log_every': 10},\n"
                      "    'dictionaries': [{'name': 'jumprelu', 'kind': 'jumprelu', 'd_sae': 512 if SMALL else 4096,\n"
                      "                      'sparsity_coeff': 5e-4}]})\n"
                      "sae_dir = train(cfg, f'{OUT}/run')['jumprelu']\nsae = load(sae_dir)\nsae.cfg"),
        new_markdown_cell("## The splice\n\nInside `spliced(...)` every forward pass (and generation) runs with the SAE "
                          "at its hook, and `sp.acts[hook]` holds the features of every token. With `error_term=True` "
                          "the reconstruction error is added back, so the model's output is exactly the clean one."),
        new_code_cell("import torch\nfrom scope.analysis.splice import prompt_tokens, spliced\n\n"
                      "ids = prompt_tokens(model, PROMPT)\nwith torch.no_grad():\n    clean = model.bridge(ids)\n"
                      "    with spliced(model, sae, error_term=True) as sp:\n        kept = model.bridge(ids)\n"
                      "    with spliced(model, sae):\n        replaced = model.bridge(ids)\n"
                      "print('error term: logits equal the clean ones:', torch.equal(kept, clean))\n"
                      "print('reconstruction alone: top next token', repr(model.tokenizer.decode(replaced[0, -1].argmax())),\n"
                      "      'vs clean', repr(model.tokenizer.decode(clean[0, -1].argmax())))\n"
                      "sp.acts[HOOK].shape  # [batch, position, feature]"),
        new_markdown_cell("## Features of the prompt"),
        new_code_cell("from scope.analysis.features import prompt_features\n\n"
                      "found = prompt_features(model, sae, PROMPT, k=5)\nfound.to_frame().head(10)"),
        new_code_cell("found.figure(15)"),
        new_markdown_cell("## The dashboard of the top feature\n\nPublish the prompt's strongest features as a "
                          "static site (the same pages `scope dashboard publish` writes); feature ids then link to "
                          "their pages, in the table, the heatmap and `scope features --site`."),
        new_code_cell("from scope.dashboards import publish\nfrom scope.dashboards.links import site_links\n"
                      "from scope.dashboards.site import read_feature\n\n"
                      "last = found.tokens[-1]  # the token ' of', where the model predicts the next word\n"
                      "top = last.features[0]\nsite = f'{OUT}/dashboard'\n"
                      "publish(sae_dir, store_dir, site, sorted({top, *(f for f, _ in found.top(10))}), model=model, progress=False)\n"
                      "found = prompt_features(model, sae, PROMPT, k=5, links=site_links(site, sae))\n"
                      "page = read_feature(site, top)\n"
                      "print(f'feature {top}: fires on {page[\"density\"]:.1%} of rows; promotes', [t for t, _ in page['logits']['top'][:5]])\n"
                      "print('its page:', found.link(top))\n"
                      "[''.join(ex['tokens']) for ex in page['top'][:3]]"),
        new_markdown_cell("## Ablate it and watch ` Paris`"),
        new_code_cell("from scope.analysis.intervene import intervene\nfrom scope.analysis.splice import ablate, clamp\n\n"
                      "r = intervene(model, sae, PROMPT, ablate(top), tokens=[' Paris'])\n"
                      "print(r.tokens[0], f'KL {r.kl:.3f} nats')\nr.figure()"),
        new_code_cell("# Clamping the feature high instead, at the last position only\n"
                      "intervene(model, sae, PROMPT, clamp(top, 5 * last.values[0], positions=-1), tokens=[' Paris']).tokens"),
        new_markdown_cell("## Which features drive ` Paris`?\n\nAttribution patching (activation × gradient, one "
                          "backward pass) estimates what ablating each feature would do to log p(` Paris`); direct "
                          "logit attribution reads each feature's decoder row through the final norm onto the "
                          "unembedding. `check_attribution` measures both against the exact ablation of their top "
                          "features, one forward pass each."),
        new_code_cell("from scope.analysis.attribution import attribute, check_attribution\n\n"
                      "attr = attribute(model, sae, PROMPT, ' Paris')\n"
                      "for method in ('patching', 'dla'):\n"
                      "    c = check_attribution(model, sae, attr, n=10, method=method)\n"
                      "    print(f'{method}: rank correlation with exact ablation {c.spearman:.2f}, signs agree {c.sign_agreement:.0%}')\n"
                      "attr.to_frame(10)"),
        new_code_cell("attr.figure(10)"),
        new_code_cell("driver = attr.top(1)[0].feature\n"
                      "intervene(model, sae, PROMPT, ablate(driver), tokens=[' Paris', ' London']).tokens"),
        new_markdown_cell("## Steer with a feature\n\nFeature search finds the features most selective for BBC *sport* "
                          "documents across the store; the top one's decoder row, scaled like scope's other steering "
                          "vectors (unit direction × the layer's centred RMS norm r), steers generation. "
                          "`scope steer from-feature --sae DIR --feature N --concept bbc:sport --out RUN` makes the "
                          "same vector as a run folder that `scope steer generate` and `scope steer eval` score "
                          "beside RePS and DiffMean."),
        new_code_cell("from scope.dashboards.search import search_features\n\n"
                      "store = ActivationStore(store_dir)\n"
                      "sport = search_features(sae, store, label='bbc:sport', by='selectivity', k=5)\nsport.to_frame()"),
        new_code_cell("from scope.steering import generate, steering\nfrom scope.steering.feature import feature_vector, store_scale\n\n"
                      "vec = feature_vector(model, sae, sport.hits[0].feature, store_scale(store, HOOK))\n"
                      "prompt = 'Write a short paragraph about the weather.\\n\\n'\n"
                      "for alpha in (0.0, 0.25, 0.5):\n"
                      "    with steering(model, vec.hook, vec.w, alpha):\n"
                      "        print(f'α = {alpha}:', generate(model, [prompt], max_new_tokens=12 if SMALL else 48, temperature=0)[0])"),
        new_markdown_cell("## The real Gemma Scope 2 release (needs network access)"),
        new_code_cell("if ONLINE:\n    from scope.dictionaries.interop import load_gemma_scope\n\n"
                      "    real = load_gemma_scope('google/gemma-scope-2-270m-pt', 'resid_post/layer_12_width_16k_l0_medium')\n"
                      "    print(prompt_features(model, real, PROMPT, k=3).to_frame().head(12))\n"
                      "    print(attribute(model, real, PROMPT, ' Paris').to_frame(5))\n"
                      "else:\n    print('offline: set SCOPE_ONLINE=1 to load google/gemma-scope-2-270m-pt from the hub')"),
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
