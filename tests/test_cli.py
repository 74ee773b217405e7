"""The command line as a user meets it: the README's main job, `engine query`, `engine export`."""

import json

import datasets
import pytest
from click.testing import CliRunner

from conftest import REPO
from engine.cli import main

README_BUILD = ["build", str(REPO / "recipes" / "cauldron_r50.yaml"), "--set", "redundancy.captioner=sample-annotations",
                "--set", "mixture.budget=2000", "--quiet"]


def run(store, *args):
    result = CliRunner().invoke(main, ["--store", str(store), *args], catch_exceptions=False)
    return result


@pytest.mark.slow
def test_readme_main_job_on_the_full_sample(tmp_path, monkeypatch):
    """`engine ingest sample` then `engine build recipes/cauldron_r50.yaml ...`, as the README runs them."""
    monkeypatch.chdir(tmp_path)
    ingested = run(tmp_path / "store", "ingest", "sample", "--quiet")
    assert ingested.exit_code == 0, ingested.output
    assert "3800 rows written, 5 rejected" in ingested.output
    built = run(tmp_path / "store", *README_BUILD, "--set", f"output.path={tmp_path / 'mix'}")
    assert built.exit_code == 0, built.output
    assert built.output.startswith("2000 rows (")
    manifest = json.loads((tmp_path / "mix" / "manifest.json").read_text())
    assert manifest["rows"]["total"] == 2000 and len(manifest["rows"]["by_category"]) == 7
    captioned = manifest["rows"]["captioned"] / 2000
    assert 0.45 < captioned < 0.55
    assert len(datasets.load_from_disk(str(tmp_path / "mix" / "hf"))) == 2000


def test_query_reads_and_refuses_writes(sample_store, tmp_path):
    table = run(sample_store.root, "query", "select category, count(*) as n from samples group by 1 order by 1")
    assert table.exit_code == 0 and "Real-world VQA" in table.output
    csv = run(sample_store.root, "query", "select subset, count(*) as n from samples group by 1 order by 1", "--format", "csv")
    assert csv.output.splitlines()[:2] == ["subset,n", "bar_charts,50"]
    lines = run(sample_store.root, "query", "select sample_id, images from samples order by sample_id limit 2", "--format", "json").output
    first = json.loads(lines.splitlines()[0])
    assert first["sample_id"] == "sample:bar_charts:train:0" and isinstance(first["images"][0], str)  # base64
    out = tmp_path / "q.parquet"
    assert run(sample_store.root, "query", "select * from rejects", "--format", "parquet", "-o", str(out)).exit_code == 0
    import pyarrow.parquet as pq

    assert pq.read_table(out).num_rows == 5
    for statement in ("delete from samples", "drop table samples", "copy samples to 'x.csv'", "create table t as select 1",
                      "select 1; select 2"):
        refused = run(sample_store.root, "query", statement)
        assert refused.exit_code == 2 and refused.output.startswith("error: ")
    assert sample_store.table("samples").count_rows() == 380
    bad = run(sample_store.root, "query", "select nope from samples")
    assert bad.exit_code == 2 and "nope" in bad.output


def test_export_formats(sample_store, tmp_path):
    built = run(sample_store.root, *README_BUILD[:-1], "--set", "mixture.budget=30", "--set", f"output.path={tmp_path / 'mix'}")
    assert built.exit_code == 0, built.output
    for fmt in ("hf", "parquet", "messages"):
        result = run(sample_store.root, "export", str(tmp_path / "mix"), "--format", fmt, "--out", str(tmp_path / fmt))
        assert result.exit_code == 0, result.output
    hf = datasets.load_from_disk(str(tmp_path / "hf"))
    assert len(hf) == 30 and hf.column_names[:2] == ["images", "texts"]
    assert sorted(p.name for p in (tmp_path / "parquet").iterdir()) == ["part-00000.parquet"]
    messages = datasets.load_from_disk(str(tmp_path / "messages"))
    row, source = messages[0], hf[0]
    assert row["messages"] == [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": source["texts"][0]["user"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": source["texts"][0]["assistant"]}]},
    ]
    assert len(row["images"]) == 1


def test_export_needs_a_built_mixture_and_push_needs_a_token(sample_store, tmp_path, monkeypatch):
    missing = run(sample_store.root, "export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"))
    assert missing.exit_code == 2 and "not a built mixture" in missing.output
    run(sample_store.root, *README_BUILD[:-1], "--set", "mixture.budget=10", "--set", f"output.path={tmp_path / 'mix'}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    pushed = run(sample_store.root, "export", str(tmp_path / "mix"), "--out", str(tmp_path / "x"), "--push", "me/mix")
    assert pushed.exit_code == 2 and "no Hugging Face token" in pushed.output


def test_build_without_samples_says_what_to_do(tmp_path):
    result = run(tmp_path / "empty", *README_BUILD)
    assert result.exit_code == 2 and "run `engine ingest` first" in result.output


# -- hardening: --quiet silences the libraries too; build summaries count variant rows ---------------------

@pytest.mark.slow
def test_quiet_silences_the_progress_bars_of_transformers_and_datasets(tmp_path, tiny_vlm):
    import os
    import subprocess
    import sys

    from conftest import REPO, png, qa

    features = datasets.Features({"images": datasets.List(datasets.Image()),
                                  "texts": datasets.List({k: datasets.Value("string") for k in ("user", "assistant", "source")})})
    rows = {"images": [[{"bytes": png(), "path": None}]] * 2, "texts": [qa("q", "a")] * 2}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "tqa"))
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # the tests' own switch off: bars as users see them
    env["PYTHONPATH"] = str(REPO)
    engine = [sys.executable, "-m", "engine.cli", "--store", str(tmp_path / "store")]
    for command in (["ingest", str(tmp_path / "tqa"), "--quiet"], ["caption", "--model", tiny_vlm, "--max-new-tokens", "2", "--quiet"]):
        done = subprocess.run(engine + command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "%|" not in done.stderr and "it/s" not in done.stderr, done.stderr  # no tqdm bar of any library
        assert len(done.stdout.strip().splitlines()) == 1


def test_a_build_with_perturbed_variants_says_how_many_rows_it_wrote(sample_store, tmp_path):
    built = run(sample_store.root, "build", str(REPO / "recipes" / "cauldron_interference.yaml"), "--quiet",
                "--set", "mixture.budget=200", "--set", f"output.path={tmp_path / 'mix'}")
    assert built.exit_code == 0, built.output
    rows = json.loads((tmp_path / "mix" / "manifest.json").read_text())["rows"]
    variants = sum(n for kind, n in rows["variants"].items() if kind != "misleading_with_model_facts")
    written = len(datasets.load_from_disk(str(tmp_path / "mix" / "hf")))
    assert rows["total"] == 200 and variants > 0 and written == 200 + variants
    assert built.output.startswith(f"{written} rows written: 200 samples ({rows['captioned']} captioned) + {variants} perturbed variants")
