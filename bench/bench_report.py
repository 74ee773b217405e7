"""Benchmark: `engine report` on a 1,000,000-row store and on the bundled sample.

The synthetic store has the Cauldron's 48 subsets (Table 7's counts, scaled to 1 M rows), one tiny PNG per
row, and a row per sample in interactions, gate, corruption, validation and captions, plus rejects and
runs; a mixture is built from it (r50 recipe) and an eval folder is written beside it. The report (with
--mixture and --eval) runs in its own fresh process, so the peak RSS printed is the report's own; the time
is the write_report call alone, after imports.

    python bench/bench_report.py              # prints the table
    python bench/bench_report.py --rows 200000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def make_store(store_path: str, total: int) -> None:
    """Write ``total`` rows of metadata (a 1x1 PNG each) and one row of every fact table per sample."""
    import io

    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from bench_build import TABLE_7
    from engine.categories import subset_mapping
    from engine.store import Store

    store = Store(store_path)
    mapping = subset_mapping()
    counts = np.floor(np.array(list(TABLE_7.values())) * total / sum(TABLE_7.values())).astype(int)
    counts[np.argmax(counts)] += total - counts.sum()
    subsets = np.repeat(np.array(list(TABLE_7)), counts)
    rows = np.concatenate([np.arange(n) for n in counts])
    ids = [f"cauldron:{s}:train:{r}" for s, r in zip(subsets.tolist(), rows.tolist())]
    n = len(ids)
    pixel = io.BytesIO()
    Image.new("RGB", (1, 1), (90, 120, 200)).save(pixel, format="PNG")
    rng = np.random.default_rng(0)
    split = np.where(rng.uniform(size=n) < 0.9, "train", "test")
    step = 200_000  # several commits, as ingest would leave
    for start in range(0, n, step):
        part = slice(start, start + step)
        m = len(ids[part])
        store.append("samples", pa.table({
            "sample_id": pa.array(ids[part]), "source": pa.array(["cauldron"] * m), "subset": pa.array(subsets[part]),
            "split": pa.array(split[part]), "row": pa.array(rows[part]),
            "category": pa.array([mapping[s].category for s in subsets[part].tolist()]),
            "task_kind": pa.array([mapping[s].task_kind for s in subsets[part].tolist()]),
            "images": pa.array([[pixel.getvalue()]] * m, pa.list_(pa.binary())),
            "turns": pa.array([[{"user": "Question?", "assistant": "An answer.", "source": "bench"}]] * m),
        }))
    terms = rng.normal([0.3, 0.2, 0.1, 0.05], 0.25, size=(n, 4))
    dominant = np.array(["r", "u_v", "u_t", "s"])[terms.argmax(1)]
    store.append("interactions", pa.table({"sample_id": ids, "run_id": ["score-bench"] * n, "fold": ["train"] * n,
                                           "r": terms[:, 0], "u_v": terms[:, 1], "u_t": terms[:, 2], "s": terms[:, 3],
                                           "dominant": dominant}))
    valid = dominant == "u_v"
    store.append("gate", pa.table({"sample_id": ids, "run_id": ["gate-bench"] * n, "gate_valid": valid,
                                   "gate_selected": valid & (terms[:, 1] > 0.45)}))
    corrupted = rng.uniform(size=n) < 0.3
    store.append("corruption", pa.table({"sample_id": ids, "run_id": ["corrupt-bench"] * n, "corrupted": corrupted,
                                         "kind": np.where(corrupted, "pool_swap", None)}))
    store.append("validation", pa.table({"sample_id": ids, "model": ["bench-model"] * n,
                                         "ppl": np.exp(rng.normal(1 + corrupted, 0.5)),
                                         "val_ppl": np.exp(rng.normal(0.5 + corrupted, 0.4)),
                                         "p_no": rng.uniform(size=n), "run_id": ["validate-bench"] * n}))
    words = rng.integers(4, 30, size=n)
    store.append("captions", pa.table({"sample_id": ids, "captioner": ["bench-captioner"] * n, "prompt_id": ["default"] * n,
                                       "caption": [" ".join(["word"] * w) for w in words.tolist()],
                                       "tokens": words.astype(np.int32), "run_id": ["caption-bench"] * n}))
    store.append("rejects", [{"sample_id": f"cauldron:ocrvqa:train:{n + i}", "stage": "ingest", "source": "cauldron",
                              "subset": "ocrvqa", "split": "train", "reason": "image 0: image is empty", "run_id": "ingest-bench"}
                             for i in range(1000)])
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    for stage in ("ingest", "score", "gate", "corrupt", "validate", "caption"):
        store.record_run(f"{stage}-bench", stage, {"model": "bench-model", "rows": n}, now, n)


def write_eval(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    report = {"clean": {"accuracy": 0.6, "n": 500},
              "corruption": {c: {str(s): {"accuracy": 0.6 - 0.05 * s, "delta_p_mean": -0.05 * s / 0.6, "delta_p_sd": 0.01,
                                          "dropped": 0} for s in range(1, 6)} for c in ("gaussian_noise", "shot_noise", "insert")},
              "interference": {c: {"n": 250, "accuracy_original": 0.6, "accuracy_perturbed": 0.4, "causal_effect": 0.3}
                               for c in ("UF", "MD", "RP", "RI", "FB", "FW")}}
    (folder / "report.json").write_text(json.dumps(report))


def time_report(store: str, out: str, mixture: str | None, eval_dir: str | None) -> dict:
    """Run in a fresh process: the report's time and its own peak RSS."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT)!r})
from engine.report import write_report
from engine.store import Store
def hwm_mb():  # this process's own peak RSS (VmHWM is reset by exec, unlike ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
start = time.perf_counter()
result = write_report(Store({store!r}), {out!r}, {mixture!r}, {eval_dir!r})
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "sections": len(result.sections), "images": result.images,
                  "rss_mb": hwm_mb()}}))
"""
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    from engine.stages.ingest import ingest_sample
    from engine.recipes import build, load_recipe
    from engine.store import Store

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        make_store(str(tmp / "big"), args.rows)
        print(f"synthetic store of {args.rows:,} rows written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        recipe = load_recipe(ROOT / "recipes" / "cauldron_r50.yaml", [
            "redundancy.captioner=bench-captioner", "mixture.budget=500000", f"output.path={tmp / 'mix-big'}",
            "output.formats=[parquet]"])
        build(Store(tmp / "big"), recipe, progress=False)
        write_eval(tmp / "eval")
        results.append(("synthetic", args.rows, time_report(str(tmp / "big"), str(tmp / "big.html"), str(tmp / "mix-big"),
                                                            str(tmp / "eval"))))
        ingest_sample(Store(tmp / "sample"), tmp / "sample-data", progress=False)
        recipe = load_recipe(ROOT / "recipes" / "cauldron_r50.yaml", [
            "redundancy.captioner=sample-annotations", "mixture.budget=2000", f"output.path={tmp / 'mix-sample'}",
            "output.formats=[parquet]"])
        build(Store(tmp / "sample"), recipe, progress=False)
        results.append(("bundled sample", 3800, time_report(str(tmp / "sample"), str(tmp / "sample.html"),
                                                             str(tmp / "mix-sample"), None)))
    print(f"{'store':<16}{'rows':>11}{'sections':>10}{'images':>8}{'seconds':>9}{'peak RSS MB':>13}")
    for name, rows, r in results:
        print(f"{name:<16}{rows:>11,}{r['sections']:>10}{r['images']:>8}{r['seconds']:>9.2f}{r['rss_mb']:>13.0f}")


if __name__ == "__main__":
    main()
