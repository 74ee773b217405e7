"""The store and the build under misuse: hostile filters, concurrent writers, kills, wrong paths."""

import datetime as dt
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import REPO
from engine.cli import main
from engine.recipes import RecipeError, load_recipe
from engine.store import Store

INJECTION = "true) limit 0; copy (select 'x') to 'PWNED.csv'; select 1 where (true"
RECIPE = """\
name: hard
where: "split = 'train'"
mixture: {budget: 20}
output: {path: OUT}
"""


def cli(store, *args):
    return CliRunner().invoke(main, ["--store", str(store), *args])


def recipe_file(tmp_path, out, text=RECIPE):
    path = tmp_path / "recipe.yaml"
    path.write_text(text.replace("OUT", str(out)))
    return path


# -- item 2: a filter is exactly one expression ------------------------------------------------------
@pytest.mark.parametrize("text", [
    INJECTION,
    "a) or (b",                       # would escape the parentheses it is put in
    "x = 1) --",                      # a comment hiding the rest of the query
    "x = 1 -- note",
    "true) union select 2 where (true",
    "true) group by (1",
    "u_v > s;",
    "",
])
def test_a_filter_that_is_not_one_expression_is_refused(text):
    from engine.sql import WhereError, check_expression

    with pytest.raises(WhereError):
        check_expression(text)


@pytest.mark.parametrize("text", [
    "split = 'train' and subset not in ('a)', 'b') and not coalesce(corrupted, false)",
    "exists (select 1 from samples s where s.sample_id = sample_id)",
    "\"subset\" = ';--'",
])
def test_one_expression_passes_unchanged(text):
    from engine.sql import check_expression

    assert check_expression(text) == text


