"""Report sections over the store itself: what it holds, what was rejected, which runs wrote it, the
interactions, captions, validation scores and attributions. Every number is an aggregate computed in
DuckDB over the store's views (``Store.connect``); only counts and bins reach Python."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engine.hashing import hash_u64_sql, tier_threshold
from engine.report.figures import Canvas, draw_histogram, histogram, subplots
from engine.report.page import Gallery, Note, Section, Table

TERMS = ("r", "u_v", "u_t", "s")
TIER_SALT = "redundancy-tier"  # the recipes' default tier salt (engine/recipes/recipe.py)
TIER_LEVELS = (0.25, 0.5, 0.75)


def runs_sql(stage: str | None = None) -> str:
    """The runs table as a person reads it: stage, model, rows, start, duration and a short hash of the
    run's configuration (equal hashes = the same settings)."""
    from engine.sql import sql_literal

    model = ("coalesce(json_extract_string(config, '$.model'), json_extract_string(config, '$.captioner'), "
             "json_extract_string(config, '$.image_model') || ' + ' || json_extract_string(config, '$.text_model'))")
    where = f"where stage = {sql_literal(stage)}" if stage else ""
    return f"""select run_id, stage, {model} as model, rows, strftime(started, '%Y-%m-%d %H:%M:%S') as started,
        round(epoch(finished) - epoch(started), 1) as seconds, substr(sha256(config), 1, 12) as config_sha256
        from runs {where} order by run_id"""


def table_sizes(root: Path) -> dict[str, int]:
    """Bytes on disk of each ``{table}.lance`` folder (every version Lance keeps)."""
    sizes = {}
    for folder in sorted(root.glob("*.lance")):
        total = 0
        for directory, _, files in os.walk(folder):
            total += sum(os.path.getsize(os.path.join(directory, f)) for f in files)
        sizes[folder.name.removesuffix(".lance")] = total
    return sizes


def _mb(size: int) -> str:
    return f"{size / 2**20:,.2f} MB"


def store_section(store, con, versions: dict[str, int], canvas: Canvas) -> Section:
    """Rows per source / subset / category / split and task kind; rejects by stage and reason; table
    versions, rows and sizes on disk; the runs."""
    section = Section("store", "The store", f"{store.root}: every table, the rows it holds, and what could not be used.")
    sizes = table_sizes(store.root)
    counts = {name: store.dataset(name).count_rows() for name in versions}
    section.blocks.append(Table("Tables", ["table", "version", "rows", "size on disk"],
                                [[n, versions[n], counts[n], _mb(sizes.get(n, 0))] for n in sorted(versions)]))
    if counts.get("samples"):
        grouped = con.execute(
            """select source, subset, category, coalesce(task_kind, ''), split, count(*)
            from report_facts group by all order by all"""
        ).fetchall()
        splits = sorted({row[4] for row in grouped})
        table: dict[tuple, dict[str, int]] = {}
        for source, subset, category, kind, split, n in grouped:
            table.setdefault((source, subset, category, kind), {})[split] = n
        rows = [[*key, *(cells.get(s, 0) for s in splits), sum(cells.values())] for key, cells in table.items()]
        rows.append(["all", "", "", "", *(sum(r[4 + i] for r in rows) for i in range(len(splits))), sum(r[-1] for r in rows)])
        section.blocks.append(Table("Rows per source, subset, category, task kind and split",
                                    ["source", "subset", "category", "task kind", *splits, "total"], rows))
        by_category: dict[str, dict[str, int]] = {}
        for _, _, category, _, split, n in grouped:
            by_category.setdefault(category, {}).setdefault(split, 0)
            by_category[category][split] += n
        figure, (axis,) = subplots(width=7, height=0.3 * len(by_category) + 1.2)
        names = sorted(by_category, reverse=True)
        left = np.zeros(len(names))
        for split in splits:
            values = np.array([by_category[c].get(split, 0) for c in names])
            axis.barh(names, values, left=left, label=split)
            left += values
        axis.set_xlabel("rows")
        axis.legend(title="split", fontsize=8)
        section.blocks.append(canvas.figure("store_rows_by_category", figure, "Rows per category and split"))
        kinds = con.execute("select coalesce(task_kind, '(none)'), count(*) from report_facts group by 1 order by 1").fetchall()
        section.blocks.append(Table("Rows per task kind", ["task kind", "rows"], [list(k) for k in kinds]))
    if counts.get("rejects"):
        rejects = con.execute(
            """select stage, reason, count(*), array_to_string(list(sample_id order by sample_id)[1:3], ', ')
            from rejects group by stage, reason order by stage, count(*) desc, reason"""
        ).fetchall()
        section.blocks.append(Table("Rejects by stage and reason", ["stage", "reason", "rows", "example ids"],
                                    [list(r) for r in rejects]))
    if counts.get("runs"):
        runs = con.execute(runs_sql()).fetchall()
        shown = runs[-20:]
        note = f"the newest 20 of {len(runs)}; `engine runs` lists them all" if len(runs) > 20 else ""
        section.blocks.append(Table("Runs", ["run", "stage", "model", "rows", "started (UTC)", "seconds", "config sha256"],
                                    [list(r) for r in shown], note))
    return section


