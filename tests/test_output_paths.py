"""Commands that write a file or folder create the folder it goes into, as people expect, and a path that
cannot be written is a one-line error."""

import pyarrow.parquet as pq
from click.testing import CliRunner

from engine.cli import main


def test_query_output_into_a_folder_that_does_not_exist(sample_store, tmp_path):
    runner = CliRunner()
    store = ["--store", str(sample_store.root)]
    result = runner.invoke(main, [*store, "query", "select count(*) as n from samples", "--format", "csv", "-o", str(tmp_path / "a" / "b" / "n.csv")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "b" / "n.csv").read_text() == "n\n380\n"
    result = runner.invoke(main, [*store, "query", "select 1 as x", "--format", "parquet", "-o", str(tmp_path / "c" / "x.parquet")])
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "c" / "x.parquet").to_pylist() == [{"x": 1}]
    (tmp_path / "file").write_text("")
    result = runner.invoke(main, [*store, "query", "select 1", "--format", "csv", "-o", str(tmp_path / "file" / "x.csv")])
    assert result.exit_code == 2 and result.output == f"error: cannot write {tmp_path / 'file' / 'x.csv'}: {tmp_path / 'file'} is a file, not a folder\n"


def test_export_into_a_folder_that_does_not_exist(sample_store, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["--store", str(sample_store.root), "build", "recipes/cauldron_r0.yaml", "--quiet",
                                  "--set", "mixture.budget=20", "--set", f"output.path={tmp_path / 'mix'}"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["export", str(tmp_path / "mix"), "--format", "parquet", "--out", str(tmp_path / "x" / "y" / "z")])
    assert result.exit_code == 0, result.output
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in (tmp_path / "x" / "y" / "z").glob("*.parquet")) == 20
    (tmp_path / "file").write_text("")
    result = runner.invoke(main, ["export", str(tmp_path / "mix"), "--format", "parquet", "--out", str(tmp_path / "file" / "z")])
    assert result.exit_code == 2 and result.output.startswith("error: cannot write") and result.output.count("\n") == 1


def test_validate_plot_into_a_folder_that_does_not_exist(sample_store, tmp_path):
    ids = sorted(sample_store.ids("samples"))[:40]
    sample_store.append("validation", [{"sample_id": s, "model": "m", "ppl": 1.0 + i, "val_ppl": 2.0 + (i * 7) % 40, "p_no": 0.5,
                                        "answer_run": "corrupt-1" if i % 4 == 0 else "original",  # the answers the flags describe
                                        "run_id": "validate-1"} for i, s in enumerate(ids)])
    sample_store.append("corruption", [{"sample_id": s, "run_id": "corrupt-1", "corrupted": i % 4 == 0} for i, s in enumerate(ids)])
    plot = tmp_path / "figures" / "new" / "pr.png"
    result = CliRunner().invoke(main, ["--store", str(sample_store.root), "validate", "--report", "--model", "m", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {plot}" in result.output
    result = CliRunner().invoke(main, ["--store", str(sample_store.root), "validate", "--report", "--model", "m", "--plot",
                                       str(plot / "under-a-file.png")])
    assert result.exit_code == 2 and result.output == f"error: cannot write {plot / 'under-a-file.png'}: {plot} is a file, not a folder\n"
