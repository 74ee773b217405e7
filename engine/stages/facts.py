"""``engine facts``: facts about the wrong options that misleading descriptions name, written by a backend
model and cached in the store (Diagnosing and Mitigating Modality Interference, §3: "The picture seems to
describe a {wrong option}. {facts about it}").

The options are the ones a recipe's ``perturb:`` would pick for the chosen rows: the same ``wrong_option``
rule, the same salt. Each option is asked about once per (model, prompt); recipes read the cached facts with
``perturb.facts_model``, so builds stay free of model calls and rebuild byte-identically.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

from engine.models.backends import Backend, BackendSpec, Request, run_fitting
from engine.perturb.variants import subset_options, wrong_option
from engine.sql import sql_literal
from engine.stages.base import Needs, Stage, StageOutput, check_where, prompts, run_stage
from engine.store import Store

_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\(?\d+[.):])\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def parse_facts(text: str, k: int) -> list[str]:
    """Up to ``k`` facts from a reply: one per line, bullets and numbering removed; a reply on a single
    line is split into sentences."""
    lines = [_BULLET.sub("", line).strip() for line in text.splitlines()]
    facts = [line for line in lines if line]
    if len(facts) == 1:
        facts = [part.strip() for part in _SENTENCE_END.split(facts[0]) if part.strip()]
    return facts[:k]


def needed_options(store: Store, where: str = "task_kind = 'image_heavy'", salt: str = "perturb") -> list[str]:
    """The distinct wrong options (lower-cased) that misleading descriptions would name for the rows of
    ``facts`` matching ``where``, with the recipe salt ``salt``."""
    con, _ = store.connect()
    check_where(con, where)
    return options_for(con, where, salt)


def options_for(con, condition: str, salt: str) -> list[str]:
    """``needed_options`` on a connection, for a checked condition."""
    labels, answers = subset_options(con)
    rows = con.execute(
        f"""select sample_id, subset, label, turns[1].user, turns[1].assistant from facts where {condition}"""
    ).fetchall()
    options = set()
    for sample_id, subset, label, question, answer in rows:
        wrong = wrong_option(question or "", answer or "", label, labels.get(subset, []), answers.get(subset, []), sample_id, salt)
        if wrong is not None:
            options.add(str(wrong).lower())
    return sorted(options)


class FactsStage(Stage):
    """Per option (not per sample): ``per_option`` facts from a model, asked once per (model, prompt)."""

    name = "facts"
    table = "option_facts"
    key = ("option",)
    skip_permanent_rejects = False

    def __init__(self, backend: Backend | BackendSpec, salt: str = "perturb", per_option: int = 2, batch_rows: int = 8):
        self.backend, self.spec = (None, backend) if isinstance(backend, BackendSpec) else (backend, None)
        self.model_name, self.salt, self.per_option, self.batch_rows = backend.name, salt, per_option, batch_rows
        self.template = prompts()["option_facts"]
        self.needs = Needs(model=self.model_name)

    def __getstate__(self) -> dict:
        if self.spec is None:
            raise TypeError("the facts stage holds a loaded backend; give it a BackendSpec to run it on other workers")
        return {**self.__dict__, "backend": None}

    def setup(self) -> None:
        if self.backend is None:
            self.backend = self.spec.load()

    def candidates(self, con, condition: str) -> pa.Table:
        return pa.table({"option": pa.array(options_for(con, condition, self.salt), pa.string())})

    def done_filter(self) -> str:
        return f"model = {sql_literal(self.model_name)} and prompt_id = {sql_literal(self.template['id'])}"

    def config(self) -> dict:
        return {"model": self.model_name, "prompt_id": self.template["id"], "salt": self.salt, "per_option": self.per_option}

    def process(self, batch: pa.Table) -> StageOutput:
        options = batch.column("option").to_pylist()
        requests = [Request([], self.template["template"].format(k=self.per_option, option=option)) for option in options]
        before = self.backend.model_seconds
        generations, kept, too_long = run_fitting(
            lambda fit: self.backend.generate(fit, max_new_tokens=self.template["max_new_tokens"]), requests)
        rows, empty = [], 0
        for index, generation in zip(kept, generations):
            facts = parse_facts(generation.text, self.per_option)
            empty += not facts
            rows.append({"option": options[index], "model": self.model_name, "prompt_id": self.template["id"],
                         "facts": facts, "tokens": generation.tokens})
        return StageOutput(pa.Table.from_pylist(rows) if rows else None, counts={"empty": empty, "too_long": len(too_long)},
                           seconds={"model": self.backend.model_seconds - before})


@dataclass
class FactsReport:
    run_id: str
    options: int  # options that needed facts from this model
    written: int = 0
    empty: int = 0  # replies with no usable fact (recorded with an empty list, so they are not asked again)
    too_long: int = 0  # prompts longer than the model's context (skipped)


def write_facts(store: Store, backend: Backend | BackendSpec, where: str = "task_kind = 'image_heavy'", salt: str = "perturb",
                per_option: int = 2, limit: int | None = None, batch_size: int = 8, progress: bool = True,
                executor=None) -> FactsReport:
    """Ask ``backend`` for ``per_option`` facts about each needed option it has not answered yet, committing
    as it goes (a killed run resumes with the options still missing)."""
    report = run_stage(store, FactsStage(backend, salt, per_option, batch_size), where, None, limit, executor, progress,
                       commit_rows=batch_size, config={"where": where})
    return FactsReport(report.run_id, report.selected, report.written, report.extra.get("empty", 0),
                       report.extra.get("too_long", 0))
