"""The stage mechanism: one runner for every command that computes facts.

A **stage** says what it is and how to process one batch; the **runner** (``run_stage``) owns everything
else; an **executor** decides where batches are processed.

Contract (the local and the Ray executor both keep it)
------------------------------------------------------
- ``Stage``: ``name`` (the ``runs``/``rejects`` stage), ``table`` (what it writes), ``key`` (the columns
  shared by the selection and ``table`` that say a row is done, e.g. ``("sample_id",)``), ``reads`` (heavy
  columns of ``samples`` read by position for each batch, e.g. ``("images",)``), ``needs`` (device,
  GPUs, model), ``batch_rows``. ``setup()`` loads what the stage needs, once per worker;
  ``process(batch: pa.Table) -> StageOutput`` turns a batch (the selection's columns plus ``reads``) into
  rows for ``table`` and rejects. A stage object is picklable until ``setup()`` has run.
- The runner selects the rows in DuckDB on the driver: the stage's candidates (ids, storage positions
  ``pos`` and light text columns; never images), minus those already in ``table`` (an anti-join on
  ``key``) and those rejected before for a reason no rerun can change, in a stable order.
- ``Executor.run(stage, selection, reader, batch_rows) -> Iterator[StageOutput]`` processes the selection
  in slices of ``batch_rows`` and yields one ``StageOutput`` per slice, **in selection order**, each from
  ``stage.run_batch(load_batch(slice, reader))``. ``reader`` (``Reader``) is picklable and opens Lance lazily,
  so it can travel to another process.
- The runner alone commits (one writer, on a thread, whenever ``commit_rows`` results are pending): with
  the store's unique keys this makes a run killed at any point and started again end with every row
  once, whichever executor ran it. It also writes the rejects (once per sample, stage and reason, see
  ``engine.rejects``), the ``runs`` record, the progress bar, and returns the summary (``StageReport``).

Commands whose rows come from elsewhere land them through the same pieces: ingest (a source's shards, read
by ``Executor.stream`` and yielded in shard order, ``engine.stages.ingest``) through ``commit_outputs`` and
``finish_run``; score and gate (computed over a whole selection at once) through ``write_run``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from typing import Protocol

import pyarrow as pa

from engine.paths import RECIPES_DIR, load_yaml
from engine.hashing import hash_u64_sql, tier_threshold
from engine.rejects import permanent_sql
from engine.sql import WhereError, check_filter, sql_literal
from engine.store import Store, conform, new_run_id


@cache
def prompts() -> dict:
    """Prompt templates kept as data in ``recipes/prompts.yaml``."""
    return load_yaml(RECIPES_DIR / "prompts.yaml")


def selection_sql(where: str | None = None, gate: bool = False, tier: float | None = None,
                  tier_salt: str = "redundancy-tier") -> str:
    """SQL condition over ``facts`` for the rows a stage works on."""
    parts = [f"({where})" if where else "true"]
    if gate:
        parts.append("coalesce(gate_selected, false)")  # the newest gate run (joined into facts)
    if tier is not None:
        parts.append(f"{hash_u64_sql(tier_salt)}::HUGEINT < {tier_threshold(tier)}::HUGEINT")
    return " and ".join(parts)


def check_where(con, where: str | None, relation: str = "facts", flag: str = "--where") -> None:
    """The one check of a user's filter before anything runs (``engine.sql.check_filter``): one SQL
    expression that binds against ``relation`` and is boolean. Raises ``WhereError`` naming the flag."""
    if where is None:
        return
    try:
        check_filter(con, where, relation)
    except WhereError as error:
        raise WhereError(f"{flag}: {error}") from None


# -- what a stage is ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Needs:
    """What a stage needs from a worker: a device kind, GPUs per worker (Ray schedules by it) and the model
    it loads in ``setup()`` (None: no model)."""

    device: str = "cpu"
    gpus: float = 0.0
    model: str | None = None


@dataclass
class StageOutput:
    """What one batch gave: rows for the stage's table (without ``run_id``: the runner adds it), rejects as
    ``{"sample_id", "reason", ...}`` (the runner adds ``stage`` and ``run_id``), how many selection rows the
    batch held (``inputs``, for progress), seconds spent by kind (``{"model": s, "processor": s}``) and
    counts of the stage's own (summed over the run into ``StageReport.extra`` and the run record)."""

    rows: pa.Table | None = None
    rejects: list[dict] = field(default_factory=list)
    inputs: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # stage-specific tallies, summed into ``report.extra``


