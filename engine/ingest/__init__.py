"""Ingest: bring rows from a source into the store's ``samples`` table (bad rows into ``rejects``)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.categories import subset_mapping
from engine.images import MAX_IMAGE_BYTES
from engine.ingest.base import IngestReport, RawRow, Source, ingest, write_captions
from engine.ingest.cauldron import ParquetFolderSource, open_source
from engine.ingest.easyvqa import EasyVQASource
from engine.ingest.sample import CAPTIONER, PROMPT_ID, write_sample
from engine.ingest.sample import SOURCE as SAMPLE_SOURCE
from engine.store import Store

__all__ = ["IngestReport", "RawRow", "Source", "ingest", "ingest_sample", "resolve_source", "subset_mapping"]

DEFAULT_SAMPLE_DIR = "data/sample"


def resolve_source(spec: str, name: str | None = None, subsets: list[str] | None = None, split: str = "train") -> Source:
    """The source a command line names: ``easy_vqa``, a local path, or a hub dataset id."""
    if spec in ("easy_vqa", "easy-vqa"):
        return EasyVQASource(splits=(split,) if split != "all" else ("train", "test"))
    return open_source(spec, name or "cauldron", subsets, split)


def ingest_sample(store: Store, folder: str | Path = DEFAULT_SAMPLE_DIR, scale: float = 1.0, progress: bool = True,
                  max_image_bytes: int = MAX_IMAGE_BYTES) -> IngestReport:
    """Write the bundled sample (if ``folder`` has none yet), ingest it as source ``sample`` and load its
    annotation captions into ``captions`` (captioner ``sample-annotations``)."""
    folder = Path(folder)
    if not (folder / "captions.parquet").exists():
        write_sample(folder, scale=scale)
    report = ingest(store, ParquetFolderSource(folder / "data", name=SAMPLE_SOURCE), progress=progress,
                    max_image_bytes=max_image_bytes)
    raw = pq.read_table(folder / "captions.parquet")
    ids = pc.binary_join_element_wise(
        pa.scalar(f"{SAMPLE_SOURCE}:"), raw["subset"], pa.scalar(":train:"), raw["row"].cast(pa.string()), ""
    )
    write_captions(store, SAMPLE_SOURCE, ids.to_pylist(), raw["caption"].to_pylist(), CAPTIONER, PROMPT_ID,
                   {"from": str(folder / "captions.parquet")})
    return report
