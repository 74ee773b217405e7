from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
IMAGES = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
TEXTS = pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())]))


def png(width: int = 8, height: int = 8, color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def cauldron_parquet(path: Path, rows: list[tuple[list[bytes], list[dict]]]) -> Path:
    """Write rows ``(images, turns)`` as one Parquet file in the Cauldron schema."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "images": pa.array([[{"bytes": b, "path": None} for b in images] for images, _ in rows], IMAGES),
            "texts": pa.array([turns for _, turns in rows], TEXTS),
        }
    )
    pq.write_table(table, path)
    return path


def qa(question: str, answer: str, source: str = "test") -> list[dict]:
    return [{"user": question, "assistant": answer, "source": source}]


@pytest.fixture(scope="session")
def sample_store_template(tmp_path_factory) -> Path:
    """A store holding the bundled sample at one tenth of its size (plus its annotation captions)."""
    from engine.stages.ingest import ingest_sample
    from engine.store import Store

    root = tmp_path_factory.mktemp("sample")
    ingest_sample(Store(root / "store"), root / "sample", scale=0.1, progress=False)
    return root / "store"


@pytest.fixture
def sample_store(sample_store_template, tmp_path):
    """A private copy of the sample store, free to add tables to."""
    from engine.store import Store

    target = tmp_path / "store"
    shutil.copytree(sample_store_template, target)
    return Store(target)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> str:
    """Folder of a tiny SmolVLM-architecture model (see engine/models/tiny.py)."""
    from engine.models.tiny import build_tiny_smolvlm

    return str(build_tiny_smolvlm(tmp_path_factory.mktemp("tiny-smolvlm")))


@pytest.fixture
def small_store(tmp_path):
    """Twelve vqav2 rows with class-like answers, one broken image and one overlong question."""
    good = png(16, 16)
    rows = [([good], qa(f"what color is shape {i}?", ["red", "blue", "green"][i % 3], "vqav2")) for i in range(12)]
    rows.append(([good], qa("word " * 400, "red", "vqav2")))  # longer than the 256-token context
    cauldron_parquet(tmp_path / "src" / "vqav2" / "train-00000-of-00001.parquet", rows)
    from engine.stages.ingest import ingest
    from engine.ingest.cauldron import ParquetFolderSource
    from engine.store import Store

    store = Store(tmp_path / "store")
    ingest(store, ParquetFolderSource(tmp_path / "src"), progress=False)
    # a row whose stored image no longer decodes (ingest rejects such rows; stages must cope anyway)
    store.append("samples", [{"sample_id": "cauldron:vqav2:train:99", "source": "cauldron", "subset": "vqav2", "split": "train",
                              "category": "Real-world VQA", "images": [b"broken"], "turns": qa("q", "red", "vqav2")}])
    return store


def kill_after_commits(command: list[str], table_dir: Path, commits: int, timeout: float = 120) -> None:
    """Start ``command``, SIGKILL it once ``table_dir`` (a Lance table) has ``commits`` versions, and check
    that it really was killed mid-run."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    versions = table_dir / "_versions"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if versions.exists() and len(list(versions.iterdir())) >= commits:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def run_to_end(command: list[str]) -> None:
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def killed_caption_run_resumes_exactly_once(tmp_path: Path, model: str, rows: int, *options: str) -> None:
    """Caption ``rows`` one-image rows with ``engine caption ... *options``, SIGKILL the run after its second
    commit, start it again, and check every row ends captioned exactly once."""
    from engine.stages.ingest import ingest
    from engine.ingest.cauldron import ParquetFolderSource
    from engine.store import Store

    source = [([png(12, 12, (i, 0, 0))], qa(f"question {i}", "red", "vqav2")) for i in range(rows)]
    cauldron_parquet(tmp_path / "src" / "vqav2" / "train-00000-of-00001.parquet", source)
    store_path = tmp_path / "store"
    ingest(Store(store_path), ParquetFolderSource(tmp_path / "src"), progress=False)
    command = [sys.executable, "-m", "engine.cli", "--store", str(store_path), "caption", "--model", model,
               "--batch-size", "2", "--commit-rows", "2", "--max-new-tokens", "4", "--quiet", *options]
    kill_after_commits(command, store_path / "captions.lance", commits=3)
    partial = Store(store_path).table("captions").count_rows()
    assert 0 < partial < rows
    run_to_end(command)
    ids = Store(store_path).arrow("captions", ["sample_id"]).column("sample_id").to_pylist()
    assert len(ids) == rows == len(set(ids))


def load_bench(name: str):
    """A script of bench/ as a module (its dataclasses look their module up in sys.modules)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