def light_facts(con) -> None:
    """Materialise ``report_facts``: one row per sample with the ``facts`` columns the report reads (no
    images, no turns). The view joins four tables with a window each; every query would pay for that
    again, while this temp table is built once, inside DuckDB."""
    con.execute(
        """create or replace temp table report_facts as
        select sample_id, source, subset, split, coalesce(category, '(unmapped)') as category, task_kind,
               r, u_v, u_t, s, dominant, gate_valid, gate_selected, corrupted, corruption_run
        from facts"""
    )


def interactions_section(con, counts: dict[str, int], canvas: Canvas) -> Section | None:
    """Per category the distributions of r, u_v, u_t, s and the share of each dominant term; the MI
    gate's selection against the redundancy tiers."""
    if not counts.get("interactions") and not counts.get("gate"):
        return None
    section = Section("interactions", "Interactions",
                      "Pointwise R, U_V, U_T and S in nats (the newest score run per sample, as recipes see them).")
    figure, axes = subplots(columns=2, rows=2, width=5.6, height=3.3)
    drawn = False
    for axis, term in zip(axes, TERMS):
        result = histogram(con, "report_facts", term, "category")
        if result is None:
            axis.set_visible(False)
            continue
        drawn = True
        draw_histogram(axis, *result)
        axis.set_xlabel(f"{term} (nats)")
        axis.set_title(term)
    if drawn:
        axes[0].legend(fontsize=7)
        section.blocks.append(canvas.figure("interactions_terms", figure, "Distributions of r, u_v, u_t and s per category",
                                            "Each line is one category's rows as shares; bins span the 0.5th–99.5th percentile."))
    else:
        import matplotlib.pyplot as plt

        plt.close(figure)
    dominant = con.execute(
        "select category, dominant, count(*) from report_facts where dominant is not null group by all order by all"
    ).fetchall()
    if dominant:
        shares: dict[str, dict[str, int]] = {}
        for category, term, n in dominant:
            shares.setdefault(category, {})[term] = n
        rows = []
        for category, by_term in shares.items():
            total = sum(by_term.values())
            rows.append([category, total, *(by_term.get(t, 0) / total for t in TERMS)])
        section.blocks.append(Table("Share of rows by dominant term", ["category", "rows", *TERMS], rows))
        figure, (axis,) = subplots(width=7, height=0.3 * len(rows) + 1.2)
        left = np.zeros(len(rows))
        for index, term in enumerate(TERMS):
            values = np.array([row[2 + index] for row in rows])
            axis.barh([row[0] for row in rows], values, left=left, label=term)
            left += values
        axis.set_xlim(0, 1)
        axis.set_xlabel("share of rows")
        axis.legend(ncols=4, fontsize=8, loc="lower right")
        section.blocks.append(canvas.figure("interactions_dominant", figure, "Dominant term per category"))
    gate = con.execute(
        "select count_if(gate_selected), count_if(gate_valid), count(gate_selected) from report_facts"
    ).fetchone()
    if gate[2]:
        selected, valid, gated = gate
        # the tier hash once per row, every level counted in the same pass
        levels = ", ".join(f"count_if(h < {tier_threshold(p)}::HUGEINT), count_if(gate_selected and h < {tier_threshold(p)}::HUGEINT)"
                           for p in TIER_LEVELS)
        tiers = con.execute(
            f"select {levels} from (select gate_selected, {hash_u64_sql(TIER_SALT)} as h from report_facts where gate_selected is not null)"
        ).fetchone()
        rows = []
        for index, level in enumerate(TIER_LEVELS):
            tier_rows, tier_selected = tiers[2 * index], tiers[2 * index + 1]
            rows.append([level, tier_rows, tier_rows / gated, tier_selected, tier_selected / selected if selected else float("nan")])
        section.blocks.append(Table(
            "The MI gate's selection against the redundancy tiers",
            ["tier p", "gated rows in tier", "share of gated rows", "selected in tier", "share of the selection"], rows,
            f"{gated:,} rows went through the newest gate run; {valid:,} are u_v-dominant (valid) and {selected:,} are "
            f"selected. A tier holds the rows with u(id) < p (salt '{TIER_SALT}'): it picks by hash, the gate by u_v, so "
            "a selection share near p means the two choose independently of each other."))
        per_category = con.execute(
            """select category, count(gate_selected), count_if(gate_valid), count_if(gate_selected)
            from report_facts where gate_selected is not null group by 1 order by 1"""
        ).fetchall()
        section.blocks.append(Table("Gate per category", ["category", "gated rows", "valid", "selected", "selected share"],
                                    [[*r, r[3] / r[1] if r[1] else float("nan")] for r in per_category]))
        result = histogram(con, "report_facts", "u_v",
                           "case when gate_selected then 'selected' when gate_valid then 'valid, not selected' else 'not valid' end",
                           where="gate_selected is not null")
        if result is not None:
            figure, (axis,) = subplots(width=7, height=3.4)
            draw_histogram(axis, *result, density=False)
            axis.set_xlabel("u_v (nats)")
            axis.legend(fontsize=8)
            section.blocks.append(canvas.figure("interactions_gate_u_v", figure, "u_v of the rows the gate selected and left"))
    return section


