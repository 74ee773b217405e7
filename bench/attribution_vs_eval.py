"""Attribution against evaluation, on models trained on easy-vqa, through the engine's own commands only.

The script ingests easy-vqa (PyPI, offline), builds a mixture of its train split, builds a small
SmolVLM-architecture model from config (random weights; 64-px images, 4 image tokens, 4 decoder layers) and
trains it three ways with `engine train --full`:

- ``lm-short``: the language model only, briefly: it reaches what the question alone allows;
- ``lm-long``: the language model only, ten times longer (the vision tower and connector stay random);
- ``all-long``: every part (vision tower, connector, language model), as long as ``lm-long``.

On the same test questions it then runs `engine eval` (accuracy, and the causal effect of the image
interventions RP, FB and FW on every item, plus Gaussian noise at severities 1, 3 and 5) and `engine attribute`
(every decoder layer, bootstrap intervals, shuffled-pairing baseline), over all questions and per question
type (yes/no, colour, shape: the type follows from the answer). Everything goes through ``engine.cli``'s
commands, called in-process.

Each step leaves its output in ``--work`` (the store, the mixture, the models, the eval folders, one JSON file
per finished step under ``steps/``): a killed run started again skips what is done, and `engine train`
and `engine eval` resume their own unfinished work. ``results.json`` and ``attribution_vs_eval.png`` are
rewritten from the step files at the end, byte-identical for the same finished steps.

    python bench/attribution_vs_eval.py [--work runs/attribution_vs_eval] [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # a tiny model on a shared CPU: more threads only contend
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

# the answer decides the question type: easy-vqa asks for a colour, a shape, or yes/no about either
QUESTION_TYPES = {
    "yes/no": "label in ('yes', 'no')",
    "shape": "label in ('circle', 'rectangle', 'triangle')",
    "colour": "label not in ('yes', 'no', 'circle', 'rectangle', 'triangle')",
}
INTERVENTIONS = ("RP", "FB", "FW")
NOISE = "gaussian_noise"
SEVERITIES = (1, 3, 5)
# text model: 4 decoder layers of width 64; vision: one SigLIP block on 8-px patches of the 64-px image, pixel
# shuffle by 4: 4 image tokens per image
MODEL_SIZE = dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
                  vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                              patch_size=8),
                  scale_factor=4, vocab_size=None)


@dataclass(frozen=True)
class Model:
    name: str
    parts: str  # `engine train --train`
    steps: int  # in all, the warm start included
    what: str
    warm: int = 0  # first this many steps on the colour and shape questions only (every part, at Plan.lr)
    lr: float | None = None  # after the warm start (default: Plan.lr)


@dataclass(frozen=True)
class Plan:
    models: tuple[Model, ...]
    test_rows: int  # test questions (rows 0..N-1 of the test split), the same for eval and attribution
    budget: int  # train rows in the mixture
    batch: int
    lr: float
    bootstrap: int
    shuffles: int


FULL = Plan(models=(Model("all-long", "lm,connector,vision", 3000, "every part, 3,000 steps"),
                    Model("all-warm", "lm,connector,vision", 3000, "every part, 600 steps on colour/shape questions, then "
                          "2,400 on all", warm=600, lr=1e-3),
                    Model("lm-short", "lm", 300, "language model only, 300 steps"),
                    Model("lm-long", "lm", 3000, "language model only, 3,000 steps")),
            test_rows=4000, budget=38575, batch=32, lr=3e-3, bootstrap=50, shuffles=20)
QUICK = Plan(models=(Model("all-long", "lm,connector,vision", 8, "every part, 8 steps"),
                     Model("all-warm", "lm,connector,vision", 8, "every part, 4 steps on colour/shape, then 4 on all", warm=4,
                           lr=1e-3),
                     Model("lm-short", "lm", 4, "language model only, 4 steps"),
                     Model("lm-long", "lm", 8, "language model only, 8 steps")),
             test_rows=120, budget=256, batch=8, lr=3e-3, bootstrap=4, shuffles=3)


def engine(work: Path, *args: str) -> None:
    """One `engine` command, in-process, on the work folder's store; a failure raises with the command's message."""
    from engine.cli import main

    print("$ engine " + " ".join(args), flush=True)
    main.main(["--store", str(work / "store"), *args], standalone_mode=False)


def step(work: Path, name: str, run, timings: dict) -> dict:
    """``run()``'s result, computed once: kept with its wall-clock seconds in ``steps/{name}.json`` (written
    last, atomically); the seconds go to ``timings``."""
    path = work / "steps" / f"{name.replace('/', '_')}.json"
    if not path.exists():
        clock = time.perf_counter()
        result = run()
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"result": result, "seconds": round(time.perf_counter() - clock, 1)}, indent=1,
                                        sort_keys=True))
        os.replace(temporary, path)
    saved = json.loads(path.read_text())
    timings[name] = saved["seconds"]
    return saved["result"]


def build_model(folder: Path) -> Path:
    from engine.models import tiny

    tiny.SIZES.setdefault("easy-vqa", MODEL_SIZE)
    if not (folder / "config.json").exists():
        tiny.build_tiny_smolvlm(folder, size="easy-vqa")
    return folder


def test_where(plan: Plan, question_type: str | None = None) -> str:
    where = f"split = 'test' and row < {plan.test_rows}"
    return f"{where} and {QUESTION_TYPES[question_type]}" if question_type else where


def read_rows(work: Path, sql: str) -> list[dict]:
    out = work / "query.jsonl"
    engine(work, "query", sql, "--format", "json", "--output", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    out.unlink()
    return rows


def train(work: Path, plan: Plan, model: Model, base: Path) -> dict:
    """`engine train --full` from ``base`` (after the warm start on the colour and shape questions, if any);
    a killed run resumes from its last checkpoint."""
    def run(mixture: str, start: Path, out: Path, steps: int, lr: float) -> dict:
        if not (out / "train_manifest.json").exists():
            resume = ["--resume"] if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()) else []
            engine(work, "train", str(work / mixture), "--model", str(start), "--method", "sft", "--full", "--train", model.parts,
                   "--lr", str(lr), "--batch-size", str(plan.batch), "--effective-batch", str(plan.batch), "--max-steps",
                   str(steps), "--save-steps", str(max(steps // 6, 1)), "--seed", "0", "--device", "cpu", "--out", str(out),
                   "--quiet", *resume)
        return json.loads((out / "train_manifest.json").read_text())

    out = work / "models" / model.name
    manifests = []
    if model.warm:
        manifests.append(run("mixture-colour-shape", base, out.with_name(f"{model.name}-warm"), model.warm, plan.lr))
        base = out.with_name(f"{model.name}-warm")
    manifests.append(run("mixture", base, out, model.steps - model.warm, model.lr or plan.lr))
    ce = [s["ce"] for s in manifests[-1]["steps"]]
    return {"steps": sum(m["global_step"] for m in manifests), "parts": model.parts, "what": model.what,
            "ce_last_50": sum(ce[-50:]) / len(ce[-50:]), "train_seconds": round(sum(m["seconds"] for m in manifests), 1)}


def evaluate(work: Path, plan: Plan, model: Model) -> dict:
    """`engine eval` on the test questions; the report per question type from the same predictions, through
    the eval's own summary."""
    import pyarrow.parquet as pq

    from engine.evaluate.run import EvalConfig, summarise

    out = work / "eval" / model.name
    engine(work, "eval", "--model", str(work / "models" / model.name), "--where", test_where(plan),
           "--corruptions", NOISE, "--severities", ",".join(map(str, SEVERITIES)), "--seeds", "0",
           "--interference", ",".join(INTERVENTIONS), "--interference-on", "all", "--max-new-tokens", "4",
           "--batch-size", "32", "--out", str(out), "--quiet")
    report = json.loads((out / "report.json").read_text())
    records = pq.read_table(out / "predictions.parquet").to_pylist()
    config = EvalConfig(corruptions=(NOISE,), severities=SEVERITIES, seeds=(0,), interference=INTERVENTIONS)
    types = {answer: kind for kind, answers in answer_types(work).items() for answer in answers}
    by_type = {kind: summarise([r for r in records if types.get(r["answer"]) == kind], config) for kind in QUESTION_TYPES}
    keep = lambda r: {k: r[k] for k in ("clean", "corruption", "interference")}  # noqa: E731
    return {"all": keep(report), "by_type": {kind: keep(r) for kind, r in by_type.items()}}


