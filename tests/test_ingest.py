"""Ingest: Cauldron-schema sources, image standardisation, rejects, resuming after a kill."""

import io
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from conftest import cauldron_parquet, kill_after_commits, png, qa, run_to_end
from engine.images import fit_size, standardize
from engine.ingest import resolve_source
from engine.stages.ingest import ingest
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


def test_easy_vqa_ingest_loads_the_annotation_captions_once(tmp_path):
    """Every row whose image the package annotates (colour and shape questions) gets its image's caption under
    captioner easy-vqa-annotations; a second ingest adds none."""
    from engine.ingest.easyvqa import CAPTIONER, image_annotations, questions

    store = Store(tmp_path / "store")
    ingest(store, EasyVQASource(splits=("test",), limit=30), progress=False)
    captions = {r["sample_id"]: r for r in store.arrow("captions").to_pylist()}
    annotations, images = image_annotations("test"), questions("test")[2][:30]
    expected = {f"easy_vqa:easy_vqa:test:{row}": annotations[image] for row, image in enumerate(images) if image in annotations}
    assert set(captions) == set(expected) and len(expected) == 20
    for sample_id, (color, shape) in expected.items():
        assert captions[sample_id]["caption"] == f"A single {color} {shape} drawn on a plain light background."
        assert captions[sample_id]["captioner"] == CAPTIONER == "easy-vqa-annotations"
    ingest(store, EasyVQASource(splits=("test",), limit=30), progress=False)
    assert len(store.arrow("captions")) == len(expected)


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


def test_a_parquet_folder_is_one_shard_per_file_numbered_on_across_a_subset(tmp_path):
    cauldron_parquet(tmp_path / "src" / "ai2d" / "train-00000-of-00002.parquet", [([png()], qa("a", "1"))] * 3)
    cauldron_parquet(tmp_path / "src" / "ai2d" / "train-00001-of-00002.parquet", [([png()], qa("b", "2"))] * 2)
    cauldron_parquet(tmp_path / "src" / "chartqa" / "train-00000-of-00001.parquet", [([png()], qa("c", "3"))])
    source = ParquetFolderSource(tmp_path / "src")
    shards = source.shards()
    assert [(s.reader.path.name, s.prefix, s.start, s.count) for s in shards] == [
        ("train-00000-of-00002.parquet", "cauldron:ai2d:train:", 0, 3),
        ("train-00001-of-00002.parquet", "cauldron:ai2d:train:", 3, 2),
        ("train-00000-of-00001.parquet", "cauldron:chartqa:train:", 0, 1)]
    read = [source.sample_id(raw) for shard in shards for raw in shard.reader.rows()]
    assert read == [source.sample_id(raw) for raw in source.rows()] == [
        *(f"cauldron:ai2d:train:{i}" for i in range(5)), "cauldron:chartqa:train:0"]
    easy = EasyVQASource(splits=("train", "test"), limit=7).shards()
    assert [(s.reader.splits, s.prefix, s.start, s.count) for s in easy] == [
        (("train",), "easy_vqa:easy_vqa:train:", 0, 7), (("test",), "easy_vqa:easy_vqa:test:", 0, 7)]


def test_a_large_parquet_file_is_split_into_shards_of_whole_row_groups(tmp_path):
    """Row groups of 2, 2 and 1 rows with shards of about 3 rows: groups 0-1 (rows 0-3) and group 2 (row 4),
    numbered on from the subset's earlier file; read one after the other, the shards give source.rows()."""
    import pyarrow.parquet as pq

    cauldron_parquet(tmp_path / "src" / "ai2d" / "train-00000-of-00002.parquet", [([png()], qa("a", "1"))] * 2)
    big = cauldron_parquet(tmp_path / "src" / "ai2d" / "train-00001-of-00002.parquet",
                           [([png()], qa(f"q{i}", str(i))) for i in range(5)])
    pq.write_table(pq.read_table(big), big, row_group_size=2)
    source = ParquetFolderSource(tmp_path / "src")
    shards = source.shards(shard_rows=3)
    assert [(s.reader.path.name, s.reader.row_groups, s.start, s.count) for s in shards] == [
        ("train-00000-of-00002.parquet", None, 0, 2),
        ("train-00001-of-00002.parquet", (0, 1), 2, 4),
        ("train-00001-of-00002.parquet", (2,), 6, 1)]
    assert [s.reader.total() for s in shards] == [2, 4, 1]
    read = [(source.sample_id(raw), raw.texts[0]["user"]) for shard in shards for raw in shard.reader.rows()]
    assert read == [(source.sample_id(raw), raw.texts[0]["user"]) for raw in source.rows()]
    assert read[2:] == [(f"cauldron:ai2d:train:{2 + i}", f"q{i}") for i in range(5)]
    assert len(source.shards()) == 2  # at the default size, each file is one shard


