"""The shared ingest mechanism: a source yields raw rows; this module checks them, standardises images,
writes committed batches to ``samples`` (bad rows to ``rejects``, with the reason) and resumes a killed
run by skipping ids already written."""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
import pyarrow as pa
from tqdm.auto import tqdm

from engine.categories import subset_mapping
from engine.images import MAX_IMAGE_BYTES, ImageError, read_image_file, standardize
from engine.sql import sql_literal
from engine.store import Store, new_run_id


@dataclass
class RawRow:
    """A row as a source delivers it, before checks.

    ``images`` holds encoded bytes, or Hugging Face image dicts ``{"bytes": ..., "path": ...}``;
    ``texts`` holds Cauldron turns ``{"user", "assistant", "source"}``. ``error`` is set (and the
    rest left empty) when the source could not read the row at all, e.g. text that is not valid UTF-8:
    the row is rejected with it as the reason, and the rows around it are ingested.
    """

    subset: str
    split: str
    row: int
    images: list
    texts: list
    label: str | None = None
    error: str | None = None


class Source(ABC):
    """Something rows can be ingested from. Subclasses say what they read and yield ``RawRow``s in a
    stable order, so that ``{source}:{subset}:{split}:{row}`` names the same row on every run."""

    name: str

    @abstractmethod
    def rows(self) -> Iterator[RawRow]:
        """Yield the rows, streaming (never the whole source in memory)."""

    def total(self) -> int | None:
        """Number of rows, when known cheaply (for the progress bar)."""
        return None

    def config(self) -> dict:
        """What the run read, for the ``runs`` table."""
        return {"source": self.name}

    def sample_id(self, raw: RawRow) -> str:
        return f"{self.name}:{raw.subset}:{raw.split}:{raw.row}"

    # a source that carries its own captions names their captioner and yields (sample_id, caption) pairs
    captioner: str | None = None
    caption_prompt_id: str | None = None

    def captions(self) -> Iterator[tuple[str, str]]:
        return iter(())


class RowError(ValueError):
    """A row that cannot be ingested; the message is its reject reason."""


def _image_bytes(item, max_bytes: int) -> bytes | None:
    """The encoded bytes of an image item; a ``path`` is read only if it is a regular file within the cap."""
    if isinstance(item, dict):
        if item.get("bytes"):
            return item["bytes"]
        if item.get("path"):
            return read_image_file(item["path"], max_bytes)
        return None
    return item


def check_row(raw: RawRow, max_image_bytes: int = MAX_IMAGE_BYTES) -> dict:
    """Turn a raw row into the columns of ``samples`` (without ids), or raise ``RowError`` saying why not.

    ``max_image_bytes`` caps each encoded image (read from a path or given as bytes)."""
    if raw.error:
        raise RowError(raw.error)
    if not raw.images:
        raise RowError("row has no image")
    images = []
    sizes = []
    for index, item in enumerate(raw.images):
        try:
            data, width, height = standardize(_image_bytes(item, max_image_bytes), max_image_bytes)
        except ImageError as error:
            raise RowError(f"image {index}: {error}") from None
        images.append(data)
        sizes.append((width, height))
    if not raw.texts:
        raise RowError("row has no turns")
    turns = []
    for index, turn in enumerate(raw.texts):
        assistant = (turn or {}).get("assistant")
        if not isinstance(assistant, str) or not assistant.strip():
            raise RowError(f"turn {index} has no answer")
        turns.append({"user": turn.get("user") or "", "assistant": assistant, "source": turn.get("source")})
    return {
        "images": images,
        "turns": turns,
        "label": raw.label,
        "width": sizes[0][0],
        "height": sizes[0][1],
        "n_images": len(images),
    }


@dataclass
class IngestReport:
    run_id: str
    written: int = 0
    rejected: int = 0
    skipped: int = 0
    unmapped_subsets: set[str] = field(default_factory=set)
    reasons: dict[str, int] = field(default_factory=dict)


