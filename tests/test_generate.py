"""Model-driven columns: backends, captions, self-validation, corruption."""

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import REPO, cauldron_parquet, killed_caption_run_resumes_exactly_once, png, qa
from engine.cli import main
from engine.models.backends import Request, TransformersBackend, load_backend, perplexity
from engine.stages.caption import caption
from engine.options import offered_letters
from engine.stages.corrupt import corrupt
from engine.stages.validate import precision_recall, validate, validation_report
from engine.models.tiny import (LLAVA_CHAT_TEMPLATE, QWEN_CHAT_TEMPLATE, build_tiny_llava_onevision, build_tiny_qwen2_5_vl,
                                 build_tiny_smolvlm)
from engine.stages.ingest import ingest
from engine.ingest.cauldron import ParquetFolderSource
from engine.recipes import RecipeError, build, load_recipe
from engine.store import Store


@pytest.fixture(scope="module")
def backend(tiny_vlm):
    return load_backend(tiny_vlm)


def image(color=(200, 30, 30), size=(40, 30)):
    return Image.new("RGB", size, color)


# -- backends ---------------------------------------------------------------------------------------------

def test_batched_generation_equals_one_at_a_time(backend):
    requests = [Request([image()], "Describe this image."),
                Request([image((0, 0, 200), (64, 64))], "what color is the shape? Answer with one word please.")]
    batched = backend.generate(requests, max_new_tokens=6)
    alone = [backend.generate([r], max_new_tokens=6)[0] for r in requests]
    assert [g.text for g in batched] == [g.text for g in alone]  # left padding does not change greedy output
    assert batched[0].tokens <= 6 and backend.generate(requests, max_new_tokens=6) == batched


def test_scores_are_the_log_probabilities_of_the_target(backend):
    requests = [Request([image()], "what color is the shape?"), Request([image((0, 200, 0))], "Is it round?")]
    targets = ["red circle", "No"]
    batched = backend.score(requests, targets)
    for request, target, scores in zip(requests, targets, batched):
        # reference: one unpadded forward over prompt + target, read the target's tokens
        processor, model = backend.processor, backend.model
        prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request.text}]}],
                                               add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[request.images], return_tensors="pt")
        target_ids = processor.tokenizer(target, add_special_tokens=False)["input_ids"]
        ids = torch.cat([inputs["input_ids"], torch.tensor([target_ids])], dim=1)
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"]).logits
        log_probs = torch.log_softmax(logits[0, -len(target_ids) - 1 : -1], dim=-1)
        expected = [float(log_probs[i, t]) for i, t in enumerate(target_ids)]
        assert scores == pytest.approx(expected, abs=1e-4)


def test_perplexity_is_exp_of_mean_negative_log_likelihood():
    assert perplexity([math.log(0.5), math.log(0.125)]) == pytest.approx(4.0)  # exp((ln 2 + ln 8) / 2)


