"""Feature dashboards: the one-pass statistics against brute force, the site, escaping, a real browser,
the Neuronpedia export, and publishing a trained SAE on the real model."""

from __future__ import annotations

import html
import json
import re
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from scope.cli import app
from scope.dashboards import StatsConfig, feature_stats, parse_features, publish, render_site, write_neuronpedia
from scope.dashboards.records import feature_record, summary, token_names
from scope.dashboards.site import safe_name
from scope.dictionaries import build
from scope.errors import ScopeError
from scope.store import ActivationStore
from test_store import synthetic_store

HOOK = "blocks.6.hook_resid_post"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def sparse_relu(d_in: int, d_sae: int, seed: int = 1, bias: float = -100.0):
    """A random ReLU dictionary whose features fire on roughly a sixth of the synthetic rows."""
    sae = build({"kind": "relu", "d_in": d_in, "d_sae": d_sae, "hook": "x"})
    sae.reset_parameters(seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(bias)
    return sae


def brute_force_windows(doc: np.ndarray, pos: np.ndarray, row: int, offsets: list[int]) -> list[int]:
    """Offsets around ``row`` that lie in its window: same document and consecutive positions all the way."""
    keep = []
    for o in offsets:
        r = row + o
        if not 0 <= r < len(doc):
            continue
        lo, hi = min(row, r), max(row, r)
        run = np.arange(lo, hi + 1)
        if (doc[run] == doc[row]).all() and (np.diff(pos[run]) == 1).all():
            keep.append(o)
    return keep


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dash") / "store")
    data = synthetic_store(path, [300, 257, 411], width=16, docs_per_shard=6)
    return ActivationStore(path), data


@pytest.mark.parametrize("view", ["all", "held-out"])
def test_top_k_contexts_counts_histograms_and_correlations_equal_brute_force(synthetic, view):
    store, data = synthetic
    if view == "held-out":  # a document view: rows are numbered in the view's own order
        store = store.split(0.4, seed=0)[1]
        keep = torch.isin(data["doc_id"], torch.tensor(sorted(store.documents)))
        data = {k: v[keep] for k, v in data.items()}
    sae = sparse_relu(16, 40)
    cfg = StatsConfig(top_k=7, batch_size=50, left=3, right=2, sample=30, intervals=4, per_interval=3, bins=64,
                      correlated=4)
    stats = feature_stats(sae, store, None, cfg=cfg, progress=False)
    with torch.no_grad():
        codes = sae.encode(data["x"]).clamp_min(0)
    doc, pos, tok = data["doc_id"].numpy(), data["position"].numpy(), data["token_id"].numpy()
    corr = np.corrcoef(codes.double().numpy().T)
    assert len(stats) == 40 and sum(s.count for s in stats) > 0
    for s in stats:
        c = codes[:, s.feature]
        firing = c[c > 0]
        assert s.rows == len(c) and s.count == len(firing)
        assert s.max == pytest.approx(float(c.max()), rel=1e-6)
        assert s.mean == pytest.approx(float(firing.mean()) if len(firing) else 0.0, rel=1e-5)
        # Top-k: the same rows and values as sorting every row of the store.
        k = min(cfg.top_k, len(firing))
        values, rows = c.topk(k)
        assert [e.row for e in s.top] == rows.tolist()
        assert np.allclose([e.value for e in s.top], values.numpy(), rtol=1e-6)
        for e in s.top:
            assert e.offsets == brute_force_windows(doc, pos, e.row, list(range(-3, 3)))
            ctx = [e.row + o for o in e.offsets]
            assert e.tokens == tok[ctx].tolist() and e.doc_id == doc[e.row] and e.position == pos[e.row]
            assert np.allclose(e.values, c[ctx].numpy(), rtol=1e-6)
        # Histogram: exact counts of the firing values between its edges.
        if len(firing):
            edges = np.asarray(s.hist_edges)
            assert edges[0] == 0 and edges[-2] <= s.max <= edges[-1]
            assert sum(s.hist_counts) == len(firing)
            idx = np.minimum((firing.numpy() / (edges[1] - edges[0])).astype(int), len(s.hist_counts) - 1)
            assert np.bincount(idx, minlength=len(s.hist_counts)).tolist() == s.hist_counts
        # Correlations: the highest Pearson r with the other features.
        r = np.nan_to_num(corr[s.feature], nan=-2)
        r[s.feature] = -2
        want = np.argsort(-r)[: len(s.correlated)]
        assert [j for j, _ in s.correlated] == want.tolist()
        assert np.allclose([v for _, v in s.correlated], r[want], atol=1e-4)


def test_quantile_samples_fall_in_their_intervals(synthetic):
    store, data = synthetic
    sae = sparse_relu(16, 24, seed=3, bias=-60.0)
    # A sample larger than any feature's firing rows holds them all: every interval shows as many as it can.
    cfg = StatsConfig(intervals=5, per_interval=4, sample=400, batch_size=64, left=2, right=2)
    stats = feature_stats(sae, store, "0:24", cfg=cfg, progress=False)
    with torch.no_grad():
        codes = sae.encode(data["x"]).clamp_min(0)
    for s in stats:
        c = codes[:, s.feature]
        firing = c[c > 0].numpy()
        if not len(firing):
            assert s.intervals == [] and s.top == []
            continue
        assert sum(iv.contains for iv in s.intervals) == pytest.approx(1.0)
        assert s.intervals[0].lo <= firing.min() and s.intervals[-1].hi == pytest.approx(s.max)
        seen = set()
        for i, iv in enumerate(s.intervals):
            last = i == len(s.intervals) - 1
            inside = (firing >= iv.lo) & ((firing <= iv.hi) if last else (firing < iv.hi))
            assert iv.contains == pytest.approx(inside.mean())  # the exact share, not an estimate
            assert len(iv.examples) == min(cfg.per_interval, int(inside.sum()))
            for e in iv.examples:
                assert iv.lo <= e.value and (e.value <= iv.hi if last else e.value < iv.hi)
                assert float(c[e.row]) == pytest.approx(e.value)  # a real firing row, with its value
                assert e.row not in seen
                seen.add(e.row)
        if len(firing) > 10:  # near-equal shares: no interval holds more than twice its due
            assert max(iv.contains for iv in s.intervals) < 2.5 / cfg.intervals


def test_the_sample_is_uniform_over_firing_rows(synthetic):
    store, data = synthetic
    sae = sparse_relu(16, 1, seed=5, bias=-20.0)
    with torch.no_grad():
        firing = (sae.encode(data["x"])[:, 0] > 0).nonzero().squeeze(1).numpy()
    hits = np.zeros(len(data["x"]))
    for seed in range(60):
        cfg = StatsConfig(intervals=1, per_interval=20, sample=20, top_k=1, seed=seed, batch_size=100, correlated=0)
        (s,) = feature_stats(sae, store, None, cfg=cfg, progress=False)
        hits[[e.row for e in s.intervals[0].examples]] += 1
    assert len(firing) > 100 and set(np.flatnonzero(hits)) <= set(firing.tolist())
    # Each firing row is kept with probability 20 / n: the counts spread like a binomial, not a block.
    expected = 60 * 20 / len(firing)
    assert abs(hits[firing].mean() - expected) < 1e-9 and hits[firing].std() < 3 * np.sqrt(expected)
    assert (hits[firing] > 0).mean() > 0.7


def test_feature_ranges_and_bad_input():
    assert parse_features("0:3,7, 9", 10) == [0, 1, 2, 7, 9]
    assert parse_features(":2", 10) == [0, 1] and parse_features("8:", 10) == [8, 9]
    assert parse_features(None, 3) == [0, 1, 2] and parse_features([4, 1, 4], 5) == [1, 4]
    for spec, message in [("0:600", "reaches past the dictionary's 512 features"), ("5:2", "is empty"),
                          ("x", "cannot read features 'x'"), ("3,600", "out of range"), ("-1", "out of range")]:
        with pytest.raises(ScopeError, match=message):
            parse_features(spec, 512)


def test_width_mismatch_and_unknown_hook(synthetic):
    store, _ = synthetic
    with pytest.raises(ScopeError, match="does not match hook 'x'.*width 16"):
        feature_stats(sparse_relu(24, 8), store, progress=False)
    with pytest.raises(ScopeError, match="has no hook 'nope'"):
        feature_stats(sparse_relu(16, 8), store, hook="nope", progress=False)


HOSTILE = ["<script>alert(1)</script>", '" onmouseover="alert(2)', "</script><script>alert(3)</script>",
           "<img src=x onerror=alert(4)>", "'&amp;'"]


def hostile_site(folder: Path, store: ActivationStore) -> dict:
    """A site whose every token and its title are attacks; returns one feature record."""
    sae = sparse_relu(16, 6)
    stats = feature_stats(sae, store, None, cfg=StatsConfig(top_k=3, per_interval=2), progress=False)
    names = token_names(stats, lambda ids: [HOSTILE[i % len(HOSTILE)] for i in ids])
    logits = {"top": [(t, 1.0) for t in HOSTILE], "bottom": [(t, -1.0) for t in HOSTILE]}
    records = [feature_record(s, names, logits) for s in stats]
    meta = {"name": '</script><b onclick="x">site</b>', "hook": "x", "model": "m<i>", "corpus": "c&", "rows": 968,
            "sae": {"kind": "relu", "d_sae": 6}}
    render_site(str(folder), records, {r["feature"]: summary(r) for r in records}, meta, progress=False)
    return next(r for r in records if r["top"])


def dead_site(folder: Path, store: ActivationStore) -> None:
    """A site whose feature 0 never fires."""
    sae = sparse_relu(16, 4)
    with torch.no_grad():
        sae.b_enc[0] = -1e9
    stats = feature_stats(sae, store, None, cfg=StatsConfig(top_k=3, per_interval=2), progress=False)
    assert stats[0].count == 0 and stats[1].count > 0
    records = [feature_record(s, token_names(stats, lambda ids: [f"t{i}" for i in ids])) for s in stats]
    meta = {"name": "dead", "hook": "x", "model": "m", "corpus": "c", "rows": 968, "sae": {"kind": "relu", "d_sae": 4}}
    render_site(str(folder), records, {r["feature"]: summary(r) for r in records}, meta, progress=False)


def test_a_dead_feature_page_says_it_never_fired(synthetic, tmp_path):
    dead_site(tmp_path / "site", synthetic[0])
    html = (tmp_path / "site" / "features" / "000000.html").read_text()
    assert "Feature 0 never fired on these 968 rows." in html and 'id="hist"' not in html
    figures = json.loads(html.split("const figures = ", 1)[1].split(";\n", 1)[0])
    assert "hist" not in figures and "shapes" not in figures["density"]["layout"]
    alive = (tmp_path / "site" / "features" / "000001.html").read_text()
    assert 'id="hist"' in alive and 'class="never"' not in alive


def test_every_token_and_user_text_is_escaped(synthetic, tmp_path):
    store, _ = synthetic
    rec = hostile_site(tmp_path / "site", store)
    pages = [tmp_path / "site" / "index.html", tmp_path / "site" / "features" / f"{rec['feature']:06d}.html"]
    for page in pages:
        html = page.read_text()
        for attack in (*HOSTILE, "<b onclick", "m<i>"):
            assert attack not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&#34; onmouseover=&#34;alert(2)" in html
        assert "&#39;&amp;amp;&#39;" in html
        # Only the site's own script tags open or close: none comes from data, also inside JSON.
        assert html.count("<script") == html.count("</script>") == (1 if page.name == "index.html" else 3)
        assert "<img" not in html and "http://" not in html and "https://" not in html
    feature_html = pages[1].read_text()
    figures_json = feature_html.split("const figures = ", 1)[1].split(";\n", 1)[0]
    assert set(json.loads(figures_json)) == {"hist", "density"}  # data through tojson still parses


def test_a_site_on_an_fsspec_url(synthetic):
    from scope.dashboards.site import read_feature, read_index
    from scope.store.fs import StoreFS

    store, _ = synthetic
    stats = feature_stats(sparse_relu(16, 4), store, None, cfg=StatsConfig(top_k=2, per_interval=1), progress=False)
    names = token_names(stats, lambda ids: [f"t{i}" for i in ids])
    records = [feature_record(s, names) for s in stats]
    meta = {"name": "memory site", "hook": "x", "model": "m", "corpus": "c", "rows": 968, "sae": {"kind": "relu", "d_sae": 4}}
    out = render_site("memory://scope-test/site", records, {r["feature"]: summary(r) for r in records}, meta,
                      progress=False)
    fs = StoreFS("memory://scope-test/site")
    assert out["index"].endswith("index.html") and fs.exists("assets/plotly.min.js")
    assert sorted(read_index("memory://scope-test/site")) == [0, 1, 2, 3]
    assert read_feature("memory://scope-test/site", 2) == json.loads(json.dumps(records[2]))
    assert b"feature-row" in fs.read_bytes("index.html") and fs.exists("features/000003.html")


def test_file_names_from_user_text_are_sanitised():
    assert safe_name("../../etc/passwd") == "etc-passwd"
    assert safe_name("a/b\\c:d*e?.json") == "a-b-c-d-e-.json"
    assert safe_name("..") == "dictionary" and safe_name("") == "dictionary"
    assert "/" not in safe_name("x/" * 100) and len(safe_name("y" * 500)) <= 80


# --- the real model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(small_store, tmp_path_factory):
    """A JumpReLU SAE with 256 latents trained briefly on the small real store."""
    from scope.training import load_config, train

    out = tmp_path_factory.mktemp("trained")
    cfg = load_config(data={"store": small_store.url, "hook": HOOK,
                            "trainer": {"total_tokens": 256 * 40, "batch_size": 256, "lr": 1e-3, "lr_warmup_steps": 5,
                                        "sparsity_warmup_steps": 10, "log_every": 10, "checkpoint_every": 1000},
                            "dictionaries": [{"name": "jr", "kind": "jumprelu", "d_sae": 256, "sparsity_coeff": 5e-4}]})
    return train(cfg, out, progress=False)["jr"]


def site_pages(folder: Path) -> tuple[list[str], list[str]]:
    """The feature pages of a site: (dashboards, pages of correlated features not published yet)."""
    pages = sorted((folder / "features").iterdir())
    stub = [p.name for p in pages if "is not published on this site yet" in p.read_text()]
    return [p.name for p in pages if p.name not in stub], stub


@pytest.fixture(scope="module")
def site(gemma, small_store, trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("site") / "site"
    done = publish(trained, small_store, str(folder), "0:40", model=gemma, name="Gemma <L6> SAE", progress=False)
    return folder, done


@pytest.mark.real_model
def test_publishing_a_trained_sae_on_the_real_model(gemma, small_store, trained, site):
    from scope.analysis.logit_lens import feature_tokens
    from scope.dictionaries import load
    from scope.store.windows import store_windows

    folder, done = site
    assert Path(done.index) == folder / "index.html" and done.features == list(range(40)) and done.site_features == 40
    pages, stubs = site_pages(folder)
    assert pages == [f"{i:06d}.html" for i in range(40)]
    correlated = {j for f in range(40) for j, _ in json.loads(
        (folder / "data" / "features" / f"{f:06d}.json").read_text())["correlated"]}
    assert stubs == [f"{j:06d}.html" for j in sorted(correlated - set(range(40)))], "a page for every link"
    assert (folder / "assets" / "plotly.min.js").stat().st_size > 1_000_000
    sae = load(trained)
    with torch.no_grad():
        x = torch.cat(list(small_store.batches(HOOK, batch_size=1000, shuffle=False)))
        codes = sae.encode(x)
    windows: dict[int, list] = {}
    for w in store_windows(small_store, gemma.tokenizer):
        windows.setdefault(w.doc_id, []).append(w)
    effects = feature_tokens(gemma, sae.W_dec.detach(), k=10, features=range(40))
    fired = 0
    for f in range(40):
        rec = json.loads((folder / "data" / "features" / f"{f:06d}.json").read_text())
        c = codes[:, f]
        assert rec["count"] == int((c > 0).sum()) and rec["density"] == pytest.approx(float((c > 0).float().mean()))
        assert rec["logits"]["top"] == [[t, pytest.approx(v, rel=1e-3)] for t, v in effects[f]["top"]]
        assert rec["logits"]["bottom"] == [[t, pytest.approx(v, rel=1e-3)] for t, v in effects[f]["bottom"]]
        if not rec["top"]:
            continue
        fired += 1
        assert rec["max"] == pytest.approx(float(c.max()), rel=1e-3) == rec["top"][0]["value"]
        # The context is the very text of the document: the tokens at those positions of a window it was cut into.
        ex = rec["top"][0]
        first = ex["position"] - ex["focus"]
        assert any(list(w.tokens[first : first + len(ex["token_ids"])]) == ex["token_ids"]
                   for w in windows.get(ex["doc_id"], []))
        assert ex["tokens"] == [gemma.tokenizer.decode([t]) for t in ex["token_ids"]]
    assert fired >= 20, "a trained SAE's features fire on the store"
    index = json.loads((folder / "data" / "index.json").read_text())["features"]
    assert [r["feature"] for r in index] == list(range(40))


@pytest.mark.real_model
def test_republishing_a_subset_rewrites_only_those_pages(gemma, small_store, trained, site, tmp_path, monkeypatch):
    import scope.store.windows as windows

    folder, _ = site
    copy = tmp_path / "site"
    shutil.copytree(folder, copy)
    before = {p.name: p.stat().st_mtime_ns for p in (copy / "features").iterdir()}
    time.sleep(0.05)
    done = publish(trained, small_store, str(copy), "3:5,40:43", model=gemma, name="Gemma <L6> SAE", progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (copy / "features").iterdir()}
    changed = sorted(n for n in after if after[n] != before.get(n) and n not in site_pages(copy)[1])
    assert changed == ["000003.html", "000004.html", "000040.html", "000041.html", "000042.html"]
    assert not set(site_pages(copy)[1]) & {"000040.html", "000041.html", "000042.html"}, "stubs became pages"
    assert done.site_features == 43
    index = json.loads((copy / "data" / "index.json").read_text())["features"]
    assert [r["feature"] for r in index] == list(range(43))
    assert (copy / "index.html").read_text().count('class="feature-row"') == 43
    # The same feature from the same computation gives the same data, whichever features share the pass.
    assert (copy / "data" / "features" / "000003.json").read_text() == (
        folder / "data" / "features" / "000003.json").read_text()
    # A correlated feature's page says how to publish it; doing so turns it into its dashboard.
    commands = {n: html.unescape(re.search(r'<pre class="command">(.*?)</pre>', (copy / "features" / n).read_text())[1])
                for n in site_pages(copy)[1]}
    stub, command = next((n, c) for n, c in commands.items() if f"--out {copy} " in c)  # one this publish wrote
    monkeypatch.setattr(windows, "load_model", lambda *a, **k: gemma)
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 0, (command, result.output)
    assert stub in site_pages(copy)[0] and json.loads((copy / "data" / "index.json").read_text())["features"][-1][
        "feature"] == int(stub[:6])
    with pytest.raises(ScopeError, match="published from a different .*settings"):
        publish(trained, small_store, str(copy), "0:2", model=gemma, cfg=StatsConfig(top_k=3), progress=False)
    done = publish(trained, small_store, str(copy), "0:2", model=gemma, cfg=StatsConfig(top_k=3), overwrite=True,
                   progress=False)
    assert done.site_features == 2 and site_pages(copy)[0] == ["000000.html", "000001.html"]


@pytest.mark.real_model
def test_neuronpedia_export_has_the_upload_shape(site, tmp_path):
    folder, _ = site
    files = write_neuronpedia(str(folder), str(tmp_path / "np"), batch_features=16)
    assert [Path(f).name for f in files] == ["batch-0.json", "batch-1.json", "batch-2.json"]
    batches = [json.loads(Path(f).read_text()) for f in files]
    assert all(b["model_id"] == "gemma-3-270m" and b["layer"] == 6 and b["sae_set"] == "Gemma-L6-SAE"
               for b in batches)
    feats = [f for b in batches for f in b["features"]]
    assert [f["feature_index"] for f in feats] == list(range(40))
    for f in feats:
        rec = json.loads((folder / "data" / "features" / f"{f['feature_index']:06d}.json").read_text())
        assert f["frac_nonzero"] == rec["density"] and len(f["pos_str"]) == len(f["pos_values"]) == 10
        assert f["neg_values"] == sorted(f["neg_values"]) and f["pos_values"] == sorted(f["pos_values"], reverse=True)
        assert sum(f["freq_hist_data_bar_heights"]) == rec["count"]
        assert f["n_tokens_in_prompt"] == 64 and f["dataset"] == "bbc" and f["neuron_alignment_indices"] == []
        assert f["correlated_features_indices"] == [j for j, _ in rec["correlated"]]
        top = [a for a in f["activations"] if a["bin_min"] == -1]
        assert len(top) == len(rec["top"]) and all(a["bin_max"] == rec["max"] and a["bin_contains"] == -1 for a in top)
        examples = rec["top"] + [e for iv in rec["intervals"] for e in iv["examples"]]
        assert len(f["activations"]) == len(examples)
        for a, e in zip(f["activations"], examples):
            assert a["tokens"] == e["tokens"] and a["values"] == e["values"]
            if a["bin_min"] != -1:  # the example's own row lies in its interval
                assert a["bin_min"] <= e["values"][e["focus"]] <= a["bin_max"] and 0 < a["bin_contains"] <= 1


def _browser():
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright  # in the dev extra
    return sync_playwright()


@pytest.mark.real_model
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_site_in_headless_chromium(site, synthetic, tmp_path):
    folder, _ = site
    rec = json.loads((folder / "data" / "features" / "000000.json").read_text())
    busiest = max(range(40), key=lambda f: json.loads((folder / "data" / "features" / f"{f:06d}.json").read_text())["count"])
    hostile = tmp_path / "hostile"
    hostile_rec = hostile_site(hostile, synthetic[0])
    dead = tmp_path / "dead"
    dead_site(dead, synthetic[0])
    busiest_rec = json.loads((folder / "data" / "features" / f"{busiest:06d}.json").read_text())
    with _browser() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        problems, requests, dialogs = [], [], []
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto((folder / "index.html").as_uri())
        rows = page.locator("tr.feature-row")
        assert rows.count() == 40 and page.locator('tr[data-feature="7"] a').get_attribute("href") == "features/000007.html"
        page.click('th[data-key="density"]')
        page.click('th[data-key="density"]')  # descending
        assert rows.first.get_attribute("data-feature") == str(busiest)
        page.fill("#search", "7")
        assert page.locator("tr.feature-row:visible").count() >= 1
        assert page.locator('tr[data-feature="7"]').is_visible() and not page.locator('tr[data-feature="8"]').is_visible()
        page.screenshot(path=str(tmp_path / "index.png"), full_page=True)
        page.click('tr[data-feature="7"] a')
        page.wait_for_selector("#logit-hist .main-svg")  # plotly drew from the local plotly.min.js
        assert page.title().startswith("Feature 7")
        seven = json.loads((folder / "data" / "features" / "000007.json").read_text())
        assert page.locator("#hist").count() == (1 if seven["count"] else 0)  # a dead feature draws no histogram
        page.goto((folder / "features" / f"{busiest:06d}.html").as_uri())
        page.wait_for_selector("#hist .main-svg")
        hot = page.locator(".examples.top .ctx").first.locator(".tok.focus")
        top = json.loads((folder / "data" / "features" / f"{busiest:06d}.json").read_text())["top"]
        assert hot.inner_text() == top[0]["tokens"][top[0]["focus"]].replace("\n", "↵").replace("\t", "⇥")
        assert float(hot.get_attribute("title")) == pytest.approx(top[0]["value"], rel=1e-3)  # the value on hover
        colour = hot.evaluate("e => getComputedStyle(e).backgroundColor")
        assert colour == "rgb(255, 122, 0)", "the top token is coloured at full strength"
        assert page.locator(".examples.top .tok.focus.on").count() == len(top)
        # Each line is centred on its peak token, which is in view with its right-hand context beside it.
        for i in range(min(5, len(top))):
            line = page.locator(".examples.top .ctx").nth(i)
            line.scroll_into_view_if_needed()
            box = line.locator(".tok.focus").bounding_box()
            text = line.locator(".text").bounding_box()
            assert 0 <= box["x"] and box["x"] + box["width"] <= 1280 and 0 <= box["y"] <= 900 - box["height"]
            assert abs(box["x"] + box["width"] / 2 - (text["x"] + text["width"] / 2)) <= 1.5
            on_top = page.evaluate("([x, y]) => document.elementFromPoint(x, y).classList.contains('focus')",
                                   [box["x"] + box["width"] / 2, box["y"] + box["height"] / 2])
            assert on_top, "nothing covers the peak token"
            after = line.locator(".after .tok")
            if after.count() and top[i]["tokens"][top[i]["focus"] + 1].strip():
                nxt = after.first.bounding_box()
                assert abs(nxt["x"] - (box["x"] + box["width"])) < 1 and nxt["x"] + nxt["width"] <= 1280
        # The histogram's title is the page's own heading: whole, and clear of plotly's toolbar.
        title = page.locator("h2.plot-title").first
        assert title.inner_text() == "Activations when firing"
        assert title.evaluate("e => e.scrollWidth <= e.clientWidth")
        page.hover("#hist .main-svg")
        bar, head = page.locator("#hist .modebar").bounding_box(), title.bounding_box()
        assert bar["y"] >= head["y"] + head["height"], "the toolbar sits below the title, inside the plot's margin"
        page.wait_for_selector("#logit-hist .main-svg")  # the logit effects over the whole vocabulary
        assert page.locator("#logit-hist .point path, #logit-hist .bars path").count() > 10
        page.wait_for_selector("#density .main-svg")  # this feature's density among the dictionary's
        assert page.locator("#density .shapelayer path").count() == 1
        # Every correlated feature is a link that opens: its dashboard, or a page saying how to publish it.
        links = page.locator(".corr a")
        assert links.count() == len(busiest_rec["correlated"]) > 0
        hrefs = [links.nth(i).get_attribute("href") for i in range(links.count())]
        assert all((folder / "features" / h).resolve().exists() for h in hrefs), hrefs
        page.screenshot(path=str(tmp_path / "feature.png"), full_page=True)
        unpublished = next(j for j, _ in busiest_rec["correlated"] if j >= 40)
        page.click(f'.corr a[href="../features/{unpublished:06d}.html"]')
        assert page.title().startswith(f"Feature {unpublished} ")
        assert "scope dashboard publish" in page.locator("pre.command").inner_text()
        assert page.locator(f'.corr a[href="../features/{busiest:06d}.html"]').count() == 1
        # A dead feature: one line saying so, no empty histogram.
        page.goto((dead / "features" / "000000.html").as_uri())
        assert page.locator(".never").inner_text().startswith("Feature 0 never fired on these")
        assert page.locator("#hist").count() == 0
        page.goto((hostile / "features" / f"{hostile_rec['feature']:06d}.html").as_uri())
        page.wait_for_selector("#hist .main-svg")
        texts = page.locator(".tok").all_inner_texts()
        assert "<script>alert(1)</script>" in texts and '" onmouseover="alert(2)' in texts
        page.goto((hostile / "index.html").as_uri())
        assert "</script><b" in page.locator("h1").inner_text()
        browser.close()
    assert rec["feature"] == 0
    assert not problems, problems
    assert not dialogs, f"a script from the data ran: {dialogs}"
    assert all(u.startswith("file://") for u in requests), [u for u in requests if not u.startswith("file://")]
    assert (tmp_path / "index.png").stat().st_size > 10_000 and (tmp_path / "feature.png").stat().st_size > 10_000


# --- the command line -----------------------------------------------------------------------------
@pytest.mark.real_model
def test_scope_dashboard_publish_and_export_from_the_command_line(gemma, small_store, trained, tmp_path, monkeypatch):
    import scope.store.windows as windows

    monkeypatch.setattr(windows, "load_model", lambda *a, **k: gemma)  # the session model; no second load
    out = tmp_path / "site"
    result = CliRunner().invoke(app, ["dashboard", "publish", "--sae", str(trained), "--store", small_store.url,
                                      "--out", str(out), "--features", "10:14", "--max-rows", "2000",
                                      "--neuronpedia", str(tmp_path / "np"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["features"] == 4 and report["first"] == 10 and report["last"] == 13 and report["rows"] == 2000
    assert Path(report["index"]).exists() and report["features_per_s"] > 0
    assert [Path(f).name for f in report["neuronpedia"]] == ["batch-0.json"]
    site_meta = json.loads((out / "site.json").read_text())
    assert site_meta["rows"] == 2000 and site_meta["sae"]["d_sae"] == 256 and site_meta["hook"] == HOOK
    result = CliRunner().invoke(app, ["dashboard", "neuronpedia", str(out), "--out", str(tmp_path / "np2")])
    assert result.exit_code == 0 and "wrote 1 Neuronpedia batch file(s)" in result.output
    assert json.loads((tmp_path / "np2" / "batch-0.json").read_text()) == json.loads(
        (tmp_path / "np" / "batch-0.json").read_text())


@pytest.mark.real_model
def test_scope_dashboard_errors_are_one_line(small_store, trained, tmp_path):
    wide = tmp_path / "wide"
    build({"kind": "relu", "d_in": 2304, "d_sae": 16, "hook": HOOK}).save(wide)
    cases = [
        (["--sae", str(trained), "--features", "0:300"], "feature range '0:300' reaches past the dictionary's 256"),
        (["--sae", str(trained), "--features", "a:b"], "cannot read features 'a:b'"),
        (["--sae", str(wide)], f"dictionary width d_in 2304 does not match hook '{HOOK}'"),
        (["--sae", str(tmp_path)], "is not a dictionary"),
        (["--sae", str(trained), "--top-k", "0"], "--top-k 0 is not accepted"),
        (["--sae", str(trained), "--hook", "blocks.9.hook_resid_post"], "has no hook 'blocks.9.hook_resid_post'"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, ["dashboard", "publish", "--store", small_store.url, "--out",
                                          str(tmp_path / "s"), *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
    result = CliRunner().invoke(app, ["dashboard", "publish", "--sae", str(trained), "--store", str(tmp_path),
                                      "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "not a scope activation store" in result.output
    result = CliRunner().invoke(app, ["dashboard", "neuronpedia", str(tmp_path), "--out", str(tmp_path / "np")])
    assert result.exit_code == 2 and "is not a published dashboard site" in result.output
    assert not (tmp_path / "s").exists(), "nothing is written before the input is checked"


def test_quickstart_refuses_bad_dashboard_input_before_any_work(tmp_path):
    import inspect

    from scope.quickstart import run_quickstart

    width = inspect.signature(run_quickstart).parameters["d_sae"].default
    for args, message in [(["--dashboard-features", f"0:{width + 1}"], f"reaches past the dictionary's {width} features"),
                          (["--dashboard-rows", "0"], "--dashboard-rows must be positive, got 0")]:
        result = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path / "qs"), *args])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "qs").exists()


def test_the_interval_sample_scales_with_what_the_intervals_show():
    # one rule for the CLI, publish() and the quickstart, so their sites' settings agree
    assert StatsConfig().sample == 200 and StatsConfig(intervals=20, per_interval=5).sample == 400
    assert StatsConfig(sample=50).sample == 50