def test_a_resumed_ingest_reads_only_unfinished_shards_and_skips_their_done_rows(tmp_path):
    """A shard done to its last row is not handed to the executor again; an unfinished one is handed over
    with the ids done among its own rows, which its worker skips without checking them again."""
    from engine.stages.executors.local import LocalExecutor

    class Recording(LocalExecutor):
        handed: list = []

        def stream(self, work, items):
            items = list(items)
            self.handed.extend((shard.reader.path.parent.name, shard.reader.path.name, sorted(done.to_pylist()))
                               for shard, done in items)
            return super().stream(work, items)

    cauldron_parquet(tmp_path / "src" / "ai2d" / "train-00000-of-00002.parquet", [([png()], qa("a", "1"))] * 3)
    cauldron_parquet(tmp_path / "src" / "ai2d" / "train-00001-of-00002.parquet", [([png()], qa("b", "2"))] * 2)
    cauldron_parquet(tmp_path / "src" / "chartqa" / "train-00000-of-00001.parquet",
                     [([png()], qa("c", "3")), ([b"broken"], qa("d", "4"))])
    store = Store(tmp_path / "store")
    ingest(store, ParquetFolderSource(tmp_path / "src"), progress=False)
    store.table("samples").delete("sample_id in ('cauldron:ai2d:train:4', 'cauldron:chartqa:train:0')")
    again = ingest(store, ParquetFolderSource(tmp_path / "src"), progress=False, executor=Recording())
    assert Recording.handed == [("ai2d", "train-00001-of-00002.parquet", ["cauldron:ai2d:train:3"]),
                                ("chartqa", "train-00000-of-00001.parquet", ["cauldron:chartqa:train:1"])]
    assert (again.written, again.rejected, again.skipped) == (2, 0, 5)
    ids = store.arrow("samples", ["sample_id"]).column("sample_id").to_pylist()
    assert sorted(ids) == [*(f"cauldron:ai2d:train:{i}" for i in range(5)), "cauldron:chartqa:train:0"]


def test_subsets_without_a_category_are_ingested_and_named(tmp_path):
    cauldron_parquet(tmp_path / "src" / "ai2d" / "train-00000-of-00001.parquet", [([png()], qa("a", "1"))])
    cauldron_parquet(tmp_path / "src" / "made_up" / "train-00000-of-00001.parquet", [([png()], qa("b", "2"))] * 2)
    store = Store(tmp_path / "store")
    report = ingest(store, ParquetFolderSource(tmp_path / "src"), progress=False)
    assert report.written == 3 and report.unmapped_subsets == {"made_up"}
    categories = {r["sample_id"]: r["category"] for r in store.arrow("samples").to_pylist()}
    assert categories == {"cauldron:ai2d:train:0": "Reasoning/Math/Logic", "cauldron:made_up:train:0": None,
                          "cauldron:made_up:train:1": None}


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local path nor a hub dataset id"):
        resolve_source("no_such_thing")


def test_store_rejects_unknown_columns(tmp_path):
    store = Store(tmp_path / "store")
    with pytest.raises(ValueError, match=r"table samples: unknown columns \['colour'\]"):
        store.append("samples", pa.table({"sample_id": ["x"], "colour": ["red"]}))


# -- hardening: image paths, text encodings, image modes ----------------------------------------------------

