"""``engine eval``: run a model over an evaluation set under clean, corrupted and intervened inputs and
report accuracy, performance stability, modality interference and (when the set has control pairs) the
HallusionBench-style error diagnosis. Every prediction is written to ``predictions.parquet`` next to the
report, so any number traces back to its rows.

A run is resumable: predictions are committed in parts to ``predictions.partial/`` in the output folder,
keyed by (sample, condition, severity, seed), and batches are fixed by the configuration, so a run killed
and started again with the same configuration skips what is done and writes the same bytes as a run that
was never interrupted. ``eval_config.json`` records that configuration; another one in the same folder is
refused unless the caller asks to overwrite."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from engine.evaluate.metrics import causal_effect, consistency, delta_p, diagnose, is_correct
from engine.models.backends import Backend, Request, decode_images, run_fitting
from engine.options import offered_letters
from engine.stages.base import check_where, undecodable
from engine.hashing import hash_u64
from engine.perturb.image import CORRUPTIONS as IMAGE_CORRUPTIONS
from engine.perturb.image import corrupt_images
from engine.perturb.text import KINDS as TEXT_CORRUPTIONS
from engine.perturb.text import corrupt_texts
from engine.perturb.variants import misleading, replacement_image, unrelated_facts, wrong_option

INTERFERENCE = {  # code -> (perturbation, modality changed, task kind it applies to)
    "UF": ("unrelated_facts", "text", "image_heavy"),
    "MD": ("misleading", "text", "image_heavy"),
    "RP": ("random_pixels", "image", "text_heavy"),
    "RI": ("irrelevant_image", "image", "text_heavy"),
    "FB": ("black", "image", "text_heavy"),
    "FW": ("white", "image", "text_heavy"),
}
CORRUPTION_NAMES = tuple(IMAGE_CORRUPTIONS) + TEXT_CORRUPTIONS
SEVERITIES = (1, 2, 3, 4, 5)
HALLUSION_COLUMNS = ("question", "category", "figure", "group")

CONFIG_FILE = "eval_config.json"
PARTIAL_DIR = "predictions.partial"
PREDICTIONS = "predictions.parquet"
PLOTS = ("accuracy_vs_severity.png", "interference.png")
OUTPUT_FILES = (PREDICTIONS, "report.json", "report.txt", *PLOTS)  # every file an eval writes, besides the two above
COMPLETE_KEY = b"engine.eval.complete"  # a part's metadata: the conditions finished when it was written

# status of a prediction row: "ok" (scored), "dropped" (the text fidelity rule removed the item from that
# condition), "rejected" (image undecodable or prompt longer than the model's context; ``reason`` says which)
PREDICTION_SCHEMA = pa.schema([
    ("condition", pa.string()), ("severity", pa.int64()), ("seed", pa.int64()), ("sample_id", pa.string()),
    ("task_kind", pa.string()), ("status", pa.string()), ("reason", pa.string()), ("prediction", pa.string()),
    ("answer", pa.string()), ("correct", pa.bool_()), *[(name, pa.string()) for name in HALLUSION_COLUMNS],
])


class EvalError(ValueError):
    """A problem with the evaluation's input or output folder, worded for a person (one line)."""


