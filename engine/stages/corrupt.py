"""``engine corrupt``: for experiments, replace a fraction of a split's answers with wrong ones, keeping the
original ("Corrupted but Not Broken", §3). Which rows, and what they become, is decided by salted SHA-256,
so the same seed gives the same corruption:

- a class answer (the row has a ``label``) swaps to another label of its subset (``option_swap``);
- a multiple-choice letter swaps to another letter the question offers (``option_swap``);
- a free-form answer swaps to another answer drawn from the same subset (``pool_swap``), or, with a
  rewrite model, is rewritten by it into a plausible but incorrect answer (``model_rewrite``).

Every row of the selection gets a flag (corrupted or not). Flags are committed as they are made (every
``commit_rows``); a run killed halfway is continued, under its own run id, by the next run with the same
configuration (fraction, filter, seed, rewrite model), which flags only the rows still missing. A row
whose image does not decode, or whose rewrite prompt does not fit the model, is rejected instead.
"""

from __future__ import annotations

import pyarrow as pa

from engine.hashing import hash_u64, tier_threshold
from engine.models.backends import Backend, BackendSpec, Request
from engine.options import alternatives
from engine.stages.base import StageOutput, StageReport, prompts, run_stage
from engine.stages.model import ModelStage
from engine.store import Store


def _pick(options: list[str], salt: str, sample_id: str) -> str:
    return options[hash_u64(salt, sample_id) % len(options)]


class CorruptStage(ModelStage):
    """One flag per selected row; the swaps need only the row and its subset's pools, rewrites a model."""

    name = "corrupt"
    table = "corruption"
    resume_unfinished_run = True
    skip_permanent_rejects = False  # a row whose image never decodes can still be swapped without a model

    def __init__(self, fraction: float, where: str | None = "split = 'train'", seed: int = 0,
                 backend: Backend | BackendSpec | None = None, batch_rows: int = 8):
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        if backend is not None:
            super().__init__(backend, batch_rows)
        else:
            self.backend = self.spec = self.model_name = None
            self.reads, self.batch_rows = (), max(batch_rows, 512)
        self.fraction, self.where, self.seed = fraction, where, seed
        self.labels: dict[str, list] = {}
        self.answers: dict[str, list] = {}

    def __getstate__(self) -> dict:
        return super().__getstate__() if self.model_name else dict(self.__dict__)

    def setup(self) -> None:
        if self.model_name:
            super().setup()

    def config(self) -> dict:
        return {"fraction": self.fraction, "where": self.where, "seed": self.seed, "rewrite_model": self.model_name}

    def plan(self, con, condition: str) -> None:
        """Every row's pools: the labels and answers of its subset among all the rows the filter picks (the
        rows done by a killed run too, so a resumed run draws from the same pools)."""
        pools = con.execute(
            f"""select subset, list(distinct label) filter (where label is not null), list(distinct turns[1].assistant), count(*)
            from facts where {condition} group by subset order by subset"""
        ).fetchall()
        if not pools:
            raise LookupError(f"no samples match {self.where!r}")
        self.labels = {subset: sorted(labels or []) for subset, labels, _, _ in pools}
        self.answers = {subset: sorted(a for a in answers if a is not None) for subset, _, answers, _ in pools}

    def candidates(self, con, condition: str) -> str:
        return f"""select f.sample_id, p.pos, f.subset, f.label, f.turns[1].user as question, f.turns[1].assistant as answer
            from facts f join sample_positions p using (sample_id) where {condition}"""

    def process(self, batch: pa.Table) -> StageOutput:
        threshold, salt = tier_threshold(self.fraction), f"corrupt-pick:{self.seed}:"
        flags, rewrite = [], []
        for row in batch.to_pylist():
            flag = {"sample_id": row["sample_id"], "corrupted": False, "kind": None, "original": row["answer"], "replaced": None}
            if hash_u64(f"corrupt:{self.seed}:", row["sample_id"]) < threshold:
                kind, others = alternatives(row["question"], row["answer"], row["label"], self.labels.get(row["subset"], ()),
                                            self.answers.get(row["subset"], ()))
                if kind in ("option", "label"):
                    flag.update(corrupted=True, kind="option_swap", replaced=_pick(others, salt, row["sample_id"]))
                elif self.model_name is not None:
                    rewrite.append(row)
                    continue
                elif others:
                    flag.update(corrupted=True, kind="pool_swap", replaced=_pick(others, salt, row["sample_id"]))
            flags.append(flag)
        output = StageOutput(rejects=[])
        if rewrite:
            rewritten = super().process(pa.Table.from_pylist(rewrite, schema=batch.schema))
            flags += rewritten.rows.to_pylist() if rewritten.rows is not None else []
            output.rejects, output.seconds = rewritten.rejects, rewritten.seconds
        output.rows = pa.Table.from_pylist(flags) if flags else None
        return output

    def request(self, row: dict, images: list) -> Request:
        template = prompts()["corruption"]["rewrite"]
        return Request(images, template.format(question=row["question"], answer=row["answer"]))

    def compute(self, rows: list[dict], requests: list[Request]) -> list[dict]:
        flags = []
        for row, generation in zip(rows, self.backend.generate(requests, max_new_tokens=64)):
            flag = {"sample_id": row["sample_id"], "corrupted": False, "kind": None, "original": row["answer"], "replaced": None}
            if generation.text and generation.text.strip() != row["answer"].strip():
                flag.update(corrupted=True, kind="model_rewrite", replaced=generation.text)
            flags.append(flag)
        return flags

    def report_extra(self, store: Store, report: StageReport) -> None:
        """The run's counts per kind, over all its flags (those of a killed run it continued too)."""
        flags = store.arrow("corruption", ["corrupted", "kind"], f"run_id = '{report.run_id}'")
        counts = {"rows": len(flags), "corrupted": sum(flags.column("corrupted").to_pylist())}
        for kind in flags.column("kind").to_pylist():
            if kind:
                counts[kind] = counts.get(kind, 0) + 1
        report.extra.update(counts)


def corrupt(store: Store, fraction: float, where: str | None = "split = 'train'", seed: int = 0,
            backend: Backend | BackendSpec | None = None, batch_size: int = 8, progress: bool = True,
            commit_rows: int = 512, executor=None) -> tuple[str, dict[str, int]]:
    """Flag and corrupt ``fraction`` of the rows matching ``where``; returns the run id and counts per kind."""
    stage = CorruptStage(fraction, where, seed, backend, batch_size)
    report = run_stage(store, stage, where, None, None, executor, progress, commit_rows)
    return report.run_id, dict(report.extra)