def _noise_png(width: int, height: int) -> bytes:
    """A PNG that does not compress: its size in bytes is about 3 x width x height."""
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _path_rows(path: Path, items: list[dict]) -> None:
    from conftest import IMAGES, TEXTS
    import pyarrow.parquet as pq

    table = pa.table({"images": pa.array([[item] for item in items], IMAGES),
                      "texts": pa.array([qa(f"q{i}", f"a{i}") for i in range(len(items))], TEXTS)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_image_paths_are_read_only_from_regular_files_within_the_size_cap(tmp_path):
    import os

    (tmp_path / "big.png").write_bytes(_noise_png(700, 700))  # ~1.5 MB, a valid image
    (tmp_path / "small.png").write_bytes(png(10, 10))
    os.mkfifo(tmp_path / "fifo")  # opening it for reading would wait for a writer forever
    (tmp_path / "folder").mkdir()
    items = [{"bytes": None, "path": p} for p in
             ("/dev/zero", str(tmp_path / "fifo"), str(tmp_path / "folder"), str(tmp_path / "big.png"),
              str(tmp_path / "missing.png"), str(tmp_path / "small.png"))]
    items.append({"bytes": _noise_png(700, 700), "path": None})  # the cap holds for inline bytes too
    _path_rows(tmp_path / "src" / "vqav2" / "train-00000-of-00001.parquet", items)
    store = Store(tmp_path / "store")
    report = ingest(store, ParquetFolderSource(tmp_path / "src"), progress=False, max_image_bytes=1 << 20)
    assert (report.written, report.rejected) == (1, 6)
    assert store.ids("samples") == {"cauldron:vqav2:train:5"}
    reasons = {int(r["sample_id"].rsplit(":", 1)[1]): r["reason"] for r in store.arrow("rejects").to_pylist()}
    assert reasons[0] == "image 0: image path '/dev/zero' is not a regular file"
    assert reasons[1] == f"image 0: image path '{tmp_path / 'fifo'}' is not a regular file"
    assert reasons[2] == f"image 0: image path '{tmp_path / 'folder'}' is not a regular file"
    size = (tmp_path / "big.png").stat().st_size
    assert reasons[3] == f"image 0: image file '{tmp_path / 'big.png'}' has {size} bytes, more than the limit of 1048576"
    assert reasons[4].startswith(f"image 0: image file '{tmp_path / 'missing.png'}' cannot be read (No such file")
    assert reasons[6].startswith("image 0: image has ") and reasons[6].endswith("more than the limit of 1048576")


def test_the_image_size_cap_is_a_flag_and_an_environment_variable(tmp_path):
    from click.testing import CliRunner

    from engine.cli import main

    (tmp_path / "big.png").write_bytes(_noise_png(700, 700))
    _path_rows(tmp_path / "src" / "vqav2" / "train-00000-of-00001.parquet",
               [{"bytes": None, "path": str(tmp_path / "big.png")}])
    runner = CliRunner()
    store = ["--store", str(tmp_path / "store")]
    capped = runner.invoke(main, [*store, "ingest", str(tmp_path / "src"), "--quiet"], env={"ENGINE_MAX_IMAGE_MB": "1"})
    assert capped.exit_code == 0 and "0 rows written, 1 rejected" in capped.output
    assert "more than the limit of 1048576" in capped.output
    other = ["--store", str(tmp_path / "store2")]
    allowed = runner.invoke(main, [*other, "ingest", str(tmp_path / "src"), "--quiet", "--max-image-mb", "2"])
    assert allowed.exit_code == 0 and "1 rows written, 0 rejected" in allowed.output
    assert '"max_image_bytes": 2097152' in Store(tmp_path / "store2").arrow("runs").column("config")[0].as_py()


def _invalid_utf8_parquet(path: Path, users: list[bytes]) -> None:
    """Cauldron rows whose user texts are the given bytes, written as strings without validation."""
    import pyarrow.parquet as pq

    user = pa.array(users, pa.binary()).view(pa.string())
    other = pa.array([f"a{i}" for i in range(len(users))], pa.string())
    turns = pa.StructArray.from_arrays([user, other, other], ["user", "assistant", "source"])
    texts = pa.ListArray.from_arrays(pa.array(range(len(users) + 1), pa.int32()), turns)
    from conftest import IMAGES

    images = pa.array([[{"bytes": png(), "path": None}]] * len(users), IMAGES)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"images": images, "texts": texts}), path)


