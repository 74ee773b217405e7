"""A model scores each answer of a sample once: validation rows are unique on (sample_id, model,
answer_run), where answer_run says which answer was scored (`original` or the corrupt run whose replaced
answer it was), and `validate --report` pairs each corruption flag with the score of that answer only."""

from __future__ import annotations

from collections import Counter

from click.testing import CliRunner

from engine.cli import main
from engine.models.backends import load_backend
from engine.stages.validate import ValidateStage, validate
from engine.store import Store

WHERE = "source = 'sample' and subset = 'bar_charts' and split = 'train' and \"row\" < 20"


def score(sample_id: str, answer_run: str | None, run_id: str, ppl: float = 1.0) -> dict:
    return {"sample_id": sample_id, "model": "m", "ppl": ppl, "val_ppl": ppl, "p_no": 0.5, "answer_run": answer_run,
            "run_id": run_id}


def test_the_store_keeps_one_score_per_sample_model_and_answer(tmp_path):
    store = Store(tmp_path / "store")
    store.append("validation", [score("a", "original", "validate-1"), score("b", "original", "validate-1")])
    # a second run that read an outdated list of what was done scores a again, and a's corrupted answer
    store.append("validation", [score("a", "original", "validate-2", 9.0), score("a", "corrupt-1", "validate-2", 9.0)])
    rows = sorted((r["sample_id"], r["answer_run"], r["run_id"]) for r in store.arrow("validation").to_pylist())
    assert rows == [("a", "corrupt-1", "validate-2"), ("a", "original", "validate-1"), ("b", "original", "validate-1")]


def test_two_validate_runs_at_once_write_each_score_once(sample_store, tiny_vlm, monkeypatch):
    backend = load_backend(tiny_vlm)
    first = validate(sample_store, backend, where=WHERE, limit=6, progress=False)
    assert first.written == 6
    # the second run started before the first committed: it believes nothing is scored yet
    monkeypatch.setattr(ValidateStage, "done_filter", lambda self: "false")
    validate(sample_store, backend, where=WHERE, limit=6, progress=False)
    keys = Counter((r["sample_id"], r["model"], r["answer_run"]) for r in sample_store.arrow("validation").to_pylist())
    assert len(keys) == 6 and set(keys.values()) == {1}


def test_the_issue_reproduction_reports_each_answer_it_scored(sample_store, tiny_vlm):
    """corrupt half, score the originals, then the corrupted answers, then report: each flagged row is
    compared on the answer its flag describes, and every score is written once."""
    runner = CliRunner()
    store = ["--store", str(sample_store.root)]

    def engine(*args: str) -> str:
        result = runner.invoke(main, [*store, *args])
        assert result.exit_code == 0, result.output
        return result.output

    engine("corrupt", "--fraction", "0.5", "--where", WHERE, "--seed", "3")
    flags = {r["sample_id"]: r["corrupted"] for r in sample_store.arrow("corruption").to_pylist()}
    flagged = sum(flags.values())
    assert len(flags) == 20 and 0 < flagged < 20
    engine("validate", "--model", tiny_vlm, "--where", WHERE, "--quiet")
    report = engine("validate", "--model", tiny_vlm, "--report")
    # the corrupted rows were scored on their original answers only: left out, not counted as corrupted
    assert report.startswith(f"{20 - flagged} rows, {20 - flagged} clean, 0 corrupted")
    assert f"left out: {flagged} flagged rows" in report
    engine("validate", "--model", tiny_vlm, "--where", WHERE, "--corrupted", "--quiet")
    report = engine("validate", "--model", tiny_vlm, "--report")
    assert report.startswith(f"20 rows, {20 - flagged} clean, {flagged} corrupted") and "left out" not in report
    for _ in range(2):  # reruns score nothing again
        engine("validate", "--model", tiny_vlm, "--where", WHERE, "--corrupted", "--quiet")
        engine("validate", "--model", tiny_vlm, "--where", WHERE, "--quiet")
    answers = Counter(r["answer_run"] for r in sample_store.arrow("validation").to_pylist())
    assert answers == {"original": 20, sample_store.arrow("corruption").column("run_id")[0].as_py(): flagged}