def captions_section(store, con, counts: dict[str, int], canvas: Canvas, examples: int = 6) -> Section | None:
    """Coverage per captioner and category, caption length distribution, a few examples with their images."""
    if not counts.get("captions"):
        return None
    section = Section("captions", "Captions", "Which rows have a caption, from which captioner, and what captions look like.")
    # one scan of the caption text; counts and lengths then come from this narrow temp table
    con.execute(
        """create or replace temp table report_captions as
        select sample_id, captioner, length(caption) as characters, tokens, seconds
        from captions where caption is not null and caption <> ''"""
    )
    coverage = con.execute(
        """with totals as (select category, count(*) as n from report_facts group by 1),
        covered as (select c.captioner, f.category, count(distinct c.sample_id) as k
                    from report_captions c join report_facts f using (sample_id) group by all)
        select t.category, t.n, c.captioner, coalesce(c.k, 0) from totals t left join covered c using (category)
        order by t.category, c.captioner"""
    ).fetchall()
    captioners = sorted({row[2] for row in coverage if row[2] is not None})
    by_category: dict[str, list] = {}
    for category, n, captioner, k in coverage:
        row = by_category.setdefault(category, [category, n] + [0.0] * len(captioners))
        if captioner is not None:
            row[2 + captioners.index(captioner)] = k / n
    section.blocks.append(Table("Coverage: share of each category's rows with a caption",
                                ["category", "rows", *captioners], list(by_category.values())))
    result = histogram(con, "report_captions", "characters", "captioner", discrete=True)
    if result is not None:
        figure, (axis,) = subplots(width=7, height=3.4)
        draw_histogram(axis, *result)
        axis.set_xlabel("caption length (characters)")
        axis.legend(fontsize=8)
        section.blocks.append(canvas.figure("captions_length", figure, "Caption length per captioner"))
    stats = con.execute(
        """select captioner, count(*), avg(characters), median(characters), max(characters), avg(tokens), sum(seconds)
        from report_captions group by 1 order by 1"""
    ).fetchall()
    section.blocks.append(Table("Captions per captioner",
                                ["captioner", "captions", "mean characters", "median characters", "max characters", "mean tokens", "seconds"],
                                [list(r) for r in stats]))
    top = max(stats, key=lambda r: (r[1], r[0]))[0] if stats else None
    if top is not None and counts.get("samples"):
        from engine.sql import sql_literal, sql_list

        # one example per category (its smallest captioned id), so the gallery spans the data
        firsts = con.execute(
            f"""select f.category, min(c.sample_id) from report_captions c join report_facts f using (sample_id)
            where c.captioner = {sql_literal(top)} group by f.category order by f.category limit {examples}"""
        ).fetchall()
        texts = dict(con.execute(
            f"""select sample_id, min(caption) from captions where captioner = {sql_literal(top)} and caption <> ''
            and sample_id in {sql_list(i for _, i in firsts) if firsts else "(NULL)"} group by 1"""
        ).fetchall())
        chosen = [(sample_id, category, texts[sample_id]) for category, sample_id in firsts]
        images = {}
        if chosen:
            # a filtered Lance scan reads the image column of these few rows only
            found = store.dataset("samples").to_table(columns=["sample_id", "images"],
                                                      filter=f"sample_id IN {sql_list(r[0] for r in chosen)}")
            images = {i: (imgs[0] if imgs else None) for i, imgs in zip(found.column("sample_id").to_pylist(),
                                                                        found.column("images").to_pylist())}
        items = []
        for index, (sample_id, category, caption) in enumerate(chosen):
            thumb = canvas.thumbnail(f"caption_example_{index}", images[sample_id]) if images.get(sample_id) else None
            if thumb is not None:
                items.append({**thumb, "heading": f"{category} · {sample_id}", "text": caption})
        if items:
            section.blocks.append(Gallery(f"Examples from {top}", items))
    return section