def ingest(
    store: Store, source: Source, batch_rows: int = 512, batch_bytes: int = 256 << 20, progress: bool = True,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> IngestReport:
    """Ingest a source into the store in committed batches.

    Rows whose id is already in ``samples`` or in ``rejects`` (stage ``ingest``) are skipped, so a run
    killed at any point and started again ends with every row exactly once.

    Parameters
    ----------
    batch_rows, batch_bytes
        A Lance commit happens at whichever comes first: the most work a kill can lose, and the bound
        on memory.
    max_image_bytes
        The most bytes one encoded image may have; a larger one (or an image path that is not a regular
        file) rejects its row.
    """
    report = IngestReport(run_id=new_run_id("ingest"))
    started = dt.datetime.now(dt.timezone.utc)
    source_is = f"source = {sql_literal(source.name)}"
    # a row rejected before stays rejected (engine.rejects); the store writes each reject once (its unique key)
    done = store.ids("samples", source_is) | store.ids("rejects", f"stage = 'ingest' AND {source_is}")
    mapping = subset_mapping()
    samples: list[dict] = []
    rejects: list[dict] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending_bytes
        pending_bytes = 0
        # rejects first: if the kill falls between the two commits, the good rows are simply redone
        if rejects:
            store.append("rejects", rejects)
        if samples:
            store.append("samples", samples)
        samples.clear()
        rejects.clear()

    bar = tqdm(source.rows(), total=source.total(), desc=f"ingest {source.name}", unit="row", disable=not progress)
    for raw in bar:
        sample_id = source.sample_id(raw)
        if sample_id in done:
            report.skipped += 1
            continue
        ids = {"sample_id": sample_id, "source": source.name, "subset": raw.subset, "split": raw.split}
        try:
            columns = check_row(raw, max_image_bytes)
        except RowError as error:
            rejects.append({**ids, "stage": "ingest", "reason": str(error), "run_id": report.run_id})
            report.rejected += 1
            kind = str(error).split(" (")[0]
            report.reasons[kind] = report.reasons.get(kind, 0) + 1
        else:
            info = mapping.get(raw.subset)
            if info is None:
                report.unmapped_subsets.add(raw.subset)
            samples.append(
                {
                    **ids,
                    **columns,
                    "row": raw.row,
                    "category": info.category if info else None,
                    "task_kind": info.task_kind if info else None,
                    "run_id": report.run_id,
                }
            )
            report.written += 1
            pending_bytes += sum(len(image) for image in columns["images"])
        if len(samples) + len(rejects) >= batch_rows or pending_bytes >= batch_bytes:
            flush()
    flush()
    store.compact("samples")
    store.record_run(report.run_id, "ingest", {**source.config(), "max_image_bytes": max_image_bytes}, started, report.written)
    if source.captioner:
        pairs = list(source.captions())
        write_captions(store, source.name, [sid for sid, _ in pairs], [text for _, text in pairs], source.captioner,
                       source.caption_prompt_id, {"from": source.config()})
    return report


def write_captions(store: Store, source: str, sample_ids: list[str], captions: list[str], captioner: str, prompt_id: str,
                   config: dict) -> int:
    """Load captions a source carries into ``captions`` under ``captioner``: for the source's ingested samples
    that have none from that captioner yet (so a rerun adds nothing). Returns the number written."""
    started = dt.datetime.now(dt.timezone.utc)
    have = store.ids("samples", f"source = {sql_literal(source)}")
    done = store.ids("captions", f"captioner = {sql_literal(captioner)}")
    keep = [i for i, sid in enumerate(sample_ids) if sid in have and sid not in done]
    if not keep:
        return 0
    run_id = new_run_id("caption")
    store.append("captions", pa.table({
        "sample_id": [sample_ids[i] for i in keep], "caption": [captions[i] for i in keep],
        "captioner": [captioner] * len(keep), "prompt_id": [prompt_id] * len(keep), "run_id": [run_id] * len(keep)}))
    store.record_run(run_id, "caption", {"captioner": captioner, **config}, started, len(keep))
    return len(keep)
