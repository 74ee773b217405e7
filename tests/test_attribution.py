"""Modality attribution: the BROJA decomposition, the discretisation over samples, the captured
representations, and `engine attribute`."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from engine.attribution import attribute_representations, broja_pid, kmeans
from engine.attribution.capture import capture, language_model
from engine.attribution.pid import _mutual_information, min_synergy_information
from engine.cli import main
from engine.models.backends import load_backend
from engine.models.backends import Request
from engine.interactions.pid import classic_distributions

AND_REDUNDANCY = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)) - 0.5  # I(X1; Y) of AND = H(Y) - H(Y|X1) = 0.3113


# -- the estimator ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("xor", (0, 0, 0, 1)),
    ("redundant_copy", (1, 0, 0, 0)),
    ("unique_x1", (0, 1, 0, 0)),
    ("and", (AND_REDUNDANCY, 0, 0, 0.5)),
])
def test_broja_is_exact_on_the_textbook_cases(name, expected):
    assert tuple(broja_pid(classic_distributions()[name])) == pytest.approx(expected, abs=1e-5)


def test_one_source_alone_is_unique_to_that_source_whichever_it_is():
    joint = classic_distributions()["unique_x1"].transpose(1, 0, 2)  # now y = x2
    assert tuple(broja_pid(joint)) == pytest.approx((0, 0, 1, 0), abs=1e-5)
    assert tuple(broja_pid(classic_distributions()["xor"], base=math.e)) == pytest.approx((0, 0, 0, math.log(2)), abs=1e-5)


def random_joints(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for index in range(count):
        shape = [(3, 3, 3), (2, 4, 3), (4, 3, 2), (3, 3, 4)][index % 4]
        joint = rng.dirichlet(np.full(int(np.prod(shape)), 0.5)).reshape(shape)
        joint[rng.random(shape) < 0.2] = 0  # zeros, as empirical histograms have
        yield joint / joint.sum()


def test_terms_sum_to_the_joint_information_and_are_non_negative():
    for joint in random_joints(12):
        terms = broja_pid(joint)
        total = _mutual_information(joint.reshape(-1, joint.shape[2])) / math.log(2)
        assert terms.total == pytest.approx(total, abs=1e-12)
        assert min(terms) >= -1e-9
        i1, i2 = (_mutual_information(joint.sum(axis)) / math.log(2) for axis in (1, 0))
        assert terms.R + terms.U1 == pytest.approx(i1, abs=1e-9) and terms.R + terms.U2 == pytest.approx(i2, abs=1e-9)


def convex_program_minimum(joint: np.ndarray) -> float:
    """min over Δ_P of I_Q(X1,X2;Y) by a general-purpose solver: SLSQP over the null space of the marginal
    constraints (which are redundant, so that SLSQP needs them eliminated), from several starts;
    only the runs that end inside Δ_P count."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    from scipy.linalg import null_space

    n1, n2, ny = joint.shape
    rows = []
    for axis, size in ((0, n1), (1, n2)):
        for index in range(size):
            for y in range(ny):
                mask = np.zeros(joint.shape)
                if axis == 0:
                    mask[index, :, y] = 1
                else:
                    mask[:, index, y] = 1
                rows.append(mask.ravel())
    basis = null_space(np.array(rows))
    start, py = joint.ravel(), joint.sum((0, 1))

    def objective(z):
        q = np.maximum(start + basis @ z, 1e-300).reshape(joint.shape)
        q12 = q.sum(2, keepdims=True)
        value = np.sum(np.where(q > 1e-300, q * np.log(q / (q12 * py)), 0))
        return value, basis.T @ (np.log(q / q12) - np.log(np.where(py > 0, py, 1))).ravel()

    product = (np.einsum("ay,by->aby", joint.sum(1), joint.sum(0)) / np.where(py > 0, py, 1)).ravel()
    best = math.inf
    for weight in (0.0, 0.5, 1.0):
        z0 = np.linalg.lstsq(basis, weight * (product - start), rcond=None)[0]
        result = scipy_optimize.minimize(objective, z0, jac=True, method="SLSQP", options={"ftol": 1e-15, "maxiter": 3000},
                                         constraints=[{"type": "ineq", "fun": lambda z: start + basis @ z, "jac": lambda z: basis}])
        if (start + basis @ result.x).min() >= -1e-12:  # SLSQP may stop a hair outside Δ_P, where the clipped
            best = min(best, result.fun)                # objective reads lower than any member of Δ_P can
    return best


