"""``engine validate``: how plausible a model finds each answer (PPL) and how sure it is that the answer is
not wrong (Val_PPL, "Corrupted but Not Broken", §5.2); ``--report`` measures how well "score below a
threshold => clean" finds the clean rows of a corrupted split (App. E.1, Figure 4)."""

from __future__ import annotations

import math

import numpy as np

from engine.models.backends import Backend, BackendSpec, PromptTooLong, Request, perplexity
from engine.sql import sql_literal
from engine.stages.base import StageReport, prompts, run_stage
from engine.stages.model import ModelStage
from engine.store import Store


class ValidateStage(ModelStage):
    """PPL of each row's first answer and Val_PPL of the self-check, in one forward pass."""

    name = "validate"
    table = "validation"
    key = ("sample_id", "answer_run")

    def __init__(self, backend: Backend | BackendSpec, batch_rows: int = 8, corrupted: bool = False):
        super().__init__(backend, batch_rows)
        self.template, self.corrupted = prompts()["validation"], corrupted

    def candidates(self, con, condition: str) -> str:
        flagged = "coalesce(corrupted, false)"
        if self.corrupted:  # a row flagged by the newest corruption run carries its replaced answer
            answer = f"case when {flagged} then replaced else turns[1].assistant end"
            answer_run = f"case when {flagged} then corruption_run else 'original' end"
        else:
            answer, answer_run = "turns[1].assistant", "'original'"
        return f"""select f.sample_id, p.pos, f.subset, f.turns[1].user as question, {answer} as answer,
            {answer_run} as answer_run from facts f join sample_positions p using (sample_id) where {condition}"""

    def done_filter(self) -> str:
        return f"model = {sql_literal(self.model_name)}"

    def order(self) -> str:
        return "sample_id"

    def config(self) -> dict:
        return {"model": self.model_name, "template_id": self.template["id"], "batch_size": self.batch_rows,
                "corrupted_answers": self.corrupted}

    def request(self, row: dict, images: list) -> Request:
        return Request(images, row["question"])

    def compute(self, rows: list[dict], requests: list[Request]) -> list[dict]:
        asked = [Request(r.images, self.template["template"].format(question=row["question"], answer=row["answer"]))
                 for row, r in zip(rows, requests)]
        # both scores in one forward pass: the answer after its question, then "No" after the self-check
        try:
            scores = self.backend.score(requests + asked, [row["answer"] for row in rows] + [self.template["target"]] * len(rows))
        except PromptTooLong as error:  # report the batch rows, not the positions in the doubled batch
            too_long: dict[int, int] = {}
            for index, tokens in error.rows.items():
                too_long[index % len(rows)] = max(tokens, too_long.get(index % len(rows), 0))
            raise PromptTooLong(too_long, error.context) from None
        answers, verdicts = scores[: len(rows)], scores[len(rows) :]
        return [{"sample_id": row["sample_id"], "model": self.model_name, "ppl": perplexity(a), "val_ppl": perplexity(v),
                 "p_no": math.exp(v[0]), "answer_run": row["answer_run"]} for row, a, v in zip(rows, answers, verdicts)]


def validate(store: Store, backend: Backend | BackendSpec, where: str | None = None, limit: int | None = None,
             batch_size: int = 8, corrupted: bool = False, progress: bool = True, commit_rows: int = 64,
             executor=None) -> StageReport:
    """PPL of each row's first answer given image and question, and Val_PPL: the perplexity of the model
    answering the template's target ("No") when asked whether that answer is wrong. With ``corrupted``,
    rows flagged by the newest corruption run are scored with their corrupted answer (the split as an
    experiment's model sees it).

    Each score records the answer it was given (``answer_run``: ``'original'`` or the corrupt run), and a
    row counts as done only when this model has scored the answer it would be given now: after a new
    corruption run, or when switching between original and corrupted answers, the changed rows are scored
    again (appended; the older scores stay, each labelled with its answer). Scores from before answers
    were recorded (``answer_run`` NULL) count as done for no answer."""
    stage = ValidateStage(backend, batch_size, corrupted)
    return run_stage(store, stage, where, None, limit, executor, progress, commit_rows, config={"where": where})


def precision_recall(scores: np.ndarray, clean: np.ndarray, percentiles=range(1, 101)) -> dict[str, np.ndarray]:
    """Precision and recall of "score < threshold => clean" with the threshold at each lower percentile of
    the scores (App. E.1): precision = |predicted clean and clean| / |predicted clean|,
    recall = |predicted clean and clean| / |clean|. A threshold at the 100th percentile predicts every
    row clean."""
    scores, clean = np.asarray(scores, float), np.asarray(clean, bool)
    percentiles = np.asarray(list(percentiles))
    thresholds = np.percentile(scores, percentiles)
    precision, recall = [], []
    for p, t in zip(percentiles, thresholds):
        predicted = scores <= t if p == 100 else scores < t
        hits = np.sum(predicted & clean)
        precision.append(hits / predicted.sum() if predicted.sum() else 1.0)
        recall.append(hits / clean.sum() if clean.sum() else 0.0)
    return {"percentile": percentiles, "threshold": thresholds, "precision": np.array(precision), "recall": np.array(recall)}