def answer_types(work: Path) -> dict[str, list[str]]:
    rows = read_rows(work, "select distinct label, case " + " ".join(f"when {rule} then '{kind}'" for kind, rule in
                                                                   QUESTION_TYPES.items()) + " end as kind from facts order by label")
    return {kind: [r["label"] for r in rows if r["kind"] == kind] for kind in QUESTION_TYPES}


def attribute(work: Path, plan: Plan, model: Model, question_type: str | None) -> dict:
    where = test_where(plan, question_type)
    folder = str(work / "models" / model.name)
    engine(work, "attribute", "--model", folder, "--where", where, "--bootstrap", str(plan.bootstrap),
           "--shuffles", str(plan.shuffles), "--plot", str(work / "attribute" / f"{model.name}-{(question_type or 'all').replace('/', '_')}.png"),
           "--quiet")
    quoted = where.replace("'", "''")
    rows = read_rows(work, f"select * from attributions where model = '{folder}' and selection = '{quoted}' and run_id = "
                           f"(select max(run_id) from attributions where model = '{folder}' and selection = '{quoted}') order by layer")
    keep = ("layer", "n", "R", "U_I", "U_T", "S", "CT", "CI")
    return {"layers": [{**{k: row[k] for k in keep}, "intervals": json.loads(row["intervals"])["intervals"],
                        "shuffled_mean_q95": json.loads(row["baseline"])["mean_and_q95"]} for row in rows]}


