"""`engine build`: quotas, tiers, caption injection, the MI gate, determinism, atomic publishing."""

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, cauldron_parquet, png, qa
from engine.stages.ingest import ingest
from engine.ingest.cauldron import ParquetFolderSource
from engine.recipes import BuildError, build, in_tier, load_recipe
from engine.store import Store

R50 = REPO / "recipes" / "cauldron_r50.yaml"
R25 = REPO / "recipes" / "cauldron_r25.yaml"
SAMPLE = ["redundancy.captioner=sample-annotations"]


def rows_of(path: Path) -> list[dict]:
    return pq.read_table(path / "parquet").to_pylist()


def files_of(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_explicit_category_budget_splits_by_square_root_of_subset_size(sample_store, tmp_path):
    # at scale 0.1 the sample has shapes_vqa 100 and shapes_yesno 25 rows: weights 10 : 5
    recipe = load_recipe(R50, SAMPLE + [f"output.path={tmp_path / 'out'}", "mixture={category_budgets: {Real-world VQA: 30}}"])
    result = build(sample_store, recipe, progress=False)
    assert result.manifest["rows"]["by_subset"] == {"sample:shapes_vqa": 20, "sample:shapes_yesno": 10}
    rows = rows_of(tmp_path / "out")
    assert len(rows) == 30 and {r["subset"] for r in rows} == {"shapes_vqa", "shapes_yesno"}
    assert len({r["sample_id"] for r in rows}) == 30


def test_budget_spreads_over_categories_and_sums_exactly(sample_store, tmp_path):
    recipe = load_recipe(R50, SAMPLE + [f"output.path={tmp_path / 'out'}", "mixture.budget=200"])
    manifest = build(sample_store, recipe, progress=False).manifest
    assert manifest["rows"]["total"] == 200 == sum(manifest["rows"]["by_category"].values())
    assert len(manifest["rows"]["by_category"]) == 7
    assert manifest["rows"]["shortfall"] == 0


def test_shortfall_is_recorded_when_the_store_has_fewer_rows(sample_store, tmp_path):
    recipe = load_recipe(R50, SAMPLE + [f"output.path={tmp_path / 'out'}"])
    rows = build(sample_store, recipe, progress=False).manifest["rows"]
    assert rows["total"] == 380 and rows["budget"] == 984_000 and rows["shortfall"] == 984_000 - 380


def test_rebuild_is_byte_identical(sample_store, tmp_path):
    first = build(sample_store, load_recipe(R50, SAMPLE + [f"output.path={tmp_path / 'a'}", "mixture.budget=150"]), progress=False)
    second = build(sample_store, load_recipe(R50, SAMPLE + [f"output.path={tmp_path / 'b'}", "mixture.budget=150"]), progress=False)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    assert first.manifest_sha256 == second.manifest_sha256
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        import hashlib

        assert hashlib.sha256((tmp_path / "a" / name).read_bytes()).hexdigest() == digest


def test_a_new_seed_picks_other_rows(sample_store, tmp_path):
    a = build(sample_store, load_recipe(R50, SAMPLE + [f"output.path={tmp_path / 'a'}", "mixture.budget=100"]), progress=False)
    b = build(sample_store, load_recipe(R50, SAMPLE + [f"output.path={tmp_path / 'b'}", "mixture.budget=100", "seed=7"]), progress=False)
    assert a.manifest["rows"]["by_subset"] == b.manifest["rows"]["by_subset"]
    assert {r["sample_id"] for r in rows_of(a.path)} != {r["sample_id"] for r in rows_of(b.path)}


def test_redundancy_tiers_nest_and_follow_the_hash(sample_store, tmp_path):
    r25 = build(sample_store, load_recipe(R25, SAMPLE + [f"output.path={tmp_path / 'r25'}"]), progress=False)
    r50 = build(sample_store, load_recipe(R50, SAMPLE + [f"output.path={tmp_path / 'r50'}"]), progress=False)
    captioned25 = {r["sample_id"] for r in rows_of(r25.path) if r["captioned"]}
    captioned50 = {r["sample_id"] for r in rows_of(r50.path) if r["captioned"]}
    assert captioned25 < captioned50
    for row in rows_of(r50.path):
        assert row["captioned"] == in_tier("redundancy-tier", row["sample_id"], 0.5)


def test_captions_are_appended_to_the_first_user_turn(sample_store, tmp_path):
    recipe = load_recipe(R50, SAMPLE + [f"output.path={tmp_path / 'out'}"])
    build(sample_store, recipe, progress=False)
    captions = {r["sample_id"]: r["caption"] for r in sample_store.arrow("captions").to_pylist()}
    original = {r["sample_id"]: r["turns"] for r in sample_store.arrow("samples", ["sample_id", "turns"]).to_pylist()}
    for row in rows_of(tmp_path / "out"):
        turns = original[row["sample_id"]]
        expected = turns[0]["user"] + " " + captions[row["sample_id"]] if row["captioned"] else turns[0]["user"]
        assert row["texts"][0]["user"] == expected
        assert row["texts"][0]["assistant"] == turns[0]["assistant"]


@pytest.fixture
def multi_turn_store(tmp_path):
    """Ten two-turn rows of subset vqav2; captions by captioner `cap` for rows 0-5 only."""
    rows = [([png()], qa(f"q{i}", f"a{i}", "vqav2") + qa(f"follow-up {i}", f"b{i}", "vqav2")) for i in range(10)]
    cauldron_parquet(tmp_path / "src" / "vqav2" / "train-00000-of-00001.parquet", rows)
    store = Store(tmp_path / "store")
    ingest(store, ParquetFolderSource(tmp_path / "src"), progress=False)
    store.append("captions", [
        {"sample_id": f"cauldron:vqav2:train:{i}", "captioner": "cap", "prompt_id": "p", "caption": f"caption {i}", "run_id": "caption-1"}
        for i in range(6)
    ])
    return store


def recipe_file(tmp_path, redundancy: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: t\nmixture: {budget: 10}\n"
        f"redundancy: {redundancy}\n"
        f"output: {{path: {tmp_path / 'out'}, formats: [parquet, hf]}}\n"
    )
    return path


def test_prefix_and_only_the_first_turn(multi_turn_store, tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, "{level: 1.0, captioner: cap, prefix: 'Image: ', on_missing: keep}"))
    manifest = build(multi_turn_store, recipe, progress=False).manifest
    assert manifest["plan"]["missing_captions"] == 4 and manifest["rows"]["captioned"] == 6
    by_id = {r["sample_id"]: r for r in rows_of(tmp_path / "out")}
    first = by_id["cauldron:vqav2:train:3"]
    assert first["captioned"] and first["texts"][0]["user"] == "q3 Image: caption 3"
    assert first["texts"][1] == {"user": "follow-up 3", "assistant": "b3", "source": "vqav2"}
    kept = by_id["cauldron:vqav2:train:8"]
    assert not kept["captioned"] and kept["texts"][0]["user"] == "q8"


