"""`engine report` and `engine runs`: the page shows each section exactly when its table exists, its
numbers are aggregates computed in DuckDB, it is self-contained and deterministic, bad inputs fail with
one line, and a headless Chromium renders it with every image loaded."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.report import write_report
from engine.report.figures import histogram
from engine.report.mixture import binomial_band

REPO = Path(__file__).resolve().parent.parent
TERMS = ("r", "u_v", "u_t", "s")


def add_facts(store) -> None:
    """Interactions, a gate run, corruption flags (the real `corrupt` stage), validation scores that rank
    clean rows lower, and a per-layer attributions table, for every sample of the store."""
    from engine.stages.corrupt import corrupt

    con, _ = store.connect()
    ids = [r[0] for r in con.execute("select sample_id from samples order by sample_id").fetchall()]
    con.close()
    rng = np.random.default_rng(0)
    terms = rng.normal([0.3, 0.2, 0.1, 0.05], 0.25, size=(len(ids), 4))
    dominant = np.array(TERMS)[terms.argmax(1)]
    store.append("interactions", pa.table({"sample_id": ids, "run_id": ["score-1"] * len(ids), "fold": ["train"] * len(ids),
                                           **{t: terms[:, i] for i, t in enumerate(TERMS)}, "dominant": dominant}))
    valid = dominant == "u_v"
    order = np.argsort(-np.where(valid, terms[:, 1], -np.inf), kind="stable")
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(1, len(ids) + 1)
    k = int(valid.sum()) // 2
    store.append("gate", pa.table({"sample_id": ids, "run_id": ["gate-1"] * len(ids), "gate_interactions_run": ["score-1"] * len(ids),
                                   "gate_valid": valid, "gate_rank": pa.array(np.where(valid, rank, 0)).cast(pa.int64()),
                                   "gate_selected": valid & (rank <= k)}))
    corrupt(store, 0.3, "split = 'train'", seed=0, progress=False)
    con, _ = store.connect()
    flags = dict(con.execute("select sample_id, coalesce(corrupted, false) from facts").fetchall())
    con.close()
    bad = np.array([flags[i] for i in ids])
    store.append("validation", pa.table({"sample_id": ids, "model": ["tiny"] * len(ids),
                                         "ppl": np.exp(rng.normal(1 + bad, 0.5)), "val_ppl": np.exp(rng.normal(0.5 + bad, 0.4)),
                                         "p_no": rng.uniform(size=len(ids)), "run_id": ["validate-1"] * len(ids)}))
    layers = np.arange(12)
    store.db.create_table("attributions", pa.table({
        "model": ["tiny"] * 12, "adapter": pa.nulls(12, pa.string()), "layer": layers, "selection": ["split = 'test'"] * 12,
        "n": [2000] * 12, "R": 0.1 + 0.01 * layers, "U_I": 0.3 - 0.01 * layers, "U_T": 0.2 + 0.02 * layers, "S": [0.05] * 12,
        "CT": (0.2 + 0.02 * layers) / (0.5 + 0.01 * layers), "CI": (0.3 - 0.01 * layers) / (0.5 + 0.01 * layers)}))


def write_eval(folder: Path, clean_accuracy: float = 0.5) -> Path:
    """An `engine eval` folder: report.json (NaN ΔP when clean accuracy is 0) and predictions.parquet."""
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    nan = float("nan")
    corruption = {c: {str(s): {"accuracy": max(0.0, clean_accuracy - 0.08 * s), "dropped": 0,
                               "delta_p_mean": (-0.08 * s / clean_accuracy) if clean_accuracy else nan, "delta_p_sd": 0.02 if clean_accuracy else nan}
                      for s in (1, 2, 3)} for c in ("gaussian_noise", "insert")}
    report = {"clean": {"accuracy": clean_accuracy, "n": 40}, "corruption": corruption,
              "interference": {"UF": {"n": 20, "accuracy_original": clean_accuracy, "accuracy_perturbed": 0.0, "causal_effect": 0.35},
                               "RP": {"n": 20, "accuracy_original": clean_accuracy, "accuracy_perturbed": 0.25, "causal_effect": 0.0}}}
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    pq.write_table(pa.table({"condition": ["clean"] * 4 + ["interference:UF"] * 2, "severity": [0] * 6, "seed": [0] * 6,
                             "sample_id": ["a", "b", "c", "d", "a", "b"], "task_kind": ["vqa"] * 4 + ["image_heavy"] * 2,
                             "prediction": ["x"] * 6, "answer": ["x", "y", "x", "y", "y", "y"],
                             "correct": [True, False, True, False, False, True]}), folder / "predictions.parquet")
    return folder


def build_mixture(store, path: Path) -> Path:
    from engine.recipes import build, load_recipe

    recipe = load_recipe(REPO / "recipes" / "cauldron_r50.yaml", [
        "redundancy.captioner=sample-annotations", "mixture.budget=200", f"output.path={path}", "output.formats=[parquet]",
        "perturb.image_heavy.unrelated_facts=0.25", "perturb.text_heavy.black=0.25"])
    return build(store, recipe, progress=False).path


@pytest.fixture
def full(sample_store, tmp_path):
    add_facts(sample_store)
    return sample_store, build_mixture(sample_store, tmp_path / "mixture"), write_eval(tmp_path / "eval")


def text_of(html: str) -> str:
    """The page's visible text (tags dropped), to match numbers as a person reads them."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_every_section_appears_when_its_table_exists_and_the_page_is_self_contained(full, tmp_path):
    store, mixture, eval_dir = full
    result = write_report(store, tmp_path / "out" / "report.html", mixture, eval_dir)
    assert result.sections == ["store", "interactions", "captions", "validation", "attributions", "mixture", "eval"]
    html = result.path.read_text()
    sources = re.findall(r'<img[^>]* src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(href|src)="(https?:|//)', html) and "<script" not in html and "<link" not in html
    # every inlined image is also a PNG beside the page, byte for byte
    files = sorted(result.folder.glob("*.png"))
    assert result.images == len(files) == len(sources)
    on_disk = {f.read_bytes() for f in files}
    assert all(__import__("base64").b64decode(s.split(",", 1)[1]) in on_disk for s in sources)
    text = text_of(html)
    con, _ = store.connect()
    total, rejected = con.execute("select (select count(*) from samples), (select count(*) from rejects)").fetchone()
    gated, selected = con.execute("select count(*), count_if(gate_selected) from gate").fetchone()
    manifest = json.loads((mixture / "manifest.json").read_text())
    assert f"all {total:,} {total:,}" in text  # the split total row of the store table
    assert "turn 0 has no answer" in text and rejected == 5
    assert f"{gated:,} rows went through the newest gate run" in text and f"{selected:,} are selected" in text
    assert hashlib.sha256((mixture / "manifest.json").read_bytes()).hexdigest() in text
    assert manifest["recipe_sha256"] in text
    for kind, count in manifest["rows"]["variants"].items():
        assert f"{kind} {count:,}" in text
    assert "tiny" in text and "interference:UF image_heavy 2 1 0" in text


