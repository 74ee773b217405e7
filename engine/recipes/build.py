"""``engine build``: compile a recipe to DuckDB SQL over the store and publish the mixture atomically.

The decision runs on ids and hashes only (candidates -> per-subset quotas -> salted-hash selection ->
redundancy tier or MI gate -> caption join -> perturbations); images are read once, streamed from the
store in storage order into the output shards. Same recipe + same store versions => byte-identical files
and manifest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from engine import __version__
from engine.categories import categories
from engine.hashing import hash_u64_sql, tier_threshold
from engine.sql import WhereError, check_filter, sql_list, sql_literal
from engine.recipes.mixture import allocate, temperature_weights
from engine.perturb.variants import (IMAGE_PERTURBATIONS, TEXT_PERTURBATIONS, misleading, replacement_image,
                                     subset_options, unrelated_facts, wrong_option)
from engine.recipes.output import (HF_IMAGE, MIXTURE_SCHEMA, TURN, MixtureWriter, OutputRefused, check_output_path,
                                   clean_stale, publish, temp_folder)
from engine.recipes.recipe import Recipe, RecipeError
from engine.store import Store, package_versions

READ_BATCH_ROWS = 65536
PAYLOAD = ["images", "turns", "sample_id", "source", "subset", "category", "task_kind", "label"]


class BuildError(RuntimeError):
    """The recipe is valid but the store cannot satisfy it (e.g. captions missing)."""


@dataclass
class BuildResult:
    path: Path
    manifest: dict
    manifest_sha256: str


def source_filter(recipe: Recipe) -> str:
    """SQL for the recipe's ``sources`` key (true when absent)."""
    sources = recipe.filled.get("sources")
    if not sources:
        return "true"
    clauses = []
    for name, spec in sources.items():
        parts = [f"source = {sql_literal(name)}"]
        if spec["subsets"] != "all":
            parts.append(f"subset in {sql_list(spec['subsets'])}")
        if spec.get("exclude"):
            parts.append(f"subset not in {sql_list(spec['exclude'])}")
        if spec.get("splits"):
            parts.append(f"split in {sql_list(spec['splits'])}")
        clauses.append("(" + " and ".join(parts) + ")")
    return "(" + " or ".join(clauses) + ")"


