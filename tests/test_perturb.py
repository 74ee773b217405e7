"""Corruption severities and perturbed variants."""

import io
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REPO
from engine.categories import subset_mapping
from engine.perturb.image import (GAUSSIAN_SIGMA, IMPULSE_AMOUNT, SHOT_PHOTONS, canvas, corrupt_images, gaussian_noise,
                                  impulse_noise, shot_noise)
from engine.perturb.text import CHAR_PROBABILITY, char_noise, corrupt_texts
from engine.perturb.variants import misleading, question_options, unrelated_facts, wrong_option
from engine.recipes import RecipeError, build, load_recipe

GREY = np.full((64, 128, 128, 3), 0.5)


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_gaussian_noise_has_the_severity_sigma(severity):
    noisy = gaussian_noise(GREY, severity, np.random.default_rng(0))
    sigma = GAUSSIAN_SIGMA[severity - 1]
    # clipping to [0, 1] trims values beyond 0.5 / sigma standard deviations: compare on the unclipped ones
    inside = (noisy > 0) & (noisy < 1)
    z = 0.5 / sigma
    from scipy.stats import truncnorm

    expected = sigma * truncnorm(-z, z).std()
    assert np.std(noisy[inside] - 0.5) == pytest.approx(expected, rel=0.01)
    assert abs(np.mean(noisy - 0.5)) < 1e-3


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_shot_noise_is_poisson_with_the_severity_photon_count(severity):
    from scipy.stats import poisson

    c = SHOT_PHOTONS[severity - 1]
    noisy = shot_noise(np.full((32, 64, 64, 3), 0.2), severity, np.random.default_rng(0))
    # min(K / c, 1) with K ~ Poisson(0.2 c): its exact mean and variance from the pmf
    k = np.arange(0, 200)
    values, weights = np.minimum(k / c, 1.0), poisson(0.2 * c).pmf(k)
    mean = np.sum(values * weights)
    assert np.mean(noisy) == pytest.approx(mean, rel=0.01)
    assert np.var(noisy) == pytest.approx(np.sum((values - mean) ** 2 * weights), rel=0.02)
    assert np.allclose(np.round(noisy * c), noisy * c)  # quantised to multiples of 1 / c


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_impulse_noise_replaces_the_severity_share_with_salt_or_pepper(severity):
    noisy = impulse_noise(GREY, severity, np.random.default_rng(0))
    changed = noisy != 0.5
    assert changed.mean() == pytest.approx(IMPULSE_AMOUNT[severity - 1], rel=0.02)
    assert set(np.unique(noisy[changed])) == {0.0, 1.0}
    assert (noisy[changed] == 1.0).mean() == pytest.approx(0.5, abs=0.01)


def test_corrupting_encoded_images_is_seeded_and_batches_by_size():
    images = []
    for size in [(32, 32), (20, 40), (32, 32)]:
        out = io.BytesIO()
        Image.new("RGB", size, (128, 128, 128)).save(out, format="PNG")
        images.append(out.getvalue())
    first = corrupt_images(images, "gaussian_noise", 3, seed=1)
    assert first == corrupt_images(images, "gaussian_noise", 3, seed=1)
    assert first != corrupt_images(images, "gaussian_noise", 3, seed=2)
    assert [Image.open(io.BytesIO(b)).size for b in first] == [(32, 32), (20, 40), (32, 32)]
    with pytest.raises(ValueError, match="severity must be 1-5"):
        gaussian_noise(GREY, 6, np.random.default_rng(0))


def test_canvases():
    assert Image.open(io.BytesIO(canvas("black", 5, 3))).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert Image.open(io.BytesIO(canvas("white", 5, 3))).getextrema() == ((255, 255), (255, 255), (255, 255))
    noise = np.asarray(Image.open(io.BytesIO(canvas("random_pixels", 64, 64, seed=3))))
    assert noise.shape == (64, 64, 3) and 100 < noise.mean() < 155 and canvas("random_pixels", 8, 8, 3) == canvas("random_pixels", 8, 8, 3)


@pytest.mark.parametrize("kind", ["insert", "delete", "replace"])
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_character_noise_rates(kind, severity):
    text = "the quick brown fox jumps over the lazy dog " * 200
    p = CHAR_PROBABILITY[severity - 1]
    noisy = char_noise(text, kind, severity, np.random.default_rng(0))
    n = len(text)
    if kind == "insert":
        assert (len(noisy) - n) / n == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))
    elif kind == "delete":
        assert (n - len(noisy)) / n == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))
    else:
        assert len(noisy) == n
        changed = np.mean([a != b for a, b in zip(text, noisy)])
        expected = p * 62 / 63  # a replacement draws the same character 1 time in 63
        assert changed == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / n))


class CharacterBagEncoder:
    """A small deterministic sentence encoder for tests: L2-normalised letter counts."""

    def encode(self, texts, modality):
        vectors = np.array([[t.lower().count(c) for c in "abcdefghijklmnopqrstuvwxyz "] for t in texts], float) + 1e-9
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_fidelity_rule_retries_then_drops():
    texts = ["the cat sat on the mat", "a"]
    strict = corrupt_texts(texts, "replace", 5, seed=0, encoder=CharacterBagEncoder(), threshold=0.999, max_tries=100)
    assert strict.texts == [None, strict.texts[1]] and strict.tries[0] == 100  # never similar enough: dropped
    assert strict.dropped >= 1
    loose = corrupt_texts(texts, "replace", 1, seed=0, encoder=CharacterBagEncoder(), threshold=0.2)
    assert loose.dropped == 0 and loose.tries == [1, 1]
    again = corrupt_texts(texts, "replace", 1, seed=0, encoder=CharacterBagEncoder(), threshold=0.2)
    assert again.texts == loose.texts  # seeded


