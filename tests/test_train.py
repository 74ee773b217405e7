"""engine train: labels, the consistency divergences, masked PGD, group batches, every method on the three
architectures, overfitting, kill/resume, and the adapter in engine eval."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from conftest import REPO, png
from engine.cli import main
from engine.recipes.output import MIXTURE_SCHEMA
from engine.train import TrainConfig, train
from engine.train.data import (ChatEncoder, GroupBatchSampler, GroupCollator, IGNORE, prepare_examples, read_mixture)
from engine.train.objective import (consistency, embedding_perturbation, js_divergence, kl_divergence, merged_embeddings,
                                    pgd_perturbation, without_vision)
from engine.train.trainer import _image_token_id, load_model, lora_target_regex, prepare_model
from test_generate import ARCHITECTURES, images_only_backend

COLORS = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 200, 30), "gray": (128, 128, 128)}


def row(sample_id, question, answer, task_kind="vqa", color="red", origin=None, perturbation=None, turns=None):
    return {"images": [{"bytes": png(16, 16, COLORS[color]), "path": None}],
            "texts": turns or [{"user": question, "assistant": answer, "source": "test"}], "sample_id": sample_id,
            "source": "test", "subset": "shapes", "category": "Real-world VQA", "task_kind": task_kind, "label": None,
            "captioned": False, "origin_id": origin, "perturbation": perturbation}


def write_mixture(folder: Path, rows: list[dict]) -> Path:
    """A mixture folder as `engine build` writes it (one Parquet shard and a manifest)."""
    (folder / "parquet").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=MIXTURE_SCHEMA), folder / "parquet" / "part-00000.parquet")
    (folder / "manifest.json").write_text(json.dumps({"recipe_sha256": "0" * 64, "rows": {"total": len(rows)}}))
    return folder


def small_rows(n_groups: int = 4) -> list[dict]:
    """Originals of each task kind, with a variant after each non-VQA original."""
    rows, kinds = [], ["image_heavy", "text_heavy", "vqa"]
    colors = list(COLORS)
    for i in range(n_groups):
        kind, color = kinds[i % 3], colors[i % 4]
        rows.append(row(f"t:{i}", "what color is the shape?", color, kind, color))
        if kind == "image_heavy":
            rows.append(row(f"t:{i}#misleading", "The picture seems to describe a blue shape. what color is the shape?", color,
                            kind, color, origin=f"t:{i}", perturbation="misleading"))
        elif kind == "text_heavy":
            rows.append(row(f"t:{i}#black", "what color is the shape?", color, kind, "gray", origin=f"t:{i}", perturbation="black"))
    return rows


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> Path:
    return write_mixture(tmp_path_factory.mktemp("mixture"), small_rows(6))


@pytest.fixture(scope="module")
def smol(tiny_vlm):
    model, processor = load_model(tiny_vlm, "cpu", "float32")
    return model, processor


def encoder_for(model, processor, max_length=256):
    return ChatEncoder(processor, _image_token_id(model), max_length)


# -- labels -----------------------------------------------------------------------------------------------

def test_labels_are_exactly_the_answer_tokens_and_the_end_token_of_every_turn(smol):
    model, processor = smol
    tokenizer = processor.tokenizer
    turns = [{"user": "what color is the shape?", "assistant": "red circle", "source": "t"},
             {"user": "Is it round?", "assistant": "No", "source": "t"}]
    from PIL import Image

    encoded = encoder_for(model, processor).encode([Image.new("RGB", (16, 16), (200, 30, 30))], turns)
    ids, labels = encoded["input_ids"][0], encoded["labels"]
    # by hand: the tiny template renders "<|im_start|>User:<image>Q1<end_of_utterance>\nAssistant:A1<end_of_utterance>\n..."
    # and "Assistant:" is the generation prompt, so the pieces are tokenised apart and the answers marked
    tok = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eou = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    head = processor(text=["<|im_start|>User:<image>what color is the shape?<end_of_utterance>\nAssistant:"],
                     images=[[Image.new("RGB", (16, 16))]], return_tensors="pt")["input_ids"][0].tolist()
    pieces = [(head, False), (tok("red circle") + [eou], True), (tok("\nUser:Is it round?") + [eou] + tok("\nAssistant:"), False),
              (tok("No") + [eou], True), (tok("\n"), False)]
    expected_ids = [t for piece, _ in pieces for t in piece]
    expected_mask = [flag for piece, flag in pieces for _ in piece]
    assert ids.tolist() == expected_ids
    assert (labels != IGNORE).tolist() == expected_mask
    assert labels[labels != IGNORE].tolist() == [t for piece, flag in pieces if flag for t in piece]
    # the question mask covers both questions' tokens and nothing else
    assert tokenizer.decode(ids[encoded["user_mask"]]) == "what color is the shape?Is it round?"
    assert int(encoded["image_mask"].sum()) == int((ids == _image_token_id(model)).sum()) > 0


def test_overlong_rows_and_rows_without_answer_are_skipped_and_counted(smol, tmp_path):
    model, processor = smol
    rows = small_rows(3) + [row("long", "word " * 300, "red"), row("empty", "what color?", "  ")]
    table, manifest, sha = read_mixture(write_mixture(tmp_path / "m", rows))
    examples, _ = prepare_examples(table, encoder_for(model, processor, max_length=256))
    assert dict(examples.skipped) == {"longer than max_length (256 tokens)": 1, "a turn has no answer": 1}
    assert len(examples.rows) == len(rows) - 2 and len(sha) == 64


def test_a_folder_without_manifest_fails_with_one_line(tmp_path, tiny_vlm):
    (tmp_path / "m").mkdir()
    result = CliRunner().invoke(main, ["train", str(tmp_path / "m"), "--model", tiny_vlm, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "no manifest.json" in result.output


def test_a_model_that_cannot_load_and_unknown_combinations_fail_with_one_line(mixture, tmp_path, tiny_vlm):
    result = CliRunner().invoke(main, ["train", str(mixture), "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "cannot load model" in result.output
    result = CliRunner().invoke(main, ["train", str(mixture), "--model", tiny_vlm, "--method", "sft", "--pgd-steps", "3",
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output == "error: --pgd-steps has no effect with --method sft\n"
    result = CliRunner().invoke(main, ["train", str(mixture), "--model", tiny_vlm, "--full", "--lora-r", "4", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--lora-r has no effect with --full" in result.output


def test_help_lists_every_knob_with_its_paper_default():
    text = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    for knob, default in [("--lr", "5e-05"), ("--warmup", "0.03"), ("--epochs", "1.0"), ("--effective-batch", "64"),
                          ("--consistency-weight", "0.01"), ("--temperature", "1.0"), ("--pgd-alpha", "0.1"),
                          ("--pgd-epsilon", "0.001"), ("--pgd-steps", "2"), ("--max-steps", "-1")]:
        assert knob in text and f"default: {default}]" in text.split(knob + " ", 1)[1].split(" --", 1)[0], knob


# -- divergences ------------------------------------------------------------------------------------------

def test_js_equals_a_hand_computation_is_zero_on_identical_logits_and_symmetric():
    p, q = [0.5, 0.5], [0.9, 0.1]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    hand = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m)) + 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m))
    p_logits, q_logits = torch.log(torch.tensor([p])), torch.log(torch.tensor([q]))
    assert float(js_divergence(p_logits, q_logits)[0]) == pytest.approx(hand, rel=1e-6)
    z = torch.randn(5, 11)
    assert torch.allclose(js_divergence(z, z), torch.zeros(5), atol=1e-7)
    w = torch.randn(5, 11)
    assert torch.allclose(js_divergence(z, w), js_divergence(w, z), atol=1e-7)
    assert torch.allclose(js_divergence(z, w, temperature=2.0), js_divergence(z / 2, w / 2), atol=1e-7)
    assert bool((js_divergence(z, w) <= math.log(2) + 1e-6).all())


def test_kl_matches_torch():
    z, w = torch.randn(7, 13), torch.randn(7, 13)
    expected = F.kl_div(F.log_softmax(w, -1), F.log_softmax(z, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl_divergence(z, w), expected, atol=1e-6)


def test_consistency_averages_over_tokens_then_over_pairs_with_a_stop_gradient_anchor():
    a, b = torch.randn(2, 9, requires_grad=True), torch.randn(2, 9, requires_grad=True)
    c, d = torch.randn(1, 9), torch.randn(1, 9)
    value = consistency([(a, b), (c, d)])
    expected = (js_divergence(a, b).mean() + js_divergence(c, d).mean()) / 2
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-6)
    value.backward()
    assert a.grad is None and b.grad is not None and float(b.grad.abs().sum()) > 0
    a2 = a.detach().clone().requires_grad_(True)
    consistency([(a2, b)], anchor_gradient=True).backward()
    assert a2.grad is not None


# -- PGD --------------------------------------------------------------------------------------------------

def _batch(model, processor, rows, adversarial=True):
    table = pa.Table.from_pylist(rows, schema=MIXTURE_SCHEMA)
    examples, dataset = prepare_examples(table, encoder_for(model, processor))
    collator = GroupCollator(examples, processor.tokenizer.pad_token_id, adversarial)
    return collator([dataset[i] for i in range(len(dataset))]), examples


@pytest.mark.parametrize("kind", ["text_heavy", "image_heavy"])
def test_pgd_changes_only_the_masked_embeddings_and_stays_in_the_epsilon_ball(smol, kind):
    model, processor = smol
    batch, _ = _batch(model, processor, [row("a", "what color is the shape?", "red", kind), row("b", "what is it?", "blue circle", kind, "blue")])
    inputs, labels, mask = batch["adv_inputs"], batch["adv_labels"], batch["adv_mask"]
    ids = inputs["input_ids"]
    if kind == "text_heavy":
        assert torch.equal(mask, ids == _image_token_id(model))
    else:  # the questions' tokens only: no answer, template or padding token
        assert processor.tokenizer.decode(ids[0][mask[0]]) == "what color is the shape?"
        assert not bool((mask & (labels != IGNORE)).any()) and not bool((mask & (inputs["attention_mask"] == 0)).any())
    torch.manual_seed(0)
    epsilon = 1e-3
    delta, stats = pgd_perturbation(model, inputs, labels, mask, epsilon, alpha=10.0, steps=3)
    bound = float(torch.tensor(epsilon))  # epsilon in float32
    assert float(delta.abs().max()) <= bound and stats.delta_max <= bound
    assert bool((delta[~mask] == 0).all())
    seen = []

    def capture():  # registered after the perturbation's hook, so it sees what the language model receives
        return model.get_decoder().register_forward_pre_hook(lambda m, a, k: seen.append(k["inputs_embeds"].detach().clone()),
                                                             with_kwargs=True)

    with torch.no_grad():
        handle = capture()
        model(**inputs)
        handle.remove()
        with embedding_perturbation(model, delta, mask):
            handle = capture()
            model(**inputs)
            handle.remove()
        # the trainer's path: merged embeddings computed once, later passes without the pixels
        with embedding_perturbation(model, delta, mask, merged_embeddings(model, inputs)):
            handle = capture()
            cached_logits = model(**without_vision(inputs)).logits
            handle.remove()
        with embedding_perturbation(model, delta, mask):
            full_logits = model(**inputs).logits
    clean, perturbed, cached = seen
    assert torch.equal(perturbed, cached) and torch.allclose(full_logits, cached_logits, atol=1e-6)
    assert torch.equal(clean[~mask], perturbed[~mask])  # bitwise
    assert not torch.equal(clean[mask], perturbed[mask])


def test_vqa_rows_are_not_perturbed_nor_duplicated(smol):
    model, processor = smol
    batch, _ = _batch(model, processor, [row("v", "what color?", "red", "vqa"), row("t", "what color?", "red", "text_heavy"),
                                         row("i", "what color?", "red", "image_heavy")])
    assert batch["adv_rows"].tolist() == [1, 2] and len(batch["adv_inputs"]["input_ids"]) == 2
    only_vqa, _ = _batch(model, processor, [row("v", "what color?", "red", "vqa")])
    assert only_vqa["adv_rows"].tolist() == [] and "adv_inputs" not in only_vqa


# -- groups -----------------------------------------------------------------------------------------------

def test_an_original_and_its_variants_share_a_micro_batch_in_a_seeded_order(smol, mixture):
    model, processor = smol
    table, _, _ = read_mixture(mixture)
    examples, _ = prepare_examples(table, encoder_for(model, processor))
    ids = table.column("sample_id").to_pylist()
    assert sum(o >= 0 for o in examples.origin) == 4
    for groups_per_batch in (1, 2, 3):
        batches = list(GroupBatchSampler(examples.groups, groups_per_batch, seed=7))
        where = {i: b for b, batch in enumerate(batches) for i in batch}
        assert sorted(where) == list(range(len(examples.rows)))
        for index, origin in enumerate(examples.origin):
            if origin >= 0:
                assert where[index] == where[origin] and ids[examples.rows[origin]] == ids[examples.rows[index]].split("#")[0]
    assert list(GroupBatchSampler(examples.groups, 2, seed=7)) == list(GroupBatchSampler(examples.groups, 2, seed=7))
    assert list(GroupBatchSampler(examples.groups, 2, seed=7)) != list(GroupBatchSampler(examples.groups, 2, seed=8))


def test_lora_adapts_the_language_model_only(smol):
    model, _ = smol
    pattern = lora_target_regex(model, ("q_proj", "v_proj"))
    import re

    matched = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
    assert matched and all(n.startswith("model.text_model.") for n in matched)
    assert any(n.startswith("model.vision_model.") and n.endswith("q_proj") for n, _ in model.named_modules())


# -- training ---------------------------------------------------------------------------------------------

def _processor(architecture, folder):
    if architecture == "smolvlm":
        return None
    _, *processor = ARCHITECTURES[architecture]
    return images_only_backend(folder, *processor).processor


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_vlm):
    folders = {"smolvlm": tiny_vlm}
    for name, (build, *_) in ARCHITECTURES.items():
        folders[name] = str(build(tmp_path_factory.mktemp(name)))
    return folders


@pytest.mark.parametrize("architecture", ["smolvlm", "qwen2.5-vl", "llava-onevision"])
def test_every_method_trains_on_each_architecture(architecture, models, mixture, tmp_path):
    folder = models[architecture]
    for method in ("sft", "consistency", "adversarial", "full"):
        out = tmp_path / method
        manifest = train(mixture, folder, out, TrainConfig(method=method, max_steps=2, batch_size=2, effective_batch=2),
                         processor=_processor(architecture, folder), progress=False)
        steps = manifest["steps"]
        assert len(steps) == 2 and all(math.isfinite(s["ce"]) for s in steps)
        assert manifest["rows"]["skipped"] == {} and manifest["rows"]["pairs"] == 4
        if method in ("adversarial", "full"):
            assert all("ce_adv" in s and s["delta_max"] <= float(torch.tensor(1e-3)) and "step_ratio" in s for s in steps)
        if method in ("consistency", "full"):
            assert any("consistency" in s for s in steps)
        if method == "sft":
            assert not any("ce_adv" in s or "consistency" in s for s in steps)
        assert (out / "adapter_config.json").is_file() and (out / "loss.png").is_file()
        recorded = json.loads((out / "train_manifest.json").read_text())
        assert recorded["recipe_sha256"] == "0" * 64 and recorded["config"]["method"] == method
        assert recorded["versions"]["peft"] and len(recorded["mixture_manifest_sha256"]) == 64


def test_full_fine_tuning_freezes_the_vision_side(smol):
    from engine.models.tiny import build_tiny_smolvlm  # noqa: F401 - the smol fixture's model

    model, _ = smol
    import copy

    prepared = prepare_model(copy.deepcopy(model), TrainConfig(full=True))
    trainable = {n for n, p in prepared.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.text_model.", "lm_head.")) for n in trainable)
    assert not any(n.startswith(("model.vision_model.", "model.connector.")) for n in trainable)


CONNECTORS = {"smolvlm": ("model.connector.",), "qwen2.5-vl": ("model.visual.merger.",),
              "llava-onevision": ("model.multi_modal_projector.", "model.image_newline")}
LANGUAGE = {"smolvlm": "model.text_model.", "qwen2.5-vl": "model.language_model.", "llava-onevision": "model.language_model."}


@pytest.mark.parametrize("architecture", ["smolvlm", "qwen2.5-vl", "llava-onevision"])
def test_train_parts_split_each_architecture_into_language_model_connector_and_vision(architecture, models):
    from transformers import AutoModelForImageTextToText

    from engine.train.trainer import parameter_parts

    model = AutoModelForImageTextToText.from_pretrained(models[architecture])
    parts = parameter_parts(model)
    for name, part in parts.items():
        expected = ("lm" if name.startswith((LANGUAGE[architecture], "lm_head.")) else
                    "connector" if name.startswith(CONNECTORS[architecture]) else "vision")
        assert part == expected, (name, part)
    assert set(parts.values()) == {"lm", "connector", "vision"}
    prepared = prepare_model(model, TrainConfig(full=True, parts=("connector", "vision")))
    trainable = {n for n, p in prepared.named_parameters() if p.requires_grad}
    assert trainable == {n for n, part in parts.items() if part != "lm"}


def test_train_all_parts_with_a_learning_rate_per_part(mixture, tiny_vlm, tmp_path):
    """--train lm,connector,vision updates the vision tower and connector too; --part-lr gives a part its own
    rate (here 0-ish for the vision tower, so it barely moves while the connector moves a lot)."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(mixture), "--model", tiny_vlm, "--method", "sft", "--full",
                                       "--train", "lm,connector,vision", "--lr", "1e-2", "--part-lr", "vision=1e-9",
                                       "--max-steps", "2", "--warmup", "0", "--batch-size", "2", "--effective-batch", "2",
                                       "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "train_manifest.json").read_text())
    assert manifest["config"]["parts"] == ["lm", "connector", "vision"] and manifest["config"]["part_lr"] == {"vision": 1e-9}
    assert set(manifest["trainable_parameters"]) == {"lm", "connector", "vision"}
    from transformers import AutoModelForImageTextToText

    before = AutoModelForImageTextToText.from_pretrained(tiny_vlm).state_dict()
    after = load_file(str(out / "model.safetensors"))
    moved = {part: max(float((after[n] - before[n]).abs().max()) for n in after if n.startswith(prefix))
             for part, prefix in (("connector", "model.connector."), ("vision", "model.vision_model."), ("lm", "model.text_model."))}
    assert moved["connector"] > 1e-3 and moved["lm"] > 1e-3 and 0 < moved["vision"] < 1e-6, moved
    result = CliRunner().invoke(main, ["train", str(mixture), "--model", tiny_vlm, "--train", "lm,vision", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--train connector/vision needs --full" in result.output
    result = CliRunner().invoke(main, ["train", str(mixture), "--model", tiny_vlm, "--full", "--train", "lm,eyes", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown model part 'eyes'" in result.output
    result = CliRunner().invoke(main, ["train", str(mixture), "--model", tiny_vlm, "--full", "--part-lr", "vision=1e-3", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--part-lr vision: that part is not trained" in result.output
    result = CliRunner().invoke(main, ["train", str(mixture), "--model", tiny_vlm, "--full", "--part-lr", "lm", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--part-lr 'lm': expected PART=LR" in result.output


@pytest.mark.slow
def test_sixteen_rows_overfit(tiny_vlm, tmp_path):
    """Full fine-tuning drives the answer CE of 16 rows below half its start. LoRA learns too, but on a random
    tiny model its logits stay near uniform: the frozen LM head (std 0.02 on 32 normalised dimensions) bounds
    their scale, which only full fine-tuning can change."""
    colors = list(COLORS)
    rows = [row(f"o:{i}", f"what color is shape {i}?", colors[i % 4] + " circle", "vqa", colors[i % 4]) for i in range(16)]
    mixture = write_mixture(tmp_path / "m16", rows)
    common = dict(method="sft", warmup_ratio=0.0, epochs=12, batch_size=16, effective_batch=16)
    full = train(mixture, tiny_vlm, tmp_path / "full", TrainConfig(full=True, learning_rate=3e-2, **common), progress=False)
    ces = [s["ce"] for s in full["steps"]]
    assert len(ces) == 12 and ces[-1] <= ces[0] / 2, (ces[0], ces[-1])
    assert (tmp_path / "full" / "model.safetensors").is_file()
    lora = train(mixture, tiny_vlm, tmp_path / "lora", TrainConfig(learning_rate=5e-2, lora_r=16, lora_alpha=32, lora_dropout=0.0,
                                                                   **common), progress=False)
    ces = [s["ce"] for s in lora["steps"]]
    assert ces[-1] < ces[0] - 0.1, (ces[0], ces[-1])


def _adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_adapter(mixture, tiny_vlm, tmp_path):
    command = [sys.executable, "-m", "engine.cli", "train", str(mixture), "--model", tiny_vlm, "--method", "full",
               "--batch-size", "1", "--effective-batch", "1", "--max-steps", "10", "--save-steps", "2", "--quiet",
               "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(command + ["--out", str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(command + ["--out", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "killed" / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "adapter_config.json").exists()
    subprocess.run(command + ["--out", str(tmp_path / "killed"), "--resume"], check=True, env=env, capture_output=True)
    whole, resumed = _adapter_weights(tmp_path / "whole"), _adapter_weights(tmp_path / "killed")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.allclose(whole[name], resumed[name], atol=1e-6), name
    steps = json.loads((tmp_path / "killed" / "train_manifest.json").read_text())["steps"]
    assert [s["step"] for s in steps] == list(range(1, 11))


def test_resume_without_checkpoint_and_rerun_over_checkpoints_fail_with_one_line(mixture, tiny_vlm, tmp_path):
    result = CliRunner().invoke(main, ["train", str(mixture), "--model", tiny_vlm, "--out", str(tmp_path / "o"), "--resume"])
    assert result.exit_code == 2 and "holds no checkpoint" in result.output and result.output.count("\n") == 1


def test_the_adapter_loads_in_engine_eval(mixture, tiny_vlm, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(mixture), "--model", tiny_vlm, "--method", "full", "--max-steps", "2",
                                       "--batch-size", "2", "--effective-batch", "2", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    assert isinstance(PeftModel.from_pretrained(base, str(out)), PeftModel)  # the standard layout
    result = CliRunner().invoke(main, ["eval", "--model", tiny_vlm, "--adapter", str(out), "--dataset", str(mixture / "parquet"),
                                       "--corruptions", "gaussian_noise", "--severities", "1", "--seeds", "0",
                                       "--interference", "FB", "--max-new-tokens", "3", "--out", str(tmp_path / "eval"), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["model"] == {"name": tiny_vlm, "adapter": str(out)} and report["clean"]["n"] == 10
    result = CliRunner().invoke(main, ["eval", "--model", tiny_vlm, "--adapter", str(tmp_path), "--dataset", str(mixture / "parquet"),
                                       "--out", str(tmp_path / "eval2")])
    assert result.exit_code == 2 and "not a peft adapter folder" in result.output


@pytest.mark.parametrize("architecture", ["qwen2.5-vl", "llava-onevision"])
def test_the_vision_tower_runs_once_per_pgd_yet_the_perturbed_logits_are_unchanged(architecture, models):
    """PGD reuses the merged embeddings and drops the pixels from its passes; on Qwen2.5-VL (M-RoPE positions
    from image_grid_thw) and LLaVA-OneVision (anyres tiles) that gives the same logits as the full forward."""
    folder = models[architecture]
    model, processor = load_model(folder, "cpu", "float32", _processor(architecture, folder))
    batch, _ = _batch(model, processor, [row("a", "what color is the shape?", "red", "text_heavy"),
                                         row("b", "what is it?", "blue circle", "image_heavy", "blue")])
    inputs, mask = batch["adv_inputs"], batch["adv_mask"]
    delta = torch.where(mask[..., None], torch.full((*mask.shape, model.config.text_config.hidden_size), 1e-3), 0.0)
    with torch.no_grad():
        with embedding_perturbation(model, delta, mask):
            full = model(**inputs).logits
        with embedding_perturbation(model, delta, mask, merged_embeddings(model, inputs)):
            cached = model(**without_vision(inputs)).logits
    assert torch.allclose(full, cached, atol=1e-6)
