"""``engine ingest``: bring a source's rows into ``samples`` (bad rows into ``rejects``, with the reason).

The stage's batches are source rows rather than store rows, so the driving loop reads the source, but what
happens to a batch is the mechanism every stage shares (``engine.stages.base``): the rows not yet ingested
are found by an anti-join in DuckDB against ``samples`` and ingest's ``rejects`` (read once, when the run
starts), each row is checked and its images standardised (``process``), results are committed on the
writer thread every ``batch_rows`` rows or ``batch_bytes`` of images, and the run is recorded.

Resume: a run killed at any point and started again reads the source from the start, skips every row
already committed (or rejected) and ends with every row exactly once; the store's unique key on
``samples.sample_id`` also drops a row another ingest of the same source committed meanwhile.
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from engine.categories import subset_mapping
from engine.images import MAX_IMAGE_BYTES
from engine.ingest.cauldron import ParquetFolderSource
from engine.ingest.sample import CAPTIONER, PROMPT_ID, write_sample
from engine.ingest.sample import SOURCE as SAMPLE_SOURCE
from engine.ingest.source import RawRow, RowError, Source, check_row
from engine.sql import sql_literal
from engine.stages.base import Stage, StageOutput, StageReport, commit_outputs, finish_run, run_stage
from engine.store import Store, new_run_id

DEFAULT_SAMPLE_DIR = "data/sample"


@dataclass
class IngestReport:
    run_id: str
    written: int = 0
    rejected: int = 0
    skipped: int = 0
    unmapped_subsets: set[str] = field(default_factory=set)
    reasons: dict[str, int] = field(default_factory=dict)


class IngestStage(Stage):
    """Checks a batch of one source's raw rows: each becomes a ``samples`` row or a reject."""

    name = "ingest"
    table = "samples"
    skip_permanent_rejects = False

    def __init__(self, source: Source, max_image_bytes: int = MAX_IMAGE_BYTES):
        self.source, self.max_image_bytes = source, max_image_bytes
        self.mapping = subset_mapping()
        self.unmapped: set[str] = set()

    def config(self) -> dict:
        return {**self.source.config(), "max_image_bytes": self.max_image_bytes}

    def process(self, batch: list[RawRow]) -> StageOutput:
        """Unlike store stages, a source stage's batch is the source's raw rows (not yet Arrow)."""
        rows, rejects = [], []
        for raw in batch:
            ids = {"sample_id": self.source.sample_id(raw), "source": self.source.name, "subset": raw.subset, "split": raw.split}
            try:
                columns = check_row(raw, self.max_image_bytes)
            except RowError as error:
                rejects.append({**ids, "reason": str(error)})
                continue
            info = self.mapping.get(raw.subset)
            if info is None:
                self.unmapped.add(raw.subset)
            rows.append({**ids, **columns, "row": raw.row, "category": info.category if info else None,
                         "task_kind": info.task_kind if info else None})
        return StageOutput(pa.Table.from_pylist(rows) if rows else None, rejects, inputs=len(batch))