def test_a_row_with_invalid_utf8_text_is_rejected_and_the_rest_ingested(tmp_path):
    _invalid_utf8_parquet(tmp_path / "src" / "vqav2" / "train-00000-of-00001.parquet",
                          [b"first", b"caf\xe9 in latin-1", "third \u00e9".encode()])
    store = Store(tmp_path / "store")
    report = ingest(store, ParquetFolderSource(tmp_path / "src"), progress=False)
    assert (report.written, report.rejected) == (2, 1)
    assert store.ids("samples") == {"cauldron:vqav2:train:0", "cauldron:vqav2:train:2"}
    rejects = store.arrow("rejects").to_pylist()
    assert [(r["sample_id"], r["reason"]) for r in rejects] == [
        ("cauldron:vqav2:train:1", "text is not valid UTF-8 (column texts)")]
    again = ingest(store, ParquetFolderSource(tmp_path / "src"), progress=False)
    assert (again.written, again.rejected, again.skipped) == (0, 0, 3)


def test_a_16_bit_greyscale_png_keeps_its_tones_when_downscaled_or_not():
    import numpy as np

    for width, height in ((2000, 1600), (300, 200)):
        ramp = np.tile(np.linspace(0, 65535, width), (height, 1)).astype(np.uint16)  # black to white, left to right
        out = io.BytesIO()
        Image.fromarray(ramp).save(out, format="PNG")
        assert Image.open(io.BytesIO(out.getvalue())).mode == "I;16"
        data, w, h = standardize(out.getvalue())
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(float)
        assert (w, h) == fit_size(width, height) and pixels.shape[:2] == (h, w)
        assert (pixels == 255).all(-1).mean() < 0.01  # not washed out to white
        assert abs(pixels.mean() - 127.5) < 2
        assert pixels[:, 0].mean() < 3 and pixels[:, -1].mean() > 252


def test_an_exif_rotated_jpeg_is_stored_upright():
    import numpy as np

    for width, height in ((20, 40), (1000, 3000)):
        upright = Image.new("RGB", (width, height), (220, 20, 20))
        upright.paste((20, 20, 220), (0, height // 2, width, height))  # top red, bottom blue
        stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote ...
        exif = Image.Exif()
        exif[0x0112] = 6  # ... and the tag that says "turn me 90 degrees clockwise"
        out = io.BytesIO()
        stored.save(out, format="JPEG", quality=95, exif=exif)
        data, w, h = standardize(out.getvalue())
        expected = fit_size(width, height)
        assert (w, h) == expected and expected[1] > expected[0]
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
        assert pixels.shape[:2] == (expected[1], expected[0])
        top, bottom = pixels[: h // 4].mean((0, 1)), pixels[-h // 4 :].mean((0, 1))
        assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]


def test_an_unreachable_hub_is_one_line_that_says_how_to_ingest_a_local_copy(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from engine.cli import main

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cached copy to fall back on
    # the tests run with HF_HUB_OFFLINE=1: what the hub client does without network
    result = CliRunner().invoke(main, ["--store", str(tmp_path / "store"), "ingest", "HuggingFaceM4/the_cauldron",
                                       "--subset", "ai2d", "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the Hugging Face hub for 'HuggingFaceM4/the_cauldron'")
    assert "engine ingest FOLDER" in lines[0] and "train-*.parquet" in lines[0]
    assert not (tmp_path / "store" / "samples.lance").exists()


def test_a_refused_connection_in_the_middle_of_a_stream_is_the_same_one_line(monkeypatch):
    import datasets
    httpx2 = pytest.importorskip("httpx2")  # huggingface_hub's HTTP client

    from engine.ingest.cauldron import HubSource, HubUnreachable

    class Stream:
        def cast_column(self, *args):
            return self

        def with_format(self, *args):
            return self

        features = {}

        def iter(self, batch_size):
            raise RuntimeError("reading a shard failed") from httpx2.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: Stream())
    with pytest.raises(HubUnreachable, match=r"cannot reach the Hugging Face hub for 'owner/data' \(RuntimeError\)"):
        list(HubSource("owner/data", subsets=["ai2d"]).rows())
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: (_ for _ in ()).throw(KeyError("no such split")))
    with pytest.raises(KeyError):  # anything else is not dressed up as a network problem
        list(HubSource("owner/data", subsets=["ai2d"]).rows())