def test_missing_captions_fail_by_default_and_name_the_rows(multi_turn_store, tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, "{level: 1.0, captioner: cap}"))
    with pytest.raises(BuildError, match=r"4 rows selected for captioning have no caption from captioner 'cap' \(e\.g\. cauldron:vqav2:train:6, cauldron:vqav2:train:7, cauldron:vqav2:train:8\)"):
        build(multi_turn_store, recipe, progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_captions_can_drop_rows(multi_turn_store, tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, "{level: 1.0, captioner: cap, on_missing: drop}"))
    manifest = build(multi_turn_store, recipe, progress=False).manifest
    assert manifest["rows"]["total"] == 6 and manifest["rows"]["captioned"] == 6
    assert sorted(r["sample_id"] for r in rows_of(tmp_path / "out")) == [f"cauldron:vqav2:train:{i}" for i in range(6)]


def test_two_prompt_templates_need_a_choice(multi_turn_store, tmp_path):
    multi_turn_store.append("captions", [{"sample_id": "cauldron:vqav2:train:0", "captioner": "cap", "prompt_id": "other",
                                          "caption": "another", "run_id": "caption-2"}])
    with pytest.raises(BuildError, match="name one in redundancy.prompt_id"):
        build(multi_turn_store, load_recipe(recipe_file(tmp_path, "{level: 1.0, captioner: cap, on_missing: keep}")), progress=False)
    recipe = load_recipe(recipe_file(tmp_path, "{level: 1.0, captioner: cap, prompt_id: other, on_missing: keep}"))
    rows = rows_of(build(multi_turn_store, recipe, progress=False).path)
    assert [r["texts"][0]["user"] for r in rows if r["captioned"]] == ["q0 another"]


