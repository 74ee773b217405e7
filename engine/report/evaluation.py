"""The report's eval section, read from an ``engine eval`` folder: accuracy and ΔP against severity per
corruption, accuracy on original vs perturbed inputs and the causal effect per intervention, and the
prediction counts behind them (counted by DuckDB in ``predictions.parquet``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from engine.report.figures import Canvas, subplots
from engine.report.mixture import ReportError
from engine.report.page import Note, Section, Table
from engine.sql import sql_literal


def read_eval(folder: Path) -> dict:
    path = Path(folder) / "report.json"
    if not path.is_file():
        raise ReportError(f"{path}: no report.json; --eval takes a folder `engine eval --out` wrote")
    try:
        report = json.loads(path.read_text())  # NaN (ΔP when clean accuracy is 0) is valid here
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(report, dict) or not isinstance(report.get("clean"), dict):
        raise ReportError(f"{path}: key 'clean' missing; is this an `engine eval` report?")
    for key in ("corruption", "interference"):
        if not isinstance(report.setdefault(key, {}), dict):
            raise ReportError(f"{path}: key {key!r} is not an object")
    for corruption, by_severity in report["corruption"].items():
        if not isinstance(by_severity, dict) or not all(isinstance(c, dict) and str(s).isdigit() for s, c in by_severity.items()):
            raise ReportError(f"{path}: corruption.{corruption}: expected {{severity: {{accuracy, delta_p_mean, ...}}}}")
    for code, cell in report["interference"].items():
        if not isinstance(cell, dict):
            raise ReportError(f"{path}: interference.{code}: expected an object")
    return report


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def eval_section(folder: Path, con, canvas: Canvas) -> Section:
    folder = Path(folder)
    report = read_eval(folder)
    clean = report["clean"]
    clean_accuracy = _nan(clean.get("accuracy"))
    section = Section("eval", "Evaluation",
                      f"{folder}: clean accuracy {clean_accuracy:.3f} on {clean.get('n', 0):,} items. "
                      "ΔP = (P_corrupt − P_clean) / P_clean, mean ± sd over seeds.")
    corruptions = report["corruption"]
    if corruptions:
        figure, axes = subplots(columns=2, width=5.6, height=3.6)
        rows, undefined = [], True
        for corruption, by_severity in sorted(corruptions.items()):
            severities = sorted(by_severity, key=int)
            cells = [by_severity[s] for s in severities]
            x = [int(s) for s in severities]
            axes[0].plot(x, [_nan(c.get("accuracy")) for c in cells], marker="o", ms=4, label=corruption)
            deltas = np.array([_nan(c.get("delta_p_mean")) for c in cells])
            if np.isfinite(deltas).any():
                undefined = False
                axes[1].errorbar(x, deltas, yerr=[_nan(c.get("delta_p_sd")) for c in cells], marker="o", ms=4, capsize=3,
                                 label=corruption)
            rows += [[corruption, int(s), _nan(c.get("accuracy")), _nan(c.get("delta_p_mean")), _nan(c.get("delta_p_sd")),
                      int(c.get("dropped") or 0)] for s, c in zip(severities, cells)]
        ticks = sorted({row[1] for row in rows})
        for axis in axes:
            axis.set_xticks(ticks)  # severities are levels, not a continuum
        if math.isfinite(clean_accuracy):
            axes[0].axhline(clean_accuracy, color="grey", lw=0.9, ls="--", label="clean")
        axes[0].set_ylim(-0.02, 1.02)
        axes[0].set_xlabel("severity")
        axes[0].set_ylabel("accuracy")
        axes[0].set_title("accuracy")
        axes[0].legend(fontsize=7)
        axes[1].axhline(0, color="grey", lw=0.8)
        axes[1].set_xlabel("severity")
        axes[1].set_ylabel("ΔP")
        axes[1].set_title("performance stability ΔP")
        if undefined:
            axes[1].text(0.5, 0.5, "ΔP is undefined:\nclean accuracy is 0", ha="center", va="center", transform=axes[1].transAxes)
        else:
            axes[1].legend(fontsize=7)
        section.blocks.append(canvas.figure("eval_severity", figure, "Accuracy and ΔP against severity"))
        section.blocks.append(Table("Per corruption and severity", ["corruption", "severity", "accuracy", "ΔP mean", "ΔP sd",
                                                                    "dropped (fidelity)"], rows))
    interference = report["interference"]
    if interference:
        codes = list(interference)
        cells = [interference[c] for c in codes]
        figure, axes = subplots(columns=2, width=5.6, height=3.6)
        x = np.arange(len(codes))
        for offset, key, name in ((-0.2, "accuracy_original", "original"), (0.2, "accuracy_perturbed", "perturbed")):
            bars = axes[0].bar(x + offset, [_nan(c.get(key)) for c in cells], 0.4, label=name)
            axes[0].bar_label(bars, fmt="%.2f", fontsize=7)  # a zero bar still shows its value
        axes[0].set_xticks(x, codes)
        axes[0].set_ylim(0, 1.1)
        axes[0].set_ylabel("accuracy")
        axes[0].set_title("accuracy on original vs perturbed inputs")
        axes[0].legend(fontsize=8)
        bars = axes[1].bar(x, [_nan(c.get("causal_effect")) for c in cells], 0.55, color="#c0392b")
        axes[1].bar_label(bars, fmt="%.2f", fontsize=7)
        axes[1].set_xticks(x, codes)
        axes[1].set_ylim(0, 1.1)
        axes[1].set_ylabel("share of predictions that change")
        axes[1].set_title("causal effect")
        section.blocks.append(canvas.figure("eval_interference", figure, "Interventions"))
        section.blocks.append(Table("Per intervention", ["intervention", "n", "accuracy original", "accuracy perturbed",
                                                         "causal effect"],
                                    [[code, int(c.get("n", 0)), _nan(c.get("accuracy_original")), _nan(c.get("accuracy_perturbed")),
                                      _nan(c.get("causal_effect"))] for code, c in zip(codes, cells)]))
    if "hallusion" in report:
        h = report["hallusion"]
        section.blocks.append(Table("HallusionBench-style diagnosis", ["language-induced", "visual-induced", "mixed", "consistency"],
                                    [[h.get("LI"), h.get("VI"), h.get("Mix"), _nan(h.get("consistency"))]]))
    predictions = folder / "predictions.parquet"
    if predictions.is_file():
        import duckdb

        source = f"read_parquet({sql_literal(str(predictions))})"
        try:
            columns = {r[0] for r in con.execute(f"describe select * from {source}").fetchall()}
            kind = "coalesce(task_kind, '')" if "task_kind" in columns else "''"
            dropped = "coalesce(sum(dropped), 0)" if "dropped" in columns else "0"  # rows the fidelity rule removed
            counted = con.execute(
                f"select condition, {kind}, count(sample_id), count_if(correct), {dropped} from {source} group by all order by all"
            ).fetchall()
        except duckdb.Error as error:
            raise ReportError(f"{predictions}: cannot be read ({str(error).splitlines()[0]})") from None
        section.blocks.append(Table("Predictions behind the numbers", ["condition", "task kind", "predictions", "correct", "dropped"],
                                    [list(r) for r in counted], f"counted in {predictions}"))
    if not corruptions and not interference:
        section.blocks.append(Note("The run has no corruption or intervention results."))
    return section

