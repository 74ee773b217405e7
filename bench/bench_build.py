"""Benchmark: `engine build` of the r50 recipe on a Cauldron-shaped catalog vs a straightforward pandas
implementation of the same rules, timed side by side in one run.

The catalog has the 48 subset counts of Table 7 (Self-Captioning MI Tuning, App. C.2): 984,000 rows,
metadata only (no image bytes), one short turn each, and a caption for every row. Each contender runs in
its own fresh process (so peak RSS is its own); the time is the build call alone, after imports.

    python bench/bench_build.py            # prints the table
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TABLE_7 = {
    "ai2d": 4163, "aokvqa": 6023, "chart2text": 2726, "chartqa": 2638, "clevr": 38586, "cocoqa": 20054,
    "datikz": 8051, "diagram_image_to_text": 299, "docvqa": 39145, "dvqa": 23921, "figureqa": 18073,
    "finqa": 5367, "geomverse": 4456, "hateful_memes": 4252, "hitab": 5988, "iam": 5663, "iconqa": 7966,
    "infographic_vqa": 10074, "intergps": 1760, "localized_narratives": 163198, "mapqa": 10909,
    "mimic_cgd": 24566, "multihiertt": 12065, "nlvr2": 19168, "ocrvqa": 157991, "plotqa": 70590,
    "raven": 11583, "rendered_text": 10000, "robut_sqa": 12543, "robut_wikisql": 19930, "robut_wtq": 14254,
    "scienceqa": 3616, "screen2words": 15743, "spot_the_diff": 6365, "st_vqa": 23104, "tabmwp": 10299,
    "tallyqa": 19782, "tat_qa": 7803, "textcaps": 21947, "textvqa": 34593, "tqa": 5465, "vistext": 9969,
    "visual7w": 18884, "visualmrc": 11988, "vqarad": 1793, "vqav2": 49629, "vsr": 3354, "websight": 3664,
}
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "cauldron_r50.yaml"
CAPTIONER = "Qwen/Qwen2.5-VL-32B-Instruct"


def make_catalog(store_path: str) -> None:
    """Write the 984,000-row metadata-only catalog and a caption per row."""
    import numpy as np
    import pyarrow as pa

    from engine.categories import subset_mapping
    from engine.store import Store

    store = Store(store_path)
    mapping = subset_mapping()
    subsets = np.repeat(np.array(list(TABLE_7)), list(TABLE_7.values()))
    rows = np.concatenate([np.arange(n) for n in TABLE_7.values()])
    ids = pa.array([f"cauldron:{s}:train:{r}" for s, r in zip(subsets.tolist(), rows.tolist())])
    n = len(ids)
    turns = pa.array([[{"user": f"Question {r}?", "assistant": "An answer.", "source": s}]
                      for s, r in zip(subsets.tolist(), rows.tolist())])
    store.append("samples", pa.table({
        "sample_id": ids,
        "source": pa.array(["cauldron"] * n),
        "subset": pa.array(subsets),
        "split": pa.array(["train"] * n),
        "row": pa.array(rows),
        "category": pa.array([mapping[s].category for s in subsets.tolist()]),
        "task_kind": pa.array([mapping[s].task_kind for s in subsets.tolist()]),
        "images": pa.array([[]] * n, pa.list_(pa.binary())),
        "turns": turns,
    }))
    store.append("captions", pa.table({
        "sample_id": ids,
        "captioner": pa.array([CAPTIONER] * n),
        "prompt_id": pa.array(["default"] * n),
        "caption": pa.array(["A short caption of the image."] * n),
        "run_id": pa.array(["caption-bench"] * n),
    }))


def run_engine(store_path: str, out: str) -> dict:
    from engine.recipes import build, load_recipe
    from engine.store import Store

    recipe = load_recipe(RECIPE, [f"output.path={out}"])
    start = time.perf_counter()
    result = build(Store(store_path), recipe, progress=False)
    return {"seconds": time.perf_counter() - start, "rows": result.manifest["rows"]["total"],
            "captioned": result.manifest["rows"]["captioned"]}


def run_pandas(store_path: str, out: str) -> dict:
    """The same rules written the obvious way: pandas frames, hashlib per row, groupby, merge, to_parquet,
    Dataset.from_pandas + save_to_disk."""
    import hashlib

    import datasets
    import lance

    from engine.recipes.build import plan_quotas
    from engine.recipes.output import mixture_features
    from engine.recipes.recipe import load_recipe

    recipe = load_recipe(RECIPE)
    start = time.perf_counter()
    samples = lance.dataset(f"{store_path}/samples.lance").to_table().to_pandas()
    captions = lance.dataset(f"{store_path}/captions.lance").to_table().to_pandas()
    samples = samples[(samples["split"] == "train") & ~samples["subset"].isin(["clevr_math", "okvqa"])]

    def u64(salt: str, sample_id: str) -> int:
        return int.from_bytes(hashlib.sha256((salt + sample_id).encode()).digest()[:8], "big")

    samples["sel_key"] = [u64(f"select:{recipe.seed}:", s) for s in samples["sample_id"]]
    counts = samples.groupby(["category", "source", "subset"]).size()
    _, quotas = plan_quotas([(*k, int(v)) for k, v in counts.items()], recipe.mixture)
    samples = samples.sort_values(["sel_key", "sample_id"])
    samples["rank"] = samples.groupby(["category", "source", "subset"]).cumcount()
    samples["quota"] = [quotas[k] for k in zip(samples["category"], samples["source"], samples["subset"])]
    picked = samples[samples["rank"] < samples["quota"]].copy()
    threshold = int(recipe.redundancy["level"] * 2**64)
    picked["captioned"] = [u64(recipe.redundancy["salt"], s) < threshold for s in picked["sample_id"]]
    captions = captions[captions["captioner"] == recipe.redundancy["captioner"]][["sample_id", "caption"]]
    picked = picked.merge(captions, on="sample_id", how="left")
    picked["texts"] = [
        [{**t[0], "user": t[0]["user"] + " " + c}] + list(t[1:]) if cap else list(t)
        for t, c, cap in zip(picked["turns"], picked["caption"], picked["captioned"])
    ]
    picked["images"] = [[{"bytes": b, "path": None} for b in images] for images in picked["images"]]
    picked = picked.sort_values(["sel_key", "sample_id"])
    frame = picked[["images", "texts", "sample_id", "source", "subset", "category", "task_kind", "label", "captioned"]]
    Path(out).mkdir(parents=True, exist_ok=True)
    frame.to_parquet(f"{out}/part-00000.parquet", index=False)
    datasets.disable_progress_bars()
    datasets.Dataset.from_pandas(frame, features=datasets.Features.from_dict(mixture_features()), preserve_index=False).save_to_disk(f"{out}/hf")
    return {"seconds": time.perf_counter() - start, "rows": len(frame), "captioned": int(frame["captioned"].sum())}


def child(which: str, store_path: str, out: str) -> None:
    import resource

    result = (run_engine if which == "engine" else run_pandas)(store_path, out)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store_path = f"{tmp}/store"
        start = time.perf_counter()
        make_catalog(store_path)
        print(f"catalog: {sum(TABLE_7.values()):,} rows in {time.perf_counter() - start:.1f} s")
        results = {}
        for which in ("engine", "pandas"):
            proc = subprocess.run([sys.executable, __file__, "--child", which, store_path, f"{tmp}/{which}"],
                                  capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if proc.returncode:
                sys.exit(f"{which} failed:\n{proc.stderr}")
            results[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n{'implementation':<16}{'rows':>10}{'captioned':>11}{'seconds':>10}{'peak RSS MB':>13}")
    for which, r in results.items():
        print(f"{which:<16}{r['rows']:>10,}{r['captioned']:>11,}{r['seconds']:>10.2f}{r['peak_rss_mb']:>13.0f}")
    speedup = results["pandas"]["seconds"] / results["engine"]["seconds"]
    print(f"\nengine is {speedup:.1f}x faster than pandas "
          f"(targets: engine <= 2 s, peak RSS <= 2048 MB, >= 10x)")
    same = all(results["engine"][k] == results["pandas"][k] for k in ("rows", "captioned"))
    print(f"same rows and captioned counts: {same}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
    else:
        main()
