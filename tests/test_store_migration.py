"""A store written before fixed-size vectors (one `embeddings.lance` whose `vector` is a variable-length
list) opens: its rows move to one fixed-size table per (modality, model), the old table is kept aside."""

from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa
import pytest

from engine.store import Store


def old_store(root) -> tuple[Store, dict[tuple[str, str], dict[str, list[float]]]]:
    """The layout of before: every embedding in `embeddings.lance`, vectors as list<float32>, and a PCA
    model's transform in `transforms/{model with / as __ and | as --}.npz`."""
    store = Store(root)  # opened before the old table exists: it does not migrate
    store.append("samples", [{"sample_id": f"x:{i}", "source": "x", "subset": "s", "split": "train"} for i in range(4)])
    vectors = {("image", "classical"): {f"x:{i}": [float(i), 1.0, 2.0] for i in range(4)},
               ("text", "org/minilm|pca2"): {f"x:{i}": [float(i), -1.0] for i in range(3)}}
    rows = [{"sample_id": sid, "model": model, "modality": modality, "vector": vector,
             "run_id": "embed-1" if modality == "image" else "embed-2"}
            for (modality, model), by_id in vectors.items() for sid, vector in by_id.items()]
    schema = pa.schema([("sample_id", pa.string()), ("model", pa.string()), ("modality", pa.string()),
                        ("vector", pa.list_(pa.float32())), ("run_id", pa.string())])
    lance.write_dataset(pa.Table.from_pylist(rows, schema=schema), str(root / "embeddings.lance"))
    (root / "transforms").mkdir()
    np.savez(root / "transforms" / "org__minilm--pca2.npz", mean=np.zeros(3), basis=np.eye(2, 3), scale=np.ones(2))
    return store, vectors


def test_an_old_store_opens_on_the_fixed_size_layout(tmp_path):
    from engine.stages.embed import load_transform, load_vectors

    root = tmp_path / "store"
    _, vectors = old_store(root)
    store = Store(root, create=False)
    assert not (root / "embeddings.lance").exists()
    kept = lance.dataset(str(root / "embeddings.lance.before-fixed-size"))  # moved aside, not deleted
    assert kept.count_rows() == 7 and kept.schema.field("vector").type == pa.list_(pa.float32())
    for (modality, model), by_id in vectors.items():
        ids, array = load_vectors(store, model, modality)
        assert ids == sorted(by_id) and array.tolist() == [by_id[i] for i in ids]
        table = store.table("embeddings", modality=modality, model=model)
        assert table.schema.field("vector").type == pa.list_(pa.float32(), len(next(iter(by_id.values()))))
    hit = store.table("embeddings", modality="image", model="classical").search([2.0, 1.0, 2.0]).limit(1).to_list()
    assert hit[0]["sample_id"] == "x:2"  # LanceDB's vector search works on the migrated table
    run, transform = load_transform(store, "org/minilm|pca2", "text")
    assert run == "embed-2" and transform["basis"].tolist() == np.eye(2, 3).tolist()
    con, _ = store.connect()
    assert con.execute("select modality, count(*) from embeddings group by 1 order by 1").fetchall() == [("image", 4), ("text", 3)]
    Store(root)  # opening again changes nothing
    assert sorted(p.name for p in root.glob("embeddings*")) == ["embeddings", "embeddings.lance.before-fixed-size"]
    assert store.arrow("embeddings").num_rows == 7


def test_a_model_of_several_widths_stays_in_the_old_table(tmp_path, capsys):
    root = tmp_path / "store"
    Store(root).append("samples", [{"sample_id": "x:0", "source": "x", "subset": "s", "split": "train"}])
    rows = pa.table({"sample_id": ["x:0", "x:1", "x:0"], "model": ["m", "m", "ok"], "modality": ["image"] * 3,
                     "vector": pa.array([[1.0], [1.0, 2.0], [3.0]], pa.list_(pa.float32())), "run_id": ["embed-1"] * 3})
    lance.write_dataset(rows, str(root / "embeddings.lance"))
    store = Store(root)
    assert "image embeddings of 'm' have widths [1, 2]: not migrated" in capsys.readouterr().err
    assert store.arrow("embeddings").to_pylist() == [{"sample_id": "x:0", "model": "ok", "modality": "image",
                                                       "vector": [3.0], "run_id": "embed-1"}]
    assert lance.dataset(str(root / "embeddings.lance.before-fixed-size")).count_rows() == 3


@pytest.mark.parametrize("done", [1, 2])
def test_a_killed_migration_resumes_without_duplicates(tmp_path, done):
    root = tmp_path / "store"
    before, _ = old_store(root)
    dataset = lance.dataset(str(root / "embeddings.lance"))
    for modality in ["image", "text"][:done]:  # what a migration killed before its rename had copied
        before.append("embeddings", dataset.to_table(filter=f"modality = '{modality}'"))
    store = Store(root)
    assert store.arrow("embeddings").num_rows == 7 and not (root / "embeddings.lance").exists()
