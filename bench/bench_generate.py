"""Benchmark: captioning and validation throughput of the transformers backend on this CPU, and the share
of each run spent outside the model's forward passes (batching, image decoding, tokenising, writing).

Models are built from config with random weights (no hub access): ``tiny`` (the test model) and
``smolvlm-256m`` (SmolVLM-256M's layer sizes). Captions are generated to a fixed length (min = max new
tokens), so the figures do not depend on when random weights happen to stop. Rows come from the bundled
sample. Target: <= 10% of the time outside the model.

    python bench/bench_generate.py [--sizes tiny smolvlm-256m] [--rows 96]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from engine.generate import caption, load_backend, validate
from engine.generate.tiny import build_tiny_smolvlm
from engine.ingest import ingest_sample
from engine.store import Store

SETTINGS = {"tiny": dict(rows=256, batch=16, new_tokens=32), "smolvlm-256m": dict(rows=32, batch=8, new_tokens=32)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=list(SETTINGS))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        ingest_sample(store, Path(tmp) / "sample", scale=0.1, progress=False)
        for size in args.sizes:
            setting = SETTINGS[size]
            model = build_tiny_smolvlm(Path(tmp) / size, context=2048, size=size)
            backend = load_backend(str(model))
            where = "subset in ('shapes_vqa', 'bar_charts', 'text_tables', 'rendered_words')"
            captioned = caption(store, backend, where=where, limit=setting["rows"], batch_size=setting["batch"],
                                max_new_tokens=setting["new_tokens"], min_new_tokens=setting["new_tokens"], progress=False)
            scored = validate(store, backend, where=where, limit=setting["rows"], batch_size=setting["batch"], progress=False)
            for stage, report in (("caption", captioned), ("validate", scored)):
                results.append((size, stage, report, setting))
    print(f"{'model':<14}{'stage':<10}{'rows':>6}{'batch':>7}{'samples/s':>11}{'seconds':>9}{'in model':>10}{'outside':>9}")
    for size, stage, report, setting in results:
        print(f"{size:<14}{stage:<10}{report.written:>6}{setting['batch']:>7}{report.samples_per_second:>11.2f}"
              f"{report.seconds:>9.2f}{report.model_seconds:>10.2f}{report.outside_share:>9.1%}")
    print(f"captions: {SETTINGS['tiny']['new_tokens']} new tokens each (fixed); validation: PPL + Val_PPL per row")


if __name__ == "__main__":
    main()
