"""``engine build``: compile a recipe to DuckDB SQL over the store and publish the mixture atomically.

The decision runs on ids and hashes only (candidates -> per-subset quotas -> salted-hash selection ->
redundancy tier or MI gate -> caption join); images are read once, streamed from the store into the
output shards. Same recipe + same store versions => byte-identical files and manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from engine import __version__
from engine.categories import categories
from engine.recipes.mixture import allocate, hash_u64_sql, temperature_weights, tier_threshold
from engine.recipes.recipe import Recipe, RecipeError
from engine.store import Store, package_versions

TEXT_TURN = pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())])
OUTPUT_SCHEMA = pa.schema(
    [
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("texts", pa.list_(TEXT_TURN)),
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("subset", pa.string()),
        ("category", pa.string()),
        ("task_kind", pa.string()),
        ("label", pa.string()),
        ("captioned", pa.bool_()),
    ]
)
READ_BATCH_ROWS = 4096


class BuildError(RuntimeError):
    """The recipe is valid but the store cannot satisfy it (e.g. captions missing)."""


@dataclass
class BuildResult:
    path: Path
    manifest: dict
    manifest_sha256: str


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _in_list(values: list[str]) -> str:
    return "(" + ", ".join(_literal(v) for v in values) + ")"


def source_filter(recipe: Recipe) -> str:
    """SQL for the recipe's ``sources`` key (true when absent)."""
    sources = recipe.data.get("sources")
    if not sources:
        return "true"
    clauses = []
    for name, spec in sources.items():
        parts = [f"source = {_literal(name)}"]
        spec = spec or {}
        if spec.get("subsets", "all") != "all":
            parts.append(f"subset in {_in_list(spec['subsets'])}")
        if spec.get("exclude"):
            parts.append(f"subset not in {_in_list(spec['exclude'])}")
        if spec.get("splits"):
            parts.append(f"split in {_in_list(spec['splits'])}")
        clauses.append("(" + " and ".join(parts) + ")")
    return "(" + " or ".join(clauses) + ")"


def _connect(store: Store, recipe: Recipe) -> tuple[duckdb.DuckDBPyConnection, dict]:
    try:
        con, versions = store.connect(pins=recipe.data.get("facts"))
    except KeyError as error:
        raise recipe.error("facts", str(error).strip('"')) from None
    if recipe.where:
        try:
            con.execute(f"select 1 from facts where ({recipe.where}) limit 0")
        except duckdb.Error as error:
            raise recipe.error("where", f"invalid SQL: {str(error).splitlines()[0]}") from None
    unknown = set(recipe.mixture.get("category_budgets", {})) - set(categories())
    if unknown:
        raise recipe.error("mixture.category_budgets", f"unknown categories {sorted(unknown)}; known: {categories()}")
    return con, versions


def plan_quotas(counts: list[tuple[str, str, str, int]], mixture: dict) -> tuple[dict, dict]:
    """Per-category budgets, then per-subset quotas with W_i = N_i^tau inside each category.

    Parameters
    ----------
    counts
        ``(category, source, subset, available rows)`` after the recipe's filter.

    Returns
    -------
    ``{category: budget}`` and ``{(category, source, subset): quota}``.
    """
    by_category: dict[str, int] = {}
    for category, _, _, n in counts:
        by_category[category] = by_category.get(category, 0) + n
    if "category_budgets" in mixture:
        budgets = {c: min(b, by_category.get(c, 0)) for c, b in mixture["category_budgets"].items()}
    else:
        weights = temperature_weights(by_category, mixture["category_temperature"])
        budgets = allocate(mixture["budget"], weights, by_category)
    quotas = {}
    for category, budget in budgets.items():
        members = {(c, source, subset): n for c, source, subset, n in counts if c == category}
        weights = temperature_weights(members, mixture["temperature"])
        quotas.update(allocate(budget, weights, members))
    return budgets, quotas


def _select(con: duckdb.DuckDBPyConnection, recipe: Recipe) -> dict:
    """Create temp table ``selected(sample_id, category, source, subset, sel_key, captioned)``."""
    where = f"({recipe.where})" if recipe.where else "true"
    select_salt = f"select:{recipe.seed}:"
    con.execute(
        f"""create temp table candidates as
        select sample_id, source, subset, category, {hash_u64_sql(select_salt)} as sel_key
        from facts where {source_filter(recipe)} and {where}"""
    )
    uncategorised = con.execute("select count(*) from candidates where category is null").fetchone()[0]
    counts = con.execute(
        "select category, source, subset, count(*) from candidates where category is not null group by all order by all"
    ).fetchall()
    budgets, quotas = plan_quotas(counts, recipe.mixture)
    con.execute("create temp table quotas(category varchar, source varchar, subset varchar, quota bigint)")
    con.executemany("insert into quotas values (?, ?, ?, ?)", [(*key, q) for key, q in quotas.items()])
    con.execute(
        """create temp table picked as
        select c.sample_id, c.category, c.source, c.subset, c.sel_key
        from candidates c join quotas q using (category, source, subset)
        qualify row_number() over (partition by c.category, c.source, c.subset order by c.sel_key, c.sample_id) <= q.quota
        """
    )
    plan = {
        "available": {f"{s}:{sub}": n for _, s, sub, n in counts},
        "uncategorised_excluded": uncategorised,
        "category_budgets": budgets,
        "quotas": {f"{s}:{sub}": q for (_, s, sub), q in quotas.items()},
    }
    redundancy = recipe.redundancy
    if redundancy is None:
        con.execute("create temp table selected as select *, false as captioned from picked")
    elif redundancy["mode"] == "tier":
        threshold = tier_threshold(redundancy["level"])
        con.execute(
            f"""create temp table selected as
            select *, {hash_u64_sql(redundancy['salt'])}::HUGEINT < {threshold}::HUGEINT as captioned from picked"""
        )
    else:
        plan["mi_gate"] = _mi_gate(con, redundancy)
    return plan


