"""Synthetic embeddings with a known interaction structure, for checking the estimator.

Under pointwise PID, redundancy takes the smaller of the two specificities h(x_V), h(x_T). A modality that
says nothing about the label therefore leaves the other modality's information *unique* only when it is
the less surprising of the two (discrete analogue: x1 = y with x2 constant gives U1 = 1 bit, while x2 an
independent fair coin gives R = 1 bit). So in the unique structures the uninformative modality is a
low-entropy signal: a noisy copy of one scalar spread over all dimensions.
"""

from __future__ import annotations

import numpy as np

STRUCTURES = {"image_only": "u_v", "text_only": "u_t", "both": "r", "xor": "s"}


def _clusters(codes: np.ndarray, dim: int, rng: np.random.Generator, spread: float) -> np.ndarray:
    centres = rng.normal(size=(codes.max() + 1, dim)) * 3.0
    return centres[codes] + spread * rng.normal(size=(len(codes), dim))


def _low_entropy(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    direction = rng.normal(size=dim)
    return rng.normal(size=(n, 1)) * direction + 0.02 * rng.normal(size=(n, dim))


def synthetic(structure: str, n: int = 4000, dim: int = 8, classes: int = 4, seed: int = 0, spread: float = 1.0):
    """(x_V, x_T, y) where the label is carried by the image only, the text only, both (copies), or the XOR
    of a bit in each (``STRUCTURES`` names the interaction that should dominate)."""
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {sorted(STRUCTURES)}")
    rng = np.random.default_rng(seed)
    y = rng.integers(classes, size=n)
    if structure == "image_only":
        return _clusters(y, dim, rng, spread), _low_entropy(n, dim, rng), y
    if structure == "text_only":
        return _low_entropy(n, dim, rng), _clusters(y, dim, rng, spread), y
    if structure == "both":
        return _clusters(y, dim, rng, spread), _clusters(y, dim, rng, spread), y
    a, b = rng.integers(2, size=n), rng.integers(2, size=n)
    return _clusters(a, dim, rng, spread), _clusters(b, dim, rng, spread), a ^ b
