"""The shared mechanism of the model-driven stages (caption, validate, corrupt with a model): choose rows
in SQL, skip the ids a previous run finished, decode images once, run the backend in batches, commit each
batch's rows (and the rejects: undecodable images, prompts longer than the model's context), and account
for time spent inside the model versus around it."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import pyarrow as pa
from tqdm.auto import tqdm

from engine.generate.backends import Backend, PromptTooLong, Request, decode_images
from engine.paths import RECIPES_DIR, load_yaml
from engine.hashing import hash_u64_sql, tier_threshold
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

    rows: pa.Table  # sample_id, pos, subset, label, question, answer
    dataset: object  # the samples dataset the positions refer to

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, size: int):
        """Rows with their ``images``, ``size`` at a time."""
        for start in range(0, len(self.rows), size):
            chunk = self.rows.slice(start, size)
            images = self.dataset.take(chunk.column("pos").to_numpy(), columns=["images"]).column("images")
            yield chunk.append_column("images", images).to_pylist()


def select_rows(store: Store, condition: str, done: set[str], limit: int | None = None, corrupted: bool = False) -> Selection:
    """The chosen rows not yet done: id, storage position, subset, label, first-turn question and answer.
    With ``corrupted``, a row flagged by the newest corruption run carries its replaced answer."""
    con, versions = store.connect()
    dataset = store.positioned(con, versions.get("samples"))
    answer = "case when coalesce(corrupted, false) then replaced else turns[1].assistant end" if corrupted else "turns[1].assistant"
    table = con.sql(
        f"""select f.sample_id, p.pos, f.subset, f.label, f.turns[1].user as question, {answer} as answer
        from facts f join sample_positions p using (sample_id) where {condition} order by f.sample_id"""
    ).to_arrow_table()
    keep = pa.array([sid not in done for sid in table.column("sample_id").to_pylist()])
    table = table.filter(keep)
    return Selection(table.slice(0, limit) if limit is not None else table, dataset)


@dataclass
class StageReport:
    run_id: str
    written: int = 0
    rejected: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        return (self.written + self.rejected) / self.seconds if self.seconds else 0.0

    @property
    def outside_share(self) -> float:
        """Share of the run spent outside model forward passes (batching, decoding, writing)."""
        return 1 - self.model_seconds / self.seconds if self.seconds else 0.0


def run_stage(store: Store, backend: Backend, stage: str, table: str, rows: Selection,
              build_request: Callable[[dict, list], Request], process: Callable[[list[dict], list[Request]], list[dict]],
              batch_size: int, config: dict, progress: bool = True, commit_rows: int = 64) -> StageReport:
    """Run ``process`` over ``rows`` in batches of ``batch_size``, committing to ``table`` whenever
    ``commit_rows`` results are pending (and at the end): a kill loses at most that much work.

    ``build_request(row, images)`` makes the prompt; ``process(rows, requests)`` returns the table rows.
    """
    report = StageReport(run_id=new_run_id(stage))
    started = dt.datetime.now(dt.timezone.utc)
    clock = time.perf_counter()
    model_before = backend.model_seconds
    bar = tqdm(total=len(rows), desc=f"{stage} ({backend.name})", unit="sample", disable=not progress)
    pending, rejects = [], []

    def commit() -> None:
        if rejects:  # rejects first: a kill between the two commits just redoes the good rows
            store.append("rejects", rejects)
        if pending:
            store.append(table, pending)
        pending.clear()
        rejects.clear()

    for batch in rows.batches(batch_size):
        good, requests = [], []

        def reject(row: dict, reason: str) -> None:
            rejects.append({"sample_id": row["sample_id"], "stage": stage, "reason": reason, "run_id": report.run_id})
            kind = reason.split(" (")[0]
            report.reasons[kind] = report.reasons.get(kind, 0) + 1
            report.rejected += 1

        for row in batch:
            try:
                request = build_request(row, decode_images(row["images"] or []))
            except Exception as error:  # PIL raises many types for a broken image
                reject(row, f"image cannot be decoded ({type(error).__name__})")
            else:
                good.append(row)
                requests.append(request)
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
    bar.close()
    report.seconds = time.perf_counter() - clock
    report.model_seconds = backend.model_seconds - model_before
    store.record_run(report.run_id, stage, {**config, "model_seconds": report.model_seconds, "seconds": report.seconds},
                     started, report.written)
    return report