def _mi_gate(con: duckdb.DuckDBPyConnection, redundancy: dict) -> dict:
    """MI gate (Self-Captioning MI Tuning, Algorithm 2): S_valid = rows whose largest interaction is u_v
    (synergy-dominant rows never qualify); caption the k = min(floor(tau*N), |S_valid|) of them with the
    highest u_v. N is the mixture size (``basis: mixture``) or |S_valid| (``basis: valid``)."""
    con.execute(
        """create temp table gated as
        select p.*, f.u_v,
               coalesce(f.u_v > f.s and f.u_v >= f.r and f.u_v >= f.u_t, false) as valid
        from picked p join facts f using (sample_id)"""
    )
    total, n_valid, n_scored = con.execute("select count(*), count_if(valid), count(u_v) from gated").fetchone()
    basis = total if redundancy["basis"] == "mixture" else n_valid
    k = min(int(redundancy["tau"] * basis), n_valid)
    con.execute(
        f"""create temp table selected as
        select sample_id, category, source, subset, sel_key,
               coalesce(valid and rank_u_v <= {k}, false) as captioned
        from (select *, row_number() over (partition by valid order by u_v desc, sel_key, sample_id) as rank_u_v from gated)"""
    )
    return {"rows": total, "scored": n_scored, "valid": n_valid, "k": k}


def _caption_table(con: duckdb.DuckDBPyConnection, redundancy: dict | None) -> dict:
    """Join each captioned row to its caption; apply ``on_missing``. Returns caption counts."""
    if redundancy is None:
        con.execute("create temp table caps(sample_id varchar, caption varchar)")
        return {}
    prompt = f"and prompt_id = {_literal(redundancy['prompt_id'])}" if redundancy.get("prompt_id") else ""
    con.execute(
        f"""create temp table caps as
        select sample_id, caption from captions
        where captioner = {_literal(redundancy['captioner'])} {prompt} and caption is not null
          and sample_id in (select sample_id from selected where captioned)
        qualify row_number() over (partition by sample_id order by run_id desc) = 1"""
    )
    missing = con.execute(
        "select count(*) from selected where captioned and sample_id not in (select sample_id from caps)"
    ).fetchone()[0]
    counts = {"missing_captions": missing, "on_missing": redundancy["on_missing"]}
    if missing and redundancy["on_missing"] == "fail":
        examples = [r[0] for r in con.execute(
            "select sample_id from selected where captioned and sample_id not in (select sample_id from caps) order by sample_id limit 3"
        ).fetchall()]
        raise BuildError(
            f"{missing} rows selected for captioning have no caption from captioner {redundancy['captioner']!r}"
            f" (e.g. {', '.join(examples)}); run `engine caption` for them, or set redundancy.on_missing to keep or drop"
        )
    if missing and redundancy["on_missing"] == "drop":
        con.execute("delete from selected where captioned and sample_id not in (select sample_id from caps)")
    elif missing:
        con.execute("update selected set captioned = false where captioned and sample_id not in (select sample_id from caps)")
    return counts


def _rows_sql(prefix: str) -> str:
    joiner = _literal(" " + prefix)
    return f"""
    select list_transform(s.images, lambda b: struct_pack(bytes := b, path := NULL::VARCHAR)) as images,
           case when sel.captioned
                then list_concat([struct_pack(user := s.turns[1].user || {joiner} || c.caption,
                                              assistant := s.turns[1].assistant,
                                              source := s.turns[1].source)], s.turns[2:])
                else s.turns end as texts,
           s.sample_id, s.source, s.subset, s.category, s.task_kind, s.label, sel.captioned
    from selected sel join samples s using (sample_id) left join caps c using (sample_id)
    order by sel.sel_key, sel.sample_id"""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_outputs(con, sql: str, tmp: Path, output: dict, total: int, fingerprint: str, progress: bool) -> None:
    formats = output["formats"]
    shard_rows = output["shard_rows"]
    parquet_dir = tmp / "parquet"
    parquet_dir.mkdir()
    hf_stream = tmp / "hf.arrow"
    stream = pa.ipc.new_stream(str(hf_stream), OUTPUT_SCHEMA) if "hf" in formats else None
    writer, shard, in_shard = None, 0, 0
    reader = con.sql(sql).to_arrow_reader(READ_BATCH_ROWS)
    with tqdm(total=total, desc="write mixture", unit="row", disable=not progress) as bar:
        for batch in reader:
            table = pa.Table.from_batches([batch]).cast(OUTPUT_SCHEMA)
            if stream is not None:
                stream.write_table(table)
            if "parquet" in formats:
                offset = 0
                while offset < len(table):
                    if writer is None:
                        writer = pq.ParquetWriter(parquet_dir / f"part-{shard:05d}.parquet", OUTPUT_SCHEMA, compression="zstd")
                    piece = table.slice(offset, shard_rows - in_shard)
                    writer.write_table(piece)
                    offset += len(piece)
                    in_shard += len(piece)
                    if in_shard == shard_rows:
                        writer.close()
                        writer, shard, in_shard = None, shard + 1, 0
            bar.update(len(table))
    if writer is not None:
        writer.close()
    if "parquet" in formats and shard == 0 and in_shard == 0:
        pq.write_table(OUTPUT_SCHEMA.empty_table(), parquet_dir / "part-00000.parquet", compression="zstd")
    if "parquet" not in formats:
        parquet_dir.rmdir()
    if stream is not None:
        stream.close()
        write_hf_dataset(hf_stream, tmp / "hf", fingerprint, progress=progress)
        hf_stream.unlink()