def check_names(values: Sequence[str], option: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """``values`` if each is one of ``allowed`` (duplicates dropped, order kept); else an error naming it."""
    for value in values:
        if value not in allowed:
            raise EvalError(f"{option}: unknown {what} {value!r}; choose from {', '.join(allowed)}")
    return tuple(dict.fromkeys(values))


def check_ints(values: Sequence[int], option: str, low: int, high: int | None = None) -> tuple[int, ...]:
    """``values`` if each lies in [low, high] (duplicates dropped, order kept); else an error naming it."""
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            allowed = f"{low}-{high}" if high is not None else f">= {low}"
            raise EvalError(f"{option}: {value!r} is out of range (allowed: {allowed})")
    return tuple(dict.fromkeys(values))


def parse_list(text: str) -> tuple[str, ...]:
    """A comma-separated option value as a tuple (empty items dropped, so "" means none)."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_ints(text: str, option: str, low: int, high: int | None = None) -> tuple[int, ...]:
    """A comma-separated list of integers in [low, high]; an error names the first bad one."""
    values = []
    for part in parse_list(text):
        try:
            values.append(int(part))
        except ValueError:
            raise EvalError(f"{option}: {part!r} is not an integer") from None
    return check_ints(values, option, low, high)


@dataclass
class EvalConfig:
    """What an evaluation runs. Every field is part of the run's identity (``eval_config.json``): batches
    are fixed by it, so predictions resumed after a kill are those of an uninterrupted run."""

    corruptions: tuple[str, ...] = CORRUPTION_NAMES
    severities: tuple[int, ...] = SEVERITIES
    seeds: tuple[int, ...] = (0, 1, 2)
    interference: tuple[str, ...] = tuple(INTERFERENCE)
    interference_on: str = "task_kind"  # or "all": every item gets every intervention
    max_new_tokens: int = 16
    batch_size: int = 8
    prompt_suffix: str = ""

    def __post_init__(self) -> None:
        self.corruptions = check_names(self.corruptions, "--corruptions", CORRUPTION_NAMES, "corruption")
        self.severities = check_ints(self.severities, "--severities", SEVERITIES[0], SEVERITIES[-1])
        self.seeds = check_ints(self.seeds, "--seeds", 0)
        self.interference = check_names(self.interference, "--interference", tuple(INTERFERENCE), "intervention")
        check_names([self.interference_on], "--interference-on", ("task_kind", "all"), "choice")
        check_ints([self.max_new_tokens], "--max-new-tokens", 1)
        check_ints([self.batch_size], "--batch-size", 1)


def _dataset_table(path: Path) -> pa.Table:
    """An HF ``save_to_disk`` folder, a Parquet file, or a folder of Parquet files, as one table."""
    try:
        if path.is_dir() and not list(path.glob("*.parquet")) and not (path / "parquet").exists():
            import datasets

            return datasets.load_from_disk(str(path)).with_format("arrow")[:]
        files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
        if not files:
            raise EvalError(f"{path} holds no Parquet files and is not a `save_to_disk` folder")
        return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    except (OSError, ValueError, pa.ArrowException) as error:
        if isinstance(error, EvalError):
            raise
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise EvalError(f"cannot read {path}: {first}") from None


def _text(content) -> str | None:
    """The text of a chat message's content: a string, or the text parts of a list of parts."""
    if content is None or isinstance(content, str):
        return content
    texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type", "text") == "text"]
    texts = [t for t in texts if t]
    return "\n".join(texts) if texts else None


def first_turn(row: dict) -> tuple[str | None, str | None]:
    """The first question and its answer of a dataset row in any of the engine's layouts: ``texts``
    (Cauldron: [{user, assistant}]), ``turns`` (the store) or ``messages`` (``engine export --format
    messages``, TRL's chat layout: the first user message and the assistant message after it)."""
    turns = row.get("texts") or row.get("turns")
    if turns:
        return turns[0].get("user"), turns[0].get("assistant")
    messages = row.get("messages") or []
    question = answer = None
    for message in messages:
        if message.get("role") == "user" and question is None:
            question = _text(message.get("content"))
        elif message.get("role") == "assistant" and question is not None:
            answer = _text(message.get("content"))
            break
    return question, answer


def load_items(store=None, where: str | None = None, dataset: str | None = None, limit: int | None = None) -> list[dict]:
    """Evaluation items (sample_id, images, question, answer, task_kind, subset, label, source, split, and
    the HallusionBench columns under ``extra``) from the store or from an HF dataset folder / Parquet files
    in the Cauldron, store or ``messages`` layout. A dataset without ``task_kind`` takes its subsets' task
    kinds from ``recipes/categories.yaml``."""
    if dataset:
        from engine.categories import subset_mapping

        path = Path(dataset)
        rows = _dataset_table(path).to_pylist()
        kinds = {name: info.task_kind for name, info in subset_mapping().items()}
        items = []
        for index, row in enumerate(rows[:limit] if limit else rows):
            question, answer = first_turn(row)
            if question is None or answer is None:
                raise EvalError(f"{path}: row {index} has no question and answer (expected a texts, turns or messages column)")
            subset = row.get("subset") or path.name
            images = [i["bytes"] if isinstance(i, dict) else i for i in (row.get("images") or [])]
            items.append({"sample_id": row.get("sample_id") or f"{path.name}:{index}", "images": images, "question": question,
                          "answer": answer, "task_kind": row.get("task_kind") or kinds.get(subset, "vqa"), "subset": subset,
                          "label": row.get("label"), "source": row.get("source"), "split": row.get("split"),
                          "extra": {k: row.get(k) for k in HALLUSION_COLUMNS if k in row}})
        seen: set[str] = set()
        for item in items:
            if item["sample_id"] in seen:
                raise EvalError(f"{path}: sample_id {item['sample_id']!r} occurs more than once")
            seen.add(item["sample_id"])
        return items
    import duckdb

    con, _ = store.connect()
    try:
        check_where(con, where)
        items = con.sql(
            f"""select sample_id, images, turns[1].user as question, turns[1].assistant as answer, task_kind, subset, label,
            source, split from facts where {where or "split = 'test'"} order by sample_id {f"limit {int(limit)}" if limit else ""}"""
        ).to_arrow_table().to_pylist()
    except duckdb.Error as error:
        raise EvalError(f"--where {where!r}: {str(error).splitlines()[0]}") from None
    finally:
        con.close()
    return [{**item, "extra": {}} for item in items]


def fingerprint(items: list[dict]) -> str:
    """SHA-256 over what the model sees and is scored against, item by item: a resumed run must see the
    same items as the run it continues."""
    digest = hashlib.sha256()
    for item in items:
        fields = [item["sample_id"], item["question"], item["answer"], item["task_kind"], item["subset"], item.get("label"),
                  json.dumps(item.get("extra") or {}, sort_keys=True, default=str)]
        digest.update(json.dumps(fields).encode())
        for image in item["images"] or []:
            digest.update(hashlib.sha256(image or b"").digest())
    return digest.hexdigest()


Condition = tuple[str, "str | None", int, int]  # kind, name, severity, seed


def _conditions(config: EvalConfig) -> Iterator[Condition]:
    yield ("clean", None, 0, 0)
    for corruption in config.corruptions:
        for severity in config.severities:
            for seed in config.seeds:
                yield ("corruption", corruption, severity, seed)
    for code in config.interference:
        yield ("interference", code, 0, 0)


def _label(kind: str, name: str | None) -> str:
    return kind if kind == "clean" else f"{kind}:{name}"


def _apply(items: list[dict], kind: str, name: str | None, severity: int, seed: int, config: EvalConfig,
           encoder, context: dict) -> tuple[list[dict], list[dict]]:
    """The items of one condition, and those the text fidelity rule dropped from it."""
    if kind == "clean":
        return items, []
    if kind == "corruption" and name in IMAGE_CORRUPTIONS:
        # seeded by the item's place in the whole set, so its noise does not depend on which items were rejected
        return [{**item, "images": corrupt_images(item["images"], name, severity, seed * 1_000_003 + item["index"])
                 if item["images"] else []} for item in items], []
    if kind == "corruption":
        result = corrupt_texts([i["question"] for i in items], name, severity, seed, encoder)
        kept = [{**item, "question": text} for item, text in zip(items, result.texts) if text is not None]
        dropped = [item for item, text in zip(items, result.texts) if text is None]
        return kept, dropped
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
    return out, []


def _predict(backend: Backend, batch: list[dict], config: EvalConfig) -> list[tuple[str | None, str | None]]:
    """(prediction, None) for each item, or (None, reason) for one whose image does not decode or whose
    prompt (plus the new tokens) is longer than the model's context; the rest of the batch still runs."""
    results: list[tuple[str | None, str | None]] = [(None, None)] * len(batch)
    positions, requests = [], []
    for position, item in enumerate(batch):
        try:
            images = decode_images(item["images"])
        except Exception as error:  # PIL raises many types for a broken image
            results[position] = (None, undecodable(error))
            continue
        positions.append(position)
        requests.append(Request(images, (item["question"] + " " + config.prompt_suffix).strip()))
    generations, kept, too_long = run_fitting(lambda fit: backend.generate(fit, config.max_new_tokens), requests)
    for index, reason in too_long.items():  # rejected: the prompts that do not fit; the rest ran
        results[positions[index]] = (None, reason)
    for index, generation in zip(kept, generations):
        results[positions[index]] = (generation.text, None)
    return results


def _row(item: dict, kind: str, name: str | None, severity: int, seed: int, status: str, reason: str | None = None,
         prediction: str | None = None, correct: bool | None = None) -> dict:
    return {"condition": _label(kind, name), "severity": severity, "seed": seed, "sample_id": item["sample_id"],
            "task_kind": item["task_kind"], "status": status, "reason": reason, "prediction": prediction,
            "answer": item["answer"], "correct": correct, **{k: _str(item["extra"].get(k)) for k in HALLUSION_COLUMNS}}


def _str(value) -> str | None:
    return None if value is None else str(value)


class _Output:
    """The output folder: its configuration, the committed parts and the final files."""

    def __init__(self, out: Path, identity: dict, overwrite: bool):
        self.out, self.partial = out, out / PARTIAL_DIR
        from engine.query import make_parent

        if out.exists() and not out.is_dir():
            raise EvalError(f"--out {out} is a file, not a folder")
        try:  # `--out new/folder` creates the folder, as people expect
            make_parent(out)
        except OSError as error:
            raise EvalError(f"cannot write {out}: {error}") from None
        ours = [name for name in (*OUTPUT_FILES, PARTIAL_DIR) if (out / name).exists()]
        config_path = out / CONFIG_FILE
        if config_path.exists():
            try:
                previous = json.loads(config_path.read_text())
            except (OSError, ValueError):
                previous = {}
            if previous == identity:
                return  # the same evaluation: resume it
            if not overwrite:
                differs = sorted(k for k in identity.keys() | previous.keys() if identity.get(k) != previous.get(k))
                raise EvalError(f"{out} holds an eval with another configuration (it differs in {', '.join(differs)}); "
                                f"pass --overwrite to replace its outputs, or choose another --out")
        elif ours and not overwrite:
            raise EvalError(f"{out} holds eval outputs ({', '.join(ours)}) without {CONFIG_FILE}; "
                            f"pass --overwrite to replace them, or choose another --out")
        self._remove_ours()
        out.mkdir(exist_ok=True)
        _write_atomic(config_path, (json.dumps(identity, indent=2, sort_keys=True) + "\n").encode())

    def _remove_ours(self) -> None:
        """Delete the files an eval writes, and nothing else (a folder is removed only once it is empty)."""
        for name in (CONFIG_FILE, *OUTPUT_FILES):
            (self.out / name).unlink(missing_ok=True)
        if self.partial.is_dir():
            for path in self.partial.glob("part-*.parquet*"):
                path.unlink()
            try:
                self.partial.rmdir()
            except OSError:
                pass  # something else lives there: leave it

    def load(self) -> tuple[list[dict], set]:
        """Rows committed so far and the conditions known complete."""
        rows, complete = [], set()
        if (self.out / PREDICTIONS).exists():  # written last: every condition is done
            rows.extend(pq.read_table(self.out / PREDICTIONS).to_pylist())
            complete.add("*")
        for path in self._parts():
            file = pq.ParquetFile(path)
            rows.extend(file.read().to_pylist())
            metadata = file.schema_arrow.metadata or {}
            complete.update(tuple(c) for c in json.loads(metadata.get(COMPLETE_KEY, b"[]")))
        return rows, complete

    def _parts(self) -> list[Path]:
        return sorted(self.partial.glob("part-*.parquet")) if self.partial.is_dir() else []

    def commit(self, rows: list[dict], complete: list[Condition]) -> None:
        """One part, written whole or not at all; its metadata names the conditions finished so far."""
        self.partial.mkdir(exist_ok=True)
        for stale in self.partial.glob("part-*.parquet.tmp"):  # a part a killed run was writing
            stale.unlink()
        parts = self._parts()
        number = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
        schema = PREDICTION_SCHEMA.with_metadata({COMPLETE_KEY: json.dumps(complete).encode()})
        path = self.partial / f"part-{number:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), f"{path}.tmp")
        os.replace(f"{path}.tmp", path)

    def finish(self, table: pa.Table) -> None:
        pq.write_table(table, self.out / f"{PREDICTIONS}.tmp")
        os.replace(self.out / f"{PREDICTIONS}.tmp", self.out / PREDICTIONS)

    def clean_up(self) -> None:
        """Remove the parts once ``predictions.parquet`` holds them all."""
        for path in self.partial.glob("part-*.parquet*") if self.partial.is_dir() else []:
            path.unlink()
        if self.partial.is_dir():
            try:
                self.partial.rmdir()
            except OSError:
                pass


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def evaluate(backend: Backend, items: list[dict], out: str | Path, config: EvalConfig | None = None,
             encoder=None, progress: bool = True, *, identity: dict | None = None, overwrite: bool = False,
             store=None, commit_rows: int = 64) -> dict:
    """Run every condition, write ``predictions.parquet``, ``report.json``, ``report.txt`` and the plots to
    ``out``, and return the report.

    Parameters
    ----------
    identity
        What else names the run besides the configuration, the model and the items (e.g. the item filter);
        recorded in ``eval_config.json``.
    overwrite
        Replace the outputs of an evaluation with another configuration in ``out`` (only the files an
        evaluation writes are removed).
    store
        The store the items came from: rejected items are recorded in its ``rejects`` table (stage
        ``eval``), once per sample and reason.
    commit_rows
        Commit a part whenever this many prediction rows are pending: a kill loses at most that much work.
    """
    config = config or EvalConfig()
    out = Path(out)
    items = [{**item, "index": index, "extra": item.get("extra") or {}} for index, item in enumerate(items)]
    run_identity = {"config": asdict(config), "model": backend.name, "items": fingerprint(items), "n_items": len(items),
                    **(identity or {})}
    run_identity = json.loads(json.dumps(run_identity, default=str))  # tuples as lists, as read back from disk
    output = _Output(out, run_identity, overwrite)
    rows, complete = output.load()
    done = {(r["sample_id"], r["condition"], r["severity"], r["seed"]) for r in rows}
    conditions = list(_conditions(config))
    todo = [c for c in conditions if "*" not in complete and c not in complete]
    if any(kind == "corruption" and name in TEXT_CORRUPTIONS for kind, name, _, _ in todo) and encoder is None:
        from engine.models.encoders import MINILM, load_encoder

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
    pending: list[dict] = []
    finished = [c for c in conditions if c in complete]
    rejected: set[str] | None = None  # ids rejected on clean input, known once the clean condition is done

    def flush() -> None:
        output.commit(pending, finished)
        pending.clear()

    bar = tqdm(total=len(conditions), initial=len(conditions) - len(todo), desc=f"eval ({backend.name})", unit="condition",
               disable=not progress)
    for kind, name, severity, seed in todo:
        # an item rejected on clean input has no baseline: it leaves every other condition
        if kind != "clean" and rejected is None:
            rejected = {r["sample_id"] for r in rows + pending if r["condition"] == "clean" and r["status"] == "rejected"}
        eligible = items if kind == "clean" else [i for i in items if i["sample_id"] not in rejected]
        chosen, dropped = _apply(eligible, kind, name, severity, seed, config, encoder, context)
        label = _label(kind, name)
        pending.extend(_row(i, kind, name, severity, seed, "dropped") for i in dropped
                       if (i["sample_id"], label, severity, seed) not in done)
        for start in range(0, len(chosen), config.batch_size):
            batch = chosen[start : start + config.batch_size]  # fixed by the configuration, so a resumed batch is the same
            if all((i["sample_id"], label, severity, seed) in done for i in batch):
                continue
            for item, (prediction, reason) in zip(batch, _predict(backend, batch, config)):
                if reason is not None:
                    pending.append(_row(item, kind, name, severity, seed, "rejected", reason))
                else:
                    correct = is_correct(prediction, item["answer"], offered_letters(item["question"]) or None,
                                         context["labels"].get(item["subset"]) or None)
                    pending.append(_row(item, kind, name, severity, seed, "ok", prediction=prediction, correct=correct))
            if len(pending) >= commit_rows:
                rows.extend(pending)
                flush()
        finished.append((kind, name, severity, seed))
        bar.update(1)
    bar.close()
    if todo:
        rows.extend(pending)
        flush()

    order = {_key(c): position for position, c in enumerate(conditions)}
    place = {item["sample_id"]: item["index"] for item in items}
    unique = {(r["sample_id"], r["condition"], r["severity"], r["seed"]): r for r in rows}
    records = sorted(unique.values(), key=lambda r: (order[(r["condition"], r["severity"], r["seed"])], place[r["sample_id"]]))
    output.finish(pa.Table.from_pylist(records, schema=PREDICTION_SCHEMA))
    report = summarise(records, config)
    report["model"] = {"name": getattr(backend, "model_name", backend.name), "adapter": getattr(backend, "adapter", None)}  # which weights were measured
    _write_atomic(out / "report.json", (json.dumps(_no_nan(report), indent=2, sort_keys=True, allow_nan=False) + "\n").encode())
    _write_atomic(out / "report.txt", format_report(report).encode())
    plot(report, out)
    if store is not None:
        record_rejects(store, records, {item["sample_id"]: item for item in items})
    output.clean_up()
    return report


def _key(condition: Condition) -> tuple[str, int, int]:
    kind, name, severity, seed = condition
    return (_label(kind, name), severity, seed)


def record_rejects(store, records: list[dict], items: dict[str, dict]) -> int:
    """Add the rejected predictions to the store's ``rejects`` (stage ``eval``), once per sample and reason;
    returns how many rows were new."""
    from engine.store import new_run_id

    def reason(r: dict) -> str:
        where = r["condition"] if r["condition"] == "clean" else f"{r['condition']} severity {r['severity']} seed {r['seed']}"
        return f"{r['reason']} (eval, {where})"

    wanted = {(r["sample_id"], reason(r)) for r in records if r["status"] == "rejected"}
    if not wanted:
        return 0
    if store.has("rejects"):
        seen = store.arrow("rejects", ["sample_id", "reason"], filter="stage = 'eval'")
        wanted -= set(zip(seen.column("sample_id").to_pylist(), seen.column("reason").to_pylist()))
    run_id = new_run_id("eval")
    new = [{"sample_id": sample_id, "stage": "eval", "source": items[sample_id].get("source"), "subset": items[sample_id].get("subset"),
            "split": items[sample_id].get("split"), "reason": text, "run_id": run_id} for sample_id, text in sorted(wanted)]
    if new:
        store.append("rejects", new)
    return len(new)


def _no_nan(value):
    """NaN (an undefined rate, e.g. dP when clean accuracy is 0) as JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def _mean(values: list) -> float:
    return float(np.mean(values)) if values else float("nan")


def summarise(records: list[dict], config: EvalConfig) -> dict:
    """Accuracy per condition, dP per corruption x severity (mean and sd over seeds), interference
    accuracy and causal effect, and the HallusionBench diagnosis of the clean predictions. Rows without a
    ``status`` count as scored; rejected and dropped rows are counted, not scored."""
    def status(r: dict) -> str:
        return r.get("status") or "ok"

    scored = [r for r in records if status(r) == "ok"]
    clean = {r["sample_id"]: r for r in scored if r["condition"] == "clean"}
    clean_accuracy = _mean([r["correct"] for r in clean.values()])
    rejected = [r for r in records if status(r) == "rejected"]
    reasons: dict[str, int] = {}
    for r in rejected:
        kind = r["reason"].split(" (")[0].split(" needs ")[0]  # "image cannot be decoded", "prompt"
        kind = "prompt longer than the model context" if kind == "prompt" else kind
        reasons[kind] = reasons.get(kind, 0) + 1
    report: dict = {"clean": {"accuracy": clean_accuracy, "n": len(clean),
                              "rejected": sum(r["condition"] == "clean" for r in rejected)},
                    "rejected": {"rows": len(rejected), "reasons": reasons}, "corruption": {}, "interference": {}}
    for corruption in config.corruptions:
        for severity in config.severities:
            accuracies, deltas, dropped, refused = [], [], 0, 0
            for seed in config.seeds:
                cell = [r for r in records if r["condition"] == f"corruption:{corruption}" and r["severity"] == severity
                        and r["seed"] == seed]
                dropped += sum(status(r) == "dropped" for r in cell)
                refused += sum(status(r) == "rejected" for r in cell)
                rows = [r for r in cell if status(r) == "ok"]
                if rows:
                    accuracy = float(np.mean([r["correct"] for r in rows]))
                    accuracies.append(accuracy)
                    deltas.append(delta_p(clean_accuracy, accuracy))
            if accuracies:
                undefined = _undefined(clean_accuracy) or clean_accuracy == 0  # dP divides by the clean accuracy
                report["corruption"].setdefault(corruption, {})[str(severity)] = {
                    "accuracy": float(np.mean(accuracies)),
                    "accuracy_sd": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
                    "delta_p_mean": float("nan") if undefined else float(np.mean(deltas)),
                    "delta_p_sd": float("nan") if undefined else float(np.std(deltas, ddof=1)) if len(deltas) > 1 else 0.0,
                    "dropped": dropped, "rejected": refused, "seeds": len(accuracies)}
    for code in config.interference:
        rows = [r for r in scored if r["condition"] == f"interference:{code}" and r["sample_id"] in clean]
        if not rows:
            continue
        originals = [clean[r["sample_id"]] for r in rows]
        report["interference"][code] = {
            "n": len(rows), "accuracy_original": float(np.mean([o["correct"] for o in originals])),
            "accuracy_perturbed": float(np.mean([r["correct"] for r in rows])),
            "causal_effect": causal_effect([o["prediction"] for o in originals], [r["prediction"] for r in rows]),
        }
    clean_rows = list(clean.values())
    if clean_rows and all(clean_rows[0].get(k) is not None for k in HALLUSION_COLUMNS):
        report["hallusion"] = {**diagnose(clean_rows), "consistency": consistency(clean_rows)}
    return report


def _number(value: float | None, width: int, digits: int = 3) -> str:
    """A rate, or "undefined" for NaN / None (dP when clean accuracy is 0)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'undefined':>{width}}"
    return f"{value:>{width}.{digits}f}"


