"""Salted SHA-256 unit hashes: every deterministic "random" choice in the engine (which rows fill a quota,
redundancy tiers, folds, corruptions, perturbations) is u(id) = top 64 bits of SHA-256(salt + id) / 2^64,
computed the same way in Python and in DuckDB SQL."""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction

from engine.sql import sql_literal

TWO_64 = 2**64


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
    return f"('0x' || substr(sha256({sql_literal(salt)} || {column}), 1, 16))::UBIGINT"


def tier_threshold(level: float) -> int:
    """The integer t with ``u(id) < level`` exactly when ``top64 < t`` (no float rounding at the edge)."""
    return math.ceil(Fraction(level) * TWO_64)
