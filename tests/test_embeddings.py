"""The embeddings table: fixed-size vectors LanceDB can search, PCA fits whose transform matches the stored
vectors, MiniLM through sentence-transformers, and the store read from a user's own DuckDB connection."""

from __future__ import annotations

import hashlib

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from engine.models.encoders import MINILM, Encoder, load_encoder
from engine.stages.embed import embed, fit_pca, load_transform, load_vectors, pca_apply, transform_folder
from engine.store import Store, attach, partition_table_name


class HashEncoder(Encoder):
    """A deterministic text encoder of any width: each text's vector is drawn from a seed of its hash."""

    modalities = ("text",)

    def __init__(self, name: str, width: int, shift: float = 0.0):
        self.name, self.width, self.shift = name, width, shift

    def encode(self, items: list, modality: str) -> np.ndarray:
        rows = [np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).normal(size=self.width)
                for t in items]
        return np.stack(rows).astype(np.float32)


def text_store(root, count: int, start: int = 0, split: str = "train") -> Store:
    store = Store(root)
    store.append("samples", [{"sample_id": f"t:{i:03d}", "source": "t", "subset": "s", "split": split,
                              "turns": [{"user": f"question number {i}", "assistant": "a", "source": "t"}]}
                             for i in range(start, start + count)])
    return store


def test_a_pca_refit_reprojects_every_vector_with_the_saved_transform(tmp_path):
    store = text_store(tmp_path / "store", 40)
    embed(store, "hash", "text", progress=False, encoder=HashEncoder("hash", 12))
    name = fit_pca(store, "hash", "text", 4)
    first_run, _ = load_transform(store, name, "text")
    # more samples arrive; their raw vectors come from elsewhere in the space, so the refit differs
    store.append("samples", [{"sample_id": f"t:{i:03d}", "source": "t", "subset": "s", "split": "train",
                              "turns": [{"user": f"another question {i}", "assistant": "a", "source": "t"}]}
                             for i in range(40, 90)])
    embed(store, "hash", "text", progress=False, encoder=HashEncoder("hash", 12))
    assert fit_pca(store, "hash", "text", 4) == name
    run_id, transform = load_transform(store, name, "text")
    assert run_id != first_run
    ids, raw = load_vectors(store, "hash", "text")
    projected_ids, projected = load_vectors(store, name, "text")
    assert projected_ids == ids and len(ids) == 90  # every sample once, old rows included
    assert np.allclose(projected, pca_apply(raw, transform), atol=1e-5)  # all in the space of the saved transform
    assert np.allclose(projected.std(0), 1.0, atol=1e-3)  # standardised on the 90 rows of this fit
    assert store.arrow("embeddings", ["run_id"], modality="text", model=name).column("run_id").to_pylist() == [run_id] * 90
    saved = sorted(p.name for p in transform_folder(store, name, "text").glob("*.npz"))
    assert saved == sorted([f"{first_run}.npz", f"{run_id}.npz"])  # each fit's transform under its run id


def test_embeddings_are_fixed_size_vectors_lancedb_can_search(tmp_path):
    import lancedb

    store = text_store(tmp_path / "store", 30)
    embed(store, "hash/wide", "text", progress=False, encoder=HashEncoder("hash/wide", 16))
    embed(store, "hash|narrow", "text", progress=False, encoder=HashEncoder("hash|narrow", 3))
    table = store.table("embeddings", modality="text", model="hash/wide")
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 16)  # one width per table
    _, vectors = load_vectors(store, "hash/wide", "text")
    hits = table.search(vectors[7]).limit(3).to_list()
    assert hits[0]["sample_id"] == "t:007" and hits[0]["_distance"] == pytest.approx(0.0, abs=1e-6)
    assert len(hits) == 3 and hits[1]["_distance"] > 0
    # the same with nothing but lancedb: one table per (modality, model) in {store}/embeddings
    db = lancedb.connect(str(store.root / "embeddings"))
    narrow = partition_table_name(store.spec("embeddings"), {"modality": "text", "model": "hash|narrow"})
    assert sorted(db.table_names()) == sorted([narrow, table.name]) and narrow.startswith("text-hash_narrow-")
    assert db.open_table(narrow).search([1.0, 0.0, 0.0]).limit(2).to_arrow().num_rows == 2
    # engine query / DuckDB still sees one `embeddings` table across widths
    con, _ = store.connect()
    assert con.sql("select model, count(*), max(len(vector)) from embeddings group by 1 order by 1").fetchall() == [
        ("hash/wide", 30, 16), ("hash|narrow", 30, 3)]
    with pytest.raises(ValueError, match="one width"):
        store.append("embeddings", pa.table({"sample_id": ["t:000", "t:001"], "model": ["m", "m"], "modality": ["text", "text"],
                                    "vector": pa.array([[1.0, 2.0], [1.0]], pa.list_(pa.float32()))}))
    with pytest.raises(ValueError, match="holds fixed_size_list"):  # a second width for the same model
        store.append("embeddings", pa.table({"sample_id": ["t:099"], "model": ["hash/wide"], "modality": ["text"],
                                    "vector": pa.array([[1.0, 2.0]], pa.list_(pa.float32()))}))


def test_attach_gives_your_own_duckdb_connection_the_store_and_facts(sample_store, tmp_path):
    mine = tmp_path / "mine.duckdb"
    con = duckdb.connect(str(mine))
    con.execute("create table notes as select 'sample:bar_charts:train:0' as sample_id, 'look' as note")
    versions = attach(con, sample_store.root)
    assert versions["samples"] == sample_store.dataset("samples").version
    assert con.execute("select count(*) from facts").fetchall() == [(380,)]
    assert con.sql("select n.note, f.category from notes n join facts f using (sample_id)").fetchall() == [
        ("look", "Charts/Figures")]
    assert con.execute("select count(*) from facts where corrupted is null and u_v is null").fetchall() == [(380,)]
    assert con.execute("select count(*) from embeddings").fetchall() == [(0,)]
    con.close()
    with pytest.raises(FileNotFoundError, match="not a store"):
        attach(duckdb.connect(), tmp_path / "typo")
    assert not (tmp_path / "typo").exists()
    reopened = duckdb.connect(str(mine))  # the views were temporary: nothing of the store was written into it
    assert [r[0] for r in reopened.sql("select table_name from information_schema.tables").fetchall()] == ["notes"]


@pytest.mark.slow
def test_minilm_through_sentence_transformers_matches_mean_pooling():
    """The library's output equals the hand-written mean pooling it replaced (transformer, masked mean, L2)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from engine.models.encoders import resolve_model_path

    encoder = load_encoder(MINILM)
    assert isinstance(encoder.model, SentenceTransformer)
    texts = ["what color is the shape?", "Is there a red circle in the image?", "add 12 and 30",
             "a much longer question " * 80]  # past the 256-token limit: truncated the same way
    path = resolve_model_path(MINILM)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).numpy()
    expected = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    assert np.allclose(encoder.encode(texts, "text"), expected, atol=1e-5)