def _connect(store: Store, recipe: Recipe) -> tuple[duckdb.DuckDBPyConnection, dict]:
    try:
        con, versions = store.connect(pins=recipe.data.get("facts"))
    except KeyError as error:
        raise recipe.error("facts", str(error).strip('"')) from None
    # a recipe's SQL sees the store's tables only: no other files, ATTACH or extensions
    con.execute("set enable_external_access = false")
    if recipe.where:
        try:
            check_filter(con, recipe.where)
        except WhereError as error:
            raise recipe.error("where", str(error)) from None
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
    if mixture.get("budget") == "all":
        return dict(by_category), {(c, so, su): n for c, so, su, n in counts}
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
    """Create temp table ``selected(sample_id, group_id, captioned)``: the rows that fill each subset's
    quota (whole subsets as they are, partly taken ones by the smallest salted selection hash) and whether
    their redundancy tier (or the MI gate) captions them. Returns the plan for the manifest."""
    where = f"({recipe.where})" if recipe.where else "true"
    redundancy = recipe.redundancy
    tier_mode = redundancy is not None and redundancy["mode"] == "tier"
    # both hashes in one pass over the store: the second costs a fraction of a separate pass
    tier_column = f", {hash_u64_sql(redundancy['salt'])} as tier_key" if tier_mode else ""
    con.execute(
        f"""create temp table candidates as
        select sample_id, source, subset, category{tier_column}
        from facts where {source_filter(recipe)} and {where}"""
    )
    uncategorised = con.execute("select count(*) from candidates where category is null").fetchall()[0][0]
    counts = con.execute(
        "select category, source, subset, count(*) from candidates where category is not null group by all order by all"
    ).fetchall()
    if not counts:  # nothing to allocate: say which filter emptied it instead of failing further on
        if recipe.where:
            raise recipe.error("where", "matches no categorised row of the store (with the recipe's sources)")
        raise BuildError("the recipe's sources match no categorised row of the store")
    budgets, quotas = plan_quotas(counts, recipe.mixture)
    con.execute(
        "create temp table quotas(category varchar, source varchar, subset varchar, quota bigint, available bigint, group_id int)"
    )
    available = {(c, so, su): n for c, so, su, n in counts}
    con.executemany(
        "insert into quotas values (?, ?, ?, ?, ?, ?)",
        [(*key, q, available[key], i) for i, (key, q) in enumerate(sorted(quotas.items()))],
    )
    captioned = f"c.tier_key < {tier_threshold(redundancy['level'])}::HUGEINT" if tier_mode else "false"
    columns = f"c.sample_id, q.group_id, {captioned} as captioned"
    # a subset taken whole needs no ranking; only partly taken ones are ranked by the salted selection hash
    partial = f"""from (select *, {hash_u64_sql(f"select:{recipe.seed}:")} as sel_key from candidates) c
        join quotas q using (category, source, subset) where q.quota > 0 and q.quota < q.available"""
    # ordering by the 64-bit key alone is 2.5x faster than (key, id); the id only matters on a tie
    tied = con.execute(f"select count(distinct c.sel_key) < count(*) {partial}").fetchall()[0][0]
    order = "c.sel_key, c.sample_id" if tied else "c.sel_key"
    con.execute(
        f"""create temp table selected as
        select {columns} from candidates c join quotas q using (category, source, subset)
        where q.quota > 0 and q.quota >= q.available
        union all
        select {columns} {partial}
        qualify row_number() over (partition by c.category, c.source, c.subset order by {order}) <= q.quota"""
    )
    plan = {
        "available": {f"{s}:{sub}": n for _, s, sub, n in counts},
        "uncategorised_excluded": uncategorised,
        "category_budgets": budgets,
        "quotas": {f"{s}:{sub}": q for (_, s, sub), q in quotas.items()},
        "groups": sorted(quotas),
    }
    if redundancy is not None and redundancy["mode"] == "mi_gate":
        plan["mi_gate"] = _mi_gate(con, recipe)
    return plan


def _mi_gate(con: duckdb.DuckDBPyConnection, recipe: Recipe) -> dict:
    """MI gate (Self-Captioning MI Tuning, Algorithm 2) over the mixture's rows: ``engine.interactions.mi_gate``
    decides (N is the mixture size with ``basis: dataset``), over the score run the recipe pins in
    ``facts: {interactions: {run_id: ...}}``, else the newest finished one."""
    from engine.interactions.mi_gate import decide

    redundancy = recipe.redundancy
    pinned = ((recipe.data.get("facts") or {}).get("interactions") or {}).get("run_id")
    try:
        plan = decide(con, "select sample_id from selected", redundancy["tau"], redundancy["basis"],
                      pinned, redundancy.get("adjust"))
    except LookupError as error:
        raise BuildError(f"redundancy.mode mi_gate: {error}") from None
    con.execute(
        """create or replace temp table selected as
        select s.sample_id, s.group_id, d.gate_selected as captioned
        from selected s join gate_decision d using (sample_id)"""
    )
    return plan.record()


def _caption_source(redundancy: dict | None) -> str:
    """SQL for the captions a recipe injects: one captioner (and prompt template, if named). A sample
    with two matching captions (two templates, no ``prompt_id``) makes the build fail in ``_decide``."""
    if redundancy is None:
        return "select NULL::VARCHAR as sample_id, NULL::VARCHAR as caption where false"
    prompt = f" and prompt_id = {sql_literal(redundancy['prompt_id'])}" if redundancy.get("prompt_id") else ""
    return (
        f"select sample_id, caption from captions where captioner = {sql_literal(redundancy['captioner'])}"
        f"{prompt} and caption is not null"
    )


def task_kind_sql(recipe: Recipe) -> str:
    """SQL for each row's task kind in the mixture: the recipe's ``perturb.task_kind`` expression where it
    has one, else the row's own (``recipes/categories.yaml``). The variants are chosen by it and the trainer
    masks PGD by it, so both read the same kind."""
    perturb = recipe.perturb or {}
    return f"({perturb['task_kind']})" if perturb.get("task_kind") else "f.task_kind"


