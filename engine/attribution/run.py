"""``engine attribute``: per layer, the BROJA decomposition of a model's internal representation into what it
takes redundantly (R), uniquely from the image (U_I) or the text (U_T), and synergistically (S), with the
text contribution CT = U_T / (U_T + U_I) and the image contribution CI = 1 − CT.

Representations are captured in chunks and cached under ``{store}/attribution_cache/``, one file per chunk
written atomically, keyed by the model, adapter, layers, pooling and the selected ids: a killed run started
again captures only the chunks it had not finished. The decomposition itself is cheap and always recomputed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from engine.attribution.capture import capture, default_layers, layer_count
from engine.attribution.estimate import TERMS, attribute_labels, discretise
from engine.models.backends import Request, TransformersBackend, run_fitting
from engine.stages.base import Stage, decode_each, read_ahead, select, undecodable
from engine.store import Store, new_run_id


@dataclass
class AttributeConfig:
    layers: list[int] | None = None  # 1-based decoder layers; None: a handful spread over depth
    pool: str = "last"  # "last" prompt token or "mean" over the prompt
    components: int = 10
    clusters: int = 10
    bootstrap: int = 50
    shuffles: int = 10
    seed: int = 0
    batch_size: int = 16
    chunk_rows: int = 256
    by: str | None = None  # "subset": one row per subset


@dataclass
class AttributeReport:
    run_id: str
    rows: list[dict]
    captured: int = 0  # samples whose representations were captured in this run (not from the cache)
    cached: int = 0
    rejected: int = 0
    forward_seconds: float = 0.0  # model forward passes
    processor_seconds: float = 0.0  # the model's own input processor (chat template, tokenising, image preprocessing)
    pid_seconds: float = 0.0  # discretisation, decomposition, bootstrap and baseline
    seconds: float = 0.0
    plot: str | None = None
    skipped_groups: dict = field(default_factory=dict)  # group -> samples, for groups too small to decompose


class _ItemSelection:
    """Rows of an HF dataset folder or Parquet files, with the same ``batches`` interface as the store's
    ``Selection``."""

    def __init__(self, items: list[dict]):
        self.items = items
        self.rows = pa.Table.from_pylist([{"sample_id": i["sample_id"], "subset": i["subset"], "question": i["question"]}
                                          for i in items], schema=pa.schema([("sample_id", pa.string()), ("subset", pa.string()),
                                                                             ("question", pa.string())]))

    def __len__(self) -> int:
        return len(self.items)

    def chunk(self, start: int, size: int) -> "_ItemSelection":
        return _ItemSelection(self.items[start : start + size])

    def batches(self, size: int):
        for start in range(0, len(self.items), size):
            rows = [{k: item[k] for k in ("sample_id", "subset", "question", "images")} for item in self.items[start : start + size]]
            yield list(decode_each(rows))


class _Rows(Stage):
    """The store rows attribution reads (it writes per layer, not per sample: nothing to skip)."""

    name, table, reads = "attribute", "", ("images",)

    def candidates(self, con, condition: str) -> str:
        return (f"select f.sample_id, p.pos, f.subset, f.turns[1].user as question "
                f"from facts f join sample_positions p using (sample_id) where {condition}")


class _StoreSelection:
    """Store rows chosen in DuckDB; their images are read by position, batch by batch, ahead of use."""

    def __init__(self, rows: pa.Table, reader):
        self.rows, self.reader = rows, reader

    def __len__(self) -> int:
        return len(self.rows)

    def chunk(self, start: int, size: int) -> "_StoreSelection":
        return _StoreSelection(self.rows.slice(start, size), self.reader)

    def batches(self, size: int):
        for batch in read_ahead(self.rows, self.reader, size):
            yield list(decode_each(batch.drop_columns(["pos"]).to_pylist()))


def select_rows(store: Store, where: str | None, dataset: str | None, limit: int | None):
    """The rows to attribute: a SQL filter over ``facts`` (every sample by default) or a dataset on disk."""
    if dataset:
        from engine.evaluate.run import load_items

        return _ItemSelection(load_items(dataset=dataset, limit=limit))
    rows, reader, _, _ = select(store, _Rows(), where, limit=limit)
    return _StoreSelection(rows, reader)


def _cache_folder(store: Store, backend: TransformersBackend, adapter: str | None, layers: list[int], pool: str,
                  ids: list[str], chunk_rows: int) -> Path:
    def files(folder: str | None) -> list:
        """A local folder's files with sizes and times: retraining into the same folder invalidates the cache."""
        if not folder or not Path(folder).is_dir():
            return []
        return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).iterdir() if p.is_file())

    key = json.dumps({"model": backend.name, "adapter": adapter, "layers": layers, "pool": pool, "chunk_rows": chunk_rows,
                      "files": [files(backend.name), files(adapter)],
                      "ids": hashlib.sha256("\n".join(ids).encode()).hexdigest()}, sort_keys=True)
    return store.root / "attribution_cache" / hashlib.sha256(key.encode()).hexdigest()[:20]


