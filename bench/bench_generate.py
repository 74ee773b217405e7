"""Benchmark: captioning and validation throughput of a backend, and where each run's time goes: inside the
model's forward passes, inside the model's own input processor (chat template, tokenising, HF image
preprocessing), and in the engine around them (reading rows from the store, decoding images, batching,
writing results).

Models are built from config with random weights (no hub access): ``tiny`` (the test model), ``tiny-h64``
(the same with 64-wide heads) and ``smolvlm-256m`` (SmolVLM-256M's layer sizes). Captions are generated to a
fixed length (min = max new tokens), so the figures do not depend on when random weights happen to stop.
Rows come from the bundled sample. Target: <= 10% of the time outside the model.

    python bench/bench_generate.py [--sizes tiny smolvlm-256m] [--rows N] [--backends transformers vllm --device cuda]

Each backend runs the same rows with the same model folder, one after the other in this process.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from engine.models.backends import load_backend
from engine.stages.caption import caption
from engine.stages.validate import validate
from engine.models.tiny import build_tiny_smolvlm
from engine.stages.ingest import ingest_sample
from engine.store import Store

SETTINGS = {"tiny": dict(rows=1024, batch=16, new_tokens=32), "tiny-h64": dict(rows=1024, batch=16, new_tokens=32),
            "smolvlm-256m": dict(rows=32, batch=8, new_tokens=32)}
WHERE = "subset in ('shapes_vqa', 'bar_charts', 'text_tables', 'rendered_words')"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["tiny", "smolvlm-256m"], choices=list(SETTINGS))
    parser.add_argument("--rows", type=int, help="rows per stage (default: per size, see SETTINGS)")
    parser.add_argument("--backends", nargs="+", default=["transformers"], choices=["transformers", "vllm"])
    parser.add_argument("--device", default="cpu", help="device of the transformers backend (vLLM always uses CUDA)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            setting = SETTINGS[size]
            rows = args.rows or setting["rows"]
            model = build_tiny_smolvlm(Path(tmp) / size, context=2048, size=size)
            for name in args.backends:
                store = Store(Path(tmp) / f"store-{size}-{name}")  # a fresh store: every backend sees the same rows
                ingest_sample(store, Path(tmp) / "sample", scale=max(0.1, rows / 1000), progress=False)
                backend = load_backend(str(model), name, args.device)
                captioned = caption(store, backend, where=WHERE, limit=rows, batch_size=setting["batch"],
                                    max_new_tokens=setting["new_tokens"], min_new_tokens=setting["new_tokens"], progress=False)
                scored = validate(store, backend, where=WHERE, limit=rows, batch_size=setting["batch"], progress=False)
                for stage, report in (("caption", captioned), ("validate", scored)):
                    results.append((size, name, stage, report, setting))
    print(f"{'model':<14}{'backend':<14}{'stage':<10}{'rows':>6}{'batch':>7}{'samples/s':>11}{'seconds':>9}"
          f"{'model':>8}{'processor':>11}{'engine':>8}{'outside model':>15}")
    for size, name, stage, report, setting in results:
        model, processor = report.model_seconds / report.seconds, report.prepare_seconds / report.seconds
        print(f"{size:<14}{name:<14}{stage:<10}{report.written:>6}{setting['batch']:>7}{report.samples_per_second:>11.2f}"
              f"{report.seconds:>9.2f}{model:>8.1%}{processor:>11.1%}"
              f"{report.engine_share:>8.1%}{report.outside_share:>15.1%}")
    print("shares of each run's wall time: model = forward passes / generate; processor = the model's input processor "
          "(chat template, tokenising, image preprocessing); engine = the rest (store reads, image decoding, batching, writes)")
    print(f"captions: {SETTINGS['tiny']['new_tokens']} new tokens each (fixed); validation: PPL + Val_PPL per row, one forward pass")


if __name__ == "__main__":
    main()