def run(work: Path, plan: Plan, only: list[str] | None = None) -> dict:
    """Every step of ``plan`` not yet done (of the models named in ``only``, if given: two processes on one
    work folder can share the models between them), then the results of every model whose steps are all done."""
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    step(work, "ingest", lambda: (engine(work, "ingest", "easy_vqa", "--split", "all", "--quiet"), {})[1], timings)
    recipe = work / "recipe.yaml"
    recipe.write_text(f"name: easy_vqa_train\ndescription: easy-vqa train split\nseed: 0\nsources:\n  easy_vqa: {{splits: [train]}}\n"
                      f"mixture:\n  temperature: 1.0\n  budget: {plan.budget}\noutput:\n  path: {work / 'mixture'}\n"
                      f"  formats: [parquet]\n")
    step(work, "build", lambda: (engine(work, "build", str(recipe), "--quiet"), {})[1], timings)
    # the warm start's mixture: the questions that cannot be answered without the image
    warm = work / "recipe-colour-shape.yaml"
    warm.write_text(recipe.read_text().replace("easy_vqa_train", "easy_vqa_colour_shape").replace(
        str(work / "mixture"), str(work / "mixture-colour-shape")))
    step(work, "build-colour-shape", lambda: (engine(work, "build", str(warm), "--quiet", "--set",
                                                     f"where=split = 'train' and not ({QUESTION_TYPES['yes/no']})"), {})[1], timings)
    base = build_model(work / "models" / "base")
    results = {"plan": {"test_rows": plan.test_rows, "train_rows": plan.budget, "batch": plan.batch, "lr": plan.lr,
                        "bootstrap": plan.bootstrap, "shuffles": plan.shuffles, "model_size": MODEL_SIZE,
                        "question_types": QUESTION_TYPES},
               "models": {}}
    for model in plan.models:
        if only and model.name not in only:
            if not all((work / "steps" / f"{name}.json").exists() for name in step_names(model)):
                continue
        entry = results["models"][model.name] = {}
        entry["train"] = step(work, f"train-{model.name}", lambda: train(work, plan, model, base), timings)
        entry["eval"] = step(work, f"eval-{model.name}", lambda: evaluate(work, plan, model), timings)
        entry["attribute"] = {kind or "all": step(work, f"attribute-{model.name}-{kind or 'all'}",
                                                  lambda: attribute(work, plan, model, kind), timings)
                              for kind in (None, *QUESTION_TYPES)}
    (work / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    (work / "timings.json").write_text(json.dumps(timings, indent=1))
    plot(results, work / "attribution_vs_eval.png")
    print(summary(results))
    return results


def step_names(model: Model) -> list[str]:
    return [f"train-{model.name}", f"eval-{model.name}",
            *(f"attribute-{model.name}-{kind.replace('/', '_')}" for kind in ("all", *QUESTION_TYPES))]


def summary(results: dict) -> str:
    """Per model and question type: accuracy clean and under each intervention, the causal effects, and the
    last layer's U_I, its shuffled 95th percentile, and CI."""
    lines = [f"{'model':<10}{'type':<8}{'n':>6}{'acc':>7}" + "".join(f"{'acc ' + c:>8}" for c in INTERVENTIONS)
             + f"{'acc n5':>8}" + "".join(f"{'CE ' + c:>8}" for c in INTERVENTIONS)
             + f"{'layer':>6}{'U_I':>7}{'U_I q95':>8}{'U_T':>7}{'CI':>7}{'CI q95':>8}"]
    for name, entry in results["models"].items():
        for kind in ("all", *QUESTION_TYPES):
            report = entry["eval"]["all"] if kind == "all" else entry["eval"]["by_type"][kind]
            interference = report["interference"]
            last = entry["attribute"][kind]["layers"][-1]
            shuffled = last["shuffled_mean_q95"]
            noisy = report["corruption"].get(NOISE, {}).get(str(SEVERITIES[-1]), {}).get("accuracy")
            lines.append(f"{name:<10}{kind:<8}{report['clean']['n']:>6}{report['clean']['accuracy']:>7.1%}"
                         + "".join(f"{interference[c]['accuracy_perturbed']:>8.1%}" for c in INTERVENTIONS)
                         + (f"{noisy:>8.1%}" if noisy is not None else f"{'':>8}")
                         + "".join(f"{interference[c]['causal_effect']:>8.1%}" for c in INTERVENTIONS)
                         + f"{last['layer']:>6}{last['U_I']:>7.3f}{shuffled['U_I'][1]:>8.3f}{last['U_T']:>7.3f}"
                         + f"{last['CI']:>7.1%}{shuffled['CI'][1]:>8.1%}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Left: accuracy clean and under each image intervention, per model. Middle: the causal effect of a
    black image (FB) per question type. Right: U_I against depth per model, with its shuffled 95th percentile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    names = list(results["models"])
    figure, (accuracy_axis, effect_axis, unique_axis) = plt.subplots(1, 3, figsize=(15, 4.2))
    conditions = ["clean", *INTERVENTIONS, f"noise {SEVERITIES[-1]}"]
    width = 0.8 / len(conditions)
    for index, condition in enumerate(conditions):
        values = []
        for name in names:
            report = results["models"][name]["eval"]["all"]
            if condition == "clean":
                values.append(report["clean"]["accuracy"])
            elif condition in INTERVENTIONS:
                values.append(report["interference"][condition]["accuracy_perturbed"])
            else:
                values.append(report["corruption"].get(NOISE, {}).get(str(SEVERITIES[-1]), {}).get("accuracy", float("nan")))
        accuracy_axis.bar(np.arange(len(names)) + (index - len(conditions) / 2 + 0.5) * width, values, width, label=condition)
    accuracy_axis.set(xticks=range(len(names)), xticklabels=names, ylabel="accuracy", ylim=(0, 1),
                      title="engine eval: accuracy under image interventions")
    accuracy_axis.legend(fontsize=7)
    kinds = ["all", *QUESTION_TYPES]
    width = 0.8 / len(kinds)
    for index, kind in enumerate(kinds):
        values = [(results["models"][n]["eval"]["all"] if kind == "all" else results["models"][n]["eval"]["by_type"][kind])
                  ["interference"]["FB"]["causal_effect"] for n in names]
        effect_axis.bar(np.arange(len(names)) + (index - len(kinds) / 2 + 0.5) * width, values, width, label=kind)
    effect_axis.set(xticks=range(len(names)), xticklabels=names, ylabel="share of answers that change", ylim=(0, 1),
                    title="engine eval: causal effect of a black image (FB)")
    effect_axis.legend(fontsize=7)
    for index, name in enumerate(names):
        layers = results["models"][name]["attribute"]["all"]["layers"]
        depth = [row["layer"] for row in layers]
        unique_axis.plot(depth, [row["U_I"] for row in layers], marker="o", color=f"C{index}", label=f"{name} U_I")
        unique_axis.plot(depth, [row["shuffled_mean_q95"]["U_I"][1] for row in layers], ":", color=f"C{index}",
                         label=f"{name} shuffled q95")
    unique_axis.set(xlabel="decoder layer", ylabel="bits", title="engine attribute: image-unique information U_I")
    unique_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    unique_axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/attribution_vs_eval"))
    parser.add_argument("--quick", action="store_true", help="a few steps on a few rows: checks the pipeline, not the finding")
    parser.add_argument("--models", help="comma-separated: only these models' steps (default: every model)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    only = args.models.split(",") if args.models else None
    unknown = sorted(set(only or ()) - {m.name for m in plan.models})
    if unknown:
        parser.error(f"--models: unknown {unknown}; the plan has {[m.name for m in plan.models]}")
    run(args.work, plan, only)


if __name__ == "__main__":
    main()