def test_failed_build_keeps_the_previous_mixture(multi_turn_store, tmp_path):
    good = load_recipe(recipe_file(tmp_path, "{level: 1.0, captioner: cap, on_missing: keep}"))
    build(multi_turn_store, good, progress=False)
    before = files_of(tmp_path / "out")
    with pytest.raises(BuildError):
        build(multi_turn_store, load_recipe(recipe_file(tmp_path, "{level: 1.0, captioner: cap}")), progress=False)
    assert files_of(tmp_path / "out") == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def interactions(values: dict[int, tuple[float, float, float, float]], run_id: str) -> list[dict]:
    return [{"sample_id": f"cauldron:vqav2:train:{i}", "run_id": run_id, "r": r, "u_v": u_v, "u_t": u_t, "s": s}
            for i, (r, u_v, u_t, s) in values.items()]


def scored(store: Store, values: dict[int, tuple[float, float, float, float]], run_id: str, config: dict | None = None) -> None:
    """Interactions of one finished score run (its rows, then its ``runs`` row)."""
    import datetime as dt

    store.append("interactions", interactions(values, run_id))
    store.record_run(run_id, "score", config or {}, dt.datetime.now(dt.timezone.utc), len(values))


def test_mi_gate_captions_the_top_u_v_dominant_rows_and_never_synergy(multi_turn_store, tmp_path):
    values = {
        0: (0.1, 0.9, 0.0, 0.0),   # u_v dominant, highest u_v
        1: (0.1, 0.7, 0.0, 0.0),   # u_v dominant
        2: (0.1, 0.5, 0.0, 0.0),   # u_v dominant
        3: (0.1, 0.3, 0.0, 0.0),   # u_v dominant, lowest
        4: (0.0, 2.0, 0.0, 3.0),   # synergy dominant despite the largest u_v: never
        5: (0.9, 0.8, 0.0, 0.0),   # redundancy dominant
        6: (0.0, 0.4, 0.6, 0.0),   # text dominant
        7: (0.0, 1.0, 0.0, 1.0),   # u_v ties with synergy: not captioned
    }
    scored(multi_turn_store, values, "score-1")
    multi_turn_store.append("captions", [
        {"sample_id": f"cauldron:vqav2:train:{i}", "captioner": "cap", "prompt_id": "p", "caption": f"caption {i}", "run_id": "caption-1"}
        for i in range(6, 10)
    ])
    # Algorithm 2: N = 10 rows in the mixture, tau = 0.3 -> k = min(3, |S_valid| = 4) = 3
    recipe = load_recipe(recipe_file(tmp_path, "{mode: mi_gate, tau: 0.3, captioner: cap}"))
    manifest = build(multi_turn_store, recipe, progress=False).manifest
    assert manifest["plan"]["mi_gate"] == {"rows": 10, "scored": 8, "valid": 4, "k": 3, "interactions_run": "score-1",
                                           "adjust": "none", "adjust_constant": 0.0}
    captioned = sorted(r["sample_id"] for r in rows_of(tmp_path / "out") if r["captioned"])
    assert captioned == [f"cauldron:vqav2:train:{i}" for i in (0, 1, 2)]
    # the reference code's basis: floor(tau * |S_valid|) = floor(0.3 * 4) = 1
    recipe = load_recipe(recipe_file(tmp_path, "{mode: mi_gate, tau: 0.3, basis: valid, captioner: cap}"))
    assert build(multi_turn_store, recipe, progress=False).manifest["rows"]["captioned"] == 1


def test_mi_gate_reads_one_score_run_not_the_newest_value_per_sample(multi_turn_store, tmp_path):
    # a full run, then a partial rescoring of rows 0-1 by another fit whose values sit on another scale
    scored(multi_turn_store, {i: (0.0, 0.1 * (i + 1), 0.0, 0.0) for i in range(10)}, "score-20260101T000000-aaaa")
    scored(multi_turn_store, {0: (0.0, 5.0, 0.0, 0.0), 1: (0.0, 4.0, 0.0, 0.0)}, "score-20260202T000000-bbbb")
    multi_turn_store.append("captions", [
        {"sample_id": f"cauldron:vqav2:train:{i}", "captioner": "cap", "prompt_id": "p", "caption": "c", "run_id": "caption-1"}
        for i in range(6, 10)])  # rows 0-5 have theirs
    captioned = lambda manifest: sorted(r["sample_id"][-1] for r in rows_of(tmp_path / "out") if r["captioned"])  # noqa: E731
    # the newest finished run: its two rows are all the gate can rank (the other 8 are not scored by it)
    manifest = build(multi_turn_store, load_recipe(recipe_file(tmp_path, "{mode: mi_gate, tau: 0.3, captioner: cap}")), progress=False).manifest
    assert manifest["plan"]["mi_gate"]["interactions_run"] == "score-20260202T000000-bbbb"
    assert (manifest["plan"]["mi_gate"]["scored"], manifest["plan"]["mi_gate"]["k"]) == (2, 2)
    assert captioned(manifest) == ["0", "1"]
    # pinned to the full run: the top 3 of one fit (newest-per-sample would have taken 0, 1 and 9)
    path = tmp_path / "pinned.yaml"
    path.write_text(recipe_file(tmp_path, "{mode: mi_gate, tau: 0.3, captioner: cap}").read_text()
                    + "facts: {interactions: {run_id: score-20260101T000000-aaaa}}\n")
    manifest = build(multi_turn_store, load_recipe(path), progress=False).manifest
    assert captioned(manifest) == ["7", "8", "9"]


