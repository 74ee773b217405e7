"""From continuous representations to the BROJA terms: discretise each variable across samples (L2-normalise,
PCA, k-means), take the empirical histogram over samples as p(x1, x2, y), decompose it, and say how far the
numbers can be trusted: bootstrap intervals over samples and a shuffled-pairing baseline (Y permuted against
(X1, X2), so that the true decomposition is zero and whatever the estimator reports is its bias at this
sample size)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.attribution.pid import PIDTerms, broja_pid
from engine.stages.embed import pca_fit, pca_apply

TERMS = ("R", "U_I", "U_T", "S")
# Resampled and shuffled joints only draw intervals, whose width (hundredths of a bit at thousands of samples) is
# far above the solver's error after 200 alternations (about 1e-4 nats): they get that budget, not the full one.
RESAMPLE_ITERATIONS = 200


def kmeans(x: np.ndarray, clusters: int, seed: int = 0, iterations: int = 100) -> np.ndarray:
    """Cluster labels of the rows of ``x``: k-means++ seeding then Lloyd iterations, deterministic for a seed.
    Fewer distinct points than ``clusters`` give fewer clusters (labels stay in range)."""
    rng = np.random.default_rng(seed)
    n = len(x)
    clusters = min(clusters, n)
    centres = [x[rng.integers(n)]]
    distance = np.sum((x - centres[0]) ** 2, axis=1)
    for _ in range(1, clusters):
        total = distance.sum()
        if total <= 0:  # every point is already a centre
            break
        centres.append(x[rng.choice(n, p=distance / total)])
        distance = np.minimum(distance, np.sum((x - centres[-1]) ** 2, axis=1))
    centres = np.array(centres)
    labels = np.full(n, -1)
    for _ in range(iterations):
        squared = (x**2).sum(1)[:, None] - 2 * x @ centres.T + (centres**2).sum(1)[None, :]
        new = np.argmin(squared, axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        members = labels[:, None] == np.arange(len(centres))[None, :]
        counts = members.sum(0)
        sums = members.T.astype(x.dtype) @ x
        occupied = counts > 0  # an emptied cluster keeps its old centre
        centres[occupied] = sums[occupied] / counts[occupied, None]
    return labels


def discretise(x: np.ndarray, components: int = 10, clusters: int = 10, seed: int = 0) -> np.ndarray:
    """One cluster label per sample: L2-normalise each row, project on the top ``components`` principal axes
    of these samples, k-means into ``clusters``."""
    x = np.asarray(x, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    components = max(1, min(components, x.shape[1], len(x)))
    projected = pca_apply(x, pca_fit(x, components, standardize=False)).astype(np.float64)
    return kmeans(projected, clusters, seed)


def histogram(l1: np.ndarray, l2: np.ndarray, ly: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The empirical joint p[x1, x2, y] of three label arrays."""
    flat = np.ravel_multi_index((l1, l2, ly), shape)
    return np.bincount(flat, minlength=int(np.prod(shape))).reshape(shape) / len(l1)


def contributions(terms: dict) -> tuple[float, float]:
    """CT = U_T / (U_T + U_I) and CI = 1 − CT; NaN when neither modality carries unique information."""
    unique = terms["U_T"] + terms["U_I"]
    if unique <= 1e-12:
        return float("nan"), float("nan")
    ct = max(terms["U_T"], 0.0) / unique
    return ct, 1.0 - ct


def _named(terms: PIDTerms) -> dict:
    return {"R": terms.R, "U_I": terms.U1, "U_T": terms.U2, "S": terms.S}


@dataclass
class Attribution:
    """The decomposition of one Y (one layer) against image X1 and text X2, in bits."""

    n: int
    terms: dict  # R, U_I, U_T, S
    CT: float
    CI: float
    intervals: dict = field(default_factory=dict)  # name -> [low, high], basic bootstrap over samples
    shuffled: dict = field(default_factory=dict)  # name -> [mean, high] over shuffled pairings


def attribute_labels(l1: np.ndarray, l2: np.ndarray, ly: np.ndarray, bootstrap: int = 50, shuffles: int = 10,
                     seed: int = 0, level: float = 0.95) -> Attribution:
    """The BROJA terms of discretised image, text and target labels, with basic bootstrap intervals
    (resampling samples with replacement, labels fixed) and the shuffled-pairing baseline (``shuffles`` permutations of
    Y against the pairs (X1, X2); the interval's upper end is its ``level`` quantile)."""
    shape = (int(l1.max()) + 1, int(l2.max()) + 1, int(ly.max()) + 1)
    terms = _named(broja_pid(histogram(l1, l2, ly, shape)))
    ct, ci = contributions(terms)
    rng = np.random.default_rng(seed)
    tail = (1 - level) / 2

    def summary(rows: list[dict]) -> dict:
        out = {}
        for name in (*TERMS, "CT", "CI"):
            values = np.array([r[name] for r in rows], dtype=float)
            values = values[np.isfinite(values)]
            out[name] = values
        return out

    def with_shares(terms: dict) -> dict:
        share_t, share_i = contributions(terms)
        return {**terms, "CT": share_t, "CI": share_i}

    intervals = {}
    if bootstrap:
        resampled = []
        for _ in range(bootstrap):
            pick = rng.integers(0, len(l1), len(l1))
            joint = histogram(l1[pick], l2[pick], ly[pick], shape)
            resampled.append(with_shares(_named(broja_pid(joint, max_iter=RESAMPLE_ITERATIONS))))
        # basic (pivotal) bootstrap: resampling with replacement duplicates samples, which biases every plug-in
        # term of a resampled histogram upward, so percentile intervals would sit above the estimate; reflecting
        # the resampled quantiles around it corrects for that bias. Terms stay >= 0 and shares in [0, 1].
        point = with_shares(terms)
        intervals = {}
        for name, values in summary(resampled).items():
            if not len(values) or not np.isfinite(point[name]):
                intervals[name] = [None, None]
                continue
            low, high = 2 * point[name] - np.quantile(values, 1 - tail), 2 * point[name] - np.quantile(values, tail)
            ceiling = 1.0 if name in ("CT", "CI") else np.inf
            intervals[name] = [float(np.clip(low, 0.0, ceiling)), float(np.clip(high, 0.0, ceiling))]
    shuffled = {}
    if shuffles:
        rows = [with_shares(_named(broja_pid(histogram(l1, l2, rng.permutation(ly), shape), max_iter=RESAMPLE_ITERATIONS)))
                for _ in range(shuffles)]
        shuffled = {name: [float(v.mean()), float(np.quantile(v, level))] if len(v) else [None, None]
                    for name, v in summary(rows).items()}
    return Attribution(n=len(l1), terms=terms, CT=ct, CI=ci, intervals=intervals, shuffled=shuffled)


def attribute_representations(x1: np.ndarray, x2: np.ndarray, y: np.ndarray, components: int = 10, clusters: int = 10,
                              seed: int = 0, bootstrap: int = 50, shuffles: int = 10) -> Attribution:
    """Discretise image features ``x1``, text features ``x2`` and representation ``y`` (rows = samples) and
    decompose; see ``attribute_labels``."""
    if not len(x1) == len(x2) == len(y):
        raise ValueError(f"x1, x2 and y need one row per sample each, got {len(x1)}, {len(x2)} and {len(y)}")
    labels = [discretise(v, components, clusters, seed) for v in (x1, x2, y)]
    return attribute_labels(*labels, bootstrap=bootstrap, shuffles=shuffles, seed=seed)