class Stage:
    """A step that computes facts for rows of the store; see the module docstring for the contract.

    Subclasses set the class attributes and implement ``process``; ``candidates`` (which rows),
    ``done_filter`` (which rows of ``table`` count as done for this configuration) and ``config`` (what
    the ``runs`` record keeps) have defaults that fit a per-sample stage.
    """

    name: str = "stage"
    table: str = ""
    key: tuple[str, ...] = ("sample_id",)
    reads: tuple[str, ...] = ()
    needs: Needs = Needs()
    batch_rows: int = 64
    skip_permanent_rejects: bool = True  # leave out rows rejected for a reason no rerun changes (engine.rejects)
    resume_unfinished_run: bool = False  # continue a killed run of the same configuration under its run id

    # -- what the runner asks (driver side) --
    def candidates(self, con, condition: str) -> str | pa.Table:
        """The rows to work on, as SQL over ``facts`` and ``sample_positions`` (or an Arrow table): at least
        ``key``, and ``pos`` when the stage ``reads`` columns. ``condition`` is the checked filter."""
        return (f"select f.sample_id, p.pos from facts f join sample_positions p using (sample_id) "
                f"where {condition}")

    def done_filter(self) -> str:
        """SQL over ``table``: which of its rows mean this configuration is done with their key."""
        return "true"

    def order(self) -> str:
        """The selection's order (stable: a resumed run meets the rows in the same order)."""
        return ", ".join(self.key)

    def config(self) -> dict:
        """The configuration, for the ``runs`` record (and for resuming an unfinished run)."""
        return {}

    def plan(self, con, condition: str) -> None:
        """Work done once on the driver before rows are selected (e.g. pools drawn from every row the
        filter picks); the state it sets travels with the stage to the workers."""

    # -- what workers do --
    def setup(self) -> None:
        """Load what the stage needs (a model), once per worker, before the first ``process``."""

    def process(self, batch: pa.Table) -> StageOutput:
        """Turn one batch (the selection's columns plus ``reads``) into rows for ``table`` and rejects. Every
        per-row stage defines it; ``WholeStage`` and selection-only stages never reach it."""
        raise NotImplementedError(f"{type(self).__name__} must define process(batch) to run per batch")

    def run_batch(self, batch: pa.Table) -> StageOutput:
        """``process`` one batch and note how many selection rows it held (executors call this)."""
        output = self.process(batch)
        output.inputs = batch.num_rows
        return output

    def report_extra(self, store: Store, report: StageReport) -> None:
        """Add stage-specific figures to the report and the run record (``report.extra``), on the driver
        once the last commit has landed."""


# -- reading rows by position --------------------------------------------------------------------------
@dataclass
class Reader:
    """Reads heavy columns of one Lance table (at one version) by row position. Picklable: the dataset is
    opened lazily, in whichever process reads."""

    path: str
    version: int | None
    columns: tuple[str, ...]

    def __post_init__(self):
        self._dataset = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "version": self.version, "columns": self.columns}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._dataset = None

    def read(self, positions) -> pa.Table:
        """The ``columns`` of the rows at ``positions`` (in that order)."""
        if self._dataset is None:
            import lance

            self._dataset = lance.dataset(self.path, version=self.version)
        return self._dataset.take(positions, columns=list(self.columns))


def load_batch(rows: pa.Table, reader: Reader | None) -> pa.Table:
    """A selection slice with the reader's columns appended (read by the slice's ``pos``)."""
    if reader is None or not reader.columns:
        return rows
    read = reader.read(rows.column("pos").to_numpy())
    for name in reader.columns:
        rows = rows.append_column(name, read.column(name))
    return rows


def read_ahead(selection: pa.Table, reader: Reader | None, batch_rows: int) -> Iterator[pa.Table]:
    """The selection in batches of ``batch_rows`` with their columns read; the next batch is read on a
    thread while the caller works on the current one (Lance releases the GIL while it reads)."""
    starts = range(0, len(selection), batch_rows)
    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
        ahead = [pool.submit(load_batch, selection.slice(start, batch_rows), reader) for start in starts[:1]]
        for start in starts:
            batch = ahead.pop().result()
            if start + batch_rows < len(selection):
                ahead.append(pool.submit(load_batch, selection.slice(start + batch_rows, batch_rows), reader))
            yield batch


def decode_each(rows: list[dict], column: str = "images") -> Iterator[tuple[dict, list | None, Exception | None]]:
    """Each row (without ``column``) with its decoded images, or with the exception decoding raised."""
    from engine.models.backends import decode_images

    for row in rows:
        try:
            yield row, decode_images(row.pop(column) or []), None
        except MemoryError:  # the machine's state, not the image's: must not reject the row for good
            raise
        except Exception as error:  # PIL raises many types for a broken image
            yield row, None, error


