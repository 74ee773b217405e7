"""The mixture rules as pure functions: temperature weights, quotas, salted SHA-256 tiers."""

import hashlib
import math
import random

import duckdb
import pytest

from engine.recipes.build import plan_quotas
from engine.hashing import TWO_64, hash_u64, hash_u64_sql, in_tier, tier_threshold, unit_hash
from engine.recipes.mixture import allocate, temperature_weights


def test_temperature_weights_are_counts_to_the_power_tau():
    counts = {"a": 100, "b": 400, "c": 900}
    assert temperature_weights(counts, 0.5) == {"a": 10.0, "b": 20.0, "c": 30.0}
    assert temperature_weights(counts, 1.0) == {"a": 100.0, "b": 400.0, "c": 900.0}
    assert temperature_weights(counts, 0.0) == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_quotas_are_exact_for_square_root_weights():
    counts = {"a": 100, "b": 400, "c": 900}
    assert allocate(60, temperature_weights(counts, 0.5), counts) == {"a": 10, "b": 20, "c": 30}


def test_capped_subset_gives_its_excess_to_the_others():
    # weights 1 : 2 : 7 of 100 -> 10, 20, 70; "c" holds only 40, so 30 more go to a and b by weight 1:2
    counts = {"a": 1000, "b": 1000, "c": 40}
    weights = {"a": 1.0, "b": 2.0, "c": 7.0}
    assert allocate(100, weights, counts) == {"a": 20, "b": 40, "c": 40}


def test_largest_remainder_rounding_breaks_ties_by_key():
    counts = {"a": 10, "b": 10, "c": 10}
    # 10 / 3 each: floors 3+3+3, the one leftover row goes to the smallest key
    assert allocate(10, {"a": 1.0, "b": 1.0, "c": 1.0}, counts) == {"a": 4, "b": 3, "c": 3}


def test_budget_above_capacity_takes_everything():
    counts = {"a": 5, "b": 7}
    assert allocate(100, {"a": 1.0, "b": 1.0}, counts) == {"a": 5, "b": 7}


def test_quotas_always_sum_to_the_budget_and_respect_capacity():
    rng = random.Random(7)
    for _ in range(500):
        counts = {f"s{i}": rng.randint(0, 5000) for i in range(rng.randint(1, 12))}
        budget = rng.randint(0, sum(counts.values()) + 100)
        quotas = allocate(budget, temperature_weights(counts, rng.choice([0.0, 0.3, 0.5, 1.0])), counts)
        assert sum(quotas.values()) == min(budget, sum(counts.values()))
        assert all(0 <= quotas[k] <= counts[k] for k in counts)


def test_category_budgets_then_subset_temperature():
    counts = [("A", "src", "a1", 100), ("A", "src", "a2", 400), ("B", "src", "b1", 500)]
    budgets, quotas = plan_quotas(counts, {"budget": 100, "category_temperature": 1.0, "temperature": 0.5})
    assert budgets == {"A": 50, "B": 50}  # categories in proportion to their sizes 500 : 500
    assert quotas == {("A", "src", "a1"): 17, ("A", "src", "a2"): 33, ("B", "src", "b1"): 50}  # 50 * 10/30, 50 * 20/30
    explicit, quotas = plan_quotas(counts, {"category_budgets": {"A": 30, "B": 900}, "temperature": 0.5})
    assert explicit == {"A": 30, "B": 500}  # an explicit budget is capped at what the category has
    assert quotas[("A", "src", "a1")] == 10 and quotas[("A", "src", "a2")] == 20


def test_unit_hash_is_the_top_64_bits_of_sha256():
    digest = hashlib.sha256(b"salt:cauldron:ai2d:train:0").digest()
    assert hash_u64("salt:", "cauldron:ai2d:train:0") == int.from_bytes(digest[:8], "big")
    assert hash_u64("", "abc") == 13436514500253700074  # sha256("abc") = ba7816bf8f01cfea...
    assert unit_hash("", "abc") == 13436514500253700074 / TWO_64


def test_duckdb_hash_matches_python():
    ids = [f"cauldron:vqav2:train:{i}" for i in range(200)] + ["it's quoted", "ünïcode"]
    con = duckdb.connect()
    con.execute("create table t(sample_id varchar)")
    con.executemany("insert into t values (?)", [(i,) for i in ids])
    expression = hash_u64_sql("s'alt")
    got = dict(con.execute(f"select sample_id, {expression} from t").fetchall())
    assert got == {i: hash_u64("s'alt", i) for i in ids}


def test_tier_threshold_is_exact_at_the_boundary():
    assert tier_threshold(0.5) == 2**63
    assert tier_threshold(1.0) == TWO_64
    assert tier_threshold(0.0) == 0
    t = tier_threshold(0.25)
    assert t - 1 < 0.25 * TWO_64 <= t


def test_tiers_nest():
    ids = [f"sample:x:train:{i}" for i in range(20000)]
    tier25 = {i for i in ids if in_tier("redundancy-tier", i, 0.25)}
    tier50 = {i for i in ids if in_tier("redundancy-tier", i, 0.50)}
    assert tier25 < tier50


@pytest.mark.parametrize("level", [0.25, 0.5])
def test_tier_fraction_is_within_binomial_tolerance(level):
    n = 100_000
    hits = sum(in_tier("redundancy-tier", f"cauldron:s:train:{i}", level) for i in range(n))
    sd = math.sqrt(level * (1 - level) / n)
    assert abs(hits / n - level) < 4 * sd


def test_selection_and_tier_salts_are_independent():
    # among the rows a selection salt picks, the tier fraction stays at its level
    ids = [f"cauldron:s:train:{i}" for i in range(60000)]
    picked = sorted(ids, key=lambda i: hash_u64("select:42:", i))[:20000]
    fraction = sum(in_tier("redundancy-tier", i, 0.5) for i in picked) / len(picked)
    assert abs(fraction - 0.5) < 4 * math.sqrt(0.25 / len(picked))
