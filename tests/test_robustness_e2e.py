"""bench/robustness_e2e.py --quick: the whole pipeline (ingest -> embed/score/gate -> build -> train -> eval) runs,
records what it must (mixture hashes, train manifests, eval reports, both tables) and resumes without redoing
anything. It checks the pipeline, not the outcome (the quick models train for a few steps)."""

import json
import re

import pytest

from conftest import load_bench


@pytest.mark.slow
def test_quick_run_records_every_step_and_resumes_without_redoing_any(tmp_path):
    bench = load_bench("robustness_e2e")
    out = tmp_path / "e2e"
    assert bench.main(["--quick", "--out", str(out), "--jobs", "2"]) == 0
    results = json.loads((out / "results.json").read_text())

    mixtures = results["mixtures"]
    assert set(mixtures) == {"r0", "r25", "r50", "warm", "interference", "mi_gate", "r0_blank"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", m["manifest_sha256"]) for m in mixtures.values())
    assert all(m["rows"] == 400 for m in mixtures.values())
    assert mixtures["r0"]["captioned"] == 0 < mixtures["r25"]["captioned"] < mixtures["r50"]["captioned"]
    # the gate captions at most r25's budget (fewer when fewer rows are u_v-dominant)
    assert mixtures["mi_gate"]["tau"] == mixtures["r25"]["captioned"] / 400 and mixtures["mi_gate"]["captioned"] <= mixtures["r25"]["captioned"]
    assert mixtures["interference"]["variants"]["misleading"] > 0 and mixtures["interference"]["variants"]["unrelated_facts"] > 0
    assert mixtures["r0_blank"]["derived_from"]["mixture"] == "r0"

    train = results["train"]
    models = {"warm-s0", "r0-s0", "text-only-s0", "r25-s0", "r50-s0", "mi_gate-s0",
              *(f"interference-{m}-s0" for m in bench.METHODS)}
    assert set(train) == models
    for name, manifest in train.items():
        parts = ["lm", "connector"] if name.startswith("interference") else ["lm", "connector", "vision"]
        assert manifest["config"]["parts"] == parts and manifest["config"]["full"] is True, name
        assert manifest["config"]["seed"] == 0 and len(manifest["mixture_manifest_sha256"]) == 64
    assert train["r25-s0"]["mixture_manifest_sha256"] == mixtures["r25"]["manifest_sha256"]
    assert train["r0-s0"]["model"].endswith("models/warm-s0") and train["text-only-s0"]["model"].endswith("models/base")
    assert {train[f"interference-{m}-s0"]["config"]["method"] for m in bench.METHODS} == set(bench.METHODS)

    evals = results["eval"]
    assert evals["text-only-s0"]["corruption"] == {} and "FB" in evals["text-only-s0"]["interference"]
    for name in ("r0-s0", "r25-s0", "r50-s0", "mi_gate-s0"):
        assert set(evals[name]["corruption"]) == set(bench.NOISES)
        assert all(set(cells) == {"1", "5"} for cells in evals[name]["corruption"].values())
        assert evals[name]["clean"]["n"] == evals["r0-s0"]["clean"]["n"] > 0 and "FB" in evals[name]["interference"]
    for method in bench.METHODS:
        assert set(evals[f"interference-{method}-s0"]["interference"]) == {"UF", "MD"}
        assert set(evals[f"interference-{method}-s0-text"]["interference"]) == {"RP", "FB", "FW"}

    for name in bench.REDUNDANCY:
        assert f"| {name} |" in results["table_redundancy"]
    for method in bench.METHODS:
        assert f"| {method} |" in results["table_interference"]
    assert "text-only" in results["table_baseline"] and (out / "redundancy_dp.png").is_file() and (out / "interference.png").is_file()
    assert set(results["task_seconds"]) == models  # every task ran in its own worker process (--jobs 2 by default)
    assert not any((out / "models").glob("*/checkpoints"))  # the run removes its own checkpoints

    # a second run finds every output and redoes nothing
    stamps = {p: p.stat().st_mtime_ns for p in (out / "models").glob("*/model.safetensors")}
    assert bench.main(["--quick", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "models").glob("*/model.safetensors")} == stamps
    again = json.loads((out / "results.json").read_text())
    assert again["mixtures"] == mixtures
    assert json.dumps(again["eval"], sort_keys=True) == json.dumps(evals, sort_keys=True)  # NaN-safe (undefined dP)