def undecodable(error: Exception) -> str:
    """The reject reason of an image that does not decode (one ``engine.rejects`` counts as permanent)."""
    return f"image cannot be decoded ({type(error).__name__})"


def decode_rows(batch: pa.Table, column: str = "images") -> tuple[list[dict], list[list], list[dict]]:
    """The rows of a batch whose images decode, their decoded images, and a reject for each row whose
    images do not."""
    rows, images, rejects = [], [], []
    for row, decoded, error in decode_each(batch.to_pylist(), column):
        if error is not None:
            rejects.append(reject(row["sample_id"], undecodable(error)))
        else:
            rows.append(row)
            images.append(decoded)
    return rows, images, rejects


def reject(sample_id: str, reason: str) -> dict:
    return {"sample_id": sample_id, "reason": reason}


# -- executors ---------------------------------------------------------------------------------------
class Executor(Protocol):
    name: str

    def close(self) -> None:
        """Release what the executor holds (Ray: the connection it made), once a command is done with it."""

    def run(self, stage: Stage, selection: pa.Table, reader: Reader | None, batch_rows: int) -> Iterator[StageOutput]:
        """Process ``selection`` in slices of ``batch_rows``; one output per slice, in selection order."""

    def stream(self, work: Callable[[object], Iterator[StageOutput]], items: Iterable) -> Iterator[StageOutput]:
        """Run ``work`` (a picklable function) on each item, several items at once where the executor can;
        yield the outputs in item order, each item's in the order ``work`` yields them (ingest's shards)."""


# -- commits -----------------------------------------------------------------------------------------
class Commits:
    """Pending rows for one table and pending rejects, committed on a writer thread whenever ``commit_rows``
    rows (or ``commit_bytes``) are pending, so the work goes on while a commit is written and memory stays
    bounded; at most one commit is in flight. Rejects are committed first: a kill between the two commits
    only redoes the good rows. Use as a context manager; ``close()`` commits the rest and waits."""

    def __init__(self, store: Store, table: str, commit_rows: int = 64, commit_bytes: int | None = None):
        self.store, self.table, self.commit_rows, self.commit_bytes = store, table, commit_rows, commit_bytes
        self.rows: list[pa.Table] = []
        self.rejects: list[dict] = []
        self.pending_rows = self.pending_bytes = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="commit")
        self._in_flight: list[Future] = []

    def add(self, rows: pa.Table | None = None, rejects: Iterable[dict] = ()) -> None:
        if rows is not None and rows.num_rows:
            self.rows.append(rows)
            self.pending_rows += rows.num_rows
            self.pending_bytes += rows.nbytes
        for item in rejects:
            self.rejects.append(item)
            self.pending_rows += 1
        if self.pending_rows >= self.commit_rows or (self.commit_bytes and self.pending_bytes >= self.commit_bytes):
            self.commit()

    def _write(self, rows: list[pa.Table], rejects: list[dict]) -> None:
        if rejects:  # the store writes each (sample, stage, reason) once (rejects' unique key)
            self.store.append("rejects", rejects)
        if rows:
            spec = self.store.spec(self.table)
            self.store.append(self.table, pa.concat_tables([conform(spec, part) for part in rows]))

    def land(self) -> None:
        """Wait for the commit in flight (and raise its error, if writing failed)."""
        while self._in_flight:
            self._in_flight.pop().result()

    def commit(self) -> None:
        self.land()
        if self.rows or self.rejects:
            self._in_flight.append(self._writer.submit(self._write, self.rows, self.rejects))
        self.rows, self.rejects, self.pending_rows, self.pending_bytes = [], [], 0, 0

    def close(self) -> None:
        self.commit()
        self.land()

    def __enter__(self) -> Commits:
        return self

    def __exit__(self, kind, error, trace) -> None:
        try:
            if kind is None:
                self.close()
            else:
                self.land()  # after an error, the commit in flight still lands; what is pending is redone
        finally:
            self._writer.shutdown()


