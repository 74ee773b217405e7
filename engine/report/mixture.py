"""The report's mixture section, read from a built mixture's ``manifest.json``: quotas against what each
subset had (temperature sampling made visible), the captioned fractions against their binomial band,
perturbed variants by kind, and the hashes that pin the build."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from engine.report.figures import Canvas, subplots
from engine.report.page import Note, Section, Table

Z95 = 1.959963984540054  # two-sided 95% normal quantile


class ReportError(ValueError):
    """An input the report cannot read; the message names the file and what is wrong."""


def read_manifest(folder: Path) -> tuple[dict, str]:
    """A mixture's manifest and the SHA-256 of its bytes (what ``engine build`` prints)."""
    from engine.recipes.output import ManifestError
    from engine.recipes.output import read_manifest as read

    try:
        manifest, sha256 = read(folder)
    except ManifestError as error:
        raise ReportError(f"--mixture: {error}") from None
    for key in ("plan", "rows", "recipe"):
        if not isinstance(manifest.get(key), dict):
            raise ReportError(f"{Path(folder) / 'manifest.json'}: key {key!r} missing or not an object; is this a mixture manifest?")
    return manifest, sha256


def subset_categories(con, keys: list[str]) -> dict[str, str]:
    """``source:subset`` -> category, from the store's samples where it has them, else from
    recipes/categories.yaml (the mapping ingest used)."""
    from engine.categories import subset_mapping

    known = dict(con.execute(
        "select distinct source || ':' || subset, category from report_facts"
    ).fetchall())
    mapping = subset_mapping()
    out = {}
    for key in keys:
        subset = key.split(":", 1)[-1]
        out[key] = known.get(key) or (mapping[subset].category if subset in mapping else "(unmapped)")
    return out


def binomial_band(p: float, n: int) -> tuple[float, float]:
    """The 95% band of a share of ``n`` independent draws that each land with probability ``p``."""
    if n == 0:
        return float("nan"), float("nan")
    half = Z95 * math.sqrt(p * (1 - p) / n)
    return max(0.0, p - half), min(1.0, p + half)


def mixture_section(folder: Path, con, versions: dict[str, int], canvas: Canvas) -> Section:
    manifest, manifest_sha = read_manifest(folder)
    plan, rows, recipe = manifest["plan"], manifest["rows"], manifest["recipe"]
    mixture = recipe.get("mixture", {})
    temperature = mixture.get("temperature")
    section = Section("mixture", f"Mixture {manifest.get('name', Path(folder).name)}",
                      f"{folder}: {rows.get('total', 0):,} rows of a budget of {rows.get('budget', 0):,}"
                      f" ({rows.get('captioned', 0):,} captioned). Inside a category, subset i is weighted N_i^τ with "
                      f"τ = {temperature}; categories share the budget with τ = {mixture.get('category_temperature', '–')}.")
    available, quotas = plan.get("available", {}), plan.get("quotas", {})
    keys = sorted(set(available) | set(quotas))
    category_of = subset_categories(con, keys)
    keys.sort(key=lambda k: (category_of[k], k))
    table = []
    for key in keys:
        members = [k for k in keys if category_of[k] == category_of[key]]
        total_n = sum(available.get(k, 0) for k in members)
        weights = {k: available.get(k, 0) ** temperature for k in members} if isinstance(temperature, (int, float)) else {}
        total_q = sum(quotas.get(k, 0) for k in members)
        n, q = available.get(key, 0), quotas.get(key, 0)
        table.append([category_of[key], key, n, q, q / n if n else float("nan"), n / total_n if total_n else float("nan"),
                      weights[key] / sum(weights.values()) if weights and sum(weights.values()) else float("nan"),
                      q / total_q if total_q else float("nan"), rows.get("by_subset", {}).get(key, 0)])
    section.blocks.append(Table(
        "Quota against available rows, per subset", ["category", "subset", "available", "quota", "taken",
                                                      "size share", "N^τ share", "quota share", "rows written"], table,
        "size share: the subset's share of its category's rows; N^τ share: its temperature weight's share; "
        "quota share: what it got. A subset capped at its size passes the rest to the others by weight."))
    if table:
        figure, axes = subplots(columns=2, width=6.2, height=max(3.4, 0.28 * len(table) + 1.2))
        y = np.arange(len(table))
        axes[0].barh(y + 0.2, [r[2] for r in table], 0.4, label="available", color="#b9c7d8")
        axes[0].barh(y - 0.2, [r[3] for r in table], 0.4, label="quota", color="#2a5d9f")
        axes[0].set_yticks(y, [f"{r[1]} ({r[0]})" for r in table], fontsize=7)
        axes[0].invert_yaxis()
        axes[0].set_xscale("log")
        axes[0].set_xlabel("rows (log)")
        axes[0].legend(fontsize=8)
        size_share, quota_share = [r[5] for r in table], [r[7] for r in table]
        axes[1].plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="proportional to size")
        axes[1].scatter(size_share, quota_share, s=18, label="subsets")
        axes[1].set_xlabel("share of the category's rows")
        axes[1].set_ylabel("share of the category's quota")
        axes[1].set_xlim(0, 1.02)
        axes[1].set_ylim(0, 1.02)
        axes[1].legend(fontsize=8)
        section.blocks.append(canvas.figure("mixture_quotas", figure, "Temperature sampling: quota vs available",
                                            "Right: points above the diagonal are small subsets that τ < 1 lifts above their size share."))
    budgets = plan.get("category_budgets", {})
    by_category = rows.get("by_category", {})
    captioned = rows.get("captioned_by_category", {})
    category_available: dict[str, int] = {}
    for key in keys:
        category_available[category_of[key]] = category_available.get(category_of[key], 0) + available.get(key, 0)
    section.blocks.append(Table("Budget per category", ["category", "available", "budget", "rows", "captioned"],
                                [[c, category_available.get(c, 0), budgets.get(c, 0), by_category.get(c, 0), captioned.get(c, 0)]
                                 for c in sorted(set(budgets) | set(by_category))]))
    section.blocks.extend(_fractions(recipe.get("redundancy"), plan, by_category, captioned, canvas))
    variants = rows.get("variants") or {}
    if variants:
        kinds = sorted(variants)
        section.blocks.append(Table("Perturbed variants by kind", ["kind", "rows"], [[k, variants[k]] for k in kinds]))
        figure, (axis,) = subplots(width=6.5, height=0.4 * len(kinds) + 1.3)
        axis.barh(kinds, [variants[k] for k in kinds])
        axis.bar_label(axis.containers[0], fmt="%d", fontsize=8)
        axis.set_xlabel("rows")
        section.blocks.append(canvas.figure("mixture_variants", figure, "Perturbed variants by kind"))
    stored = manifest.get("store_versions", {})
    changed = sorted(t for t in stored if versions.get(t) != stored[t])
    hashes = [["manifest.json sha256", manifest_sha], ["recipe sha256", manifest.get("recipe_sha256", "")]]
    hashes += [[f"store version: {t}", f"{stored[t]}" + (f" (now {versions.get(t, 'absent')})" if t in changed else "")]
               for t in sorted(stored)]
    hashes += [[f"file: {name}", digest] for name, digest in sorted(manifest.get("files", {}).items())]
    section.blocks.append(Table("Hashes and versions", ["what", "value"], hashes,
                                "Rebuilding the same recipe on these store versions gives these exact bytes."
                                + (f" The store has moved on since the build: {', '.join(changed)}." if changed else "")))
    return section