def test_missing_model_fails_at_start_with_one_line(sample_store, tmp_path):
    store = str(sample_store.root)  # a real store: a missing one is refused first (test_hardening_store)
    result = CliRunner().invoke(main, ["--store", store, "caption", "--model", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "cannot load model" in result.output
    result = CliRunner().invoke(main, ["--store", store, "caption", "--model", "no-such-model"])
    assert result.exit_code == 2 and "neither a local folder nor a hub id" in result.output


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> str:
    return str(build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen")))


# architecture -> (builder, processor class, image processor class, chat template, processor attributes)
ARCHITECTURES = {
    "qwen2.5-vl": (build_tiny_qwen2_5_vl, "Qwen2_5_VLProcessor", "Qwen2VLImageProcessorPil", QWEN_CHAT_TEMPLATE,
                   {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}),
    "llava-onevision": (build_tiny_llava_onevision, "LlavaOnevisionProcessor", "LlavaOnevisionImageProcessorPil", LLAVA_CHAT_TEMPLATE,
                        {"image_token": "<image>", "video_token": "<video>", "num_image_tokens": 16,
                         "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}),
}


def images_only_backend(folder: str, processor_class: str, image_class: str, template: str, attributes: dict) -> TransformersBackend:
    """The folder's model with its processor minus the video part: transformers 5 builds that part only with
    torchvision, which the CPU setup here lacks, and images never use it. With torchvision: the user path."""
    import transformers

    try:
        import torchvision  # noqa: F401
    except ImportError:
        processor = getattr(transformers, processor_class).__new__(getattr(transformers, processor_class))
        processor.image_processor = getattr(transformers, image_class).from_pretrained(folder)
        processor.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        processor.chat_template = template
        for name, value in attributes.items():
            setattr(processor, name, value)
        processor.image_token_id = processor.tokenizer.convert_tokens_to_ids(attributes["image_token"])
        processor.video_token_id = processor.tokenizer.convert_tokens_to_ids(attributes["video_token"])
        return TransformersBackend(folder, processor=processor)
    return TransformersBackend(folder)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_other_architectures_batch_and_score_like_one_at_a_time(architecture, tmp_path):
    """Qwen2.5-VL (M-RoPE positions from per-token mm_token_type_ids, which must move with their tokens when
    a target is appended) and LLaVA-OneVision (anyres tiles): batched = one at a time = unpadded reference."""
    build, *processor = ARCHITECTURES[architecture]
    backend = images_only_backend(str(build(tmp_path / architecture)), *processor)
    requests = [Request([image()], "Describe this image."),
                Request([image((0, 0, 200), (64, 64))], "what color is the shape? Answer with one word please.")]
    assert [g.text for g in backend.generate(requests, 6)] == [backend.generate([r], 6)[0].text for r in requests]
    targets = ["red circle", "No"]
    batched = backend.score(requests, targets)
    for request, target, scores in zip(requests, targets, batched):
        assert scores == pytest.approx(backend.score([request], [target])[0], abs=1e-4)
        prompt = backend.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request.text}]}], add_generation_prompt=True)
        inputs = backend.processor(text=[prompt + target], images=[request.images], return_tensors="pt")
        n = len(backend.processor.tokenizer(target, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            log_probs = torch.log_softmax(backend.model(**inputs).logits[0, -n - 1 : -1], dim=-1)
        assert scores == pytest.approx([float(log_probs[i, t]) for i, t in enumerate(inputs["input_ids"][0, -n:])], abs=1e-4)


def test_a_model_whose_processor_needs_torchvision_fails_with_one_line(tiny_qwen, tmp_path):
    try:
        import torchvision  # noqa: F401
    except ImportError:
        Store(tmp_path / "s").append("runs", [])  # an (empty) store: a missing one is refused before the model
        result = CliRunner().invoke(main, ["--store", str(tmp_path / "s"), "caption", "--model", tiny_qwen])
        assert result.exit_code == 2 and result.output.count("\n") == 1 and "Torchvision" in result.output
    else:  # with torchvision the folder loads through the user path
        assert load_backend(tiny_qwen).generate([Request([image()], "Describe this image.")], 3)[0].tokens <= 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the vLLM backend needs a CUDA GPU")
def test_vllm_backend_matches_transformers(tmp_path):
    pytest.importorskip("vllm", reason="pip install -e '.[vllm]'")
    model = str(build_tiny_smolvlm(tmp_path / "tiny-h64", size="tiny-h64"))
    vllm_backend = load_backend(model, "vllm", dtype="float32")  # the same precision on both sides
    transformers_backend = load_backend(model, device="cuda", dtype="float32")
    requests = [Request([image()], "Describe this image."), Request([image()], "What color is the shape?")]
    assert [g.text for g in vllm_backend.generate(requests, 8)] == [g.text for g in transformers_backend.generate(requests, 8)]
    targets = ["No", "red circle"]
    for ours, theirs in zip(vllm_backend.score(requests, targets), transformers_backend.score(requests, targets)):
        assert ours == pytest.approx(theirs, abs=1e-2)


def test_vllm_backend_refuses_without_cuda(tiny_vlm):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        load_backend(tiny_vlm, "vllm")


# -- stages -----------------------------------------------------------------------------------------------

def test_caption_writes_each_row_once_and_rejects_what_it_cannot_use(small_store, backend):
    report = caption(small_store, backend, max_new_tokens=5, batch_size=4, progress=False)
    assert (report.written, report.rejected) == (13, 1)  # the caption prompt does not include the long question
    rejects = {r["sample_id"]: r["reason"] for r in small_store.arrow("rejects").to_pylist() if r["stage"] == "caption"}
    assert rejects == {"cauldron:vqav2:train:99": rejects["cauldron:vqav2:train:99"]}
    assert rejects["cauldron:vqav2:train:99"].startswith("image cannot be decoded")
    captions = small_store.arrow("captions").to_pylist()
    assert len({c["sample_id"] for c in captions}) == 13 == len(captions)
    assert {c["prompt_id"] for c in captions} == {"caption-v1"} and all(c["tokens"] <= 5 for c in captions)
    again = caption(small_store, backend, max_new_tokens=5, progress=False)
    assert again.written == 0  # done rows are skipped, and so is the row whose stored image never decodes
    assert (again.rejected, again.skipped_rejected) == (0, 1)


def test_a_failed_commit_stops_the_run_and_keeps_the_earlier_commits(small_store, backend, monkeypatch):
    """Results are written on a background thread; an error there must stop the run, not vanish."""
    append, calls = small_store.append, []

    def failing_append(table, rows):
        if table == "captions":
            calls.append(len(rows))
            if len(calls) == 2:
                raise OSError("disk full")
        return append(table, rows)

    monkeypatch.setattr(small_store, "append", failing_append)
    with pytest.raises(OSError, match="disk full"):
        caption(small_store, backend, max_new_tokens=3, batch_size=2, commit_rows=4, progress=False)
    assert calls[:2] == [4, 4] and small_store.arrow("captions").num_rows == 4


def test_caption_selection_by_tier_where_gate_and_limit(small_store, backend):
    from engine.recipes import in_tier

    caption(small_store, backend, tier=0.5, where="subset = 'vqav2' and sample_id != 'cauldron:vqav2:train:12'",
            max_new_tokens=3, progress=False)
    got = {c["sample_id"] for c in small_store.arrow("captions").to_pylist()}
    expected = {f"cauldron:vqav2:train:{i}" for i in range(12) if in_tier("redundancy-tier", f"cauldron:vqav2:train:{i}", 0.5)}
    assert got == expected
    small_store.append("gate", [{"sample_id": "cauldron:vqav2:train:3", "run_id": "gate-1", "gate_selected": True},
                                {"sample_id": "cauldron:vqav2:train:4", "run_id": "gate-1", "gate_selected": False}])
    report = caption(small_store, backend, gate=True, max_new_tokens=3, progress=False)
    assert report.written == (0 if "cauldron:vqav2:train:3" in expected else 1)
    assert caption(small_store, backend, where="sample_id < 'cauldron:vqav2:train:2'", limit=1, max_new_tokens=3,
                   progress=False).written <= 1


def test_a_killed_caption_run_finishes_every_row_exactly_once(tmp_path, tiny_vlm):
    killed_caption_run_resumes_exactly_once(tmp_path, tiny_vlm, 120)


def test_validate_writes_ppl_val_ppl_and_p_no(small_store, backend):
    report = validate(small_store, backend, batch_size=4, progress=False)
    assert (report.written, report.rejected) == (12, 2)
    rejects = {r["sample_id"]: r["reason"] for r in small_store.arrow("rejects").to_pylist() if r["stage"] == "validate"}
    assert rejects["cauldron:vqav2:train:99"].startswith("image cannot be decoded")
    assert "more than the model context of 256" in rejects["cauldron:vqav2:train:12"]
    rows = small_store.arrow("validation").to_pylist()
    no_tokens = backend.processor.tokenizer("No", add_special_tokens=False)["input_ids"]
    for row in rows:
        assert row["ppl"] > 1 and row["val_ppl"] > 1 and 0 < row["p_no"] < 1
        if len(no_tokens) == 1:
            assert row["val_ppl"] == pytest.approx(1 / row["p_no"], rel=1e-6)  # one token: PPL = 1 / p("No")
    assert validate(small_store, backend, progress=False).written == 0  # done rows are skipped


def test_precision_recall_on_a_hand_made_table():
    scores = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], float)
    clean = np.array([1, 1, 1, 0, 1, 0, 1, 0, 0, 0], bool)
    curve = precision_recall(scores, clean, percentiles=[25, 50, 100])
    # thresholds 3.25, 5.5, 10: predicted clean = scores below them (all rows at the 100th)
    assert curve["threshold"].tolist() == [3.25, 5.5, 10.0]
    assert curve["precision"].tolist() == pytest.approx([1.0, 4 / 5, 5 / 10])
    assert curve["recall"].tolist() == pytest.approx([3 / 5, 4 / 5, 1.0])


