"""The rules of a mixture, as small pure functions: temperature weights, integer quotas, and the salted
SHA-256 unit hash that selects rows and assigns redundancy tiers (Self-Captioning MI Tuning, App. C.2)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Mapping
from fractions import Fraction

TWO_64 = 2**64


def temperature_weights(counts: Mapping[Hashable, int], temperature: float) -> dict:
    """W_i = N_i^tau: tau = 1 keeps proportions, tau = 0 gives every subset the same weight."""
    return {key: float(n) ** temperature if n > 0 else 0.0 for key, n in counts.items()}


def allocate(budget: int, weights: Mapping[Hashable, float], capacity: Mapping[Hashable, int]) -> dict:
    """Integer quotas proportional to ``weights``, none above its ``capacity``, summing exactly to
    ``min(budget, sum(capacity))``.

    A key whose share exceeds its capacity is capped and the excess is shared among the others by weight
    (repeated until no share exceeds its capacity); the fractional parts are then rounded by largest
    remainder, ties going to the smaller key, so the result is deterministic.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    quotas = {key: 0 for key in weights}
    active = sorted(key for key in weights if capacity[key] > 0 and weights[key] > 0)
    remaining = budget
    shares: dict = {}
    while active and remaining > 0:
        total = math.fsum(weights[key] for key in active)
        shares = {key: remaining * weights[key] / total for key in active}
        capped = [key for key in active if shares[key] >= capacity[key]]
        if not capped:
            break
        for key in capped:
            quotas[key] = capacity[key]
            remaining -= capacity[key]
        active = [key for key in active if key not in capped]
        shares = {}
    if shares and remaining > 0:
        floors = {key: math.floor(share) for key, share in shares.items()}
        leftover = remaining - sum(floors.values())
        by_remainder = sorted(shares, key=lambda key: (-(shares[key] - floors[key]), key))
        for rank, key in enumerate(by_remainder):
            quotas[key] = floors[key] + (1 if rank < leftover else 0)
    return quotas


def hash_u64(salt: str, sample_id: str) -> int:
    """The top 64 bits of SHA-256(salt + id), as an integer."""
    return int.from_bytes(hashlib.sha256((salt + sample_id).encode()).digest()[:8], "big")


def unit_hash(salt: str, sample_id: str) -> float:
    """u(id) in [0, 1): the top 64 bits of SHA-256(salt + id) over 2^64."""
    return hash_u64(salt, sample_id) / TWO_64


def in_tier(salt: str, sample_id: str, level: float) -> bool:
    """Whether a sample is in redundancy tier ``level`` (u(id) < level, compared exactly)."""
    return hash_u64(salt, sample_id) < tier_threshold(level)


def hash_u64_sql(salt: str, column: str = "sample_id") -> str:
    """DuckDB expression: the top 64 bits of SHA-256(salt + column) as UBIGINT (same bits as ``unit_hash``)."""
    quoted = salt.replace("'", "''")
    return f"('0x' || substr(sha256('{quoted}' || {column}), 1, 16))::UBIGINT"


def tier_threshold(level: float) -> int:
    """The integer t with ``u(id) < level`` exactly when ``top64 < t`` (no float rounding at the edge)."""
    return math.ceil(Fraction(level) * TWO_64)
