"""Benchmark: train + score the LSMI estimator on synthetic 512-d image and text features (the label carried
by both, so every part of the estimator has signal to fit) at 10,000 and 100,000 samples on this CPU.
Prints time, epochs run and peak memory per size. Target: 100,000 x 512 done in <= 5 minutes.

    python bench/bench_lsmi.py [sizes...]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def run(n: int) -> dict:
    import numpy as np

    from engine.interactions.estimator import LSMIConfig, estimate
    from engine.interactions.synthetic import synthetic

    x_v, x_t, y = synthetic("both", n=n, dim=512, classes=10, seed=0, spread=3.0)
    folds = np.where(np.random.default_rng(0).random(n) < 0.8, "train", "val")
    start = time.perf_counter()
    result = estimate(x_v, x_t, y, folds, LSMIConfig(), progress=False)
    seconds = time.perf_counter() - start
    info = result.info
    return {
        "n": n, "seconds": seconds,
        "entropy_epochs": info["entropy"]["epochs"], "entropy_rows": info["entropy_train_rows"],
        "classifier_epochs": info["classifiers"]["epochs"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "R": info["averages"]["val"]["r"], "dominant_r": float((result.dominant == "r").mean()),
    }


def main(sizes: list[int]) -> None:
    rows = []
    for n in sizes:  # each size in a fresh process, so peak memory is its own
        out = subprocess.run([sys.executable, __file__, "--child", str(n)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'samples':>9} {'dims':>5} {'seconds':>8} {'entropy epochs (rows)':>22} {'classifier epochs':>18} {'peak RSS MB':>12} {'R (val)':>8} {'r-dominant':>11}")
    for r in rows:
        print(f"{r['n']:>9,} {512:>5} {r['seconds']:>8.1f} {r['entropy_epochs']:>11} ({r['entropy_rows']:>7,}) "
              f"{r['classifier_epochs']:>18} {r['peak_rss_mb']:>12.0f} {r['R']:>8.3f} {r['dominant_r']:>11.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(run(int(sys.argv[2]))))
    else:
        main([int(a) for a in sys.argv[1:]] or [10_000, 100_000])