def test_corruption_is_deterministic_and_stays_in_the_answer_space(sample_store):
    first_run, counts = corrupt(sample_store, 0.4, seed=3, progress=False)
    second_run, again = corrupt(sample_store, 0.4, seed=3, progress=False)
    assert counts == again
    table = sample_store.arrow("corruption").to_pylist()
    first = {r["sample_id"]: r for r in table if r["run_id"] == first_run}
    second = {r["sample_id"]: r for r in table if r["run_id"] == second_run}
    assert {k: (v["corrupted"], v["replaced"]) for k, v in first.items()} == {k: (v["corrupted"], v["replaced"]) for k, v in second.items()}
    n = counts["rows"]
    assert n == 380 and abs(counts["corrupted"] / n - 0.4) < 4 * math.sqrt(0.24 / n)
    labels = {}
    for row in sample_store.arrow("samples", ["sample_id", "subset", "label"]).to_pylist():
        if row["label"] is not None:
            labels.setdefault(row["subset"], set()).add(row["label"])
    subset_of = {r["sample_id"]: r["subset"] for r in sample_store.arrow("samples", ["sample_id", "subset"]).to_pylist()}
    for row in first.values():
        if row["corrupted"]:
            assert row["replaced"] != row["original"]
            if row["kind"] == "option_swap":
                assert row["replaced"] in labels[subset_of[row["sample_id"]]]
        else:
            assert row["replaced"] is None and row["kind"] is None