def test_the_solver_finds_the_minimum_not_the_maximum_entropy_member():
    """Against an independent solver of the convex program: never above it, and below it only where SLSQP
    stalls at the boundary (then by less than 1e-5 nats, with the duality gap certifying ours). And the
    answer is well below the maximum-entropy member P(x1|y) P(x2|y) P(y) of Δ_P, which is where a single
    IPFP projection from the product start stays."""
    below_max_entropy = 0
    for joint in random_joints(8, seed=1):
        found, gap, _ = min_synergy_information(joint, tol=1e-12, max_iter=20000)
        reference = convex_program_minimum(joint)
        assert reference - 2e-5 < found <= reference + 1e-9
        assert gap < 1e-10
        py = joint.sum((0, 1))
        product = np.einsum("ay,by->aby", joint.sum(1), joint.sum(0)) / np.where(py > 0, py, 1)
        below_max_entropy += _mutual_information(product.reshape(-1, joint.shape[2])) - found > 1e-3
    assert below_max_entropy >= 6


def test_kmeans_is_seeded_and_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 400)
    points = np.eye(4)[truth] * 10 + rng.normal(0, 0.1, (400, 4))
    labels = kmeans(points, 4, seed=3)
    assert np.array_equal(labels, kmeans(points, 4, seed=3))
    assert len({(t, l) for t, l in zip(truth, labels)}) == 4  # a bijection between clusters and truth


# -- synthetic representations with known structure ------------------------------------------------------

def representations(rule: str, n: int = 2000, seed: int = 0):
    """Image and text features drawn around one of ten centres each; the hidden state around a centre
    chosen by ``rule`` from the image's and the text's classes."""
    rng = np.random.default_rng(seed)
    image_class, text_class = rng.integers(0, 10, n), rng.integers(0, 10, n)
    if rule == "both_copy":
        text_class = image_class
    target = {"image": image_class, "text": text_class, "both_copy": image_class, "xor": (image_class + text_class) % 10,
              "split": (image_class % 5) * 2 + text_class % 2}[rule]
    centres = rng.normal(size=(3, 10, 24))
    noisy = lambda which, classes: centres[which][classes] + rng.normal(0, 0.05, (n, 24))  # noqa: E731
    return noisy(0, image_class), noisy(1, text_class), noisy(2, target)


@pytest.mark.parametrize("rule, dominant, ct", [
    ("image", "U_I", 0.0),
    ("text", "U_T", 1.0),
    ("both_copy", "R", None),
    ("xor", "S", None),
    ("split", None, 1 / (1 + math.log2(5))),  # U_I = log2 5 bits (image class mod 5), U_T = 1 bit (text parity)
])
def test_synthetic_structure_gives_the_right_dominant_term_and_text_share(rule, dominant, ct):
    result = attribute_representations(*representations(rule), bootstrap=5, shuffles=3)
    if dominant:
        assert max(result.terms, key=result.terms.get) == dominant
        assert result.terms[dominant] > 2.5  # log2(10) = 3.32 bits, less the estimator's bias
    if ct is not None:
        assert result.CT == pytest.approx(ct, abs=0.08)
        low, high = result.intervals["CT"]
        assert low - 0.05 <= ct <= high + 0.05
    # the shuffled baseline is what the estimator reports with no structure: far below the real terms
    assert max(result.shuffled[t][1] for t in ("R", "U_I", "U_T")) < 0.2


# -- representations from a model -----------------------------------------------------------------------