def validation_section(con, counts: dict[str, int], canvas: Canvas) -> Section | None:
    """PPL and Val_PPL distributions per model; where corruption flags exist, the precision/recall of
    "score below a percentile => clean" for both (``engine validate --report``'s computation)."""
    if not counts.get("validation"):
        return None
    from engine.stages.validate import score_curves

    section = Section("validation", "Validation",
                      "PPL: perplexity of the answer given image and question. Val_PPL: perplexity of the model saying "
                      "\"No\" when asked whether the answer is wrong (lower = more likely clean).")
    figure, axes = subplots(columns=2, width=5.6, height=3.4)
    for axis, (column, name) in zip(axes, (("ppl", "PPL"), ("val_ppl", "Val_PPL"))):
        result = histogram(con, "validation", column, "model", log=True)
        if result is None:
            axis.set_visible(False)
            continue
        draw_histogram(axis, *result)
        axis.set_xlabel(f"log10 {name}")
        axis.set_title(name)
        axis.legend(fontsize=7)
    section.blocks.append(canvas.figure("validation_scores", figure, "PPL and Val_PPL per model"))
    models = [m for (m,) in con.execute("select distinct model from validation order by 1").fetchall()]
    rows = []
    for index, model in enumerate(models):
        curves, clean, _ = score_curves(con, model, "report_facts")
        if not len(clean):
            continue
        chance = float(clean.mean())
        figure, (axis,) = subplots(width=6, height=4)
        for name, style in (("Val_PPL", "-"), ("PPL", ":")):
            axis.plot(curves[name]["recall"], curves[name]["precision"], style, label=name)
        axis.axhline(chance, color="grey", lw=0.9, ls="--", label=f"chance ({chance:.2f} clean)")
        axis.set_xlabel("recall (clean rows found)")
        axis.set_ylabel("precision (kept rows that are clean)")
        axis.set_ylim(0, 1.02)
        axis.set_xlim(0, 1.02)
        axis.legend(fontsize=8)
        section.blocks.append(canvas.figure(
            f"validation_precision_recall_{index}", figure, f"Precision/recall of score below threshold ⇒ clean: {model}",
            f"{len(clean):,} rows with a corruption flag: {int(clean.sum()):,} clean, {int((~clean).sum()):,} corrupted."))
        at = {p: int(np.searchsorted(curves["PPL"]["percentile"], p)) for p in (25, 50, 75)}
        rows.append([model, len(clean), int(clean.sum()), int((~clean).sum()),
                     *(curves[n]["precision"][at[p]] for p in at for n in ("PPL", "Val_PPL"))])
    if rows:
        section.blocks.append(Table("Precision when keeping the lowest-scoring rows",
                                    ["model", "rows", "clean", "corrupted", "PPL p25", "Val_PPL p25", "PPL p50", "Val_PPL p50",
                                     "PPL p75", "Val_PPL p75"], rows,
                                    "pN: keep the rows scoring below the N-th percentile; the cell is the share of kept rows that are clean."))
    elif not counts.get("corruption"):
        section.blocks.append(Note("No corruption flags yet (`engine corrupt`), so no precision/recall."))
    return section