def _capture_chunk(store: Store, backend: TransformersBackend, chunk, layers: list[int], pool: str, batch_size: int,
                   run_id: str) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Representations of one chunk's rows and the rejects (undecodable image, no image, prompt too long)."""
    parts: dict[str, list] = {"sample_id": [], "subset": []}
    rejects = []

    def reject(row: dict, reason: str) -> None:
        rejects.append({"sample_id": row["sample_id"], "stage": "attribute", "subset": row.get("subset"), "reason": reason,
                        "run_id": run_id})

    for batch in chunk.batches(batch_size):
        good = []
        for row, images, error in batch:
            if error is not None:
                reject(row, undecodable(error))
            elif not images:
                reject(row, "no image: attribution needs the image present")
            else:
                good.append((row, images))
        requests = [Request(images, row["question"]) for row, images in good]
        out, kept, too_long = run_fitting(
            lambda fit: capture(backend, fit, [r.text for r in fit], layers, pool), requests)
        for index, reason in too_long.items():
            reject(good[index][0], reason)
        good = [good[index] for index in kept]
        if not good:
            continue
        usable = ~np.isnan(out["image"]).any(1)
        for (row, _), ok in zip(good, usable):
            if not ok:
                reject(row, "no image tokens in the prompt")
        for name, values in out.items():
            parts.setdefault(name, []).append(values[usable])
        parts["sample_id"].extend(row["sample_id"] for (row, _), ok in zip(good, usable) if ok)
        parts["subset"].extend(row.get("subset") or "" for (row, _), ok in zip(good, usable) if ok)
    arrays = {k: (np.concatenate(v) if k not in ("sample_id", "subset") else np.array(v, dtype=str)) for k, v in parts.items() if v}
    arrays.setdefault("sample_id", np.array([], dtype=str))
    arrays.setdefault("subset", np.array([], dtype=str))
    return arrays, rejects