def test_mi_gate_needs_positive_finite_u_v_and_breaks_ties_by_sample_id(multi_turn_store, tmp_path):
    nan = float("nan")
    values = {0: (0.0, 0.0, -1.0, -1.0),   # u_v = 0 is the largest term: not eligible (nothing to move)
              1: (nan, 0.5, 0.0, 0.0),     # a NaN term: not eligible
              2: (0.0, nan, 0.0, 0.0),     # NaN u_v (DuckDB would rank it above every number)
              3: (0.0, 0.5, 0.0, 0.0), 4: (0.0, 0.5, 0.0, 0.0), 5: (0.0, 0.5, 0.0, 0.0)}  # a three-way tie
    scored(multi_turn_store, values, "score-1")
    multi_turn_store.append("captions", [
        {"sample_id": f"cauldron:vqav2:train:{i}", "captioner": "cap", "prompt_id": "p", "caption": "c", "run_id": "caption-1"}
        for i in range(6, 10)])  # rows 0-5 have theirs
    recipe = load_recipe(recipe_file(tmp_path, "{mode: mi_gate, tau: 0.2, captioner: cap}"))
    manifest = build(multi_turn_store, recipe, progress=False).manifest
    assert (manifest["plan"]["mi_gate"]["valid"], manifest["plan"]["mi_gate"]["k"]) == (3, 2)
    assert sorted(r["sample_id"][-1] for r in rows_of(tmp_path / "out") if r["captioned"]) == ["3", "4"]


@pytest.mark.parametrize("basis", ["dataset", "valid"])
def test_engine_gate_and_the_recipe_mode_pick_the_same_rows(multi_turn_store, tmp_path, basis):
    from engine.interactions import gate

    values = {i: (0.1 * (i % 3), 0.05 * i, 0.02 * i, 0.3 if i == 8 else 0.0) for i in range(10)}
    values[4] = (0.0, 0.45, 0.0, 0.0)  # ties with row 9's u_v
    scored(multi_turn_store, values, "score-1")
    multi_turn_store.append("captions", [
        {"sample_id": f"cauldron:vqav2:train:{i}", "captioner": "cap", "prompt_id": "p", "caption": "c", "run_id": "caption-1"}
        for i in range(6, 10)])
    _, plan = gate(multi_turn_store, 0.5, basis, where="true")
    con, _ = multi_turn_store.connect()
    by_gate = [r[0] for r in con.execute("select sample_id from facts where gate_selected order by 1").fetchall()]
    recipe = load_recipe(recipe_file(tmp_path, f"{{mode: mi_gate, tau: 0.5, basis: {basis}, captioner: cap}}"))
    manifest = build(multi_turn_store, recipe, progress=False).manifest
    assert manifest["plan"]["mi_gate"] == plan.record()
    assert sorted(r["sample_id"] for r in rows_of(tmp_path / "out") if r["captioned"]) == by_gate and by_gate


def test_mi_gate_follows_the_score_runs_adjustment_unless_the_recipe_names_one(multi_turn_store, tmp_path):
    # means R = -0.1, S = 0: c = 0.1 moves r and s up and u_v down by 0.1
    values = {0: (-1.0, 1.0, 0.0, 0.0), 1: (0.0, 0.15, 0.0, 0.0), 2: (0.0, 0.05, 0.0, 0.0)}
    scored(multi_turn_store, values | {i: (0.0, 0.0, 0.0, 0.0) for i in range(3, 10)}, "score-1", {"adjust": "rus"})
    gate_plan = lambda extra: build(multi_turn_store, load_recipe(recipe_file(  # noqa: E731
        tmp_path, f"{{mode: mi_gate, tau: 1.0, captioner: cap, on_missing: keep{extra}}}")), progress=False).manifest["plan"]["mi_gate"]
    plan = gate_plan("")
    assert (plan["adjust"], plan["adjust_constant"], plan["valid"]) == ("rus", pytest.approx(0.1), 1)  # row 1: 0.05 < s 0.1
    plan = gate_plan(", adjust: none")
    assert (plan["adjust"], plan["adjust_constant"], plan["valid"]) == ("none", 0.0, 3)


