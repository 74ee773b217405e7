"""The attribution-versus-eval benchmark, in its quick form: ingest easy-vqa, build a mixture, train three
models through `engine train`, evaluate and attribute them through `engine eval` and `engine attribute`, and
resume from what is done."""

import json

import pytest

from conftest import load_bench


@pytest.mark.slow
def test_quick_run_trains_evaluates_attributes_and_resumes(tmp_path):
    from safetensors.torch import load_file

    bench = load_bench("attribution_vs_eval")
    work = tmp_path / "work"
    plan = bench.QUICK
    results = bench.run(work, plan)
    assert list(results["models"]) == ["all-long", "all-warm", "lm-short", "lm-long"]
    # the first 120 test questions: 85 yes/no, 16 shape, 19 colour
    counts = {"yes/no": 85, "shape": 16, "colour": 19}
    base = load_file(str(work / "models" / "base" / "model.safetensors"))
    for model in plan.models:
        entry = results["models"][model.name]
        assert entry["train"]["steps"] == model.steps and entry["train"]["parts"] == model.parts
        # `--train` reached the trainer: only the all-parts model has a vision tower that moved
        weights = load_file(str(work / "models" / model.name / "model.safetensors"))
        vision = [name for name in base if name.startswith("model.vision_model.")]
        moved = any(not (weights[name] == base[name]).all() for name in vision)
        assert moved == ("vision" in model.parts), model.name
        report = entry["eval"]
        assert report["all"]["clean"]["n"] == 120
        assert {kind: r["clean"]["n"] for kind, r in report["by_type"].items()} == counts
        for scope in (report["all"], *report["by_type"].values()):
            assert set(scope["interference"]) == {"RP", "FB", "FW"}
            assert set(scope["corruption"]["gaussian_noise"]) == {"1", "3", "5"}
            assert all(0 <= cell["causal_effect"] <= 1 for cell in scope["interference"].values())
        # the per-type reports partition the whole: their accuracies average back to it
        whole = sum(r["clean"]["accuracy"] * r["clean"]["n"] for r in report["by_type"].values()) / 120
        assert whole == pytest.approx(report["all"]["clean"]["accuracy"])
        for kind, n in {"all": 120, **counts}.items():
            layers = entry["attribute"][kind]["layers"]
            assert [row["layer"] for row in layers] == [1, 2, 3, 4]  # every decoder layer of the 4
            for row in layers:
                assert row["n"] == n and row["CT"] + row["CI"] == pytest.approx(1)
                assert set(row["intervals"]) == {"R", "U_I", "U_T", "S", "CT", "CI"}
                assert row["shuffled_mean_q95"]["U_I"][1] >= row["shuffled_mean_q95"]["U_I"][0] >= 0
    assert (work / "attribution_vs_eval.png").stat().st_size > 0
    assert "lm-short  all        120" in bench.summary(results)
    first = (work / "results.json").read_bytes()

    # a run cut off after training: the later steps are redone, training is not, and the results are the same
    trained = {m.name: (work / "models" / m.name / "model.safetensors").stat().st_mtime_ns for m in plan.models}
    for name in ("eval-lm-long", "attribute-all-long-all", "attribute-all-long-colour"):
        (work / "steps" / f"{name}.json").unlink()
    (work / "results.json").unlink()
    bench.run(work, plan)
    assert (work / "results.json").read_bytes() == first
    assert trained == {m.name: (work / "models" / m.name / "model.safetensors").stat().st_mtime_ns for m in plan.models}
    assert set(json.loads((work / "timings.json").read_text())) >= {"ingest", "build", "train-lm-short", "eval-all-long"}