def images_and_questions(count: int):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    questions = ["what color is the shape?", "what shape is in the image?", "Describe this image.", "Is it round?"]
    return [Request([Image.new("RGB", (32 + 8 * (i % 3), 32), colours[i % 4])], questions[(i // 4) % 4]) for i in range(count)]


@pytest.fixture(scope="module")
def backend(tiny_vlm):
    return load_backend(tiny_vlm)


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_hooks_capture_the_hidden_states_output_hidden_states_returns(backend, pool):
    requests = images_and_questions(3)
    out = capture(backend, requests, [r.text for r in requests], [1, 2], pool)
    inputs = backend._inputs(requests)
    projected = []
    connector = backend.model.model.connector.register_forward_hook(lambda m, a, o: projected.append(o))
    with torch.no_grad():
        hidden = backend.model(**inputs, output_hidden_states=True).hidden_states
    connector.remove()
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    for layer in (1, 2):
        expected = hidden[layer][:, -1] if pool == "last" else (hidden[layer] * mask).sum(1) / mask.sum(1)
        np.testing.assert_allclose(out[f"layer{layer}"], expected.numpy(), atol=1e-6)
    # the image features are the projector's output, averaged over each image's tokens
    np.testing.assert_allclose(out["image"], projected[0].mean(1).numpy(), atol=1e-6)
    table = backend.model.get_input_embeddings()
    ids = backend.processor.tokenizer(requests[0].text, add_special_tokens=False)["input_ids"]
    np.testing.assert_allclose(out["text"][0], table(torch.tensor(ids)).mean(0).detach().numpy(), atol=1e-6)


@pytest.mark.parametrize("architecture", ["qwen2.5-vl", "llava-onevision"])
def test_hooks_work_on_the_other_architectures(architecture, tmp_path):
    from test_generate import ARCHITECTURES, images_only_backend

    build, *processor = ARCHITECTURES[architecture]
    other = images_only_backend(str(build(tmp_path / architecture)), *processor)
    requests = images_and_questions(2)
    out = capture(other, requests, [r.text for r in requests], [1, 2], "last")
    inputs = other._inputs(requests)
    with torch.no_grad():
        hidden = other.model(**inputs, output_hidden_states=True).hidden_states
    for layer in (1, 2):
        np.testing.assert_allclose(out[f"layer{layer}"], hidden[layer][:, -1].numpy(), atol=1e-5)
    assert np.isfinite(out["image"]).all() and out["image"].shape == out["text"].shape


def zero_image_features(backend):
    """Make the model blind: the decoder sees zeros where the projected image features would be."""
    base, decoder = language_model(backend.model)
    image_token = base.config.image_token_id
    current = {}

    def remember_ids(module, args, kwargs):
        current["ids"] = kwargs["input_ids"]

    def blank(module, args, kwargs):
        embeds = kwargs["inputs_embeds"].clone()
        embeds[current["ids"] == image_token] = 0
        return args, {**kwargs, "inputs_embeds": embeds}

    return [backend.model.register_forward_pre_hook(remember_ids, with_kwargs=True), decoder.register_forward_pre_hook(blank, with_kwargs=True)]


def noise_image_dataset(folder, rows: int = 240):
    """Random-pixel images under four questions, in the Cauldron Parquet layout."""
    import io

    from conftest import cauldron_parquet, qa

    rng = np.random.default_rng(0)
    questions = ["what color is the shape?", "what shape is in the image?", "Describe this image.", "Is it round?"]
    def noise() -> bytes:
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out, format="PNG")
        return out.getvalue()
    cauldron_parquet(folder / "train-0.parquet", [([noise()], qa(questions[i % 4], "red")) for i in range(rows)])
    return folder


@pytest.mark.slow
def test_a_model_blind_to_the_image_gets_an_image_share_within_the_shuffled_baseline(tiny_vlm, tmp_path):
    """The same tiny model, once as it is and once with its image features zeroed before the decoder: the
    blind one's U_I stays within the shuffled-pairing baseline (and so does its CI), the seeing one's does not."""
    from engine.attribution.run import AttributeConfig, attribute
    from engine.store import Store

    dataset = str(noise_image_dataset(tmp_path / "noise"))
    config = AttributeConfig(layers=[2], bootstrap=0, shuffles=20)
    results = {}
    for blind in (False, True):
        model = load_backend(tiny_vlm)
        handles = zero_image_features(model) if blind else []
        results[blind] = attribute(Store(tmp_path / f"store-{blind}"), model, dataset=dataset, config=config, progress=False).rows[0]
        for handle in handles:
            handle.remove()
    baseline = {blind: json.loads(row["baseline"])["mean_and_q95"] for blind, row in results.items()}
    assert results[True]["U_I"] <= baseline[True]["U_I"][1] and results[True]["CI"] <= baseline[True]["CI"][1]
    assert results[False]["U_I"] > baseline[False]["U_I"][1]
    assert results[True]["U_T"] > baseline[True]["U_T"][1]  # the text still shows


# -- the command ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_attribute_writes_rows_prints_tables_plots_and_resumes_from_its_cache(sample_store, tiny_vlm, tmp_path):
    args = ["--store", str(sample_store.root), "attribute", "--model", tiny_vlm, "--limit", "120", "--bootstrap", "4",
            "--shuffles", "2", "--quiet", "--plot", str(tmp_path / "depth.png")]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "layer 1" in first.output and "layer 2" in first.output and "120 samples captured, 0 from the cache" in first.output
    assert (tmp_path / "depth.png").stat().st_size > 0
    rows = sample_store.arrow("attributions").to_pylist()
    assert [r["layer"] for r in rows] == [1, 2] and all(r["n"] == 120 and r["selection"] == "all" for r in rows)
    assert all(r["R"] + r["U_I"] + r["U_T"] + r["S"] > 0 and r["CT"] + r["CI"] == pytest.approx(1) for r in rows)
    assert set(json.loads(rows[0]["intervals"])["intervals"]) == {"R", "U_I", "U_T", "S", "CT", "CI"}

    # the representations are cached per chunk: a rerun captures nothing, and gives the same numbers
    again = CliRunner().invoke(main, args)
    assert "0 samples captured, 120 from the cache" in again.output
    rows = sample_store.arrow("attributions").to_pylist()
    assert [r["U_T"] for r in rows[:2]] == [r["U_T"] for r in rows[2:]]

    by_subset = CliRunner().invoke(main, args + ["--by", "subset", "--layers", "2"])
    assert by_subset.exit_code == 0, by_subset.output
    selections = [r["selection"] for r in sample_store.arrow("attributions").to_pylist()[4:]]
    assert selections and all(s.startswith("all | subset = ") for s in selections)


@pytest.mark.parametrize("extra, message", [
    (["--where", "no_such_column = 1"], "--where"),
    (["--layers", "1,x"], "--layers: expected comma-separated integers"),
    (["--layers", "7"], "layers [7] out of range: the model has decoder layers 1..2"),
    (["--where", "false"], "attribution needs more rows than --clusters"),
    (["--adapter", "/no/such/adapter"], "adapter '/no/such/adapter' is not a folder"),
])
def test_bad_input_fails_with_one_line_and_writes_nothing(sample_store, tiny_vlm, extra, message):
    result = CliRunner().invoke(main, ["--store", str(sample_store.root), "attribute", "--model", tiny_vlm, "--quiet", *extra])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and message in result.output, result.output
    assert not sample_store.has("attributions")


def test_an_adapter_is_loaded_on_the_model_and_recorded(sample_store, tiny_vlm, tmp_path):
    from peft import LoraConfig, get_peft_model

    from engine.attribution.run import load_attribution_backend

    base = load_backend(tiny_vlm)
    torch.manual_seed(0)
    lora = get_peft_model(base.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    adapted = load_attribution_backend(tiny_vlm, str(tmp_path / "adapter"))
    requests = images_and_questions(2)
    with_adapter = capture(adapted, requests, [r.text for r in requests], [2], "last")["layer2"]
    without = capture(load_backend(tiny_vlm), requests, [r.text for r in requests], [2], "last")["layer2"]
    assert not np.allclose(with_adapter, without)  # the adapter's weights are in the forward pass
    result = CliRunner().invoke(main, ["--store", str(sample_store.root), "attribute", "--model", tiny_vlm, "--adapter",
                                       str(tmp_path / "adapter"), "--limit", "40", "--clusters", "4", "--components", "4",
                                       "--bootstrap", "0", "--shuffles", "0", "--layers", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert sample_store.arrow("attributions").column("adapter").to_pylist() == [str(tmp_path / "adapter")]
