"""The command line as people use it: --store anywhere, a fast start, --version, examples in --help, and a
wheel that carries the project's data files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import click
from click.testing import CliRunner

from engine import __version__
from engine.cli import EXAMPLES, EngineGroup, main

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("lancedb", "lance", "duckdb", "pyarrow", "polars", "torch", "transformers", "datasets", "numpy", "ray")


def python(code: str, cwd: Path = REPO) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_store_is_taken_after_the_command_too(sample_store, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_STORE", str(tmp_path / "elsewhere"))
    sql = ["query", "select count(*) as n from samples", "--format", "csv"]
    after = CliRunner().invoke(main, [*sql, "--store", str(sample_store.root)])
    assert after.exit_code == 0 and after.output.splitlines() == ["n", "380"]
    # after the command wins over before it, which wins over ENGINE_STORE
    both = CliRunner().invoke(main, ["--store", str(tmp_path / "other"), *sql, "--store", str(sample_store.root)])
    assert both.exit_code == 0 and both.output.splitlines()[1] == "380"
    before = CliRunner().invoke(main, ["--store", str(sample_store.root), *sql])
    assert before.output.splitlines()[1] == "380"


def test_every_command_and_sub_group_takes_store():
    for name, command in main.commands.items():
        assert "--store" in command.get_help(click.Context(command, info_name=name)), name

    @click.group(cls=EngineGroup)
    def root():
        pass

    @root.group()
    def store():  # a sub-group added the usual way gets the option on its commands too
        pass

    @store.command()
    @click.pass_context
    def compact(ctx):
        click.echo(ctx.obj)

    result = CliRunner().invoke(root, ["store", "compact", "--store", "st"], obj="default")
    assert result.exit_code == 0 and result.output == "st\n"


def test_version_and_examples_in_help():
    version = CliRunner().invoke(main, ["--version"])
    assert version.exit_code == 0 and version.output == f"engine {__version__}\n"
    for verb in ("ingest", "build", "query", "caption", "validate", "eval", "embed", "score"):
        text = CliRunner().invoke(main, [verb, "--help"]).output
        examples = [line.strip() for line in text[text.index("Examples:"):].splitlines()[1:]]
        assert examples == EXAMPLES[verb] and len(examples) >= 2 and all(e.startswith(f"engine {verb} ") for e in examples)


def test_help_imports_no_heavy_library():
    """`engine --help` must start fast: the store, DuckDB, Lance and torch load only in the command that needs them."""
    loaded = python("import sys\nfrom engine.cli import main\n"
                    "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                    f"print('loaded:', *[m for m in {HEAVY!r} if m in sys.modules])")
    assert loaded.splitlines()[-1] == "loaded:"


def test_query_reads_through_lance_without_lancedb_pandas_or_polars(sample_store):
    heavy = ("lancedb", "torch", "transformers", "pandas", "polars")
    for fmt in ("csv", "table"):
        code = ("import sys\nfrom engine.cli import main\n"
                f"main(['--store', {str(sample_store.root)!r}, 'query', 'select count(*) as n from facts', '--format', {fmt!r}],"
                " standalone_mode=False)\n"
                f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
        lines = python(code).splitlines()
        assert lines[-1] == "[]", fmt
        assert lines[:-1] == ["n", "380"] if fmt == "csv" else "380" in "".join(lines)


def test_deferring_pandas_keeps_to_pandas_working():
    code = ("import sys\nfrom engine.query import defer_pandas\ndefer_pandas()\nimport lance, pyarrow as pa\n"
            "print('pandas' in sys.modules)\nprint(pa.table({'a': [1, 2]}).to_pandas()['a'].sum())")
    assert python(code).splitlines() == ["False", "3"]


def test_a_shipped_recipe_builds_by_name(sample_store, tmp_path):
    out = tmp_path / "mix"
    result = CliRunner().invoke(main, ["--store", str(sample_store.root), "build", "cauldron_r0", "--quiet",
                                       "--set", "mixture.budget=100", "--set", f"output.path={out}"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["recipe"]["name"] == "cauldron_r0"


def test_a_missing_extra_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)  # as if the classical extra were not installed
    monkeypatch.setitem(sys.modules, "skimage.feature", None)
    from engine.stages.ingest import ingest_sample
    from engine.store import Store

    ingest_sample(Store(tmp_path / "store"), tmp_path / "sample", scale=0.01, progress=False)
    embed = CliRunner().invoke(main, ["--store", str(tmp_path / "store"), "embed", "--model", "classical", "--modality", "image"])
    assert embed.exit_code == 2 and 'pip install "engine[classical]"' in embed.output


def test_wheel_carries_recipes_and_schemas(tmp_path):
    """A non-editable install works: the wheel holds every file of recipes/ and schemas/, where engine.paths
    finds them."""
    source = tmp_path / "src"
    for name in ("engine", "recipes", "schemas"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "_data"))
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-c", "from setuptools import build_meta; build_meta.build_wheel('dist')"],
                   cwd=source, check=True, capture_output=True, timeout=120)
    wheel = next((source / "dist").glob("engine-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("recipes", "schemas"):
        expected = {f"engine/_data/{folder}/{p.relative_to(REPO / folder)}" for p in (REPO / folder).rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts}
        assert expected and expected <= names, expected - names
    assert "engine/paths.py" in names and "engine/recipes/build.py" in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist")]
    assert "torch>=2.4" in requires and "datasets>=4.0" in requires and not any("==" in r.split(";")[0] for r in requires)
    # unpacked away from the checkout, the package reads its own copies
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    found = subprocess.run([sys.executable, "-c", "import json, engine.paths as p, engine.store as s; "
                            "print(json.dumps([str(p.SCHEMAS_DIR), str(p.RECIPES_DIR), len(s.table_specs())]))"],
                           cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=120)
    schemas, recipes, tables = json.loads(found.stdout)
    assert schemas == str(site / "engine/_data/schemas") and recipes == str(site / "engine/_data/recipes") and tables >= 8