def test_multiple_choice_letters_swap_to_another_offered_letter(tmp_path):
    assert offered_letters("Which is red?\nA. apple\nB. sky\nC. grass") == ["A", "B", "C"]
    assert offered_letters("Choose: (A) one (B) two") == ["A", "B"]
    rows = [([png()], qa("Which is red?\nA. apple\nB. sky\nC. grass\nAnswer with the letter.", "A", "scienceqa")) for _ in range(40)]
    cauldron_parquet(tmp_path / "src" / "scienceqa" / "train-00000-of-00001.parquet", rows)
    store = Store(tmp_path / "store")
    ingest(store, ParquetFolderSource(tmp_path / "src"), progress=False)
    _, counts = corrupt(store, 1.0, progress=False)
    flags = store.arrow("corruption").to_pylist()
    assert counts["option_swap"] == 40 and {f["replaced"] for f in flags} <= {"B", "C"}


def test_corrupted_mixture_and_val_ppl_post_training_recipe(small_store, backend, tmp_path):
    corrupt(small_store, 0.5, where="sample_id not in ('cauldron:vqav2:train:12', 'cauldron:vqav2:train:99')", progress=False)
    validate(small_store, backend, where="sample_id not in ('cauldron:vqav2:train:12', 'cauldron:vqav2:train:99')",
             corrupted=True, progress=False)
    flags = {r["sample_id"]: r for r in small_store.arrow("corruption").to_pylist()}
    recipe = load_recipe(REPO / "recipes" / "val_ppl_clean_25.yaml", [f"output.path={tmp_path / 'post'}"])
    manifest = build(small_store, recipe, progress=False).manifest
    val_ppl = sorted(r["val_ppl"] for r in small_store.arrow("validation").to_pylist())
    assert manifest["rows"]["total"] == sum(v <= np.quantile(val_ppl, 0.25) for v in val_ppl) == 3
    import pyarrow.parquet as pq

    for row in pq.read_table(tmp_path / "post" / "parquet").to_pylist():
        flag = flags[row["sample_id"]]
        expected = flag["replaced"] if flag["corrupted"] else flag["original"]
        assert row["texts"][0]["assistant"] == expected
    text = validation_report(small_store, backend.name, str(tmp_path / "pr.png"))
    assert "12 rows" in text and "Val_PPL precision" in text
    assert (tmp_path / "pr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_rewrite_corrupts_free_form_answers(small_store, backend):
    _, counts = corrupt(small_store, 1.0, where="sample_id in ('cauldron:vqav2:train:0', 'cauldron:vqav2:train:1')",
                        backend=backend, progress=False)
    assert counts["rows"] == 2
    flags = small_store.arrow("corruption").to_pylist()
    for flag in flags:
        if flag["corrupted"]:
            assert flag["kind"] == "model_rewrite" and flag["replaced"] != flag["original"]


def test_cli_caption_validate_corrupt_report(small_store, tiny_vlm, tmp_path):
    runner = CliRunner()
    store = ["--store", str(small_store.root)]
    captioned = runner.invoke(main, [*store, "caption", "--model", tiny_vlm, "--limit", "3", "--max-new-tokens", "3", "--quiet"])
    assert captioned.exit_code == 0 and "3 rows captioned" in captioned.output and "samples/s" in captioned.output
    corrupted = runner.invoke(main, [*store, "corrupt", "--fraction", "0.5", "--where", "sample_id < 'cauldron:vqav2:train:12'"])
    assert corrupted.exit_code == 0 and "answers corrupted" in corrupted.output
    scored = runner.invoke(main, [*store, "validate", "--model", tiny_vlm, "--where", "sample_id < 'cauldron:vqav2:train:12'",
                                  "--corrupted", "--quiet"])
    assert scored.exit_code == 0, scored.output
    report = runner.invoke(main, [*store, "validate", "--model", tiny_vlm, "--report", "--plot", str(tmp_path / "p.png")])
    assert report.exit_code == 0 and "PPL precision" in report.output and (tmp_path / "p.png").exists()


# -- facts for misleading descriptions ---------------------------------------------------------------------

def test_parse_facts_takes_lines_or_sentences():
    from engine.stages.facts import parse_facts

    assert parse_facts("1. Circles are round.\n2) Wheels are circles.\n\n- A third.", 2) == ["Circles are round.", "Wheels are circles."]
    assert parse_facts("Red is warm. Stop signs are red! Roses too.", 2) == ["Red is warm.", "Stop signs are red!"]
    assert parse_facts("  \n", 2) == []


def test_model_facts_are_cached_once_and_feed_misleading_descriptions(sample_store, backend, tmp_path):
    from engine.stages.facts import needed_options, write_facts

    options = needed_options(sample_store)
    perturb = "perturb={image_heavy: {misleading: 1.0}, facts_model: " + backend.name + "}"
    with pytest.raises(RecipeError, match=r"perturb.facts_model: the store has no facts from .*run `engine facts"):
        build(sample_store, load_recipe(REPO / "recipes" / "cauldron_r0.yaml", [f"output.path={tmp_path / 'out'}", perturb]), progress=False)
    first = write_facts(sample_store, backend, limit=10, progress=False)
    assert (first.options, first.written) == (10, 10)
    second = write_facts(sample_store, backend, limit=10, progress=False)  # the 10 done are not asked again
    cached = sample_store.arrow("option_facts").to_pylist()
    assert second.written == 10 and sorted(r["option"] for r in cached) == options[:20]
    model_facts = {r["option"]: r["facts"] for r in cached if r["facts"]}
    recipe = load_recipe(REPO / "recipes" / "cauldron_r0.yaml", [f"output.path={tmp_path / 'out'}", perturb])
    manifest = build(sample_store, recipe, progress=False).manifest
    with_model_facts = 0
    for row in pq.read_table(tmp_path / "out" / "parquet").to_pylist():
        if row["perturbation"] != "misleading":
            continue
        user = row["texts"][0]["user"]
        named = [o for o in model_facts if user.lower().startswith(f"the picture seems to describe a {o}. ")]
        if named:  # the sentence after the lead is one of the model's facts about that option
            after = user[len(f"The picture seems to describe a {named[0]}. "):]
            assert any(after.startswith(fact + " ") for fact in model_facts[named[0]])
            with_model_facts += 1
    assert with_model_facts > 0 and manifest["rows"]["variants"]["misleading_with_model_facts"] == with_model_facts


def test_facts_cli_names_bad_sql_and_reports_counts(small_store, tiny_vlm):
    base = ["--store", str(small_store.root), "facts", "--model", tiny_vlm, "--quiet"]
    result = CliRunner().invoke(main, [*base, "--where", "nonsense (("])
    assert result.exit_code == 2 and "--where: unbalanced '('" in result.output and result.output.count("\n") == 1
    result = CliRunner().invoke(main, [*base, "--where", "nonsense = 1"])
    assert result.exit_code == 2 and "--where: invalid SQL: Binder Error" in result.output and result.output.count("\n") == 1
    result = CliRunner().invoke(main, [*base, "--where", "true", "--per-option", "1"])
    assert result.exit_code == 0, result.output
    assert "facts for 3 of 3 options" in result.output  # vqav2 labels red/blue/green: each row's wrong one


# -- hardening: rejects once, model identity, which answer was scored ------------------------------------

def test_reruns_write_each_reject_once_and_skip_rows_whose_image_never_decodes(small_store, backend):
    for _ in range(3):
        caption(small_store, backend, max_new_tokens=2, progress=False)
    runs = [validate(small_store, backend, progress=False) for _ in range(3)]
    rejects = sorted((r["sample_id"], r["stage"], r["reason"].split(" (")[0].split(" needs")[0])
                     for r in small_store.arrow("rejects").to_pylist())
    assert rejects == [("cauldron:vqav2:train:12", "validate", "prompt"),  # the long question, once
                       ("cauldron:vqav2:train:99", "caption", "image cannot be decoded")]  # once, for every stage
    # validate never decoded row 99 again: a caption run found its image broken, and samples never change
    assert [(r.written, r.rejected, r.skipped_rejected) for r in runs] == [(12, 1, 1), (0, 1, 1), (0, 1, 1)]


def test_a_local_model_has_one_name_however_its_path_is_written(small_store, backend, tiny_vlm, monkeypatch):
    from pathlib import Path

    from engine.paths import model_identity

    folder = Path(tiny_vlm)
    monkeypatch.chdir(folder.parent)
    assert model_identity(folder.name) == model_identity(f"./{folder.name}") == model_identity(str(folder)) == str(folder.resolve())
    assert model_identity("HuggingFaceTB/SmolVLM-256M-Instruct") == "HuggingFaceTB/SmolVLM-256M-Instruct"
    where = "sample_id in ('cauldron:vqav2:train:0', 'cauldron:vqav2:train:1')"
    relative = load_backend(folder.name)
    assert caption(small_store, relative, where=where, max_new_tokens=2, progress=False).written == 2
    assert caption(small_store, backend, where=where, max_new_tokens=2, progress=False).written == 0  # same model
    assert {c["captioner"] for c in small_store.arrow("captions").to_pylist()} == {str(folder.resolve())}


def test_validate_records_which_answer_it_scored_and_the_report_compares_only_those(small_store, backend):
    where = "sample_id not in ('cauldron:vqav2:train:12', 'cauldron:vqav2:train:99')"
    assert validate(small_store, backend, where=where, progress=False).written == 12
    assert {r["answer_run"] for r in small_store.arrow("validation").to_pylist()} == {"original"}
    first, counts = corrupt(small_store, 0.5, where=where, seed=1, progress=False)
    flagged = {r["sample_id"] for r in small_store.arrow("corruption").to_pylist() if r["corrupted"]}
    assert 0 < counts["corrupted"] == len(flagged) < 12
    # before the corrupted answers are scored, the report must not count original-answer scores as corrupted
    text = validation_report(small_store, backend.name)
    assert text.startswith(f"{12 - len(flagged)} rows, {12 - len(flagged)} clean, 0 corrupted")
    assert f"left out: {len(flagged)} flagged rows" in text
    rescored = validate(small_store, backend, where=where, corrupted=True, progress=False)
    assert rescored.written == len(flagged)  # only the rows whose answer changed
    new = [r for r in small_store.arrow("validation").to_pylist() if r["run_id"] == rescored.run_id]
    assert {r["sample_id"] for r in new} == flagged and {r["answer_run"] for r in new} == {first}
    assert validate(small_store, backend, where=where, corrupted=True, progress=False).written == 0
    assert validate(small_store, backend, where=where, progress=False).written == 0  # originals are still scored
    text = validation_report(small_store, backend.name)
    assert text.startswith(f"12 rows, {12 - len(flagged)} clean, {len(flagged)} corrupted") and "left out" not in text
    # a new corruption run: rows it corrupts were scored on other answers (the original, or the first run's)
    corrupt(small_store, 0.5, where=where, seed=2, progress=False)
    second = {r["sample_id"] for r in small_store.arrow("corruption").to_pylist() if r["corrupted"] and r["run_id"] > first}
    text = validation_report(small_store, backend.name)
    assert text.startswith(f"{12 - len(second)} rows, {12 - len(second)} clean, 0 corrupted")
    assert validate(small_store, backend, where=where, corrupted=True, progress=False).written == len(second)


def test_a_validation_table_from_before_answer_run_reads_as_null_and_is_rescored(small_store, backend):
    import pyarrow as pa

    old = pa.table({"sample_id": ["cauldron:vqav2:train:0"], "model": [backend.name], "ppl": [2.0], "val_ppl": [3.0],
                    "p_no": [0.5], "run_id": ["validate-0"]})
    small_store.db.create_table("validation", old)  # the columns this table had before answer_run
    con, _ = small_store.connect()
    assert con.sql("select answer_run, val_ppl from facts where sample_id = 'cauldron:vqav2:train:0'").fetchall() == [(None, 3.0)]
    report = validate(small_store, backend, where="sample_id in ('cauldron:vqav2:train:0', 'cauldron:vqav2:train:1')",
                      progress=False)
    assert report.written == 2  # a score of an unknown answer is not taken as done
    rows = sorted((r["run_id"] == "validate-0", r["answer_run"]) for r in small_store.arrow("validation").to_pylist())
    assert rows == [(False, "original"), (False, "original"), (True, None)]