def perturbation_sql(recipe: Recipe) -> str:
    """SQL naming each row's perturbation (NULL for none): the rates of its task kind split [0, 1) into
    intervals, and the salted hash of the row's id falls in at most one."""
    perturb = recipe.perturb
    if not perturb:
        return "NULL::VARCHAR"
    kind = task_kind_sql(recipe)
    salt = perturb["salt"]
    cases = []
    for task_kind, names in (("image_heavy", TEXT_PERTURBATIONS), ("text_heavy", IMAGE_PERTURBATIONS)):
        rates = perturb.get(task_kind) or {}
        total, arms = 0.0, []
        for name in names:
            if rates.get(name):
                total += rates[name]
                arms.append(f"when {hash_u64_sql(f'{salt}:')}::HUGEINT < {tier_threshold(min(total, 1.0))}::HUGEINT then '{name}'")
        if total > 1 + 1e-9:
            raise recipe.error(("perturb", task_kind), f"rates add up to {total:g}; a row gets at most one perturbation, so they must add up to at most 1")
        if arms:
            cases.append(f"when {kind} = '{task_kind}' then (case {' '.join(arms)} end)")
    return f"(case {' '.join(cases)} end)" if cases else "NULL::VARCHAR"


class Perturber:
    """Builds the perturbed variant rows of a mixture batch (see ``engine.perturb.variants``)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, dataset, perturb: dict):
        self.facts, self.salt = perturb["facts"], perturb["salt"]
        self.labels, self.answers = subset_options(con)
        self.model_facts: dict[str, list[str]] = {}
        if perturb.get("facts_model"):  # the newest facts per option that this model wrote (`engine facts`)
            self.model_facts = dict(con.execute(
                """select option, facts from option_facts where model = ? and len(facts) > 0
                qualify row_number() over (partition by option order by run_id desc) = 1""", [perturb["facts_model"]]
            ).fetchall())
        self.with_model_facts = 0
        self.donors: list[tuple[str, bytes]] = []
        if (perturb.get("text_heavy") or {}).get("irrelevant_image"):
            picks = con.execute(
                f"select pos from sample_positions order by {hash_u64_sql(self.salt + ':donor-pool:')} limit 64"
            ).fetchall()
            taken = dataset.take(sorted(p[0] for p in picks), columns=["subset", "images"]).to_pylist()
            self.donors = [(row["subset"], row["images"][0]) for row in taken if row["images"]]

    def variant(self, row: dict, kind: str) -> dict | None:
        """The variant of one assembled mixture row, or None when the sample has nothing to perturb with."""
        sample_id, turns = row["sample_id"], [dict(t) for t in row["texts"]]
        images = [dict(i) for i in row["images"]]
        if kind == "unrelated_facts":
            turns[0]["user"] = unrelated_facts(turns[0]["user"], sample_id, self.facts, self.salt)
        elif kind == "misleading":
            wrong = wrong_option(turns[0]["user"], turns[0]["assistant"], row["label"], self.labels.get(row["subset"], []),
                                 self.answers.get(row["subset"], []), sample_id, self.salt)
            if wrong is None:
                return None
            turns[0]["user"] = misleading(turns[0]["user"], wrong, sample_id, salt=self.salt, model_facts=self.model_facts)
            self.with_model_facts += str(wrong).lower() in self.model_facts
        else:
            if not images:
                return None
            replaced = [replacement_image(kind, image["bytes"], sample_id, self.donors, row["subset"], self.salt) for image in images]
            if any(r is None for r in replaced):
                return None
            images = [{"bytes": data, "path": None} for data in replaced]
        return {**row, "images": images, "texts": turns, "sample_id": f"{sample_id}#{kind}", "origin_id": sample_id,
                "perturbation": kind}

    def add_variants(self, base: pa.Table, kinds: pa.Array) -> pa.Table:
        """``base`` with each perturbed row followed by its variant."""
        wanted = [i for i, kind in enumerate(kinds.to_pylist()) if kind]
        if not wanted:
            return base
        rows = base.take(wanted).to_pylist()
        variants, after = [], []
        for index, row, kind in zip(wanted, rows, (kinds[i].as_py() for i in wanted)):
            variant = self.variant(row, kind)
            if variant is not None:
                variants.append(variant)
                after.append(index)
        if not variants:
            return base
        combined = pa.concat_tables([base, pa.Table.from_pylist(variants, schema=MIXTURE_SCHEMA)])
        keys = np.concatenate([np.arange(len(base)) * 2, np.array(after) * 2 + 1])
        return combined.take(pa.array(np.argsort(keys, kind="stable")))


def _decide(con: duckdb.DuckDBPyConnection, recipe: Recipe, expected_rows: int) -> tuple[pa.Table, dict]:
    """Every selected row's storage position, provenance and caption suffix, in storage order, after the
    recipe's ``on_missing`` rule. Returns the table and the caption counts for the manifest."""
    redundancy = recipe.redundancy
    joiner = sql_literal(" " + (redundancy["prefix"] if redundancy else ""))
    corrupted = recipe.answers == "corrupted"
    replacement = "case when coalesce(f.corrupted, false) then f.replaced end" if corrupted else "NULL::VARCHAR"
    perturbation = perturbation_sql(recipe)
    task_kind = task_kind_sql(recipe) if (recipe.perturb or {}).get("task_kind") else "NULL::VARCHAR"
    facts_model = (recipe.perturb or {}).get("facts_model")
    if facts_model and not con.execute("select count(*) from option_facts where model = ?", [facts_model]).fetchall()[0][0]:
        raise recipe.error(("perturb", "facts_model"),
                           f"the store has no facts from {facts_model!r}; run `engine facts --model {facts_model}` first")
    facts_join = "left join facts f using (sample_id)" if corrupted or recipe.perturb else ""
    decisions = con.sql(
        f"""select p.pos, s.group_id, s.captioned,
                   case when s.captioned then {joiner} || c.caption end as suffix, {replacement} as replacement,
                   {perturbation} as perturbation, {task_kind} as task_kind
        from selected s join sample_positions p using (sample_id)
        left join ({_caption_source(redundancy)}) c on s.captioned and c.sample_id = s.sample_id
        {facts_join}
        order by p.pos"""
    ).to_arrow_table().combine_chunks()
    if len(decisions) != expected_rows:
        raise BuildError(
            f"{len(decisions) - expected_rows} selected rows have more than one caption from "
            f"{redundancy['captioner']!r} (captions from several prompt templates?); name one in redundancy.prompt_id"
        )
    if redundancy is None:
        return decisions, {}
    missing = pc.and_(decisions.column("captioned"), pc.is_null(decisions.column("suffix")))
    n_missing = pc.sum(missing).as_py() or 0
    counts = {"missing_captions": n_missing, "on_missing": redundancy["on_missing"]}
    if n_missing and redundancy["on_missing"] == "fail":
        positions = decisions.column("pos").filter(missing).slice(0, 3).to_pylist()
        examples = con.execute(
            f"select sample_id from sample_positions where pos in ({', '.join(map(str, positions))}) order by pos"
        ).fetchall()
        raise BuildError(
            f"{n_missing} rows selected for captioning have no caption from captioner {redundancy['captioner']!r}"
            f" (e.g. {', '.join(r[0] for r in examples)}); run `engine caption` for them,"
            " or set redundancy.on_missing to keep or drop"
        )
    if n_missing and redundancy["on_missing"] == "drop":
        decisions = decisions.filter(pc.invert(missing))
    elif n_missing:
        kept = pc.and_(decisions.column("captioned"), pc.invert(missing))
        decisions = decisions.set_column(decisions.schema.get_field_index("captioned"), "captioned", kept)
    return decisions, counts


