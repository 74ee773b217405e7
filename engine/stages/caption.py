"""``engine caption``: caption the images of the rows the MI gate, a redundancy tier or a SQL filter picks
(greedy, 96 new tokens by default), into the ``captions`` table, exactly once per (sample, captioner, prompt)."""

from __future__ import annotations

from engine.models.backends import Backend, BackendSpec, Request
from engine.sql import sql_literal
from engine.stages.base import StageReport, prompts, run_stage, selection_sql
from engine.stages.model import ModelStage
from engine.store import Store


def caption_prompt(subset: str) -> str:
    templates = prompts()["caption"]
    return templates.get("subsets", {}).get(subset, templates["default"])


class CaptionStage(ModelStage):
    name = "caption"
    table = "captions"

    def __init__(self, backend: Backend | BackendSpec, batch_rows: int = 8, max_new_tokens: int = 96, min_new_tokens: int = 0):
        super().__init__(backend, batch_rows)
        self.prompt_id = prompts()["caption"]["id"]
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens

    def candidates(self, con, condition: str) -> str:
        return f"select f.sample_id, p.pos, f.subset from facts f join sample_positions p using (sample_id) where {condition}"

    def done_filter(self) -> str:
        return f"captioner = {sql_literal(self.model_name)} and prompt_id = {sql_literal(self.prompt_id)}"

    def config(self) -> dict:
        return {"captioner": self.model_name, "prompt_id": self.prompt_id, "batch_size": self.batch_rows,
                "max_new_tokens": self.max_new_tokens, "greedy": True}

    def request(self, row: dict, images: list) -> Request:
        return Request(images, caption_prompt(row["subset"]))

    def compute(self, rows: list[dict], requests: list[Request]) -> list[dict]:
        before = self.backend.model_seconds
        generations = self.backend.generate(requests, self.max_new_tokens, self.min_new_tokens)
        seconds = (self.backend.model_seconds - before) / len(rows)  # the batch's model time, split evenly
        return [{"sample_id": row["sample_id"], "captioner": self.model_name, "prompt_id": self.prompt_id,
                 "caption": g.text, "tokens": g.tokens, "seconds": seconds} for row, g in zip(rows, generations)]


def caption(store: Store, backend: Backend | BackendSpec, where: str | None = None, gate: bool = False,
            tier: float | None = None, limit: int | None = None, batch_size: int = 8, max_new_tokens: int = 96,
            progress: bool = True, min_new_tokens: int = 0, commit_rows: int = 64, executor=None) -> StageReport:
    """Caption the chosen rows that have no caption yet from this captioner and prompt set."""
    stage = CaptionStage(backend, batch_size, max_new_tokens, min_new_tokens)
    return run_stage(store, stage, where, selection_sql(None, gate, tier), limit, executor, progress, commit_rows,
                     config={"where": where, "gate": gate, "tier": tier})