def test_mi_gate_without_a_score_run_fails_with_one_line(multi_turn_store, tmp_path):
    with pytest.raises(BuildError, match="no finished score run in the store; run `engine score` first"):
        build(multi_turn_store, load_recipe(recipe_file(tmp_path, "{mode: mi_gate, tau: 0.3, captioner: cap}")), progress=False)


def test_newest_run_wins_unless_the_recipe_pins_one(multi_turn_store, tmp_path):
    multi_turn_store.append("interactions", interactions({0: (0.0, 1.0, 0.0, 0.0)}, "score-20260101T000000"))
    multi_turn_store.append("interactions", interactions({0: (1.0, 0.0, 0.0, 0.0)}, "score-20260202T000000"))
    con, _ = multi_turn_store.connect()
    assert con.execute("select r, u_v from facts where sample_id = 'cauldron:vqav2:train:0'").fetchall() == [(1.0, 0.0)]
    con, _ = multi_turn_store.connect({"interactions": {"run_id": "score-20260101T000000"}})
    assert con.execute("select r, u_v from facts where sample_id = 'cauldron:vqav2:train:0'").fetchall() == [(0.0, 1.0)]
    assert con.execute("select count(*) from facts").fetchall() == [(10,)]


def test_missing_fact_tables_join_as_typed_nulls(multi_turn_store):
    con, _ = multi_turn_store.connect()
    row = con.execute("select r, val_ppl, corrupted, kind from facts limit 1").fetchall()
    assert row == [(None, None, None, None)]
    types = dict(con.execute("select column_name, column_type from (describe facts)").fetchall())
    assert types["r"] == "DOUBLE" and types["corrupted"] == "BOOLEAN"


def test_where_filters_on_facts(multi_turn_store, tmp_path):
    multi_turn_store.append("corruption", [{"sample_id": f"cauldron:vqav2:train:{i}", "run_id": "corrupt-1", "corrupted": True}
                                           for i in (1, 2)])
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nwhere: 'not coalesce(corrupted, false)'\nmixture: {{budget: 100}}\noutput: {{path: {tmp_path / 'out'}}}\n")
    rows = rows_of(build(multi_turn_store, load_recipe(path), progress=False).path)
    assert len(rows) == 8 and not {"cauldron:vqav2:train:1", "cauldron:vqav2:train:2"} & {r["sample_id"] for r in rows}


def test_sparse_and_dense_reads_give_the_same_rows(multi_turn_store):
    import importlib

    build_module = importlib.import_module("engine.recipes.build")
    dataset = multi_turn_store.dataset("samples")
    plan = pa.table({"pos": pa.array([1, 2, 3, 7], pa.int64()), "captioned": [False] * 4, "suffix": pa.nulls(4, pa.string())})
    dense = pa.concat_tables(rows for rows, _ in build_module._stream_selected(dataset, plan, False, dense_fraction=0.0))
    sparse = pa.concat_tables(rows for rows, _ in build_module._stream_selected(dataset, plan, False, dense_fraction=1.1))
    assert dense.column("sample_id").to_pylist() == sparse.column("sample_id").to_pylist() == [
        f"cauldron:vqav2:train:{i}" for i in (1, 2, 3, 7)
    ]
    assert dense.column("turns").to_pylist() == sparse.column("turns").to_pylist()


def test_outputs_load_as_hugging_face_datasets(sample_store, tmp_path):
    build(sample_store, load_recipe(R50, SAMPLE + [f"output.path={tmp_path / 'out'}", "mixture.budget=40"]), progress=False)
    from_disk = datasets.load_from_disk(str(tmp_path / "out" / "hf"))
    assert len(from_disk) == 40 and from_disk[0]["images"][0].size[0] > 0
    assert isinstance(from_disk.features["images"].feature, datasets.Image)
    from_parquet = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "parquet" / "*.parquet"), split="train")
    assert isinstance(from_parquet.features["images"].feature, datasets.Image)
    assert from_parquet["sample_id"] == from_disk["sample_id"]
