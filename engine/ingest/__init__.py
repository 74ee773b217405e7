"""Sources: readers of the Cauldron (Parquet folders, ``save_to_disk`` folders, the hub), easy-vqa and the
bundled sample, each a ``Source`` (``engine.ingest.source``). The ingest stage that brings their rows into
the store is ``engine.stages.ingest``."""

from __future__ import annotations

from engine.ingest.cauldron import ParquetFolderSource, open_source
from engine.ingest.easyvqa import EasyVQASource
from engine.ingest.source import RawRow, Source

__all__ = ["ParquetFolderSource", "RawRow", "Source", "resolve_source"]


def resolve_source(spec: str, name: str | None = None, subsets: list[str] | None = None, split: str = "train") -> Source:
    """The source a command line names: ``easy_vqa``, a local path, or a hub dataset id."""
    if spec in ("easy_vqa", "easy-vqa"):
        return EasyVQASource(splits=(split,) if split != "all" else ("train", "test"))
    return open_source(spec, name or "cauldron", subsets, split)