def score_curves(con, model: str, facts: str = "facts") -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray, int]:
    """Precision/recall curves of PPL and Val_PPL (``precision_recall``) over the rows of a connection's
    ``facts`` view (or a table holding its ``sample_id``, ``corrupted`` and ``corruption_run``) that have a
    corruption flag and a validation score from ``model`` of the answer that flag describes: the replaced
    answer of the flagging run for a corrupted row, the original answer for a clean one. Returns the curves,
    those rows' clean mask (empty when there are none) and how many flagged rows were scored only on
    another answer (left out). Only the numeric columns leave DuckDB."""
    flagged_answer = "case when f.corrupted then f.corruption_run else 'original' end"
    columns = con.execute(
        f"""with scores as (select sample_id, ppl, val_ppl, answer_run from validation where model = {sql_literal(model)}
                            qualify row_number() over (partition by sample_id, answer_run order by run_id desc) = 1),
        flagged as (select f.sample_id, f.corrupted, {flagged_answer} as answer_run from {facts} f where f.corrupted is not null),
        paired as (select f.sample_id, s.ppl, s.val_ppl, f.corrupted, s.answer_run = f.answer_run as matches
                   from flagged f join scores s using (sample_id)
                   qualify row_number() over (partition by f.sample_id order by s.answer_run = f.answer_run desc) = 1)
        select ppl, val_ppl, corrupted, matches from paired order by sample_id"""
    ).fetchnumpy()
    matches = np.asarray(columns["matches"], bool)
    other = int((~matches).sum())
    clean = ~np.asarray(columns["corrupted"], bool)[matches]
    if not len(clean):
        return {}, clean, other
    ppl, val_ppl = (np.asarray(columns[name], float)[matches] for name in ("ppl", "val_ppl"))
    return {"PPL": precision_recall(ppl, clean), "Val_PPL": precision_recall(val_ppl, clean)}, clean, other


def validation_report(store: Store, model: str, plot_path: str | None = None, corruption_run: str | None = None) -> str:
    """Table (and optional PNG plot) of precision/recall for PPL and Val_PPL on the rows that have a
    corruption flag and a validation score from ``model`` of the answer that flag describes: the replaced
    answer of the flagging run for a corrupted row, the original answer for a clean one. Rows scored only
    on another answer are left out, and counted."""
    con, _ = store.connect({"corruption": {"run_id": corruption_run}} if corruption_run else None)
    curves, clean, other = score_curves(con, model)
    if not len(clean):
        hint = (f"; {other} flagged rows were scored on other answers: rerun `engine validate --corrupted`" if other else "")
        raise LookupError(f"no rows with both a corruption flag and a validation score from {model!r} of the answer that flag "
                          f"describes; run `engine corrupt` and `engine validate --corrupted`{hint}")
    lines = [f"{len(clean)} rows, {int(clean.sum())} clean, {int((~clean).sum())} corrupted ({(~clean).mean():.0%})"]
    if other:
        lines.append(f"left out: {other} flagged rows scored by {model} only on another answer than the flag describes "
                     f"(rerun `engine validate --corrupted` to score them)")
    lines.append(f"{'percentile':>10} " + " ".join(f"{name + ' ' + m:>18}" for name in curves for m in ("precision", "recall")))
    for index in (0, 4, 9, 24, 49, 74, 99):
        cells = " ".join(f"{curves[n][m][index]:>18.3f}" for n in curves for m in ("precision", "recall"))
        lines.append(f"{curves['PPL']['percentile'][index]:>10} {cells}")
    if plot_path:
        import matplotlib

        from engine.query import make_parent

        make_parent(plot_path)  # `--plot new/folder/pr.png` creates the folder

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(5, 4))
        for name, style in (("Val_PPL", "-"), ("PPL", ":")):
            axis.plot(curves[name]["recall"], curves[name]["precision"], style, label=name)
        axis.set_xlabel("recall (clean rows found)")
        axis.set_ylabel("precision (share of kept rows that are clean)")
        axis.set_title(f"score below threshold => clean\n{model}")
        axis.set_ylim(0, 1.02)
        axis.legend()
        figure.tight_layout()
        figure.savefig(plot_path, dpi=120)
        plt.close(figure)
        lines.append(f"plot: {plot_path}")
    return "\n".join(lines)
