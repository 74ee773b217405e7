"""The rules of a mixture, as small pure functions: temperature weights and integer quotas (Self-Captioning
MI Tuning, App. C.2). The salted SHA-256 unit hash that selects rows and assigns tiers is in ``engine.hashing``."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping


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
