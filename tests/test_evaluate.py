"""`engine eval`: answer matching and the robustness metrics on hand-made tables; an end-to-end run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.evaluate import EvalConfig, causal_effect, consistency, delta_p, diagnose, is_correct, summarise


def test_matching_letters_classes_and_free_form():
    letters = ["A", "B", "C"]
    assert is_correct("B", "B", letters) and is_correct("The answer is (B).", "B", letters)
    assert not is_correct("A or B", "B", letters)  # the first letter counts
    classes = ["red", "blue", "circle"]
    assert is_correct("It is red.", "red", classes=classes)
    assert not is_correct("a blue circle, not red", "red", classes=classes)
    assert is_correct("The Blue!", "blue") and not is_correct("dark blue", "blue")


def test_delta_p_and_causal_effect():
    assert delta_p(0.8, 0.6) == pytest.approx(-0.25)
    assert delta_p(0.5, 0.5) == 0.0
    assert causal_effect(["red", "Blue", "circle", "no"], ["red", "blue.", "square", "yes"]) == 0.5


def row(question, category, figure, correct, prediction, group="g1"):
    return {"question": question, "category": category, "figure": figure, "correct": correct, "prediction": prediction, "group": group}


def test_hallusion_diagnosis_follows_the_decision_rules():
    rows = [
        # q1 (VS): wrong without an image -> LI
        row("q1", "VS", "none", False, "yes"), row("q1", "VS", "original", True, "yes"),
        # q2 (VS): right without an image, the edited figure gets the same (now wrong) answer -> LI
        row("q2", "VS", "none", True, "1990"), row("q2", "VS", "original", True, "1990"), row("q2", "VS", "edited", False, "1990"),
        # q3 (VD): the control figure is answered wrongly -> VI
        row("q3", "VD", "original", False, "cat", "g2"),
        # q4 (VD): control right, edited wrong -> VI
        row("q4", "VD", "original", True, "3", "g2"), row("q4", "VD", "edited", False, "5", "g3"),
        # q5 (VD): control right, edited "uncertain" -> VI even if scored right
        row("q5", "VD", "original", True, "yes", "g4"), row("q5", "VD", "edited", True, "Uncertain", "g4"),
        # q6 (VS): control wrong, edited wrong with a new answer -> control error Mix, edited error Mix
        row("q6", "VS", "none", False, "x", "g5"), row("q6", "VS", "original", False, "y", "g5"), row("q6", "VS", "edited", False, "z", "g5"),
    ]
    assert diagnose(rows) == {"LI": 3, "VI": 3, "Mix": 2}  # q6's no-image error is LI too


def test_consistency_is_the_share_of_figures_with_every_question_right():
    rows = [{"group": "a", "correct": True}, {"group": "a", "correct": True}, {"group": "b", "correct": True},
            {"group": "b", "correct": False}, {"group": "c", "correct": True}]
    assert consistency(rows) == pytest.approx(2 / 3)


def test_summary_over_seeds_and_interventions():
    records = [
        {"condition": "clean", "severity": 0, "seed": 0, "sample_id": s, "prediction": p, "correct": c}
        for s, p, c in [("a", "red", True), ("b", "blue", True), ("c", "x", False), ("d", "y", True)]
    ]
    for seed, correct in ((0, [True, True, False, False]), (1, [True, False, False, False])):
        records += [{"condition": "corruption:gaussian_noise", "severity": 3, "seed": seed, "sample_id": s, "prediction": "", "correct": c}
                    for s, c in zip("abcd", correct)]
    records += [{"condition": "interference:UF", "severity": 0, "seed": 0, "sample_id": s, "prediction": p, "correct": c}
                for s, p, c in [("a", "red", True), ("b", "green", False)]]
    report = summarise(records, EvalConfig(corruptions=("gaussian_noise",), severities=(3,), seeds=(0, 1), interference=("UF",)))
    assert report["clean"] == {"accuracy": 0.75, "n": 4, "rejected": 0}
    cell = report["corruption"]["gaussian_noise"]["3"]
    # accuracies 0.5 and 0.25 -> dP = -1/3 and -2/3
    assert cell["accuracy"] == pytest.approx(0.375)
    assert cell["delta_p_mean"] == pytest.approx(-0.5) and cell["delta_p_sd"] == pytest.approx(0.2357, abs=1e-4)
    assert report["interference"]["UF"] == {"n": 2, "accuracy_original": 1.0, "accuracy_perturbed": 0.5, "causal_effect": 0.5}


def test_eval_end_to_end_on_the_sample(sample_store, tiny_vlm, tmp_path):
    where = "subset in ('shapes_vqa', 'word_math') and row < 6"
    result = CliRunner().invoke(main, [
        "--store", str(sample_store.root), "eval", "--model", tiny_vlm, "--where", where,
        "--corruptions", "gaussian_noise,replace", "--severities", "1,5", "--seeds", "0,1", "--interference", "UF,MD,FB,RI",
        "--max-new-tokens", "3", "--out", str(tmp_path / "eval"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "clean accuracy" in result.output and "causal effect" in result.output
    predictions = pq.read_table(tmp_path / "eval" / "predictions.parquet").to_pylist()
    scored = [p for p in predictions if p["status"] == "ok"]
    n = 12  # 6 shapes_vqa rows (task kind vqa) + 6 word_math rows (text-heavy: the image interventions apply)
    assert sum(p["condition"] == "clean" for p in scored) == n
    assert sum(p["condition"] == "corruption:gaussian_noise" for p in scored) == n * 2 * 2
    assert {p["condition"] for p in scored if p["condition"].startswith("interference")} == {"interference:FB", "interference:RI"}
    assert all(p["task_kind"] == "text_heavy" for p in scored if p["condition"] == "interference:FB")
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(report["corruption"]) == {"gaussian_noise", "replace"} and set(report["corruption"]["replace"]) == {"1", "5"}
    for name in ("accuracy_vs_severity.png", "interference.png", "report.txt", "eval_config.json"):
        assert (tmp_path / "eval" / name).exists()
    assert not (tmp_path / "eval" / "predictions.partial").exists()  # the committed parts are gone once the run is done


def test_eval_on_an_hf_folder_with_control_pairs(tiny_vlm, tmp_path):
    import datasets

    from conftest import png

    features = datasets.Features({
        "images": datasets.List(datasets.Image()),
        "texts": datasets.List({k: datasets.Value("string") for k in ("user", "assistant", "source")}),
        **{k: datasets.Value("string") for k in ("question", "category", "figure", "group")},
    })
    rows = {"images": [], "texts": [], "question": [], "category": [], "figure": [], "group": []}
    for q, category, figure in [("q1", "VS", "original"), ("q1", "VS", "edited"), ("q2", "VD", "original")]:
        rows["images"].append([{"bytes": png(16, 16), "path": None}])
        rows["texts"].append([{"user": "Is the shape red?", "assistant": "yes", "source": "t"}])
        rows["question"].append(q)
        rows["category"].append(category)
        rows["figure"].append(figure)
        rows["group"].append(f"{q}-{figure}")
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hb"))
    result = CliRunner().invoke(main, ["--store", str(tmp_path / "store"), "eval", "--model", tiny_vlm, "--dataset", str(tmp_path / "hb"),
                                       "--corruptions", "", "--interference", "", "--max-new-tokens", "2", "--out", str(tmp_path / "e"), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert set(report["hallusion"]) == {"LI", "VI", "Mix", "consistency"}
    assert report["hallusion"]["LI"] + report["hallusion"]["VI"] + report["hallusion"]["Mix"] == 3 - round(3 * report["clean"]["accuracy"])


# --- a deterministic stand-in model, for the run's mechanics (rejects, resume, output folder) -------------------------

class Stopped(Exception):
    """Raised by the stand-in model to interrupt a run, as a kill would."""


class StandIn:
    """Answers "red" when the image's first pixel row is red enough, else the question's last word; refuses
    (as ``PromptTooLong``) a prompt of more than ``context`` words plus the new tokens, like a model's context;
    raises ``Stopped`` on call ``stop_at``."""

    name = "stand-in"
    model_seconds = prepare_seconds = 0.0

    def __init__(self, context: int = 40, stop_at: int | None = None):
        self.context, self.stop_at, self.calls, self.prompts = context, stop_at, 0, []

    @property
    def context_length(self) -> int:
        return self.context

    def generate(self, requests, max_new_tokens=16, min_new_tokens=0):
        import numpy as np

        from engine.models.backends import Generation, PromptTooLong

        self.calls += 1
        if self.calls == self.stop_at:
            raise Stopped
        too_long = {i: len(r.text.split()) + max_new_tokens for i, r in enumerate(requests)
                    if len(r.text.split()) + max_new_tokens > self.context}
        if too_long:
            raise PromptTooLong(too_long, self.context)
        self.prompts.extend(r.text for r in requests)
        answers = []
        for request in requests:
            pixels = np.asarray(request.images[0], float) if request.images else np.zeros((1, 1, 3))
            red = pixels[..., 0].mean() > 150 and pixels[..., 1].mean() < 40
            answers.append(Generation("red" if red else request.text.split()[-1], 1))
        return answers


def items(n: int = 9, long: tuple = (), broken: tuple = ()) -> list[dict]:
    from conftest import png

    kinds = ("image_heavy", "text_heavy", "vqa")
    return [{"sample_id": f"t:shapes:test:{i}", "images": [b"not an image" if i in broken else png(8, 8)],
             "question": ("word " * 60 if i in long else "What colour is the shape?"), "answer": "red",
             "task_kind": kinds[i % 3], "subset": "shapes", "label": None, "extra": {}} for i in range(n)]


CONFIG = dict(corruptions=("gaussian_noise",), severities=(1, 5), seeds=(0, 1), interference=("UF", "FB"), batch_size=2)


def test_a_prompt_longer_than_the_context_or_a_broken_image_is_rejected_and_the_run_goes_on(tmp_path):
    from engine.evaluate import EvalConfig, evaluate

    report = evaluate(StandIn(context=50), items(long=(3,), broken=(5,)), tmp_path / "e", EvalConfig(**CONFIG), progress=False)
    rows = pq.read_table(tmp_path / "e" / "predictions.parquet").to_pylist()
    rejected = [r for r in rows if r["status"] == "rejected"]
    # clean: the 60-word question and the broken image; under UF (unrelated facts before the question) one
    # image-heavy item's prompt grows past the context, the other's (item 0) still fits
    assert [(r["sample_id"], r["condition"]) for r in rejected] == [
        ("t:shapes:test:3", "clean"), ("t:shapes:test:5", "clean"), ("t:shapes:test:6", "interference:UF")]
    assert rejected[0]["reason"] == "prompt needs 76 tokens, more than the model context of 50"
    assert rejected[1]["reason"] == "image cannot be decoded (UnidentifiedImageError)"
    assert rejected[2]["reason"] == "prompt needs 53 tokens, more than the model context of 50"
    # an item rejected on clean input has no baseline, so it leaves the other conditions
    assert not [r for r in rows if r["sample_id"] in ("t:shapes:test:3", "t:shapes:test:5") and r["condition"] != "clean"]
    assert sum(r["condition"] == "corruption:gaussian_noise" and r["status"] == "ok" for r in rows) == 7 * 2 * 2
    assert report["clean"] == {"accuracy": 1.0, "n": 7, "rejected": 2}
    assert report["rejected"] == {"rows": 3, "reasons": {"image cannot be decoded": 1, "prompt longer than the model context": 2}}
    assert report["interference"]["UF"]["n"] == 1 and report["interference"]["FB"]["n"] == 3
    assert "rejected: 3 predictions (2 items on clean input)" in (tmp_path / "e" / "report.txt").read_text()


def test_eval_rejects_from_the_store_land_in_rejects_once(sample_store, tmp_path):
    from engine.evaluate import EvalConfig, evaluate, load_items

    chosen = load_items(sample_store, "subset in ('shapes_vqa', 'word_math') and row < 5")
    context = 16 + min(len(i["question"].split()) for i in chosen)  # the shortest questions fit, with 16 new tokens
    long = [i["sample_id"] for i in chosen if len(i["question"].split()) + 16 > context]
    assert 0 < len(long) < len(chosen)
    config = EvalConfig(corruptions=(), interference=())
    for out in ("a", "b"):  # a second run (another folder) does not write the same rejects again
        evaluate(StandIn(context=context), chosen, tmp_path / out, config, progress=False, store=sample_store)
    rejects = sample_store.arrow("rejects", filter="stage = 'eval'").to_pylist()
    assert sorted(r["sample_id"] for r in rejects) == sorted(long)
    assert all(r["reason"].startswith("prompt needs") and r["reason"].endswith("(eval, clean)") for r in rejects)
    assert all(r["source"] == "sample" and r["subset"] == r["sample_id"].split(":")[1] and r["split"] for r in rejects)


def test_an_interrupted_eval_resumes_and_writes_the_same_bytes(tmp_path):
    from engine.evaluate import EvalConfig, evaluate

    config = EvalConfig(**CONFIG)
    whole = StandIn()
    evaluate(whole, items(long=(3,)), tmp_path / "whole", config, progress=False, commit_rows=4)
    first = StandIn(stop_at=12)
    with pytest.raises(Stopped):
        evaluate(first, items(long=(3,)), tmp_path / "resumed", config, progress=False, commit_rows=4)
    parts = sorted((tmp_path / "resumed" / "predictions.partial").glob("part-*.parquet"))
    assert parts and not (tmp_path / "resumed" / "predictions.parquet").exists()
    committed = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    second = StandIn()
    evaluate(second, items(long=(3,)), tmp_path / "resumed", config, progress=False, commit_rows=4)
    # the committed predictions are not asked for again; at most the uncommitted batches are redone
    assert len(second.prompts) <= len(whole.prompts) - committed + 1  # +1: the long prompt's row is no model answer
    assert len(second.prompts) < len(whole.prompts)
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == ["accuracy_vs_severity.png", "eval_config.json", "interference.png", "predictions.parquet", "report.json", "report.txt"]
    for name in names:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    keys = [(r["sample_id"], r["condition"], r["severity"], r["seed"]) for r in pq.read_table(tmp_path / "resumed" / "predictions.parquet").to_pylist()]
    assert len(keys) == len(set(keys))
    # a finished run started again changes nothing and asks the model nothing
    again = StandIn()
    evaluate(again, items(long=(3,)), tmp_path / "resumed", config, progress=False)
    assert again.calls == 0 and (tmp_path / "whole" / "report.json").read_bytes() == (tmp_path / "resumed" / "report.json").read_bytes()


def test_another_configuration_in_the_same_out_is_refused_and_overwrite_removes_only_eval_files(tmp_path):
    from engine.evaluate import EvalConfig, evaluate
    from engine.evaluate.run import EvalError

    out = tmp_path / "e"
    evaluate(StandIn(), items(), out, EvalConfig(**CONFIG), progress=False)
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(EvalError, match=r"another configuration \(it differs in config\); pass --overwrite"):
        evaluate(StandIn(), items(), out, EvalConfig(**{**CONFIG, "seeds": (0,)}), progress=False)
    with pytest.raises(EvalError, match="differs in items"):  # other items, same options
        evaluate(StandIn(), items(n=6), out, EvalConfig(**CONFIG), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    report = evaluate(StandIn(), items(), out, EvalConfig(**{**CONFIG, "seeds": (0,)}), progress=False, overwrite=True)
    assert report["corruption"]["gaussian_noise"]["1"]["seeds"] == 1 and (out / "notes.txt").read_text() == "mine"
    # outputs of an eval that recorded no configuration are not taken over either
    (out / "eval_config.json").unlink()
    with pytest.raises(EvalError, match="holds eval outputs .*predictions.parquet.* without eval_config.json"):
        evaluate(StandIn(), items(), out, EvalConfig(**CONFIG), progress=False)
    with pytest.raises(EvalError, match="notes.txt is a file, not a folder"):
        evaluate(StandIn(), items(), out / "notes.txt" / "e", EvalConfig(**CONFIG), progress=False)
    with pytest.raises(EvalError, match="is a file, not a folder"):
        evaluate(StandIn(), items(), out / "notes.txt", EvalConfig(**CONFIG), progress=False)


@pytest.mark.parametrize("option, value, message", [
    ("--corruptions", "gaussian_noise,foo", "error: --corruptions: unknown corruption 'foo'; choose from gaussian_noise, shot_noise"),
    ("--severities", "1,9", "error: --severities: 9 is out of range (allowed: 1-5)"),
    ("--severities", "1,x", "error: --severities: 'x' is not an integer"),
    ("--seeds", "-1", "error: --seeds: -1 is out of range (allowed: >= 0)"),
    ("--interference", "UF,XX", "error: --interference: unknown intervention 'XX'; choose from UF, MD, RP, RI, FB, FW"),
])
def test_bad_eval_options_are_one_line_errors(tmp_path, option, value, message):
    result = CliRunner().invoke(main, ["--store", str(tmp_path / "store"), "eval", "--model", str(tmp_path / "no-model"),
                                       option, value, "--out", str(tmp_path / "e"), "--quiet"])
    assert result.exit_code == 2 and result.output.startswith(message) and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "e").exists()


def test_eval_reads_a_messages_export_like_the_mixture_it_came_from(sample_store, tmp_path):
    from engine.evaluate import EvalConfig, evaluate, load_items

    runner = CliRunner()
    mixture = tmp_path / "mix"
    result = runner.invoke(main, ["--store", str(sample_store.root), "build", "recipes/cauldron_r0.yaml", "--quiet",
                                  "--set", "mixture.budget=60", "--set", f"output.path={mixture}"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["export", str(mixture), "--format", "messages", "--out", str(tmp_path / "new" / "messages")])
    assert result.exit_code == 0, result.output
    from_messages = load_items(dataset=str(tmp_path / "new" / "messages"))
    from_mixture = load_items(dataset=str(mixture / "parquet"))
    fields = ("sample_id", "images", "question", "answer", "subset", "task_kind")
    assert len(from_messages) == 60 and {i["task_kind"] for i in from_messages} > {"vqa"}
    assert [{k: i[k] for k in fields} for i in from_messages] == [{k: i[k] for k in fields} for i in from_mixture]
    report = evaluate(StandIn(), from_messages, tmp_path / "e", EvalConfig(corruptions=(), interference=("FB",)), progress=False)
    assert report["clean"]["n"] == 60 and report["interference"]["FB"]["n"] == sum(i["task_kind"] == "text_heavy" for i in from_messages)


def test_a_hallusion_question_column_does_not_replace_the_prompt(tmp_path):
    import datasets

    from conftest import png
    from engine.evaluate import load_items

    datasets.Dataset.from_dict({"images": [[{"bytes": png(), "path": None}]], "question": ["q1"], "figure": ["original"],
                                "texts": [[{"user": "Is the shape red?", "assistant": "yes", "source": "t"}]]}).save_to_disk(str(tmp_path / "hb"))
    [item] = load_items(dataset=str(tmp_path / "hb"))
    assert item["question"] == "Is the shape red?" and item["extra"] == {"question": "q1", "figure": "original"}


def test_plots_draw_accuracy_and_the_causal_effect_and_say_when_dp_is_undefined():
    from engine.evaluate.run import accuracy_figure, interference_figure

    cell = {"accuracy": 0.0, "accuracy_sd": 0.0, "delta_p_mean": float("nan"), "delta_p_sd": float("nan"), "dropped": 0}
    report = {"clean": {"accuracy": 0.0, "n": 4}, "corruption": {"gaussian_noise": {"1": cell, "5": {**cell, "accuracy": 0.25}}},
              "interference": {"UF": {"n": 4, "accuracy_original": 0.0, "accuracy_perturbed": 0.5, "causal_effect": 0.75},
                               "FB": {"n": 2, "accuracy_original": 0.0, "accuracy_perturbed": 0.0, "causal_effect": 0.0}}}
    accuracy, dp = accuracy_figure(report).axes
    assert accuracy.get_ylabel() == "accuracy" and accuracy.get_ylim() == (0, 1.05)
    [line] = [c.lines[0] for c in accuracy.containers if c.get_label() == "gaussian_noise"]  # the errorbar's data line
    assert list(line.get_xdata()) == [1, 5] and list(line.get_ydata()) == [0.0, 0.25]
    assert [t.get_text() for t in dp.texts] == ["ΔP is undefined:\nthe clean accuracy is 0"]
    defined = {**report, "clean": {"accuracy": 0.5, "n": 4},
               "corruption": {"gaussian_noise": {"1": {**cell, "accuracy": 0.25, "delta_p_mean": -0.5, "delta_p_sd": 0.1}}}}
    [dp_line] = [c.lines[0] for c in accuracy_figure(defined).axes[1].containers if c.get_label() == "gaussian_noise"]
    assert list(dp_line.get_ydata()) == [-0.5]
    bars, effect = interference_figure(report).axes
    assert [b.get_height() for b in bars.patches] == [0.0, 0.0, 0.5, 0.0]  # original UF, FB; perturbed UF, FB
    assert [b.get_height() for b in effect.patches] == [0.75, 0.0] and effect.get_title() == "causal effect of the intervention"
    assert [t.get_text() for t in effect.texts] == ["0.75", "0.00"]  # a zero bar still shows its value


def kill_after_parts(command: list[str], partial: Path, parts: int, timeout: float = 300) -> None:
    """Start ``command``, SIGKILL it once ``partial`` holds ``parts`` committed parts, and check that it
    really was killed mid-run."""
    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if partial.is_dir() and len(list(partial.glob("part-*.parquet"))) >= parts:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


@pytest.mark.slow
def test_a_killed_eval_resumes_to_the_bytes_of_an_uninterrupted_run(sample_store, tiny_vlm, tmp_path):
    options = ["eval", "--model", tiny_vlm, "--where", "subset = 'shapes_vqa' and row < 3", "--corruptions", "gaussian_noise",
               "--severities", "1,2", "--seeds", "0,1", "--interference", "", "--max-new-tokens", "2", "--batch-size", "2",
               "--commit-rows", "2", "--quiet"]
    store = ["--store", str(sample_store.root)]
    kill_after_parts([sys.executable, "-m", "engine.cli", *store, *options, "--out", str(tmp_path / "resumed")],
                     tmp_path / "resumed" / "predictions.partial", parts=3)
    assert not (tmp_path / "resumed" / "predictions.parquet").exists()
    runner = CliRunner()
    for out in ("resumed", "whole"):
        result = runner.invoke(main, [*store, *options, "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert "predictions.parquet" in names and "accuracy_vs_severity.png" in names
    for name in names:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == names
    rows = pq.read_table(tmp_path / "resumed" / "predictions.parquet").to_pylist()
    n = sum(r["condition"] == "clean" for r in rows)
    assert n >= 3 and len(rows) == len({(r["sample_id"], r["condition"], r["severity"], r["seed"]) for r in rows}) == n * 5
    # another configuration in the same folder is refused with one line, and changes nothing
    before = {p.name: p.read_bytes() for p in (tmp_path / "resumed").iterdir()}
    result = runner.invoke(main, [*store, *options, "--seeds", "0", "--out", str(tmp_path / "resumed")])
    assert result.exit_code == 2 and result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "resumed").iterdir()} == before