def rewrite_first_turn(turns: pa.ListArray, suffix: pa.Array, replacement: pa.Array | None = None) -> pa.ListArray:
    """Vectorised edits of each row's first turn: append ``suffix`` (NULL = none) to the user text, i.e.
    ``text + " " + prefix + caption`` (Self-Captioning MI Tuning, §4.2), and replace the answer by
    ``replacement`` where it is not NULL (a corrupted mixture)."""
    flat = pc.list_flatten(turns)
    parent = pc.list_parent_indices(turns)
    lengths = pc.list_value_length(turns).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(turns) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    first = np.zeros(len(flat), dtype=bool)
    first[offsets[:-1][lengths > 0]] = True
    per_turn = pc.if_else(pa.array(first), pc.take(suffix, parent), pa.nulls(len(flat), pa.string()))
    users = pc.binary_join_element_wise(flat.field("user"), per_turn, "", null_handling="replace", null_replacement="")
    assistants = flat.field("assistant")
    if replacement is not None and replacement.null_count < len(replacement):
        new_answer = pc.if_else(pa.array(first), pc.take(replacement, parent), pa.nulls(len(flat), pa.string()))
        assistants = pc.coalesce(new_answer, assistants)
    fields = pa.StructArray.from_arrays([users, assistants, flat.field("source")], fields=list(TURN))
    return pa.ListArray.from_arrays(pa.array(offsets), fields)


