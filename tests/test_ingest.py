"""Ingest: Cauldron-schema sources, image standardisation, rejects, resuming after a kill."""

import io
import sys

import pyarrow as pa
import pytest
from PIL import Image

from conftest import cauldron_parquet, kill_after_commits, png, qa, run_to_end
from engine.images import fit_size, standardize
from engine.ingest import ingest, resolve_source
from engine.ingest.cauldron import ParquetFolderSource
from engine.ingest.easyvqa import EasyVQASource
from engine.store import Store


def test_fit_size_keeps_both_limits_and_the_aspect():
    assert fit_size(800, 600) == (800, 600)
    assert fit_size(3072, 100) == (1536, 50)  # longest side
    w, h = fit_size(1500, 1500)  # 2.25 MP: area limit, side already fine
    assert w * h <= 2_000_000 and w == h and w == 1414
    w, h = fit_size(4000, 3000)
    assert max(w, h) <= 1536 and w * h <= 2_000_000 and abs(w / h - 4 / 3) < 0.01


def test_oversized_image_is_downscaled_and_small_one_kept_byte_for_byte():
    small = png(20, 10)
    assert standardize(small) == (small, 20, 10)
    data, width, height = standardize(png(2000, 1200))
    assert (width, height) == (1536, 921)
    assert Image.open(io.BytesIO(data)).size == (1536, 921)


def test_corrupt_images_and_missing_answers_go_to_rejects(tmp_path):
    good = png()
    rows = [
        ([good], qa("q0", "a0")),
        ([b"\x89PNG not really"], qa("q1", "a1")),
        ([b""], qa("q2", "a2")),
        ([], qa("q3", "a3")),
        ([good], qa("q4", "")),
        ([good, good[: len(good) // 2]], qa("q5", "a5")),
        ([good], qa("q6", "a6")),
    ]
    cauldron_parquet(tmp_path / "src" / "vqav2" / "train-00000-of-00001.parquet", rows)
    store = Store(tmp_path / "store")
    report = ingest(store, ParquetFolderSource(tmp_path / "src"), progress=False)
    assert (report.written, report.rejected) == (2, 5)
    rejects = {r["sample_id"]: r["reason"] for r in store.arrow("rejects").to_pylist()}
    assert rejects["cauldron:vqav2:train:1"].startswith("image 0: image cannot be decoded")
    assert rejects["cauldron:vqav2:train:2"] == "image 0: image is empty"
    assert rejects["cauldron:vqav2:train:3"] == "row has no image"
    assert rejects["cauldron:vqav2:train:4"] == "turn 0 has no answer"
    assert rejects["cauldron:vqav2:train:5"].startswith("image 1: image cannot be decoded")
    samples = store.arrow("samples").to_pylist()
    assert [s["sample_id"] for s in samples] == ["cauldron:vqav2:train:0", "cauldron:vqav2:train:6"]
    assert samples[0]["category"] == "Real-world VQA" and samples[0]["task_kind"] == "vqa"
    # a second run finds everything done: nothing written twice, rejects not repeated
    again = ingest(store, ParquetFolderSource(tmp_path / "src"), progress=False)
    assert (again.written, again.rejected, again.skipped) == (0, 0, 7)
    assert store.table("rejects").count_rows() == 5


def test_parquet_folder_subsets_and_splits(tmp_path):
    cauldron_parquet(tmp_path / "src" / "ai2d" / "train-00000-of-00002.parquet", [([png()], qa("a", "1"))] * 3)
    cauldron_parquet(tmp_path / "src" / "ai2d" / "train-00001-of-00002.parquet", [([png()], qa("b", "2"))] * 2)
    cauldron_parquet(tmp_path / "src" / "chartqa" / "train-00000-of-00001.parquet", [([png()], qa("c", "3"))])
    cauldron_parquet(tmp_path / "src" / "chartqa" / "test-00000-of-00001.parquet", [([png()], qa("d", "4"))])
    store = Store(tmp_path / "store")
    ingest(store, resolve_source(str(tmp_path / "src"), name="finevision"), progress=False)
    ids = sorted(store.ids("samples"))
    # rows number on across the files of one subset
    assert ids == [f"finevision:ai2d:train:{i}" for i in range(5)] + ["finevision:chartqa:train:0"]
    ingest(store, resolve_source(str(tmp_path / "src"), name="finevision", split="test"), progress=False)
    assert "finevision:chartqa:test:0" in store.ids("samples")


def test_save_to_disk_folder_is_a_source(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "texts": datasets.List({k: datasets.Value("string") for k in ("user", "assistant", "source")}),
        }
    )
    rows = {"images": [[{"bytes": png(), "path": None}]] * 4, "texts": [qa("q", "a")] * 4}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "tqa"))
    store = Store(tmp_path / "store")
    report = ingest(store, resolve_source(str(tmp_path / "tqa")), progress=False)
    assert report.written == 4
    assert store.ids("samples") == {f"cauldron:tqa:train:{i}" for i in range(4)}


def test_easy_vqa_rows_carry_the_answer_class_as_label(tmp_path):
    store = Store(tmp_path / "store")
    ingest(store, EasyVQASource(splits=("test",), limit=30), progress=False)
    rows = store.arrow("samples").to_pylist()
    assert len(rows) == 30
    assert {r["label"] for r in rows} <= {
        "circle", "green", "red", "gray", "yes", "teal", "black", "rectangle", "yellow", "triangle", "brown", "blue", "no"
    }
    assert all(r["label"] == r["turns"][0]["assistant"] for r in rows)
    assert rows[0]["sample_id"] == "easy_vqa:easy_vqa:test:0" and (rows[0]["width"], rows[0]["height"]) == (64, 64)


def test_a_killed_ingest_resumes_without_duplicates(tmp_path):
    n = 3000
    rows = [([png(6, 6, (i % 256, 0, 0))], qa(f"question {i}", f"answer {i}")) for i in range(n)]
    cauldron_parquet(tmp_path / "src" / "textvqa" / "train-00000-of-00001.parquet", rows)
    store_path = tmp_path / "store"
    command = [sys.executable, "-m", "engine.cli", "--store", str(store_path), "ingest", str(tmp_path / "src"),
               "--batch-rows", "8", "--quiet"]
    kill_after_commits(command, store_path / "samples.lance", commits=5)
    partial = Store(store_path).table("samples").count_rows()
    assert 0 < partial < n
    run_to_end(command)
    ids = Store(store_path).arrow("samples", ["sample_id"]).column("sample_id").to_pylist()
    assert len(ids) == n and len(set(ids)) == n


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local path nor a hub dataset id"):
        resolve_source("no_such_thing")


def test_store_rejects_unknown_columns(tmp_path):
    store = Store(tmp_path / "store")
    with pytest.raises(ValueError, match=r"table samples: unknown columns \['colour'\]"):
        store.append("samples", pa.table({"sample_id": ["x"], "colour": ["red"]}))
