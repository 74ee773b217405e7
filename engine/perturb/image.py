"""Image corruptions at severities 1-5 (Self-Captioning MI Tuning, App. D; the constants of the reference
code) and the image interventions of modality interference (random pixels, black, white canvas).

All work on float arrays in [0, 1], shape (..., H, W, C), vectorised with numpy, seeded.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

GAUSSIAN_SIGMA = (0.08, 0.12, 0.18, 0.26, 0.38)
SHOT_PHOTONS = (60, 25, 12, 5, 3)
IMPULSE_AMOUNT = (0.03, 0.06, 0.09, 0.17, 0.27)


def _check(severity: int) -> int:
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be 1-5, got {severity}")
    return severity - 1


def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """x + N(0, sigma^2), clipped to [0, 1]."""
    return np.clip(x + rng.normal(scale=GAUSSIAN_SIGMA[_check(severity)], size=x.shape), 0, 1)


def shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson(x * c) / c: photon noise with c photons at full intensity."""
    c = SHOT_PHOTONS[_check(severity)]
    return np.clip(rng.poisson(x * c) / c, 0, 1)


def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper: each value is replaced with probability ``amount``, by 0 or 1 with equal odds."""
    amount = IMPULSE_AMOUNT[_check(severity)]
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    return np.where(hit, salt.astype(x.dtype), x)


CORRUPTIONS: dict[str, Callable] = {"gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise}


def to_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0


def to_png(x: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def corrupt_images(images: list[bytes], corruption: str, severity: int, seed: int) -> list[bytes]:
    """Apply one corruption to encoded images; images of the same size are processed as one array."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; known: {sorted(CORRUPTIONS)}")
    rng = np.random.default_rng(seed)
    arrays = [to_array(data) for data in images]
    out: list[bytes | None] = [None] * len(arrays)
    by_shape: dict[tuple, list[int]] = {}
    for index, array in enumerate(arrays):
        by_shape.setdefault(array.shape, []).append(index)
    for shape in sorted(by_shape):
        indices = by_shape[shape]
        noisy = CORRUPTIONS[corruption](np.stack([arrays[i] for i in indices]), severity, rng)
        for i, array in zip(indices, noisy):
            out[i] = to_png(array)
    return out


def canvas(kind: str, width: int, height: int, seed: int = 0) -> bytes:
    """A replacement image: ``random_pixels`` (uniform noise), ``black`` or ``white``, PNG bytes."""
    if kind == "random_pixels":
        pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    elif kind in ("black", "white"):
        pixels = np.full((height, width, 3), 0 if kind == "black" else 255, dtype=np.uint8)
    else:
        raise ValueError(f"unknown canvas {kind!r}")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()