def hf_features():
    """The output's ``datasets`` features: the Cauldron schema plus provenance columns."""
    import datasets

    turn = {"user": datasets.Value("string"), "assistant": datasets.Value("string"), "source": datasets.Value("string")}
    return datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "texts": datasets.List(turn),
            "sample_id": datasets.Value("string"),
            "source": datasets.Value("string"),
            "subset": datasets.Value("string"),
            "category": datasets.Value("string"),
            "task_kind": datasets.Value("string"),
            "label": datasets.Value("string"),
            "captioned": datasets.Value("bool"),
        }
    )


def write_hf_dataset(arrow_stream: Path, out: Path, fingerprint: str, features=None, progress: bool = True) -> None:
    """``save_to_disk`` an Arrow stream file without loading it into memory (memory-mapped), under a
    fingerprint derived from the content so that rebuilds are byte-identical."""
    import datasets
    from datasets.table import MemoryMappedTable

    table = MemoryMappedTable.from_file(str(arrow_stream))
    info = datasets.DatasetInfo(features=features or hf_features())
    dataset = datasets.Dataset(table, info=info, fingerprint=fingerprint)
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        dataset.save_to_disk(str(out), max_shard_size="500MB")
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def publish(tmp: Path, final: Path) -> None:
    """Swap a finished temp folder into place; the old mixture (if any) is removed only afterwards."""
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def build(store: Store, recipe: Recipe, progress: bool = True) -> BuildResult:
    """Build a recipe's mixture from the store and publish it at ``output.path``.

    Raises
    ------
    RecipeError
        The recipe names something the store cannot answer (bad SQL, unknown category or table).
    BuildError
        The store lacks facts the recipe requires (captions, with ``on_missing: fail``).
    """
    con, versions = _connect(store, recipe)
    final = Path(recipe.output["path"])
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        plan = _select(con, recipe)
        redundancy = recipe.redundancy
        plan.update(_caption_table(con, redundancy))
        summary = con.execute(
            """select category, source || ':' || subset, count(*), count_if(captioned)
            from selected group by all order by all"""
        ).fetchall()
        total = sum(row[2] for row in summary)
        budget = recipe.mixture.get("budget") or sum(recipe.mixture["category_budgets"].values())
        fingerprint = hashlib.sha256(f"{recipe.sha256()}|{json.dumps(versions, sort_keys=True)}".encode()).hexdigest()[:16]
        _write_outputs(con, _rows_sql(redundancy["prefix"] if redundancy else ""), tmp, recipe.output, total, fingerprint, progress)
        manifest = {
            "name": recipe.name,
            "engine_version": __version__,
            "recipe": recipe.effective(),
            "recipe_sha256": recipe.sha256(),
            "store_versions": versions,
            "package_versions": {k: v for k, v in package_versions().items() if k in ("duckdb", "pyarrow", "datasets")},
            "plan": plan,
            "rows": {
                "total": total,
                "budget": budget,
                "shortfall": max(0, budget - total),
                "captioned": sum(row[3] for row in summary),
                "by_category": _sum_by(summary, 0),
                "by_subset": _sum_by(summary, 1),
                "captioned_by_category": _sum_by(summary, 0, value=3),
            },
            "files": {
                str(path.relative_to(tmp)): _sha256(path) for path in sorted(tmp.rglob("*")) if path.is_file()
            },
        }
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        (tmp / "manifest.json").write_text(text)
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        con.close()
    return BuildResult(final, manifest, hashlib.sha256(text.encode()).hexdigest())


def _sum_by(rows: list[tuple], key: int, value: int = 2) -> dict:
    out: dict = {}
    for row in rows:
        out[row[key]] = out.get(row[key], 0) + row[value]
    return dict(sorted(out.items()))


__all__ = ["BuildError", "BuildResult", "RecipeError", "build", "plan_quotas", "publish", "source_filter"]
