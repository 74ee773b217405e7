"""``engine facts``: facts about the wrong options that misleading descriptions name, written by a backend
model and cached in the store (Diagnosing and Mitigating Modality Interference, §3: "The picture seems to
describe a {wrong option}. {facts about it}").

The options are the ones a recipe's ``perturb:`` would pick for the chosen rows: the same ``wrong_option``
rule, the same salt. Each option is asked about once per (model, prompt); recipes read the cached facts with
``perturb.facts_model``, so builds stay free of model calls and rebuild byte-identically.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import duckdb
from tqdm.auto import tqdm

from engine.generate.backends import Backend, PromptTooLong, Request
from engine.generate.stage import prompts
from engine.perturb.variants import subset_options, wrong_option
from engine.sql import sql_literal
from engine.store import Store, new_run_id

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
    labels, answers = subset_options(con)
    try:
        rows = con.execute(
            f"""select sample_id, subset, label, turns[1].user, turns[1].assistant from facts where {where}"""
        ).fetchall()
    except duckdb.Error as error:
        raise ValueError(f"invalid SQL in where {where!r}: {str(error).splitlines()[0]}") from None
    options = set()
    for sample_id, subset, label, question, answer in rows:
        wrong = wrong_option(question or "", answer or "", label, labels.get(subset, []), answers.get(subset, []), sample_id, salt)
        if wrong is not None:
            options.add(str(wrong).lower())
    return sorted(options)


@dataclass
class FactsReport:
    run_id: str
    options: int  # options that needed facts from this model
    written: int = 0
    empty: int = 0  # replies with no usable fact (recorded with an empty list, so they are not asked again)
    too_long: int = 0  # prompts longer than the model's context (skipped)


def write_facts(store: Store, backend: Backend, where: str = "task_kind = 'image_heavy'", salt: str = "perturb",
                per_option: int = 2, limit: int | None = None, batch_size: int = 8, progress: bool = True) -> FactsReport:
    """Ask ``backend`` for ``per_option`` facts about each needed option it has not answered yet, committing
    each batch (a killed run resumes with the options still missing)."""
    template = prompts()["option_facts"]
    started = dt.datetime.now(dt.timezone.utc)
    done = set()
    if store.has("option_facts"):
        done = set(store.arrow("option_facts", ["option"], f"model = {sql_literal(backend.name)} AND prompt_id = "
                                                            f"{sql_literal(template['id'])}").column("option").to_pylist())
    todo = [option for option in needed_options(store, where, salt) if option not in done][:limit]
    report = FactsReport(new_run_id("facts"), len(todo))
    for start in tqdm(range(0, len(todo), batch_size), desc=f"facts ({backend.name})", unit="option", disable=not progress):
        chunk = todo[start : start + batch_size]
        requests = [Request([], template["template"].format(k=per_option, option=option)) for option in chunk]
        try:
            generations = backend.generate(requests, max_new_tokens=template["max_new_tokens"])
        except PromptTooLong as error:  # keep the options that fit
            report.too_long += len(error.rows)
            chunk = [option for i, option in enumerate(chunk) if i not in error.rows]
            requests = [request for i, request in enumerate(requests) if i not in error.rows]
            generations = backend.generate(requests, max_new_tokens=template["max_new_tokens"]) if requests else []
        rows = []
        for option, generation in zip(chunk, generations):
            facts = parse_facts(generation.text, per_option)
            report.empty += not facts
            rows.append({"option": option, "model": backend.name, "prompt_id": template["id"], "facts": facts,
                         "tokens": generation.tokens, "run_id": report.run_id})
        if rows:
            store.append("option_facts", rows)
            report.written += len(rows)
    store.record_run(report.run_id, "facts", {"model": backend.name, "prompt_id": template["id"], "where": where, "salt": salt,
                                              "per_option": per_option, "limit": limit, "options": report.options,
                                              "empty": report.empty, "too_long": report.too_long}, started, report.written)
    return report
