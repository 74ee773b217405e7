"""Benchmark: `engine attribute` on 2,000 samples of the bundled sample with the tiny test model on this
machine's CPU, and where the time goes: the model's forward passes, its input processor (chat template,
tokenising, image preprocessing), the engine around them (reading rows, decoding images, caching chunks) and
the decomposition (discretisation, BROJA PID per layer, bootstrap intervals, shuffled baseline). The PID
should be a small share. A second run reads the cached representations and only decomposes.

    python bench/bench_attribute.py [--rows 2000] [--bootstrap 50] [--shuffles 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.attribution import broja_pid
from engine.attribution.estimate import histogram
from engine.attribution.run import AttributeConfig, attribute
from engine.models.backends import load_backend
from engine.models.tiny import build_tiny_smolvlm
from engine.stages.ingest import ingest_sample
from engine.store import Store


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--bootstrap", type=int, default=50)
    parser.add_argument("--shuffles", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x1, x2 = rng.integers(0, 10, 2000), rng.integers(0, 10, 2000)
    joint = histogram(x1, x2, np.where(rng.random(2000) < 0.5, x1, x2), (10, 10, 10))
    times = []
    for _ in range(20):
        start = time.perf_counter()
        broja_pid(joint)
        times.append(time.perf_counter() - start)
    print(f"broja_pid on a 10x10x10 histogram of 2,000 samples: median {np.median(times) * 1000:.1f} ms, "
          f"min {min(times) * 1000:.1f} ms over 20 runs")

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_smolvlm(Path(tmp) / "tiny")
        store = Store(Path(tmp) / "store")
        ingest_sample(store, Path(tmp) / "sample", scale=args.rows / 3700, progress=False)
        config = AttributeConfig(bootstrap=args.bootstrap, shuffles=args.shuffles, batch_size=args.batch_size)
        print(f"{'run':<8}{'samples':>8}{'layers':>8}{'seconds':>9}{'forward':>10}{'processor':>11}{'engine':>9}{'PID':>8}")
        for run in ("first", "cached"):
            report = attribute(store, load_backend(str(model)), limit=args.rows, config=config, progress=False)
            engine = report.seconds - report.forward_seconds - report.processor_seconds - report.pid_seconds
            shares = [report.forward_seconds, report.processor_seconds, engine, report.pid_seconds]
            print(f"{run:<8}{report.rows[0]['n']:>8}{len(report.rows):>8}{report.seconds:>9.1f}"
                  + "".join(f"{s / report.seconds:>{w}.1%}" for s, w in zip(shares, (10, 11, 9, 8))))
        print(f"PID: {report.pid_seconds:.1f} s for {len(report.rows)} layers x (1 + {args.bootstrap} bootstrap + "
              f"{args.shuffles} shuffled) decompositions")


if __name__ == "__main__":
    main()