# -- the runner --------------------------------------------------------------------------------------
@dataclass
class StageReport:
    run_id: str
    stage: str = ""
    written: int = 0
    rejected: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0
    prepare_seconds: float = 0.0  # in the model's input processor (chat template, tokenising, image preprocessing)
    reasons: dict[str, int] = field(default_factory=dict)
    skipped_rejected: int = 0  # rows not tried again: rejected before for a reason no rerun can change
    selected: int = 0  # rows this run had to do
    resumed: bool = False  # continued an unfinished run of the same configuration
    earlier: int = 0  # rows that unfinished run had committed
    extra: dict = field(default_factory=dict)  # stage-specific figures, also in the run record

    @property
    def samples_per_second(self) -> float:
        return (self.written + self.rejected) / self.seconds if self.seconds else 0.0

    @property
    def outside_share(self) -> float:
        """Share of the run spent outside model forward passes (processor, batching, decoding, writing)."""
        return 1 - self.model_seconds / self.seconds if self.seconds else 0.0

    @property
    def engine_share(self) -> float:
        """Share of the run spent in neither the model nor its processor: reading, decoding, batching, writing."""
        return 1 - (self.model_seconds + self.prepare_seconds) / self.seconds if self.seconds else 0.0

    def count_reject(self, reason: str) -> None:
        kind = reason.split(" (")[0]
        self.reasons[kind] = self.reasons.get(kind, 0) + 1
        self.rejected += 1