def test_sections_are_left_out_without_their_tables(sample_store, tmp_path):
    result = write_report(sample_store, tmp_path / "r.html")
    assert result.sections == ["store", "captions"]
    html = result.path.read_text()
    assert "Interactions" not in html and "Validation" not in html and "Attributions" not in html


def test_the_same_store_gives_the_same_page(full, tmp_path):
    store, mixture, eval_dir = full
    first = write_report(store, tmp_path / "a" / "report.html", mixture, eval_dir).path.read_bytes()
    second = write_report(store, tmp_path / "b" / "report.html", mixture, eval_dir).path.read_bytes()
    assert first == second


def test_histograms_are_counted_in_sql_with_shared_clamped_bins():
    import duckdb

    con = duckdb.connect()
    con.execute("create table t as select (i % 2)::VARCHAR as g, i::DOUBLE as v from range(1000) r(i)")
    con.execute("insert into t values ('0', 1e9), ('1', NULL), ('1', 'nan'::DOUBLE)")
    edges, counts = histogram(con, "t", "v", "g", bins=10)
    assert len(edges) == 11 and set(counts) == {"0", "1"}
    assert counts["0"].sum() == 501 and counts["1"].sum() == 500  # the outlier lands in the last bin, NULL/NaN nowhere
    values = np.append(np.arange(1000.0), 1e9)
    groups = np.append(np.arange(1000) % 2, 0)
    low, high = np.quantile(values, [0.005, 0.995])  # both groups together, DuckDB's quantile_cont
    assert edges[0] == pytest.approx(low) and edges[-1] == pytest.approx(high)
    index = np.clip(np.floor((values - low) / ((high - low) / 10)), 0, 9).astype(int)
    for g in (0, 1):
        assert counts[str(g)].tolist() == np.bincount(index[groups == g], minlength=10).tolist()
    edges, counts = histogram(con, "t", "v % 5", bins=40, discrete=True)
    assert np.allclose(edges, [-0.5, 0.5, 1.5, 2.5, 3.5, 4.5]) and counts["all"].tolist() == [201, 200, 200, 200, 200]
    assert histogram(con, "t", "v", where="false") is None