def attribute(store: Store, backend: TransformersBackend, where: str | None = None, dataset: str | None = None,
              limit: int | None = None, config: AttributeConfig | None = None, adapter: str | None = None,
              plot: str | None = None, progress: bool = True) -> AttributeReport:
    """Capture the representations of the selected rows, decompose them per layer (and per subset with
    ``config.by = "subset"``), append the rows to the ``attributions`` table and draw the plot."""
    config = config or AttributeConfig()
    if config.pool not in ("last", "mean"):
        raise ValueError(f"pool must be 'last' or 'mean', got {config.pool!r}")
    count = layer_count(backend)
    layers = sorted(set(config.layers)) if config.layers else default_layers(count)
    bad = [layer for layer in layers if not 1 <= layer <= count]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has decoder layers 1..{count}")
    started = dt.datetime.now(dt.timezone.utc)
    clock = time.perf_counter()
    report = AttributeReport(run_id=new_run_id("attribute"), rows=[])
    selection = select_rows(store, where, dataset, limit)
    if len(selection) < config.clusters:
        raise ValueError(f"attribution needs more rows than --clusters ({config.clusters}); the selection has {len(selection)}")
    ids = selection.rows.column("sample_id").to_pylist()
    folder = _cache_folder(store, backend, adapter, layers, config.pool, ids, config.chunk_rows)
    folder.mkdir(parents=True, exist_ok=True)
    model_before, processor_before = backend.model_seconds, backend.prepare_seconds
    chunks = []
    bar = tqdm(total=len(selection), desc=f"attribute ({backend.name})", unit="sample", disable=not progress)
    for index, start in enumerate(range(0, len(selection), config.chunk_rows)):
        path = folder / f"chunk-{index:06d}.npz"
        if path.exists():
            with np.load(path) as saved:
                arrays = dict(saved)
            report.cached += len(arrays["sample_id"])
        else:
            arrays, rejects = _capture_chunk(store, backend, selection.chunk(start, config.chunk_rows), layers, config.pool,
                                             config.batch_size, report.run_id)
            if rejects:  # before the chunk file: a kill in between redoes the chunk, and its rejects are not doubled
                already = store.ids("rejects", "stage = 'attribute'")
                fresh = [r for r in rejects if r["sample_id"] not in already]
                if fresh:
                    store.append("rejects", fresh)
            arrays["rejected"] = np.array([r["sample_id"] for r in rejects], dtype=str)
            temporary = folder / f".{path.name}.tmp.npz"
            np.savez(temporary, **arrays)
            os.replace(temporary, path)
            report.captured += len(arrays["sample_id"])
        report.rejected += len(arrays.get("rejected", []))
        chunks.append(arrays)
        bar.update(min(config.chunk_rows, len(selection) - start))
    bar.close()
    report.forward_seconds = backend.model_seconds - model_before
    report.processor_seconds = backend.prepare_seconds - processor_before

    names = ["image", "text", *(f"layer{layer}" for layer in layers)]
    data = {name: np.concatenate([c[name] for c in chunks if name in c]) if any(name in c for c in chunks) else None
            for name in [*names, "sample_id", "subset"]}
    if data["image"] is None or len(data["image"]) < config.clusters:
        raise ValueError(f"only {0 if data['image'] is None else len(data['image'])} rows could be captured; "
                         f"attribution needs more than --clusters ({config.clusters})")
    selection_name = f"dataset:{dataset}" if dataset else (where or "all")
    groups = {"all": np.arange(len(data["image"]))}
    if config.by == "subset":
        groups = {subset: np.flatnonzero(data["subset"] == subset) for subset in sorted(set(data["subset"].tolist()))}
    pid_clock = time.perf_counter()
    for group, members in groups.items():
        if len(members) <= config.clusters:
            report.skipped_groups[group] = len(members)
            continue
        label = lambda x: discretise(x[members], config.components, config.clusters, config.seed)  # noqa: E731
        image_labels, text_labels = label(data["image"]), label(data["text"])
        for layer in layers:
            result = attribute_labels(image_labels, text_labels, label(data[f"layer{layer}"]), config.bootstrap,
                                      config.shuffles, config.seed)
            report.rows.append({
                "model": backend.name, "adapter": adapter, "layer": layer,
                "selection": selection_name if group == "all" else f"{selection_name} | subset = {group}",
                "n": result.n, **result.terms, "CT": result.CT, "CI": result.CI,
                "intervals": json.dumps({"level": 0.95, "bootstrap": config.bootstrap, "intervals": result.intervals}),
                "baseline": json.dumps({"shuffles": config.shuffles, "mean_and_q95": result.shuffled}),
                "run_id": report.run_id})
    report.pid_seconds = time.perf_counter() - pid_clock
    if report.rows:
        store.append("attributions", report.rows)
    settings = {**asdict(config), "layers": layers, "model": backend.name, "adapter": adapter, "where": where,
                "dataset": dataset, "limit": limit, "cache": str(folder)}
    report.seconds = time.perf_counter() - clock
    timing = {"forward_seconds": report.forward_seconds, "processor_seconds": report.processor_seconds,
              "pid_seconds": report.pid_seconds, "seconds": report.seconds}
    store.record_run(report.run_id, "attribute", {**settings, **timing}, started, len(report.rows))
    if report.rows:
        report.plot = str(plot or store.root / "attributions" / f"{report.run_id}.png")
        plot_depth(report.rows, report.plot)
    return report


def format_rows(rows: list[dict]) -> str:
    """One table per layer: the terms in bits with their bootstrap intervals, CT and CI, and the shuffled
    baseline's 95th percentiles of U_I and U_T (a unique term at or below its baseline cannot be told from
    the estimator's bias at this sample size)."""
    lines = []
    for layer in sorted({r["layer"] for r in rows}):
        lines.append(f"layer {layer}")
        lines.append(f"  {'selection':<28}{'n':>7}" + "".join(f"{t:>20}" for t in TERMS) + f"{'CT':>8}{'CI':>8}"
                     + f"{'U_I shuffled q95':>18}{'U_T shuffled q95':>18}")
        for row in (r for r in rows if r["layer"] == layer):
            intervals = json.loads(row["intervals"])["intervals"]
            baseline = json.loads(row["baseline"])["mean_and_q95"]
            cells = []
            for term in TERMS:
                low, high = intervals.get(term, [None, None])
                span = f"[{low:.3f},{high:.3f}]" if low is not None else ""
                cells.append(f"{row[term]:>7.3f} {span:>12}")
            shuffled = [(baseline.get(term) or [None, None])[1] for term in ("U_I", "U_T")]
            lines.append(f"  {row['selection'][:28]:<28}{row['n']:>7}" + "".join(f"{c:>20}" for c in cells)
                         + f"{_share(row['CT']):>8}{_share(row['CI']):>8}"
                         + "".join(f"{'' if v is None else f'{v:.3f}':>18}" for v in shuffled))
    return "\n".join(lines)