def config_digest(config: dict) -> str:
    """8 hex digits of a configuration: the tail of a resumable run's id."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]


def unfinished_run(con, stage: Stage) -> str | None:
    """The newest run of this stage and configuration that wrote rows to its table but has no ``runs``
    record (killed before it finished), or None."""
    pattern = f"{stage.name}-%-{config_digest(stage.config())}"
    found = con.execute(
        f"""select max(run_id) from {stage.table} where run_id like {sql_literal(pattern)}
        and run_id not in (select run_id from runs)"""
    ).fetchall()[0][0]
    return found


def select(store: Store, stage: Stage, where: str | None = None, condition: str | None = None,
           limit: int | None = None, run_id: str | None = None) -> tuple[pa.Table, Reader | None, int, int]:
    """The rows ``stage`` still has to do: its candidates under the checked ``where`` (and the engine's own
    ``condition``), minus the rows ``table`` already holds for this configuration (an anti-join in DuckDB
    on ``key``) and, for stages that skip them, the rows rejected before for a permanent reason. Returns the
    selection, a ``Reader`` of the stage's ``reads`` at the version the positions refer to, and how many
    rows were left out as permanently rejected, and how many rows the run ``run_id`` (a killed run being
    continued) had committed before."""
    con, versions = store.connect()
    check_where(con, where)
    dataset = store.positioned(con, versions.get("samples"))
    condition = " and ".join([f"({where})" if where else "true"] + ([condition] if condition else []))
    stage.plan(con, condition)
    candidates = stage.candidates(con, condition)
    if isinstance(candidates, pa.Table):
        con.register("_candidates", candidates)
        candidates = "select * from _candidates"
    done = stage.done_filter() if run_id is None else f"({stage.done_filter()}) and t.run_id = {sql_literal(run_id)}"
    match = " and ".join(f"t.{k} is not distinct from c.{k}" for k in stage.key)
    done = f"exists (select 1 from {stage.table} t where {match} and ({done}))" if stage.table else "false"
    rejected = "false"
    if stage.skip_permanent_rejects and "sample_id" in stage.key:
        rejected = f"exists (select 1 from rejects r where r.sample_id = c.sample_id and {permanent_sql()})"
    con.execute(f"""create temp table _todo as select c.*, {rejected} as _rejected from ({candidates}) c
        where not {done}""").fetchall()
    skipped = con.execute("select count(*) from _todo where _rejected").fetchall()[0][0]
    limited = f" limit {int(limit)}" if limit is not None else ""
    selection = con.sql(f"select * exclude (_rejected) from _todo where not _rejected order by {stage.order()}{limited}"
                        ).to_arrow_table()
    reader = Reader(dataset.uri, dataset.version, tuple(stage.reads)) if stage.reads else None
    earlier = 0
    if run_id is not None and stage.table:  # the rows a killed run of the same configuration committed before
        earlier = con.execute(f"select count(*) from {stage.table} where run_id = {sql_literal(run_id)}").fetchall()[0][0]
    return selection, reader, skipped, earlier


def run_stage(store: Store, stage: Stage, where: str | None = None, condition: str | None = None,
              limit: int | None = None, executor: Executor | None = None, progress: bool = True,
              commit_rows: int = 64, batch_rows: int | None = None, config: dict | None = None,
              record_empty: bool = True) -> StageReport:
    """Run ``stage`` over the rows it still has to do (``select``) with ``executor`` (default: local),
    committing results whenever ``commit_rows`` are pending (a kill loses at most that much work), then
    record the run. ``config`` adds to ``stage.config()`` in the run record (e.g. the filter);
    ``record_empty=False`` records no run when there was nothing to do."""
    started, clock = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    run_id, resumed = None, False
    if stage.resume_unfinished_run:
        con, _ = store.connect()
        run_id = unfinished_run(con, stage)
        resumed = run_id is not None
        run_id = run_id or new_run_id(stage.name, config_digest(stage.config()))
    selection, reader, skipped, earlier = select(store, stage, where, condition, limit, run_id)
    report = StageReport(run_id=run_id or new_run_id(stage.name), stage=stage.name, skipped_rejected=skipped,
                         selected=len(selection), resumed=resumed, earlier=earlier)
    if executor is None:
        from engine.stages.executors.local import LocalExecutor

        executor = LocalExecutor()
    if not len(selection) and not record_empty and not resumed:
        return report
    outputs = executor.run(stage, selection, reader, batch_rows or stage.batch_rows)
    commit_outputs(store, stage, outputs, report, len(selection), progress, commit_rows)
    finish_run(store, stage, report, started, clock, {**(config or {}), "limit": limit})
    return report


def commit_outputs(store: Store, stage: Stage, outputs: Iterable[StageOutput], report: StageReport, total: int | None,
                   progress: bool = True, commit_rows: int = 64, commit_bytes: int | None = None) -> None:
    """The one loop that lands a stage's results: each output's rows get the run id, its rejects the stage
    and run id, both go to ``Commits`` (committed on the writer thread at the cadence), and the report
    counts them; a progress bar follows the selection rows done."""
    bar = _progress(total, stage, progress)
    seconds: dict[str, float] = {}
    with Commits(store, stage.table, commit_rows, commit_bytes) as commits:
        for output in outputs:
            rows = output.rows
            if rows is not None and rows.num_rows:
                rows = rows.append_column("run_id", pa.array([report.run_id] * rows.num_rows, pa.string()))
                report.written += rows.num_rows
            rejects = [{**item, "stage": stage.name, "run_id": report.run_id} for item in output.rejects]
            for item in rejects:
                report.count_reject(item["reason"])
            for kind, value in output.seconds.items():
                seconds[kind] = seconds.get(kind, 0.0) + value
            for name, value in output.counts.items():
                report.extra[name] = report.extra.get(name, 0) + value
            commits.add(rows, rejects)
            bar.update(output.inputs)
    bar.close()
    report.model_seconds, report.prepare_seconds = seconds.get("model", 0.0), seconds.get("processor", 0.0)


def finish_run(store: Store, stage: Stage, report: StageReport, started: dt.datetime, clock: float,
               config: dict | None = None) -> None:
    """Time the run, let the stage add its figures, and append the ``runs`` record (which also compacts
    the tables the run's many commits fragmented)."""
    report.seconds = time.perf_counter() - clock
    stage.report_extra(store, report)
    timing = {"model_seconds": report.model_seconds, "processor_seconds": report.prepare_seconds, "seconds": report.seconds}
    counts = {"rejected": report.rejected, "skipped_rejected": report.skipped_rejected, **report.extra}
    store.record_run(report.run_id, stage.name, {**stage.config(), **(config or {}), **counts, **timing}, started,
                     report.written + report.earlier)


class WholeStage(Stage):
    """A computation over a whole selection at once (``engine score``, ``engine gate``): its rows land
    through the same commits, and its run is recorded the same way, as a per-row stage's (``write_run``)."""

    def __init__(self, name: str, table: str, config: dict):
        self.name, self.table, self._config = name, table, config

    def config(self) -> dict:
        return self._config


def write_run(store: Store, stage: WholeStage, rows: pa.Table, run_id: str, started: dt.datetime, clock: float) -> StageReport:
    """Commit ``rows`` (without ``run_id``: added here) to the stage's table and record the run."""
    report = StageReport(run_id=run_id, stage=stage.name, selected=rows.num_rows)
    commit_outputs(store, stage, [StageOutput(rows, inputs=rows.num_rows)], report, rows.num_rows, False, rows.num_rows + 1)
    finish_run(store, stage, report, started, clock)
    return report


def _progress(total: int, stage: Stage, enabled: bool):
    from tqdm.auto import tqdm

    label = f"{stage.name} ({stage.needs.model})" if stage.needs.model else stage.name
    return tqdm(total=total, desc=label, unit="row", disable=not enabled)


__all__ = ["Commits", "Executor", "Needs", "Reader", "Stage", "StageOutput", "StageReport", "check_where", "commit_outputs",
           "decode_each", "decode_rows", "finish_run", "load_batch", "prompts", "read_ahead", "reject", "run_stage", "select",
           "selection_sql", "undecodable", "WholeStage", "write_run"]