def test_binomial_band():
    low, high = binomial_band(0.5, 100)
    assert low == pytest.approx(0.5 - 1.959964 * 0.05) and high == pytest.approx(0.5 + 1.959964 * 0.05)
    assert binomial_band(0.0, 10) == (0.0, 0.0)


def test_tier_fractions_sit_inside_their_band(full, tmp_path):
    store, mixture, _ = full
    html = text_of(write_report(store, tmp_path / "r.html", mixture).path.read_text())
    rows = json.loads((mixture / "manifest.json").read_text())["rows"]
    for category, n in rows["by_category"].items():
        k = rows["captioned_by_category"][category]
        low, high = binomial_band(0.5, n)
        assert f"{category} {n:,} {k:,} {k / n:,.3f} {low:,.3f} {high:,.3f}" in html


def test_zero_clean_accuracy_still_draws_accuracy_and_says_dp_is_undefined(sample_store, tmp_path):
    result = write_report(sample_store, tmp_path / "r.html", eval_dir=write_eval(tmp_path / "eval", clean_accuracy=0.0))
    text = text_of(result.path.read_text())
    assert "gaussian_noise 1 0.000 – –" in text and "UF 20 0.000 0.000 0.350" in text
    assert (result.folder / "eval_severity.png").exists() and (result.folder / "eval_interference.png").exists()


