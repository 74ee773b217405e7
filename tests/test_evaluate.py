"""`engine eval`: answer matching and the robustness metrics on hand-made tables; an end-to-end run."""

import json

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
    assert report["clean"] == {"accuracy": 0.75, "n": 4}
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
    scored = [p for p in predictions if p["sample_id"] is not None]
    n = 12  # 6 shapes_vqa rows (task kind vqa) + 6 word_math rows (text-heavy: the image interventions apply)
    assert sum(p["condition"] == "clean" for p in scored) == n
    assert sum(p["condition"] == "corruption:gaussian_noise" for p in scored) == n * 2 * 2
    assert {p["condition"] for p in scored if p["condition"].startswith("interference")} == {"interference:FB", "interference:RI"}
    assert all(p["task_kind"] == "text_heavy" for p in scored if p["condition"] == "interference:FB")
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(report["corruption"]) == {"gaussian_noise", "replace"} and set(report["corruption"]["replace"]) == {"1", "5"}
    for name in ("accuracy_vs_severity.png", "interference.png", "report.txt"):
        assert (tmp_path / "eval" / name).exists()


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
