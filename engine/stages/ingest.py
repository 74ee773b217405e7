"""``engine ingest``: bring a source's rows into ``samples`` (bad rows into ``rejects``, with the reason).

A source is read shard by shard (``Source.shards()``: a Parquet folder's files, easy-vqa's splits, a hub
dataset's subsets), and each shard's rows are checked and their images standardised (``ingest_shard``: the
stage's ``process`` on chunks of ``read_rows`` rows) by the executor: in this process one shard after the
other (``local``), or on Ray tasks, several shards at once (``--executor ray``). Either way the outputs come
back in shard order, then row order, and the driver alone commits them (``commit_outputs``: one writer, every
``batch_rows`` rows or ``batch_bytes`` of images), so the store ends the same whichever executor ran.

Resume: the ids already in ``samples`` or in ingest's ``rejects`` for this source are read once, when the run
starts; a shard done to its last row is not read again, and a shard's worker gets the done ids among its own
rows and skips them. A run killed at any point and started again ends with every row exactly once; the
store's unique key on ``samples.sample_id`` also drops a row another ingest of the same source committed
meanwhile.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from engine.categories import subset_mapping
from engine.images import MAX_IMAGE_BYTES
from engine.ingest.cauldron import ParquetFolderSource
from engine.ingest.sample import CAPTIONER, PROMPT_ID, write_sample
from engine.ingest.sample import SOURCE as SAMPLE_SOURCE
from engine.ingest.source import RawRow, RowError, Shard, Source, check_row
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
            rows.append({**ids, **columns, "row": raw.row, "category": info.category if info else None,
                         "task_kind": info.task_kind if info else None})
        return StageOutput(pa.Table.from_pylist(rows) if rows else None, rejects, inputs=len(batch))


def ingest_shard(stage: IngestStage, read_rows: int, work: tuple[Shard, pa.Array]) -> Iterator[StageOutput]:
    """What a worker does with one shard: read its rows, ``read_rows`` at a time, skip those whose id is
    among ``done`` (ingested or rejected before) and ``process`` the rest; one output per chunk, in row
    order, counting the chunk's rows (``inputs``) and the skipped ones (``counts["skipped"]``)."""
    shard, done = work
    done_ids = set(done.to_pylist())
    rows = iter(shard.reader.rows())
    while chunk := list(itertools.islice(rows, read_rows)):
        todo = [raw for raw in chunk if shard.reader.sample_id(raw) not in done_ids]
        output = stage.process(todo)
        output.inputs, output.counts = len(chunk), {"skipped": len(chunk) - len(todo)}
        yield output


class DoneIds:
    """The ids of a source already ingested or rejected by ingest, read once when a run starts (a DuckDB
    temp table), and split into the prefix and row number of ``{prefix}{row}`` ids so that each shard's
    share is one indexed look-up rather than a scan per shard."""

    def __init__(self, store: Store, source: str):
        self.con, _ = store.connect()
        source_is = f"source = {sql_literal(source)}"
        # a row rejected before stays rejected (engine.rejects); the store writes each reject once (its unique key)
        self.con.execute(f"""create temp table _done as
            select sample_id, regexp_extract(sample_id, '^(.*:)', 1) as prefix,
                   try_cast(regexp_extract(sample_id, ':(-?[0-9]+)$', 1) as bigint) as row
            from (select sample_id from samples where {source_is}
                  union select sample_id from rejects where stage = 'ingest' and {source_is})""").fetchall()

    def counts(self, shards: list[Shard]) -> list[int]:
        """How many of each shard's rows are done (0 for a shard that does not know its ids)."""
        known = [(i, s.prefix, s.start, s.start + s.count) for i, s in enumerate(shards) if s.prefix and s.count is not None]
        counts = [0] * len(shards)
        if known:
            self.con.register("_shards", pa.table(dict(zip(("i", "prefix", "start", "stop"), map(list, zip(*known))))))
            for i, n in self.con.execute("""select s.i, count(*) from _shards s join _done d
                    on d.prefix = s.prefix and d.row >= s.start and d.row < s.stop group by s.i""").fetchall():
                counts[i] = n
            self.con.unregister("_shards")
        return counts

    def of(self, shard: Shard) -> pa.Array:
        """The done ids a shard's worker needs: those among its rows (all of the source's when the shard does
        not know its ids)."""
        if shard.prefix is None:
            return self.con.sql("select sample_id from _done").to_arrow_table().column(0).combine_chunks()
        stop = "" if shard.count is None else f" and row < {shard.start + shard.count}"
        return self.con.sql(f"select sample_id from _done where prefix = {sql_literal(shard.prefix)} "
                            f"and row >= {shard.start}{stop}").to_arrow_table().column(0).combine_chunks()


