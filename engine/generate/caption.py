"""``engine caption``: caption the images of the rows the MI gate, a redundancy tier or a SQL filter picks
(greedy, 96 new tokens by default), into the ``captions`` table, exactly once per (sample, captioner, prompt)."""

from __future__ import annotations

from engine.generate.backends import Backend, Request
from engine.generate.stage import StageReport, prompts, run_stage, select_rows, selection_sql
from engine.sql import sql_literal
from engine.store import Store


def caption_prompt(subset: str) -> str:
    templates = prompts()["caption"]
    return templates.get("subsets", {}).get(subset, templates["default"])


def caption(store: Store, backend: Backend, where: str | None = None, gate: bool = False, tier: float | None = None,
            limit: int | None = None, batch_size: int = 8, max_new_tokens: int = 96, progress: bool = True,
            min_new_tokens: int = 0, commit_rows: int = 64) -> StageReport:
    """Caption the chosen rows that have no caption yet from this captioner and prompt set."""
    prompt_id = prompts()["caption"]["id"]
    done = store.ids("captions", f"captioner = {sql_literal(backend.name)} AND prompt_id = {sql_literal(prompt_id)}")
    rows = select_rows(store, selection_sql(where, gate, tier), done, limit)

    def process(batch: list[dict], requests: list[Request]) -> list[dict]:
        before = backend.model_seconds
        generations = backend.generate(requests, max_new_tokens, min_new_tokens)
        seconds = (backend.model_seconds - before) / len(batch)  # the batch's model time, split evenly
        return [{"sample_id": row["sample_id"], "captioner": backend.name, "prompt_id": prompt_id,
                 "caption": g.text, "tokens": g.tokens, "seconds": seconds} for row, g in zip(batch, generations)]

    config = {"captioner": backend.name, "prompt_id": prompt_id, "where": where, "gate": gate, "tier": tier,
              "limit": limit, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "greedy": True}
    return run_stage(store, backend, "caption", "captions", rows,
                     lambda row, images: Request(images, caption_prompt(row["subset"])), process, batch_size, config, progress,
                     commit_rows)