def _fractions(redundancy: dict | None, plan: dict, by_category: dict, captioned: dict, canvas: Canvas) -> list:
    """Captioned share per category against the binomial band of the rule's expected share: the tier
    level p (a hash tier is a coin with probability p per row), or, for the MI gate, the overall
    selected share (where a category-blind pick of the same size would land)."""
    if not redundancy or redundancy.get("mode") not in ("tier", "mi_gate"):
        return []
    if redundancy["mode"] == "tier":
        expected = float(redundancy.get("level", 0))
        label = f"tier level p = {expected}"
        note = ("A row is in the tier when u(id) < p, so each category's captioned share is a binomial draw around p; "
                "a share outside its band would mean the tier is not independent of the selection.")
    else:
        gate = plan.get("mi_gate", {})
        total = gate.get("rows") or sum(by_category.values())
        expected = gate.get("k", 0) / total if total else 0.0
        label = f"overall selected share k/N = {gate.get('k', 0):,}/{total:,}"
        note = (f"The gate captions the k rows with the highest u_v among {gate.get('valid', 0):,} u_v-dominant rows "
                "(τ = {}). A category outside its band is richer or poorer in image-unique information than "
                "a category-blind pick of the same size would be.".format(redundancy.get("tau")))
    rows = []
    for category in sorted(by_category):
        n, k = by_category[category], captioned.get(category, 0)
        low, high = binomial_band(expected, n)
        rows.append([category, n, k, k / n if n else float("nan"), low, high, bool(low <= k / n <= high) if n else None])
    blocks: list = [Table(f"Captioned share per category ({label})",
                          ["category", "rows", "captioned", "share", "band low", "band high", "inside"], rows, note)]
    if rows:
        figure, (axis,) = subplots(width=7.5, height=3.6)
        x = np.arange(len(rows))
        axis.bar(x, [r[5] - r[4] for r in rows], 0.6, bottom=[r[4] for r in rows], color="#cfd9e6", label="95% binomial band")
        axis.scatter(x, [r[3] for r in rows], color="#c0392b", zorder=3, label="captioned share")
        axis.axhline(expected, color="grey", lw=0.8, ls="--", label=label)
        axis.set_xticks(x, [r[0] for r in rows], rotation=25, ha="right", fontsize=8)
        axis.set_ylabel("share of rows captioned")
        axis.legend(fontsize=8)
        blocks.append(canvas.figure("mixture_fractions", figure, "Captioned share per category against its band"))
    else:
        blocks.append(Note("The mixture has no rows per category."))
    return blocks
