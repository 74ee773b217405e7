"""``engine eval``: run a model over an evaluation set under clean, corrupted and intervened inputs and
report accuracy, performance stability, modality interference and (when the set has control pairs) the
HallusionBench-style error diagnosis. Every prediction is written to ``predictions.parquet`` next to the
report, so any number traces back to its rows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from engine.evaluate.metrics import causal_effect, consistency, delta_p, diagnose, is_correct
from engine.generate.backends import Backend, Request, decode_images
from engine.generate.corrupt import offered_letters
from engine.hashing import hash_u64
from engine.perturb.image import corrupt_images
from engine.perturb.text import KINDS as TEXT_CORRUPTIONS
from engine.perturb.text import corrupt_texts
from engine.perturb.variants import misleading, replacement_image, unrelated_facts, wrong_option
from engine.perturb.image import CORRUPTIONS as IMAGE_CORRUPTIONS

INTERFERENCE = {  # code -> (perturbation, modality changed, task kind it applies to)
    "UF": ("unrelated_facts", "text", "image_heavy"),
    "MD": ("misleading", "text", "image_heavy"),
    "RP": ("random_pixels", "image", "text_heavy"),
    "RI": ("irrelevant_image", "image", "text_heavy"),
    "FB": ("black", "image", "text_heavy"),
    "FW": ("white", "image", "text_heavy"),
}
HALLUSION_COLUMNS = ("question", "category", "figure", "group")


@dataclass
class EvalConfig:
    corruptions: tuple[str, ...] = tuple(IMAGE_CORRUPTIONS) + TEXT_CORRUPTIONS
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    seeds: tuple[int, ...] = (0, 1, 2)
    interference: tuple[str, ...] = tuple(INTERFERENCE)
    interference_on: str = "task_kind"  # or "all": every item gets every intervention
    max_new_tokens: int = 16
    batch_size: int = 8
    prompt_suffix: str = ""


def load_items(store=None, where: str | None = None, dataset: str | None = None, limit: int | None = None) -> list[dict]:
    """Evaluation items (sample_id, images, question, answer, task_kind, subset, label, and the
    HallusionBench columns when present) from the store or from an HF dataset folder / Parquet files."""
    if dataset:
        path = Path(dataset)
        if path.is_dir() and not list(path.glob("*.parquet")) and not (path / "parquet").exists():
            import datasets

            table = datasets.load_from_disk(str(path)).with_format("arrow")[:]
        else:
            files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
            table = pa.concat_tables([pq.read_table(f) for f in files])
        rows = table.to_pylist()
        items = []
        for index, row in enumerate(rows):
            images = [i["bytes"] if isinstance(i, dict) else i for i in (row.get("images") or [])]
            turn = (row.get("texts") or row.get("turns"))[0]
            items.append({"sample_id": row.get("sample_id") or f"{path.name}:{index}", "images": images, "question": turn["user"],
                          "answer": turn["assistant"], "task_kind": row.get("task_kind") or "vqa", "subset": row.get("subset") or path.name,
                          "label": row.get("label"), **{k: row[k] for k in HALLUSION_COLUMNS if k in row}})
    else:
        con, _ = store.connect()
        items = con.sql(
            f"""select sample_id, images, turns[1].user as question, turns[1].assistant as answer, task_kind, subset, label
            from facts where {where or "split = 'test'"} order by sample_id"""
        ).to_arrow_table().to_pylist()
    return items[:limit] if limit else items


def _conditions(config: EvalConfig) -> Iterator[tuple[str, str | None, int, int]]:
    yield ("clean", None, 0, 0)
    for corruption in config.corruptions:
        for severity in config.severities:
            for seed in config.seeds:
                yield ("corruption", corruption, severity, seed)
    for code in config.interference:
        yield ("interference", code, 0, 0)


def _apply(items: list[dict], kind: str, name: str | None, severity: int, seed: int, config: EvalConfig,
           encoder, context: dict) -> tuple[list[dict], int]:
    """The items of one condition (possibly fewer: dropped by the text fidelity rule) and the number dropped."""
    if kind == "clean":
        return items, 0
    if kind == "corruption" and name in IMAGE_CORRUPTIONS:
        out = []
        for index, item in enumerate(items):
            noisy = corrupt_images(item["images"], name, severity, seed * 1_000_003 + index) if item["images"] else []
            out.append({**item, "images": noisy})
        return out, 0
    if kind == "corruption":
        result = corrupt_texts([i["question"] for i in items], name, severity, seed, encoder)
        kept = [{**item, "question": text} for item, text in zip(items, result.texts) if text is not None]
        return kept, result.dropped
    perturbation, modality, task_kind = INTERFERENCE[name]
    chosen = [i for i in items if config.interference_on == "all" or i["task_kind"] == task_kind]
    out = []
    for item in chosen:
        if perturbation == "unrelated_facts":
            out.append({**item, "question": unrelated_facts(item["question"], item["sample_id"])})
        elif perturbation == "misleading":
            wrong = wrong_option(item["question"], item["answer"], item["label"], context["labels"].get(item["subset"], []),
                                 context["answers"].get(item["subset"], []), item["sample_id"])
            if wrong is not None:
                out.append({**item, "question": misleading(item["question"], wrong, item["sample_id"])})
        elif item["images"]:
            images = [replacement_image(perturbation, data, item["sample_id"], context["donors"], item["subset"])
                      for data in item["images"]]
            if all(i is not None for i in images):
                out.append({**item, "images": images})
    return out, 0


def _predict(backend: Backend, items: list[dict], config: EvalConfig) -> list[str]:
    predictions = []
    for start in range(0, len(items), config.batch_size):
        batch = items[start : start + config.batch_size]
        requests = [Request(decode_images(i["images"]), (i["question"] + " " + config.prompt_suffix).strip()) for i in batch]
        predictions.extend(g.text for g in backend.generate(requests, config.max_new_tokens))
    return predictions


def evaluate(backend: Backend, items: list[dict], out: str | Path, config: EvalConfig | None = None,
             encoder=None, progress: bool = True) -> dict:
    """Run every condition, write ``predictions.parquet``, ``report.json``, ``report.txt`` and plots to
    ``out``; returns the report."""
    config = config or EvalConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(c in TEXT_CORRUPTIONS for c in config.corruptions) and encoder is None:
        from engine.embed import MINILM, load_encoder

        encoder = load_encoder(MINILM)
    labels: dict[str, set] = {}
    answers: dict[str, set] = {}
    for item in items:
        if item.get("label") is not None:
            labels.setdefault(item["subset"], set()).add(item["label"])
        answers.setdefault(item["subset"], set()).add(item["answer"])
    context = {"labels": {k: sorted(v) for k, v in labels.items()}, "answers": {k: sorted(v) for k, v in answers.items()},
               "donors": [(i["subset"], i["images"][0]) for i in sorted(items, key=lambda i: hash_u64("eval-donor:", i["sample_id"]))[:64]
                          if i["images"]]}
    records = []
    conditions = list(_conditions(config))
    for kind, name, severity, seed in tqdm(conditions, desc=f"eval ({backend.name})", unit="condition", disable=not progress):
        chosen, dropped = _apply(items, kind, name, severity, seed, config, encoder, context)
        predictions = _predict(backend, chosen, config) if chosen else []
        for item, prediction in zip(chosen, predictions):
            record = {"condition": kind if kind == "clean" else f"{kind}:{name}", "severity": severity, "seed": seed,
                      "sample_id": item["sample_id"], "task_kind": item["task_kind"], "prediction": prediction,
                      "answer": item["answer"],
                      "correct": is_correct(prediction, item["answer"], offered_letters(item["question"]) or None,
                                            context["labels"].get(item["subset"]) or None)}
            record.update({k: item.get(k) for k in HALLUSION_COLUMNS if k in item})
            records.append(record)
        if dropped:
            records.append({"condition": f"{kind}:{name}", "severity": severity, "seed": seed, "sample_id": None,
                            "prediction": None, "answer": None, "correct": None, "dropped": dropped})
    table = pa.Table.from_pylist(records)
    pq.write_table(table, out / "predictions.parquet")
    report = summarise(records, config)
    report["model"] = {"name": backend.name, "adapter": getattr(backend, "adapter", None)}  # which weights were measured
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    (out / "report.txt").write_text(format_report(report))
    plot(report, out)
    return report


def summarise(records: list[dict], config: EvalConfig) -> dict:
    """Accuracy per condition, dP per corruption x severity (mean and sd over seeds), interference
    accuracy and causal effect, and the HallusionBench diagnosis of the clean predictions."""
    scored = [r for r in records if r.get("sample_id") is not None]
    clean = {r["sample_id"]: r for r in scored if r["condition"] == "clean"}
    clean_accuracy = float(np.mean([r["correct"] for r in clean.values()])) if clean else float("nan")
    report: dict = {"clean": {"accuracy": clean_accuracy, "n": len(clean)}, "corruption": {}, "interference": {}}
    for corruption in config.corruptions:
        for severity in config.severities:
            accuracies, deltas, dropped = [], [], 0
            for seed in config.seeds:
                rows = [r for r in scored if r["condition"] == f"corruption:{corruption}" and r["severity"] == severity and r["seed"] == seed]
                dropped += sum(r.get("dropped") or 0 for r in records if r["condition"] == f"corruption:{corruption}"
                               and r["severity"] == severity and r["seed"] == seed and r.get("sample_id") is None)
                if rows:
                    accuracy = float(np.mean([r["correct"] for r in rows]))
                    accuracies.append(accuracy)
                    deltas.append(delta_p(clean_accuracy, accuracy))
            if accuracies:
                report["corruption"].setdefault(corruption, {})[str(severity)] = {
                    "accuracy": float(np.mean(accuracies)), "delta_p_mean": float(np.mean(deltas)),
                    "delta_p_sd": float(np.std(deltas, ddof=1)) if len(deltas) > 1 else 0.0, "dropped": dropped}
    for code in config.interference:
        rows = [r for r in scored if r["condition"] == f"interference:{code}"]
        if not rows:
            continue
        originals = [clean[r["sample_id"]] for r in rows]
        report["interference"][code] = {
            "n": len(rows), "accuracy_original": float(np.mean([o["correct"] for o in originals])),
            "accuracy_perturbed": float(np.mean([r["correct"] for r in rows])),
            "causal_effect": causal_effect([o["prediction"] for o in originals], [r["prediction"] for r in rows]),
        }
    clean_rows = list(clean.values())
    if clean_rows and all(k in clean_rows[0] and clean_rows[0][k] is not None for k in HALLUSION_COLUMNS):
        report["hallusion"] = {**diagnose(clean_rows), "consistency": consistency(clean_rows)}
    return report


def format_report(report: dict) -> str:
    lines = [f"clean accuracy {report['clean']['accuracy']:.3f} (n = {report['clean']['n']})", ""]
    if report["corruption"]:
        lines.append(f"{'corruption':<16}{'severity':>9}{'accuracy':>10}{'dP mean':>10}{'dP sd':>8}{'dropped':>9}")
        for corruption, by_severity in report["corruption"].items():
            for severity, cell in by_severity.items():
                lines.append(f"{corruption:<16}{severity:>9}{cell['accuracy']:>10.3f}{cell['delta_p_mean']:>10.3f}"
                             f"{cell['delta_p_sd']:>8.3f}{cell['dropped']:>9}")
        lines.append("")
    if report["interference"]:
        lines.append(f"{'intervention':<14}{'n':>6}{'acc original':>14}{'acc perturbed':>15}{'causal effect':>15}")
        for code, cell in report["interference"].items():
            lines.append(f"{code:<14}{cell['n']:>6}{cell['accuracy_original']:>14.3f}{cell['accuracy_perturbed']:>15.3f}"
                         f"{cell['causal_effect']:>15.3f}")
        lines.append("")
    if "hallusion" in report:
        h = report["hallusion"]
        lines.append(f"HallusionBench-style: LI {h['LI']}  VI {h['VI']}  Mix {h['Mix']}  consistency {h['consistency']:.3f}")
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> None:
    """accuracy_vs_severity.png and interference.png (when there is something to draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if report["corruption"]:
        figure, axis = plt.subplots(figsize=(6, 4))
        for corruption, by_severity in report["corruption"].items():
            severities = sorted(by_severity, key=int)
            axis.errorbar([int(s) for s in severities], [by_severity[s]["delta_p_mean"] for s in severities],
                          yerr=[by_severity[s]["delta_p_sd"] for s in severities], marker="o", label=corruption, capsize=3)
        axis.axhline(0, color="grey", lw=0.8)
        axis.set_xlabel("severity")
        axis.set_ylabel("performance stability dP")
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out / "accuracy_vs_severity.png", dpi=120)
        plt.close(figure)
    if report["interference"]:
        codes = list(report["interference"])
        figure, axis = plt.subplots(figsize=(6, 4))
        x = np.arange(len(codes))
        axis.bar(x - 0.2, [report["interference"][c]["accuracy_original"] for c in codes], 0.4, label="original")
        axis.bar(x + 0.2, [report["interference"][c]["accuracy_perturbed"] for c in codes], 0.4, label="perturbed")
        axis.set_xticks(x, codes)
        axis.set_ylabel("accuracy")
        axis.legend()
        figure.tight_layout()
        figure.savefig(out / "interference.png", dpi=120)
        plt.close(figure)
