"""The interaction-transfer experiment (Self-Captioning MI Tuning, Table 1 direction) on easy-vqa with
offline features: prints R, U_V, U_T, S (nats, held-out rows) for the question alone, the question plus a
caption composed from the dataset's own answers, and the question plus random words.

    python bench/interaction_transfer.py [questions]
"""

import sys
import time

from engine.interactions.transfer import format_table, transfer_experiment

if __name__ == "__main__":
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else 6000
    start = time.perf_counter()
    table = transfer_experiment(limit=limit)
    print(f"easy-vqa, {limit} questions, classical image + MiniLM text features (PCA 32, standardised)")
    print(format_table(table))
    print(f"{time.perf_counter() - start:.0f} s")