def hf_images(images: pa.ListArray) -> pa.ListArray:
    """``list<binary>`` -> the HF Image layout ``list<struct<bytes, path>>``."""
    values = pc.list_flatten(images)
    lengths = pc.list_value_length(images).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(images) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    structs = pa.StructArray.from_arrays([values, pa.nulls(len(values), pa.string())], fields=list(HF_IMAGE))
    return pa.ListArray.from_arrays(pa.array(offsets), structs)


def assemble(rows: pa.Table, decision: pa.Table) -> pa.Table:
    """Mixture rows from ``samples`` rows plus each row's decision (captioned, suffix, replacement, and the
    task kind where the recipe sets one)."""
    column = lambda name: decision.column(name).combine_chunks()  # noqa: E731
    columns = {
        "images": hf_images(rows.column("images").combine_chunks()),
        "texts": rewrite_first_turn(rows.column("turns").combine_chunks(), column("suffix"), column("replacement")),
        **{name: rows.column(name) for name in ("sample_id", "source", "subset", "category", "label")},
        "task_kind": pc.coalesce(column("task_kind"), rows.column("task_kind").combine_chunks()),
        "captioned": column("captioned"),
        "origin_id": pa.nulls(len(rows), pa.string()),
        "perturbation": pa.nulls(len(rows), pa.string()),
    }
    return pa.Table.from_pydict(columns, schema=MIXTURE_SCHEMA)


def _stream_selected(dataset, plan: pa.Table, progress: bool, dense_fraction: float = 0.25):
    """Yield the selected ``samples`` rows in storage order, with their caption decision.

    ``plan`` holds ``pos`` (ascending storage positions), ``captioned`` and ``suffix``. A dense selection
    streams the table once and keeps its rows; a sparse one (under ``dense_fraction`` of the table)
    takes just its rows by position. Both yield the same rows in the same order.
    """
    positions = plan.column("pos").to_numpy()
    total_rows = dataset.count_rows()
    bar = tqdm(total=len(positions), desc="write mixture", unit="row", disable=not progress)
    if len(positions) >= dense_fraction * total_rows:
        batches = dataset.to_batches(columns=PAYLOAD, batch_size=READ_BATCH_ROWS, scan_in_order=True)
        start = 0
        for batch in batches:
            end = start + batch.num_rows
            lo, hi = np.searchsorted(positions, [start, end])
            if hi > lo:
                rows = pa.Table.from_batches([batch])
                if positions[hi - 1] - positions[lo] == hi - lo - 1:  # a contiguous run: slice, no copy
                    rows = rows.slice(positions[lo] - start, hi - lo)
                else:
                    rows = rows.take(pa.array(positions[lo:hi] - start))
                yield rows, plan.slice(lo, hi - lo)
                bar.update(hi - lo)
            start = end
    else:
        for lo in range(0, len(positions), READ_BATCH_ROWS):
            chunk = positions[lo : lo + READ_BATCH_ROWS]
            yield dataset.take(chunk, columns=PAYLOAD), plan.slice(lo, len(chunk))
            bar.update(len(chunk))
    bar.close()