def test_bad_inputs_fail_with_one_line_and_write_nothing(sample_store, tmp_path):
    runner = CliRunner()
    out = tmp_path / "r.html"
    base = ["--store", str(sample_store.root), "report", "--out", str(out)]
    result = runner.invoke(main, base + ["--mixture", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no manifest.json" in result.output and len(result.output.strip().splitlines()) == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text('{"plan": {},\n "rows": oops}')
    result = runner.invoke(main, base + ["--mixture", str(broken)])
    assert result.exit_code == 2 and f"{broken / 'manifest.json'}:2: not valid JSON" in result.output
    (broken / "report.json").write_text("[1, 2]")
    result = runner.invoke(main, base + ["--eval", str(broken)])
    assert result.exit_code == 2 and "key 'clean' missing" in result.output
    (broken / "report.json").write_text('{"clean": {"accuracy": 0.5}, "corruption": {"insert": [0.1]}}')
    result = runner.invoke(main, base + ["--eval", str(broken)])
    assert result.exit_code == 2 and "corruption.insert: expected" in result.output
    (broken / "report.json").write_text('{"clean": {"accuracy": 0.5}}')
    (broken / "predictions.parquet").write_bytes(b"not parquet")
    result = runner.invoke(main, base + ["--eval", str(broken)])
    assert result.exit_code == 2 and "predictions.parquet: cannot be read" in result.output
    result = runner.invoke(main, ["--store", str(sample_store.root), "report", "--out", str(tmp_path / "r.txt")])
    assert result.exit_code == 2 and "ending in .html" in result.output
    assert not out.exists() and not list(tmp_path.glob("*_files")) and not list(tmp_path.glob(".*tmp"))


def test_runs_lists_stage_model_rows_and_config_hash(sample_store):
    result = CliRunner().invoke(main, ["--store", str(sample_store.root), "runs", "--format", "json"])
    assert result.exit_code == 0, result.output
    listed = [json.loads(line) for line in result.output.splitlines()]
    con, _ = sample_store.connect()
    stored = con.execute("select run_id, stage, config, rows from runs order by run_id").fetchall()
    assert [r["run_id"] for r in listed] == [r[0] for r in stored]
    for row, (run_id, stage, config, rows) in zip(listed, stored):
        assert row["stage"] == stage and row["rows"] == rows
        assert row["config_sha256"] == hashlib.sha256(config.encode()).hexdigest()[:12]
    assert [r["model"] for r in listed if r["stage"] == "caption"] == ["sample-annotations"]
    only = CliRunner().invoke(main, ["--store", str(sample_store.root), "runs", "--stage", "ingest", "--format", "csv"])
    assert only.output.count("ingest-") == 1 and "caption-" not in only.output


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--enable-logging=stderr", "--v=0"]

# Appended to a copy of the page only: once everything has loaded, record how many images decoded and
# any error the page raised, in an element --dump-dom prints.
CHECKER = """<script>
var errors = [];
window.addEventListener("error", function (e) { errors.push(String(e.message || e.target.src || e.type)); }, true);
window.addEventListener("load", function () {
  var images = Array.from(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var out = document.createElement("pre");
  out.id = "render-check";
  out.textContent = JSON.stringify({images: images.length, loaded: loaded, errors: errors});
  document.body.appendChild(out);
});
</script>"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no chromium installed")
def test_the_page_renders_in_headless_chromium(full, tmp_path):
    from PIL import Image

    store, mixture, eval_dir = full
    page = write_report(store, tmp_path / "report.html", mixture, eval_dir).path
    checked = page.with_name("checked.html")
    checked.write_text(page.read_text().replace("</body>", CHECKER + "</body>"))
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", checked.as_uri(), profile=tmp_path / "profile-dom")
    found = re.search(r'<pre id="render-check">(.*?)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check["images"] >= 10 and check["loaded"] == check["images"] and check["errors"] == []
    shot = tmp_path / "shot.png"
    run = chromium("--window-size=1280,2200", f"--screenshot={shot}", page.as_uri(), profile=tmp_path / "profile-shot")
    assert shot.exists(), run.stderr[-2000:]
    console = [line for line in (dom.stderr + run.stderr).splitlines() if "CONSOLE" in line]
    assert console == []
    pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"), float)
    assert pixels.shape == (2200, 1280) and pixels.std() > 20  # not a blank page
    # the header band is dark and the plots below it are drawn
    assert pixels[:60].mean() < 80 and (pixels[300:] < 128).mean() > 0.01


def test_gate_fractions_are_banded_around_the_overall_selected_share(tmp_path):
    from engine.report.figures import Canvas
    from engine.report.mixture import _fractions

    blocks = _fractions({"mode": "mi_gate", "tau": 0.2}, {"mi_gate": {"rows": 100, "k": 20, "valid": 40}},
                        {"A": 50, "B": 50}, {"A": 20, "B": 0}, Canvas(tmp_path / "files"))
    table = blocks[0]
    half = 1.959964 * (0.2 * 0.8 / 50) ** 0.5
    assert [r[:4] for r in table.rows] == [["A", 50, 20, 0.4], ["B", 50, 0, 0.0]]
    assert table.rows[0][4] == pytest.approx(0.2 - half) and table.rows[0][5] == pytest.approx(0.2 + half)
    assert [r[6] for r in table.rows] == [False, False] and "k/N = 20/100" in table.title
    assert (tmp_path / "files" / "mixture_fractions.png").exists()
    assert _fractions(None, {}, {"A": 1}, {}, Canvas(tmp_path / "files")) == []