def ingest(store: Store, source: Source, batch_rows: int = 512, batch_bytes: int = 256 << 20, progress: bool = True,
           max_image_bytes: int = MAX_IMAGE_BYTES, read_rows: int = 256) -> IngestReport:
    """Ingest a source into the store in committed batches (see the module docstring for resuming).

    Parameters
    ----------
    batch_rows, batch_bytes
        A Lance commit happens at whichever comes first: the most work a kill can lose, and the bound
        on memory.
    max_image_bytes
        The most bytes one encoded image may have; a larger one (or an image path that is not a regular
        file) rejects its row.
    read_rows
        Source rows checked against the store together (one anti-join each).
    """
    started, clock = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    stage = IngestStage(source, max_image_bytes)
    report = StageReport(run_id=new_run_id("ingest"), stage="ingest")
    con, _ = store.connect()
    source_is = f"source = {sql_literal(source.name)}"
    # a row rejected before stays rejected (engine.rejects); the store writes each reject once (its unique key)
    con.execute(f"""create temp table _done as select sample_id from samples where {source_is}
        union select sample_id from rejects where stage = 'ingest' and {source_is}""").fetchall()
    skipped = 0

    def batches() -> Iterator[StageOutput]:
        nonlocal skipped
        rows = iter(source.rows())
        while chunk := list(itertools.islice(rows, read_rows)):
            con.register("_batch", pa.table({"i": pa.array(range(len(chunk)), pa.int64()),
                                             "sample_id": [source.sample_id(raw) for raw in chunk]}))
            todo = [index for (index,) in con.execute(
                "select i from _batch where sample_id not in (select sample_id from _done) order by i").fetchall()]
            con.unregister("_batch")
            skipped += len(chunk) - len(todo)
            output = stage.process([chunk[index] for index in todo])
            output.inputs = len(chunk)
            yield output

    commit_outputs(store, stage, batches(), report, source.total(), progress, batch_rows, batch_bytes)
    finish_run(store, stage, report, started, clock, {"skipped": skipped})
    if source.captioner:
        pairs = list(source.captions())
        load_captions(store, pa.table({"sample_id": pa.array([sid for sid, _ in pairs], pa.string()),
                                       "caption": pa.array([text for _, text in pairs], pa.string())}),
                      source.captioner, source.caption_prompt_id, {"from": source.config()})
    return IngestReport(report.run_id, report.written, report.rejected, skipped, stage.unmapped, report.reasons)


class SourceCaptions(Stage):
    """Captions a source carries (the bundled sample's, easy-vqa's annotations), loaded into ``captions``
    under the source's captioner: each once, for the samples the store holds."""

    name = "caption"
    table = "captions"
    skip_permanent_rejects = False
    batch_rows = 4096

    def __init__(self, pairs: pa.Table, captioner: str, prompt_id: str, config: dict):
        """``pairs``: ``sample_id`` and ``caption`` columns."""
        self.pairs, self.captioner, self.prompt_id, self._config = pairs, captioner, prompt_id, config

    def config(self) -> dict:
        return {"captioner": self.captioner, **self._config}

    def candidates(self, con, condition: str) -> str:
        con.register("_source_captions", self.pairs.select(["sample_id", "caption"]))
        return "select c.sample_id, c.caption from _source_captions c join samples s using (sample_id)"

    def done_filter(self) -> str:
        return f"captioner = {sql_literal(self.captioner)}"

    def process(self, batch: pa.Table) -> StageOutput:
        n = batch.num_rows
        return StageOutput(batch.select(["sample_id", "caption"]).append_column("captioner", pa.array([self.captioner] * n))
                           .append_column("prompt_id", pa.array([self.prompt_id] * n)))


def load_captions(store: Store, pairs: pa.Table, captioner: str, prompt_id: str, config: dict) -> StageReport:
    """Load a source's captions (``SourceCaptions``); records a run only when there was something to load."""
    stage = SourceCaptions(pairs, captioner, prompt_id, config)
    return run_stage(store, stage, progress=False, commit_rows=1 << 20, record_empty=False)


def ingest_sample(store: Store, folder: str | Path = DEFAULT_SAMPLE_DIR, scale: float = 1.0, progress: bool = True,
                  max_image_bytes: int = MAX_IMAGE_BYTES) -> IngestReport:
    """Write the bundled sample (if ``folder`` has none yet), ingest it as source ``sample`` and load its
    annotation captions into ``captions`` (captioner ``sample-annotations``)."""
    folder = Path(folder)
    if not (folder / "captions.parquet").exists():
        write_sample(folder, scale=scale)
    report = ingest(store, ParquetFolderSource(folder / "data", name=SAMPLE_SOURCE), progress=progress,
                    max_image_bytes=max_image_bytes)
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    raw = pq.read_table(folder / "captions.parquet")
    ids = pc.binary_join_element_wise(pa.scalar(f"{SAMPLE_SOURCE}:"), raw["subset"], pa.scalar(":train:"),
                                      raw["row"].cast(pa.string()), "")
    load_captions(store, pa.table({"sample_id": ids, "caption": raw["caption"]}), CAPTIONER, PROMPT_ID,
                  {"from": str(folder / "captions.parquet")})
    return report