def _write_mixture(con, dataset, decisions: pa.Table, tmp: Path, recipe: Recipe, fingerprint: str,
                   progress: bool) -> tuple[dict[str, str], dict[str, int]]:
    """Stream the selected rows (and their perturbed variants) into the output formats; returns file
    hashes and the variants written per perturbation."""
    output = recipe.output
    perturber = Perturber(con, dataset, recipe.perturb) if recipe.perturb else None
    planned = len(decisions) + (len(decisions) - decisions.column("perturbation").null_count)
    writer = MixtureWriter(tmp, output["formats"], planned, output["shard_rows"], fingerprint)
    written: dict[str, int] = {}
    try:
        for rows, decision in _stream_selected(dataset, decisions, progress):
            table = assemble(rows, decision)
            if perturber is not None:
                table = perturber.add_variants(table, decision.column("perturbation").combine_chunks())
                for kind in table.column("perturbation").drop_null().to_pylist():
                    written[kind] = written.get(kind, 0) + 1
            writer.write(table)
    finally:
        hashes = writer.close()
    if perturber is not None and perturber.model_facts:
        written["misleading_with_model_facts"] = perturber.with_model_facts
    return hashes, dict(sorted(written.items()))


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
    if "samples" not in versions:
        raise BuildError(f"the store {store.root} has no samples; run `engine ingest` first")
    dataset = store.positioned(con, versions["samples"])
    final = Path(recipe.output["path"])
    try:
        check_output_path(final, store.root)
    except OutputRefused as error:
        raise recipe.error(("output", "path"), str(error)) from None
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    tmp = temp_folder(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        plan = _select(con, recipe)
        decisions, caption_counts = _decide(con, recipe, sum(plan["quotas"].values()))
        plan.update(caption_counts)
        groups = plan.pop("groups")
        counted = decisions.group_by("group_id").aggregate([("pos", "count"), ("captioned", "sum")])
        summary = sorted(
            (groups[g][0], f"{groups[g][1]}:{groups[g][2]}", n, int(k or 0))
            for g, n, k in zip(*(counted.column(name).to_pylist() for name in ("group_id", "pos_count", "captioned_sum")))
        )
        total = len(decisions)
        budget = recipe.mixture.get("budget") or sum(recipe.mixture["category_budgets"].values())
        budget = sum(plan["quotas"].values()) if budget == "all" else budget
        fingerprint = hashlib.sha256(f"{recipe.sha256()}|{json.dumps(versions, sort_keys=True)}".encode()).hexdigest()[:16]
        files, variants = _write_mixture(con, dataset, decisions, tmp, recipe, fingerprint, progress)
        manifest = {
            "name": recipe.name,
            "engine_version": __version__,
            "recipe": recipe.effective(),
            "recipe_sha256": recipe.sha256(),
            "store_versions": versions,
            "package_versions": {k: v for k, v in package_versions().items() if k in ("duckdb", "pyarrow", "pylance")},
            "plan": plan,
            "rows": {
                "total": total,
                "budget": budget,
                "shortfall": max(0, budget - total),
                "captioned": sum(row[3] for row in summary),
                "by_category": _sum_by(summary, 0),
                "by_subset": _sum_by(summary, 1),
                "captioned_by_category": _sum_by(summary, 0, value=3),
                "variants": variants,
            },
            "files": files,
        }
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        (tmp / "manifest.json").write_text(text)
        try:  # again: something may have been put there while we built
            check_output_path(final, store.root)
        except OutputRefused as error:
            raise recipe.error(("output", "path"), str(error)) from None
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        con.close()
    # keep the store versions this mixture was built from through `engine store compact`
    store.tag_versions(f"mixture-{recipe.name}-{hashlib.sha256(str(final.resolve()).encode()).hexdigest()[:8]}", versions)
    return BuildResult(final, manifest, hashlib.sha256(text.encode()).hexdigest())


def _sum_by(rows: list[tuple], key: int, value: int = 2) -> dict:
    out: dict = {}
    for row in rows:
        out[row[key]] = out.get(row[key], 0) + row[value]
    return dict(sorted(out.items()))


__all__ = ["BuildError", "BuildResult", "RecipeError", "assemble", "build", "plan_quotas", "source_filter"]