def test_fidelity_rule_with_minilm():
    from engine.models.encoders import MINILM, load_encoder

    result = corrupt_texts(["what color is the shape in the picture?"] * 4, "insert", 5, seed=0, encoder=load_encoder(MINILM))
    assert all(t is not None and t != "what color is the shape in the picture?" for t in result.texts)


def test_text_variants():
    assert question_options("Which is red?\nA. apple\nB. sky") == {"A": "apple", "B": "sky"}
    text = unrelated_facts("what color is the shape?", "s:1", facts=2)
    assert text.endswith(" what color is the shape?") and text.count(". ") >= 1
    assert text == unrelated_facts("what color is the shape?", "s:1", facts=2)
    assert wrong_option("Which is red?\nA. apple\nB. sky", "A", None, [], [], "s:1") == "sky"
    assert wrong_option("what color?", "red", "red", ["blue", "red"], [], "s:1") == "blue"
    assert misleading("what shape?", "circle", "s:1").startswith("The picture seems to describe a circle. ")


PERTURB = "perturb={image_heavy: {unrelated_facts: 0.3, misleading: 0.2}, text_heavy: {random_pixels: 0.2, black: 0.1, white: 0.1, irrelevant_image: 0.2}}"


def test_variants_pair_with_their_origins_at_the_recipe_rates(sample_store, tmp_path):
    recipe = load_recipe(REPO / "recipes" / "cauldron_r0.yaml", [f"output.path={tmp_path / 'out'}", PERTURB])
    manifest = build(sample_store, recipe, progress=False).manifest
    rows = pq.read_table(tmp_path / "out" / "parquet").to_pylist()
    originals = {r["sample_id"]: (i, r) for i, r in enumerate(rows) if r["origin_id"] is None}
    variants = [(i, r) for i, r in enumerate(rows) if r["origin_id"] is not None]
    assert len(originals) == manifest["rows"]["total"] == 380
    assert manifest["rows"]["variants"] == dict(sorted({k: sum(r["perturbation"] == k for _, r in variants) for k in
                                                         {r["perturbation"] for _, r in variants}}.items()))
    for index, variant in variants:
        origin_index, origin = originals[variant["origin_id"]]
        assert index == origin_index + 1  # a variant follows its original
        assert variant["sample_id"] == f"{variant['origin_id']}#{variant['perturbation']}"
        if variant["perturbation"] in ("unrelated_facts", "misleading"):
            assert origin["task_kind"] == "image_heavy" and variant["images"] == origin["images"]
            assert variant["texts"][0]["user"].endswith(origin["texts"][0]["user"])
            assert variant["texts"][0]["assistant"] == origin["texts"][0]["assistant"]
        else:
            assert origin["task_kind"] == "text_heavy" and variant["texts"] == origin["texts"]
            assert variant["images"] != origin["images"]
    image_heavy = sum(r["task_kind"] == "image_heavy" for _, r in originals.values())
    text_perturbed = sum(r["perturbation"] in ("unrelated_facts", "misleading") for _, r in variants)
    assert abs(text_perturbed / image_heavy - 0.5) < 4 * math.sqrt(0.25 / image_heavy)


def test_rebuild_with_perturbations_is_byte_identical(sample_store, tmp_path):
    for name in ("a", "b"):
        build(sample_store, load_recipe(REPO / "recipes" / "cauldron_r0.yaml", [f"output.path={tmp_path / name}", PERTURB]), progress=False)
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}  # noqa: E731
    assert files(tmp_path / "a") == files(tmp_path / "b")


def test_rates_above_one_are_refused(sample_store, tmp_path):
    recipe = load_recipe(REPO / "recipes" / "cauldron_r0.yaml",
                         [f"output.path={tmp_path / 'out'}", "perturb={image_heavy: {unrelated_facts: 0.7, misleading: 0.5}}"])
    with pytest.raises(RecipeError, match=r"perturb.image_heavy: rates add up to 1.2"):
        build(sample_store, recipe, progress=False)
    assert not (tmp_path / "out").exists()


def test_the_mixture_carries_the_task_kind_its_variants_were_chosen_by(sample_store, tmp_path):
    """`perturb.task_kind` re-labels rows for the variants; the mixture must say the same kind, since the
    trainer aims PGD at the irrelevant modality by the row's task_kind."""
    override = "perturb.task_kind=case when subset = 'word_math' then 'text_heavy' else 'image_heavy' end"
    recipe = load_recipe(REPO / "recipes" / "cauldron_r0.yaml", [f"output.path={tmp_path / 'out'}", PERTURB, override])
    build(sample_store, recipe, progress=False)
    rows = pq.read_table(tmp_path / "out" / "parquet", columns=["subset", "task_kind", "perturbation"]).to_pylist()
    assert {(r["subset"] == "word_math", r["task_kind"]) for r in rows} == {(True, "text_heavy"), (False, "image_heavy")}
    image_variants = {r["perturbation"] for r in rows if r["task_kind"] == "text_heavy"} - {None}
    assert image_variants and image_variants <= {"random_pixels", "black", "white", "irrelevant_image"}
    plain = load_recipe(REPO / "recipes" / "cauldron_r0.yaml", [f"output.path={tmp_path / 'plain'}", PERTURB])
    build(sample_store, plain, progress=False)
    mapping = subset_mapping()
    for r in pq.read_table(tmp_path / "plain" / "parquet", columns=["subset", "task_kind"]).to_pylist():
        assert r["task_kind"] == mapping[r["subset"]].task_kind  # without the key, each row keeps its own kind