def _share(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1%}"


def plot_depth(rows: list[dict], path: str) -> None:
    """Left: the four terms (bits) against depth, with bootstrap bands and the unique terms' shuffled
    baselines, for the largest selection. Right: CT
    against depth for every selection (one line per subset with ``--by subset``) and the shuffled-pairing
    baseline of the largest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    selections = list(dict.fromkeys(r["selection"] for r in rows))
    by_selection = {s: sorted((r for r in rows if r["selection"] == s), key=lambda r: r["layer"]) for s in selections}
    main_selection = max(selections, key=lambda s: by_selection[s][0]["n"])
    figure, (terms_axis, share_axis) = plt.subplots(1, 2, figsize=(12, 4.2))
    colours = {"R": "tab:purple", "U_I": "tab:green", "U_T": "tab:blue", "S": "tab:orange"}
    chosen = by_selection[main_selection]
    layers = [r["layer"] for r in chosen]
    for term in TERMS:
        terms_axis.plot(layers, [r[term] for r in chosen], marker="o", color=colours[term], label=term)
        bounds = [json.loads(r["intervals"])["intervals"].get(term, [None, None]) for r in chosen]
        if all(b[0] is not None for b in bounds):
            terms_axis.fill_between(layers, [b[0] for b in bounds], [b[1] for b in bounds], color=colours[term], alpha=0.15)
    for term in ("U_I", "U_T"):  # a unique term under its shuffled baseline cannot be told from estimator bias
        q95 = [(json.loads(r["baseline"])["mean_and_q95"].get(term) or [None, None])[1] for r in chosen]
        if all(v is not None for v in q95):
            terms_axis.plot(layers, q95, ":", color=colours[term], label=f"{term}, shuffled q95")
    terms_axis.set(xlabel="layer", ylabel="bits", title=f"BROJA terms ({main_selection[:40]}, n={chosen[0]['n']})")
    terms_axis.legend(fontsize=8)
    for index, selection in enumerate(selections):
        series = by_selection[selection]
        name = selection.split(" | subset = ")[-1] if " | subset = " in selection else "CT"
        share_axis.plot([r["layer"] for r in series], [r["CT"] for r in series], marker="o", color=f"C{index % 10}",
                        label=name[:30])
    baseline = [(json.loads(r["baseline"])["mean_and_q95"].get("CT") or [None, None])[0] for r in chosen]
    if all(b is not None for b in baseline):
        share_axis.plot(layers, baseline, "--", color="gray", label="shuffled pairing")
    share_axis.set(xlabel="layer", ylabel="CT = U_T / (U_T + U_I)", ylim=(0, 1), title="text contribution CT")
    share_axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    for axis in (terms_axis, share_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

def load_attribution_backend(model: str, adapter: str | None = None, device: str = "cpu", dtype: str = "auto") -> TransformersBackend:
    """The transformers backend of ``model``, with a PEFT adapter on it when ``adapter`` is given: through
    ``load_backend``'s own ``adapter`` argument where it has one, else with ``peft.PeftModel`` here."""
    import inspect

    from engine.models.backends import load_backend

    if adapter and not Path(adapter).is_dir():
        raise FileNotFoundError(f"adapter {adapter!r} is not a folder")
    if adapter and "adapter" in inspect.signature(load_backend).parameters:
        return load_backend(model, "transformers", device, dtype, adapter=adapter)
    backend = load_backend(model, "transformers", device, dtype)
    if adapter:
        from peft import PeftModel

        try:
            backend.model = PeftModel.from_pretrained(backend.model, adapter).to(device).eval()
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot load adapter {adapter!r}: {str(error).splitlines()[0]}") from None
        backend.name = model
    return backend