def ingest(store: Store, source: Source, batch_rows: int = 512, batch_bytes: int = 256 << 20, progress: bool = True,
           max_image_bytes: int = MAX_IMAGE_BYTES, read_rows: int = 256, executor=None) -> IngestReport:
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
        Source rows a worker checks together (one output, the unit the driver commits from).
    executor
        Where shards are read and checked (``engine.stages.executors``; default: this process).
    """
    if executor is None:
        from engine.stages.executors.local import LocalExecutor

        executor = LocalExecutor()
    started, clock = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    stage = IngestStage(source, max_image_bytes)
    report = StageReport(run_id=new_run_id("ingest"), stage="ingest")
    shards = source.shards()
    done = DoneIds(store, source.name)
    todo = []
    report.extra["skipped"] = 0
    for shard, count in zip(shards, done.counts(shards)):
        if shard.count is not None and count >= shard.count:
            report.extra["skipped"] += shard.count  # done to the last row: not read again
        else:
            todo.append(shard)
    total = None if any(s.count is None for s in todo) else sum(s.count for s in todo)
    work = ((shard, done.of(shard)) for shard in todo)
    unmapped: set[str] = set()
    outputs = executor.stream(functools.partial(ingest_shard, stage, read_rows), work)
    commit_outputs(store, stage, _noting_unmapped(outputs, unmapped), report, total, progress, batch_rows, batch_bytes)
    finish_run(store, stage, report, started, clock, {"executor": executor.name, "shards": len(shards)})
    if source.captioner:
        pairs = list(source.captions())
        load_captions(store, pa.table({"sample_id": pa.array([sid for sid, _ in pairs], pa.string()),
                                       "caption": pa.array([text for _, text in pairs], pa.string())}),
                      source.captioner, source.caption_prompt_id, {"from": source.config()})
    return IngestReport(report.run_id, report.written, report.rejected, report.extra["skipped"], unmapped, report.reasons)


def _noting_unmapped(outputs: Iterable[StageOutput], unmapped: set[str]) -> Iterator[StageOutput]:
    """The outputs, noting the subsets of rows that got no category (not in ``recipes/categories.yaml``)."""
    for output in outputs:
        if output.rows is not None:
            uncategorised = output.rows.filter(pc.is_null(output.rows.column("category")))
            unmapped.update(uncategorised.column("subset").unique().to_pylist())
        yield output


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
                  max_image_bytes: int = MAX_IMAGE_BYTES, executor=None) -> IngestReport:
    """Write the bundled sample (if ``folder`` has none yet), ingest it as source ``sample`` and load its
    annotation captions into ``captions`` (captioner ``sample-annotations``)."""
    folder = Path(folder)
    if not (folder / "captions.parquet").exists():
        write_sample(folder, scale=scale)
    report = ingest(store, ParquetFolderSource(folder / "data", name=SAMPLE_SOURCE), progress=progress,
                    max_image_bytes=max_image_bytes, executor=executor)
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    raw = pq.read_table(folder / "captions.parquet")
    ids = pc.binary_join_element_wise(pa.scalar(f"{SAMPLE_SOURCE}:"), raw["subset"], pa.scalar(":train:"),
                                      raw["row"].cast(pa.string()), "")
    load_captions(store, pa.table({"sample_id": ids, "caption": raw["caption"]}), CAPTIONER, PROMPT_ID,
                  {"from": str(folder / "captions.parquet")})
    return report
