"""The shared mechanism of the model-driven stages (caption, validate, corrupt with a model): choose rows
in SQL, skip the ids a previous run finished (and those rejected before for a reason no rerun can change),
decode images once, run the backend in batches, commit each batch's rows (and the rejects: undecodable
images, prompts longer than the model's context, each written once; see ``engine.rejects``), and account
for time spent inside the model versus around it."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache

import pyarrow as pa
from tqdm.auto import tqdm

from engine.generate.backends import Backend, PromptTooLong, Request, decode_images
from engine.paths import RECIPES_DIR, load_yaml
from engine.hashing import hash_u64_sql, tier_threshold
from engine.rejects import permanently_rejected
from engine.store import Store, new_run_id


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


@dataclass
class Selection:
    """The rows a stage works on (no images: those are read batch by batch, in bounded memory)."""

    rows: pa.Table  # sample_id, pos, subset, label, question, answer, answer_run
    dataset: object  # the samples dataset the positions refer to
    skipped_rejected: int = 0  # chosen rows left out: rejected before for a reason no rerun can change

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, size: int):
        """``size`` rows at a time, each as ``(row, images, error)``: the decoded images, or the exception that
        decoding raised. The next batch is read and decoded on a worker thread while the caller works on
        the current one (Lance and PIL release the GIL while they read and decode)."""
        starts = range(0, len(self.rows), size)
        with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
            ahead = [pool.submit(self._load, start, size) for start in starts[:1]]
            for start in starts:
                batch = ahead.pop().result()
                if start + size < len(self.rows):
                    ahead.append(pool.submit(self._load, start + size, size))
                yield batch

    def _load(self, start: int, size: int) -> list[tuple[dict, list | None, Exception | None]]:
        chunk = self.rows.slice(start, size)
        images = self.dataset.take(chunk.column("pos").to_numpy(), columns=["images"]).column("images")
        loaded = []
        for row in chunk.append_column("images", images).to_pylist():
            try:
                loaded.append((row, decode_images(row.pop("images") or []), None))
            except MemoryError:  # the machine's state, not the image's: must not reject the row for good
                raise
            except Exception as error:  # PIL raises many types for a broken image
                loaded.append((row, None, error))
        return loaded


def select_rows(store: Store, condition: str, done: set, limit: int | None = None, corrupted: bool = False) -> Selection:
    """The chosen rows not yet done: id, storage position, subset, label, first-turn question and answer,
    and ``answer_run``: which answer that is, ``'original'`` or the corrupt run whose replaced answer it is.

    With ``corrupted``, a row flagged by the newest corruption run carries its replaced answer. ``done``
    holds the ids finished before, or ``(id, answer_run)`` pairs for a stage that scores answers (a row
    scored on another answer is not done). Rows a stage rejected before for a reason no rerun can change
    (an image that does not decode) are left out and counted in ``skipped_rejected``.
    """
    con, versions = store.connect()
    dataset = store.positioned(con, versions.get("samples"))
    flagged = "coalesce(corrupted, false)"
    if corrupted:
        answer = f"case when {flagged} then replaced else turns[1].assistant end"
        answer_run = f"case when {flagged} then corruption_run else 'original' end"
    else:
        answer, answer_run = "turns[1].assistant", "'original'"
    table = con.sql(
        f"""select f.sample_id, p.pos, f.subset, f.label, f.turns[1].user as question, {answer} as answer,
        {answer_run} as answer_run
        from facts f join sample_positions p using (sample_id) where {condition} order by f.sample_id"""
    ).to_arrow_table()
    rejected = permanently_rejected(store)
    ids, runs = table.column("sample_id").to_pylist(), table.column("answer_run").to_pylist()
    keep = [sid not in done and (sid, run) not in done for sid, run in zip(ids, runs)]
    skipped = sum(1 for sid, wanted in zip(ids, keep) if wanted and sid in rejected)
    table = table.filter(pa.array([wanted and sid not in rejected for sid, wanted in zip(ids, keep)], pa.bool_()))  # typed: may be empty
    return Selection(table.slice(0, limit) if limit is not None else table, dataset, skipped)


@dataclass
class StageReport:
    run_id: str
    written: int = 0
    rejected: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0
    prepare_seconds: float = 0.0  # in the model's input processor (chat template, tokenising, image preprocessing)
    reasons: dict[str, int] = field(default_factory=dict)
    skipped_rejected: int = 0  # rows not tried again: rejected before for a reason no rerun can change

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


def run_stage(store: Store, backend: Backend, stage: str, table: str, rows: Selection,
              build_request: Callable[[dict, list], Request], process: Callable[[list[dict], list[Request]], list[dict]],
              batch_size: int, config: dict, progress: bool = True, commit_rows: int = 64) -> StageReport:
    """Run ``process`` over ``rows`` in batches of ``batch_size``, committing to ``table`` whenever
    ``commit_rows`` results are pending (and at the end): a kill loses at most that much work.

    ``build_request(row, images)`` makes the prompt; ``process(rows, requests)`` returns the table rows.
    """
    report = StageReport(run_id=new_run_id(stage), skipped_rejected=rows.skipped_rejected)
    started = dt.datetime.now(dt.timezone.utc)
    clock = time.perf_counter()
    model_before, prepare_before = backend.model_seconds, backend.prepare_seconds
    bar = tqdm(total=len(rows), desc=f"{stage} ({backend.name})", unit="sample", disable=not progress)
    pending, rejects = [], []
    writer = ThreadPoolExecutor(1, thread_name_prefix="commit")
    in_flight: list[Future] = []  # at most one commit being written

    def write(done: list[dict], refused: list[dict]) -> None:
        if refused:  # rejects first: a kill between the two commits just redoes the good rows
            store.append("rejects", refused)
        if done:
            store.append(table, done)

    def land() -> None:
        """Wait for the commit in flight (and raise its error, if writing failed)."""
        while in_flight:
            in_flight.pop().result()

    def commit() -> None:
        """Hand the pending rows to the writer thread once the previous commit has landed: the model keeps
        working while they are written, and memory stays bounded."""
        land()
        if pending or rejects:  # the store writes each (sample, stage, reason) once (rejects' unique key)
            in_flight.append(writer.submit(write, pending.copy(), rejects.copy()))
        pending.clear()
        rejects.clear()

    try:
        for batch in rows.batches(batch_size):
            good, requests = [], []

            def reject(row: dict, reason: str) -> None:
                rejects.append({"sample_id": row["sample_id"], "stage": stage, "reason": reason, "run_id": report.run_id})
                kind = reason.split(" (")[0]
                report.reasons[kind] = report.reasons.get(kind, 0) + 1
                report.rejected += 1

            for row, images, error in batch:
                if error is not None:
                    reject(row, f"image cannot be decoded ({type(error).__name__})")
                else:
                    good.append(row)
                    requests.append(build_request(row, images))
            results = []
            while good:
                try:
                    results = process(good, requests)
                    break
                except PromptTooLong as error:  # reject the rows that do not fit, run the rest
                    for index in sorted(error.rows, reverse=True):
                        reject(good[index], f"prompt needs {error.rows[index]} tokens, more than the model context of {error.context}")
                        del good[index], requests[index]
            for result in results:
                result["run_id"] = report.run_id
            pending.extend(results)
            report.written += len(results)
            if len(pending) + len(rejects) >= commit_rows:
                commit()
            bar.update(len(batch))
        commit()
        land()
    finally:
        writer.shutdown()  # after an error, the commit in flight still lands
    bar.close()
    report.seconds = time.perf_counter() - clock
    report.model_seconds = backend.model_seconds - model_before
    report.prepare_seconds = backend.prepare_seconds - prepare_before
    timing = {"model_seconds": report.model_seconds, "processor_seconds": report.prepare_seconds, "seconds": report.seconds}
    store.record_run(report.run_id, stage, {**config, **timing}, started, report.written)
    return report
