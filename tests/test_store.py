"""The store: schemas written once in schemas/store.yaml, appends as commits, versions."""

import pyarrow as pa
import pytest

from engine.store import Store, new_run_id, parse_type, table_specs


def test_type_strings_parse_to_arrow():
    assert parse_type("list<struct<user: string, assistant: string>>") == pa.list_(
        pa.struct([("user", pa.string()), ("assistant", pa.string())])
    )
    assert parse_type("timestamp") == pa.timestamp("us", tz="UTC")
    with pytest.raises(ValueError, match="unknown type 'strng'"):
        parse_type("list<strng>")


def test_every_table_documents_every_column():
    specs = table_specs()
    assert {"samples", "rejects", "embeddings", "interactions", "captions", "validation", "corruption", "runs"} <= set(specs)
    for spec in specs.values():
        assert spec.doc and set(spec.docs) == set(spec.schema.names) and all(spec.docs.values())
    assert specs["interactions"].join == "run" and specs["validation"].join == "latest" and specs["captions"].join is None


def test_appends_are_versioned_commits(tmp_path):
    store = Store(tmp_path / "store")
    assert store.versions() == {}
    first = store.append("captions", [{"sample_id": "a", "captioner": "c", "caption": "x"}])
    second = store.append("captions", pa.table({"sample_id": ["b"], "captioner": ["c"], "caption": ["y"]}))
    assert second == first + 1 == store.versions()["captions"]
    assert store.dataset("captions", first).count_rows() == 1 and store.table("captions").count_rows() == 2
    assert store.arrow("captions").schema == table_specs()["captions"].schema  # missing columns become typed NULLs


def test_store_location_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_STORE", str(tmp_path / "elsewhere"))
    assert Store().root == tmp_path / "elsewhere"


def test_run_ids_sort_by_time():
    first, second = new_run_id("score"), new_run_id("score")
    assert first.startswith("score-") and first < second