def test_a_recipe_where_with_statements_is_refused_at_its_line_and_writes_nothing(sample_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = RECIPE.replace("split = 'train'", INJECTION.replace("'", "''")).replace('"', "'", 2)
    path = recipe_file(tmp_path, tmp_path / "out", text)
    with pytest.raises(RecipeError, match=r"recipe.yaml:2: where: .*unbalanced"):
        load_recipe(path)
    result = cli(sample_store.root, "build", str(path))
    assert result.exit_code == 2 and "where:" in result.output
    assert not (tmp_path / "PWNED.csv").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [
    ["embed", "--modality", "image", "--model", "classical"],
    ["score", "--image-model", "a", "--text-model", "b"],
    ["gate", "--tau", "0.5"],
    ["caption", "--model", "nowhere"],
    ["validate", "--model", "nowhere"],
    ["corrupt", "--fraction", "0.5"],
    ["facts", "--model", "nowhere"],
    ["eval", "--model", "nowhere", "--out", "ev"],
])
def test_every_where_flag_is_checked_before_anything_runs(sample_store, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    result = cli(sample_store.root, *command, "--where", INJECTION)
    assert result.exit_code == 2
    assert result.output.startswith("error: --where: ")
    assert not (tmp_path / "PWNED.csv").exists()


def test_a_recipe_where_cannot_read_other_files(sample_store, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    text = RECIPE.replace('"split = \'train\'"', f"\"exists (from read_text('{secret}'))\"")
    result = cli(sample_store.root, "build", str(recipe_file(tmp_path, tmp_path / "out", text)))
    assert result.exit_code == 2 and "where: invalid SQL: Permission Error" in result.output


def test_a_recipe_where_must_be_boolean(sample_store, tmp_path):
    path = recipe_file(tmp_path, tmp_path / "out", RECIPE.replace("split = 'train'", "label"))
    result = cli(sample_store.root, "build", str(path))
    assert result.exit_code == 2 and "where: expected a boolean expression" in result.output


# -- item 9: one-line errors ---------------------------------------------------------------------------
def test_a_where_matching_no_row_nan_and_non_utf8_give_one_line(sample_store, tmp_path):
    empty = recipe_file(tmp_path, tmp_path / "out", RECIPE.replace("split = 'train'", "split = 'nope'"))
    result = cli(sample_store.root, "build", str(empty))
    assert result.exit_code == 2 and "recipe.yaml:2: where: matches no categorised row" in result.output
    nan = recipe_file(tmp_path, tmp_path / "out", RECIPE + "redundancy: {level: .nan, captioner: c}\n")
    result = cli(sample_store.root, "build", str(nan))
    assert result.exit_code == 2 and "recipe.yaml:5: redundancy.level: expected a finite number, got nan" in result.output
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(RECIPE.replace("OUT", "o").encode() + b"# caf\xe9\n")
    result = cli(sample_store.root, "build", str(latin))
    assert result.exit_code == 2 and "latin.yaml:5: (top level): not UTF-8 text (byte 0xe9)" in result.output
    assert len(result.output.strip().splitlines()) == 1


# -- item 1: a build replaces only its own mixture -----------------------------------------------------
def test_build_never_replaces_what_it_did_not_write(sample_store, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("x")
    for out, message in [(notes, "not a mixture this engine built"), (sample_store.root, "is the store"),
                         (tmp_path, "contains the store"), (sample_store.root / "mix", "inside the store")]:
        result = cli(sample_store.root, "build", str(recipe_file(tmp_path, out)))
        assert result.exit_code == 2 and f"output.path: {out} " in result.output and message in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert (notes / "keep.txt").read_text() == "x"
    assert Store(sample_store.root, create=False).has("samples")
    mixture = tmp_path / "mix"
    assert cli(sample_store.root, "build", str(recipe_file(tmp_path, mixture))).exit_code == 0
    assert cli(sample_store.root, "build", str(recipe_file(tmp_path, mixture))).exit_code == 0  # its own: replaced
    (mixture / "parquet" / "mine.txt").write_text("y")
    result = cli(sample_store.root, "build", str(recipe_file(tmp_path, mixture)))
    assert result.exit_code == 2 and "e.g. parquet/mine.txt" in result.output
    assert (mixture / "parquet" / "mine.txt").exists()


# -- item 15: temp folders of killed builds ------------------------------------------------------------
def test_stale_temp_folders_of_dead_builds_are_removed_live_ones_kept(sample_store, tmp_path):
    from engine.recipes.output import _HOST

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    mixture = tmp_path / "mix"
    stale = [tmp_path / f".mix.tmp-{dead_pid}", tmp_path / f".mix.tmp-{_HOST}-{dead_pid}"]
    kept = [tmp_path / f".mix.tmp-{_HOST}-{os.getpid()}x", tmp_path / f".mix.tmp-otherhost-{dead_pid}",
            tmp_path / f".other.tmp-{dead_pid}", tmp_path / f".mix.tmp-{os.getppid()}"]
    for folder in stale + kept:
        folder.mkdir()
        (folder / "part").write_bytes(b"0" * 100)
    assert cli(sample_store.root, "build", str(recipe_file(tmp_path, mixture))).exit_code == 0
    assert not any(folder.exists() for folder in stale)
    assert all(folder.exists() for folder in kept)


# -- item 4: a table whose creation was killed -----------------------------------------------------------
def test_a_half_created_table_is_recreated(sample_store):
    folder = sample_store.root / "captions.lance"
    import shutil

    shutil.rmtree(folder)
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "junk.lance").write_bytes(b"partial")
    store = Store(sample_store.root)
    assert not store.has("captions") and store.table("captions") is None
    store.append("captions", [{"sample_id": "a", "captioner": "c", "prompt_id": "p", "caption": "x"}])
    assert store.arrow("captions", ["sample_id"]).num_rows == 1
    assert not (folder / "data" / "junk.lance").exists()


# -- item 5: concurrent writers ----------------------------------------------------------------------------
def test_two_writers_that_both_found_an_id_missing_write_it_once(tmp_path):
    first, second = Store(tmp_path / "st"), Store(tmp_path / "st")
    rows = [{"sample_id": f"s{i}", "source": "t"} for i in range(5)]
    first.append("samples", rows[:3])
    second.append("samples", rows)  # computed "not done" before the first committed
    first.append("samples", rows[3:])
    first.append("rejects", [{"sample_id": "r", "stage": "ingest", "reason": "bad"}])
    second.append("rejects", [{"sample_id": "r", "stage": "ingest", "reason": "bad"}])
    ids = Store(tmp_path / "st").arrow("samples", ["sample_id"]).column("sample_id").to_pylist()
    assert sorted(ids) == [f"s{i}" for i in range(5)]
    assert Store(tmp_path / "st").arrow("rejects").num_rows == 1


def test_appends_after_compaction_and_deletes_see_the_true_contents(tmp_path):
    store = Store(tmp_path / "st")
    for i in range(4):
        store.append("samples", [{"sample_id": f"s{i}"}])
    store.compact("samples", dt.timedelta(0))
    store.dataset("samples").delete("sample_id = 's1'")
    store.append("samples", [{"sample_id": "s1"}, {"sample_id": "s2"}])
    assert sorted(store.arrow("samples", ["sample_id"]).column("sample_id").to_pylist()) == ["s0", "s1", "s2", "s3"]


@pytest.mark.slow
def test_two_concurrent_ingests_write_every_sample_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "engine.cli", "--store", str(tmp_path / "st"), "ingest", "sample",
               "--sample-dir", str(tmp_path / "sample"), "--quiet"]
    subprocess.run([sys.executable, "-m", "engine.cli", "sample", str(tmp_path / "sample")], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [run.communicate()[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    store = Store(tmp_path / "st", create=False)
    con, _ = store.connect()
    assert con.execute("select count(*), count(distinct sample_id) from samples").fetchone() == (3800, 3800)
    assert con.execute("select count(*) from rejects").fetchone()[0] == 5
    assert con.execute("select count(*) = count(distinct (sample_id, captioner, prompt_id)) from captions").fetchone()[0]


# -- item 13: a mistyped --store -----------------------------------------------------------------------------
def test_read_commands_on_a_missing_store_fail_and_create_nothing(tmp_path, sample_store):
    missing = tmp_path / "stor"
    for args in (["query", "select count(*) from samples"], ["build", str(recipe_file(tmp_path, tmp_path / "m"))],
                 ["corrupt", "--fraction", "0.5"], ["gate", "--tau", "0.5"], ["store", "compact"]):
        result = cli(missing, *args)
        assert result.exit_code == 2 and f"no store at {missing}" in result.output, args
        assert not missing.exists()
    (tmp_path / "plain").mkdir()
    assert "holds no store tables" in cli(tmp_path / "plain", "query", "select 1").output


# -- item 27: old versions ---------------------------------------------------------------------------------
def test_store_compact_removes_old_versions_but_keeps_a_published_mixtures(sample_store, tmp_path):
    initial = sample_store.arrow("captions", ["sample_id"]).num_rows
    for i in range(30):
        sample_store.append("captions", [{"sample_id": f"s{i}", "captioner": "c", "prompt_id": "p", "caption": "x" * 2000}])
    mixture = tmp_path / "mix"
    assert cli(sample_store.root, "build", str(recipe_file(tmp_path, mixture))).exit_code == 0
    pinned = json.loads((mixture / "manifest.json").read_text())["store_versions"]
    sample_store.append("captions", [{"sample_id": "late", "captioner": "c", "prompt_id": "p", "caption": "y"}])
    size = lambda: sum(p.stat().st_size for p in (sample_store.root / "captions.lance").rglob("*") if p.is_file())  # noqa: E731
    before = size()
    result = cli(sample_store.root, "store", "compact", "--keep-hours", "0")
    assert result.exit_code == 0, result.output
    assert size() < before
    versions = [v["version"] for v in sample_store.dataset("captions").versions()]
    assert pinned["captions"] in versions and len(versions) <= 3  # the tagged one, the compacted one and the newest
    assert sample_store.dataset("captions", pinned["captions"]).count_rows() == initial + 30
    assert sample_store.arrow("captions").num_rows == initial + 31


def test_a_mixture_a_kill_caught_mid_swap_is_put_back(sample_store, tmp_path):
    from engine.recipes.output import _HOST

    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    mixture = tmp_path / "mix"
    assert cli(sample_store.root, "build", str(recipe_file(tmp_path, mixture))).exit_code == 0
    manifest = (mixture / "manifest.json").read_text()
    mixture.rename(tmp_path / f".mix.old-{_HOST}-{dead_pid}")  # killed between publish's two renames
    from engine.recipes.output import clean_stale

    assert clean_stale(mixture) == [] and (mixture / "manifest.json").read_text() == manifest
