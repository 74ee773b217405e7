"""Answer matching and the robustness metrics of ``engine eval``, as pure functions over prediction tables.

- Matching (as the papers score): a multiple-choice question is right when the first option letter in the
  prediction is the gold letter; a question with a known class set is right when the first class named in
  the prediction is the gold class; otherwise the normalised prediction must equal the normalised answer.
- Performance stability (Self-Captioning MI Tuning, §5.3): dP = (P_corrupt - P_clean) / P_clean.
- Causal effect of an intervention (Modality Interference, §3): the share of predictions that change.
- HallusionBench-style diagnosis (Self-Captioning MI Tuning, App. D.1): language-induced (LI),
  visual-induced (VI) and mixed errors, and consistency (share of figures with every question right).
"""

from __future__ import annotations

import numpy as np

from engine.options import normalise, reply_letter

UNCERTAIN = ("uncertain", "not sure", "cannot be determined", "can't tell", "unknown")


def first_letter(prediction: str, letters: list[str]) -> str | None:
    """The first option letter a prediction names (``engine.options.reply_letter``)."""
    return reply_letter(prediction, letters)


def first_class(prediction: str, classes: list[str]) -> str | None:
    """The class whose name appears first (as whole words) in the normalised prediction."""
    text = f" {normalise(prediction)} "
    found = [(text.find(f" {normalise(c)} "), c) for c in classes if f" {normalise(c)} " in text]
    return min(found)[1] if found else None


def is_correct(prediction: str, answer: str, letters: list[str] | None = None, classes: list[str] | None = None) -> bool:
    """Whether a prediction matches the gold answer (letter, class name, or normalised exact match)."""
    if letters and answer.strip() in letters:
        return first_letter(prediction, letters) == answer.strip()
    if classes and answer in classes:
        return first_class(prediction, classes) == answer
    return normalise(prediction) == normalise(answer)


def is_uncertain(prediction: str) -> bool:
    return any(phrase in normalise(prediction) for phrase in UNCERTAIN)


def delta_p(clean_accuracy: float, corrupt_accuracy: float) -> float:
    """Performance stability dP = (P_corrupt - P_clean) / P_clean (0 = unaffected, -1 = destroyed)."""
    if clean_accuracy == 0:
        return float("nan")
    return (corrupt_accuracy - clean_accuracy) / clean_accuracy


def causal_effect(clean_predictions: list[str], intervened_predictions: list[str]) -> float:
    """Share of samples whose (normalised) prediction changes under the intervention."""
    if len(clean_predictions) != len(intervened_predictions):
        raise ValueError("prediction lists must be aligned sample by sample")
    if not clean_predictions:
        return float("nan")
    changed = [normalise(a) != normalise(b) for a, b in zip(clean_predictions, intervened_predictions)]
    return float(np.mean(changed))


def diagnose(rows: list[dict]) -> dict[str, int]:
    """LI / VI / mixed error counts (App. D.1). Each row: ``question`` (key shared by a question's
    variants), ``category`` ("VS" visual supplement / "VD" visual dependent), ``figure`` ("none",
    "original" = the control, "edited"), ``correct``, ``prediction``.

    A wrong answer is language-induced when, in VS, it was given without an image, or the no-image answer
    was right and the edited figure gets that same answer; visual-induced when, in VD, the control figure
    is answered wrongly, or when the control was right and the edited figure is answered wrongly (or
    "uncertain"); mixed otherwise.
    """
    by_question: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_question.setdefault(row["question"], {})[row["figure"]] = row
    counts = {"LI": 0, "VI": 0, "Mix": 0}
    for variants in by_question.values():
        none, control = variants.get("none"), variants.get("original")
        for figure, row in variants.items():
            if row["correct"] and not (figure == "edited" and is_uncertain(row["prediction"])):
                continue
            if figure == "none":
                kind = "LI" if row["category"] == "VS" else "Mix"
            elif figure == "original":
                kind = "VI" if row["category"] == "VD" else "Mix"
            elif row["category"] == "VS" and none is not None and none["correct"] and \
                    normalise(row["prediction"]) == normalise(none["prediction"]):
                kind = "LI"
            elif control is not None and control["correct"]:
                kind = "VI"
            else:
                kind = "Mix"
            counts[kind] += 1
    return counts


def consistency(rows: list[dict]) -> float:
    """Share of figures (``group``) whose questions are all answered correctly."""
    groups: dict[str, bool] = {}
    for row in rows:
        groups[row["group"]] = groups.get(row["group"], True) and bool(row["correct"])
    return float(np.mean(list(groups.values()))) if groups else float("nan")