ATTRIBUTION_TERMS = ("R", "U_I", "U_T", "S")


def attributions_section(con, counts: dict[str, int], canvas: Canvas) -> Section | None:
    """R, U_I, U_T, S and the contribution shares per layer, one figure per (model, adapter, selection)."""
    if not counts.get("attributions"):
        return None
    section = Section("attributions", "Attributions",
                      "How much of a layer's representation comes uniquely from the image (U_I) or the text (U_T), "
                      "redundantly (R) or synergistically (S); CT and CI are the text and image contribution shares.")
    keys = con.execute(
        "select distinct model, coalesce(adapter, ''), coalesce(selection, '') from attributions order by all"
    ).fetchall()
    from engine.sql import sql_literal

    for index, (model, adapter, selection) in enumerate(keys):
        rows = con.execute(
            f"""select layer, max(n), avg(R), avg(U_I), avg(U_T), avg(S), avg(CT), avg(CI) from attributions
            where model = {sql_literal(model)} and coalesce(adapter, '') = {sql_literal(adapter)}
            and coalesce(selection, '') = {sql_literal(selection)} group by layer order by layer"""
        ).fetchall()
        label = " · ".join(x for x in (model, adapter and f"adapter {adapter}", selection and f"rows {selection}") if x)
        figure, axes = subplots(columns=2, width=5.4, height=3.4)
        layers = [r[0] for r in rows]
        for offset, term in enumerate(ATTRIBUTION_TERMS):
            axes[0].plot(layers, [r[2 + offset] for r in rows], marker="o", ms=3, label=term)
        axes[0].set_xlabel("layer")
        axes[0].set_ylabel("information")
        axes[0].legend(fontsize=8)
        for offset, term in enumerate(("CT", "CI")):
            axes[1].plot(layers, [r[6 + offset] for r in rows], marker="o", ms=3, label=term)
        axes[1].set_xlabel("layer")
        axes[1].set_ylabel("share")
        axes[1].set_ylim(0, 1)
        axes[1].legend(fontsize=8)
        section.blocks.append(canvas.figure(f"attributions_{index}", figure, label))
        section.blocks.append(Table(f"Per layer: {label}", ["layer", "n", *ATTRIBUTION_TERMS, "CT", "CI"], [list(r) for r in rows]))
    return section