def format_report(report: dict) -> str:
    clean = report["clean"]
    lines = [f"clean accuracy {_number(clean['accuracy'], 0).strip()} (n = {clean['n']})"]
    rejected = report.get("rejected") or {}
    if rejected.get("rows"):
        reasons = ", ".join(f"{count} x {reason}" for reason, count in sorted(rejected["reasons"].items()))
        lines.append(f"rejected: {rejected['rows']} predictions ({clean.get('rejected', 0)} items on clean input): {reasons}")
    if clean["accuracy"] == 0:
        lines.append("dP is undefined: the clean accuracy is 0")
    lines.append("")
    if report["corruption"]:
        lines.append(f"{'corruption':<16}{'severity':>9}{'accuracy':>10}{'dP mean':>10}{'dP sd':>10}{'dropped':>9}{'rejected':>10}")
        for corruption, by_severity in report["corruption"].items():
            for severity, cell in by_severity.items():
                lines.append(f"{corruption:<16}{severity:>9}{cell['accuracy']:>10.3f}{_number(cell['delta_p_mean'], 10)}"
                             f"{_number(cell['delta_p_sd'], 10)}{cell['dropped']:>9}{cell.get('rejected', 0):>10}")
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
    """Write ``accuracy_vs_severity.png`` and ``interference.png``, each when there is something to draw."""
    import matplotlib.pyplot as plt

    for name, figure in ((PLOTS[0], accuracy_figure(report)), (PLOTS[1], interference_figure(report))):
        if figure is not None:
            figure.savefig(out / name, dpi=120)
            plt.close(figure)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_figure(report: dict):
    """Accuracy (left) and dP (right) against severity, one line per corruption, mean ± sd over seeds; the
    clean accuracy as a dashed line. The accuracy axis is fixed to [0, 1] and markers are not clipped, so
    an accuracy of 0 is visible; where dP is undefined (clean accuracy 0) the right panel says so."""
    if not report["corruption"]:
        return None
    plt = _pyplot()
    clean = report["clean"]["accuracy"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ticks = sorted({int(s) for by in report["corruption"].values() for s in by})
    for corruption, by_severity in report["corruption"].items():
        severities = sorted(by_severity, key=int)
        left.errorbar([int(s) for s in severities], [by_severity[s]["accuracy"] for s in severities],
                      yerr=[by_severity[s].get("accuracy_sd", 0.0) for s in severities], marker="o", label=corruption,
                      capsize=3, clip_on=False)
    if not _undefined(clean):
        left.axhline(clean, color="black", ls="--", lw=1, label=f"clean ({clean:.2f})")
    left.set_xticks(ticks)
    left.set_ylim(0, 1.05)  # above 1, so a clean accuracy of 1 is not hidden under the frame
    left.set_xlabel("severity")
    left.set_ylabel("accuracy")
    left.set_title("accuracy under corruption (mean ± sd over seeds)")
    left.legend(fontsize=8)
    drawn = False
    for corruption, by_severity in report["corruption"].items():
        severities = [s for s in sorted(by_severity, key=int) if not _undefined(by_severity[s]["delta_p_mean"])]
        if severities:
            drawn = True
            right.errorbar([int(s) for s in severities], [by_severity[s]["delta_p_mean"] for s in severities],
                           yerr=[by_severity[s]["delta_p_sd"] for s in severities], marker="o", label=corruption,
                           capsize=3, clip_on=False)
    right.axhline(0, color="grey", lw=0.8)
    right.set_xticks(ticks)
    right.set_xlim(ticks[0] - 0.5, ticks[-1] + 0.5)
    right.set_xlabel("severity")
    right.set_ylabel("ΔP = (P_corrupt − P_clean) / P_clean")
    right.set_title("performance stability ΔP")
    if drawn:
        right.legend(fontsize=8)
    else:
        why = "the clean accuracy is 0" if clean == 0 else "there is no clean accuracy"
        right.set_ylim(-1, 1)
        right.text(0.5, 0.5, f"ΔP is undefined:\n{why}", transform=right.transAxes, ha="center", va="center", fontsize=12,
                   bbox={"facecolor": "white", "edgecolor": "grey"})
    figure.tight_layout()
    return figure


def interference_figure(report: dict):
    """Accuracy on original vs perturbed inputs (left) and the causal effect (right) per intervention, with
    each bar's value written on it, so a bar of height 0 still shows."""
    if not report["interference"]:
        return None
    plt = _pyplot()
    codes = list(report["interference"])
    cells = [report["interference"][c] for c in codes]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(codes))
    for offset, key, label in ((-0.2, "accuracy_original", "original"), (0.2, "accuracy_perturbed", "perturbed")):
        bars = left.bar(x + offset, [c[key] for c in cells], 0.4, label=label)
        left.bar_label(bars, fmt="%.2f", fontsize=7)
    left.set_xticks(x, [f"{c}\n(n={cell['n']})" for c, cell in zip(codes, cells)])
    left.set_ylim(0, 1.1)
    left.set_ylabel("accuracy")
    left.set_title("accuracy on original vs perturbed inputs")
    left.legend(fontsize=8)
    bars = right.bar(x, [c["causal_effect"] for c in cells], 0.5, color="tab:red")
    right.bar_label(bars, fmt="%.2f", fontsize=7)
    right.set_xticks(x, codes)
    right.set_ylim(0, 1.1)
    right.set_ylabel("share of predictions that change")
    right.set_title("causal effect of the intervention")
    figure.tight_layout()
    return figure


def _undefined(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
